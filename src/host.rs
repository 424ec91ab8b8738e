//! What the host can hold: the admission of a whole fleet before anything starts (guest RAM
//! against the host's and the memory cgroup's available memory, open files, threads, memory
//! mappings), and the memory cgroup readings the run-time shedding guard (`pressure`) polls.
//!
//! Every check here reads the host and changes nothing, except that the soft RLIMIT_NOFILE (and,
//! for non-root users, RLIMIT_NPROC) of this process is raised up to the hard limit when the fleet
//! needs it; that limit belongs to the process and ends with it.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConsoleMode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the fleet's guest RAM ({need}) is more than {shown_ratio}the {available} available {place}: \
         run fewer or smaller guests, or pass --overcommit RATIO if they will not all use all of it"
    )]
    Memory {
        need: String,
        shown_ratio: String,
        available: String,
        place: String,
    },
    #[error(
        "the fleet needs {need} open files, but this process may open at most {hard} \
         (RLIMIT_NOFILE hard limit): raise it (ulimit -Hn, LimitNOFILE=) or run fewer guests"
    )]
    Files { need: u64, hard: u64 },
    #[error(
        "the fleet needs {need} threads (one per vCPU plus {own} of kvmerge's own), but {what} \
         allows only {available} more: raise it or run fewer guests or vCPUs"
    )]
    Threads {
        need: u64,
        own: u64,
        what: String,
        available: u64,
    },
    #[error(
        "the fleet needs about {need} memory mappings, but vm.max_map_count allows only \
         {available} more: raise it (sysctl vm.max_map_count) or run fewer guests"
    )]
    Maps { need: u64, available: u64 },
    #[error("--vcpus {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(
        "--console {0} exists and is not a directory: give 'prefix', 'none' or a directory for \
         the vmK.log files"
    )]
    ConsoleNotDir(PathBuf),
    #[error("cannot raise this process's {what} limit: {source}")]
    Rlimit {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Descriptors kvmerge holds whatever the fleet size: stdio, /dev/kvm, signalfd, epoll, eventfds
/// and timers of the control loop, the `--stats` file, the merge thread's /proc and sysfs files,
/// the pressure guard's cgroup files, with room to spare.
pub const FIXED_FDS: u64 = 64;
/// Threads kvmerge runs whatever the fleet size besides the build workers (one per CPU): main,
/// merge thread, pressure guard, with room to spare.
pub const FIXED_THREADS: u64 = 8;

/// Descriptors one VM holds while it runs: the VM fd, one fd per vCPU, the serial and i8042
/// irqfds (eventfds), its console log under `--console DIR`, and one spare.
pub fn fds_per_vm(vcpus: u8, console_file: bool) -> u64 {
    1 + u64::from(vcpus) + 2 + u64::from(console_file) + 1
}

/// Memory mappings one VM adds: its guest RAM (one mapping, possibly split in two by advice),
/// and per vCPU the kvm_run page and the thread's stack with its guard page.
pub fn maps_per_vm(vcpus: u8) -> u64 {
    2 + 3 * u64::from(vcpus)
}

/// Checks that do not need /dev/kvm: the console directory, memory, files, threads, mappings.
pub fn admit(cfg: &Config) -> Result<()> {
    if let ConsoleMode::Dir(dir) = &cfg.console {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::ConsoleNotDir(dir.clone()));
        }
    }
    admit_memory(cfg)?;
    let console_files = matches!(cfg.console, ConsoleMode::Dir(_));
    let fds = FIXED_FDS
        + cfg
            .vms
            .iter()
            .map(|vm| fds_per_vm(vm.vcpus, console_files))
            .sum::<u64>();
    admit_files(fds)?;
    admit_threads(cfg)?;
    admit_maps(cfg)
}

/// The host's KVM vCPU limit (the MP table's is `Config::validate`'s).
pub fn admit_vcpus(cfg: &Config, kvm_max: usize) -> Result<()> {
    match cfg.vms.iter().find(|vm| usize::from(vm.vcpus) > kvm_max) {
        Some(vm) => Err(Error::TooManyVcpus {
            requested: vm.vcpus,
            max: kvm_max,
        }),
        None => Ok(()),
    }
}

/// Memory kvmerge may use now: the host's MemAvailable, or the memory cgroup's room when that is
/// tighter, with where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub place: String,
}

