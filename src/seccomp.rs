//! Seccomp filters, one per kind of kvmerge thread, built in Rust with seccompiler.
//!
//! | kind | runs | may |
//! | --- | --- | --- |
//! | [`ThreadKind::Vcpu`] | one per guest vCPU | `KVM_RUN`, write (console, eventfds), futex, memory |
//! | [`ThreadKind::Merge`] | the merge thread | read /proc and sysfs, write KSM knobs and the host-state journal, `madvise` guest RAM |
//! | [`ThreadKind::Io`] | I/O workers (console writers) | read, write and poll the descriptors they were handed |
//! | [`ThreadKind::Monitor`] | the memory-pressure guard | read /proc, sysfs and cgroup files, poll PSI triggers, stop guests |
//! | [`ThreadKind::Control`] | the thread that called [`crate::runner::run`] | the control loop, teardown, restoring host state; a superset of the others but vCPU |
//! | [`ThreadKind::Api`] | `kvmerge serve`'s API threads (acceptor, one per connection) | accept and talk on the API socket, start connection threads; open no file |
//! | [`ThreadKind::Builder`] | `kvmerge serve`'s VM builder | what the control kind may, plus building VMs: KVM ioctls, guest RAM mappings |
//!
//! Every thread installs its filter as its first statement; the control thread installs its own
//! after the fleet is built and before any guest runs. A thread started after that inherits the
//! control filter, and its own filter stacks on top (the kernel applies the strictest answer), so
//! the control kind allows everything the merge, I/O and monitor kinds do. Threads that run before the
//! control filter and never run guest code (the fleet builders) need none; teardown workers run
//! under the inherited control filter, since they do part of the control thread's job.
//!
//! `--seccomp kill` (the default): a system call outside the allowlist is not executed; the kernel
//! sends SIGSYS, whose handler writes one line to stderr (`kvmerge: vm0-vcpu0: blocked system call
//! 41 (socket) by the seccomp filter; stopping`) and then
//! - in the control thread: exits the process at once with [`EXIT_STATUS`] (host state that only
//!   the control thread restores is repaired by the next kvmerge start);
//! - in any other thread: records the violation, wakes the control loop through an eventfd, and
//!   parks the thread for good. The control loop stops every guest and exits through the normal
//!   path (KSM knobs restored) with [`EXIT_STATUS`]. Should that path not finish within
//!   [`PARK_BOUND`] (say it waits for a lock the parked thread holds), the parked thread ends the
//!   process itself, with the same status.
//!
//! `--seccomp log`: the same allowlists; the kernel allows and logs (audit, `dmesg`) every call
//! outside them. `--seccomp off`: no filter.
//!
//! Reading a file is refused (EPERM) rather than trapped in vCPU and I/O threads: the only code
//! there that opens files is a panic's hook and backtrace, which then fail cleanly and let the
//! panic be reported.
//!
//! Test hook: `KVMERGE_INJECT_SYSCALL=vcpu|merge|control|io|monitor` makes one thread of that kind call
//! `socket(2)` (outside every allowlist) at its first injection point after the merge thread's
//! third tick, when KSM is steered.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::eventfd::EventFd;

/// Exit status of a run stopped by a seccomp violation: 128 + SIGSYS, what a shell reports for a
/// process the kernel killed with SIGSYS, which is also what happens if the handler cannot run.
pub const EXIT_STATUS: u8 = 128 + libc::SIGSYS as u8;

/// How long a parked thread waits for the control loop to end the process.
pub const PARK_BOUND: Duration = Duration::from_secs(30);

/// `KVM_RUN` = `_IO(KVMIO, 0x80)`: the one ioctl a vCPU thread makes.
const KVM_RUN: u64 = 0xae80;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {kind} thread")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error(
        "cannot install the seccomp filter of the {kind} thread (on a kernel without seccomp, \
         run with --seccomp off)"
    )]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot set up seccomp violation reports")]
    Setup(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `--seccomp`: what a system call outside a thread's allowlist does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Not executed: the run stops every guest and exits with status 159.
    #[default]
    Kill,
    /// Executed, and logged by the kernel (audit log, dmesg).
    Log,
    /// No filter.
    Off,
}

/// Which allowlist a thread runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread running the control loop (`runner::run`'s caller).
    Control,
    /// A guest vCPU.
    Vcpu,
    /// The merge thread.
    Merge,
    /// An I/O worker: moves bytes between descriptors it was handed (console writers); opens
    /// nothing.
    Io,
    /// A watcher of host state (the memory-pressure guard): reads /proc, sysfs and cgroup files,
    /// waits on PSI triggers, measures and stops guests.
    Monitor,
    /// `kvmerge serve`'s API: accepts connections on its socket, reads requests and writes
    /// answers, one thread per connection; hands every request to the control loop.
    Api,
    /// `kvmerge serve`'s builder: builds and starts the VMs the API asks for while guests run
    /// (the control thread's filter forbids building: KVM's set-up ioctls, guest RAM mappings).
    Builder,
}

