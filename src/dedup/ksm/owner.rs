//! Who steers the host's KSM, and who puts it back: ownership, hand-over and restore (the design
//! is in the module docs of [`crate::dedup::ksm`]).

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, TryLockError};
use std::time::Duration;

use crate::dedup::ksm::journal::{Journal, RunDir, flock};
use crate::dedup::ksm::sysfs::RESTORE_ORDER;
use crate::dedup::ksm::{Error, Knob, KsmSysfs, Result, error_chain};
use crate::sync::lock;

/// Exclusive, restoring ownership of the knobs kvmerge touches.
///
/// Exclusive within the process (one owner per directory) and across processes: the owner holds
/// an flock on the `run` file, so a second kvmerge neither snapshots the first one's boosted values
/// nor fights it over the knobs. Its originals are in the journal before the first write. When it
/// goes, it restores them if it is the last kvmerge using KSM, and otherwise hands the knobs over
/// as they are. Share it with the merge thread through an `Arc`.
pub struct KsmOwner {
    shared: Arc<Snapshot>,
    run_dir: RunDir,
    /// The flock on `run`; closed after `Drop` has restored or handed over.
    owner_lock: Option<File>,
    /// The shared flock on `ksm.users`: this process uses KSM.
    users: Option<File>,
    /// The pid of the kvmerge whose journal this owner adopted, if it did.
    adopted_from: Option<u32>,
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

/// What [`join`] made of this process.
pub enum Joined {
    Owner(KsmOwner),
    /// Another process steers; this one waits to take over.
    Waiting(KsmWaiter),
}

/// Registers this process as a user of the host's KSM and takes the knobs if nobody steers them.
/// Asking for `advisor_mode` also snapshots `pages_to_scan`, which the kernel resets whenever the
/// advisor mode changes. Installs the panic hook if it is not yet.
pub fn join(sysfs: KsmSysfs, run_dir: RunDir, knobs: &[Knob]) -> Result<Joined> {
    if !sysfs.exists() {
        return Err(Error::Absent(sysfs.root().to_owned()));
    }
    install_panic_hook();
    // A user before anything else: a leaving owner that sees us hands over instead of restoring.
    let users = run_dir.join_users()?;
    let mut waiter = KsmWaiter {
        sysfs,
        run_dir,
        knobs: knobs.to_vec(),
        users: Some(users),
    };
    let guard = waiter.run_dir.guard(true)?.ok_or_else(|| Error::Lock {
        path: waiter.run_dir.root().join("ksm.lock"),
        source: std::io::ErrorKind::WouldBlock.into(),
    })?;
    match waiter.try_own(guard)? {
        Some(owner) => Ok(Joined::Owner(owner)),
        None => Ok(Joined::Waiting(waiter)),
    }
}

impl KsmOwner {
    /// [`join`]s and requires ownership: [`Error::OwnedElsewhere`] when another process steers,
    /// [`Error::AlreadyOwned`] when this one already does.
    pub fn take(sysfs: KsmSysfs, run_dir: RunDir, knobs: &[Knob]) -> Result<KsmOwner> {
        if lock(&OWNERS).iter().any(|owner| owner.sysfs == sysfs) {
            return Err(Error::AlreadyOwned(sysfs.root().to_owned()));
        }
        let root = sysfs.root().to_owned();
        match join(sysfs, run_dir, knobs)? {
            Joined::Owner(owner) => Ok(owner),
            Joined::Waiting(_) => Err(Error::OwnedElsewhere(root)),
        }
    }

    pub fn sysfs(&self) -> &KsmSysfs {
        &self.shared.sysfs
    }

    /// The pid of the kvmerge whose journaled originals this owner took over, if it did.
    pub fn adopted_from(&self) -> Option<u32> {
        self.adopted_from
    }

    /// The value `knob` had before any kvmerge changed it; `None` if it was not snapshotted.
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
    /// again by the next `restore`, the panic hook or `Drop`. The journal stays until `Drop`.
    pub fn restore(&self) -> Result<()> {
        let _io = lock(&self.shared.io);
        self.shared.restore()
    }

