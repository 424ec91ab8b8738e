//! vCPU threads: one per guest vCPU, each handling KVM exits against its VM's devices, and the
//! one protocol by which the rest of the VMM keeps them out of the guest or stops them.
//!
//! # The pause protocol
//!
//! Everything goes through one [`Gate`] per VM. It carries two things:
//!
//! - **Holds** keep vCPUs out of the guest. A hold is a counter: the lifecycle pause (a VM that
//!   is Paused) is one hold that lasts until `resume`, and each zero-page reclaim batch is a short
//!   one ([`Gate::hold`]). Each vCPU publishes whether it is inside KVM_RUN (`in_guest`). The
//!   holder raises the counter and then reads the flags; a vCPU sets its flag and then reads the
//!   counter (all sequentially consistent), so one of them sees the other: either the holder sees
//!   the vCPU inside and kicks it, or the vCPU sees the hold and waits before entering. A vCPU
//!   that is outside KVM_RUN (handling an exit, blocked in the idle port or on a device, not
//!   started, ended) cannot write guest memory and is held without waking its thread.
//!   **What a hold guarantees**: when `hold` returns Ok, no vCPU of the VM executes guest code, and
//!   none will until the hold drops; KVM writes guest memory on a vCPU's behalf only inside
//!   KVM_RUN, so no vCPU writes guest RAM during the hold. (Devices do no DMA today.)
//! - **Commands** (Start, Exit) go to one vCPU each, numbered by a per-VM sequence. A vCPU only ever
//!   sees the latest command posted to it (a newer one supersedes an unread older one) and
//!   acknowledges it with its number. A wait for an acknowledgement takes only its own number or
//!   a newer one: a late acknowledgement of an earlier command, after that wait timed out, can
//!   never be taken for a later command's.
//!
//! **Short holds on a busy host.** Where the process may (CAP_SYS_NICE), the holder of a short
//! hold runs at the lowest real-time priority ([`RtBoost`]), and a vCPU still inside
//! [`FIRST_RESEND`] after its kick (preempted inside KVM_RUN: on a busy host it would wait whole
//! time slices for a CPU before it can leave) is boosted the same way until it is out. So a hold
//! lasts as long as its work, not as long as the scheduler's queue.
//!
//! **A kick** is the real-time signal [`kick_signal`] sent to a vCPU thread. Its handler sets
//! `immediate_exit` in that thread's own `kvm_run` (a thread-local pointer, set while the thread
//! owns its VcpuFd and cleared by a drop guard, also when the thread unwinds), so a vCPU inside
//! KVM_RUN returns with EINTR and one about to enter returns at once. A kick carries no meaning:
//! the kicked thread looks at the gate (holds, commands) afterwards. Kicks are sent when a hold
//! finds a vCPU inside and when a command is posted, and sent again while a hold or an
//! acknowledgement is awaited ([`KICK_RESEND`], doubling up to [`MAX_KICK_RESEND`]): a failed
//! `pthread_kill` (EAGAIN when the real-time signal queue is full) or a kick that lands between
//! a vCPU's checks costs one re-send, not the wait.
//!
//! **Timeouts.** A hold that cannot get every vCPU out within its timeout releases itself and
//! fails ([`Error::NoHold`]): the caller skips its work. A missing acknowledgement fails the wait
//! ([`Error::NoAck`]); for Exit the VMM then leaves the thread detached instead of hanging on a
//! vCPU stuck in the kernel. **No VcpuFd outlives its VM's memory**: every vCPU thread owns a
//! reference to its VM's [`GuestRam`] next to its VcpuFd (which keeps KVM's memslots alive), and
//! both go together, the VcpuFd first: dropped by the VMM once the thread has handed them over on
//! Exit, or by the thread itself when it unwinds. A detached thread that never ends keeps the
//! mapping (leaked and logged), never a dangling memslot.
//!
//! **Exit** is the one command a thread does not simply obey and leave: it hands its VcpuFd and
//! guest RAM reference to the VMM ([`Remains`]), acknowledges, and waits until the VMM releases
//! the VM's threads ([`Gate::release`]). The VMM destroys the VM (dropping what was handed over)
//! before it releases and joins the threads; for a whole fleet it destroys every VM first, so
//! that no thread's end and no unmap of guest RAM calls into a live VM's MMU notifier.
//!
//! Bounds: a short hold gives up after `vm::HOLD_TIMEOUT` (250 ms), a lifecycle pause or the
//! Start of one VM after `vm::ACK_TIMEOUT` (1 s), the Start of a fleet (posted to every VM
//! first, then confirmed) after 30 s, since a new thread on a host busy with the guests started
//! before it may wait long for its first time slice; a stop waits for the vCPUs of a VM until
//! one deadline (`Vm::finish_stop_by`, `Vm::dismantle`).
//!
//! **Lock order.** `VmControl`'s lifecycle lock, then either the gate's lock or a handle's thread
//! lock (taken to kick or join); those two are leaves (nothing else is taken and no kick is sent
//! while the gate's lock is held). No lock is held while waiting for vCPUs: stops, pauses and
//! holds wait on the gate's condition variable with a deadline, so a slow or stuck vCPU never
//! blocks another thread's lifecycle call behind a lock.

use std::cell::Cell;
use std::fmt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::devices::IDLE_PORT;
use crate::memory::GuestRam;
use crate::vm::VmShared;