pub fn available_memory() -> Available {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_field(&m, "MemAvailable:"));
    let mut best = Available {
        bytes: host.unwrap_or(u64::MAX),
        place: "on this host (MemAvailable)".into(),
    };
    if let Some(room) = MemoryCgroup::of_self().and_then(|cg| cg.room()) {
        if room.free() < best.bytes {
            best = Available {
                bytes: room.free(),
                place: format!(
                    "in memory cgroup {} (limit {}, {} in use)",
                    room.dir.display(),
                    format_mib(room.limit),
                    format_mib(room.usage)
                ),
            };
        }
    }
    best
}

fn admit_memory(cfg: &Config) -> Result<()> {
    let need: u64 = cfg.vms.iter().map(|vm| vm.memory).sum();
    let available = available_memory();
    check_memory(need, cfg.overcommit, &available)
}

fn check_memory(need: u64, ratio: f64, available: &Available) -> Result<()> {
    if available.bytes == u64::MAX || need as f64 <= available.bytes as f64 * ratio {
        return Ok(());
    }
    Err(Error::Memory {
        need: format_mib(need),
        shown_ratio: if ratio == 1.0 {
            String::new()
        } else {
            format!("{ratio} times ")
        },
        available: format_mib(available.bytes),
        place: available.place.clone(),
    })
}

/// `1536 MiB`, `1.5 GiB`: sizes in messages, rounded to what a person compares.
pub fn format_mib(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib >= 10240.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

fn admit_files(need: u64) -> Result<()> {
    let (soft, hard) = rlimit(libc::RLIMIT_NOFILE);
    if need <= soft {
        return Ok(());
    }
    if need > hard {
        return Err(Error::Files { need, hard });
    }
    // The whole hard limit: descriptors are cheap, and kvmerge never uses select(2).
    set_soft_rlimit(libc::RLIMIT_NOFILE, hard).map_err(|source| Error::Rlimit {
        what: "open files",
        source,
    })?;
    log::info!("raised the open-file limit from {soft} to {hard} for {need} descriptors");
    Ok(())
}

fn admit_threads(cfg: &Config) -> Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let own = FIXED_THREADS + workers;
    let need = own + cfg.vms.iter().map(|vm| u64::from(vm.vcpus)).sum::<u64>();
    let refuse = |what: String, available: u64| Error::Threads {
        need,
        own,
        what,
        available,
    };
    // RLIMIT_NPROC counts every thread of the user and is not enforced for root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let (soft, hard) = rlimit(libc::RLIMIT_NPROC);
        let used = user_threads().unwrap_or(0);
        if used + need > soft {
            if used + need > hard {
                return Err(refuse(
                    "RLIMIT_NPROC (ulimit -u)".into(),
                    hard.saturating_sub(used),
                ));
            }
            set_soft_rlimit(libc::RLIMIT_NPROC, hard).map_err(|source| Error::Rlimit {
                what: "process",
                source,
            })?;
        }
    }
    if let (Some(max), Some(used)) = (
        read_u64("/proc/sys/kernel/threads-max"),
        host_threads_in_use(),
    ) {
        if used + need > max {
            return Err(refuse(
                "kernel.threads-max".into(),
                max.saturating_sub(used),
            ));
        }
    }
    if let Some((dir, room)) = pids_cgroup_room() {
        if need > room {
            return Err(refuse(
                format!("pids.max of cgroup {}", dir.display()),
                room,
            ));
        }
    }
    Ok(())
}

fn admit_maps(cfg: &Config) -> Result<()> {
    let need: u64 = cfg.vms.iter().map(|vm| maps_per_vm(vm.vcpus)).sum();
    let (Some(max), Ok(maps)) = (
        read_u64("/proc/sys/vm/max_map_count"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return Ok(());
    };
    // Thread stacks of the build workers and libraries that map more later: a margin of 1000.
    let available = max.saturating_sub(maps.lines().count() as u64 + 1000);
    if need > available {
        return Err(Error::Maps { need, available });
    }
    Ok(())
}

fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return (u64::MAX, u64::MAX);
    }
    (lim.rlim_cur, lim.rlim_max)
}

fn set_soft_rlimit(resource: libc::__rlimit_resource_t, soft: u64) -> std::io::Result<()> {
    let (_, hard) = rlimit(resource);
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own; it changes only this process's limit.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Threads of the whole host: the denominator of the 4th field of /proc/loadavg.
fn host_threads_in_use() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// Threads this process's user runs, as RLIMIT_NPROC counts them (approximated by this
/// process's own threads when the per-user count cannot be read cheaply).
fn user_threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&status, "Threads:")
}

