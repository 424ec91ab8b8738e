//! vCPU threads: one per guest vCPU, each a small state machine (Paused → Running → Exited) driven
//! by acknowledged commands, handling KVM exits against its VM's devices.
//!
//! A kick is race-free: the kick signal's handler sets `immediate_exit` in the thread's own
//! `kvm_run`, so a vCPU that is about to enter KVM_RUN returns at once instead of missing it.
//!
//! Short holds (zero-page reclaim) use a [`Gate`] instead of commands: a vCPU that is outside
//! KVM_RUN (handling an exit, waiting in the idle port, paused) already cannot write guest memory,
//! so only vCPUs inside the guest are kicked and waited for, and nobody waits for a sleeping
//! thread to be scheduled just to acknowledge.

use std::cell::Cell;
use std::fmt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::devices::IDLE_PORT;
use crate::vm::VmShared;

/// How long a payload's read of the idle port may keep its vCPU in the VMM.
const IDLE_SLICE: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start vCPU thread {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {index} did not acknowledge '{command:?}' within {timeout:?}")]
    NoAck {
        index: u8,
        command: Command,
        timeout: Duration,
    },
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("vCPU {index} did not leave the guest within {timeout:?}")]
    NoHold { index: usize, timeout: Duration },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Why a VM ended. The first reason recorded wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote this value to the debug-exit port.
    Exit(u32),
    /// The guest asked for a reset (i8042 or KVM system event).
    Reset,
    /// The guest powered itself off (KVM system event).
    Poweroff,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// KVM could not run the guest's code (emulation failure and the like).
    InternalError { suberror: u32 },
    /// The CPU refused to enter the guest.
    FailEntry { reason: u64 },
    /// The guest reported a crash (KVM system event).
    GuestCrash,
    /// An exit kvmerge cannot handle or a failing KVM_RUN.
    Vmm(String),
    /// `--timeout` expired first.
    Timeout,
    /// kvmerge received SIGINT or SIGTERM.
    Signal(i32),
    /// The user quit the interactive console.
    Quit,
    /// kvmerge stopped the guest to relieve host or cgroup memory pressure (src/pressure.rs).
    Shed,
}

impl VmEnd {
    /// Ends the guest chose itself, successfully: exit code 0 or a clean reset/poweroff.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmEnd::Exit(0) | VmEnd::Reset | VmEnd::Poweroff)
    }
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::Exit(code) => write!(f, "exited with code {code}"),
            VmEnd::Reset => write!(f, "reset itself"),
            VmEnd::Poweroff => write!(f, "powered off"),
            VmEnd::TripleFault => write!(f, "crashed: triple fault"),
            VmEnd::InternalError { suberror } => {
                write!(f, "crashed: KVM internal error (suberror {suberror})")
            }
            VmEnd::FailEntry { reason } => {
                write!(f, "crashed: VM entry failed (hardware reason {reason:#x})")
            }
            VmEnd::GuestCrash => write!(f, "crashed: guest reported a panic"),
            VmEnd::Vmm(why) => write!(f, "stopped by a VMM error: {why}"),
            VmEnd::Timeout => write!(f, "timed out"),
            VmEnd::Signal(sig) => write!(f, "stopped by signal {sig}"),
            VmEnd::Quit => write!(f, "stopped from the console"),
            VmEnd::Shed => write!(f, "stopped to relieve host memory pressure"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Pause,
    Exit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Paused,
    Running,
    Exited,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Const-initialised: no lazy setup or
    /// destructor runs inside the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while its VcpuFd is alive
        // and cleared before the VcpuFd drops; a byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn init_kick_signal() -> Result<()> {
    static INIT: Once = Once::new();
    let mut result = Ok(());
    INIT.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result.map_err(Error::SignalHandler)
}

/// Keeps a VM's vCPUs out of the guest for a short window.
///
/// Each vCPU publishes whether it is inside KVM_RUN; the holder raises `hold` and then looks at
/// those flags, the vCPU sets its flag and then looks at `hold` (both sequentially consistent), so
/// at least one of them sees the other: either the holder sees the vCPU inside and kicks it out,
/// or the vCPU sees the hold and waits before entering.
pub struct Gate {
    hold: AtomicBool,
    in_guest: Box<[AtomicBool]>,
    lock: Mutex<()>,
    /// Signalled when a vCPU leaves the guest during a hold and when the hold ends.
    changed: Condvar,
}

