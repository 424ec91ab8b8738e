//! A fake /sys/kernel/mm/ksm (and a run directory for the journal) for the unit tests.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::dedup::ksm::{KsmSysfs, RunDir};
use crate::sync::lock;

/// Files and values as on a 6.18 host with KSM stopped.
const HOST_LIKE: &[(&str, &str)] = &[
    ("advisor_max_cpu", "70"),
    ("advisor_max_pages_to_scan", "30000"),
    ("advisor_min_pages_to_scan", "500"),
    ("advisor_mode", "[none] scan-time"),
    ("advisor_target_scan_time", "200"),
    ("full_scans", "7"),
    ("general_profit", "-4096"),
    ("ksm_zero_pages", "5"),
    ("max_page_sharing", "256"),
    ("merge_across_nodes", "1"),
    ("pages_scanned", "1000"),
    ("pages_shared", "10"),
    ("pages_sharing", "30"),
    ("pages_skipped", "2"),
    ("pages_to_scan", "100"),
    ("pages_unshared", "40"),
    ("pages_volatile", "3"),
    ("run", "0"),
    ("sleep_millisecs", "20"),
    ("smart_scan", "1"),
    ("stable_node_chains", "1"),
    ("stable_node_chains_prune_millisecs", "2000"),
    ("stable_node_dups", "4"),
    ("use_zero_pages", "0"),
];

/// A fake /sys/kernel/mm/ksm under the temporary directory, removed on drop.
pub struct Fixture(pub PathBuf);

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("kvmerge-ksm-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(dir.with_extension("run"));
        fs::create_dir_all(&dir).unwrap();
        for (name, value) in HOST_LIKE {
            fs::write(dir.join(name), format!("{value}\n")).unwrap();
        }
        Fixture(dir)
    }

    pub fn sysfs(&self) -> KsmSysfs {
        KsmSysfs::at(&self.0)
    }

    /// The run directory (journal, locks) that goes with this fixture.
    pub fn run_dir(&self) -> RunDir {
        RunDir::at(self.0.with_extension("run"))
    }

    pub fn get(&self, name: &str) -> String {
        fs::read_to_string(self.0.join(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn put(&self, name: &str, value: &str) {
        fs::write(self.0.join(name), value).unwrap();
    }

    pub fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_dir_all(self.0.with_extension("run"));
    }
}

/// Owner tests run one at a time: a deliberate panic restores every registered owner,
/// including those of tests running beside it.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    lock(&SERIAL)
}
