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
        "is a directory, not a regular file",
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
    // Beyond what KVM sets up quickly: refused up front, before any KVM call.
    for size in ["200T", "10T", "1T", "257G"] {
        assert_refused(&run(&["--kernel", k, "--memory", size]), "at most 256 GiB");
    }
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
    // The range a message states is the range kvmerge accepts.
    assert_refused(&run(&["--kernel", k, "--vcpus", "255"]), "1..=254");
    assert_refused(&run(&["--kernel", k, "--count", "4294967296"]), "1..=65536");
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

/// Devices, FIFOs and oversized files are refused before they are read (a FIFO would block in
/// open(2), /dev/zero would be read without end), as kernel, initrd and fleet file alike.
#[test]
fn only_bounded_regular_files_are_read() {
    let dir = TempDir::new("special");
    let payload = payload();
    let k = payload.to_str().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    for (args, mentions) in [
        (
            &["--kernel", "/dev/zero"][..],
            "kernel /dev/zero is a character device",
        ),
        (&["--kernel", "/dev/urandom"], "is a character device"),
        (&["--kernel", fifo], "is a FIFO"),
        (
            &["--kernel", k, "--initrd", "/dev/zero"],
            "initrd /dev/zero is a character device",
        ),
        (&["--kernel", k, "--initrd", fifo], "is a FIFO"),
        (
            &["--fleet", "/dev/zero"],
            "fleet file /dev/zero is a character device",
        ),
        (&["--fleet", fifo], "is a FIFO"),
    ] {
        let out = run(args);
        assert!(out.elapsed < LIMIT, "{args:?} is bounded");
        let line = assert_refused(&out, mentions);
        assert!(line.contains("not a regular file"), "{line}");
    }
    // Sparse files beyond the caps: the size is checked before a byte is read.
    let big = |name: &str, len: u64| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.to_str().unwrap().to_string()
    };
    let kernel = big("huge-kernel", (512 << 20) + 1);
    assert_refused(&run(&["--kernel", &kernel]), "at most 512 MiB for a kernel");
    let initrd = big("huge-initrd", (1 << 30) + 1);
    assert_refused(
        &run(&["--kernel", k, "--initrd", &initrd]),
        "at most 1 GiB for a initrd",
    );
    let fleet = big("huge.toml", (1 << 20) + 1);
    assert_refused(&run(&["--fleet", &fleet]), "at most 1 MiB for a fleet file");
}

#[test]
fn durations_and_sizes_have_upper_bounds() {
    let payload = payload();
    let k = payload.to_str().unwrap();
    assert_refused(
        &run(&["--kernel", k, "--timeout", "10000000000000000000s"]),
        "longer than a year",
    );
    assert_refused(
        &run(&["--kernel", k, "--timeout", "400d"]),
        "invalid duration",
    );
    assert_refused(
        &run(&["--kernel", k, "--duration", "10000000000000000000s"]),
        "longer than a year",
    );
    assert_refused(
        &run(&["--kernel", k, "--duration", "0s"]),
        "longer than zero",
    );
    assert_refused(
        &run(&["--kernel", k, "--duration", "1s", "--timeout", "2s"]),
        "cannot be used with",
    );
    assert_refused(&run(&["--kernel", k, "--overcommit", "0"]), "ratio");
    assert_refused(&run(&["--kernel", k, "--overcommit", "1000"]), "ratio");
    assert_refused(
        &run(&["--kernel", k, "--ksm-policy", "fixed:99999999999:1"]),
        "PAGES is out of range",
    );
}

/// Guest RAM of the whole fleet against what the host has available: refused up front.
#[test]
fn fleet_larger_than_the_host_is_refused() {
    let payload = payload();
    let k = payload.to_str().unwrap();
    let line = assert_refused(
        &run(&["--kernel", k, "--memory", "256G", "--count", "64"]),
        "more than the",
    );
    assert!(line.contains("16.0 TiB") || line.contains("GiB"), "{line}");
    assert!(line.contains("--overcommit"), "says what to do: {line}");
}