impl Gate {
    pub fn new(vcpus: usize) -> Gate {
        Gate {
            hold: AtomicBool::new(false),
            in_guest: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds every vCPU out of the guest: `kick(index)`s those inside and waits until they have
    /// left. The hold lasts until the returned guard drops (also on a panic); on error it is
    /// already released. The caller serialises holds.
    pub fn hold(&self, kick: impl Fn(usize), timeout: Duration) -> Result<Held<'_>> {
        self.hold.store(true, Ordering::SeqCst);
        for (index, inside) in self.in_guest.iter().enumerate() {
            if inside.load(Ordering::SeqCst) {
                kick(index);
            }
        }
        let deadline = Instant::now() + timeout;
        let mut guard = self.guard();
        loop {
            let inside = self.in_guest.iter().position(|f| f.load(Ordering::SeqCst));
            let Some(index) = inside else {
                return Ok(Held(self));
            };
            let now = Instant::now();
            if now >= deadline {
                drop(guard);
                self.release();
                return Err(Error::NoHold { index, timeout });
            }
            guard = self
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends a hold; waiting vCPUs enter the guest again.
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        let _guard = self.guard();
        self.changed.notify_all();
    }

    /// Called by vCPU `index` right before KVM_RUN: marks it inside, or waits out a hold first.
    fn enter(&self, index: usize) {
        loop {
            self.in_guest[index].store(true, Ordering::SeqCst);
            if !self.hold.load(Ordering::SeqCst) {
                return;
            }
            self.leave(index);
            let mut guard = self.guard();
            while self.hold.load(Ordering::SeqCst) {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Called by vCPU `index` when KVM_RUN has returned.
    fn leave(&self, index: usize) {
        self.in_guest[index].store(false, Ordering::SeqCst);
        if self.hold.load(Ordering::SeqCst) {
            // Taking the lock orders this wake-up after the holder's check of the flags.
            let _guard = self.guard();
            self.changed.notify_all();
        }
    }
}

/// A hold on a VM's vCPUs; dropping it lets them run.
#[must_use = "the vCPUs run again as soon as the hold drops"]
pub struct Held<'a>(&'a Gate);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The VMM side of one vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    commands: Sender<Command>,
    acks: Receiver<State>,
    tid: Arc<AtomicI32>,
}

impl VcpuHandle {
    /// Starts the thread for `fd`, in the Paused state.
    pub fn spawn(fd: VcpuFd, index: u8, vm: Arc<VmShared>, gate: Arc<Gate>) -> Result<VcpuHandle> {
        init_kick_signal()?;
        let (commands, command_rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let tid = Arc::new(AtomicI32::new(0));
        let thread_tid = tid.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{}-vcpu{index}", vm.name()))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                thread_tid.store(unsafe { libc::gettid() }, Ordering::Release);
                VcpuThread {
                    fd,
                    index: usize::from(index),
                    vm,
                    gate,
                    commands: command_rx,
                    acks: ack_tx,
                    pending: None,
                    ended: false,
                }
                .run();
            })
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            commands,
            acks,
            tid,
        })
    }

    /// Sends `command` and kicks the thread out of the guest so it sees it promptly.
    pub fn post(&self, command: Command) {
        // A closed channel means the thread has exited already; there is nothing to tell it.
        if self.commands.send(command).is_ok() {
            self.kick();
        }
    }

    /// Waits for the acknowledgement of the oldest unacknowledged command.
    pub fn wait_ack(&self, command: Command, timeout: Duration) -> Result<State> {
        match self.acks.recv_timeout(timeout) {
            Ok(state) => Ok(state),
            // The thread is gone: it can only have exited.
            Err(RecvTimeoutError::Disconnected) => Ok(State::Exited),
            Err(RecvTimeoutError::Timeout) => Err(Error::NoAck {
                index: self.index,
                command,
                timeout,
            }),
        }
    }

    /// Makes the thread leave KVM_RUN (or not enter it) and look at its commands and the gate.
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // SAFETY: the thread is not joined yet, so its pthread_t is valid even if it finished.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Joins the thread if it acknowledged its exit; otherwise leaves it detached rather than
    /// hanging the VMM on a vCPU stuck in the kernel.
    pub fn join(mut self, acked_exit: bool) {
        if let Some(thread) = self.thread.take() {
            if acked_exit {
                if thread.join().is_err() {
                    log::error!("vCPU {} thread panicked", self.index);
                }
            } else {
                log::warn!("vCPU {} thread did not stop; leaving it behind", self.index);
            }
        }
    }

    /// Linux thread id, for reading its CPU time (0 until the thread has started).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }
}

struct VcpuThread {
    fd: VcpuFd,
    index: usize,
    vm: Arc<VmShared>,
    gate: Arc<Gate>,
    commands: Receiver<Command>,
    acks: Sender<State>,
    /// A command received while blocked in the idle port, handled before the next entry.
    pending: Option<Command>,
    /// The VM has ended: stay out of the guest whatever `Run` says.
    ended: bool,
}

