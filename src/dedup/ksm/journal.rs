//! The journal of the host's KSM settings: the originals of every knob kvmerge may change, written
//! to the run directory (/run/kvmerge, a tmpfs that outlives the process but not a reboot, as the
//! knobs do) before the first write, and removed after a complete restore. The locks that decide
//! who steers and who restores live beside it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dedup::ksm::{Error, Knob, Result};
use crate::dedup::procfs;

/// Where kvmerge keeps what must outlive it.
pub const HOST_RUN_DIR: &str = "/run/kvmerge";
/// Overrides [`HOST_RUN_DIR`] (tests).
pub const RUN_DIR_ENV: &str = "KVMERGE_RUN_DIR";
/// Largest journal kvmerge reads: a few hundred bytes are expected.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024;

/// The run directory: the journal `ksm.json`, `ksm.users` (a shared flock per kvmerge that uses
/// KSM) and `ksm.lock` (an exclusive flock held while one of them changes who steers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The host's: `$KVMERGE_RUN_DIR` if set and not empty, else /run/kvmerge.
    pub fn host() -> RunDir {
        match std::env::var_os(RUN_DIR_ENV) {
            Some(dir) if !dir.is_empty() => RunDir::at(dir),
            _ => RunDir::at(HOST_RUN_DIR),
        }
    }

    pub fn at(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn journal_path(&self) -> PathBuf {
        self.root.join("ksm.json")
    }

    /// Creates the directory (mode 0700: only root reads what kvmerge left) if it is missing.
    pub fn create(&self) -> Result<()> {
        let io_err = |source| Error::RunDir {
            path: self.root.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err)?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)).map_err(io_err)
    }

    /// Opens (creating) one of the lock files.
    fn lock_file(&self, name: &str) -> Result<File> {
        let path = self.root.join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| Error::Lock { path, source })
    }

    /// `ksm.lock`, held exclusively while a process takes, hands over or gives up the knobs.
    /// Blocking: every holder keeps it for a few sysfs reads and writes only.
    pub(super) fn guard(&self, wait: bool) -> Result<Option<File>> {
        self.create()?;
        let file = self.lock_file("ksm.lock")?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        Ok(flock(&file, op)
            .map_err(|source| Error::Lock {
                path: self.root.join("ksm.lock"),
                source,
            })?
            .then_some(file))
    }

    /// `ksm.users` with a shared lock: this process uses KSM until the file is closed.
    pub(super) fn join_users(&self) -> Result<File> {
        self.create()?;
        let file = self.lock_file("ksm.users")?;
        flock(&file, libc::LOCK_SH).map_err(|source| Error::Lock {
            path: self.root.join("ksm.users"),
            source,
        })?;
        Ok(file)
    }

    /// Whether some process holds `ksm.users` (shared). The caller holds the guard and must not
    /// hold `ksm.users` itself.
    pub(super) fn has_users(&self) -> Result<bool> {
        let file = self.lock_file("ksm.users")?;
        let free = flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(|source| Error::Lock {
            path: self.root.join("ksm.users"),
            source,
        })?;
        Ok(!free)
    }
}

/// flock: true when taken, false when it would block (with LOCK_NB).
pub(super) fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor the caller owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// What `ksm.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The kvmerge that wrote it (the owner of the knobs, or the last one).
    pub pid: u32,
    /// Its start time (field 22 of /proc/PID/stat), so that a reused pid is not taken for it.
    pub start_time: u64,
    /// The KSM sysfs directory the originals belong to.
    pub sysfs: PathBuf,
    /// Knob file name and original value, in the order they are restored.
    pub originals: Vec<(String, String)>,
}

impl Journal {
    /// A journal of `originals` by this process.
    pub fn mine(sysfs: &Path, originals: &[(Knob, String)]) -> Journal {
        let pid = std::process::id();
        Journal {
            pid,
            start_time: procfs::process_start_time(pid).unwrap_or(0),
            sysfs: sysfs.to_owned(),
            originals: originals
                .iter()
                .map(|(k, v)| (k.file_name().to_owned(), v.clone()))
                .collect(),
        }
    }