/// How long a payload's read of the idle port may keep its vCPU in the VMM.
const IDLE_SLICE: Duration = Duration::from_millis(10);
/// How often a kick is sent again while a hold or an acknowledgement is awaited.
pub const KICK_RESEND: Duration = Duration::from_millis(2);
/// Longest wait between two re-sent kicks.
pub const MAX_KICK_RESEND: Duration = Duration::from_millis(32);

/// The wait before re-send number `n` (0-based): [`KICK_RESEND`], doubling up to
/// [`MAX_KICK_RESEND`]. Kicks are real-time signals, which queue: a vCPU thread that waits long
/// for a CPU should not find hundreds of them pending.
fn resend_after(n: u32) -> Duration {
    KICK_RESEND
        .saturating_mul(1 << n.min(8))
        .min(MAX_KICK_RESEND)
}

/// When a hold first sends a kick again (and treats the vCPUs still inside as stragglers).
pub const FIRST_RESEND: Duration = Duration::from_micros(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start vCPU thread {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {index} did not acknowledge '{command:?}' (#{seq}) within {timeout:?}")]
    NoAck {
        index: u8,
        command: Command,
        seq: u64,
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
    /// `--duration` ended the run as planned: a clean end.
    Planned,
    /// Stopped through `kvmerge serve`'s API (a stop, a delete or a shutdown): a clean end.
    Requested,
    /// kvmerge received SIGINT or SIGTERM.
    Signal(i32),
    /// The user quit the interactive console.
    Quit,
    /// kvmerge stopped the guest to relieve host or cgroup memory pressure (src/pressure.rs).
    Shed,
}

impl VmEnd {
    /// Successful ends: exit code 0, a clean reset or poweroff, or `--duration` being over.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VmEnd::Exit(0) | VmEnd::Reset | VmEnd::Poweroff | VmEnd::Planned | VmEnd::Requested
        )
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
            VmEnd::Planned => write!(f, "ran for its --duration"),
            VmEnd::Requested => write!(f, "stopped on request"),
            VmEnd::Signal(sig) => write!(f, "stopped by signal {sig}"),
            VmEnd::Quit => write!(f, "stopped from the console"),
            VmEnd::Shed => write!(f, "stopped to relieve host memory pressure"),
        }
    }
}

/// A command to one vCPU thread; see the module docs for how they are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leave the Created state: from now on enter the guest whenever no hold is up.
    Start,
    /// End the thread: it hands its VcpuFd and its reference to guest RAM to the VMM
    /// ([`Remains`]) and ends when released.
    Exit,
}

/// What a vCPU thread reports in an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Started: runs the guest unless held (or the VM has ended).
    Running,
    Exited,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Const-initialised: no lazy setup or
    /// destructor runs inside the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by a `KickTarget` while
        // its VcpuFd is alive and cleared when the target drops (before the VcpuFd, also on
        // unwind); a byte store is async-signal-safe.
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

/// Points this thread's kick handler at a `kvm_run` for as long as it lives; dropping it (also
/// while unwinding) clears the pointer, so a late kick never writes through a stale one.
struct KickTarget(());

impl KickTarget {
    /// # Safety
    /// `run` must stay valid (mapped and writable) until the returned guard drops.
    unsafe fn install(run: *mut kvm_run) -> KickTarget {
        KVM_RUN.with(|c| c.set(run));
        KickTarget(())
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// A thread moved to SCHED_FIFO at the lowest real-time priority, put back when this drops.
///
/// Short holds use it twice: the holder runs boosted, so that on a busy host the other runnable
/// threads cannot preempt it inside a hold, and a vCPU that has not left the guest soon after its
/// kick (it was preempted inside KVM_RUN, and on a busy host would wait whole time slices for a
/// CPU) is boosted until it has left, so that it runs at once. It needs CAP_SYS_NICE (or an
/// RLIMIT_RTPRIO); without it nothing changes, and the log says so once.
pub struct RtBoost {
    tid: libc::pid_t,
    policy: libc::c_int,
    param: libc::sched_param,
}

static RT_REFUSED: AtomicBool = AtomicBool::new(false);

impl RtBoost {
    /// Boosts thread `tid` (of this process); None when not permitted, already real-time, or
    /// the thread is gone.
    pub fn thread(tid: libc::pid_t) -> Option<RtBoost> {
        if tid <= 0 || RT_REFUSED.load(Ordering::Relaxed) {
            return None;
        }
        // SAFETY: queries a thread's scheduling policy; no memory is passed.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy < 0 || policy == libc::SCHED_FIFO || policy == libc::SCHED_RR {
            return None;
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a valid out pointer for the thread's parameters.
        if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
            return None;
        }
        let rt = libc::sched_param { sched_priority: 1 };
        // SAFETY: changes only the scheduling policy of a thread of this process.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &rt) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) && !RT_REFUSED.swap(true, Ordering::Relaxed) {
                log::info!(
                    "zero-page holds and stops run at normal priority ({e}): on a busy host they \
                     last as long as the scheduler makes them"
                );
            }
            return None;
        }
        Some(RtBoost { tid, policy, param })
    }

    /// Boosts the calling thread.
    pub fn this_thread() -> Option<RtBoost> {
        // SAFETY: gettid has no preconditions.
        RtBoost::thread(unsafe { libc::gettid() })
    }
}

