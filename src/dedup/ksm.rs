//! The host's KSM: its counters, its knobs, and the rule that kvmerge leaves the knobs exactly as
//! it found them.
//!
//! /sys/kernel/mm/ksm is one pool for the whole host. When kvmerge may write it (root), a
//! [`KsmOwner`] snapshots every knob the merge thread will drive and writes back the originals on
//! every exit path kvmerge controls:
//!
//! - normal end and errors: `Drop` of the owner;
//! - SIGINT/SIGTERM: kvmerge's control loop turns them into a normal shutdown, so `Drop` runs;
//! - a panic in any thread (vCPU, merge thread, main): the hook of [`install_panic_hook`], which
//!   runs before unwinding or aborting.
//!
//! Nothing covers SIGKILL, `std::process::abort` or `std::process::exit` while an owner is alive:
//! the knobs then stay as kvmerge left them, and `kvmerge ksm` shows what they are.
//!
//! When kvmerge may not write the knobs (not root, no KSM), it changes nothing: the caller logs the
//! one-line reason from [`KsmSysfs::writable`] once and runs with zero-page reclaim and accounting.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock, PoisonError, TryLockError};
use std::time::Duration;

/// Where the kernel exposes KSM.
pub const HOST_KSM_DIR: &str = "/sys/kernel/mm/ksm";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KSM is not available: {} does not exist (kernel built without CONFIG_KSM)", .0.display())]
    Absent(PathBuf),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot set {knob} to {value:?} while KSM pages are shared (writing 2 to run unmerges them)"
    )]
    Busy { knob: Knob, value: String },
    #[error("unexpected content {text:?} in {}", path.display())]
    Parse { path: PathBuf, text: String },
    #[error("{value:?} is not a valid value for the KSM knob {knob}")]
    InvalidValue { knob: Knob, value: String },
    #[error("KSM knob {0} was not snapshotted when ownership was taken: not kvmerge's to change")]
    NotOwned(Knob),
    #[error("the KSM knobs in {} are already owned by this process", .0.display())]
    AlreadyOwned(PathBuf),
    #[error("another kvmerge already owns the KSM knobs in {}: leaving them alone", .0.display())]
    OwnedElsewhere(PathBuf),
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not restore {} KSM knob(s): {}", .0.len(), .0.join("; "))]
    Restore(Vec<String>),
}

