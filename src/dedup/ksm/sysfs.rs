//! The KSM sysfs directory: its knobs (read, written, in which order restored) and counters.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::dedup::ksm::{Error, Result};

/// Where the kernel exposes KSM.
pub const HOST_KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// A writable file of /sys/kernel/mm/ksm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Knob {
    Run,
    PagesToScan,
    SleepMillisecs,
    SmartScan,
    UseZeroPages,
    MaxPageSharing,
    MergeAcrossNodes,
    StableNodeChainsPruneMillisecs,
    AdvisorMode,
    AdvisorMaxCpu,
    AdvisorTargetScanTime,
    AdvisorMinPagesToScan,
    AdvisorMaxPagesToScan,
}

impl Knob {
    /// Every knob, in the order `kvmerge ksm` shows them.
    pub const ALL: [Knob; 13] = [
        Knob::Run,
        Knob::PagesToScan,
        Knob::SleepMillisecs,
        Knob::SmartScan,
        Knob::UseZeroPages,
        Knob::MaxPageSharing,
        Knob::MergeAcrossNodes,
        Knob::StableNodeChainsPruneMillisecs,
        Knob::AdvisorMode,
        Knob::AdvisorMaxCpu,
        Knob::AdvisorTargetScanTime,
        Knob::AdvisorMinPagesToScan,
        Knob::AdvisorMaxPagesToScan,
    ];

    pub fn file_name(&self) -> &'static str {
        match self {
            Knob::Run => "run",
            Knob::PagesToScan => "pages_to_scan",
            Knob::SleepMillisecs => "sleep_millisecs",
            Knob::SmartScan => "smart_scan",
            Knob::UseZeroPages => "use_zero_pages",
            Knob::MaxPageSharing => "max_page_sharing",
            Knob::MergeAcrossNodes => "merge_across_nodes",
            Knob::StableNodeChainsPruneMillisecs => "stable_node_chains_prune_millisecs",
            Knob::AdvisorMode => "advisor_mode",
            Knob::AdvisorMaxCpu => "advisor_max_cpu",
            Knob::AdvisorTargetScanTime => "advisor_target_scan_time",
            Knob::AdvisorMinPagesToScan => "advisor_min_pages_to_scan",
            Knob::AdvisorMaxPagesToScan => "advisor_max_pages_to_scan",
        }
    }

    /// The knob whose file is `name`.
    pub fn from_file_name(name: &str) -> Option<Knob> {
        Knob::ALL.into_iter().find(|k| k.file_name() == name)
    }

    pub(super) fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl std::fmt::Display for Knob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_name())
    }
}

/// The order in which originals are written back, following the kernel's rules (mm/ksm.c):
/// - the advisor's parameters before `advisor_mode`, because switching the mode re-derives
///   `pages_to_scan` from them;
/// - `advisor_mode` before `pages_to_scan`: the switch resets `pages_to_scan`, and the kernel
///   refuses `pages_to_scan` writes (EINVAL) while the advisor runs;
/// - `max_page_sharing` and `merge_across_nodes` late, as they may need every page unmerged;
/// - `run` last, so ksmd ends in exactly its original state whatever happened before.
pub(super) const RESTORE_ORDER: [Knob; 13] = [
    Knob::AdvisorMaxCpu,
    Knob::AdvisorTargetScanTime,
    Knob::AdvisorMinPagesToScan,
    Knob::AdvisorMaxPagesToScan,
    Knob::AdvisorMode,
    Knob::PagesToScan,
    Knob::SleepMillisecs,
    Knob::SmartScan,
    Knob::UseZeroPages,
    Knob::StableNodeChainsPruneMillisecs,
    Knob::MaxPageSharing,
    Knob::MergeAcrossNodes,
    Knob::Run,
];

/// ksmd's host-wide counters. The first five exist on every KSM kernel; the others are newer and
/// read as 0 where the kernel does not have them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// KSM pages in use: the one kept copy of each merged content.
    pub pages_shared: u64,
    /// Further mappings of those pages: the pages merging saved.
    pub pages_sharing: u64,
    /// Pages checked once, unique so far.
    pub pages_unshared: u64,
    /// Pages changing too fast to be merged.
    pub pages_volatile: u64,
    pub full_scans: u64,
    pub pages_scanned: u64,
    /// Pages smart_scan chose not to look at.
    pub pages_skipped: u64,
    /// Pages merged with the kernel's zero page (use_zero_pages=1); not in `pages_sharing`.
    pub ksm_zero_pages: u64,
    /// Bytes saved minus KSM's own metadata; negative when merging costs more than it saves.
    pub general_profit: i64,
    pub stable_node_chains: u64,
    pub stable_node_dups: u64,
}

impl Counters {
    /// Pages of memory that merging saves host-wide.
    pub fn saved_pages(&self) -> u64 {
        self.pages_sharing.saturating_add(self.ksm_zero_pages)
    }