impl Drop for RtBoost {
    fn drop(&mut self) {
        // SAFETY: restores the policy read in `thread`; ESRCH (the thread has ended) is fine.
        if unsafe { libc::sched_setscheduler(self.tid, self.policy, &self.param) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                log::warn!(
                    "cannot restore the scheduling policy of thread {}: {e}",
                    self.tid
                );
            }
        }
    }
}

/// One vCPU's part of the gate.
#[derive(Default)]
struct Slot {
    in_guest: AtomicBool,
    /// Number of the latest command posted to this vCPU (0: none yet).
    posted: AtomicU64,
    /// The thread has ended (or never started): it can be neither inside nor acknowledge.
    gone: AtomicBool,
    /// What the thread left on Exit, for the VMM to drop ([`VcpuPort::exit_with`]).
    remains: Mutex<Option<Remains>>,
}

/// Commands and acknowledgements, under the gate's lock.
#[derive(Default)]
struct Mail {
    next_seq: u64,
    /// Per vCPU: the latest command posted and its number.
    commands: Vec<Option<(u64, Command)>>,
    /// Per vCPU: the latest acknowledgement (number, state).
    acks: Vec<(u64, Option<State>)>,
    /// vCPU threads that acknowledged Exit may end now (see [`Gate::release`]).
    released: bool,
}

/// The one place where a VM's vCPUs are held out of the guest and told what to do (module docs).
pub struct Gate {
    pub(crate) holds: AtomicU32,
    slots: Box<[Slot]>,
    mail: Mutex<Mail>,
    /// Signalled when a vCPU leaves the guest during a hold, a hold ends, a command is posted,
    /// acknowledged, or a vCPU thread ends.
    changed: Condvar,
}

impl Gate {
    pub fn new(vcpus: usize) -> Gate {
        Gate {
            holds: AtomicU32::new(0),
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            mail: Mutex::new(Mail {
                next_seq: 0,
                commands: vec![None; vcpus],
                acks: vec![(0, None); vcpus],
                released: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mail> {
        crate::sync::lock(&self.mail)
    }

    /// Lets vCPU threads that acknowledged Exit end. Until then they wait, out of the guest and
    /// away from the address space: a thread that ends unmaps and advises its stack and leaves
    /// the process's mm, all under the address-space lock, and a thousand of them doing so at
    /// once (a fleet told to stop) stalled the merge thread's last look at guest memory for most
    /// of a second. The VMM releases a VM's threads when it collects them.
    pub fn release(&self) {
        let mut mail = self.lock();
        mail.released = true;
        self.changed.notify_all();
    }

    fn wait_until<'a>(
        &'a self,
        guard: MutexGuard<'a, Mail>,
        until: Instant,
    ) -> MutexGuard<'a, Mail> {
        let left = until.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(guard, left)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// Holds every vCPU out of the guest until the returned guard drops (also on a panic):
    /// raises a hold, kicks the vCPUs inside (and again, see [`resend_after`]) and waits until none
    /// is. On error the hold is already released. Holds may overlap (they count).
    pub fn hold(&self, kick: impl FnMut(usize), timeout: Duration) -> Result<Held<'_>> {
        self.raise();
        let held = Held(self);
        self.wait_out(kick, timeout)?;
        Ok(held)
    }

    /// Raises a hold without waiting; [`Gate::wait_out`] waits for it, [`Gate::lower`] ends it.
    pub(crate) fn raise(&self) {
        self.holds.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends one hold; when none is left, waiting vCPUs enter the guest again.
    pub(crate) fn lower(&self) {
        if self.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _guard = self.lock();
            self.changed.notify_all();
        }
    }

    /// Waits (a raised hold) until no vCPU is inside the guest, kicking those inside.
    pub(crate) fn wait_out(&self, kick: impl FnMut(usize), timeout: Duration) -> Result<()> {
        self.wait_out_with(kick, |_| {}, timeout)
    }

    /// As [`Gate::wait_out`]; `straggler(index)` is called once for each vCPU still inside
    /// [`FIRST_RESEND`] after the first kick (it is then most likely preempted inside KVM_RUN).
    pub(crate) fn wait_out_with(
        &self,
        mut kick: impl FnMut(usize),
        mut straggler: impl FnMut(usize),
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut next_kick = Instant::now();
        let mut round = 0u32;
        loop {
            let Some(index) = self.first_inside() else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::NoHold { index, timeout });
            }
            if now >= next_kick {
                for i in (0..self.slots.len()).filter(|&i| self.is_inside(i)) {
                    if round == 1 {
                        straggler(i);
                    }
                    kick(i);
                }
                next_kick = now
                    + if round == 0 {
                        FIRST_RESEND
                    } else {
                        resend_after(round - 1)
                    };
                round += 1;
            }
            let guard = self.lock();
            // Checked under the lock: `leave` notifies under it, so no wake-up is missed.
            if self.first_inside().is_some() {
                drop(self.wait_until(guard, next_kick.min(deadline)));
            }
        }
    }

    /// Whether vCPU `index` is inside KVM_RUN (or about to enter it).
    pub fn is_inside(&self, index: usize) -> bool {
        self.slots[index].in_guest.load(Ordering::SeqCst)
    }

