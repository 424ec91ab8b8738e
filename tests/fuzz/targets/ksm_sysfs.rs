//! The KSM sysfs reader on a fixture directory, as `kvmerge ksm` and the merge thread use it:
//! counters (`read_counters`), knobs with the multiple-choice format (`read_knob`), and the whole
//! `report`.
//!
//! Input: the contents of the files below in order, separated by NUL bytes; a field that starts
//! with 0xff leaves its file out (a knob or counter this kernel lacks).

use std::path::PathBuf;
use std::sync::OnceLock;

use kvmerge::dedup::ksm::{self, Knob, KsmSysfs};
use kvmerge_fuzz::assert_one_line;

const COUNTERS: [&str; 11] = [
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "ksm_zero_pages",
    "general_profit",
    "stable_node_chains",
    "stable_node_dups",
];

/// This process's fixture directory, on tmpfs when there is one (scripts/fuzz removes it).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = PathBuf::from("/dev/shm");
        let base = if base.is_dir() {
            base
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("kvmerge-fuzz-ksm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fixture directory");
        dir
    })
}

fn run(data: &[u8]) {
    let dir = dir();
    let names = Knob::ALL.iter().map(|k| k.file_name()).chain(COUNTERS);
    let mut fields = data.split(|&b| b == 0);
    for name in names {
        let path = dir.join(name);
        match fields.next() {
            Some(field) if field.first() != Some(&0xff) => {
                std::fs::write(&path, field).expect("fixture file")
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let sysfs = KsmSysfs::at(dir);
    match sysfs.read_counters() {
        Ok(c) => {
            let _ = (c.saved_pages(), c.sharing_ratio());
        }
        Err(e) => assert_one_line(&e.to_string()),
    }
    for knob in Knob::ALL {
        match sysfs.read_knob(knob) {
            Ok(value) => {
                let _ = value;
            }
            Err(e) => assert_one_line(&e.to_string()),
        }
    }
    // No journal there: the report says so.
    if let Err(e) = ksm::report(&sysfs, &ksm::RunDir::at(dir.join("no-run-dir"))) {
        assert_one_line(&e.to_string());
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
