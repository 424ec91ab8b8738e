//! Host-KVM tier: seccomp filters with payload guests. A thread made to call socket(2), outside
//! every allowlist (`KVMERGE_INJECT_SYSCALL`), must be stopped and reported in one line; the run
//! then stops every guest, puts the host's KSM knobs back and exits 159. The rest of the suite
//! runs under the default `--seccomp kill`, which is what tests the allowlists themselves.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(120);
const KSM_DIR: &str = "/sys/kernel/mm/ksm";
/// The knobs kvmerge steers, `run` last so that restoring them never scans with half-set knobs.
const KNOBS: &[&str] = &[
    "advisor_mode",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "run",
];
const BLOCKED: &str = "blocked system call";

/// Host KSM is one global pool: one test of this file at a time.
static KSM: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    KSM.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether kvmerge steers the host's KSM here (root, KSM present); says why not otherwise.
fn ksm_steerable() -> bool {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    if root && Path::new(KSM_DIR).exists() {
        return true;
    }
    eprintln!("note: KSM knobs not checked (needs root and a kernel with KSM)");
    false
}

fn knobs() -> Vec<(&'static str, String)> {
    KNOBS
        .iter()
        .filter_map(|&k| {
            let v = std::fs::read_to_string(Path::new(KSM_DIR).join(k)).ok()?;
            // advisor_mode reads as "[none] scan-time".
            let v = match (v.find('['), v.find(']')) {
                (Some(a), Some(b)) if a < b => v[a + 1..b].to_string(),
                _ => v.trim().to_string(),
            };
            Some((k, v))
        })
        .collect()
}

/// Puts knobs back as they were when it was made (on drop, so also when a test fails).
struct KnobGuard(Vec<(&'static str, String)>);

impl Drop for KnobGuard {
    fn drop(&mut self) {
        for (knob, value) in &self.0 {
            let now = knobs();
            if now.iter().any(|(k, v)| k == knob && v != value) {
                let _ = std::fs::write(Path::new(KSM_DIR).join(knob), value);
            }
        }
    }
}

/// Whether some `--stats` line shows kvmerge steering KSM (it owns the knobs and set a scan
/// rate). Another kvmerge on this host may own them instead.
fn ksm_was_steered(stats: &Path) -> bool {
    let text = std::fs::read_to_string(stats).unwrap_or_default();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty(), "--stats written");
    lines
        .iter()
        .any(|v| v["ksm_owned"] == true && v["pages_to_scan"].is_u64())
}

fn blocked_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(BLOCKED)).collect()
}

/// Two idle payload guests with `KVMERGE_INJECT_SYSCALL=inject`, `--stats` in `dir`, run to the
/// end. The guests idle until stopped, so the run ends only by the violation (or the timeout).
fn injected_run(inject: &str, extra: &[&str], dir: &Path) -> Outcome {
    let mut cmd = kvmerge();
    cmd.arg("run")
        .arg("--kernel")
        .arg(payload())
        .args(["--count", "2", "--memory", "32M", "--console", "none"])
        .args(["--cmdline", "fill=8 then=idle", "--timeout", "100s"])
        .args(extra)
        .arg("--stats")
        .arg(dir.join("stats.jsonl"))
        .env("KVMERGE_INJECT_SYSCALL", inject);
    run_with_limit(cmd, LIMIT)
}

/// The run ended because of the violation: exit 159, one clear line naming the thread and the
/// call, well before `--timeout`.
fn assert_stopped_by_seccomp(out: &Outcome, thread: &str, then: &str) {
    assert_eq!(out.code(), Some(159), "{}", out.dump());
    let lines = blocked_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one line\n{}", out.dump());
    let tail = format!("blocked system call 41 (socket) by the seccomp filter; {then}");
    let expected = format!("^kvmerge: {thread}: {}$", regex::escape(&tail));
    let re = regex::Regex::new(&expected).unwrap();
    assert!(re.is_match(lines[0]), "{:?} !~ {expected}", lines[0]);
    assert!(!out.stderr.contains("--timeout expired"), "{}", out.dump());
}