    fn first_inside(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.in_guest.load(Ordering::SeqCst))
    }

    /// Posts `command` to vCPU `index` and returns its number; the caller kicks the vCPU.
    pub(crate) fn post(&self, index: usize, command: Command) -> u64 {
        let mut mail = self.lock();
        mail.next_seq += 1;
        let seq = mail.next_seq;
        mail.commands[index] = Some((seq, command));
        self.slots[index].posted.store(seq, Ordering::SeqCst);
        self.changed.notify_all();
        seq
    }

    /// Waits until vCPU `index` has acknowledged command `seq` (or a later one), calling `kick`
    /// again and again (see [`resend_after`]). A vCPU whose thread has ended counts as Exited.
    pub(crate) fn wait_ack(
        &self,
        index: usize,
        seq: u64,
        deadline: Instant,
        mut kick: impl FnMut(),
    ) -> std::result::Result<State, ()> {
        let mut resends = 0;
        let mut next_kick = Instant::now() + resend_after(resends);
        loop {
            {
                let mail = self.lock();
                match mail.acks[index] {
                    (acked, Some(state)) if acked >= seq => return Ok(state),
                    _ if self.slots[index].gone.load(Ordering::SeqCst) => {
                        return Ok(State::Exited);
                    }
                    _ => {}
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(());
                }
                if now < next_kick {
                    drop(self.wait_until(mail, next_kick.min(deadline)));
                    continue;
                }
            }
            // Not acknowledged yet: the kick may have been lost; send it again.
            kick();
            resends += 1;
            next_kick = Instant::now() + resend_after(resends);
        }
    }

    /// The thread side of vCPU `index`.
    pub(crate) fn port(self: &Arc<Gate>, index: usize) -> VcpuPort {
        VcpuPort {
            gate: self.clone(),
            index,
            handled: 0,
        }
    }
}

/// A hold on a VM's vCPUs; dropping it lets them run.
#[must_use = "the vCPUs run again as soon as the hold drops"]
pub struct Held<'a>(&'a Gate);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.lower();
    }
}

/// What a vCPU thread uses of its gate. Dropping it (the thread ends, also by a panic) marks the
/// vCPU gone, so nobody waits for it.
pub(crate) struct VcpuPort {
    gate: Arc<Gate>,
    index: usize,
    /// Number of the latest command taken.
    handled: u64,
}

impl VcpuPort {
    fn slot(&self) -> &Slot {
        &self.gate.slots[self.index]
    }

    /// The command posted since the last one taken, if any (only the newest of several).
    pub(crate) fn next_command(&mut self) -> Option<Command> {
        if self.slot().posted.load(Ordering::SeqCst) == self.handled {
            return None;
        }
        let (seq, command) = self.gate.lock().commands[self.index]?;
        self.handled = seq;
        Some(command)
    }

    /// Acknowledges the latest command taken.
    pub(crate) fn ack(&self, state: State) {
        let mut mail = self.gate.lock();
        mail.acks[self.index] = (self.handled, Some(state));
        self.gate.changed.notify_all();
    }

