//! The host's KSM: its counters and knobs ([`sysfs`]), who steers them and how they are put back
//! ([`owner`], [`journal`]), and the `kvmerge ksm` report ([`report`]).
//!
//! /sys/kernel/mm/ksm is one pool for the whole host. kvmerge changes its knobs only as root, and
//! leaves them exactly as it found them:
//!
//! - **Journal first.** Before the first write, the originals of every knob kvmerge may touch go
//!   to /run/kvmerge/ksm.json (directory 0700, written atomically), with the owner's pid and start
//!   time. It is removed after a complete restore.
//! - **Every catchable way out restores**: `Drop` of the owner on a normal end, an error or a
//!   signal the control loop turns into a shutdown; the hook of [`install_panic_hook`] on a panic
//!   in any thread.
//! - **Repair on start.** SIGKILL or the OOM killer leave the journal. The next `kvmerge run` or
//!   `kvmerge ksm` restores it first and says so in one line; `kvmerge ksm --restore` does it by
//!   hand. A journal is stale when its owner is gone (pid gone, or alive with another start
//!   time; its flock released) and no kvmerge uses KSM.
//!
//! **Several kvmerge processes share the pool.** Every kvmerge that uses KSM holds a shared flock on
//! /run/kvmerge/ksm.users for its lifetime. One of them, the owner, holds an exclusive flock on the
//! sysfs `run` file and steers. The others wait: they say once that another kvmerge steers and
//! that they take over when it leaves, and their merge thread tries to take the `run` flock each
//! tick. An owner that leaves while other users remain hands over: it restores nothing, the
//! journal stays, and the first waiter that gets the flock adopts the journal's originals (never
//! the boosted values as originals), rewrites the journal with its own pid and steers. The last
//! user out restores and removes the journal. Every change of hands happens under an exclusive
//! flock on /run/kvmerge/ksm.lock, and a newcomer registers as a user before it asks for that
//! lock, so "am I the last user?" and a newcomer's arrival cannot cross: the leaver sees the
//! newcomer and hands over, or the newcomer waits until the restore is done and snapshots the
//! restored values. All of these are flocks, so they die with their process: after a SIGKILL of
//! the owner a waiter takes over at its next tick, and a stale journal is recognised as such.
//!
//! When kvmerge may not write the knobs (not root, no KSM), it changes nothing: the caller logs the
//! one-line reason from [`KsmSysfs::writable`] once and runs with zero-page reclaim and accounting.

#[cfg(test)]
pub(crate) mod fixture;
pub mod journal;
pub mod owner;
pub mod report;
pub mod sysfs;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use self::journal::{Journal, RunDir};
pub use self::owner::{
    Joined, JournalState, KsmOwner, KsmWaiter, Repair, install_panic_hook, join, repair_stale,
};
pub use self::report::report;
pub use self::sysfs::{Counters, HOST_KSM_DIR, Knob, KsmSysfs};
use crate::dedup::policy::PolicyKind;
pub use crate::dedup::procfs::{ksmd_cpu_time, thread_cpu_time};
use crate::sync::lock;

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
    #[error("cannot use the run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the KSM journal {} is damaged ({text}): check it and remove it by hand", path.display())]
    Journal { path: PathBuf, text: String },
    #[error("could not restore {} KSM knob(s): {}", .0.len(), .0.join("; "))]
    Restore(Vec<String>),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The knobs kvmerge touches when it owns KSM.
pub const OWNED_KNOBS: &[Knob] = &[
    Knob::Run,
    Knob::PagesToScan,
    Knob::SleepMillisecs,
    Knob::UseZeroPages,
    Knob::SmartScan,
    // The kernel's advisor overrides pages_to_scan: kvmerge turns it off while it steers.
    Knob::AdvisorMode,
];

/// This process's part in steering the host's KSM, shared by the runner (which drops it last, after
/// the guests) and the merge thread (which steers, and takes over when the owner leaves).
pub struct KsmHold {
    role: Mutex<Role>,
}

enum Role {
    Owner(Arc<KsmOwner>),
    Waiting(KsmWaiter),
}

impl KsmHold {
    /// The owner, when this process steers.
    pub fn owner(&self) -> Option<Arc<KsmOwner>> {
        match &*lock(&self.role) {
            Role::Owner(owner) => Some(Arc::clone(owner)),
            Role::Waiting(_) => None,
        }
    }

