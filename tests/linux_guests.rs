//! Linux tier: real tiny kernels (guest-images/linux/) and Debian's stock cloud kernel. They run
//! directly on hardware KVM and inside the nested real-KVM lab on kvm_pvm hosts (scripts/linux-run
//! decides). Every failure prints the whole console.
//!
//! The lab (QEMU TCG emulating SVM) itself now and then crashes or hangs an L2 guest, more often
//! when several boot at once, with QEMU microvm as the L2 VMM as much as with kvmerge, and rarely
//! L1 dies (docs/lab.md, "Concurrent guests"; far rarer with QEMU 10 as the outer QEMU, which
//! scripts/kvm-lab requires). So a lab run that ends in one of those ways runs again, up to
//! [`LAB_ATTEMPTS`] times, printing each discarded attempt; on hardware KVM every run counts.

mod common;

use std::process::Command;
use std::sync::{Mutex, Once};
use std::time::Duration;

use common::*;

/// One lab (QEMU TCG, two threads) at a time: the host has two cores.
static SERIAL: Mutex<()> = Mutex::new(());
const LIMIT: Duration = Duration::from_secs(600);

/// Builds the Linux guest images (cached outside the tree) once per test binary.
fn linux_images() -> bool {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let status = Command::new("make")
            .arg("-C")
            .arg(repo_root())
            .args(["--no-print-directory", "linux-images"])
            .status()
            .expect("cannot run make");
        assert!(status.success(), "building the Linux guest images failed");
    });
    true
}

/// Whether Linux guests can run here, directly or through the lab; prints why not.
fn linux_available() -> bool {
    if !via_lab() {
        return true;
    }
    let check = Command::new(repo_root().join("scripts/kvm-lab"))
        .arg("--check")
        .output();
    match check {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("KVMERGE_REQUIRE_KVM=1 but the nested KVM lab cannot run: {why}");
            }
            eprintln!("SKIPPED: no hardware KVM and the nested KVM lab cannot run: {why}");
            false
        }
        Err(e) => panic!("cannot run scripts/kvm-lab: {e}"),
    }
}

/// `kvmerge ARGS` with Linux guests, through scripts/linux-run; `{images}` is the image directory.
fn linux_run(args: &[&str]) -> Option<Outcome> {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !linux_available() || !linux_images() {
        return None;
    }
    // Guests booted by one run: every one of them must print GUEST-READY.
    let guests = args
        .iter()
        .position(|a| *a == "--count")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let mut attempt = 1;
    loop {
        let mut cmd = Command::new(repo_root().join("scripts/linux-run"));
        cmd.env("KVMERGE_BIN", env!("CARGO_BIN_EXE_kvmerge"))
            .args(["--lab-timeout", "500", "--"])
            .args(args)
            .stdin(std::process::Stdio::null());
        let out = run_with_limit(cmd, LIMIT);
        let Some(fault) = lab_fault(&out, guests) else {
            return Some(out);
        };
        if attempt == LAB_ATTEMPTS {
            eprintln!("lab: attempt {attempt} of {LAB_ATTEMPTS} also hit a lab fault ({fault})");
            return Some(out);
        }
        eprintln!(
            "lab: attempt {attempt} of {LAB_ATTEMPTS} hit a lab fault ({fault}); running it again \
             (docs/lab.md, \"Concurrent guests\")\n{}",
            out.dump()
        );
        attempt += 1;
    }
}

/// How many times a scenario runs in the lab before its last outcome is judged.
const LAB_ATTEMPTS: u32 = 3;