    /// Gives the knobs up: restores them and removes the journal when no other kvmerge uses KSM,
    /// otherwise leaves knobs and journal to the one that takes over.
    fn leave(&mut self) {
        let guard = self.run_dir.guard(true);
        if let Err(e) = &guard {
            log::error!("host KSM: {e}; restoring the knobs without it");
        }
        drop(self.users.take());
        let others = self.run_dir.has_users().unwrap_or_else(|e| {
            log::error!("host KSM: {e}; restoring the knobs");
            false
        });
        if others {
            log::info!(
                "another kvmerge uses host KSM: leaving the knobs to it (originals kept in {})",
                self.run_dir.journal_path().display()
            );
        } else {
            let restored = self.restore().and_then(|()| Journal::remove(&self.run_dir));
            match restored {
                Ok(()) => log::debug!("host KSM knobs restored"),
                // The journal stays: the next kvmerge (or `kvmerge ksm --restore`) retries.
                Err(e) => log::error!("host KSM knobs: {e}"),
            }
        }
        drop(self.owner_lock.take());
        drop(guard);
    }
}

impl Drop for KsmOwner {
    fn drop(&mut self) {
        self.leave();
        lock(&OWNERS).retain(|owner| !Arc::ptr_eq(owner, &self.shared));
    }
}

/// A kvmerge that uses the host's KSM while another one steers it.
pub struct KsmWaiter {
    sysfs: KsmSysfs,
    run_dir: RunDir,
    knobs: Vec<Knob>,
    /// The shared flock on `ksm.users`; moved into the owner on take-over.
    users: Option<File>,
}

impl KsmWaiter {
    /// The pid of the kvmerge that steers now, as its journal says (if it has written one and
    /// still runs).
    pub fn steered_by(&self) -> Option<u32> {
        Journal::read(&self.run_dir)
            .ok()
            .flatten()
            .filter(Journal::writer_alive)
            .map(|j| j.pid)
    }

    /// Takes the knobs if their owner has gone, adopting its journaled originals. Never waits: when
    /// another process is changing hands, it says no and the caller asks again later.
    pub fn take_over(&mut self) -> Result<Option<KsmOwner>> {
        if self.users.is_none() {
            return Ok(None);
        }
        match self.run_dir.guard(false)? {
            Some(guard) => self.try_own(guard),
            None => Ok(None),
        }
    }

    /// With the guard held: takes the `run` flock and builds the owner, or None if it is held.
    fn try_own(&mut self, guard: File) -> Result<Option<KsmOwner>> {
        let Some(owner_lock) = lock_knobs(&self.sysfs)? else {
            return Ok(None);
        };
        // The originals: the journal's if a previous owner left one (it handed over, or it died),
        // never the values it boosted; else the knobs as they are now.
        let journal = Journal::read(&self.run_dir)?;
        if let Some(j) = journal.as_ref().filter(|j| j.sysfs != self.sysfs.root()) {
            return Err(Error::Journal {
                path: self.run_dir.journal_path(),
                text: format!("it is for {}", j.sysfs.display()),
            });
        }
        let journaled = journal.as_ref().map(Journal::knobs).unwrap_or_default();
        let mut wanted = self.knobs.iter().fold(0, |bits, knob| bits | knob.bit());
        if wanted & Knob::AdvisorMode.bit() != 0 {
            wanted |= Knob::PagesToScan.bit();
        }
        // Journaled knobs are kept even if this process would not touch them: they are still to
        // be restored.
        for (knob, _) in &journaled {
            wanted |= knob.bit();
        }
        let mut originals = Vec::new();
        for knob in RESTORE_ORDER {
            if wanted & knob.bit() == 0 {
                continue;
            }
            let value = match journaled.iter().find(|(k, _)| *k == knob) {
                Some((_, value)) => Some(value.clone()),
                None => self.sysfs.read_knob(knob)?,
            };
            if let Some(value) = value {
                originals.push((knob, value));
            }
        }
        // Journaled before any write.
        Journal::mine(self.sysfs.root(), &originals).write(&self.run_dir)?;
        let shared = Arc::new(Snapshot {
            sysfs: self.sysfs.clone(),
            originals,
            // Adopted knobs may all differ from their originals.
            touched: AtomicU32::new(if journal.is_some() { u32::MAX } else { 0 }),
            io: Mutex::new(()),
        });
        lock(&OWNERS).push(Arc::clone(&shared));
        let owner = KsmOwner {
            shared,
            run_dir: self.run_dir.clone(),
            owner_lock: Some(owner_lock),
            users: self.users.take(),
            adopted_from: journal.map(|j| j.pid),
        };
        drop(guard);
        Ok(Some(owner))
    }
}

impl Drop for KsmWaiter {
    fn drop(&mut self) {
        if self.users.take().is_none() {
            return; // became the owner
        }
        // The owner left (handed over, or died) and nobody took over: the last user out restores.
        // That is the hand-over working as designed, not a repair worth a warning.
        match repair_stale(&self.run_dir) {
            Ok(Repair::Restored(j)) => log::info!(
                "host KSM settings restored: kvmerge pid {} left them to this process, the last \
                 one using KSM",
                j.pid
            ),
            Ok(_) => {}
            Err(e) => log::error!("host KSM: {e}"),
        }
    }
}

/// What [`repair_stale`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Repair {
    /// No journal: the knobs are as the host had them (as far as kvmerge knows).
    Nothing,
    /// A kvmerge uses KSM (`Some(pid)` if it is the journal's writer): nothing to repair.
    InUse(Option<u32>),
    /// A journal left by an owner that is gone, with nobody to take over: restored and removed.
    Restored(Journal),
}