    /// Mappings per kept copy beyond the first: `pages_sharing / pages_shared`.
    pub fn sharing_ratio(&self) -> Option<f64> {
        (self.pages_shared > 0).then(|| self.pages_sharing as f64 / self.pages_shared as f64)
    }
}

/// A KSM sysfs directory: the host's, or a fixture in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KsmSysfs {
    root: PathBuf,
}

impl KsmSysfs {
    pub fn host() -> KsmSysfs {
        KsmSysfs::at(HOST_KSM_DIR)
    }

    pub fn at(root: impl Into<PathBuf>) -> KsmSysfs {
        KsmSysfs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    pub fn read_counters(&self) -> Result<Counters> {
        Ok(Counters {
            pages_shared: self.read_required("pages_shared")?,
            pages_sharing: self.read_required("pages_sharing")?,
            pages_unshared: self.read_required("pages_unshared")?,
            pages_volatile: self.read_required("pages_volatile")?,
            full_scans: self.read_required("full_scans")?,
            pages_scanned: self.read_number("pages_scanned")?.unwrap_or(0),
            pages_skipped: self.read_number("pages_skipped")?.unwrap_or(0),
            ksm_zero_pages: self.read_number("ksm_zero_pages")?.unwrap_or(0),
            general_profit: self.read_number("general_profit")?.unwrap_or(0),
            stable_node_chains: self.read_number("stable_node_chains")?.unwrap_or(0),
            stable_node_dups: self.read_number("stable_node_dups")?.unwrap_or(0),
        })
    }

    /// The knob's current value, as it can be written back; `None` if this kernel lacks the knob.
    /// `advisor_mode` reads as a list with the selection in brackets (`[none] scan-time`); only
    /// the selection is returned.
    pub fn read_knob(&self, knob: Knob) -> Result<Option<String>> {
        let value = self.read_value(knob.file_name())?;
        Ok(value.map(|text| selected_choice(&text).to_owned()))
    }

    pub fn write_knob(&self, knob: Knob, value: &str) -> Result<()> {
        // One short token: sysfs parses each write(2) on its own, and anything else is a caller bug.
        if value.is_empty() || value.len() > 32 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidValue {
                knob,
                value: value.to_owned(),
            });
        }
        let path = self.root.join(knob.file_name());
        // Never create: a missing file is a knob this kernel lacks. O_TRUNC is ignored by sysfs
        // (as for `echo >`) and keeps plain-file fixtures exact.
        let written = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut file| file.write_all(value.as_bytes()));
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::Busy {
                knob,
                value: value.to_owned(),
            }),
            Err(source) => Err(Error::Write {
                path,
                value: value.to_owned(),
                source,
            }),
        }
    }

    /// Whether kvmerge may write the knobs; otherwise a one-line reason. Decided by opening `run`
    /// for writing (without writing), which sees exactly what a write would: permissions, a
    /// read-only /sys, user namespaces, security modules.
    pub fn writable(&self) -> std::result::Result<(), String> {
        if !self.exists() {
            return Err(format!(
                "KSM not built into this kernel (no {})",
                self.root.display()
            ));
        }
        let run = self.root.join(Knob::Run.file_name());
        let Err(e) = OpenOptions::new().write(true).open(&run) else {
            return Ok(());
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        Err(match e.raw_os_error() {
            Some(libc::EROFS) => {
                format!("read-only sysfs ({} is mounted read-only)", run.display())
            }
            Some(libc::EACCES | libc::EPERM) if euid != 0 => "not root".to_owned(),
            Some(libc::EACCES | libc::EPERM) => format!(
                "permission denied on {} although root (container or security module?)",
                run.display()
            ),
            Some(libc::ENOENT) => format!("KSM sysfs without a run file ({})", run.display()),
            _ => format!("cannot open {} for writing: {e}", run.display()),
        })
    }

    /// The trimmed content of a file of the directory; `None` if it does not exist.
    fn read_value(&self, name: &str) -> Result<Option<String>> {
        let path = self.root.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    fn read_number<T: FromStr>(&self, name: &str) -> Result<Option<T>> {
        let Some(text) = self.read_value(name)? else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|_| Error::Parse {
            path: self.root.join(name),
            text,
        })
    }

    fn read_required(&self, name: &str) -> Result<u64> {
        self.read_number(name)?.ok_or_else(|| Error::Read {
            path: self.root.join(name),
            source: io::ErrorKind::NotFound.into(),
        })
    }
}

