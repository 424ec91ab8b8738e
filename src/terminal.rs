//! Raw mode for the interactive console, restored when the guard drops (normal end, error, or a
//! signal, since every catchable stop signal is handled through the control loop rather than
//! killing us), and by the panic hook of [`install_panic_hook`] when any thread panics.

use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
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
        // Registered before the change, so a panic at any point after it can undo it.
        *crate::sync::lock(&SAVED) = Some((fd, saved));
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            *crate::sync::lock(&SAVED) = None;
            return Err(err);
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the exact settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        *crate::sync::lock(&SAVED) = None;
    }
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
}