/// The value after `key` in a `/proc/meminfo`-style text, in bytes when it says kB.
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let mut parts = line[key.len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    Some(match parts.next() {
        Some("kB") => value * 1024,
        _ => value,
    })
}

/// cgroup v1 says "no limit" with a huge page-aligned number.
const V1_UNLIMITED: u64 = 1 << 60;

/// The memory cgroup of this process, with its ancestors, for limit and usage readings. Both
/// cgroup v2 (`memory.max`, `memory.current`, `memory.events`) and the v1 memory controller
/// (`memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.failcnt`) are understood.
#[derive(Clone, Debug)]
pub struct MemoryCgroup {
    v2: bool,
    /// The process's own cgroup directory first, then each parent up to the hierarchy's root.
    levels: Vec<PathBuf>,
}

/// The tightest level of a memory cgroup: the one with the least room under its limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    pub dir: PathBuf,
    pub limit: u64,
    pub usage: u64,
}

impl Room {
    pub fn free(&self) -> u64 {
        self.limit.saturating_sub(self.usage)
    }
}

impl MemoryCgroup {
    /// This process's memory cgroup, if a memory controller is mounted and it is in one.
    pub fn of_self() -> Option<MemoryCgroup> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::find(&cgroups, &mounts, Path::new("/"))
    }

    /// `cgroups` is /proc/self/cgroup, `mounts` /proc/self/mountinfo; `fs_root` prefixes every
    /// path (tests point it at a fixture tree).
    fn find(cgroups: &str, mounts: &str, fs_root: &Path) -> Option<MemoryCgroup> {
        let v2_dir = controller_path(cgroups, None)
            .and_then(|p| mount_dir(mounts, "cgroup2", None, &p, fs_root));
        if let Some((dir, top)) = &v2_dir {
            let levels = levels(dir, top);
            if levels.iter().any(|l| l.join("memory.max").exists()) {
                return Some(MemoryCgroup { v2: true, levels });
            }
        }
        let (dir, top) = controller_path(cgroups, Some("memory"))
            .and_then(|p| mount_dir(mounts, "cgroup", Some("memory"), &p, fs_root))?;
        Some(MemoryCgroup {
            v2: false,
            levels: levels(&dir, &top),
        })
    }

    /// The level with the least room under its limit, or `None` when no level has a limit.
    pub fn room(&self) -> Option<Room> {
        let (limit_file, usage_file) = if self.v2 {
            ("memory.max", "memory.current")
        } else {
            ("memory.limit_in_bytes", "memory.usage_in_bytes")
        };
        self.levels
            .iter()
            .filter_map(|dir| {
                let limit = read_u64(dir.join(limit_file))?; // "max" does not parse: no limit
                if limit >= V1_UNLIMITED {
                    return None;
                }
                let usage = read_u64(dir.join(usage_file))?;
                Some(Room {
                    dir: dir.clone(),
                    limit,
                    usage,
                })
            })
            .min_by_key(Room::free)
    }

    /// How often any level has hit its limit so far (v2 `memory.events` max, v1 `memory.failcnt`):
    /// a rise means allocations are already being refused and reclaimed.
    pub fn limit_hits(&self) -> u64 {
        self.levels
            .iter()
            .filter_map(|dir| {
                if self.v2 {
                    let events = std::fs::read_to_string(dir.join("memory.events")).ok()?;
                    meminfo_field(&events, "max ")
                } else {
                    read_u64(dir.join("memory.failcnt"))
                }
            })
            .sum()
    }
}

/// The cgroup path of `controller` (`None`: the v2 unified line `0::/path`).
fn controller_path(cgroups: &str, controller: Option<&str>) -> Option<String> {
    cgroups.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, list, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match controller {
            None => id == "0" && list.is_empty(),
            Some(c) => list.split(',').any(|x| x == c),
        };
        hit.then(|| path.to_string())
    })
}

