//! The signals that stop a run, read from a signalfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// A signalfd for `signals`, which are blocked in the calling thread (and so in every thread it
/// spawns afterwards). On drop, signals still pending are discarded and the previous mask comes
/// back.
pub(crate) struct SignalFd {
    pub(crate) fd: OwnedFd,
    pub(crate) old_mask: libc::sigset_t,
    /// The first signal read through [`SignalFd::take`] (0: none yet).
    pub(crate) caught: AtomicI32,
}

impl SignalFd {
    pub(crate) fn new(signals: &[libc::c_int]) -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: valid sets; only this thread's mask changes.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: creates a new descriptor from a valid set.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(err);
        }
        Ok(SignalFd {
            // SAFETY: `fd` is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            old_mask,
            caught: AtomicI32::new(0),
        })
    }

    /// The next pending signal, if any (never blocks).
    pub(crate) fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info` from our non-blocking signalfd.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }

    /// The first stop signal seen by any caller, reading a pending one if none was seen yet. For
    /// the phases before the control loop (build, start), polled between steps.
    pub(crate) fn take(&self) -> Option<i32> {
        let seen = self.caught.load(Ordering::SeqCst);
        if seen != 0 {
            return Some(seen);
        }
        let sig = self.read()?;
        match self
            .caught
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Some(sig),
            Err(first) => Some(first),
        }
    }

    /// The signal [`SignalFd::take`] saw, if any, after reading one more time.
    pub(crate) fn caught(&self) -> Option<i32> {
        self.take()
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // A second signal that arrived while the run was ending must not kill the process once
        // unblocked: the run has already handled the stop.
        while self.read().is_some() {}
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
