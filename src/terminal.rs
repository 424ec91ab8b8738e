//! Raw mode for the interactive console, restored when the guard drops (normal end, error, or a
//! signal, since every catchable stop signal is handled through the control loop rather than
//! killing us), and by the panic hook of [`install_panic_hook`] when any thread panics.
//!
//! What cannot be caught (SIGKILL, the OOM killer) leaves the terminal raw. So before the change,
//! the settings to put back are written to a journal in the run directory
//! (`terminal-<device>.json` next to the KSM journal; `$XDG_RUNTIME_DIR/kvmerge` for users other
//! than root), with the owner's pid and start time; the guard removes it. The next kvmerge started
//! on that terminal ([`repair_on_start`]) finds a journal whose owner is gone and, if the terminal
//! is still exactly as kvmerge left it, restores it with one line.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Mutex, Once};

use serde::{Deserialize, Serialize};

pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
    journal: Option<PathBuf>,
}

/// The settings to put back, while some terminal is raw: read by the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts back the terminal settings kvmerge changed, if any. Never blocks on the registry: a panic
/// may happen while this very thread holds it.
pub fn restore_saved() {
    let saved = match SAVED.try_lock() {
        Ok(guard) => *guard,
        Err(std::sync::TryLockError::Poisoned(p)) => *p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Some((fd, termios)) = saved {
        // SAFETY: restores settings read from this fd by tcgetattr.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// Installs (once) a panic hook that restores a raw terminal before the previous hook runs, so
/// the panic message lands on a sane terminal and the user's shell gets it back whichever thread
/// panicked. Install it after any other hook that must run before the terminal is restored.
pub fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
    });
}

impl RawMode {
    /// Puts `fd` in raw input mode; keeps output post-processing so guest `\n` still renders.
    pub fn enter(fd: RawFd) -> std::io::Result<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR | libc::BRKINT);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // Persisted before the change, so that even a SIGKILL after it is repaired later.
        let journal = write_journal(fd, &saved, &raw);
        // Registered before the change, so a panic at any point after it can undo it.
        *crate::sync::lock(&SAVED) = Some((fd, saved));
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            *crate::sync::lock(&SAVED) = None;
            remove_own_journal(journal.as_ref());
            return Err(err);
        }
        Ok(RawMode { fd, saved, journal })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the exact settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        *crate::sync::lock(&SAVED) = None;
        remove_own_journal(self.journal.as_ref());
    }
}

/// A termios, field by field, for the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Settings {
    iflag: u32,
    oflag: u32,
    cflag: u32,
    lflag: u32,
    line: u8,
    cc: Vec<u8>,
    ispeed: u32,
    ospeed: u32,
}

impl Settings {
    fn of(t: &libc::termios) -> Settings {
        Settings {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }
    }

    fn termios(&self) -> Option<libc::termios> {
        // SAFETY: termios is plain data; every field is set below.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if self.cc.len() != t.c_cc.len() {
            return None;
        }
        t.c_iflag = self.iflag;
        t.c_oflag = self.oflag;
        t.c_cflag = self.cflag;
        t.c_lflag = self.lflag;
        t.c_line = self.line;
        t.c_cc.copy_from_slice(&self.cc);
        t.c_ispeed = self.ispeed;
        t.c_ospeed = self.ospeed;
        Some(t)
    }
}

/// What a kvmerge that made a terminal raw must leave for the next one.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    pid: u32,
    /// The owner's start time (/proc/PID/stat), so that a reused pid is not taken for it.
    start_time: Option<u64>,
    /// The settings to put back.
    saved: Settings,
    /// The settings kvmerge set: repaired only while the terminal still has them.
    raw: Settings,
}

/// Largest terminal journal read: a few hundred bytes are expected.
const MAX_JOURNAL_BYTES: u64 = 16 * 1024;