impl Journal {
    /// The one line that says a stale journal was restored.
    pub fn restored_line(&self) -> String {
        format!(
            "restored host KSM settings left by kvmerge pid {} (killed?): {}",
            self.pid,
            self.values()
        )
    }
}

/// What the journal of `run_dir` means now.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalState {
    None,
    /// The owner runs (its `run` flock is held), or other users wait to take over.
    InUse(Journal),
    /// Nobody holds the knobs or uses KSM: the originals are waiting to be restored.
    Stale(Journal),
}

/// Classifies the journal; the caller holds the guard and is not a user itself.
fn journal_state(run_dir: &RunDir) -> Result<JournalState> {
    let Some(journal) = Journal::read(run_dir)? else {
        return Ok(JournalState::None);
    };
    let sysfs = KsmSysfs::at(&journal.sysfs);
    let owner_free = match lock_knobs(&sysfs) {
        Ok(lock) => lock.is_some(),
        // The directory of a journal is gone (a test fixture): nothing left to restore into.
        Err(_) if !sysfs.exists() => true,
        Err(e) => return Err(e),
    };
    let alive = journal.writer_alive() && journal.pid != std::process::id();
    if owner_free && !alive && !run_dir.has_users()? {
        Ok(JournalState::Stale(journal))
    } else {
        Ok(JournalState::InUse(journal))
    }
}

/// Whether there is a journal; an error when that cannot be known (not root).
fn journal_exists(run_dir: &RunDir) -> Result<bool> {
    let path = run_dir.journal_path();
    path.try_exists()
        .map_err(|source| Error::Read { path, source })
}

/// The journal's state for a report, without waiting and without creating anything.
pub fn inspect(run_dir: &RunDir) -> Result<JournalState> {
    if !journal_exists(run_dir)? {
        return Ok(JournalState::None);
    }
    match run_dir.guard(false)? {
        Some(_guard) => journal_state(run_dir),
        None => Ok(Journal::read(run_dir)?.map_or(JournalState::None, JournalState::InUse)),
    }
}