impl VcpuThread {
    fn run(mut self) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut state = State::Paused;
        while state != State::Exited {
            let command = match self.pending.take() {
                Some(c) => Some(c),
                None if state == State::Running => match self.commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(Command::Exit),
                },
                None => Some(self.commands.recv().unwrap_or(Command::Exit)),
            };
            if let Some(command) = command {
                state = match command {
                    Command::Run if !self.ended => State::Running,
                    Command::Run | Command::Pause => State::Paused,
                    Command::Exit => State::Exited,
                };
                // The VMM may have stopped waiting; an unheard ack is harmless.
                let _ = self.acks.send(state);
                continue;
            }
            if let Some(end) = self.enter_guest() {
                self.vm.end(end);
                self.ended = true;
                state = State::Paused;
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Runs the guest until one exit has been handled; returns why the VM ends, if it does.
    fn enter_guest(&mut self) -> Option<VmEnd> {
        self.gate.enter(self.index);
        let result = self.fd.run();
        self.gate.leave(self.index);
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag and look at the commands.
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return Some(VmEnd::Vmm(format!("KVM_RUN failed: {e}"))),
        };
        match exit {
            VcpuExit::IoIn(IDLE_PORT, data) => {
                data.fill(0);
                match self.commands.recv_timeout(IDLE_SLICE) {
                    Ok(c) => self.pending = Some(c),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.pending = Some(Command::Exit),
                }
                None
            }
            VcpuExit::IoIn(port, data) => {
                self.vm.devices().pio_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => self.vm.devices().pio_write(port, data),
            // No MMIO devices yet: reads float high, writes are dropped.
            VcpuExit::MmioRead(_, data) => {
                data.fill(0xff);
                None
            }
            VcpuExit::MmioWrite(..) | VcpuExit::Intr => None,
            VcpuExit::Shutdown => Some(VmEnd::TripleFault),
            VcpuExit::InternalError => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(VmEnd::InternalError { suberror })
            }
            VcpuExit::FailEntry(reason, _) => Some(VmEnd::FailEntry { reason }),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmEnd::Poweroff,
                KVM_SYSTEM_EVENT_RESET => VmEnd::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmEnd::GuestCrash,
                other => VmEnd::Vmm(format!("unknown KVM system event {other}")),
            }),
            other => Some(VmEnd::Vmm(format!("unexpected KVM exit {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads that behave like vCPUs towards a [`Gate`]: "run the guest" (count) until kicked or
    /// until they leave on their own every so often.
    struct FakeVcpus {
        gate: Arc<Gate>,
        kicked: Arc<Vec<AtomicBool>>,
        counts: Arc<Vec<std::sync::atomic::AtomicU64>>,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl FakeVcpus {
        fn start(n: usize) -> FakeVcpus {
            let gate = Arc::new(Gate::new(n));
            let kicked: Arc<Vec<AtomicBool>> =
                Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
            let counts: Arc<Vec<std::sync::atomic::AtomicU64>> =
                Arc::new((0..n).map(|_| Default::default()).collect());
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..n)
                .map(|i| {
                    let (gate, kicked, counts, stop) =
                        (gate.clone(), kicked.clone(), counts.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            gate.enter(i);
                            for _ in 0..10_000 {
                                if kicked[i].swap(false, Ordering::SeqCst) {
                                    break;
                                }
                                counts[i].fetch_add(1, Ordering::SeqCst);
                            }
                            gate.leave(i);
                        }
                    })
                })
                .collect();
            FakeVcpus {
                gate,
                kicked,
                counts,
                stop,
                threads,
            }
        }

        fn counts(&self) -> Vec<u64> {
            self.counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect()
        }

        fn kick(&self) -> impl Fn(usize) + '_ {
            |i| self.kicked[i].store(true, Ordering::SeqCst)
        }

        fn finish(self) {
            self.stop.store(true, Ordering::SeqCst);
            for t in self.threads {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn a_hold_keeps_every_vcpu_out_of_the_guest() {
        let vcpus = FakeVcpus::start(3);
        let mut progressed = 0;
        for _ in 0..200 {
            let before_hold = vcpus.counts();
            let held = vcpus
                .gate
                .hold(vcpus.kick(), Duration::from_secs(5))
                .unwrap();
            let at_hold = vcpus.counts();
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(vcpus.counts(), at_hold, "a vCPU ran during the hold");
            drop(held);
            if at_hold != before_hold {
                progressed += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(progressed > 0, "the vCPUs never ran between holds");
        vcpus.finish();
    }

    #[test]
    fn a_vcpu_that_never_leaves_fails_the_hold_and_releases_it() {
        let gate = Gate::new(2);
        gate.enter(1); // inside, and deaf to kicks
        let err = gate.hold(|_| {}, Duration::from_millis(50)).err().unwrap();
        assert!(matches!(err, Error::NoHold { index: 1, .. }), "{err}");
        // The failed hold did not stay raised: another vCPU enters without waiting.
        gate.enter(0);
        gate.leave(0);
        gate.leave(1);
        drop(
            gate.hold(|_| panic!("nobody is inside"), Duration::from_millis(50))
                .unwrap(),
        );
    }
}