/// The journal's path for the terminal on `fd` (None: not a terminal device, or no run directory
/// this user may write).
fn journal_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: stat is plain data; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFCHR {
        return None;
    }
    let dir = match std::env::var_os(crate::dedup::ksm::journal::RUN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        // SAFETY: geteuid has no preconditions.
        _ if unsafe { libc::geteuid() } == 0 => {
            PathBuf::from(crate::dedup::ksm::journal::HOST_RUN_DIR)
        }
        _ => PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?).join("kvmerge"),
    };
    Some(dir.join(format!("terminal-{:x}.json", st.st_rdev)))
}

fn write_journal(fd: RawFd, saved: &libc::termios, raw: &libc::termios) -> Option<PathBuf> {
    let path = journal_path(fd)?;
    let pid = std::process::id();
    let journal = Journal {
        pid,
        start_time: crate::dedup::procfs::process_start_time(pid),
        saved: Settings::of(saved),
        raw: Settings::of(raw),
    };
    let tmp = path.with_extension(format!("json.{pid}"));
    let written = (|| -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        // Private, as the KSM journal's directory (the same one, as root), and ours.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = std::fs::symlink_metadata(dir)?;
        // SAFETY: geteuid has no preconditions.
        if !meta.is_dir() || meta.uid() != unsafe { libc::geteuid() } {
            return Err(std::io::Error::other(
                "the directory is not this user's own",
            ));
        }
        let text = serde_json::to_vec(&journal).map_err(std::io::Error::other)?;
        // A fresh file (no symlink followed, nothing overwritten), then renamed into place.
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(&text)?;
        std::fs::rename(&tmp, &path)
    })();
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            log::debug!(
                "cannot journal the terminal settings in {}: {e} (a kvmerge killed with SIGKILL \
                 leaves the terminal raw; `reset` repairs it)",
                path.display()
            );
            None
        }
    }
}

fn remove_journal(path: Option<&PathBuf>) {
    if let Some(path) = path {
        if let Err(e) = std::fs::remove_file(path) {
            log::debug!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Removes our own journal: only while it still names this process (another kvmerge made the
/// same terminal raw after us and journaled its own settings).
fn remove_own_journal(path: Option<&PathBuf>) {
    let Some(path) = path else { return };
    let ours = read_journal(path).is_some_and(|j| j.pid == std::process::id());
    if ours {
        remove_journal(Some(path));
    }
}

/// Whether the kvmerge that wrote `journal` still runs.
fn writer_alive(journal: &Journal) -> bool {
    match journal.start_time {
        // A pid reused by another process (or this one, in a container whose /run persists)
        // has another start time.
        Some(t) => crate::dedup::procfs::process_start_time(journal.pid) == Some(t),
        // Start time unknown: only a pid that is gone is surely gone.
        None => std::path::Path::new(&format!("/proc/{}", journal.pid)).exists(),
    }
}

fn read_journal(path: &std::path::Path) -> Option<Journal> {
    serde_json::from_slice(&read_bounded(path)?).ok()
}

/// Repairs the terminal on `fd` (stdin) if a kvmerge that is gone left it raw: called at start,
/// before anything else touches the terminal. Returns the line to print when it did.
pub fn repair_on_start(fd: RawFd) -> Option<String> {
    // SAFETY: isatty has no preconditions.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    // Only in the terminal's foreground: a background process changing it would be stopped
    // (SIGTTOU), and the shell in front owns it meanwhile.
    // SAFETY: tcgetpgrp and getpgrp have no memory preconditions.
    if unsafe { libc::tcgetpgrp(fd) != libc::getpgrp() } {
        return None;
    }
    let path = journal_path(fd)?;
    let text = read_bounded(&path)?;
    let Ok(journal) = serde_json::from_slice::<Journal>(&text) else {
        log::debug!("{}: not a terminal journal; removed", path.display());
        remove_journal(Some(&path));
        return None;
    };
    if writer_alive(&journal) {
        // Another kvmerge uses this terminal right now: its settings are its own business.
        return None;
    }
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut now: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    if unsafe { libc::tcgetattr(fd, &mut now) } != 0 {
        return None;
    }
    let line = match journal.saved.termios() {
        Some(saved) if Settings::of(&now) == journal.raw => {
            // SAFETY: settings this terminal had before the kvmerge that is gone changed them.
            if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) } != 0 {
                return None;
            }
            Some(format!(
                "kvmerge: restored the terminal settings that kvmerge (pid {}) left when it was \
                 killed",
                journal.pid
            ))
        }
        // Changed since (the user ran `reset` or `stty`): nothing to repair.
        _ => None,
    };
    remove_journal(Some(&path));
    line
}

/// Reads a journal: a regular file of this user's, not through a symlink, without blocking (a
/// FIFO planted in its place), and bounded.
fn read_bounded(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    // SAFETY: geteuid has no preconditions.
    let own = meta.uid() == unsafe { libc::geteuid() };
    if !meta.is_file() || !own || meta.len() > MAX_JOURNAL_BYTES {
        return None;
    }
    let mut text = Vec::new();
    file.take(MAX_JOURNAL_BYTES).read_to_end(&mut text).ok()?;
    Some(text)
}

/// What a chunk of console input means once the escape sequence (Ctrl-A x, as in QEMU) is decoded.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    armed: bool,
}

pub const ESCAPE: u8 = 0x01;

#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the guest.
    Guest(Vec<u8>),
    /// The user asked to quit.
    Quit(Vec<u8>),
}