    /// The owner; a waiting process first tries to take over (see the module docs).
    pub fn owner_or_take_over(&self) -> Option<Arc<KsmOwner>> {
        let mut role = lock(&self.role);
        let Role::Waiting(waiter) = &mut *role else {
            let Role::Owner(owner) = &*role else {
                unreachable!()
            };
            return Some(Arc::clone(owner));
        };
        let owner = match waiter.take_over() {
            Ok(Some(owner)) => owner,
            Ok(None) => return None,
            Err(e) => {
                log::warn!("cannot take over host KSM: {e}");
                return None;
            }
        };
        match owner.adopted_from() {
            Some(pid) => log::info!(
                "took over steering host KSM from kvmerge pid {pid}, which left; originals kept"
            ),
            None => log::info!("took over steering host KSM"),
        }
        prepare(&owner);
        let owner = Arc::new(owner);
        *role = Role::Owner(Arc::clone(&owner));
        Some(owner)
    }
}

/// Settings an owner keeps for as long as it steers: zero pages merge into the kernel's zero page
/// instead of one KSM page per content; smart scanning skips pages that keep failing to merge; the
/// kernel's own advisor would fight the policy over pages_to_scan.
fn prepare(owner: &KsmOwner) {
    for (knob, value) in [
        (Knob::AdvisorMode, "none"),
        (Knob::UseZeroPages, "1"),
        (Knob::SmartScan, "1"),
    ] {
        if owner.original(knob).is_some() {
            if let Err(e) = owner.set(knob, value) {
                log::warn!("cannot set KSM {knob}: {e}");
            }
        }
    }
}

/// Restores a stale journal of the host (see the module docs) when this process may write the
/// knobs. Returns the one line to show when it did something or failed.
pub fn repair_on_start() -> Option<String> {
    KsmSysfs::host().writable().ok()?;
    let run_dir = RunDir::host();
    match repair_stale(&run_dir) {
        Ok(Repair::Restored(journal)) => Some(journal.restored_line()),
        Ok(Repair::Nothing | Repair::InUse(_)) => None,
        Err(e) => Some(format!(
            "cannot restore the host KSM settings journaled in {}: {}; see `kvmerge ksm`",
            run_dir.journal_path().display(),
            error_chain(&e)
        )),
    }
}

/// `kvmerge ksm --restore`: what it did, or why it could not (exit 1).
pub fn restore_by_hand() -> std::result::Result<String, String> {
    let run_dir = RunDir::host();
    let path = run_dir.journal_path();
    match repair_stale(&run_dir) {
        Ok(Repair::Restored(journal)) => Ok(journal.restored_line()),
        Ok(Repair::Nothing) => Ok(format!(
            "nothing to restore: no journal at {}",
            path.display()
        )),
        Ok(Repair::InUse(pid)) => Err(format!(
            "host KSM is in use by {}: it restores the settings when the last kvmerge exits",
            pid.map_or("a running kvmerge".to_owned(), |pid| format!(
                "kvmerge pid {pid}"
            ))
        )),
        Err(e) => Err(format!(
            "cannot restore the host KSM settings journaled in {}: {} (run as root)",
            path.display(),
            error_chain(&e)
        )),
    }
}

/// Joins the host's KSM for a run: repairs a stale journal first (one line on stderr), then, when
/// kvmerge should steer (some guest uses `full` dedup, the policy is not `kernel`, and this process
/// may write the knobs), becomes the owner or waits for the current one to leave. Otherwise says
/// once why not, and guests are merged (or not) at the host's own settings.
pub fn join_for_run(policy: PolicyKind, any_full: bool) -> Option<Arc<KsmHold>> {
    if let Some(line) = repair_on_start() {
        log::warn!("{line}");
    }
    if policy == PolicyKind::Kernel || !any_full {
        return None;
    }
    let sysfs = KsmSysfs::host();
    if let Err(why) = sysfs.writable() {
        log::warn!(
            "not steering host KSM ({why}): guests merge at the host's own KSM settings; \
             zero-page reclaim and accounting still run"
        );
        return None;
    }
    let role = match join(sysfs, RunDir::host(), OWNED_KNOBS) {
        Ok(Joined::Owner(owner)) => {
            prepare(&owner);
            Role::Owner(Arc::new(owner))
        }
        Ok(Joined::Waiting(waiter)) => {
            let who = waiter
                .steered_by()
                .map_or("another kvmerge".to_owned(), |pid| {
                    format!("kvmerge pid {pid}")
                });
            log::warn!(
                "{who} steers host KSM: these guests merge at its settings, and this kvmerge \
                 takes over when it exits"
            );
            Role::Waiting(waiter)
        }
        Err(e) => {
            log::warn!(
                "not steering host KSM ({}); zero-page reclaim and accounting still run",
                error_chain(&e)
            );
            return None;
        }
    };
    Some(Arc::new(KsmHold {
        role: Mutex::new(role),
    }))
}

/// `outer: inner: innermost`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
