//! Helpers of the tests that touch the host's KSM (tests/dedup.rs, tests/host_state.rs).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::sync::Mutex;

use crate::common::Running;

/// Host KSM is one global pool: one test at a time.
static KSM: Mutex<()> = Mutex::new(());
/// How long a test waits for any one event.
pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";
pub const KNOBS: &[&str] = &[
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "advisor_mode",
];

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    KSM.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether kvmerge may steer the host's KSM here (root, KSM present).
pub fn ksm_writable() -> bool {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let why = if !Path::new(KSM_DIR).exists() {
        "this kernel has no KSM"
    } else if !root {
        "steering KSM needs root"
    } else {
        return true;
    };
    if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("KVMERGE_REQUIRE_KVM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

pub fn knobs() -> Vec<(String, String)> {
    KNOBS
        .iter()
        .filter_map(|k| {
            let v = std::fs::read_to_string(Path::new(KSM_DIR).join(k)).ok()?;
            // A choice knob (`[none] scan-time`) as its selection, as kvmerge records it.
            let v = v
                .split_whitespace()
                .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
                .unwrap_or(v.trim())
                .to_string();
            Some((k.to_string(), v))
        })
        .collect()
}

/// The last JSON object of a `--stats` file.
pub fn last_stats(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// Sends `signal` to a child and returns its exit code and stderr.
pub fn stop(mut child: Running, signal: i32) -> (Option<i32>, String) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, signal) };
    let status = child.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}