/// Why a run through the nested lab ended the way the lab itself is known to end runs, whatever
/// the VMM: the L2 guest kernel panicked or triple-faulted, a guest hung before it was ready, or
/// L1 died or hung. `scripts/lab-stress` measures this with QEMU microvm as a control. Never for
/// runs on hardware KVM, and never for a VMM error, a wrong exit code or a missing marker.
/// `guests` is how many guests the run booted (a hung guest may not have printed anything).
fn lab_fault(out: &Outcome, guests: usize) -> Option<&'static str> {
    if !out
        .stderr
        .contains("running kvmerge inside the nested KVM lab")
    {
        return None;
    }
    let console = |marker: &str| console_has(out, marker);
    if console("kvm-lab: L1 ended during the scenario") || console("kvm-lab: timed out") {
        Some("L1 died or hung")
    } else if console("Kernel panic - not syncing") {
        Some("an L2 guest kernel panicked")
    } else if console("crashed: triple fault") {
        Some("an L2 guest triple-faulted")
    } else if console(": timed out") && count(out, "GUEST-READY") < guests {
        Some("an L2 guest hung before it was ready")
    } else {
        None
    }
}

/// Console lines (stdout and stderr) that contain `marker`.
fn count(out: &Outcome, marker: &str) -> usize {
    out.stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.contains(marker))
        .count()
}

fn tiny(kernel: &str, extra: &[&str], cmdline: &str) -> Option<Outcome> {
    boot(kernel, "128M", extra, cmdline)
}

fn boot(kernel: &str, memory: &str, extra: &[&str], cmdline: &str) -> Option<Outcome> {
    let kernel = format!("{{images}}/{kernel}");
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {cmdline}");
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        "{images}/initramfs.cpio.gz",
        "--memory",
        memory,
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    // A guest that hangs fails in minutes, not at the lab's own limit.
    if !extra.contains(&"--timeout") {
        args.extend_from_slice(&["--timeout", "300s"]);
    }
    linux_run(&args)
}

/// Through the lab, kvmerge's stdout and stderr arrive together on the lab's console, so markers
/// and verdicts are looked for in both.
fn console_has(out: &Outcome, marker: &str) -> bool {
    count(out, marker) > 0
}

#[test]
fn tiny_bzimage_boots_and_exits_with_chosen_code() {
    let Some(out) = tiny("bzImage", &[], "kvmerge.then=exit:7") else {
        return;
    };
    assert!(console_has(&out, "GUEST-READY"), "{}", out.dump());
    // A guest exit code other than 0 fails the run and is named on stderr.
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("vm0: exited with code 7")
            || out.stdout.contains("vm0: exited with code 7"),
        "{}",
        out.dump()
    );
}

