//! The nested real-KVM lab itself: failures are clear, bounded in time, and leave nothing running.
//! Needs QEMU and the lab's packages; skipped (or failed under KVMERGE_REQUIRE_KVM=1) without.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// One lab at a time: the host has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn lab_available() -> bool {
    let out = Command::new(repo_root().join("scripts/kvm-lab"))
        .arg("--check")
        .output()
        .unwrap();
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("KVMERGE_REQUIRE_KVM=1 but the nested KVM lab cannot run: {why}");
    }
    eprintln!("SKIPPED: the nested KVM lab cannot run here: {why}");
    false
}

fn lab(args: &[&str], limit: Duration) -> Outcome {
    become_subreaper();
    let mut cmd = Command::new(repo_root().join("scripts/kvm-lab"));
    cmd.env_remove("KVMERGE_LINUX_VIA")
        .arg("--kvmerge")
        .arg(env!("CARGO_BIN_EXE_kvmerge"))
        .args(args)
        .stdin(std::process::Stdio::null());
    run_with_limit(cmd, limit)
}

/// Makes this test process the reaper of orphaned descendants, so a QEMU that outlived its
/// kvm-lab would show up as our child.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER only changes how this process's orphans are reparented.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// Live (not zombie) QEMU processes whose parent is this test process: lab leftovers.
fn orphaned_qemus() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        if field("Name:").starts_with("qemu-system")
            && field("PPid:") == me
            && !field("State:").starts_with('Z')
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// No QEMU started by the lab run may survive it.
fn assert_no_qemu_left(out: &Outcome) {
    let left = orphaned_qemus();
    assert!(
        left.is_empty(),
        "QEMU still running: {left:?}\n{}",
        out.dump()
    );
}

#[test]
fn missing_images_dir_is_refused_at_once() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_available() {
        return;
    }
    let out = lab(
        &["--images", "/nonexistent/kvmerge-images", "--", "true"],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("/nonexistent/kvmerge-images"),
        "{}",
        out.dump()
    );
    assert!(out.elapsed < Duration::from_secs(10), "{}", out.dump());
}

#[test]
fn missing_and_garbage_guest_kernels_fail_clearly() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_available() {
        return;
    }
    let images = TempDir::new("lab-images");
    // A file with a valid bzImage header and random bytes after it: kvmerge loads it, and the
    // guest crashes (or hangs until --timeout) instead of booting.
    let real = std::fs::read(repo_root().join("guest-images/out/bzImage"));
    let mut garbage: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    if let Ok(real) = real {
        garbage[..0x1000].copy_from_slice(&real[..0x1000]);
    }
    std::fs::write(images.path().join("garbage"), &garbage).unwrap();
    std::fs::write(images.path().join("random"), &garbage[0x1000..0x3000]).unwrap();
    let scenario = "kvmerge run --kernel /lab/images/missing --memory 64M; echo status=$?; \
                    kvmerge run --kernel /lab/images/random --memory 64M; echo status=$?; \
                    kvmerge run --kernel /lab/images/garbage --memory 64M --timeout 20s; echo status=$?; \
                    exit 7";
    let out = lab(
        &[
            "--timeout",
            "240",
            "--images",
            images.path().to_str().unwrap(),
            "--",
            scenario,
        ],
        Duration::from_secs(300),
    );
    assert_eq!(
        out.code(),
        Some(7),
        "the scenario ran to its end\n{}",
        out.dump()
    );
    let statuses: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("status="))
        .collect();
    assert_eq!(statuses.len(), 3, "{}", out.dump());
    assert_eq!(statuses[0], "status=2", "missing kernel\n{}", out.dump());
    assert!(
        out.stdout
            .contains("cannot read kernel /lab/images/missing"),
        "{}",
        out.dump()
    );
    assert_eq!(statuses[1], "status=2", "random bytes\n{}", out.dump());
    assert!(
        out.stdout.contains("neither a bzImage nor an ELF"),
        "{}",
        out.dump()
    );
    assert_ne!(
        statuses[2],
        "status=0",
        "a garbage kernel cannot succeed\n{}",
        out.dump()
    );
    assert!(
        out.stdout.contains("vm0: crashed") || out.stdout.contains("vm0: timed out"),
        "the garbage kernel's end is reported\n{}",
        out.dump()
    );
    assert_no_qemu_left(&out);
}

