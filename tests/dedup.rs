//! Host-KVM tier: deduplication with payload guests. KSM tests need root (kvmerge steers the
//! host's KSM and must restore every knob it touched); they print why and skip otherwise, unless
//! KVMERGE_REQUIRE_KVM=1.

mod common;
#[path = "ksm_common/mod.rs"]
mod ksm_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ksm_common::*;

fn vm_field(stats: &serde_json::Value, vm: usize, field: &str) -> f64 {
    stats["vms"][vm][field].as_f64().unwrap_or(-1.0)
}

/// Starts `kvmerge run --kernel payload ARGS --stats DIR/stats.jsonl` in the background.
fn spawn(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> (Running, PathBuf) {
    let stats = dir.join("stats.jsonl");
    let mut cmd = kvmerge();
    cmd.arg("run")
        .arg("--kernel")
        .arg(payload())
        .args(args)
        .arg("--stats")
        .arg(&stats)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    (Running(cmd.spawn().unwrap()), stats)
}

/// Polls the stats file until `done` holds for its last line, against a deadline.
fn wait_for(
    stats: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(s) = last_stats(stats) {
            if done(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last stats: {:?}",
            last_stats(stats)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs eight identical guests filling `fill_mib` with `patterns` distinct pages until every guest
/// reports at least `expect_mib` merged and shared with other VMs; stops them with SIGTERM and
/// checks the knobs and the final line. Returns that final line.
fn eight_identical_guests_merge(
    fill_mib: u64,
    patterns: u64,
    expect_mib: f64,
) -> serde_json::Value {
    let before = knobs();
    let dir = TempDir::new("merge");
    let cmdline = format!("fill={fill_mib} patterns={patterns} then=idle");
    let (child, stats) = spawn(
        &[
            "--count",
            "8",
            "--memory",
            "32M",
            "--console",
            "none",
            "--cmdline",
            &cmdline,
        ],
        dir.path(),
        &[],
    );
    // Another kvmerge on the host may steer KSM at first: this one takes over when it leaves.
    let s = wait_for(&stats, "every guest's pages merged", |s| {
        s["ksm_owned"] == true
            && (0..8).all(|vm| {
                vm_field(s, vm, "ksm_mib") >= expect_mib
                    && vm_field(s, vm, "shared_with_other_vms_mib") >= expect_mib
            })
    });
    assert_eq!(s["ksm_owned"], true, "{s}");
    let (code, stderr) = stop(child, libc::SIGTERM);
    assert_eq!(code, Some(143), "{stderr}");
    assert_eq!(knobs(), before, "KSM knobs restored after SIGTERM");
    let last = last_stats(&stats).unwrap();
    assert_eq!(last["final"], true, "a final line is written at the end");
    last
}

#[test]
fn identical_guests_merge_and_share_across_vms() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    // Sixteen page patterns. KSM gives one KSM page at most max_page_sharing mappings (then it
    // starts another), so the fill gives each pattern at most that many copies over the fleet:
    // every KSM page then backs all eight guests.
    let max_sharing: u64 = std::fs::read_to_string(Path::new(KSM_DIR).join("max_page_sharing"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(256);
    let copies_per_guest = max_sharing / 8;
    let fill_mib = (16 * copies_per_guest * 4096 / (1 << 20)).max(1);
    let last = eight_identical_guests_merge(fill_mib, 16, 0.9 * fill_mib as f64);
    // 16 distinct pages across 8 x fill: all but 16 pages of the fill is saved.
    let expect = 8.0 * fill_mib as f64 - 0.1;
    assert!(
        last["saved_mib"].as_f64().unwrap() >= expect,
        "saved >= {expect}: {last}"
    );
}

#[test]
fn many_distinct_pages_merge_across_vms() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    // 4096 patterns fill 16 MiB once per guest: 4096 KSM pages, each backing all eight guests.
    let last = eight_identical_guests_merge(16, 4096, 15.0);
    // 8 x 16 MiB stored once: 112 MiB saved.
    assert!(last["saved_mib"].as_f64().unwrap() > 100.0, "{last}");
}

/// Flags of guest RAM mappings in the kvmerge process: the large MADV_DONTDUMP mappings (vCPU
/// `kvm_run` pages are DONTDUMP too, but a page or two in size).
fn guest_ram_flags(pid: u32) -> Vec<Vec<String>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut found = Vec::new();
    let mut size = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                size = hi - lo;
            }
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let flags: Vec<String> = flags.split_whitespace().map(str::to_string).collect();
            if size >= 1 << 20 && flags.iter().any(|x| x == "dd") {
                found.push(flags);
            }
        }
    }
    found
}

