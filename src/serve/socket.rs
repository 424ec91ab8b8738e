//! The API socket: created owner-only, one server per path, removed on every way out that can
//! be caught. A server killed with SIGKILL leaves its socket (and lock file) behind; the next
//! server on that path sees nobody holds the lock and replaces them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The longest socket path: `sun_path` holds 108 bytes with the terminating NUL.
const MAX_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--api-socket {0}: another kvmerge serve is using this socket; stop it first \
         (kvmerge vm --api-socket {0} shutdown) or choose another path"
    )]
    InUse(String),
    #[error("--api-socket {0}: it exists and is not a socket; choose another path")]
    NotSocket(String),
    #[error(
        "--api-socket {0}: another program is listening on this socket; stop it or choose \
         another path"
    )]
    Listening(String),
    #[error("--api-socket {0}: a socket path has at most {MAX_PATH} bytes; choose a shorter one")]
    TooLong(String),
    #[error("--api-socket {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The bound socket, with the lock that makes it this server's.
pub struct Listener {
    path: PathBuf,
    lock_path: PathBuf,
    listener: UnixListener,
    _lock: File,
}

impl Listener {
    pub fn bind(path: &Path) -> Result<Listener, Error> {
        let shown = path.display().to_string();
        if path.as_os_str().len() > MAX_PATH {
            return Err(Error::TooLong(shown));
        }
        let io = |what, source| Error::Io {
            path: shown.clone(),
            what,
            source,
        };
        // Something that is not a socket is not ours to replace: refused before anything is made.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(Error::NotSocket(shown));
            }
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = lock_file(&lock_path).map_err(|e| match e {
            LockError::Held => Error::InUse(shown.clone()),
            LockError::Io(what, source) => io(what, source),
        })?;
        // Ours now. What is at the path is a socket left by a server that was killed, or
        // something else, which is not ours to remove.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                // Not held by a kvmerge serve; but another program may listen on it.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        drop(lock);
                        let _ = std::fs::remove_file(&lock_path);
                        return Err(Error::Listening(shown));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                    Err(e) => return Err(io("cannot tell whether the socket is in use", e)),
                }
                std::fs::remove_file(path).map_err(|e| io("cannot remove the stale socket", e))?;
                log::info!("removed the socket a killed kvmerge serve left at {shown}");
            }
            Ok(_) => {
                // Made since the check above: not ours either.
                drop(lock);
                let _ = std::fs::remove_file(&lock_path);
                return Err(Error::NotSocket(shown));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot look at it", e)),
        }
        // Owner-only from the start: no moment where another user could connect.
        // SAFETY: umask has no preconditions; restored right after bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|e| io("cannot create the socket", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("cannot make the socket owner-only", e))?;
        Ok(Listener {
            path: path.to_path_buf(),
            lock_path,
            listener,
            _lock: lock,
        })
    }

    /// A handle on the listening socket for the API thread.
    pub fn take(&self) -> Result<UnixListener, super::Error> {
        self.listener
            .try_clone()
            .map_err(|e| super::Error::Setup(format!("cannot share the API socket: {e}")))
    }
}

enum LockError {
    Held,
    Io(&'static str, std::io::Error),
}

/// Opens (or creates) the lock file and takes its lock. The file is removed when its server ends,
/// so a lock taken on a file that was removed meanwhile is no lock at all: taken again on the
/// file now at the path, until the two are the same.
fn lock_file(path: &Path) -> Result<File, LockError> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| LockError::Io("cannot create its lock file", e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Held);
            }
            return Err(LockError::Io("cannot lock its lock file", e));
        }
        let held = lock
            .metadata()
            .map_err(|e| LockError::Io("cannot look at its lock file", e))?;
        match std::fs::symlink_metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(lock),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LockError::Io("cannot look at its lock file", e)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The socket first, while the lock still keeps a new server from binding in between.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}
