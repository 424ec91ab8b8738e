//! Host KSM state across processes: a killed owner's settings come back (by hand and on the next
//! start), and two kvmerge processes hand the pool over without undoing each other. Root, KSM and
//! KVM needed; each test uses its own run directory (KVMERGE_RUN_DIR) against the real
//! /sys/kernel/mm/ksm, and puts every knob back when it ends, also when it fails.

mod common;
#[path = "ksm_common/mod.rs"]
mod ksm_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use ksm_common::*;

fn knob(name: &str) -> String {
    std::fs::read_to_string(Path::new(KSM_DIR).join(name))
        .unwrap()
        .trim()
        .to_string()
}

/// The knobs as a test found them, and its run directory; on drop (also after a failure) a stale
/// journal is restored with `kvmerge ksm --restore` and any knob still changed is written back.
struct HostKnobs {
    before: Vec<(String, String)>,
    run_dir: PathBuf,
}

impl HostKnobs {
    fn save(run_dir: &Path) -> HostKnobs {
        HostKnobs {
            before: knobs(),
            run_dir: run_dir.to_owned(),
        }
    }

    fn journal(&self) -> PathBuf {
        self.run_dir.join("ksm.json")
    }

    /// The originals the journal holds, for the knobs [`knobs`] reads and in its order. On a
    /// shared host they may differ from `before` (another process may have changed the knobs
    /// before this test started): the journal's are what kvmerge must put back.
    fn originals(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.journal()).unwrap();
        let journal: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pairs = journal["originals"].as_array().unwrap();
        knobs()
            .into_iter()
            .map(|(name, now)| {
                let original = pairs
                    .iter()
                    .find(|p| p[0] == name.as_str())
                    .and_then(|p| p[1].as_str())
                    .map_or(now, str::to_owned);
                (name, original)
            })
            .collect()
    }
}

/// Waits until the journal names `pid` and returns its originals; then waits until kvmerge has
/// started ksmd when it was stopped (`run` is the one knob it always changes then).
fn steered_by(host: &HostKnobs, pid: u32) -> Vec<(String, String)> {
    wait_until("the journal of the owner", || {
        std::fs::read_to_string(host.journal())
            .is_ok_and(|j| j.contains(&format!("\"pid\":{pid},")))
    });
    let originals = host.originals();
    if originals.iter().any(|(k, v)| k == "run" && v == "0") {
        wait_until("the owner to start ksmd", || knob("run") == "1");
    }
    originals
}

impl Drop for HostKnobs {
    fn drop(&mut self) {
        let _ = kvmerge()
            .args(["ksm", "--restore"])
            .env("KVMERGE_RUN_DIR", &self.run_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // `run` last, as kvmerge does.
        let mut before = self.before.clone();
        before.sort_by_key(|(name, _)| name == "run");
        for (name, value) in before {
            if knob(&name) != value {
                let _ = std::fs::write(Path::new(KSM_DIR).join(&name), &value);
            }
        }
    }
}

/// `kvmerge [-v] run` of two payload guests with full dedup that idle until stopped, with its
/// journal in `run_dir` and `--stats DIR/NAME.jsonl`.
fn spawn(dir: &Path, run_dir: &Path, name: &str, verbose: bool) -> (Running, PathBuf) {
    let stats = dir.join(format!("{name}.jsonl"));
    let mut cmd = kvmerge();
    if verbose {
        cmd.arg("-v");
    }
    cmd.args([
        "run",
        "--count",
        "2",
        "--memory",
        "16M",
        "--console",
        "none",
    ])
    .args(["--cmdline", "fill=4 then=idle", "--stats"])
    .arg(&stats)
    .arg("--kernel")
    .arg(payload())
    .env("KVMERGE_RUN_DIR", run_dir)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    (Running(cmd.spawn().unwrap()), stats)
}

/// Polls `done` against a deadline.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn owns_ksm(stats: &Path) -> bool {
    last_stats(stats).is_some_and(|s| s["ksm_owned"] == true)
}

fn ksm_cmd(run_dir: &Path, args: &[&str]) -> Outcome {
    let mut cmd = kvmerge();
    cmd.arg("ksm").args(args).env("KVMERGE_RUN_DIR", run_dir);
    run_with_limit(cmd, LIMIT)
}

/// Starts an owner, waits until it has changed the knobs, SIGKILLs it: the knobs stay changed and
/// the journal stays. Returns the killed pid and the journaled originals.
fn killed_owner(dir: &Path, host: &HostKnobs) -> (u32, Vec<(String, String)>) {
    let (child, stats) = spawn(dir, &host.run_dir, "killed", false);
    let pid = child.0.id();
    wait_until("kvmerge to steer KSM", || owns_ksm(&stats));
    let originals = steered_by(host, pid);
    // While it runs, nothing is stale and --restore refuses.
    let out = ksm_cmd(&host.run_dir, &["--restore"]);
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains(&format!("kvmerge pid {pid}")),
        "{}",
        out.dump()
    );

    let (code, _) = stop(child, libc::SIGKILL);
    assert_eq!(code, None, "killed by a signal");
    if originals.iter().any(|(k, v)| k == "run" && v == "0") {
        assert_eq!(knob("run"), "1", "SIGKILL leaves the knobs changed");
    }
    assert!(host.journal().exists(), "and the journal in place");
    (pid, originals)
}