const KINDS: [ThreadKind; 7] = [
    ThreadKind::Control,
    ThreadKind::Vcpu,
    ThreadKind::Merge,
    ThreadKind::Io,
    ThreadKind::Monitor,
    ThreadKind::Api,
    ThreadKind::Builder,
];

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Merge => "merge",
            ThreadKind::Io => "io",
            ThreadKind::Monitor => "monitor",
            ThreadKind::Api => "api",
            ThreadKind::Builder => "builder",
        }
    }

    /// 1-based, so that 0 means "no kind" in the atomics below.
    fn code(self) -> u8 {
        match self {
            ThreadKind::Control => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::Merge => 3,
            ThreadKind::Io => 4,
            ThreadKind::Monitor => 5,
            ThreadKind::Api => 6,
            ThreadKind::Builder => 7,
        }
    }

    fn from_code(code: u8) -> Option<ThreadKind> {
        KINDS.into_iter().find(|k| k.code() == code)
    }
}

/// The first system call the filter stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// `None` for a thread that inherited its filter (a teardown worker).
    pub kind: Option<ThreadKind>,
    pub syscall: i64,
}

/// The mode of this process's runs; `Off` until [`prepare`] says otherwise.
static MODE: AtomicU8 = AtomicU8::new(MODE_OFF);
/// [`prepare`] has decided the mode (and compiled the filters it needs).
static PREPARED: AtomicBool = AtomicBool::new(false);
const MODE_OFF: u8 = 0;
const MODE_LOG: u8 = 1;
const MODE_KILL: u8 = 2;
/// The compiled filters, per kind, in installation order.
static PROGRAMS: Mutex<Option<Arc<Programs>>> = Mutex::new(None);
/// The eventfd the SIGSYS handler writes to wake the control loop (-1: none yet).
static VIOLATION_FD: AtomicI32 = AtomicI32::new(-1);
/// First violation: kind code << 32 | syscall number, plus 1 << 40 so that 0 means none.
static BLOCKED: AtomicU64 = AtomicU64::new(0);
/// Kinds with a parked thread, one bit per kind code.
static PARKED: AtomicU32 = AtomicU32::new(0);
/// Ticks the merge thread has completed (for the injection hook).
static MERGE_PASSES: AtomicU32 = AtomicU32::new(0);
static INJECTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's kind (its code), 0 when it called no [`install`]. Const-initialised and without
    /// destructor, so the SIGSYS handler may read it.
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// Whether this thread is the one `KVMERGE_INJECT_SYSCALL` names.
    static INJECT: Cell<bool> = const { Cell::new(false) };
}

struct Programs {
    per_kind: Vec<(ThreadKind, Vec<BpfProgram>)>,
}

/// Sets the mode for this process's threads, compiles every kind's filter (so that a build
/// error shows before anything starts) and, for `kill`, installs the SIGSYS handler. Returns the
/// eventfd the control loop watches for violations (`kill` only).
pub fn prepare(mode: SeccompMode) -> Result<Option<RawFd>> {
    let code = match mode {
        SeccompMode::Off => MODE_OFF,
        SeccompMode::Log => MODE_LOG,
        SeccompMode::Kill => MODE_KILL,
    };
    if mode == SeccompMode::Off {
        MODE.store(code, Ordering::SeqCst);
        PREPARED.store(true, Ordering::SeqCst);
        return Ok(None);
    }
    let programs = compile_all(mode, std::process::id())?;
    *crate::sync::lock(&PROGRAMS) = Some(Arc::new(programs));
    MODE.store(code, Ordering::SeqCst);
    PREPARED.store(true, Ordering::SeqCst);
    if mode != SeccompMode::Kill {
        return Ok(None);
    }
    install_sigsys_handler()?;
    let fd = VIOLATION_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        return Ok(Some(fd));
    }
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Setup)?;
    let fd = evt.as_raw_fd();
    // The descriptor lives as long as the process: the handler may write to it at any time.
    std::mem::forget(evt);
    VIOLATION_FD.store(fd, Ordering::SeqCst);
    Ok(Some(fd))
}