#[test]
fn a_forbidden_call_in_a_vcpu_thread_stops_the_run_and_restores_ksm() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let steer = ksm_steerable();
    let before = knobs();
    let _guard = KnobGuard(before.clone());
    let dir = TempDir::new("seccomp-vcpu");
    let out = injected_run("vcpu", &[], dir.path());
    assert_stopped_by_seccomp(&out, r"vm[01]-vcpu0", "stopping");
    // Every guest was stopped for it, not only the offending one.
    for vm in ["vm0", "vm1"] {
        assert!(
            out.stderr
                .contains(&format!("{vm}: stopped by a VMM error: a kvmerge thread")),
            "{}",
            out.dump()
        );
    }
    if steer {
        if !ksm_was_steered(&dir.path().join("stats.jsonl")) {
            eprintln!("note: another kvmerge owned the host's KSM knobs; restore not exercised");
        }
        assert_eq!(knobs(), before, "KSM knobs restored\n{}", out.dump());
    }
}

#[test]
fn a_forbidden_call_in_the_merge_thread_stops_the_run_and_restores_ksm() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let steer = ksm_steerable();
    let before = knobs();
    let _guard = KnobGuard(before.clone());
    let dir = TempDir::new("seccomp-merge");
    let out = injected_run("merge", &[], dir.path());
    assert_stopped_by_seccomp(&out, "kvmerge-merge", "stopping");
    if steer {
        if !ksm_was_steered(&dir.path().join("stats.jsonl")) {
            eprintln!("note: another kvmerge owned the host's KSM knobs; restore not exercised");
        }
        // The parked merge thread still holds the KSM owner: the control thread restores anyway.
        assert_eq!(knobs(), before, "KSM knobs restored\n{}", out.dump());
    }
}

/// The control thread cannot park (it is the one that restores host state): the process exits
/// at once with the same status. What only the control thread restores (KSM knobs) is repaired
/// by the next kvmerge start; this test puts the knobs back itself.
#[test]
fn a_forbidden_call_in_the_control_thread_ends_the_process_at_once() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let _guard = KnobGuard(knobs());
    let dir = TempDir::new("seccomp-control");
    let out = injected_run("control", &[], dir.path());
    assert_stopped_by_seccomp(&out, "control thread", "exiting now");
}

/// `--seccomp off` and `log` let the same call through: the run goes on until stopped.
#[test]
fn off_and_log_let_the_call_through() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let _guard = KnobGuard(knobs());
    for mode in ["off", "log"] {
        let mut child = kvmerge();
        child
            .arg("run")
            .arg("--kernel")
            .arg(payload())
            .args(["--seccomp", mode, "--console", "none", "--memory", "32M"])
            .args(["--cmdline", "fill=8 then=idle", "--timeout", "100s"])
            .env("KVMERGE_INJECT_SYSCALL", "vcpu")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut running = Running(child.spawn().unwrap());
        let stderr = running.0.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
            }
        });
        let deadline = Instant::now() + LIMIT;
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|l: &String| l.contains("socket(2) from the vcpu thread was allowed"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("--seccomp {mode}: the injected call never ran: {seen:#?}"),
            }
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
        let status = running.0.wait().unwrap();
        reader.join().unwrap();
        seen.extend(rx.try_iter());
        assert_eq!(status.code(), Some(143), "--seccomp {mode}: {seen:#?}");
        assert!(
            !seen.iter().any(|l| l.contains(BLOCKED)),
            "--seccomp {mode}: {seen:#?}"
        );
    }
}

/// The stderr writer starts with the first line kvmerge prints. A line printed during the
/// pre-flight checks (here: the raised open-file limit), before the filters are compiled, starts
/// it unfiltered; it must get its I/O filter once they are, like every other thread.
#[test]
fn a_writer_started_before_the_filters_gets_one_later() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -Sn 64 && exec '{}' -v run --kernel '{}' --count 40 --memory 4M \
             --cmdline then=idle --console none --ksm-policy kernel --duration 100s",
            env!("CARGO_BIN_EXE_kvmerge"),
            payload().display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Running(cmd.spawn().expect("cannot start kvmerge"));
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("built 40 VM(s)")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("kvmerge did not build its fleet:\n{}", seen.join("\n")),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("raised the open-file limit")),
        "no line before the filters, so this test shows nothing:\n{}",
        seen.join("\n")
    );
    // The writer installs its filter when it next wakes: it wrote the 'built' line since.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let writer = tasks
        .filter_map(|t| t.ok())
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "kvmerge-stderr")
        })
        .expect("a kvmerge-stderr thread");
    let status = std::fs::read_to_string(writer.path().join("status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "the stderr writer runs without a filter:\n{status}"
    );
}