#[test]
fn scenario_that_never_ends_hits_the_timeout() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_available() {
        return;
    }
    let out = lab(
        &["--timeout", "25", "--", "sleep 1000"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(124), "{}", out.dump());
    assert!(out.elapsed < Duration::from_secs(35), "{}", out.dump());
    assert!(out.stderr.contains("timed out"), "{}", out.dump());
    assert_no_qemu_left(&out);
}

/// scripts/kvm-lab with a stand-in `qemu-system-x86_64` first in PATH that reports `version`.
fn lab_with_qemu_version(version: &str, allow_old: bool, args: &[&str]) -> Outcome {
    let bin = TempDir::new("fake-qemu");
    let fake = bin.path().join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho 'QEMU emulator version {version} (stand-in)'\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(repo_root().join("scripts/kvm-lab"));
    cmd.env("PATH", path)
        .env_remove("KVM_LAB_ALLOW_OLD_QEMU")
        .args(args)
        .stdin(std::process::Stdio::null());
    if allow_old {
        cmd.env("KVM_LAB_ALLOW_OLD_QEMU", "1");
    }
    run_with_limit(cmd, Duration::from_secs(60))
}

#[test]
fn an_outer_qemu_older_than_10_is_refused() {
    // Needs nothing but bash: the version check comes before every other one.
    let out = lab_with_qemu_version("7.2.22", false, &["--check"]);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("outer QEMU 7.2.22 is too old")
            && out.stderr.contains("QEMU >= 10")
            && out.stderr.contains("scripts/install-deps"),
        "{}",
        out.dump()
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    // KVM_LAB_ALLOW_OLD_QEMU=1 only warns; the missing images directory then stops the check.
    let args = ["--check", "--images", "/nonexistent/kvmerge-images"];
    let out = lab_with_qemu_version("7.2.22", true, &args);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr
            .contains("warning: outer QEMU 7.2.22 is older than 10"),
        "{}",
        out.dump()
    );
    // QEMU 10 passes the version check and fails on the images, as the real one would.
    let out = lab_with_qemu_version("10.0.2", false, &args);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(!out.stderr.contains("QEMU"), "{}", out.dump());
}

#[test]
fn qemu_inside_the_lab_boots_from_real_firmware_files() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !lab_available() {
        return;
    }
    let status = Command::new("make")
        .arg("-C")
        .arg(repo_root())
        .args(["--no-print-directory", "linux-images"])
        .status()
        .expect("cannot run make");
    assert!(status.success(), "building the Linux guest images failed");
    let images = TempDir::new("lab-qemu");
    for f in ["bzImage", "initramfs.cpio.gz"] {
        std::fs::copy(
            repo_root().join("guest-images/out").join(f),
            images.path().join(f),
        )
        .unwrap();
    }
    // QEMU 10 from bookworm-backports keeps bios-microvm.bin in /usr/share/seabios: the lab must
    // copy the file itself, and no link in L1 may dangle. Then microvm boots the tiny guest, which
    // ends through isa-debug-exit (status (0 << 1) | 1 = 1).
    let scenario = "find / -xdev -type l | while read -r l; do [ -e \"$l\" ] || echo \"DANGLING $l\"; done; \
                    for f in /usr/share/qemu/*; do [ -L \"$f\" ] && echo \"LINK $f\"; done; \
                    qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 128 -smp 1 -nodefaults \
                    -no-user-config -display none -serial stdio -no-reboot \
                    -kernel /lab/images/bzImage -initrd /lab/images/initramfs.cpio.gz \
                    -append 'console=ttyS0 reboot=k panic=-1 kvmerge.then=exit:0' \
                    -device isa-debug-exit,iobase=0xf4,iosize=0x04; echo qemu-status=$?";
    let out = lab(
        &[
            "--with-qemu",
            "--timeout",
            "400",
            "--images",
            images.path().to_str().unwrap(),
            "--",
            scenario,
        ],
        Duration::from_secs(480),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(!out.stdout.contains("DANGLING "), "{}", out.dump());
    assert!(!out.stdout.contains("LINK "), "{}", out.dump());
    assert!(out.stdout.contains("GUEST-EXIT 0"), "{}", out.dump());
    assert!(out.stdout.contains("qemu-status=1"), "{}", out.dump());
    assert_no_qemu_left(&out);
}
