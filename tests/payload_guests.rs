//! Host-KVM tier: the real VMM with payload guests (guest-images/payload/PROTOCOL.md). These run
//! on any KVM, kvm_pvm included.

mod common;

use std::time::Duration;

use common::*;

/// Stderr without the line a kvmerge prints when another kvmerge (a test running beside this
/// one) steers the host's KSM.
fn own_stderr(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("steers host KSM"))
        .collect();
    lines.join("\n")
}

const LIMIT: Duration = Duration::from_secs(60);

fn lines_with<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(marker)).collect()
}

#[test]
fn single_guest_marker_and_exit_code() {
    if !kvm_available() {
        return;
    }
    let ok = run_payload(&["--memory", "16M", "--cmdline", "then=exit:0"], LIMIT);
    assert_eq!(ok.code(), Some(0), "{}", ok.dump());
    assert_eq!(
        lines_with(&ok.stdout, "PAYLOAD-READY"),
        ["PAYLOAD-READY cpus=1"],
        "{}",
        ok.dump()
    );
    assert!(
        own_stderr(&ok.stderr).is_empty(),
        "a clean run prints nothing on stderr\n{}",
        ok.dump()
    );

    let failed = run_payload(&["--memory", "16M", "--cmdline", "then=exit:42"], LIMIT);
    assert_eq!(failed.code(), Some(1), "{}", failed.dump());
    assert_eq!(
        own_stderr(&failed.stderr),
        "kvmerge: vm0: exited with code 42",
        "{}",
        failed.dump()
    );
}

#[test]
fn fill_checksum_round_trips() {
    if !kvm_available() {
        return;
    }
    let out = run_payload(
        &[
            "--memory",
            "64M",
            "--cmdline",
            "fill=16 patterns=16 echo=tok-3.14",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-ECHO"),
        ["PAYLOAD-ECHO tok-3.14"],
        "{}",
        out.dump()
    );
    let want = format!("PAYLOAD-FILLED sum={:x}", expected_fill_sum(16, 16));
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-FILLED"),
        [want.as_str()],
        "{}",
        out.dump()
    );
}

/// `unique=PCT` makes that share of the fill's pages unique to the VM, spread evenly; bad values
/// are refused by the guest.
#[test]
fn unique_share_of_the_fill() {
    if !kvm_available() {
        return;
    }
    for (pct, pages) in [(0, 0), (25, 256), (100, 1024)] {
        let cmdline = format!("fill=4 patterns=1024 unique={pct} seed=7");
        let out = run_payload(&["--memory", "16M", "--cmdline", &cmdline], LIMIT);
        assert_eq!(out.code(), Some(0), "{}", out.dump());
        let want = format!("PAYLOAD-UNIQUE pages={pages}");
        assert_eq!(
            lines_with(&out.stdout, "PAYLOAD-UNIQUE"),
            [want.as_str()],
            "{}",
            out.dump()
        );
    }
    let out = run_payload(
        &["--memory", "16M", "--cmdline", "fill=4 unique=101"],
        LIMIT,
    );
    assert_ne!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("bad unique"), "{}", out.dump());
}

#[test]
fn initrd_arrives_intact() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("initrd");
    let initrd = dir.path().join("initrd.bin");
    let bytes: Vec<u8> = (0..100_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &bytes).unwrap();
    let sum = bytes
        .iter()
        .fold(0u64, |a, &b| a.wrapping_add(u64::from(b)));
    let out = run_payload(
        &[
            "--memory",
            "32M",
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "fill=8",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let want = format!("PAYLOAD-INITRD size={:x} sum={sum:x}", bytes.len());
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-INITRD"),
        [want.as_str()],
        "{}",
        out.dump()
    );
    // The fill stopped below the initrd, so the initrd read back intact after it.
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-FILLED").len(),
        1,
        "{}",
        out.dump()
    );
}

#[test]
fn eight_guests_with_distinct_consoles_and_codes() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("eight");
    let out = run_payload(
        &[
            "--count",
            "8",
            "--memory",
            "16M",
            "--console",
            dir.path().to_str().unwrap(),
            "--cmdline",
            "fill=4 patterns=4 echo=guest-{index} then=exit:{index}",
        ],
        LIMIT,
    );
    // vm0 exits 0, vm1..vm7 exit with their index: the run fails and names each of them.
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stdout.is_empty(),
        "consoles go to files\n{}",
        out.dump()
    );
    let stderr = own_stderr(&out.stderr);
    let failures: Vec<&str> = stderr.lines().collect();
    let want: Vec<String> = (1..8)
        .map(|i| format!("kvmerge: vm{i}: exited with code {i}"))
        .collect();
    assert_eq!(failures, want, "{}", out.dump());
    let sum = format!("PAYLOAD-FILLED sum={:x}", expected_fill_sum(4, 4));
    for i in 0..8 {
        let log = std::fs::read_to_string(dir.path().join(format!("vm{i}.log"))).unwrap();
        let expected = [
            "PAYLOAD-READY cpus=1".to_string(),
            format!("PAYLOAD-ECHO guest-{i}"),
            sum.clone(),
        ];
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            expected,
            "vm{i}.log:\n{log}"
        );
    }
}