pub type Result<T> = std::result::Result<T, Error>;

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

    fn bit(self) -> u32 {
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
const RESTORE_ORDER: [Knob; 13] = [
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

/// Exclusive, restoring ownership of the knobs kvmerge touches.
///
/// Exclusive within the process (one owner per directory) and across processes: the owner holds
/// an flock on the `run` file, so a second kvmerge neither snapshots the first one's boosted values
/// nor fights it over the knobs. Share it with the merge thread through an `Arc`.
pub struct KsmOwner {
    shared: Arc<Snapshot>,
    /// Holds the flock; closed (and so released) after `Drop` has restored the knobs.
    _lock: File,
}

/// The originals of one owner, shared with the process-wide registry the panic hook reads.
struct Snapshot {
    sysfs: KsmSysfs,
    /// In [`RESTORE_ORDER`].
    originals: Vec<(Knob, String)>,
    /// One bit per knob changed through `set` since the last complete restore.
    touched: AtomicU32,
    /// Serialises `set` and `restore`, so a restore never interleaves with a change.
    io: Mutex<()>,
}

/// Every live owner's snapshot, for the panic hook.
static OWNERS: Mutex<Vec<Arc<Snapshot>>> = Mutex::new(Vec::new());

impl KsmOwner {
    /// Snapshots the current values of `knobs` (those present on this kernel) and registers them
    /// for restoration. Asking for `advisor_mode` also snapshots `pages_to_scan`, which the kernel
    /// resets whenever the advisor mode changes. Installs the panic hook if it is not yet.
    pub fn take(sysfs: KsmSysfs, knobs: &[Knob]) -> Result<KsmOwner> {
        if !sysfs.exists() {
            return Err(Error::Absent(sysfs.root));
        }
        install_panic_hook();
        let mut owners = lock(&OWNERS);
        if owners.iter().any(|owner| owner.sysfs == sysfs) {
            return Err(Error::AlreadyOwned(sysfs.root));
        }
        let lock_file = lock_knobs(&sysfs)?;

        let mut wanted = knobs.iter().fold(0, |bits, knob| bits | knob.bit());
        if wanted & Knob::AdvisorMode.bit() != 0 {
            wanted |= Knob::PagesToScan.bit();
        }
        let mut originals = Vec::new();
        for knob in RESTORE_ORDER {
            if wanted & knob.bit() != 0 {
                if let Some(value) = sysfs.read_knob(knob)? {
                    originals.push((knob, value));
                }
            }
        }
        let shared = Arc::new(Snapshot {
            sysfs,
            originals,
            touched: AtomicU32::new(0),
            io: Mutex::new(()),
        });
        owners.push(Arc::clone(&shared));
        Ok(KsmOwner {
            shared,
            _lock: lock_file,
        })
    }

    pub fn sysfs(&self) -> &KsmSysfs {
        &self.shared.sysfs
    }

    /// The value `knob` had when ownership was taken; `None` if it was not snapshotted.
    pub fn original(&self, knob: Knob) -> Option<&str> {
        self.shared.original(knob)
    }

    /// Writes `value` to a snapshotted knob.
    pub fn set(&self, knob: Knob, value: &str) -> Result<()> {
        if self.shared.original(knob).is_none() {
            return Err(Error::NotOwned(knob));
        }
        let _io = lock(&self.shared.io);
        // Marked before the write: if it fails half way, a restore still considers the knob.
        self.shared.touched.fetch_or(knob.bit(), Ordering::SeqCst);
        self.shared.sysfs.write_knob(knob, value)
    }

    /// Writes back every snapshotted knob whose value differs from its original, `run` last (see
    /// `RESTORE_ORDER`). Idempotent; the owner stays registered, so later changes are restored
    /// again by the next `restore`, the panic hook or `Drop`.
    pub fn restore(&self) -> Result<()> {
        let _io = lock(&self.shared.io);
        self.shared.restore()
    }
}

impl Drop for KsmOwner {
    fn drop(&mut self) {
        match self.restore() {
            Ok(()) => log::debug!("host KSM knobs restored"),
            Err(e) => log::error!("host KSM knobs: {e}"),
        }
        lock(&OWNERS).retain(|owner| !Arc::ptr_eq(owner, &self.shared));
    }
}

impl Snapshot {
    fn original(&self, knob: Knob) -> Option<&str> {
        self.originals
            .iter()
            .find(|(k, _)| *k == knob)
            .map(|(_, value)| value.as_str())
    }

    /// The caller holds `io`.
    fn restore(&self) -> Result<()> {
        // While the kernel's advisor runs it owns pages_to_scan and refuses writes to it.
        let advisor_after = match self.original(Knob::AdvisorMode) {
            Some(mode) => Some(mode.to_owned()),
            None => self.sysfs.read_knob(Knob::AdvisorMode).ok().flatten(),
        };
        let advisor_runs = advisor_after.is_some_and(|mode| mode != "none");

        let mut failed = Vec::new();
        for (knob, original) in &self.originals {
            if *knob == Knob::PagesToScan && advisor_runs {
                continue;
            }
            if let Err(e) = self.restore_one(*knob, original) {
                failed.push(format!("{knob}: {}", error_chain(&e)));
            }
        }
        if failed.is_empty() {
            self.touched.store(0, Ordering::SeqCst);
            Ok(())
        } else {
            Err(Error::Restore(failed))
        }
    }

    fn restore_one(&self, knob: Knob, original: &str) -> Result<()> {
        // Compare with the current value rather than trusting `touched`: some writes change other
        // knobs as a side effect (advisor_mode resets pages_to_scan).
        let differs = match self.sysfs.read_knob(knob) {
            Ok(Some(current)) => current != original,
            Ok(None) | Err(_) => self.touched.load(Ordering::SeqCst) & knob.bit() != 0,
        };
        if !differs {
            return Ok(());
        }
        match self.sysfs.write_knob(knob, original) {
            Err(Error::Busy { .. }) if self.may_unmerge() => {
                // max_page_sharing and merge_across_nodes change only with no KSM pages. ksmd was
                // off before kvmerge, so the pages are kvmerge's doing: unmerge them all (run=2);
                // `run` itself is restored last.
                log::info!("unmerging all KSM pages to restore {knob}");
                self.sysfs.write_knob(Knob::Run, "2")?;
                self.sysfs.write_knob(knob, original)
            }
            result => result,
        }
    }

    /// Whether an unmerge is kvmerge's to do: only when ksmd did not run before kvmerge, since
    /// unmerging breaks every other user's sharing too.
    fn may_unmerge(&self) -> bool {
        matches!(self.original(Knob::Run), Some("0" | "2"))
    }
}

/// Takes the cross-process lock on `run`. flock works on sysfs files and dies with the process,
/// so a kvmerge that was SIGKILLed never leaves a stale lock behind.
fn lock_knobs(sysfs: &KsmSysfs) -> Result<File> {
    let path = sysfs.root.join(Knob::Run.file_name());
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(source) => return Err(Error::Lock { path, source }),
    };
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(file);
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(Error::OwnedElsewhere(sysfs.root.clone()))
    } else {
        Err(Error::Lock { path, source })
    }
}