/// Installs the calling thread's filter for the mode [`prepare`] set (nothing when it was not
/// called, or `off`). Call it as the thread's first statement; it cannot be undone.
///
/// Returns false when [`prepare`] has not decided the mode yet: a thread started that early (the
/// stderr writer, for a line printed during the pre-flight checks) calls again later
/// ([`prepared`]) to get its filter.
pub fn install(kind: ThreadKind) -> Result<bool> {
    KIND.with(|c| c.set(kind.code()));
    INJECT.with(|c| c.set(injection_wanted(kind)));
    if !PREPARED.load(Ordering::SeqCst) {
        return Ok(false);
    }
    if MODE.load(Ordering::SeqCst) == MODE_OFF {
        return Ok(true);
    }
    let programs = crate::sync::lock(&PROGRAMS).clone();
    let Some(programs) = programs else {
        return Ok(true);
    };
    let (_, list) = programs
        .per_kind
        .iter()
        .find(|(k, _)| *k == kind)
        .expect("every kind is compiled");
    for program in list {
        seccompiler::apply_filter(program).map_err(|source| Error::Install {
            kind: kind.name(),
            source,
        })?;
    }
    Ok(true)
}

/// Whether [`prepare`] has decided the mode: a thread whose [`install`] came too early may
/// install its filter now.
pub fn prepared() -> bool {
    PREPARED.load(Ordering::SeqCst)
}

/// The first system call a filter stopped in this process, if any.
pub fn blocked() -> Option<Blocked> {
    let v = BLOCKED.load(Ordering::SeqCst);
    (v != 0).then(|| Blocked {
        kind: ThreadKind::from_code((v >> 32) as u8),
        syscall: i64::from(v as u32),
    })
}

/// Whether a thread of `kind` is parked after a violation: never wait for it (join) again.
pub fn parked(kind: ThreadKind) -> bool {
    PARKED.load(Ordering::SeqCst) & (1 << kind.code()) != 0
}

/// Test hook: call where a thread of its kind makes progress (each vCPU exit, each merge tick,
/// each control-loop turn). Makes the call `KVMERGE_INJECT_SYSCALL` asks for, once per process.
pub fn injection_point() {
    let kind = KIND.with(Cell::get);
    if kind == ThreadKind::Merge.code() {
        MERGE_PASSES.fetch_add(1, Ordering::SeqCst);
    }
    if !INJECT.with(Cell::get) || MERGE_PASSES.load(Ordering::SeqCst) < 3 {
        return;
    }
    if INJECTED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: creating a socket has no memory preconditions; under `kill` the call never returns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just created.
        unsafe { libc::close(fd) };
    }
    let name = ThreadKind::from_code(kind).map_or("", ThreadKind::name);
    log::warn!("KVMERGE_INJECT_SYSCALL: socket(2) from the {name} thread was allowed");
}

fn injection_wanted(kind: ThreadKind) -> bool {
    std::env::var("KVMERGE_INJECT_SYSCALL").is_ok_and(|v| v == kind.name())
}

/// The name of an x86_64 system call, for messages.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| SYSCALL_NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown")
}

// ---------------------------------------------------------------------------------------------
// Allowlists.