/// Restores the originals of a journal whose owner is gone while no kvmerge uses KSM, then removes
/// the journal. Called on start (`kvmerge run`, `kvmerge ksm`), by `kvmerge ksm --restore`, and
/// by the last waiting process on its way out.
pub fn repair_stale(run_dir: &RunDir) -> Result<Repair> {
    if !journal_exists(run_dir)? {
        return Ok(Repair::Nothing);
    }
    let _guard = run_dir.guard(true)?;
    let journal = match journal_state(run_dir)? {
        JournalState::None => return Ok(Repair::Nothing),
        JournalState::InUse(j) => {
            return Ok(Repair::InUse(j.writer_alive().then_some(j.pid)));
        }
        JournalState::Stale(j) => j,
    };
    let sysfs = KsmSysfs::at(&journal.sysfs);
    if sysfs.exists() {
        // Held while restoring, so that no kvmerge takes the knobs half way.
        let Some(_owner_lock) = lock_knobs(&sysfs)? else {
            return Ok(Repair::InUse(None));
        };
        let snapshot = Snapshot {
            sysfs,
            originals: journal.knobs(),
            touched: AtomicU32::new(u32::MAX),
            io: Mutex::new(()),
        };
        snapshot.restore()?;
    }
    Journal::remove(run_dir)?;
    Ok(Repair::Restored(journal))
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

/// Takes the cross-process lock on `run` (None if another process holds it). flock works on
/// sysfs files and dies with the process, so a kvmerge that was SIGKILLed never leaves a stale lock
/// behind.
fn lock_knobs(sysfs: &KsmSysfs) -> Result<Option<File>> {
    let path = sysfs.root().join(Knob::Run.file_name());
    let file = File::open(&path).map_err(|source| Error::Lock {
        path: path.clone(),
        source,
    })?;
    let taken = flock(&file, libc::LOCK_EX | libc::LOCK_NB)
        .map_err(|source| Error::Lock { path, source })?;
    Ok(taken.then_some(file))
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
                owner.sysfs.root().display()
            );
            continue;
        };
        match owner.restore() {
            Ok(()) => log::warn!("panic: host KSM knobs restored"),
            Err(e) => log::error!("panic: host KSM knobs: {e}"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::ksm::fixture::{Fixture, serial};
    use std::fs;

    #[test]
    fn owner_restores_exactly_the_originals_of_changed_knobs() {
        let _serial = serial();
        let fx = Fixture::new("owner");
        let owner = KsmOwner::take(
            fx.sysfs(),
            fx.run_dir(),
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
        let owner =
            KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::Run, Knob::SmartScan]).unwrap();
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
                fx.run_dir(),
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
        let first = KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::Run]).unwrap();
        assert!(matches!(
            KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::Run]),
            Err(Error::AlreadyOwned(_))
        ));
        // Another path to the directory gets past the registry but not the flock, as another
        // process would.
        let alias = fx.0.with_extension("alias");
        let _ = fs::remove_file(&alias);
        std::os::unix::fs::symlink(&fx.0, &alias).unwrap();
        let second = KsmOwner::take(KsmSysfs::at(&alias), fx.run_dir(), &[Knob::Run]);
        fs::remove_file(&alias).unwrap();
        assert!(matches!(second, Err(Error::OwnedElsewhere(_))));
        drop(first);
        KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::Run]).unwrap();

        let missing = std::env::temp_dir().join("kvmerge-ksm-does-not-exist");
        assert!(matches!(
            KsmOwner::take(KsmSysfs::at(missing), fx.run_dir(), &[Knob::Run]),
            Err(Error::Absent(_))
        ));
    }

    #[test]
    fn advisor_mode_brings_pages_to_scan_and_owns_it_while_running() {
        let _serial = serial();
        let fx = Fixture::new("advisor");
        fx.put("advisor_mode", "none [scan-time]\n");
        fx.put("pages_to_scan", "500\n");
        let owner =
            KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::AdvisorMode, Knob::Run]).unwrap();
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
        let owner =
            KsmOwner::take(fx.sysfs(), fx.run_dir(), &[Knob::Run, Knob::PagesToScan]).unwrap();

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
            let owner = match KsmOwner::take(
                host.clone(),
                RunDir::host(),
                &[Knob::PagesToScan, Knob::SleepMillisecs],
            ) {
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

    #[test]
    fn journal_comes_before_the_first_write_and_goes_after_the_restore() {
        let _serial = serial();
        let fx = Fixture::new("journal-owner");
        let dir = fx.run_dir();
        let owner =
            KsmOwner::take(fx.sysfs(), dir.clone(), &[Knob::Run, Knob::PagesToScan]).unwrap();
        let journal = Journal::read(&dir).unwrap().expect("journaled on take");
        assert_eq!(journal.pid, std::process::id());
        assert_eq!(journal.values(), "run=0 pages_to_scan=100");
        owner.set(Knob::Run, "1").unwrap();
        owner.set(Knob::PagesToScan, "5000").unwrap();
        // Another process sees a live owner: nothing to repair.
        assert_eq!(
            repair_stale(&dir).unwrap(),
            Repair::InUse(Some(std::process::id()))
        );
        drop(owner);
        assert_eq!(
            (fx.get("run"), fx.get("pages_to_scan")),
            ("0".into(), "100".into())
        );
        assert_eq!(Journal::read(&dir).unwrap(), None);
        assert_eq!(repair_stale(&dir).unwrap(), Repair::Nothing);
    }

    #[test]
    fn a_journal_left_by_a_killed_owner_is_restored_once() {
        let _serial = serial();
        let fx = Fixture::new("killed");
        let dir = fx.run_dir();
        // As a SIGKILLed owner leaves it: boosted knobs, its journal, no flock.
        let mut journal = Journal::mine(
            &fx.0,
            &[
                (Knob::PagesToScan, "100".into()),
                (Knob::SleepMillisecs, "20".into()),
                (Knob::Run, "0".into()),
            ],
        );
        journal.start_time += 1; // the pid was reused
        journal.write(&dir).unwrap();
        fx.put("run", "1\n");
        fx.put("pages_to_scan", "5000\n");
        fx.put("sleep_millisecs", "10\n");
        assert!(matches!(inspect(&dir).unwrap(), JournalState::Stale(_)));

        let Repair::Restored(j) = repair_stale(&dir).unwrap() else {
            panic!("not restored");
        };
        assert!(
            j.restored_line()
                .contains("run=0 pages_to_scan=100 sleep_millisecs=20")
        );
        assert_eq!(
            (
                fx.get("run"),
                fx.get("pages_to_scan"),
                fx.get("sleep_millisecs")
            ),
            ("0".into(), "100".into(), "20".into())
        );
        assert_eq!(Journal::read(&dir).unwrap(), None);
        assert_eq!(repair_stale(&dir).unwrap(), Repair::Nothing);
    }

    #[test]
    fn a_new_owner_adopts_the_journal_never_the_boosted_values() {
        let _serial = serial();
        let fx = Fixture::new("adopt");
        let dir = fx.run_dir();
        let mut journal = Journal::mine(&fx.0, &[(Knob::Run, "0".into())]);
        journal.pid = u32::MAX;
        journal.write(&dir).unwrap();
        fx.put("run", "1\n");
        let owner =
            KsmOwner::take(fx.sysfs(), dir.clone(), &[Knob::Run, Knob::PagesToScan]).unwrap();
        assert_eq!(owner.adopted_from(), Some(u32::MAX));
        assert_eq!(owner.original(Knob::Run), Some("0"));
        assert_eq!(
            Journal::read(&dir).unwrap().unwrap().pid,
            std::process::id()
        );
        drop(owner);
        assert_eq!(fx.get("run"), "0");
    }

    /// Two processes, as flocks on separate open files see them.
    #[test]
    fn the_owner_hands_over_and_the_last_user_restores() {
        let _serial = serial();
        let fx = Fixture::new("handover");
        let dir = fx.run_dir();
        let knobs = [Knob::Run, Knob::PagesToScan];
        let Joined::Owner(a) = join(fx.sysfs(), dir.clone(), &knobs).unwrap() else {
            panic!("first is the owner");
        };
        a.set(Knob::Run, "1").unwrap();
        a.set(Knob::PagesToScan, "5000").unwrap();
        let Joined::Waiting(mut b) = join(fx.sysfs(), dir.clone(), &knobs).unwrap() else {
            panic!("second waits");
        };
        assert_eq!(b.steered_by(), Some(std::process::id()));
        assert!(b.take_over().unwrap().is_none(), "the owner is still there");

        drop(a);
        assert_eq!(fx.get("run"), "1", "handed over, not restored");
        assert!(Journal::read(&dir).unwrap().is_some());
        assert!(matches!(inspect(&dir).unwrap(), JournalState::InUse(_)));

        let b = b
            .take_over()
            .unwrap()
            .expect("takes over once the owner left");
        assert_eq!(b.original(Knob::Run), Some("0"));
        assert_eq!(b.original(Knob::PagesToScan), Some("100"));
        b.set(Knob::PagesToScan, "700").unwrap();
        drop(b);
        assert_eq!(
            (fx.get("run"), fx.get("pages_to_scan")),
            ("0".into(), "100".into())
        );
        assert_eq!(Journal::read(&dir).unwrap(), None);
    }

    #[test]
    fn a_waiter_left_alone_restores_on_its_way_out() {
        let _serial = serial();
        let fx = Fixture::new("alone");
        let dir = fx.run_dir();
        let knobs = [Knob::Run];
        // The owner's flock is held by someone that is not a kvmerge user (as a test helper does).
        let a = KsmOwner::take(fx.sysfs(), dir.clone(), &knobs).unwrap();
        a.set(Knob::Run, "1").unwrap();
        let Joined::Waiting(b) = join(fx.sysfs(), dir.clone(), &knobs).unwrap() else {
            panic!("second waits");
        };
        drop(a); // hands over to b
        assert_eq!(fx.get("run"), "1");
        let mut journal = Journal::read(&dir).unwrap().unwrap();
        journal.pid = u32::MAX; // as if a killed process had written it
        journal.write(&dir).unwrap();
        drop(b);
        assert_eq!(fx.get("run"), "0");
        assert_eq!(Journal::read(&dir).unwrap(), None);
    }
}