    /// The journal in `dir`, if there is one.
    pub fn read(dir: &RunDir) -> Result<Option<Journal>> {
        let path = dir.journal_path();
        let bad = |text: String| Error::Journal {
            path: path.clone(),
            text,
        };
        let text = match File::open(&path) {
            Ok(file) => {
                let mut text = String::new();
                io::Read::read_to_string(&mut io::Read::take(file, MAX_JOURNAL_BYTES), &mut text)
                    .map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                text
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        let journal: Journal = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some((name, _)) = journal
            .originals
            .iter()
            .find(|(name, value)| Knob::from_file_name(name).is_none() || value.len() > 32)
        {
            return Err(bad(format!("unknown knob {name:?}")));
        }
        Ok(Some(journal))
    }

    /// Writes the journal atomically: a temporary file, fsync, rename over `ksm.json`, fsync of
    /// the directory. Either the old journal or the new one is there after a crash, never half.
    pub fn write(&self, dir: &RunDir) -> Result<()> {
        dir.create()?;
        let path = dir.journal_path();
        let tmp = dir
            .root
            .join(format!("ksm.json.{}.tmp", std::process::id()));
        let io_err = |source| Error::Write {
            path: path.clone(),
            value: "the KSM journal".into(),
            source,
        };
        let text = serde_json::to_string(self).unwrap_or_default();
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        File::open(&dir.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err)
    }

    /// Removes the journal of `dir` (nothing to do if there is none).
    pub fn remove(dir: &RunDir) -> Result<()> {
        match fs::remove_file(dir.journal_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Write {
                path: dir.journal_path(),
                value: "(removal)".into(),
                source,
            }),
        }
    }

    /// The originals as knobs (names checked by [`read`](Self::read)).
    pub fn knobs(&self) -> Vec<(Knob, String)> {
        self.originals
            .iter()
            .filter_map(|(name, value)| Some((Knob::from_file_name(name)?, value.clone())))
            .collect()
    }

    /// Whether the process that wrote the journal still runs: its pid exists with the same start
    /// time.
    pub fn writer_alive(&self) -> bool {
        procfs::process_start_time(self.pid).is_some_and(|t| t == self.start_time)
    }

    /// `run=0 pages_to_scan=100 ...`, `run` first as users look for it.
    pub fn values(&self) -> String {
        let mut knobs = self.originals.clone();
        knobs.sort_by_key(|(name, _)| name != "run");
        knobs
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::ksm::fixture::Fixture;

    #[test]
    fn journal_round_trip_is_atomic_and_private() {
        let fx = Fixture::new("journal");
        let dir = fx.run_dir();
        assert_eq!(Journal::read(&dir).unwrap(), None);
        let j = Journal::mine(
            &fx.0,
            &[(Knob::PagesToScan, "100".into()), (Knob::Run, "0".into())],
        );
        assert_eq!(j.pid, std::process::id());
        assert!(j.start_time > 0);
        assert!(j.writer_alive());
        j.write(&dir).unwrap();
        let mode = fs::metadata(dir.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(Journal::read(&dir).unwrap(), Some(j.clone()));
        assert_eq!(j.values(), "run=0 pages_to_scan=100");
        assert_eq!(
            j.knobs(),
            [(Knob::PagesToScan, "100".into()), (Knob::Run, "0".into())]
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ksm.json"]);
        Journal::remove(&dir).unwrap();
        Journal::remove(&dir).unwrap();
        assert_eq!(Journal::read(&dir).unwrap(), None);
    }

    #[test]
    fn a_reused_pid_is_not_the_writer() {
        let fx = Fixture::new("reused");
        let mut j = Journal::mine(&fx.0, &[(Knob::Run, "0".into())]);
        j.start_time += 1;
        assert!(!j.writer_alive());
        j.pid = u32::MAX;
        assert!(!j.writer_alive());
    }

    #[test]
    fn a_damaged_journal_is_an_error_not_a_guess() {
        let fx = Fixture::new("damaged");
        let dir = fx.run_dir();
        dir.create().unwrap();
        for bad in [
            "{",
            r#"{"pid":1,"start_time":2,"sysfs":"/x","originals":[["rm -rf","1"]]}"#,
        ] {
            fs::write(dir.journal_path(), bad).unwrap();
            assert!(
                matches!(Journal::read(&dir), Err(Error::Journal { .. })),
                "{bad}"
            );
        }
    }
}