/// Installs (once per process) a panic hook that restores every live owner's knobs and then runs
/// the previous hook. It runs in the panicking thread before unwinding, so it also covers panics in
/// threads nobody joins and builds with `panic = "abort"`. Call it early in `main`;
/// [`KsmOwner::take`] calls it too.
pub fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_after_panic();
            previous(info);
        }));
    });
}

fn restore_after_panic() {
    // try_lock, never lock: the panic may have happened while this very thread held the lock.
    let Some(owners) = try_lock_briefly(&OWNERS) else {
        log::error!("panic: KSM owner registry busy; host KSM knobs not restored");
        return;
    };
    let owners = owners.clone();
    for owner in owners {
        let Some(_io) = try_lock_briefly(&owner.io) else {
            log::error!(
                "panic: a KSM knob write is in progress; knobs in {} not restored",
                owner.sysfs.root.display()
            );
            continue;
        };
        match owner.restore() {
            Ok(()) => log::warn!("panic: host KSM knobs restored"),
            Err(e) => log::error!("panic: host KSM knobs: {e}"),
        }
    }
}

/// Locks, ignoring poisoning: the guarded data stays valid whatever a panicking holder was doing.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// try_lock for up to ~100 ms: long enough for another thread to finish a sysfs write, short enough
/// when the panicking thread itself holds the lock.
fn try_lock_briefly<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    for _ in 0..100 {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    None
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One process's KSM figures, from /proc/PID/ksm_stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessKsm {
    /// Pages KSM tracks (has looked at) in this process.
    pub rmap_items: u64,
    /// Pages merged with the kernel's zero page.
    pub zero_pages: u64,
    /// Pages mapped to KSM pages, kept copies included.
    pub merging_pages: u64,
    /// Bytes saved minus KSM's metadata for this process; may be negative.
    pub process_profit: i64,
    /// prctl(PR_SET_MEMORY_MERGE) in effect; `None` on kernels that do not say.
    pub merge_any: Option<bool>,
    /// Any of the process's memory is registered with KSM; `None` on kernels that do not say.
    pub mergeable: Option<bool>,
}

/// Reads /proc/self (or /proc/PID) ksm_stat, and ksm_merging_pages on kernels whose ksm_stat
/// lacks that line.
pub fn read_process_ksm(pid: Option<u32>) -> Result<ProcessKsm> {
    let dir = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    };
    let path = dir.join("ksm_stat");
    let text = fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let (mut stat, has_merging) = parse_ksm_stat(&text).map_err(|line| Error::Parse {
        path: path.clone(),
        text: line,
    })?;
    if !has_merging {
        let path = dir.join("ksm_merging_pages");
        let text = fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        stat.merging_pages = text.trim().parse().map_err(|_| Error::Parse {
            path,
            text: text.trim().to_owned(),
        })?;
    }
    Ok(stat)
}

