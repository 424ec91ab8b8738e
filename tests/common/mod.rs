//! Shared helpers of the integration tests: the kvmerge binary, guest images, KVM availability,
//! and child processes that cannot outlive a test.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn kvmerge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvmerge"));
    c.stdin(Stdio::null());
    c
}

/// The payload guest, built with `make` on first use.
pub fn payload() -> PathBuf {
    static BUILD: Once = Once::new();
    let elf = repo_root().join("guest-images/out/payload.elf");
    BUILD.call_once(|| {
        let status = Command::new("make")
            .arg("-C")
            .arg(repo_root())
            .arg("--no-print-directory")
            .arg("guest-images/out/payload.elf")
            .status()
            .expect("cannot run make to build the payload guest");
        assert!(status.success(), "building the payload guest failed");
    });
    elf
}

/// Whether this host can run KVM guests. Prints why not and returns false, unless
/// KVMERGE_REQUIRE_KVM=1, in which case a missing KVM fails the test.
pub fn kvm_available() -> bool {
    let why = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) => format!("/dev/kvm cannot be opened ({e})"),
    };
    if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("KVMERGE_REQUIRE_KVM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}; this test needs KVM");
    false
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kvmerge-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished kvmerge run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Everything the run printed, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A child process stopped at drop, so no failed test leaves a VMM running: SIGTERM first (kvmerge
/// then restores any host state it changed, such as KSM knobs), SIGKILL if it does not exit soon.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Outcome {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kvmerge");
    let mut running = Running(child);
    let mut out = running.0.stdout.take().unwrap();
    let mut err = running.0.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = running.0.kill();
            let status = running.0.wait().unwrap();
            let stdout = out_reader.join().unwrap();
            let stderr = err_reader.join().unwrap();
            panic!(
                "kvmerge did not finish within {limit:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n(status {status:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// `kvmerge run --kernel <payload> ARGS...`, bounded by `limit`.
pub fn run_payload(args: &[&str], limit: Duration) -> Outcome {
    let mut cmd = kvmerge();
    cmd.arg("run").arg("--kernel").arg(payload()).args(args);
    run_with_limit(cmd, limit)
}

/// Mirror of the payload's fill checksum (guest-images/payload/PROTOCOL.md).
pub fn expected_fill_sum(mib: u64, patterns: u64) -> u64 {
    fn splitmix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let pages = mib * 256;
    let mut page_sums = Vec::with_capacity(patterns.min(pages) as usize);
    for p in 0..patterns.min(pages) {
        page_sums.push((0..512).fold(0u64, |acc, w| acc.wrapping_add(splitmix64(p * 512 + w))));
    }
    (0..pages).fold(0u64, |acc, i| {
        acc.wrapping_add(page_sums[(i % patterns) as usize])
    })
}