#[test]
fn a_killed_owner_is_repaired_by_hand_and_by_the_next_run() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    let dir = TempDir::new("killed");
    let host = HostKnobs::save(&dir.path().join("run"));

    // By hand.
    let (pid, originals) = killed_owner(dir.path(), &host);
    let out = ksm_cmd(&host.run_dir, &["--restore"]);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let said = format!("restored host KSM settings left by kvmerge pid {pid} (killed?): run=");
    assert_eq!(out.stdout.matches(&said).count(), 1, "{}", out.dump());
    assert_eq!(knobs(), originals, "knobs back to the originals");
    assert!(!host.journal().exists());
    let again = ksm_cmd(&host.run_dir, &["--restore"]);
    assert_eq!(again.code(), Some(0), "{}", again.dump());
    assert!(
        again.stdout.contains("nothing to restore"),
        "{}",
        again.dump()
    );

    // By `kvmerge ksm`, which repairs first (as root) and says so in one line.
    let (pid, originals) = killed_owner(dir.path(), &host);
    let report = ksm_cmd(&host.run_dir, &[]);
    assert_eq!(report.code(), Some(0), "{}", report.dump());
    let said = format!("restored host KSM settings left by kvmerge pid {pid} (killed?): run=");
    assert_eq!(report.stderr.matches(&said).count(), 1, "{}", report.dump());
    assert!(report.stdout.contains("Journal: none"), "{}", report.dump());
    assert_eq!(knobs(), originals, "knobs back to the originals");

    // By the next run, before it does anything else (zero-page dedup only: it touches no knob).
    let (pid, originals) = killed_owner(dir.path(), &host);
    let mut cmd = kvmerge();
    cmd.args([
        "run",
        "--dedup",
        "zero",
        "--memory",
        "16M",
        "--console",
        "none",
    ])
    .args(["--cmdline", "then=exit:0", "--kernel"])
    .arg(payload())
    .env("KVMERGE_RUN_DIR", &host.run_dir);
    let out = run_with_limit(cmd, LIMIT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("restored host KSM settings"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", out.dump());
    assert!(
        lines[0].contains(&format!("left by kvmerge pid {pid} (killed?): run=")),
        "{}",
        out.dump()
    );
    assert_eq!(knobs(), originals, "knobs back to the originals");
    assert!(!host.journal().exists());
}

#[test]
fn two_processes_hand_the_pool_over_and_the_last_restores() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    hand_over(libc::SIGTERM, Some(143));
}

/// A SIGKILLed owner releases its flocks with its life: the waiter takes over all the same.
#[test]
fn a_waiter_takes_over_from_a_killed_owner() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    hand_over(libc::SIGKILL, None);
}

/// A owns, B waits; A ends by `signal`: the knobs stay as they are, B takes over with A's
/// originals; B ends: the originals are back.
fn hand_over(signal: i32, a_code: Option<i32>) {
    let dir = TempDir::new("handover");
    let host = HostKnobs::save(&dir.path().join("run"));

    let (a, a_stats) = spawn(dir.path(), &host.run_dir, "a", false);
    let a_pid = a.0.id();
    wait_until("A to steer KSM", || owns_ksm(&a_stats));
    let originals = steered_by(&host, a_pid);
    let ksmd_was_off = originals.iter().any(|(k, v)| k == "run" && v == "0");
    let (b, b_stats) = spawn(dir.path(), &host.run_dir, "b", true);
    let b_pid = b.0.id();
    wait_until("B to run a while", || {
        last_stats(&b_stats).is_some_and(|s| s["t"].as_f64().unwrap_or(0.0) >= 1.0)
    });
    assert!(!owns_ksm(&b_stats), "B waits while A steers");

    let (code, a_err) = stop(a, signal);
    assert_eq!(code, a_code, "{a_err}");
    if ksmd_was_off {
        assert_eq!(knob("run"), "1", "A handed over instead of restoring");
    }
    wait_until("B to take over", || owns_ksm(&b_stats));
    assert_eq!(steered_by(&host, b_pid), originals, "B kept A's originals");

    let (code, b_err) = stop(b, libc::SIGTERM);
    assert_eq!(code, Some(143), "{b_err}");
    let waiting: Vec<&str> = b_err
        .lines()
        .filter(|l| l.contains("steers host KSM"))
        .collect();
    assert_eq!(waiting.len(), 1, "B said once that it waits:\n{b_err}");
    assert!(
        waiting[0].contains(&format!("kvmerge pid {a_pid}"))
            && waiting[0].contains("takes over when it exits"),
        "{b_err}"
    );
    assert!(
        b_err.contains(&format!(
            "took over steering host KSM from kvmerge pid {a_pid}"
        )),
        "{b_err}"
    );
    assert_eq!(knobs(), originals, "the last one out restored");
    assert!(!host.journal().exists());
}

/// `kvmerge ksm` shows the journal; without one it says so.
#[test]
fn ksm_report_shows_the_journal() {
    let dir = TempDir::new("report");
    let out = ksm_cmd(&dir.path().join("run"), &[]);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("Journal: none"), "{}", out.dump());
}
