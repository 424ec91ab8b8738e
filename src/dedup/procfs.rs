//! Parsers of /proc shared by the dedup modules: a process's ksm_stat, and /proc/PID/stat of a
//! task (ksmd's and the vCPU threads' CPU time, a process's start time for the KSM journal).

use std::fs;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected content {text:?} in {}", path.display())]
    Parse { path: PathBuf, text: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One process's KSM figures, from /proc/PID/ksm_stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessKsm {
    /// Pages KSM tracks (has looked at) in this process.
    pub rmap_items: u64,
    /// Pages merged with the kernel's zero page.
    pub zero_pages: u64,
    /// Pages mapped to KSM pages, kept copies included.
    pub merging_pages: u64,
    /// Bytes saved minus KSM's metadata for this process; may be negative.
    pub process_profit: i64,
    /// prctl(PR_SET_MEMORY_MERGE) in effect; `None` on kernels that do not say.
    pub merge_any: Option<bool>,
    /// Any of the process's memory is registered with KSM; `None` on kernels that do not say.
    pub mergeable: Option<bool>,
}

/// Reads /proc/self (or /proc/PID) ksm_stat, and ksm_merging_pages on kernels whose ksm_stat
/// lacks that line.
pub fn read_process_ksm(pid: Option<u32>) -> Result<ProcessKsm> {
    let dir = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    };
    let path = dir.join("ksm_stat");
    let text = fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let (mut stat, has_merging) = parse_ksm_stat(&text).map_err(|line| Error::Parse {
        path: path.clone(),
        text: line,
    })?;
    if !has_merging {
        let path = dir.join("ksm_merging_pages");
        let text = fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        stat.merging_pages = text.trim().parse().map_err(|_| Error::Parse {
            path,
            text: text.trim().to_owned(),
        })?;
    }
    Ok(stat)
}

/// Parses ksm_stat ("ksm_rmap_items 12", "ksm_merge_any: no", ...). Unknown lines are skipped for
/// newer kernels. Returns whether a ksm_merging_pages line was present; a malformed line is the error.
pub(crate) fn parse_ksm_stat(text: &str) -> std::result::Result<(ProcessKsm, bool), String> {
    fn number<T: FromStr>(line: &str, value: &str) -> std::result::Result<T, String> {
        value.parse().map_err(|_| line.to_owned())
    }
    fn yes_no(line: &str, value: &str) -> std::result::Result<Option<bool>, String> {
        match value {
            "yes" => Ok(Some(true)),
            "no" => Ok(Some(false)),
            _ => Err(line.to_owned()),
        }
    }

    let mut stat = ProcessKsm::default();
    let mut has_merging = false;
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim();
        match key.trim_end_matches(':') {
            "ksm_rmap_items" => stat.rmap_items = number(line, value)?,
            "ksm_zero_pages" => stat.zero_pages = number(line, value)?,
            "ksm_merging_pages" => {
                stat.merging_pages = number(line, value)?;
                has_merging = true;
            }
            "ksm_process_profit" => stat.process_profit = number(line, value)?,
            "ksm_merge_any" => stat.merge_any = yes_no(line, value)?,
            "ksm_mergeable" => stat.mergeable = yes_no(line, value)?,
            _ => {}
        }
    }
    Ok((stat, has_merging))
}

/// The fields of /proc/PID/stat that kvmerge needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TaskStat<'a> {
    comm: &'a str,
    flags: u64,
    pub(crate) utime: u64,
    pub(crate) stime: u64,
    /// Field 22: when the task started, in clock ticks after boot. With the pid it names one
    /// process for good: a pid is reused, a (pid, start time) pair is not.
    start_time: u64,
}

/// PF_KTHREAD in the task flags: a kernel thread, which a user process named "ksmd" is not.
const PF_KTHREAD: u64 = 0x0020_0000;

impl TaskStat<'_> {
    pub(crate) fn is_ksmd(&self) -> bool {
        self.comm == "ksmd" && self.flags & PF_KTHREAD != 0
    }
}

/// Parses "PID (COMM) STATE PPID ...". COMM may contain spaces and parentheses, so the fields are
/// counted from the last ')'.
pub(crate) fn parse_task_stat(text: &str) -> Option<TaskStat<'_>> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    // After ')': state(3) ppid pgrp session tty_nr tpgid flags(9) minflt cminflt majflt cmajflt
    // utime(14) stime(15), numbered as in proc(5).
    let mut fields = text.get(close + 1..)?.split_whitespace();
    let flags = fields.nth(6)?.parse().ok()?;
    let utime = fields.nth(4)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    // cutime(16) cstime priority nice num_threads itrealvalue starttime(22)
    let start_time = fields.nth(6)?.parse().ok()?;
    Some(TaskStat {
        comm,
        flags,
        utime,
        stime,
        start_time,
    })
}

/// ksmd's pid, found once: the kernel thread never exits. `None` if KSM is absent or ksmd is not
/// visible (another pid namespace).
fn ksmd_pid() -> Option<u32> {
    static PID: OnceLock<Option<u32>> = OnceLock::new();
    *PID.get_or_init(|| {
        fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let text = fs::read_to_string(entry.path().join("stat")).ok()?;
            parse_task_stat(&text)?.is_ksmd().then_some(pid)
        })
    })
}