/// Parses ksm_stat ("ksm_rmap_items 12", "ksm_merge_any: no", ...). Unknown lines are skipped for
/// newer kernels. Returns whether a ksm_merging_pages line was present; a malformed line is the error.
pub(crate) fn parse_ksm_stat(text: &str) -> std::result::Result<(ProcessKsm, bool), String> {
    fn number<T: FromStr>(line: &str, value: &str) -> std::result::Result<T, String> {
        value.parse().map_err(|_| line.to_owned())
    }
    fn yes_no(line: &str, value: &str) -> std::result::Result<Option<bool>, String> {
        match value {
            "yes" => Ok(Some(true)),
            "no" => Ok(Some(false)),
            _ => Err(line.to_owned()),
        }
    }

    let mut stat = ProcessKsm::default();
    let mut has_merging = false;
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim();
        match key.trim_end_matches(':') {
            "ksm_rmap_items" => stat.rmap_items = number(line, value)?,
            "ksm_zero_pages" => stat.zero_pages = number(line, value)?,
            "ksm_merging_pages" => {
                stat.merging_pages = number(line, value)?;
                has_merging = true;
            }
            "ksm_process_profit" => stat.process_profit = number(line, value)?,
            "ksm_merge_any" => stat.merge_any = yes_no(line, value)?,
            "ksm_mergeable" => stat.mergeable = yes_no(line, value)?,
            _ => {}
        }
    }
    Ok((stat, has_merging))
}

/// The fields of /proc/PID/stat that finding and timing ksmd needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TaskStat<'a> {
    comm: &'a str,
    flags: u64,
    pub(crate) utime: u64,
    pub(crate) stime: u64,
}

/// PF_KTHREAD in the task flags: a kernel thread, which a user process named "ksmd" is not.
const PF_KTHREAD: u64 = 0x0020_0000;

impl TaskStat<'_> {
    pub(crate) fn is_ksmd(&self) -> bool {
        self.comm == "ksmd" && self.flags & PF_KTHREAD != 0
    }
}

/// Parses "PID (COMM) STATE PPID ...". COMM may contain spaces and parentheses, so the fields are
/// counted from the last ')'.
pub(crate) fn parse_task_stat(text: &str) -> Option<TaskStat<'_>> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    // After ')': state(3) ppid pgrp session tty_nr tpgid flags(9) minflt cminflt majflt cmajflt
    // utime(14) stime(15), numbered as in proc(5).
    let mut fields = text.get(close + 1..)?.split_whitespace();
    let flags = fields.nth(6)?.parse().ok()?;
    let utime = fields.nth(4)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some(TaskStat {
        comm,
        flags,
        utime,
        stime,
    })
}

/// ksmd's pid, found once: the kernel thread never exits. `None` if KSM is absent or ksmd is not
/// visible (another pid namespace).
fn ksmd_pid() -> Option<u32> {
    static PID: OnceLock<Option<u32>> = OnceLock::new();
    *PID.get_or_init(|| {
        fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let text = fs::read_to_string(entry.path().join("stat")).ok()?;
            parse_task_stat(&text)?.is_ksmd().then_some(pid)
        })
    })
}

/// CPU time ksmd has used since boot (user + system); `None` if ksmd cannot be seen.
pub fn ksmd_cpu_time() -> Option<Duration> {
    let pid = ksmd_pid()?;
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let stat = parse_task_stat(&text)?;
    if !stat.is_ksmd() {
        return None;
    }
    ticks_to_duration(stat.utime.checked_add(stat.stime)?, clock_ticks()?)
}

/// CPU time (user + system) of one thread of this process, by Linux thread id. The merge thread
/// reads its vCPU threads' time this way to tell busy guests from idle ones.
pub fn thread_cpu_time(tid: i32) -> Option<Duration> {
    let text = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let stat = parse_task_stat(&text)?;
    ticks_to_duration(stat.utime.checked_add(stat.stime)?, clock_ticks()?)
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0)
}