/// `[none] scan-time` -> `none`; a plain value is returned unchanged.
pub(crate) fn selected_choice(text: &str) -> &str {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::ksm::fixture::Fixture;

    #[test]
    fn counters_with_every_file() {
        let fx = Fixture::new("counters");
        let c = fx.sysfs().read_counters().unwrap();
        assert_eq!(
            c,
            Counters {
                pages_shared: 10,
                pages_sharing: 30,
                pages_unshared: 40,
                pages_volatile: 3,
                full_scans: 7,
                pages_scanned: 1000,
                pages_skipped: 2,
                ksm_zero_pages: 5,
                general_profit: -4096,
                stable_node_chains: 1,
                stable_node_dups: 4,
            }
        );
        assert_eq!(c.saved_pages(), 35);
        assert_eq!(c.sharing_ratio(), Some(3.0));
    }

    #[test]
    fn counters_on_an_old_kernel_read_optional_files_as_zero() {
        let fx = Fixture::new("old");
        for name in [
            "pages_scanned",
            "pages_skipped",
            "ksm_zero_pages",
            "general_profit",
            "stable_node_chains",
            "stable_node_dups",
        ] {
            fx.remove(name);
        }
        let c = fx.sysfs().read_counters().unwrap();
        assert_eq!((c.pages_shared, c.pages_sharing, c.full_scans), (10, 30, 7));
        assert_eq!(
            (c.ksm_zero_pages, c.general_profit, c.pages_scanned),
            (0, 0, 0)
        );
        assert_eq!((c.stable_node_chains, c.stable_node_dups), (0, 0));

        fx.put("pages_shared", "0\n");
        assert_eq!(fx.sysfs().read_counters().unwrap().sharing_ratio(), None);
    }

    #[test]
    fn counters_missing_required_file_or_garbage_is_an_error() {
        let fx = Fixture::new("bad");
        fx.put("general_profit", "lots\n");
        assert!(matches!(
            fx.sysfs().read_counters(),
            Err(Error::Parse { text, .. }) if text == "lots"
        ));
        fx.remove("pages_sharing");
        assert!(matches!(
            fx.sysfs().read_counters(),
            Err(Error::Read { path, .. }) if path.ends_with("pages_sharing")
        ));
    }

    #[test]
    fn read_and_write_knobs() {
        let fx = Fixture::new("knobs");
        let sysfs = fx.sysfs();
        assert_eq!(
            sysfs.read_knob(Knob::PagesToScan).unwrap().as_deref(),
            Some("100")
        );
        assert_eq!(
            sysfs.read_knob(Knob::AdvisorMode).unwrap().as_deref(),
            Some("none")
        );
        fx.put("advisor_mode", "none [scan-time]\n");
        assert_eq!(
            sysfs.read_knob(Knob::AdvisorMode).unwrap().as_deref(),
            Some("scan-time")
        );

        sysfs.write_knob(Knob::PagesToScan, "5000").unwrap();
        assert_eq!(
            sysfs.read_knob(Knob::PagesToScan).unwrap().as_deref(),
            Some("5000")
        );
        // A shorter value replaces a longer one entirely.
        sysfs.write_knob(Knob::PagesToScan, "7").unwrap();
        assert_eq!(fx.get("pages_to_scan"), "7");

        fx.remove("smart_scan");
        assert_eq!(sysfs.read_knob(Knob::SmartScan).unwrap(), None);
        // Never created: a missing file is a knob the kernel lacks.
        assert!(matches!(
            sysfs.write_knob(Knob::SmartScan, "1"),
            Err(Error::Write { .. })
        ));
        assert!(!fx.0.join("smart_scan").exists());

        for bad in ["", "1 2", "1\n", "x".repeat(33).as_str()] {
            assert!(matches!(
                sysfs.write_knob(Knob::Run, bad),
                Err(Error::InvalidValue { .. })
            ));
        }
        assert_eq!(fx.get("run"), "0");
    }

    #[test]
    fn writable_reasons() {
        let missing = KsmSysfs::at(std::env::temp_dir().join("kvmerge-ksm-does-not-exist"));
        let why = missing.writable().unwrap_err();
        assert!(why.starts_with("KSM not built into this kernel"), "{why}");
        assert!(!why.contains('\n'));

        let fx = Fixture::new("writable");
        assert_eq!(fx.sysfs().writable(), Ok(()));
        fx.remove("run");
        assert!(fx.sysfs().writable().unwrap_err().contains("run"));
    }

    #[test]
    fn restore_order_is_complete_and_ends_with_run() {
        let mut sorted = RESTORE_ORDER.to_vec();
        sorted.sort_by_key(|k| *k as u32);
        assert_eq!(sorted, Knob::ALL.to_vec());
        let pos = |knob| RESTORE_ORDER.iter().position(|&k| k == knob).unwrap();
        assert_eq!(RESTORE_ORDER.last(), Some(&Knob::Run));
        assert!(pos(Knob::AdvisorMinPagesToScan) < pos(Knob::AdvisorMode));
        assert!(pos(Knob::AdvisorMode) < pos(Knob::PagesToScan));
    }
}