#[test]
fn tiny_elf_vmlinux_boots_and_exits_zero() {
    let Some(out) = tiny("vmlinux", &[], "kvmerge.then=exit:0") else {
        return;
    };
    assert!(console_has(&out, "GUEST-READY"), "{}", out.dump());
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn stock_debian_cloud_kernel_boots() {
    // Debian's kernel has no /dev/port (CONFIG_DEVPORT is off), so its init cannot reach the
    // debug-exit port: it ends with a reboot (an i8042 reset, a clean end).
    let Some(out) = boot("debian-cloud-vmlinuz", "256M", &[], "kvmerge.then=reboot") else {
        return;
    };
    assert!(console_has(&out, "GUEST-READY"), "{}", out.dump());
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn two_vcpus_are_online() {
    let Some(out) = tiny("bzImage", &["--vcpus", "2"], "kvmerge.then=exit:0") else {
        return;
    };
    assert!(console_has(&out, "GUEST-CPUS 2"), "{}", out.dump());
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

/// Whether scripts/linux-run will take the lab route (its own rule, or KVMERGE_LINUX_VIA).
fn via_lab() -> bool {
    match std::env::var("KVMERGE_LINUX_VIA").as_deref() {
        Ok("lab") => true,
        Ok("direct") => false,
        _ => !hardware_kvm(),
    }
}

/// Hardware KVM (VMX or SVM, not kvm_pvm): scripts/linux-run's rule for running guests directly.
fn hardware_kvm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        .unwrap_or(false)
        && !std::path::Path::new("/sys/module/kvm_pvm").exists()
        && std::path::Path::new("/dev/kvm").exists()
}

#[test]
fn four_guests_in_one_process() {
    // In the lab (QEMU 10 as the outer QEMU) a round of four loses a guest rarely (docs/lab.md,
    // "Concurrent guests"); such a round is run again, like any lab fault.
    let Some(out) = tiny("bzImage", &["--count", "4"], "kvmerge.then=exit:0") else {
        return;
    };
    for i in 0..4 {
        assert!(
            console_has(&out, &format!("[vm{i}] GUEST-READY")),
            "vm{i}\n{}",
            out.dump()
        );
    }
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn idle_guest_is_ended_by_timeout() {
    // The guest must be ready before the timeout ends it; on a loaded host a lab guest can take
    // a minute or more to boot (a guest not ready by then is a lab fault and runs again).
    let Some(out) = tiny("bzImage", &["--timeout", "90s"], "kvmerge.then=idle") else {
        return;
    };
    assert!(console_has(&out, "GUEST-READY"), "{}", out.dump());
    assert_eq!(out.code(), Some(124), "{}", out.dump());
}

#[test]
fn cmdline_and_initrd_arrive_intact() {
    let token = "tok-4242_xyzzy";
    let Some(out) = tiny(
        "bzImage",
        &[],
        &format!("kvmerge.echo={token} kvmerge.then=exit:0"),
    ) else {
        return;
    };
    assert!(
        console_has(&out, &format!("GUEST-ECHO {token}")),
        "{}",
        out.dump()
    );
    assert!(
        console_has(&out, "GUEST-INITRD kvmerge-initramfs-v1"),
        "{}",
        out.dump()
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn only_lab_faults_are_run_again() {
    use std::os::unix::process::ExitStatusExt;
    let lab = "linux-run: /dev/kvm is kvm_pvm, which cannot run stock Linux guests: running \
               kvmerge inside the nested KVM lab\n";
    let outcome = |stdout: &str, stderr: &str| Outcome {
        status: std::process::ExitStatus::from_raw(1 << 8),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        elapsed: Duration::ZERO,
    };
    let panicked = "[vm1] [   10.35] Kernel panic - not syncing: corrupted stack end\n";
    assert!(lab_fault(&outcome(panicked, lab), 1).is_some());
    assert!(lab_fault(&outcome("kvmerge: vm3: crashed: triple fault\n", lab), 1).is_some());
    let l1_died = "    | [    8.78] Kernel panic - not syncing: corrupted stack end detected inside \
                   scheduler\nkvm-lab: L1 ended during the scenario without LAB-EXIT\n";
    assert_eq!(
        lab_fault(&outcome("", l1_died), 1),
        None,
        "not through the lab"
    );
    assert_eq!(
        lab_fault(&outcome("", &format!("{lab}{l1_died}")), 1),
        Some("L1 died or hung")
    );
    let hung = "[vm0] [    0.0] Linux version 6.1\n[vm1] [    0.0] Linux version 6.1\n\
                [vm0] GUEST-READY 2.1\nkvmerge: vm1: timed out\n";
    assert!(lab_fault(&outcome(hung, lab), 2).is_some());
    // A guest that timed out before it printed a line (the lab was too slow to boot it) too.
    let silent = "kvmerge: vm0: timed out\nkvmerge: --timeout expired\n";
    assert!(lab_fault(&outcome(silent, lab), 1).is_some());
    // A guest that was ready and then timed out (the idle test) is a verdict, not a lab fault.
    let idle = "[    0.0] Linux version 6.1\nGUEST-READY 2.1\nkvmerge: vm0: timed out\n";
    assert_eq!(lab_fault(&outcome(idle, lab), 1), None);
    // Wrong exit codes and VMM errors always count.
    let wrong_code = "GUEST-READY 2.1\nkvmerge: vm0: exited with code 7\n";
    assert_eq!(lab_fault(&outcome(wrong_code, lab), 1), None);
    assert_eq!(
        lab_fault(&outcome("kvmerge: vm0: KVM_RUN failed\n", lab), 1),
        None
    );
    // On hardware KVM every run counts, panics included.
    let direct = "linux-run: hardware KVM (svm): running kvmerge directly\n";
    assert_eq!(lab_fault(&outcome(panicked, direct), 1), None);
}