/// CPU time ksmd has used since boot (user + system); `None` if ksmd cannot be seen.
pub fn ksmd_cpu_time() -> Option<Duration> {
    let pid = ksmd_pid()?;
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let stat = parse_task_stat(&text)?;
    if !stat.is_ksmd() {
        return None;
    }
    ticks_to_duration(stat.utime.checked_add(stat.stime)?, clock_ticks()?)
}

/// The start time (field 22 of /proc/PID/stat) of process `pid`; `None` if there is no such
/// process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_task_stat(&text)?.start_time)
}

/// CPU time (user + system) of one thread of this process, by Linux thread id (the calling
/// thread's is `thread_cpu_time(gettid())`). The merge thread reads its vCPU threads' time this way
/// to tell busy guests from idle ones, and its own for its CPU share. Resolution: one clock tick.
pub fn thread_cpu_time(tid: i32) -> Option<Duration> {
    let text = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let stat = parse_task_stat(&text)?;
    ticks_to_duration(stat.utime.checked_add(stat.stime)?, clock_ticks()?)
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0)
}

pub(crate) fn ticks_to_duration(ticks: u64, hz: u64) -> Option<Duration> {
    let nanos = (ticks % hz).checked_mul(1_000_000_000)? / hz;
    Some(Duration::new(ticks / hz, u32::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn ksm_stat_parsing() {
        let text = "ksm_rmap_items 1024\nksm_zero_pages 7\nksm_merging_pages 300\n\
                    ksm_process_profit -512\nksm_merge_any: no\nksm_mergeable: yes\n";
        let (stat, has_merging) = parse_ksm_stat(text).unwrap();
        assert!(has_merging);
        assert_eq!(
            stat,
            ProcessKsm {
                rmap_items: 1024,
                zero_pages: 7,
                merging_pages: 300,
                process_profit: -512,
                merge_any: Some(false),
                mergeable: Some(true),
            }
        );

        // An older kernel: rmap items only, merging pages in their own file.
        let (stat, has_merging) = parse_ksm_stat("ksm_rmap_items 3\nsomething_new 1\n").unwrap();
        assert!(!has_merging);
        assert_eq!(stat.rmap_items, 3);
        assert_eq!((stat.merge_any, stat.mergeable), (None, None));

        assert_eq!(
            parse_ksm_stat("ksm_rmap_items many\n").unwrap_err(),
            "ksm_rmap_items many"
        );
        assert!(parse_ksm_stat("ksm_mergeable: maybe\n").is_err());
    }

    #[test]
    fn own_ksm_stat_reads_where_the_kernel_has_it() {
        if !Path::new("/proc/self/ksm_stat").exists() {
            println!("skipping: this kernel has no /proc/self/ksm_stat");
            return;
        }
        let stat = read_process_ksm(None).unwrap();
        assert!(stat.mergeable.is_some());
    }

    #[test]
    fn task_stat_parsing() {
        let ksmd = "37 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 12 34 0 0 25 5 1 0 27 0 0";
        let stat = parse_task_stat(ksmd).unwrap();
        assert_eq!((stat.comm, stat.utime, stat.stime), ("ksmd", 12, 34));
        assert_eq!(stat.start_time, 27);
        assert!(stat.is_ksmd());

        let odd = "4242 (a) (b) c) R 1 4242 4242 0 -1 4194304 100 0 0 0 500 60 0 0 20 0 1 0 1234";
        let stat = parse_task_stat(odd).unwrap();
        assert_eq!((stat.comm, stat.flags), ("a) (b) c", 4_194_304));
        assert_eq!((stat.utime, stat.stime), (500, 60));
        assert_eq!(stat.start_time, 1234);

        // A user process that calls itself ksmd is not the kernel thread.
        let fake = "99 (ksmd) S 1 99 99 0 -1 4194304 0 0 0 0 1 1 0 0 20 0 1 0 9";
        assert!(!parse_task_stat(fake).unwrap().is_ksmd());

        assert_eq!(parse_task_stat("37 (ksmd) S 2 0"), None);
        assert_eq!(parse_task_stat("no parentheses"), None);
        // Cut before the start time.
        assert_eq!(
            parse_task_stat("4242 (a) R 1 4242 4242 0 -1 4194304 100 0 0 0 500 60 0 0 20 0 1"),
            None
        );
    }

    #[test]
    fn start_time_of_this_process_and_of_none() {
        let me = process_start_time(std::process::id()).expect("our own stat");
        assert_eq!(process_start_time(std::process::id()), Some(me));
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert!(thread_cpu_time(tid).is_some());
        // Beyond pid_max (at most 2^22).
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn ticks_convert_to_durations() {
        assert_eq!(
            ticks_to_duration(250, 100),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            ticks_to_duration(1, 3),
            Some(Duration::from_nanos(333_333_333))
        );
        // Read-only on the real host: ksmd exists where KSM does (unless in another pid namespace).
        let _ = ksmd_cpu_time();
    }
}