#[test]
fn dedup_off_never_marks_mergeable_and_zero_shares_nothing() {
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    for mode in ["off", "zero", "full"] {
        let dir = TempDir::new("modes");
        let (child, stats) = spawn(
            &[
                "--count",
                "2",
                "--memory",
                "32M",
                "--console",
                "none",
                "--dedup",
                mode,
                "--cmdline",
                "fill=8 patterns=4 zeros=8 then=idle",
            ],
            dir.path(),
            &[],
        );
        // Accountings after the guests filled; with reclaim, until it has given the zeros back
        // (however long a loaded host makes that take).
        let s = wait_for(&stats, "accounting of filled guests", |s| {
            s["t"].as_f64().unwrap_or(0.0) >= 3.0
                && (0..2).all(|vm| {
                    vm_field(s, vm, "resident_mib") >= 8.0
                        && (mode == "off" || vm_field(s, vm, "zero_reclaimed_mib") >= 7.9)
                })
        });
        // The kernel may merge the two adjacent guest mappings into one VMA.
        let flags = guest_ram_flags(child.0.id());
        assert!(!flags.is_empty(), "{mode}: guest RAM mappings found");
        let mergeable = flags.iter().filter(|f| f.iter().any(|x| x == "mg")).count();
        let (code, stderr) = stop(child, libc::SIGINT);
        assert_eq!(code, Some(130), "{mode}: {stderr}");
        match mode {
            "off" => {
                assert_eq!(mergeable, 0, "--dedup off: no mg flag");
                for vm in 0..2 {
                    assert_eq!(vm_field(&s, vm, "zero_reclaimed_mib"), 0.0, "off: {s}");
                    assert_eq!(vm_field(&s, vm, "ksm_mib"), 0.0, "off: {s}");
                }
            }
            "zero" => {
                assert_eq!(mergeable, 0, "--dedup zero: not offered to KSM");
                for vm in 0..2 {
                    assert!(
                        vm_field(&s, vm, "zero_reclaimed_mib") >= 7.9,
                        "zero pages reclaimed: {s}"
                    );
                    assert_eq!(vm_field(&s, vm, "ksm_mib"), 0.0, "no content shared: {s}");
                    assert_eq!(vm_field(&s, vm, "shared_with_other_vms_mib"), 0.0, "{s}");
                }
            }
            _ => assert_eq!(
                mergeable,
                flags.len(),
                "--dedup full: all guest RAM mergeable"
            ),
        }
    }
}

/// Complete `PAYLOAD-CHURN` lines of a console log: (round, pages, mismatches). The line a stop
/// cut short (the console ends it at exit) is left out.
fn churn_rounds(log: &Path) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("PAYLOAD-CHURN "))
        .filter_map(|l| {
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))?
                    .parse()
                    .ok()
            };
            Some((field("round=")?, field("pages=")?, field("mismatches=")?))
        })
        .collect()
}