/// Syscall → rules; no rule means any arguments.
#[derive(Clone, Default)]
struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    fn allow(&mut self, nrs: &[libc::c_long]) -> &mut Rules {
        for &nr in nrs {
            self.0.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `nr` when every condition holds (or when another rule for it does).
    fn allow_if(&mut self, nr: libc::c_long, conditions: Vec<SeccompCondition>) -> &mut Rules {
        let rule = SeccompRule::new(conditions).expect("a rule has conditions");
        match self.0.get_mut(&nr) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        self
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    fn allow_arg(&mut self, nr: libc::c_long, arg: u8, values: &[u64]) -> &mut Rules {
        for &v in values {
            self.allow_if(nr, vec![eq(arg, v)]);
        }
        self
    }

    /// Everything `self` or `other` allows.
    fn union(&mut self, other: &Rules) -> &mut Rules {
        for (&nr, rules) in &other.0 {
            if rules.is_empty() {
                self.0.insert(nr, Vec::new());
                continue;
            }
            for rule in rules {
                match self.0.get_mut(&nr) {
                    Some(mine) if mine.is_empty() || mine.contains(rule) => {}
                    Some(mine) => mine.push(rule.clone()),
                    None => {
                        self.0.insert(nr, vec![rule.clone()]);
                    }
                }
            }
        }
        self
    }
}

fn eq(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6")
}

fn masked(arg: u8, mask: u64, value: u64) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("argument index below 6")
}

/// What every thread needs: the Rust runtime and glibc (memory, locks, time, thread exit),
/// stderr, and the SIGSYS handler's own calls.
fn runtime(pid: u32) -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_futex,
        // std's channels back off with sched_yield.
        libc::SYS_sched_yield,
        // A futex wait or sleep interrupted by the vCPU kick signal resumes through it.
        libc::SYS_restart_syscall,
        // Returning from the kick and SIGSYS handlers.
        libc::SYS_rt_sigreturn,
        // glibc blocks signals around pthread_kill and while a thread exits.
        libc::SYS_rt_sigprocmask,
        // Rust removes a thread's alternate signal stack when it exits.
        libc::SYS_sigaltstack,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        // stderr, console sinks and eventfds.
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        // std's HashMap seeds its hasher per thread.
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // The allocator and thread stacks, never executable memory.
    r.allow_if(libc::SYS_mmap, vec![masked(2, libc::PROT_EXEC as u64, 0)]);
    r.allow_if(
        libc::SYS_mprotect,
        vec![masked(2, libc::PROT_EXEC as u64, 0)],
    );
    // glibc returns freed memory and an exited thread's stack with MADV_DONTNEED; the merge
    // thread drops reclaimed zero pages of guest RAM the same way.
    r.allow_arg(libc::SYS_madvise, 2, &[libc::MADV_DONTNEED as u64]);
    // Debug builds of std check that a descriptor is open before closing it.
    r.allow_arg(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
    // Signals only to this process: vCPU kicks (pthread_kill) and abort().
    r.allow_if(libc::SYS_tgkill, vec![eq(0, u64::from(pid))]);
    // The SIGSYS handler names the thread it stops.
    r.allow_arg(libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64]);
    // The panic hook runs in whichever thread panics and puts back a terminal the interactive
    // console made raw.
    r.allow_arg(
        libc::SYS_ioctl,
        1,
        &[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF],
    );
    r
}

/// Opening files in threads that never need to (see the module comment): refused with EPERM.
const NO_FILES: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
];

fn vcpu_rules(pid: u32) -> Rules {
    let mut r = runtime(pid);
    // kvm_pvm and hardware KVM alike: the vCPU only runs; its state was set up at build time.
    r.allow_arg(libc::SYS_ioctl, 1, &[KVM_RUN]);
    r
}

/// Threads that watch the host and the guests' memory: the merge thread and the pressure guard.
fn monitor_rules(pid: u32) -> Rules {
    let mut r = runtime(pid);
    r.allow(&[
        // /proc (pagemap, kpageflags, kpagecount, smaps, stat, meminfo, pressure), sysfs (KSM)
        // and cgroup files (memory.max, memory.events).
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        // Finding ksmd in /proc.
        libc::SYS_getdents64,
        // Which pages of guest RAM are resident (zero-page scan, choosing a guest to stop).
        libc::SYS_mincore,
        // std::thread::available_parallelism.
        libc::SYS_sched_getaffinity,
        // Free memory, and PSI triggers waited on with poll or epoll.
        libc::SYS_sysinfo,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // Whether this process runs as root (may steer KSM, may raise priorities).
        libc::SYS_getuid,
        libc::SYS_geteuid,
        // The pressure guard raises its own priority so that it runs when every core is busy.
        libc::SYS_setpriority,
        // A panic's backtrace finds the executable through /proc/self/exe and shortens paths
        // relative to the working directory.
        libc::SYS_readlink,
        libc::SYS_getcwd,
    ]);
    r
}

fn merge_rules(pid: u32) -> Rules {
    let mut r = monitor_rules(pid);
    r.allow(&[
        // The host-state journal under /run/kvmerge: written, synced, renamed into place, locked,
        // its directory private to root.
        libc::SYS_flock,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        // A zero-page hold runs the merge thread, and vCPUs slow to leave the guest, at
        // SCHED_FIFO for its duration.
        libc::SYS_sched_getscheduler,
        libc::SYS_sched_getparam,
        libc::SYS_sched_setscheduler,
    ]);
    // kill(pid, 0): whether the previous owner of the host's KSM knobs is still alive.
    r.allow_arg(libc::SYS_kill, 1, &[0]);
    r
}

fn io_rules(pid: u32) -> Rules {
    let mut r = runtime(pid);
    r.allow(&[
        libc::SYS_read,
        libc::SYS_readv,
        // Waiting for a sink to take more, or for a pressure trigger.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
    ]);
    // Making a sink non-blocking.
    r.allow_arg(
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFL as u64, libc::F_SETFL as u64],
    );
    r.allow_arg(libc::SYS_ioctl, 1, &[libc::FIONBIO]);
    r
}