    /// Leaves for good on Exit: hands `remains` (the thread's VcpuFd and guest RAM reference) to
    /// the VMM, acknowledges, and waits until the VMM releases the VM's threads
    /// ([`Gate::release`]). See [`Remains`].
    pub(crate) fn exit_with(&self, remains: Remains) {
        *crate::sync::lock(&self.slot().remains) = Some(remains);
        self.ack(State::Exited);
        let mut mail = self.gate.lock();
        while !mail.released {
            mail = self
                .gate
                .changed
                .wait(mail)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until a command is posted (or `timeout` passes).
    pub(crate) fn wait_command(&self, timeout: Option<Duration>) {
        let until = timeout.map(|t| Instant::now() + t);
        let mut mail = self.gate.lock();
        while self.slot().posted.load(Ordering::SeqCst) == self.handled {
            mail = match until {
                Some(until) if Instant::now() >= until => return,
                Some(until) => self.gate.wait_until(mail, until),
                None => self
                    .gate
                    .changed
                    .wait(mail)
                    .unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Called right before KVM_RUN: marks the vCPU inside and returns true, or waits while a
    /// hold is up and returns false when a command arrives meanwhile (the vCPU stays outside).
    pub(crate) fn enter(&self) -> bool {
        let gate = &*self.gate;
        loop {
            self.slot().in_guest.store(true, Ordering::SeqCst);
            if gate.holds.load(Ordering::SeqCst) == 0 {
                return true;
            }
            self.leave();
            let mut mail = gate.lock();
            while gate.holds.load(Ordering::SeqCst) > 0 {
                if self.slot().posted.load(Ordering::SeqCst) != self.handled {
                    return false;
                }
                mail = gate.changed.wait(mail).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Called when KVM_RUN has returned.
    pub(crate) fn leave(&self) {
        self.slot().in_guest.store(false, Ordering::SeqCst);
        if self.gate.holds.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this wake-up after the holder's check of the flags.
            let _guard = self.gate.lock();
            self.gate.changed.notify_all();
        }
    }
}

impl Drop for VcpuPort {
    fn drop(&mut self) {
        self.slot().in_guest.store(false, Ordering::SeqCst);
        self.slot().gone.store(true, Ordering::SeqCst);
        let _guard = self.gate.lock();
        self.gate.changed.notify_all();
    }
}

/// The VMM side of one vCPU thread.
pub struct VcpuHandle {
    index: u8,
    gate: Arc<Gate>,
    /// Taken by `join`; kicks go to the thread only while it is here (its pthread_t is valid).
    thread: Mutex<Option<JoinHandle<()>>>,
    tid: Arc<AtomicI32>,
    /// Failed kicks, for the log (one warning, then counted).
    failed_kicks: AtomicU64,
}

impl VcpuHandle {
    /// Starts the thread for `fd`, in the Created state (outside the guest until `Start`). The
    /// thread keeps `ram` (and so the memory behind KVM's memslots) mapped until it ends.
    pub fn spawn(
        fd: VcpuFd,
        index: u8,
        vm: Arc<VmShared>,
        ram: Arc<GuestRam>,
        gate: Arc<Gate>,
    ) -> Result<VcpuHandle> {
        let name = format!("{}-vcpu{index}", vm.name());
        let slow_start = slow_start_injection();
        VcpuHandle::spawn_with(name, index, gate, move |port| {
            // The thread's first act: no guest code runs without its filter.
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                vm.end(VmEnd::Vmm(e.to_string()));
                return;
            }
            VcpuThread {
                fd,
                port,
                vm,
                ended: false,
                ram,
                slow_start,
            }
            .run()
        })
    }

    /// Starts a thread that runs `body` with vCPU `index`'s port (tests use fake vCPUs).
    pub(crate) fn spawn_with(
        name: String,
        index: u8,
        gate: Arc<Gate>,
        body: impl FnOnce(VcpuPort) + Send + 'static,
    ) -> Result<VcpuHandle> {
        init_kick_signal()?;
        let tid = Arc::new(AtomicI32::new(0));
        let thread_tid = tid.clone();
        let port = gate.port(usize::from(index));
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                thread_tid.store(unsafe { libc::gettid() }, Ordering::Release);
                body(port);
            })
            .map_err(|source| Error::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            gate,
            thread: Mutex::new(Some(thread)),
            tid,
            failed_kicks: AtomicU64::new(0),
        })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Posts `command`, kicks the thread so it sees it promptly, and returns its number.
    pub fn post(&self, command: Command) -> u64 {
        let seq = self.gate.post(usize::from(self.index), command);
        self.kick();
        seq
    }

    /// Waits until command `seq` is acknowledged, re-sending kicks, at most until `deadline`.
    pub fn wait_ack(&self, command: Command, seq: u64, deadline: Instant) -> Result<State> {
        let start = Instant::now();
        self.gate
            .wait_ack(usize::from(self.index), seq, deadline, || {
                self.kick();
            })
            .map_err(|()| Error::NoAck {
                index: self.index,
                command,
                seq,
                timeout: deadline.saturating_duration_since(start),
            })
    }

    /// Makes the thread leave KVM_RUN (or not enter it) and look at the gate. Returns whether the
    /// signal was sent; a failure is logged and made good by the callers' re-sends.
    pub fn kick(&self) -> bool {
        let thread = crate::sync::lock(&self.thread);
        let Some(thread) = thread.as_ref() else {
            return false;
        };
        // SAFETY: the thread is not joined yet (we hold its handle under the lock), so its
        // pthread_t is valid even if it has finished.
        let rc = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        if rc == 0 || rc == libc::ESRCH {
            return rc == 0;
        }
        if self.failed_kicks.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "cannot kick vCPU {}: {} (kicks are sent again while waited for)",
                self.index,
                std::io::Error::from_raw_os_error(rc)
            );
        }
        false
    }

    /// What the thread handed over when it acknowledged Exit, once.
    pub fn take_remains(&self) -> Option<Remains> {
        crate::sync::lock(&self.gate.slots[usize::from(self.index)].remains).take()
    }

    /// Releases the VM's threads that acknowledged Exit ([`Gate::release`]) and joins this one
    /// if it acknowledged its exit; otherwise leaves it detached rather than hanging the VMM on a
    /// vCPU stuck in the kernel (it keeps its VcpuFd and guest RAM mapped until it ends).
    pub fn join(&self, acked_exit: bool) {
        // A thread left behind may still acknowledge later: it must not wait for a release then.
        self.gate.release();
        let thread = crate::sync::lock(&self.thread).take();
        if let Some(thread) = thread {
            if acked_exit {
                if thread.join().is_err() {
                    log::error!("vCPU {} thread panicked", self.index);
                }
            } else {
                log::warn!(
                    "vCPU {} thread did not stop; leaving it behind (its guest RAM stays \
                     mapped until it ends)",
                    self.index
                );
            }
        }
    }

    /// Linux thread id, for reading its CPU time (0 until the thread has started).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }
}

impl Drop for VcpuHandle {
    /// A handle dropped without `join` (a VM whose build failed half-way) still tells its thread
    /// to exit, without waiting for it.
    fn drop(&mut self) {
        let running = self.thread.get_mut().map_or(true, |t| t.is_some());
        if running {
            self.post(Command::Exit);
            self.gate.release();
        }
    }
}

/// What a vCPU thread that exits on command hands to the VMM before it ends: its VcpuFd and its
/// reference to guest RAM (in that order, the tuple's drop order), which the VMM drops when it
/// collects the VM ([`VcpuHandle::take_remains`]).
///
/// Why the thread does not drop them itself, and waits to be released before it ends: unmapping
/// `kvm_run`, and a thread's end (glibc advises away its stack, and the joiner unmaps it), each
/// call into the MMU notifier of every live VM of the process, under the address-space lock. A
/// fleet doing that as its threads leave kept the lock busy while the merge thread took its last
/// look at guest memory, and paid for N live VMs N times over. The VMM instead destroys every
/// VM first (dropping these), then releases the threads, whose ends then cost next to nothing.
pub(crate) type Remains = Box<dyn Send>;

struct VcpuThread {
    // Field order is drop order: the VcpuFd (and with it KVM's hold on the memslots) goes
    // before the reference to guest RAM.
    fd: VcpuFd,
    port: VcpuPort,
    vm: Arc<VmShared>,
    /// The VM has ended: stay out of the guest whatever happens.
    ended: bool,
    ram: Arc<GuestRam>,
    /// Test hook: how long to wait before acknowledging Start ([`slow_start_injection`]).
    slow_start: Option<Duration>,
}

/// Test hook: `KVMERGE_INJECT_SLOW_START_MS=N` makes every vCPU thread wait N ms (at most a
/// minute) before it acknowledges Start, as a thread does that waits for its first time slice on
/// a host whose cores are all busy.
fn slow_start_injection() -> Option<Duration> {
    let ms: u64 = std::env::var("KVMERGE_INJECT_SLOW_START_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

impl VcpuThread {
    /// Runs until told to exit, then hands its VcpuFd and guest RAM reference to the VMM
    /// ([`Remains`]). A thread that unwinds drops them itself.
    fn run(mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the kvm_run mapping belongs to `self.fd`, which outlives this local (function
        // parameters drop after the body's locals, also when unwinding).
        let kick_target = unsafe { KickTarget::install(run) };
        let mut started = false;
        loop {
            if let Some(command) = self.port.next_command() {
                match command {
                    Command::Start => {
                        started = true;
                        if let Some(delay) = self.slow_start {
                            std::thread::sleep(delay);
                        }
                        self.port.ack(State::Running);
                    }
                    Command::Exit => {
                        // No kick may write through kvm_run once the VMM may unmap it.
                        drop(kick_target);
                        let VcpuThread { fd, ram, port, .. } = self;
                        port.exit_with(Box::new((fd, ram)));
                        return;
                    }
                }
                continue;
            }
            if !started || self.ended {
                self.port.wait_command(None);
                continue;
            }
            if let Some(end) = self.enter_guest() {
                self.vm.end(end);
                self.ended = true;
            }
            crate::seccomp::injection_point();
        }
    }

    /// Runs the guest until one exit has been handled (or not at all when a command arrived
    /// while held); returns why the VM ends, if it does.
    fn enter_guest(&mut self) -> Option<VmEnd> {
        if !self.port.enter() {
            return None;
        }
        let result = self.fd.run();
        self.port.leave();
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag; the loop looks at the gate.
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return Some(VmEnd::Vmm(format!("KVM_RUN failed: {e}"))),
        };
        match exit {
            VcpuExit::IoIn(IDLE_PORT, data) => {
                data.fill(0);
                // Outside the guest: holds need not wait for this; commands cut it short.
                self.port.wait_command(Some(IDLE_SLICE));
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
    use std::sync::atomic::AtomicUsize;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Threads that behave like vCPUs towards a [`Gate`]: "run the guest" (count) until kicked or
    /// until they leave on their own every so often, and obey Exit.
    struct FakeVcpus {
        gate: Arc<Gate>,
        kicked: Arc<Vec<AtomicBool>>,
        counts: Arc<Vec<AtomicU64>>,
        threads: Vec<JoinHandle<()>>,
    }

    impl FakeVcpus {
        fn start(n: usize) -> FakeVcpus {
            let gate = Arc::new(Gate::new(n));
            let kicked: Arc<Vec<AtomicBool>> =
                Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
            let counts: Arc<Vec<AtomicU64>> =
                Arc::new((0..n).map(|_| Default::default()).collect());
            let threads = (0..n)
                .map(|i| {
                    let (kicked, counts) = (kicked.clone(), counts.clone());
                    let mut port = gate.port(i);
                    std::thread::spawn(move || {
                        loop {
                            if port.next_command() == Some(Command::Exit) {
                                port.ack(State::Exited);
                                return;
                            }
                            if !port.enter() {
                                continue;
                            }
                            for _ in 0..10_000 {
                                if kicked[i].swap(false, Ordering::SeqCst) {
                                    break;
                                }
                                counts[i].fetch_add(1, Ordering::SeqCst);
                            }
                            port.leave();
                        }
                    })
                })
                .collect();
            FakeVcpus {
                gate,
                kicked,
                counts,
                threads,
            }
        }

        fn counts(&self) -> Vec<u64> {
            self.counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect()
        }

        fn kick(&self) -> impl FnMut(usize) + '_ {
            |i| self.kicked[i].store(true, Ordering::SeqCst)
        }

        fn finish(self) {
            for i in 0..self.threads.len() {
                let seq = self.gate.post(i, Command::Exit);
                let kick = || self.kicked[i].store(true, Ordering::SeqCst);
                assert_eq!(
                    self.gate.wait_ack(i, seq, soon(30_000), kick),
                    Ok(State::Exited)
                );
            }
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
    fn holds_overlap_and_the_last_one_out_releases() {
        let vcpus = FakeVcpus::start(2);
        let long = vcpus
            .gate
            .hold(vcpus.kick(), Duration::from_secs(5))
            .unwrap();
        let short = vcpus
            .gate
            .hold(vcpus.kick(), Duration::from_secs(5))
            .unwrap();
        drop(short);
        let at = vcpus.counts();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(vcpus.counts(), at, "a vCPU ran while a hold was still up");
        drop(long);
        let deadline = soon(30_000);
        while vcpus.counts() == at {
            assert!(Instant::now() < deadline, "the vCPUs never ran again");
            std::thread::yield_now();
        }
        vcpus.finish();
    }

    #[test]
    fn a_vcpu_that_never_leaves_fails_the_hold_and_releases_it() {
        let gate = Arc::new(Gate::new(2));
        let (p0, p1) = (gate.port(0), gate.port(1));
        assert!(p1.enter()); // inside, and deaf to kicks: a vCPU stuck in a long exit
        let kicks = AtomicUsize::new(0);
        let err = gate
            .hold(
                |_| {
                    kicks.fetch_add(1, Ordering::SeqCst);
                },
                Duration::from_millis(50),
            )
            .err()
            .unwrap();
        assert!(matches!(err, Error::NoHold { index: 1, .. }), "{err}");
        assert!(kicks.load(Ordering::SeqCst) >= 2, "kicks were re-sent");
        // A vCPU still inside after the first re-send is a straggler, reported once.
        let mut stragglers = Vec::new();
        gate.raise();
        let err = gate.wait_out_with(|_| {}, |i| stragglers.push(i), Duration::from_millis(50));
        gate.lower();
        assert!(err.is_err());
        assert_eq!(stragglers, vec![1]);
        // The failed hold did not stay raised: another vCPU enters without waiting.
        assert!(p0.enter());
        p0.leave();
        p1.leave();
        drop(
            gate.hold(|_| panic!("nobody is inside"), Duration::from_millis(50))
                .unwrap(),
        );
    }

    #[test]
    fn re_sends_back_off() {
        assert_eq!(resend_after(0), KICK_RESEND);
        assert_eq!(resend_after(1), KICK_RESEND * 2);
        assert_eq!(resend_after(30), MAX_KICK_RESEND);
    }

    #[test]
    fn a_late_ack_is_never_taken_for_a_later_commands_ack() {
        let gate = Arc::new(Gate::new(1));
        let mut port = gate.port(0);
        let start = gate.post(0, Command::Start);
        // The vCPU is slow: the wait times out.
        assert_eq!(gate.wait_ack(0, start, soon(20), || {}), Err(()));
        // It takes the command late; meanwhile the VMM has moved on to the next command.
        assert_eq!(port.next_command(), Some(Command::Start));
        let exit = gate.post(0, Command::Exit);
        port.ack(State::Running); // the late acknowledgement, of #start
        assert_eq!(
            gate.wait_ack(0, exit, soon(20), || {}),
            Err(()),
            "the acknowledgement of #{start} was taken for #{exit}"
        );
        assert_eq!(port.next_command(), Some(Command::Exit));
        port.ack(State::Exited);
        assert_eq!(gate.wait_ack(0, exit, soon(20), || {}), Ok(State::Exited));
        // An older number is satisfied by a newer acknowledgement (the vCPU saw a later command).
        assert_eq!(gate.wait_ack(0, start, soon(20), || {}), Ok(State::Exited));
        // Commands posted before the vCPU looks: it sees only the newest.
        gate.post(0, Command::Start);
        let last = gate.post(0, Command::Exit);
        assert_eq!(port.next_command(), Some(Command::Exit));
        assert_eq!(port.next_command(), None);
        port.ack(State::Exited);
        assert_eq!(gate.wait_ack(0, last, soon(20), || {}), Ok(State::Exited));
    }

    #[test]
    fn a_lost_kick_is_sent_again() {
        // A vCPU inside the guest that misses the first kick (it arrived between its checks, or
        // pthread_kill failed) and leaves only on the second.
        let gate = Arc::new(Gate::new(1));
        let kicks = Arc::new(AtomicUsize::new(0));
        let inside = Arc::new(AtomicBool::new(false));
        let spawn = |gate: &Arc<Gate>| {
            let (kicks, inside) = (kicks.clone(), inside.clone());
            let mut port = gate.port(0);
            let base = kicks.load(Ordering::SeqCst);
            std::thread::spawn(move || {
                assert!(port.enter());
                inside.store(true, Ordering::SeqCst);
                while kicks.load(Ordering::SeqCst) < base + 2 {
                    std::thread::yield_now();
                }
                port.leave();
                inside.store(false, Ordering::SeqCst);
                if port.next_command() == Some(Command::Exit) {
                    port.ack(State::Exited);
                }
            })
        };
        let kick = || {
            kicks.fetch_add(1, Ordering::SeqCst);
        };
        // A hold.
        let vcpu = spawn(&gate);
        while !inside.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let held = gate.hold(|_| kick(), Duration::from_secs(60)).unwrap();
        assert!(kicks.load(Ordering::SeqCst) >= 2);
        drop(held);
        vcpu.join().unwrap();
        // An acknowledgement.
        let gate = Arc::new(Gate::new(1));
        let vcpu = spawn(&gate);
        while !inside.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let before = kicks.load(Ordering::SeqCst);
        let seq = gate.post(0, Command::Exit);
        kick();
        assert_eq!(gate.wait_ack(0, seq, soon(60_000), kick), Ok(State::Exited));
        assert!(kicks.load(Ordering::SeqCst) >= before + 2);
        vcpu.join().unwrap();
    }

    #[test]
    fn a_command_reaches_a_held_vcpu_and_an_ended_thread_counts_as_exited() {
        let gate = Arc::new(Gate::new(1));
        gate.raise(); // paused
        let mut port = gate.port(0);
        let vcpu = std::thread::spawn(move || {
            // Waits at the gate until the command comes.
            assert!(!port.enter());
            assert_eq!(port.next_command(), Some(Command::Exit));
            // Ends without acknowledging (as a panicking thread would).
        });
        let seq = gate.post(0, Command::Exit);
        assert_eq!(
            gate.wait_ack(0, seq, soon(60_000), || {}),
            Ok(State::Exited)
        );
        vcpu.join().unwrap();
        gate.lower();
    }

    #[test]
    fn a_boost_is_undone() {
        // SAFETY: sched_getscheduler reads a thread's policy; no memory is passed.
        let policy = |tid| unsafe { libc::sched_getscheduler(tid) };
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = policy(tid);
        {
            let boost = RtBoost::thread(tid);
            let want = if boost.is_some() {
                libc::SCHED_FIFO
            } else {
                before
            };
            assert_eq!(policy(tid), want);
        }
        assert_eq!(policy(tid), before, "the boost was not undone");
        drop(stop_tx);
        other.join().unwrap();
    }

    #[test]
    fn a_dropped_handle_tells_its_thread_to_exit() {
        let gate = Arc::new(Gate::new(1));
        let handle = VcpuHandle::spawn_with("unit-vcpu".into(), 0, gate.clone(), |mut port| {
            loop {
                match port.next_command() {
                    Some(Command::Exit) => return,
                    Some(Command::Start) => port.ack(State::Running),
                    None => port.wait_command(None),
                }
            }
        })
        .unwrap();
        drop(handle);
        let deadline = soon(60_000);
        while !gate.slots[0].gone.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the thread of a dropped handle lives on"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Records which thread dropped it.
    struct DroppedBy(Arc<Mutex<Option<std::thread::ThreadId>>>);

    impl Drop for DroppedBy {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }

    #[test]
    fn an_exiting_thread_hands_over_its_remains_and_ends_only_when_released() {
        let gate = Arc::new(Gate::new(1));
        let dropped_by = Arc::new(Mutex::new(None));
        let remains = DroppedBy(dropped_by.clone());
        let handle =
            VcpuHandle::spawn_with("unit-vcpu".into(), 0, gate.clone(), move |mut port| {
                loop {
                    match port.next_command() {
                        Some(Command::Exit) => return port.exit_with(Box::new(remains)),
                        Some(Command::Start) => port.ack(State::Running),
                        None => port.wait_command(None),
                    }
                }
            })
            .unwrap();
        let seq = handle.post(Command::Exit);
        assert_eq!(
            handle.wait_ack(Command::Exit, seq, soon(60_000)).unwrap(),
            State::Exited
        );
        let taken = handle
            .take_remains()
            .expect("the thread handed over its remains");
        assert!(
            handle.take_remains().is_none(),
            "remains are handed over once"
        );
        // Not released: the thread waits, alive, out of the guest.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !gate.slots[0].gone.load(Ordering::SeqCst),
            "the thread ended before release"
        );
        drop(taken);
        assert_eq!(
            *dropped_by.lock().unwrap(),
            Some(std::thread::current().id()),
            "the VMM, not the vCPU thread, drops the VcpuFd"
        );
        handle.join(true);
        assert!(
            gate.slots[0].gone.load(Ordering::SeqCst),
            "joined, so ended"
        );
    }

    #[test]
    fn the_kick_target_is_cleared_when_the_thread_unwinds() {
        init_kick_signal().unwrap();
        let cleared = std::thread::spawn(|| {
            let mut run = Box::new(kvm_run::default());
            let ptr: *mut kvm_run = &mut *run;
            let kick_self = || {
                // SAFETY: signalling the calling thread; the handler only touches KVM_RUN.
                let rc = unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
                assert_eq!(rc, 0);
            };
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: `run` outlives the guard.
                let _target = unsafe { KickTarget::install(ptr) };
                kick_self();
                panic!("a vCPU thread unwinds");
            }));
            assert!(unwound.is_err());
            // SAFETY: `ptr` points into the live box; no kick writes concurrently now.
            let kicked = unsafe { std::ptr::addr_of!((*ptr).immediate_exit).read_volatile() };
            assert_eq!(
                kicked, 1,
                "the kick reached kvm_run while the target was set"
            );
            // SAFETY: as above.
            unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(0) };
            kick_self();
            // SAFETY: as above.
            let after = unsafe { std::ptr::addr_of!((*ptr).immediate_exit).read_volatile() };
            (KVM_RUN.with(Cell::get).is_null(), after)
        })
        .join()
        .unwrap();
        assert_eq!(
            cleared,
            (true, 0),
            "a kick after the unwind wrote through the old pointer"
        );
    }
}