/// The guests churn (rewrite pages with zeros, shared and unique content, verify every page each
/// round) until merging and reclaim have been seen and every guest has verified two more whole
/// rounds after that, however fast or slow the machine is; then they are stopped. Every stats
/// line on the way has saved <= guest RAM, for the fleet and for each VM.
#[test]
fn no_guest_write_is_lost_under_merging_and_reclaim() {
    const VMS: usize = 8;
    const VM_MIB: f64 = 80.0;
    let _ksm = serial();
    if !kvm_available() {
        return;
    }
    let before = knobs();
    // SAFETY: getuid has no preconditions.
    let ksm = Path::new(KSM_DIR).exists() && unsafe { libc::getuid() } == 0;
    let dir = TempDir::new("churn");
    let logs = dir.path().join("logs");
    let stats = dir.path().join("stats.jsonl");
    let mut cmd = kvmerge();
    cmd.args(["run", "--count", "8", "--memory", "80M", "--console"])
        .arg(&logs)
        .arg("--stats")
        .arg(&stats)
        .arg("--kernel")
        .arg(payload())
        // As many rounds as the payload allows (hours): the test stops the guests.
        .args([
            "--cmdline",
            "fill=56 patterns=16 zeros=4 then=churn:16383 seed={index}",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = Running(cmd.spawn().unwrap());
    let log = |i: usize| logs.join(format!("vm{i}.log"));
    let all_stats = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&stats)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen_at: Option<Vec<usize>> = None;
    loop {
        let lines = all_stats();
        let peak = |field: &str| {
            lines
                .iter()
                .filter_map(|v| v[field].as_f64())
                .fold(0.0, f64::max)
        };
        let rounds: Vec<usize> = (0..VMS).map(|i| churn_rounds(&log(i)).len()).collect();
        // Merging (when kvmerge may steer KSM) and reclaim observed while the guests churn.
        if seen_at.is_none()
            && peak("zero_reclaimed_mib") > 0.0
            && (!ksm || peak("ksm_mib") > 0.0)
            && rounds.iter().all(|&r| r > 0)
        {
            seen_at = Some(rounds.clone());
        }
        let verified: u64 = (0..VMS)
            .flat_map(|i| churn_rounds(&log(i)))
            .map(|(_, pages, _)| pages)
            .sum();
        if let Some(at) = &seen_at {
            if rounds.iter().zip(at).all(|(now, then)| *now >= then + 2) && verified >= 1_000_000 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no merging and reclaim during the churn within 300 s (rounds {rounds:?}, \
             verified {verified}, seen at {seen_at:?}); last stats: {:?}",
            lines.last()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, stderr) = stop(child, libc::SIGTERM);
    assert_eq!(code, Some(143), "{stderr}");
    for i in 0..VMS {
        let text = std::fs::read_to_string(log(i)).unwrap();
        assert!(!text.contains("PAYLOAD-MISMATCH"), "vm{i}:\n{text}");
        for (round, pages, mismatches) in churn_rounds(&log(i)) {
            assert_eq!(mismatches, 0, "vm{i} round {round} ({pages} pages)");
        }
    }
    // Saved is what is saved now: never more than the guest RAM, for the fleet and each VM,
    // although zero pages were reclaimed again and again.
    let lines = all_stats();
    let accounted = lines.iter().filter(|s| s["accounting"] != "").count();
    assert!(accounted > 2, "accounted stats lines: {accounted}");
    let reclaimed = lines.last().unwrap()["zero_reclaimed_mib"]
        .as_f64()
        .unwrap();
    for s in &lines {
        let guest = s["guest_ram_mib"].as_f64().unwrap();
        let saved = s["saved_mib"].as_f64().unwrap();
        assert!(
            saved <= guest + 0.01,
            "saved {saved} > guest RAM {guest}: {s}"
        );
        let vms = s["vms"].as_array().map_or(0, Vec::len);
        assert!(vms == 0 || vms == VMS, "{s}");
        for vm in 0..vms {
            let saved = vm_field(s, vm, "saved_mib");
            let unbacked = vm_field(s, vm, "zero_unbacked_mib");
            assert!((0.0..=VM_MIB + 0.01).contains(&saved), "vm{vm}: {s}");
            assert!((0.0..=saved + 0.01).contains(&unbacked), "vm{vm}: {s}");
        }
    }
    assert!(
        reclaimed > 0.0,
        "zero pages were reclaimed (cumulative {reclaimed} MiB)"
    );
    if ksm {
        assert_eq!(knobs(), before, "knobs restored");
    }
}

#[test]
fn knobs_restored_after_exit_signals_and_panic() {
    let _ksm = serial();
    if !kvm_available() || !ksm_writable() {
        return;
    }
    let before = knobs();
    let args = [
        "--count",
        "2",
        "--memory",
        "16M",
        "--console",
        "none",
        "--cmdline",
        "fill=4 then=idle",
    ];
    let ksm_steered =
        |s: &serde_json::Value| s["ksm_owned"] == true && s["t"].as_f64().unwrap_or(0.0) >= 1.0;

    // Normal end (timeout) and signals.
    for (how, signal, code) in [
        ("timeout", 0, 124),
        ("SIGINT", libc::SIGINT, 130),
        ("SIGTERM", libc::SIGTERM, 143),
    ] {
        let dir = TempDir::new("restore");
        let mut a = args.to_vec();
        a.extend_from_slice(&["--timeout", "4s"]);
        let (child, stats) = spawn(&a, dir.path(), &[]);
        wait_for(&stats, "kvmerge to steer KSM", ksm_steered);
        assert_ne!(
            knobs(),
            before,
            "{how}: kvmerge changed the knobs while running"
        );
        let (got, stderr) = if signal == 0 {
            let mut child = child;
            let status = child.0.wait().unwrap();
            (status.code(), String::new())
        } else {
            stop(child, signal)
        };
        assert_eq!(got, Some(code), "{how}: {stderr}");
        assert_eq!(knobs(), before, "{how}: knobs restored");
    }

    // A panic in the merge thread: the panic hook restores at once, the guests run on.
    let dir = TempDir::new("restore-panic");
    let (child, stats) = spawn(
        &args,
        dir.path(),
        &[("KVMERGE_INJECT_PANIC", "merge-thread")],
    );
    wait_for(&stats, "kvmerge to steer KSM", ksm_steered);
    let deadline = Instant::now() + LIMIT;
    while knobs() != before {
        assert!(
            Instant::now() < deadline,
            "knobs not restored after the injected panic"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, stderr) = stop(child, libc::SIGTERM);
    assert!(stderr.contains("injected panic"), "{stderr}");
    assert_eq!(code, Some(143), "{stderr}");
    assert_eq!(knobs(), before, "knobs still restored at exit");
}

#[test]
fn unprivileged_run_touches_no_knob_but_reclaims_and_accounts() {
    let _ksm = serial();
    // SAFETY: getuid has no preconditions.
    if !kvm_available() || unsafe { libc::getuid() } != 0 {
        eprintln!("SKIPPED: needs root to drop privileges to 'nobody' with /dev/kvm access");
        return;
    }
    let before = knobs();
    // 'nobody' needs /dev/kvm: a private copy of the device node, group-owned by nogroup.
    let dir = TempDir::new("nobody");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let bin = dir.path().join("kvmerge");
    let kernel = dir.path().join("payload.elf");
    std::fs::copy(env!("CARGO_BIN_EXE_kvmerge"), &bin).unwrap();
    std::fs::copy(payload(), &kernel).unwrap();
    let acl = Command::new("setfacl")
        .args(["-m", "u:nobody:rw", "/dev/kvm"])
        .status();
    let granted = matches!(acl, Ok(s) if s.success());
    if !granted {
        eprintln!("SKIPPED: cannot grant 'nobody' access to /dev/kvm (setfacl missing)");
        return;
    }
    struct Revoke;
    impl Drop for Revoke {
        fn drop(&mut self) {
            let _ = Command::new("setfacl")
                .args(["-x", "u:nobody", "/dev/kvm"])
                .status();
        }
    }
    let _revoke = Revoke;
    let stats = dir.path().join("stats.jsonl");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args([
            "run",
            "--count",
            "2",
            "--memory",
            "32M",
            "--console",
            "none",
        ])
        .args(["--cmdline", "fill=8 zeros=8 then=idle", "--stats"])
        .arg(&stats)
        .arg("--kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // setpriv execs kvmerge: the child is kvmerge itself.
    let child = Running(cmd.spawn().unwrap());
    wait_for(&stats, "zero pages reclaimed and accounted", |s| {
        (0..2).all(|vm| vm_field(s, vm, "zero_reclaimed_mib") >= 7.9)
            && s["resident_mib"].as_f64().unwrap_or(0.0) >= 16.0
    });
    let (code, stderr) = stop(child, libc::SIGTERM);
    assert_eq!(code, Some(143), "{stderr}");
    assert_eq!(knobs(), before, "an unprivileged run changes no knob");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not steering host KSM"))
        .collect();
    assert_eq!(warnings.len(), 1, "said once, in one line\n{stderr}");
    assert!(warnings[0].contains("not root"), "{stderr}");
    let last = last_stats(&stats).unwrap();
    assert_eq!(last["ksm_owned"], false);
    for vm in 0..2 {
        assert!(
            vm_field(&last, vm, "zero_reclaimed_mib") >= 7.9,
            "reclaim works unprivileged: {last}"
        );
    }
    assert!(
        last["resident_mib"].as_f64().unwrap() >= 16.0,
        "accounting works unprivileged: {last}"
    );
    assert_eq!(last["accounting"], "smaps", "{last}");
}