/// Too few file descriptors: refused up front with the real reason, not a missing 'mg' flag
/// (verify_mergeable cannot open smaps) or "Too many open files" after minutes of building.
#[test]
fn open_file_limit_is_checked_up_front() {
    let payload = payload();
    for (limit, count) in [("12", "1"), ("200", "100")] {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "ulimit -n {limit} && exec '{}' run --kernel '{}' --memory 4M --count {count}",
            env!("CARGO_BIN_EXE_kvmerge"),
            payload.display()
        ));
        let line = assert_refused(&run_with_limit(cmd, LIMIT), "open files");
        assert!(line.contains("RLIMIT_NOFILE"), "{line}");
    }
    if !kvm_available() {
        return;
    }
    // A soft limit below the need with a hard one above it is raised, and the fleet runs.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "ulimit -Sn 64 && ulimit -Hn 4096 && exec '{}' run --kernel '{}' --memory 4M --count 40 \
         --console none --cmdline then=exit:0",
        env!("CARGO_BIN_EXE_kvmerge"),
        payload.display()
    ));
    let out = run_with_limit(cmd, Duration::from_secs(120));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

/// Messages that used to mislead: each says what is really wrong.
#[test]
fn messages_say_what_is_wrong() {
    let dir = TempDir::new("messages");
    let payload = payload();
    let k = payload.to_str().unwrap();
    // Guest RAM too small for the payload's segments: not "is the file truncated?".
    let line = assert_refused(
        &run(&["--kernel", k, "--memory", "2M"]),
        "needs 4 MiB of guest RAM",
    );
    assert!(
        !line.contains("truncated") && line.contains("raise --memory"),
        "{line}"
    );
    // An entry point outside the loadable segments is bad input (2), not a guest crash (1).
    let mut bytes = std::fs::read(&payload).unwrap();
    bytes[24..32].copy_from_slice(&0x4000_0000u64.to_le_bytes());
    let bad_entry = write(dir.path(), "bad-entry.elf", &bytes);
    assert_refused(
        &run(&["--kernel", &bad_entry, "--memory", "16M"]),
        "entry point 0x40000000 lies outside",
    );
    // A segment beyond guest RAM.
    let mut bytes = std::fs::read(&payload).unwrap();
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(bytes[56..58].try_into().unwrap()) as usize;
    let load = (0..phnum)
        .map(|i| phoff + i * 56)
        .find(|&ph| u32::from_le_bytes(bytes[ph..ph + 4].try_into().unwrap()) == 1)
        .unwrap();
    let memsz = u64::from_le_bytes(bytes[load + 40..load + 48].try_into().unwrap());
    bytes[load + 40..load + 48].copy_from_slice(&(memsz + (64 << 20)).to_le_bytes());
    let big_segment = write(dir.path(), "big-segment.elf", &bytes);
    let line = assert_refused(
        &run(&["--kernel", &big_segment, "--memory", "16M"]),
        "of guest RAM (where its ELF segments end), more than --memory 16 MiB",
    );
    assert!(!line.contains("truncated"), "{line}");
    // A payload cut short is a truncated ELF, not "a Linux kernel".
    let cut = std::fs::read(&payload).unwrap();
    // (Cut inside its code segment and note: 0x3000 of the payload's 0x30dc bytes of segments.)
    let cut = write(dir.path(), "cut.elf", &cut[..0x3000]);
    let line = assert_refused(&run(&["--kernel", &cut]), "truncated ELF");
    assert!(!line.contains("Linux kernel"), "{line}");
    // --console with a regular file, or an empty string (which used to write ./vm0.log).
    let file = write(dir.path(), "not-a-dir", b"x");
    assert_refused(
        &run(&["--kernel", k, "--console", &file]),
        "is not a directory",
    );
    let mut cmd = kvmerge();
    cmd.current_dir(dir.path())
        .args(["run", "--kernel", k, "--console", ""]);
    assert_refused(&run_with_limit(cmd, LIMIT), "--console ''");
    assert!(!dir.path().join("vm0.log").exists());
    // Non-ASCII on the command line, checked by linux-loader's Cmdline.
    assert_refused(
        &run(&["--kernel", k, "--cmdline", "caf\u{e9}"]),
        "not printable ASCII",
    );
}

#[test]
fn a_newline_in_a_file_name_keeps_the_message_on_one_line() {
    let dir = TempDir::new("newline-names");
    let missing = dir.0.join("a\nb");
    let line = assert_refused(&run(&["--kernel", missing.to_str().unwrap()]), "a\\nb");
    assert!(line.contains("cannot read kernel"), "{line}");
    let fleet = write(
        &dir.0,
        "fleet.toml",
        b"[defaults]\nkernel = \"/nonexistent/a\\nb\"\n[[vm]]\n",
    );
    assert_refused(&run(&["--fleet", &fleet]), "a\\nb");
}
