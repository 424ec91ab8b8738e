//! Nice values of kvmerge's own threads.
//!
//! vCPU threads run at the default priority, like any other process's threads. The threads that
//! must answer promptly however busy the guests are, run above it where the process may
//! (CAP_SYS_NICE, as root): the control thread (signals, `--timeout`, guest exits) and the
//! memory-pressure guard at nice -10. With hundreds of busy vCPU threads on a few cores, a thread
//! at nice 0 that wakes up waits for most of a round of all of them (seconds) before it runs;
//! at nice -10 its time slice comes within milliseconds. Stops additionally run at real-time
//! priority ([`crate::vcpu::RtBoost`]). Threads inherit the nice value of the thread that starts
//! them, so threads started by a raised thread set their own.

use std::io;

/// Nice value of the control thread and the pressure guard.
pub const RESPONSIVE: libc::c_int = -10;

/// The nice value the process's threads start from (`i32::MIN`: not recorded).
static BASE_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(i32::MIN);

/// Records the calling thread's nice value as the process's base, before any thread is raised
/// (`kvmerge serve`, whose raised builder thread starts vCPU threads).
pub fn record_base_nice() {
    if let Ok(nice) = this_thread_nice() {
        BASE_NICE.store(nice, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Puts thread `tid` of this process back to the base nice value (a vCPU thread started by
/// `kvmerge serve`'s raised builder, once its start is over). Lowering is always permitted.
pub fn lower_to_base(tid: libc::pid_t) {
    let base = BASE_NICE.load(std::sync::atomic::Ordering::Relaxed);
    if base == i32::MIN || tid <= 0 {
        return;
    }
    // SAFETY: changes the nice value of one of this process's threads.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, base) } != 0 {
        log::debug!(
            "cannot put thread {tid} back to nice {base}: {}",
            io::Error::last_os_error()
        );
    }
}

/// Sets the nice value of the calling thread. Lowering the priority is always allowed; raising it
/// needs CAP_SYS_NICE (or RLIMIT_NICE).
pub fn set_this_thread_nice(nice: libc::c_int) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: changes the nice value of the calling thread only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn this_thread_nice() -> io::Result<libc::c_int> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // getpriority returns the nice value, so -1 is ambiguous: errno tells.
    // SAFETY: errno is thread-local; we clear it before the call.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: reads the nice value of the calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = io::Error::last_os_error();
    if nice == -1 && err.raw_os_error().is_some_and(|e| e != 0) {
        return Err(err);
    }
    Ok(nice)
}

/// Runs the calling thread at `nice` until dropped, then puts its previous nice value back.
/// Best effort: without the privilege the thread keeps its priority.
pub struct Raised {
    previous: Option<libc::c_int>,
}

impl Raised {
    pub fn this_thread(nice: libc::c_int, what: &str) -> Raised {
        let previous = this_thread_nice().ok();
        match previous {
            Some(p) if p <= nice => return Raised { previous: None },
            _ => {}
        }
        match set_this_thread_nice(nice) {
            Ok(()) => Raised { previous },
            Err(e) => {
                log::debug!("{what} keeps the default priority: {e}");
                Raised { previous: None }
            }
        }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            if let Err(e) = set_this_thread_nice(previous) {
                log::debug!("cannot restore the thread's nice value {previous}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_may_always_lower_its_own_priority_and_reads_it_back() {
        std::thread::spawn(|| {
            let before = this_thread_nice().unwrap();
            let lower = (before + 3).min(19);
            set_this_thread_nice(lower).unwrap();
            assert_eq!(this_thread_nice().unwrap(), lower);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_raise_is_undone_when_dropped() {
        std::thread::spawn(|| {
            set_this_thread_nice(5).unwrap();
            {
                let _raised = Raised::this_thread(RESPONSIVE, "test thread");
                let now = this_thread_nice().unwrap();
                // Raised where permitted (root), else unchanged.
                assert!(now == RESPONSIVE || now == 5, "nice {now}");
            }
            assert_eq!(this_thread_nice().unwrap(), 5);
        })
        .join()
        .unwrap();
    }
}