fn control_rules(pid: u32) -> Rules {
    let mut r = merge_rules(pid);
    r.union(&io_rules(pid));
    r.allow(&[
        // The control loop: event-manager's epoll, timers, eventfds.
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_eventfd2,
        libc::SYS_pipe2,
        // Threads started later (merge thread, teardown workers, I/O workers) install their
        // own filter on top of this one.
        libc::SYS_seccomp,
        // `kvmerge serve` ends its API acceptor by shutting its listening socket down.
        libc::SYS_shutdown,
    ]);
    thread_starts(&mut r);
    r.allow_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]);
    // Duplicating a signalfd to read it; non-blocking and close-on-exec flags.
    r.allow_arg(
        libc::SYS_fcntl,
        1,
        &[libc::F_DUPFD_CLOEXEC as u64, libc::F_SETFD as u64],
    );
    // The terminal: restoring the mode an interactive console changed, its size, isatty.
    r.allow_arg(
        libc::SYS_ioctl,
        1,
        &[
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TCSETSF,
            libc::TIOCGWINSZ,
        ],
    );
    // Signals to this process (re-raising a fatal signal once host state is restored).
    r.allow_arg(libc::SYS_kill, 0, &[u64::from(pid)]);
    r
}

/// Threads may start threads, never processes: clone must carry CLONE_THREAD (clone3, whose
/// flags a filter cannot see, answers ENOSYS so glibc falls back to clone).
fn thread_starts(r: &mut Rules) {
    r.allow(&[libc::SYS_set_robust_list, libc::SYS_rseq]);
    r.allow_if(
        libc::SYS_clone,
        vec![masked(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )],
    );
    r.allow_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
}

fn api_rules(pid: u32) -> Rules {
    let mut r = io_rules(pid);
    thread_starts(&mut r);
    r.allow(&[
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        // Read timeouts on a connection.
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        // Whether a waiting client is still there.
        libc::SYS_poll,
        // The regex engine sizes its caches by the CPUs it may use (a create call's `ready`).
        libc::SYS_sched_getaffinity,
    ]);
    r
}

fn builder_rules(pid: u32) -> Rules {
    let mut r = control_rules(pid);
    // Creating a VM and its vCPUs and setting up their state takes some forty KVM ioctls (and
    // the set differs between KVM flavours and kernel versions); the builder runs no guest code
    // and takes its input from the control loop, so ioctl is allowed whole here.
    r.allow(&[libc::SYS_ioctl]);
    // Guest RAM: anonymous mappings with their advice (mergeable, no huge pages, no dump).
    r.allow(&[libc::SYS_madvise]);
    // Guest RAM is labelled in /proc/self/maps (PR_SET_VMA_ANON_NAME).
    r.allow_arg(libc::SYS_prctl, 0, &[libc::PR_SET_VMA as u64]);
    // Admission reads the process's limits (open files, threads); it never sets one.
    r.allow_if(libc::SYS_prlimit64, vec![eq(2, 0)]);
    r
}

fn rules(kind: ThreadKind, pid: u32) -> Rules {
    match kind {
        ThreadKind::Api => api_rules(pid),
        ThreadKind::Builder => builder_rules(pid),
        ThreadKind::Control => control_rules(pid),
        ThreadKind::Vcpu => vcpu_rules(pid),
        ThreadKind::Merge => merge_rules(pid),
        ThreadKind::Io => io_rules(pid),
        ThreadKind::Monitor => monitor_rules(pid),
    }
}

/// System calls answered with an error instead of the allowlist's verdict, per kind (`kill`).
fn refused(kind: ThreadKind) -> Vec<(u32, &'static [libc::c_long])> {
    const NO_CLONE3: (u32, &[libc::c_long]) = (libc::ENOSYS as u32, &[libc::SYS_clone3]);
    const NO_OPEN: (u32, &[libc::c_long]) = (libc::EPERM as u32, NO_FILES);
    match kind {
        ThreadKind::Control | ThreadKind::Builder => vec![NO_CLONE3],
        ThreadKind::Api => vec![NO_CLONE3, NO_OPEN],
        ThreadKind::Vcpu | ThreadKind::Io => vec![NO_OPEN],
        ThreadKind::Merge | ThreadKind::Monitor => Vec::new(),
    }
}