pub(crate) fn ticks_to_duration(ticks: u64, hz: u64) -> Option<Duration> {
    let nanos = (ticks % hz).checked_mul(1_000_000_000)? / hz;
    Some(Duration::new(ticks / hz, u32::try_from(nanos).ok()?))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The host's KSM state for `kvmerge ksm`: presence, run state, every knob and counter, derived
/// figures, and whether this process may change the knobs.
pub fn report(sysfs: &KsmSysfs) -> Result<String> {
    let root = sysfs.root.display();
    let control = match sysfs.writable() {
        Ok(()) => "kvmerge may change the knobs (they are restored on exit)".to_owned(),
        Err(why) => format!("kvmerge will not change the knobs: {why}"),
    };
    if !sysfs.exists() {
        return Ok(format!(
            "KSM: not available (no {root}): kernel built without CONFIG_KSM\nKnob control: {control}\n"
        ));
    }

    let run = sysfs.read_knob(Knob::Run)?;
    let state = match run.as_deref() {
        Some("0") => "stopped",
        Some("1") => "running",
        Some("2") => "stopped, all pages unmerged",
        _ => "unknown",
    };
    let mut lines = vec![
        format!(
            "KSM: {root}: {state} (run={})",
            run.as_deref().unwrap_or("?")
        ),
        format!("Knob control: {control}"),
        "Knobs:".to_owned(),
    ];
    for knob in Knob::ALL {
        let value = sysfs.read_knob(knob)?;
        let value = value.as_deref().unwrap_or("- (not on this kernel)");
        lines.push(format!("  {:<36}{value}", knob.file_name()));
    }

    let c = sysfs.read_counters()?;
    lines.push("Counters:".to_owned());
    let counters: [(&str, String); 11] = [
        ("pages_shared", c.pages_shared.to_string()),
        ("pages_sharing", c.pages_sharing.to_string()),
        ("pages_unshared", c.pages_unshared.to_string()),
        ("pages_volatile", c.pages_volatile.to_string()),
        ("full_scans", c.full_scans.to_string()),
        ("pages_scanned", c.pages_scanned.to_string()),
        ("pages_skipped", c.pages_skipped.to_string()),
        ("ksm_zero_pages", c.ksm_zero_pages.to_string()),
        ("general_profit", format!("{} bytes", c.general_profit)),
        ("stable_node_chains", c.stable_node_chains.to_string()),
        ("stable_node_dups", c.stable_node_dups.to_string()),
    ];
    for (name, value) in counters {
        lines.push(format!("  {name:<36}{value}"));
    }

    let page = page_size();
    let saved_mib = c.saved_pages() as f64 * page as f64 / f64::from(1 << 20);
    let ratio = match c.sharing_ratio() {
        Some(ratio) => format!("{ratio:.2} (pages_sharing / pages_shared)"),
        None => "- (no KSM pages)".to_owned(),
    };
    let ksmd = match ksmd_cpu_time() {
        Some(time) => format!("{:.2} s", time.as_secs_f64()),
        None => "- (ksmd not visible)".to_owned(),
    };
    lines.push("Derived:".to_owned());
    lines.push(format!(
        "  {:<36}{saved_mib:.1} MiB ((pages_sharing + ksm_zero_pages) x {page} bytes)",
        "saved memory"
    ));
    lines.push(format!("  {:<36}{ratio}", "sharing ratio"));
    lines.push(format!("  {:<36}{ksmd}", "ksmd CPU time"));
    lines.push(String::new());
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    struct Fixture(PathBuf);

    impl Fixture {
        fn new(tag: &str) -> Fixture {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir =
                std::env::temp_dir().join(format!("kvmerge-ksm-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            for (name, value) in HOST_LIKE {
                fs::write(dir.join(name), format!("{value}\n")).unwrap();
            }
            Fixture(dir)
        }

        fn sysfs(&self) -> KsmSysfs {
            KsmSysfs::at(&self.0)
        }

        fn get(&self, name: &str) -> String {
            fs::read_to_string(self.0.join(name))
                .unwrap()
                .trim()
                .to_owned()
        }

        fn put(&self, name: &str, value: &str) {
            fs::write(self.0.join(name), value).unwrap();
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.0.join(name)).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Owner tests run one at a time: a deliberate panic restores every registered owner,
    /// including those of tests running beside it.
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        lock(&SERIAL)
    }

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

    #[test]
    fn owner_restores_exactly_the_originals_of_changed_knobs() {
        let _serial = serial();
        let fx = Fixture::new("owner");
        let owner = KsmOwner::take(
            fx.sysfs(),
            &[
                Knob::Run,
                Knob::PagesToScan,
                Knob::SleepMillisecs,
                Knob::UseZeroPages,
            ],
        )
        .unwrap();
        // Snapshotted in restore order, run last.
        let order: Vec<Knob> = owner.shared.originals.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            order,
            [
                Knob::PagesToScan,
                Knob::SleepMillisecs,
                Knob::UseZeroPages,
                Knob::Run
            ]
        );
        assert_eq!(owner.original(Knob::SleepMillisecs), Some("20"));

        owner.set(Knob::Run, "1").unwrap();
        owner.set(Knob::PagesToScan, "5000").unwrap();
        owner.set(Knob::SleepMillisecs, "20").unwrap();
        assert_eq!(
            (fx.get("run"), fx.get("pages_to_scan")),
            ("1".into(), "5000".into())
        );
        // An untouched knob is never written: were it, writing the vanished file would fail.
        fx.remove("use_zero_pages");

        owner.restore().unwrap();
        assert_eq!(fx.get("run"), "0");
        assert_eq!(fx.get("pages_to_scan"), "100");
        assert_eq!(fx.get("sleep_millisecs"), "20");
        assert!(!fx.0.join("use_zero_pages").exists());

        // Idempotent, and the owner keeps working after a restore.
        owner.restore().unwrap();
        owner.set(Knob::SleepMillisecs, "5").unwrap();
        owner.restore().unwrap();
        assert_eq!(fx.get("sleep_millisecs"), "20");
    }

    #[test]
    fn owner_refuses_knobs_it_did_not_snapshot() {
        let _serial = serial();
        let fx = Fixture::new("unowned");
        fx.remove("smart_scan");
        let owner = KsmOwner::take(fx.sysfs(), &[Knob::Run, Knob::SmartScan]).unwrap();
        assert_eq!(owner.original(Knob::SmartScan), None);
        assert!(matches!(
            owner.set(Knob::SmartScan, "0"),
            Err(Error::NotOwned(Knob::SmartScan))
        ));
        assert!(matches!(
            owner.set(Knob::MaxPageSharing, "512"),
            Err(Error::NotOwned(Knob::MaxPageSharing))
        ));
        assert_eq!(fx.get("max_page_sharing"), "256");
    }

    #[test]
    fn drop_restores() {
        let _serial = serial();
        let fx = Fixture::new("drop");
        {
            let owner = KsmOwner::take(
                fx.sysfs(),
                &[Knob::Run, Knob::UseZeroPages, Knob::SmartScan],
            )
            .unwrap();
            owner.set(Knob::Run, "1").unwrap();
            owner.set(Knob::UseZeroPages, "1").unwrap();
            owner.set(Knob::SmartScan, "0").unwrap();
        }
        assert_eq!(fx.get("run"), "0");
        assert_eq!(fx.get("use_zero_pages"), "0");
        assert_eq!(fx.get("smart_scan"), "1");
        assert!(lock(&OWNERS).iter().all(|o| o.sysfs != fx.sysfs()));
    }

    #[test]
    fn ownership_is_exclusive_until_dropped() {
        let _serial = serial();
        let fx = Fixture::new("exclusive");
        let first = KsmOwner::take(fx.sysfs(), &[Knob::Run]).unwrap();
        assert!(matches!(
            KsmOwner::take(fx.sysfs(), &[Knob::Run]),
            Err(Error::AlreadyOwned(_))
        ));
        // Another path to the directory gets past the registry but not the flock, as another
        // process would.
        let alias = fx.0.with_extension("alias");
        let _ = fs::remove_file(&alias);
        std::os::unix::fs::symlink(&fx.0, &alias).unwrap();
        let second = KsmOwner::take(KsmSysfs::at(&alias), &[Knob::Run]);
        fs::remove_file(&alias).unwrap();
        assert!(matches!(second, Err(Error::OwnedElsewhere(_))));
        drop(first);
        KsmOwner::take(fx.sysfs(), &[Knob::Run]).unwrap();

        let missing = std::env::temp_dir().join("kvmerge-ksm-does-not-exist");
        assert!(matches!(
            KsmOwner::take(KsmSysfs::at(missing), &[Knob::Run]),
            Err(Error::Absent(_))
        ));
    }

    #[test]
    fn advisor_mode_brings_pages_to_scan_and_owns_it_while_running() {
        let _serial = serial();
        let fx = Fixture::new("advisor");
        fx.put("advisor_mode", "none [scan-time]\n");
        fx.put("pages_to_scan", "500\n");
        let owner = KsmOwner::take(fx.sysfs(), &[Knob::AdvisorMode, Knob::Run]).unwrap();
        assert_eq!(owner.original(Knob::AdvisorMode), Some("scan-time"));
        assert_eq!(owner.original(Knob::PagesToScan), Some("500"));

        owner.set(Knob::AdvisorMode, "none").unwrap();
        owner.set(Knob::PagesToScan, "9000").unwrap();
        owner.restore().unwrap();
        assert_eq!(fx.get("advisor_mode"), "scan-time");
        // The kernel's advisor sets pages_to_scan itself and refuses writes while it runs.
        assert_eq!(fx.get("pages_to_scan"), "9000");
    }

    #[test]
    fn panic_in_any_thread_restores_registered_knobs() {
        let _serial = serial();
        let fx = Fixture::new("panic");
        install_panic_hook();
        let owner = KsmOwner::take(fx.sysfs(), &[Knob::Run, Knob::PagesToScan]).unwrap();

        owner.set(Knob::PagesToScan, "9999").unwrap();
        owner.set(Knob::Run, "1").unwrap();
        let caught = std::panic::catch_unwind(|| panic!("simulated failure (expected by a test)"));
        assert!(caught.is_err());
        assert_eq!(
            (fx.get("run"), fx.get("pages_to_scan")),
            ("0".into(), "100".into())
        );

        // As a vCPU thread would: the hook runs in the panicking thread itself.
        owner.set(Knob::Run, "1").unwrap();
        let joined =
            std::thread::spawn(|| panic!("simulated vCPU panic (expected by a test)")).join();
        assert!(joined.is_err());
        assert_eq!(fx.get("run"), "0");
        drop(owner);
    }

    #[test]
    fn ksm_stat_parsing() {
        let text = "ksm_rmap_items 1024\nksm_zero_pages 7\nksm_merging_pages 300\n\
                    ksm_process_profit -512\nksm_merge_any: no\nksm_mergeable: yes\n";
        let (stat, has_merging) = parse_ksm_stat(text).unwrap();
        assert!(has_merging);
        assert_eq!(
            stat,
            ProcessKsm {
                rmap_items: 1024,
                zero_pages: 7,
                merging_pages: 300,
                process_profit: -512,
                merge_any: Some(false),
                mergeable: Some(true),
            }
        );

        // An older kernel: rmap items only, merging pages in their own file.
        let (stat, has_merging) = parse_ksm_stat("ksm_rmap_items 3\nsomething_new 1\n").unwrap();
        assert!(!has_merging);
        assert_eq!(stat.rmap_items, 3);
        assert_eq!((stat.merge_any, stat.mergeable), (None, None));

        assert_eq!(
            parse_ksm_stat("ksm_rmap_items many\n").unwrap_err(),
            "ksm_rmap_items many"
        );
        assert!(parse_ksm_stat("ksm_mergeable: maybe\n").is_err());
    }

    #[test]
    fn own_ksm_stat_reads_where_the_kernel_has_it() {
        if !Path::new("/proc/self/ksm_stat").exists() {
            println!("skipping: this kernel has no /proc/self/ksm_stat");
            return;
        }
        let stat = read_process_ksm(None).unwrap();
        assert!(stat.mergeable.is_some());
    }

    #[test]
    fn task_stat_parsing() {
        let ksmd = "37 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 12 34 0 0 25 5 1 0 27 0 0";
        let stat = parse_task_stat(ksmd).unwrap();
        assert_eq!((stat.comm, stat.utime, stat.stime), ("ksmd", 12, 34));
        assert!(stat.is_ksmd());

        let odd = "4242 (a) (b) c) R 1 4242 4242 0 -1 4194304 100 0 0 0 500 60 0 0 20 0 1 0";
        let stat = parse_task_stat(odd).unwrap();
        assert_eq!((stat.comm, stat.flags), ("a) (b) c", 4_194_304));
        assert_eq!((stat.utime, stat.stime), (500, 60));

        // A user process that calls itself ksmd is not the kernel thread.
        let fake = "99 (ksmd) S 1 99 99 0 -1 4194304 0 0 0 0 1 1 0 0 20 0 1 0";
        assert!(!parse_task_stat(fake).unwrap().is_ksmd());

        assert_eq!(parse_task_stat("37 (ksmd) S 2 0"), None);
        assert_eq!(parse_task_stat("no parentheses"), None);
    }

    #[test]
    fn ticks_convert_to_durations() {
        assert_eq!(
            ticks_to_duration(250, 100),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            ticks_to_duration(1, 3),
            Some(Duration::from_nanos(333_333_333))
        );
        // Read-only on the real host: ksmd exists where KSM does (unless in another pid namespace).
        let _ = ksmd_cpu_time();
    }

    #[test]
    fn report_of_a_fixture_and_of_a_host_without_ksm() {
        let fx = Fixture::new("report");
        let text = report(&fx.sysfs()).unwrap();
        assert!(text.starts_with("KSM: "), "{text}");
        assert!(text.contains(": stopped (run=0)"), "{text}");
        for knob in Knob::ALL {
            assert!(text.contains(knob.file_name()), "{knob} missing:\n{text}");
        }
        assert!(text.contains("general_profit"));
        assert!(text.contains("-4096 bytes"));
        assert!(
            text.contains("3.00 (pages_sharing / pages_shared)"),
            "{text}"
        );
        let mib = 35.0 * page_size() as f64 / f64::from(1 << 20);
        assert!(text.contains(&format!("{mib:.1} MiB")), "{text}");

        fx.remove("merge_across_nodes");
        assert!(
            report(&fx.sysfs())
                .unwrap()
                .contains("- (not on this kernel)")
        );

        let missing = KsmSysfs::at(std::env::temp_dir().join("kvmerge-ksm-does-not-exist"));
        let text = report(&missing).unwrap();
        assert!(text.starts_with("KSM: not available"), "{text}");
        assert!(text.contains("KSM not built into this kernel"), "{text}");
    }

    /// The one test that writes the real /sys/kernel/mm/ksm: only as root with KSM present.
    #[test]
    fn host_knobs_are_restored_exactly() {
        let _serial = serial();
        let host = KsmSysfs::host();
        if let Err(why) = host.writable() {
            println!("skipping host KSM test: {why}");
            return;
        }
        if host
            .read_knob(Knob::AdvisorMode)
            .unwrap()
            .is_some_and(|mode| mode != "none")
        {
            println!("skipping host KSM test: the kernel's advisor owns pages_to_scan");
            return;
        }
        let pages = host.read_knob(Knob::PagesToScan).unwrap().unwrap();
        let sleep = host.read_knob(Knob::SleepMillisecs).unwrap().unwrap();
        {
            let owner =
                match KsmOwner::take(host.clone(), &[Knob::PagesToScan, Knob::SleepMillisecs]) {
                    Ok(owner) => owner,
                    Err(Error::OwnedElsewhere(_)) => {
                        println!("skipping host KSM test: another kvmerge owns the knobs");
                        return;
                    }
                    Err(e) => panic!("{e}"),
                };
            let new_pages = (pages.parse::<u64>().unwrap() + 1234).to_string();
            let new_sleep = (sleep.parse::<u64>().unwrap() + 7).to_string();
            owner.set(Knob::PagesToScan, &new_pages).unwrap();
            owner.set(Knob::SleepMillisecs, &new_sleep).unwrap();
            assert_eq!(host.read_knob(Knob::PagesToScan).unwrap(), Some(new_pages));
            assert_eq!(
                host.read_knob(Knob::SleepMillisecs).unwrap(),
                Some(new_sleep)
            );
        }
        assert_eq!(host.read_knob(Knob::PagesToScan).unwrap(), Some(pages));
        assert_eq!(host.read_knob(Knob::SleepMillisecs).unwrap(), Some(sleep));
    }
}