/// Where the cgroup `path` of a `fstype` hierarchy (with `option` among its super options, for
/// v1) is mounted: (the cgroup's directory, the hierarchy's mount point).
fn mount_dir(
    mounts: &str,
    fstype: &str,
    option: Option<&str>,
    path: &str,
    fs_root: &Path,
) -> Option<(PathBuf, PathBuf)> {
    mounts.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if post.first() != Some(&fstype) || pre.len() < 5 {
            return None;
        }
        if let Some(opt) = option {
            if !post.get(2)?.split(',').any(|o| o == opt) {
                return None;
            }
        }
        let (root, mountpoint) = (pre[3], pre[4]);
        let rel = path.strip_prefix(root).unwrap_or(path);
        let top = fs_root.join(mountpoint.trim_start_matches('/'));
        Some((top.join(rel.trim_start_matches('/')), top))
    })
}

fn levels(dir: &Path, top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        out.push(d.to_path_buf());
        if d == top {
            break;
        }
        at = d.parent().filter(|p| p.starts_with(top));
    }
    out
}

/// Room under the tightest `pids.max` of this process's cgroup and its ancestors (v2, or v1
/// pids controller).
fn pids_cgroup_room() -> Option<(PathBuf, u64)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = Path::new("/");
    let found = controller_path(&cgroups, Some("pids"))
        .and_then(|p| mount_dir(&mounts, "cgroup", Some("pids"), &p, root))
        .or_else(|| {
            controller_path(&cgroups, None)
                .and_then(|p| mount_dir(&mounts, "cgroup2", None, &p, root))
        })?;
    levels(&found.0, &found.1)
        .into_iter()
        .filter_map(|dir| {
            let max = read_u64(dir.join("pids.max"))?;
            let current = read_u64(dir.join("pids.current"))?;
            Some((dir, max.saturating_sub(current)))
        })
        .min_by_key(|(_, room)| *room)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,relatime shared:11 - cgroup cgroup rw,pids
35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v1_and_v2_memory_cgroups_and_the_tightest_level() {
        let root = std::env::temp_dir().join(format!("kvmerge-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let own = root.join("sys/fs/cgroup/memory/a/b");
        std::fs::create_dir_all(&own).unwrap();
        let parent = root.join("sys/fs/cgroup/memory/a");
        std::fs::write(own.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(own.join("memory.usage_in_bytes"), "100\n").unwrap();
        std::fs::write(parent.join("memory.limit_in_bytes"), "1000\n").unwrap();
        std::fs::write(parent.join("memory.usage_in_bytes"), "400\n").unwrap();
        std::fs::write(own.join("memory.failcnt"), "3\n").unwrap();
        std::fs::write(parent.join("memory.failcnt"), "2\n").unwrap();
        let cgroups = "4:memory:/a/b\n0::/\n";
        let cg = MemoryCgroup::find(cgroups, MOUNTS, &root).unwrap();
        assert!(!cg.v2);
        assert_eq!(
            cg.room(),
            Some(Room {
                dir: parent.clone(),
                limit: 1000,
                usage: 400
            })
        );
        assert_eq!(cg.limit_hits(), 5);

        // A v2 cgroup with memory.max wins over v1.
        let v2 = root.join("sys/fs/cgroup/unified/x");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        std::fs::write(v2.join("memory.current"), "5\n").unwrap();
        std::fs::write(v2.join("memory.events"), "low 0\nhigh 0\nmax 7\noom 1\n").unwrap();
        let cg = MemoryCgroup::find("4:memory:/a/b\n0::/x\n", MOUNTS, &root).unwrap();
        assert!(cg.v2);
        assert_eq!(cg.room(), None, "max means no limit");
        assert_eq!(cg.limit_hits(), 7);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn memory_admission_with_ratio() {
        let avail = Available {
            bytes: 1 << 30,
            place: "here".into(),
        };
        assert!(check_memory(1 << 30, 1.0, &avail).is_ok());
        let err = check_memory(3 << 29, 1.0, &avail).unwrap_err().to_string();
        assert!(
            err.contains("1536 MiB") && err.contains("1024 MiB available here"),
            "{err}"
        );
        assert!(check_memory(3 << 29, 2.0, &avail).is_ok());
        let err = check_memory(3 << 30, 2.0, &avail).unwrap_err().to_string();
        assert!(err.contains("2 times the 1024 MiB"), "{err}");
    }

    #[test]
    fn per_vm_counts() {
        assert_eq!(fds_per_vm(1, false), 5);
        assert_eq!(fds_per_vm(2, true), 7);
        assert_eq!(maps_per_vm(1), 5);
        assert_eq!(
            meminfo_field("MemTotal: 10 kB\nMemAvailable:  2 kB\n", "MemAvailable:"),
            Some(2048)
        );
    }
}