impl EscapeDecoder {
    /// Ctrl-A x quits; Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A followed by anything else is dropped.
    pub fn feed(&mut self, bytes: &[u8]) -> Input {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.armed {
                self.armed = false;
                match b {
                    b'x' | b'X' => return Input::Quit(out),
                    ESCAPE => out.push(ESCAPE),
                    _ => {}
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        Input::Guest(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.feed(b"ls\r"), Input::Guest(b"ls\r".to_vec()));
        assert_eq!(d.feed(b"a\x01"), Input::Guest(b"a".to_vec()));
        assert_eq!(d.feed(b"\x01b"), Input::Guest(b"\x01b".to_vec()));
        assert_eq!(d.feed(b"\x01zq"), Input::Guest(b"q".to_vec()));
        assert_eq!(d.feed(b"c\x01x rest"), Input::Quit(b"c".to_vec()));
    }

    fn journal_of(pid: u32, start_time: Option<u64>) -> Journal {
        // SAFETY: termios is plain data.
        let t: libc::termios = unsafe { std::mem::zeroed() };
        Journal {
            pid,
            start_time,
            saved: Settings::of(&t),
            raw: Settings::of(&t),
        }
    }

    #[test]
    fn a_journal_writer_is_alive_only_with_its_own_start_time() {
        let me = std::process::id();
        let started = crate::dedup::procfs::process_start_time(me).unwrap();
        assert!(writer_alive(&journal_of(me, Some(started))));
        // The same pid, another process (pid reuse, or a container's pid 1 after a restart).
        assert!(!writer_alive(&journal_of(me, Some(started + 1))));
        // Start time unknown: alive while the pid exists.
        assert!(writer_alive(&journal_of(me, None)));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        assert!(!writer_alive(&journal_of(gone, None)));
    }

    #[test]
    fn journals_are_read_only_from_regular_files_not_through_links_or_fifos() {
        let dir = std::env::temp_dir().join(format!("kvmerge-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("terminal-1.json");
        std::fs::write(&file, b"{}").unwrap();
        assert_eq!(read_bounded(&file).as_deref(), Some(&b"{}"[..]));
        let link = dir.join("terminal-2.json");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_bounded(&link), None, "a symlink is not followed");
        let fifo = dir.join("terminal-3.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(
            read_bounded(&fifo),
            None,
            "a FIFO is refused without blocking"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