/// The BPF programs of `kind`, in installation order: the refusals first (a filter must allow
/// the seccomp call that installs the next one, and only the first one allows everything else).
fn compile(kind: ThreadKind, mode: SeccompMode, pid: u32) -> Result<Vec<BpfProgram>> {
    let build_err = |source| Error::Build {
        kind: kind.name(),
        source,
    };
    let arch = TargetArch::x86_64;
    let mut allowed = rules(kind, pid);
    let mut programs = Vec::new();
    let mismatch = if mode == SeccompMode::Kill {
        SeccompAction::Trap
    } else {
        SeccompAction::Log
    };
    for (errno, nrs) in refused(kind) {
        // Under `kill`, refused by a filter of their own; the allowlist must not trap them.
        // Under `log`, allowed without a log line: they are expected calls, not violations.
        allowed.allow(nrs);
        if mode == SeccompMode::Kill {
            let map = nrs.iter().map(|&nr| (nr, Vec::new())).collect();
            let filter =
                SeccompFilter::new(map, SeccompAction::Allow, SeccompAction::Errno(errno), arch)
                    .map_err(build_err)?;
            programs.push(BpfProgram::try_from(filter).map_err(build_err)?);
        }
    }
    let filter =
        SeccompFilter::new(allowed.0, mismatch, SeccompAction::Allow, arch).map_err(build_err)?;
    programs.push(BpfProgram::try_from(filter).map_err(build_err)?);
    Ok(programs)
}

fn compile_all(mode: SeccompMode, pid: u32) -> Result<Programs> {
    let per_kind = KINDS
        .into_iter()
        .map(|kind| Ok((kind, compile(kind, mode, pid)?)))
        .collect::<Result<_>>()?;
    Ok(Programs { per_kind })
}

// ---------------------------------------------------------------------------------------------
// The SIGSYS handler.

fn install_sigsys_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed means an empty mask and no flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a valid action for a valid signal; the handler only makes async-signal-safe
        // calls.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            result = Err(Error::Setup(std::io::Error::last_os_error()));
        }
    });
    result
}

/// The SIGSYS part of siginfo_t on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// A line assembled without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) -> &mut Line {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn push_num(&mut self, mut n: u64) -> &mut Line {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn write_to_stderr(&self) {
        // SAFETY: write(2) of our own buffer is async-signal-safe.
        unsafe { libc::write(libc::STDERR_FILENO, self.buf.as_ptr().cast(), self.len) };
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose layout SigsysInfo mirrors.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(Cell::get);
    let record = (1u64 << 40) | (u64::from(kind) << 32) | u64::from(nr as u32);
    let _ = BLOCKED.compare_exchange(0, record, Ordering::SeqCst, Ordering::SeqCst);

    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"kvmerge: ");
    if kind == ThreadKind::Control.code() {
        line.push(b"control thread");
    } else {
        let mut name = [0u8; 17];
        // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        let len = name.iter().position(|&b| b == 0).unwrap_or(16);
        line.push(&name[..len]);
    }
    line.push(b": blocked system call ")
        .push_num(u64::from(nr as u32))
        .push(b" (")
        .push(syscall_name(i64::from(nr)).as_bytes())
        .push(b") by the seccomp filter; ");
    if kind == ThreadKind::Control.code() {
        line.push(b"exiting now\n").write_to_stderr();
        // SAFETY: _exit is async-signal-safe; nothing of this process may run on.
        unsafe { libc::_exit(i32::from(EXIT_STATUS)) };
    }
    line.push(b"stopping\n").write_to_stderr();
    PARKED.fetch_or(1u32 << kind, Ordering::SeqCst);
    let fd = VIOLATION_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd is async-signal-safe.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
    park();
}

/// Keeps the offending thread here for good; ends the process if it is still alive after
/// [`PARK_BOUND`].
fn park() -> ! {
    let start = monotonic_secs();
    loop {
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: nanosleep is async-signal-safe; an interruption only shortens one tick.
        unsafe { libc::nanosleep(&tick, std::ptr::null_mut()) };
        if monotonic_secs().saturating_sub(start) >= PARK_BOUND.as_secs() {
            let mut line = Line {
                buf: [0; 256],
                len: 0,
            };
            line.push(b"kvmerge: the run did not stop within ")
                .push_num(PARK_BOUND.as_secs())
                .push(b" s of a seccomp violation; exiting now\n")
                .write_to_stderr();
            // SAFETY: as in on_sigsys.
            unsafe { libc::_exit(i32::from(EXIT_STATUS)) };
        }
    }
}

