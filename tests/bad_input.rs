//! Bad input: each case is a one-line error on stderr, exit status 2, no panic, nothing left
//! running, and no guest output.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Asserts the run was refused the way a user should see it, and returns its one line.
fn assert_refused(out: &Outcome, mentions: &str) -> String {
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(out.stdout.is_empty(), "nothing may run\n{}", out.dump());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line of error\n{}", out.dump());
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    assert!(
        out.stderr.to_lowercase().contains(&mentions.to_lowercase()),
        "error should mention '{mentions}'\n{}",
        out.dump()
    );
    lines[0].to_string()
}

fn run(args: &[&str]) -> Outcome {
    let mut cmd = kvmerge();
    cmd.arg("run").args(args);
    run_with_limit(cmd, LIMIT)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn missing_and_unreadable_files() {
    let dir = TempDir::new("files");
    let missing = dir.path().join("nope").to_str().unwrap().to_string();
    assert_refused(&run(&["--kernel", &missing]), "cannot read kernel");
    // A directory cannot be read as a file, even by root.
    assert_refused(
        &run(&["--kernel", dir.path().to_str().unwrap()]),
        "cannot read kernel",
    );
    let payload = payload();
    assert_refused(
        &run(&["--kernel", payload.to_str().unwrap(), "--initrd", &missing]),
        "cannot read initrd",
    );
}

#[test]
fn kernels_that_are_not_kernels() {
    let dir = TempDir::new("formats");
    let random: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let payload = std::fs::read(payload()).unwrap();
    let mut elf32 = payload.clone();
    elf32[4] = 1; // EI_CLASS = ELFCLASS32
    let mut bz_header_only = vec![0u8; 0x400];
    bz_header_only[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bz_header_only[0x202..0x206].copy_from_slice(b"HdrS");
    for (name, bytes, mentions) in [
        ("random", &random[..], "neither a bzImage nor an ELF"),
        ("empty", &[][..], "is empty"),
        ("elf32", &elf32[..], "32-bit ELF"),
        ("truncated-elf", &payload[..32], "truncated ELF"),
        ("truncated-payload", &payload[..0x1100], "truncated"),
        ("truncated-bzimage", &bz_header_only[..], "truncated"),
    ] {
        let path = write(dir.path(), name, bytes);
        let line = assert_refused(&run(&["--kernel", &path, "--memory", "16M"]), mentions);
        assert!(
            line.contains(&path),
            "{name}: the error names the file: {line}"
        );
    }
}

#[test]
fn initrd_larger_than_guest_ram() {
    let dir = TempDir::new("initrd");
    let initrd = write(dir.path(), "big.cpio", &vec![0x5a; 9 << 20]);
    let payload = payload();
    let out = run(&[
        "--kernel",
        payload.to_str().unwrap(),
        "--initrd",
        &initrd,
        "--memory",
        "8M",
    ]);
    if !kvm_available() {
        return;
    }
    assert_refused(&out, "does not fit in guest RAM");
}

#[test]
fn bad_memory_sizes() {
    let payload = payload();
    let k = payload.to_str().unwrap();
    assert_refused(&run(&["--kernel", k, "--memory", "0"]), "cannot be empty");
    assert_refused(
        &run(&["--kernel", k, "--memory", "4097K"]),
        "multiple of 4 KiB",
    );
    assert_refused(&run(&["--kernel", k, "--memory", "lots"]), "invalid size");
    if !kvm_available() {
        return;
    }
    // More than the 128 TiB of a process's address space.
    assert_refused(&run(&["--kernel", k, "--memory", "200T"]), "cannot map");
}

#[test]
fn bad_counts() {
    let payload = payload();
    let k = payload.to_str().unwrap();
    assert_refused(&run(&["--kernel", k, "--count", "0"]), "--count");
    assert_refused(&run(&["--kernel", k, "--vcpus", "0"]), "--vcpus");
    assert_refused(&run(&["--kernel", k, "--vcpus", "300"]), "--vcpus");
    if !kvm_available() {
        return;
    }
    // 255 fits in the option's type but not in the MP table or KVM's limit.
    assert_refused(
        &run(&["--kernel", k, "--vcpus", "255"]),
        "more than this host allows",
    );
}

#[test]
fn cmdline_longer_than_the_boot_protocol_allows() {
    let payload = payload();
    let long = "x".repeat(4096);
    let line = assert_refused(
        &run(&["--kernel", payload.to_str().unwrap(), "--cmdline", &long]),
        "command line is 4096 bytes",
    );
    assert!(line.contains("at most 2047"), "{line}");
}

#[test]
fn kvm_device_missing() {
    // A private mount namespace with an empty /dev: the host's /dev/kvm is untouched.
    let probe = Command::new("unshare").args(["--mount", "true"]).status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIPPED: cannot create a mount namespace (needs root and unshare)");
        return;
    }
    let payload = payload();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {} --memory 16M",
        env!("CARGO_BIN_EXE_kvmerge"),
        payload.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    assert_refused(&run_with_limit(cmd, LIMIT), "/dev/kvm does not exist");
}

#[test]
fn kvm_device_not_permitted() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: needs root (to drop to 'nobody') and a /dev/kvm");
        return;
    }
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o006 != 0 {
        eprintln!("SKIPPED: /dev/kvm is world-accessible here, so no user is refused");
        return;
    }
    // Copies everything 'nobody' needs into a world-readable directory.
    let dir = TempDir::new("nobody");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = dir.path().join("kvmerge");
    let kernel = dir.path().join("payload.elf");
    std::fs::copy(env!("CARGO_BIN_EXE_kvmerge"), &bin).unwrap();
    std::fs::copy(payload(), &kernel).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--memory", "16M", "--kernel"])
        .arg(&kernel);
    let line = assert_refused(&run_with_limit(cmd, LIMIT), "/dev/kvm is not accessible");
    assert!(
        line.contains("kvm' group"),
        "tells the user what to do: {line}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["run"][..],
        &["run", "--kernel"],
        &["frobnicate"],
        &["run", "--kernel", "k", "--dedup", "x"],
    ] {
        let mut cmd = kvmerge();
        cmd.args(args);
        let out = run_with_limit(cmd, LIMIT);
        assert_eq!(out.code(), Some(2), "{args:?}\n{}", out.dump());
        assert!(out.stdout.is_empty(), "{}", out.dump());
    }
}