#[test]
fn eight_guests_prefixed_on_stdout() {
    if !kvm_available() {
        return;
    }
    let out = run_payload(
        &[
            "--count",
            "8",
            "--memory",
            "16M",
            "--cmdline",
            "echo=g{index}",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    for i in 0..8 {
        let prefix = format!("[vm{i}] ");
        let mine: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        let want = [
            format!("{prefix}PAYLOAD-READY cpus=1"),
            format!("{prefix}PAYLOAD-ECHO g{i}"),
        ];
        assert_eq!(mine, want, "{}", out.dump());
    }
    assert_eq!(out.stdout.lines().count(), 16, "{}", out.dump());
}

#[test]
fn smp_guest_sees_every_vcpu() {
    if !kvm_available() {
        return;
    }
    for vcpus in ["2", "4"] {
        let out = run_payload(
            &["--vcpus", vcpus, "--memory", "16M", "--cmdline", "fill=2"],
            LIMIT,
        );
        assert_eq!(out.code(), Some(0), "{}", out.dump());
        let want = format!("PAYLOAD-READY cpus={vcpus}");
        assert_eq!(
            lines_with(&out.stdout, "PAYLOAD-READY"),
            [want.as_str()],
            "{}",
            out.dump()
        );
    }
}

#[test]
fn crash_and_reset_are_reported() {
    if !kvm_available() {
        return;
    }
    let crash = run_payload(&["--memory", "16M", "--cmdline", "then=crash"], LIMIT);
    assert_eq!(crash.code(), Some(1), "{}", crash.dump());
    assert_eq!(
        own_stderr(&crash.stderr),
        "kvmerge: vm0: crashed: triple fault",
        "{}",
        crash.dump()
    );

    let reset = run_payload(&["--memory", "16M", "--cmdline", "then=reset"], LIMIT);
    assert_eq!(
        reset.code(),
        Some(0),
        "a clean reset is success\n{}",
        reset.dump()
    );
}

#[test]
fn timeout_ends_idle_guests_with_124() {
    if !kvm_available() {
        return;
    }
    let out = run_payload(
        &[
            "--count",
            "2",
            "--memory",
            "16M",
            "--cmdline",
            "then=idle",
            "--timeout",
            "700ms",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(124), "{}", out.dump());
    assert!(out.elapsed < Duration::from_secs(5), "{}", out.dump());
    assert!(out.elapsed >= Duration::from_millis(700), "{}", out.dump());
    assert!(out.stderr.contains("vm0: timed out"), "{}", out.dump());
    assert!(out.stderr.contains("vm1: timed out"), "{}", out.dump());
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-READY").len(),
        2,
        "{}",
        out.dump()
    );
}

/// `--duration`: a planned end. Guests still running when it is over stop, and the run succeeds;
/// a guest that failed before still fails the run, and a fleet that ends by itself does not wait.
#[test]
fn duration_is_a_planned_end_and_masks_no_failure() {
    if !kvm_available() {
        return;
    }
    let out = run_payload(
        &[
            "--count",
            "2",
            "--memory",
            "16M",
            "--cmdline",
            "then=idle",
            "--duration",
            "700ms",
            "-v",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.elapsed >= Duration::from_millis(700), "{}", out.dump());
    assert!(out.stderr.contains("--duration is over"), "{}", out.dump());
    assert!(!out.stderr.contains("timed out"), "{}", out.dump());
    assert!(!out.stderr.contains("--timeout expired"), "{}", out.dump());
    assert_eq!(
        lines_with(&out.stdout, "PAYLOAD-READY").len(),
        2,
        "{}",
        out.dump()
    );

    // vm1 exits 1 long before the duration is over: the run ends then, and fails.
    let out = run_payload(
        &[
            "--count",
            "2",
            "--memory",
            "16M",
            "--cmdline",
            "then=exit:{index}",
            "--duration",
            "1h",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("vm1: exited with code 1"),
        "{}",
        out.dump()
    );
}

#[test]
fn expect_match_and_mismatch() {
    if !kvm_available() {
        return;
    }
    let hit = run_payload(
        &[
            "--memory",
            "16M",
            "--cmdline",
            "echo=xyzzy",
            "--expect",
            "ECHO x.zzy$",
        ],
        LIMIT,
    );
    assert_eq!(hit.code(), Some(0), "{}", hit.dump());

    let miss = run_payload(
        &[
            "--count",
            "2",
            "--memory",
            "16M",
            "--cmdline",
            "echo=xyzzy",
            "--expect",
            "plugh",
        ],
        LIMIT,
    );
    assert_eq!(miss.code(), Some(1), "{}", miss.dump());
    for vm in ["vm0", "vm1"] {
        let line = format!(
            "kvmerge: {vm}: exited with code 0, but its console never matched --expect 'plugh'"
        );
        assert!(miss.stderr.lines().any(|l| l == line), "{}", miss.dump());
    }
}

#[test]
fn sigint_and_sigterm_stop_all_guests_within_a_second() {
    if !kvm_available() {
        return;
    }
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let dir = TempDir::new("signal");
        let mut cmd = kvmerge();
        cmd.arg("run")
            .arg("--kernel")
            .arg(payload())
            .args([
                "--count",
                "4",
                "--memory",
                "16M",
                "--cmdline",
                "then=idle",
                "--console",
            ])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = Running(cmd.spawn().unwrap());
        // Wait until every guest is up, against a deadline.
        let deadline = std::time::Instant::now() + LIMIT;
        while (0..4).any(|i| {
            !std::fs::read_to_string(dir.path().join(format!("vm{i}.log")))
                .unwrap_or_default()
                .contains("PAYLOAD-READY")
        }) {
            assert!(std::time::Instant::now() < deadline, "guests did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let sent = std::time::Instant::now();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.0.id() as i32, signal) };
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "kvmerge ignored signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let stopped_in = sent.elapsed();
        assert_eq!(status.code(), Some(code));
        assert!(
            stopped_in < Duration::from_secs(1),
            "took {stopped_in:?} to stop"
        );
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains(&format!("stopped by signal {signal}")))
                .count(),
            4,
            "{stderr}"
        );
    }
}