fn monotonic_secs() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime is async-signal-safe.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// x86_64 system call names by number (from the kernel's asm/unistd_64.h; gaps are empty).
#[rustfmt::skip]
const SYSCALL_NAMES: [&str; 463] = ["read", "write", "open", "close", "stat", "fstat", "lstat", "poll", "lseek", "mmap", "mprotect", "munmap", "brk", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "ioctl", "pread64", "pwrite64", "readv", "writev", "access", "pipe", "select", "sched_yield", "mremap", "msync", "mincore", "madvise", "shmget", "shmat", "shmctl", "dup", "dup2", "pause", "nanosleep", "getitimer", "alarm", "setitimer", "getpid", "sendfile", "socket", "connect", "accept", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "bind", "listen", "getsockname", "getpeername", "socketpair", "setsockopt", "getsockopt", "clone", "fork", "vfork", "execve", "exit", "wait4", "kill", "uname", "semget", "semop", "semctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "fcntl", "flock", "fsync", "fdatasync", "truncate", "ftruncate", "getdents", "getcwd", "chdir", "fchdir", "rename", "mkdir", "rmdir", "creat", "link", "unlink", "symlink", "readlink", "chmod", "fchmod", "chown", "fchown", "lchown", "umask", "gettimeofday", "getrlimit", "getrusage", "sysinfo", "times", "ptrace", "getuid", "syslog", "getgid", "setuid", "setgid", "geteuid", "getegid", "setpgid", "getppid", "getpgrp", "setsid", "setreuid", "setregid", "getgroups", "setgroups", "setresuid", "getresuid", "setresgid", "getresgid", "getpgid", "setfsuid", "setfsgid", "getsid", "capget", "capset", "rt_sigpending", "rt_sigtimedwait", "rt_sigqueueinfo", "rt_sigsuspend", "sigaltstack", "utime", "mknod", "uselib", "personality", "ustat", "statfs", "fstatfs", "sysfs", "getpriority", "setpriority", "sched_setparam", "sched_getparam", "sched_setscheduler", "sched_getscheduler", "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "mlock", "munlock", "mlockall", "munlockall", "vhangup", "modify_ldt", "pivot_root", "_sysctl", "prctl", "arch_prctl", "adjtimex", "setrlimit", "chroot", "sync", "acct", "settimeofday", "mount", "umount2", "swapon", "swapoff", "reboot", "sethostname", "setdomainname", "iopl", "ioperm", "create_module", "init_module", "delete_module", "get_kernel_syms", "query_module", "quotactl", "nfsservctl", "getpmsg", "putpmsg", "afs_syscall", "tuxcall", "security", "gettid", "readahead", "setxattr", "lsetxattr", "fsetxattr", "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "tkill", "time", "futex", "sched_setaffinity", "sched_getaffinity", "set_thread_area", "io_setup", "io_destroy", "io_getevents", "io_submit", "io_cancel", "get_thread_area", "lookup_dcookie", "epoll_create", "epoll_ctl_old", "epoll_wait_old", "remap_file_pages", "getdents64", "set_tid_address", "restart_syscall", "semtimedop", "fadvise64", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete", "clock_settime", "clock_gettime", "clock_getres", "clock_nanosleep", "exit_group", "epoll_wait", "epoll_ctl", "tgkill", "utimes", "vserver", "mbind", "set_mempolicy", "get_mempolicy", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr", "kexec_load", "waitid", "add_key", "request_key", "keyctl", "ioprio_set", "ioprio_get", "inotify_init", "inotify_add_watch", "inotify_rm_watch", "migrate_pages", "openat", "mkdirat", "mknodat", "fchownat", "futimesat", "newfstatat", "unlinkat", "renameat", "linkat", "symlinkat", "readlinkat", "fchmodat", "faccessat", "pselect6", "ppoll", "unshare", "set_robust_list", "get_robust_list", "splice", "tee", "sync_file_range", "vmsplice", "move_pages", "utimensat", "epoll_pwait", "signalfd", "timerfd_create", "eventfd", "fallocate", "timerfd_settime", "timerfd_gettime", "accept4", "signalfd4", "eventfd2", "epoll_create1", "dup3", "pipe2", "inotify_init1", "preadv", "pwritev", "rt_tgsigqueueinfo", "perf_event_open", "recvmmsg", "fanotify_init", "fanotify_mark", "prlimit64", "name_to_handle_at", "open_by_handle_at", "clock_adjtime", "syncfs", "sendmmsg", "setns", "getcpu", "process_vm_readv", "process_vm_writev", "kcmp", "finit_module", "sched_setattr", "sched_getattr", "renameat2", "seccomp", "getrandom", "memfd_create", "kexec_file_load", "bpf", "execveat", "userfaultfd", "membarrier", "mlock2", "copy_file_range", "preadv2", "pwritev2", "pkey_mprotect", "pkey_alloc", "pkey_free", "statx", "io_pgetevents", "rseq", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_open", "clone3", "close_range", "openat2", "pidfd_getfd", "faccessat2", "process_madvise", "epoll_pwait2", "mount_setattr", "quotactl_fd", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "memfd_secret", "process_mrelease", "futex_waitv", "set_mempolicy_home_node", "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake", "futex_wait", "futex_requeue", "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules", "mseal"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let programs = compile_all(mode, 4242).unwrap();
            for kind in KINDS {
                let (_, list) = programs.per_kind.iter().find(|(k, _)| *k == kind).unwrap();
                assert!(!list.is_empty(), "{kind:?} {mode:?}");
                assert!(list.iter().all(|p| !p.is_empty() && p.len() < 4096));
            }
        }
    }

    /// A thread started after the control filter runs under it too, so the control kind must
    /// allow whatever the kinds it starts allow.
    #[test]
    fn control_allows_what_the_threads_it_starts_allow() {
        let control = rules(ThreadKind::Control, 1);
        for kind in [ThreadKind::Merge, ThreadKind::Io, ThreadKind::Monitor] {
            for (nr, rules) in &rules(kind, 1).0 {
                let Some(mine) = control.0.get(nr) else {
                    panic!("{kind:?} allows {} but control does not", syscall_name(*nr));
                };
                assert!(
                    mine.is_empty() || rules.iter().all(|r| mine.contains(r)),
                    "{kind:?} allows more of {} than control",
                    syscall_name(*nr)
                );
            }
        }
        for kind in KINDS {
            let r = rules(kind, 1);
            for nr in [
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_socket,
            ] {
                assert!(
                    !r.0.contains_key(&nr),
                    "{kind:?} allows {}",
                    syscall_name(nr)
                );
            }
        }
        assert!(!rules(ThreadKind::Vcpu, 1).0.contains_key(&libc::SYS_openat));
    }

    #[test]
    fn syscall_names() {
        assert_eq!(syscall_name(57), "fork");
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_mseal), "mseal");
        assert_eq!(syscall_name(400), "unknown");
        assert_eq!(syscall_name(-1), "unknown");
    }

    /// Runs `f` in a new thread under `kind`'s filter for `mode`, without touching the process
    /// mode (other tests share this process). `f` must stay inside the allowlist under `kill`:
    /// no SIGSYS handler is installed here.
    fn under_filter<T: Send + 'static>(
        kind: ThreadKind,
        mode: SeccompMode,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let programs = compile(kind, mode, std::process::id()).unwrap();
        std::thread::spawn(move || {
            for p in &programs {
                seccompiler::apply_filter(p).unwrap();
            }
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_vcpu_thread_may_signal_eventfds_but_not_open_files() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let theirs = evt.try_clone().unwrap();
        let opened = under_filter(ThreadKind::Vcpu, SeccompMode::Kill, move || {
            theirs.write(7).unwrap();
            std::fs::File::open("/proc/self/status")
                .err()
                .and_then(|e| e.raw_os_error())
        });
        assert_eq!(opened, Some(libc::EPERM), "opening a file is refused");
        assert_eq!(evt.read().unwrap(), 7);
    }

    /// An API thread can do a connection's whole work under its filter: start the connection's
    /// thread, read a request, poll its client, answer, and not open files.
    #[test]
    fn an_api_thread_serves_a_connection_and_opens_no_file() {
        use std::io::{Read, Write};
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        client
            .write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (path, opened) = under_filter(ThreadKind::Api, SeccompMode::Kill, move || {
            std::thread::spawn(move || {
                let mut server = server;
                let req = crate::serve::http::read_request(&mut server).unwrap();
                crate::serve::http::write_response(&mut server, 200, "application/json", b"[]")
                    .unwrap();
                let opened = std::fs::File::open("/proc/self/status")
                    .err()
                    .and_then(|e| e.raw_os_error());
                (req.path, opened)
            })
            .join()
            .unwrap()
        });
        assert_eq!(path, "/v1/vms");
        assert_eq!(opened, Some(libc::EPERM));
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }

    /// A panic (hook, backtrace, unwinding) stays inside every kind's allowlist: a panicking
    /// thread is reported as a panic, not as a seccomp violation.
    #[test]
    fn a_panic_with_a_backtrace_stays_inside_every_allowlist() {
        for kind in KINDS {
            let caught = under_filter(kind, SeccompMode::Kill, || {
                let trace = std::backtrace::Backtrace::force_capture().to_string();
                let panicked = std::panic::catch_unwind(|| panic!("injected")).is_err();
                (panicked, trace.is_empty())
            });
            assert_eq!(caught, (true, false), "{kind:?}");
        }
    }

    #[test]
    fn log_mode_lets_every_call_through() {
        let fd = under_filter(ThreadKind::Vcpu, SeccompMode::Log, || {
            // SAFETY: creating and closing a socket.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
            fd
        });
        assert!(
            fd >= 0,
            "socket(2) under --seccomp log works (and is logged)"
        );
    }
}
