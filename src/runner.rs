//! A run: pre-flight checks, building the fleet, the control loop (signals, timeout, guest ends,
//! console input) and the per-guest report.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::EntryMode;
use crate::config::DedupMode;
use crate::config::{self, Config, ConsoleMode};
use crate::console::{ConsoleSink, Consoles, Expect, Output};
use crate::dedup::ksm;
use crate::dedup::merge::{self, MergeThread, MergeVm};
use crate::dedup::report;
use crate::host;
use crate::kvm::{self, Flavor, Host};
use crate::loader::{self, InitrdImage, KernelImage};
use crate::memory;
use crate::output::{self, Lane, LaneSpec, Marker, Sink, Writer};
use crate::pressure;
use crate::sched;
use crate::seccomp::{self, ThreadKind};
use crate::terminal::{EscapeDecoder, Input, RawMode};
use crate::vcpu::{RtBoost, VmEnd};
use crate::vm::{self, BootSources, Vm, VmIo};

use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error(
        "this host's /dev/kvm is kvm_pvm, which cannot run stock Linux kernels (guest ring 0 is \
         emulated and guest system calls fault); {0} is a Linux kernel. Run Linux guests on a host \
         with hardware KVM (vmx/svm), or inside the nested lab: scripts/kvm-lab (see README.md)"
    )]
    PvmLinux(String),
    #[error("cannot create console directory {path}: {source}")]
    ConsoleDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create console log {path}: {source}")]
    ConsoleFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vm{index}: {source}")]
    Build {
        index: usize,
        #[source]
        source: vm::Error,
    },
    #[error(transparent)]
    Memory(memory::Error),
    #[error("cannot create --stats file {path}: {source}")]
    StatsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the control loop: {0}")]
    Control(String),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
}

impl Error {
    /// Bad usage or bad input (exit status 2) as opposed to a failure while running (1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::Kvm(_)
            | Error::Loader(_)
            | Error::Host(_)
            | Error::PvmLinux(_)
            | Error::ConsoleDir { .. }
            | Error::ConsoleFile { .. }
            | Error::StatsFile { .. } => true,
            Error::Build { source, .. } => matches!(
                source,
                vm::Error::Loader(_) | vm::Error::Memory(crate::memory::Error::Map { .. })
            ),
            Error::Control(_) | Error::Memory(_) | Error::Seccomp(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How one guest's run went.
#[derive(Clone, Debug)]
pub struct VmReport {
    pub name: String,
    pub end: VmEnd,
    /// The `--expect` pattern, when the guest's console never matched it.
    pub expect_missed: Option<String>,
    /// From the start of the VM's build to its end.
    pub lifetime: Duration,
    /// Bytes of console output dropped because the console's sink was not reading.
    pub console_dropped: u64,
}

impl VmReport {
    pub fn succeeded(&self) -> bool {
        self.end.is_clean() && self.expect_missed.is_none()
    }

    /// One line for stderr when the guest failed.
    pub fn failure_line(&self) -> Option<String> {
        if self.succeeded() {
            return None;
        }
        Some(match (&self.expect_missed, self.end.is_clean()) {
            (Some(p), true) => format!(
                "{}: {}, but its console never matched --expect '{p}'",
                self.name, self.end
            ),
            (Some(p), false) => format!(
                "{}: {} (console never matched --expect '{p}')",
                self.name, self.end
            ),
            (None, _) => format!("{}: {}", self.name, self.end),
        })
    }

    /// One line for stderr when some of the guest's console output was dropped.
    pub fn dropped_line(&self) -> Option<String> {
        (self.console_dropped > 0).then(|| {
            format!(
                "{}: {} bytes of console output dropped: the output was not being read",
                self.name, self.console_dropped
            )
        })
    }
}

#[derive(Clone, Debug)]
pub struct Report {
    pub vms: Vec<VmReport>,
    pub timed_out: bool,
    pub signal: Option<i32>,
    /// The merge thread's final figures.
    pub dedup: Option<merge::Status>,
    /// A thread made a system call its seccomp filter forbids; the run was stopped.
    pub seccomp_blocked: bool,
}

impl Report {
    /// Every guest of `cfg` stopped by signal `sig` before the fleet started.
    fn stopped_before_start(cfg: &Config, sig: i32) -> Report {
        Report {
            vms: (0..cfg.vms.len())
                .map(|index| VmReport {
                    name: format!("vm{index}"),
                    end: VmEnd::Signal(sig),
                    expect_missed: None,
                    lifetime: Duration::ZERO,
                    console_dropped: 0,
                })
                .collect(),
            timed_out: false,
            signal: Some(sig),
            dedup: None,
            seccomp_blocked: false,
        }
    }

    /// 0 when every guest succeeded; 159 after a seccomp violation; 124 on timeout; 128+N on
    /// signal N (Ctrl-A x on the console counts as SIGINT); 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.seccomp_blocked {
            i32::from(seccomp::EXIT_STATUS)
        } else if self.timed_out {
            124
        } else if let Some(sig) = self.signal {
            128 + sig
        } else if self.vms.iter().any(|vm| vm.end == VmEnd::Quit) {
            128 + libc::SIGINT
        } else if self.vms.iter().all(VmReport::succeeded) {
            0
        } else {
            1
        }
    }
}

/// Everything checked before any VM exists. Each distinct kernel and initrd file is read once.
struct Preflight {
    host: Host,
    kernels: HashMap<PathBuf, KernelImage>,
    initrds: HashMap<PathBuf, InitrdImage>,
}

fn preflight(cfg: &Config) -> Result<Preflight> {
    cfg.validate()?;
    let mut kernels = HashMap::new();
    let mut initrds = HashMap::new();
    for (index, vm) in cfg.vms.iter().enumerate() {
        if !kernels.contains_key(&vm.kernel) {
            kernels.insert(vm.kernel.clone(), KernelImage::open(&vm.kernel)?);
        }
        kernels[&vm.kernel].check_cmdline(&vm.cmdline_for(index))?;
        kernels[&vm.kernel].check_fits(vm.memory)?;
        if let Some(path) = &vm.initrd {
            if !initrds.contains_key(path) {
                initrds.insert(path.clone(), InitrdImage::open(path)?);
            }
        }
    }
    // What the host can hold (memory, cgroup, files, threads): before /dev/kvm is even opened.
    host::admit(cfg)?;
    let host = Host::open()?;
    host::admit_vcpus(cfg, host.max_vcpus())?;
    for vm in &cfg.vms {
        if host.flavor() == Flavor::Pvm && kernels[&vm.kernel].mode() == EntryMode::Linux {
            return Err(Error::PvmLinux(vm.kernel.display().to_string()));
        }
    }
    Ok(Preflight {
        host,
        kernels,
        initrds,
    })
}

fn console_for(cfg: &Config, index: usize) -> Result<Output> {
    Ok(match &cfg.console {
        ConsoleMode::Prefix if cfg.interactive => Output::Raw,
        ConsoleMode::Prefix if cfg.vms.len() == 1 => Output::Lines {
            prefix: String::new(),
        },
        ConsoleMode::Prefix => Output::Lines {
            prefix: format!("[vm{index}] "),
        },
        ConsoleMode::None => Output::Discard,
        ConsoleMode::Dir(dir) => {
            let path = dir.join(format!("vm{index}.log"));
            let file = create_sink_file(&path).map_err(|source| Error::ConsoleFile {
                path: path.display().to_string(),
                source,
            })?;
            Output::File(file)
        }
    })
}

/// Creates (or truncates) an output file without blocking: a FIFO nobody reads fails at once
/// (ENXIO) instead of hanging in open(2). Writes then block as usual, in a writer thread.
fn create_sink_file(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Every catchable signal that ends a run: each stops all guests, restores host state and makes
/// kvmerge exit with 128+N. (SIGPIPE is ignored by Rust programs: a closed pipe is a write error,
/// which ends only the output that hit it.)
pub const STOP_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// How long queued console and `--stats` output may take to drain at the end before it is
/// abandoned (a sink that does not read cannot hold the exit).
const OUTPUT_FLUSH: Duration = Duration::from_secs(1);

/// Runs the fleet described by `cfg` to its end.
pub fn run(cfg: &Config) -> Result<Report> {
    // From here on, stop signals are events of this run: blocked in this thread (and so in every
    // thread it starts) and read from a signalfd, also while the fleet is being built.
    let signals =
        Arc::new(SignalFd::new(&STOP_SIGNALS).map_err(|e| Error::Control(e.to_string()))?);
    let pre = preflight(cfg)?;
    // Before any thread starts: vCPU and merge threads install their filters as they start.
    let seccomp_events = seccomp::prepare(cfg.seccomp)?;
    output::start_stderr();
    if let ConsoleMode::Dir(dir) = &cfg.console {
        std::fs::create_dir_all(dir).map_err(|source| Error::ConsoleDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let pattern = cfg.expect.clone().map(Arc::new);
    let expects: Vec<Option<Expect>> = (0..cfg.vms.len())
        .map(|_| pattern.clone().map(Expect::new))
        .collect();
    let mut outputs = Vec::with_capacity(cfg.vms.len());
    for (index, expect) in expects.iter().enumerate() {
        outputs.push((
            format!("vm{index}"),
            console_for(cfg, index)?,
            expect.clone(),
        ));
    }
    let mut stats = match &cfg.stats {
        Some(path) => Some(StatsFile::create(path)?),
        None => None,
    };
    let (mut consoles, sinks) = Consoles::start(outputs)
        .map_err(|e| Error::Control(format!("cannot start the console writer: {e}")))?;

    let result = run_fleet(
        cfg,
        &pre,
        &signals,
        sinks,
        &expects,
        stats.as_ref(),
        seccomp_events,
    );

    // Guests have ended and host state is back; what their consoles and --stats still hold gets
    // a bounded time to drain.
    let deadline = Instant::now() + OUTPUT_FLUSH;
    if let Some(stats) = stats.take() {
        stats.finish(deadline);
    }
    if !consoles.finish(deadline.saturating_duration_since(Instant::now())) {
        log::warn!(
            "console output not written within {OUTPUT_FLUSH:?} of the end (its sink is not \
             reading); the rest is dropped"
        );
    }
    result.map(|mut report| {
        for (index, vm) in report.vms.iter_mut().enumerate() {
            vm.console_dropped = consoles.dropped(index);
        }
        report
    })
}

/// Builds, starts and runs the fleet, then stops it and restores host state (KSM knobs, the
/// terminal) on every way out.
fn run_fleet(
    cfg: &Config,
    pre: &Preflight,
    signals: &Arc<SignalFd>,
    sinks: Vec<ConsoleSink>,
    expects: &[Option<Expect>],
    stats: Option<&StatsFile>,
    seccomp_events: Option<std::os::fd::RawFd>,
) -> Result<Report> {
    let notify =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Control(e.to_string()))?);
    let input_drained =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Control(e.to_string()))?);
    let vms = match build_fleet(pre, cfg, sinks, &notify, &input_drained, signals)? {
        Built::All(vms) => vms,
        Built::Stopped(sig) => {
            log::info!("received signal {sig} while building the fleet; nothing started");
            return Ok(Report::stopped_before_start(cfg, sig));
        }
    };
    if let Err(e) = memory::verify_mergeable(vms.iter().map(|vm| vm.ram().as_ref())) {
        teardown(vms);
        return Err(Error::Memory(e));
    }
    log::info!("built {} VM(s)", vms.len());

    let raw = if cfg.interactive {
        match RawMode::enter(libc::STDIN_FILENO) {
            Ok(guard) => {
                output::eprintln("kvmerge: console attached; press Ctrl-A x to quit");
                Some(guard)
            }
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode ({e}); console input disabled");
                None
            }
        }
    } else {
        None
    };
    let interactive = cfg.interactive && raw.is_some();

    // From here on this thread answers signals, --timeout and guest exits whatever the guests
    // do with the CPUs (see crate::sched); threads it starts later set their own priority.
    let base_nice = sched::this_thread_nice().ok();
    let _responsive = sched::Raised::this_thread(sched::RESPONSIVE, "the control thread");

    // This thread's own filter, before any guest code runs; threads it starts from now on
    // (merge thread, teardown workers) inherit it under their own.
    if let Err(e) = seccomp::install(ThreadKind::Control) {
        teardown(vms);
        return Err(e.into());
    }
    if let Err((index, source)) = resume_all(&vms, signals) {
        let _urgent = stop_all(&vms, VmEnd::Vmm("start failed".into()));
        teardown(vms);
        return Err(Error::Build { index, source });
    }
    let stopped_by = signals.caught();
    // Kept until the fleet is torn down (see stop_all).
    let mut urgent_at_start = None;
    if let Some(sig) = stopped_by {
        log::info!("received signal {sig} while starting the fleet; stopping all guests");
        urgent_at_start = stop_all(&vms, VmEnd::Signal(sig));
    }

    // Dedup starts once the guests run, so it adds nothing to their start-up: kvmerge's hold on
    // the host's KSM knobs (restored when the last reference drops, on every way out of this
    // function), and the merge thread.
    let ksm_owner = if stopped_by.is_none() {
        take_ksm(cfg)
    } else {
        None
    };
    let merge = if stopped_by.is_none() {
        let merge_vms = vms
            .iter()
            .zip(&cfg.vms)
            .map(|(vm, vm_cfg)| MergeVm {
                name: vm.name().to_string(),
                dedup: vm_cfg.dedup,
                control: vm.control().clone(),
                ram: vm.ram().clone(),
            })
            .collect();
        let merge_opts = merge::Options {
            policy: cfg.ksm_policy,
            nice: base_nice,
            ..merge::Options::default()
        };
        match MergeThread::start(merge_vms, ksm_owner.clone(), merge_opts) {
            Ok(merge) => Some(merge),
            Err(e) => {
                let _urgent = stop_all(&vms, VmEnd::Vmm("merge thread failed".into()));
                teardown(vms);
                return Err(Error::Control(format!(
                    "cannot start the merge thread: {e}"
                )));
            }
        }
    } else {
        None
    };

    // The overcommit guard (src/pressure.rs): stops the guests that free most when memory runs
    // short, before the OOM killer would end the whole process. Dropped before teardown.
    let pressure_vms = vms
        .iter()
        .map(|vm| pressure::Guarded {
            shared: vm.shared().clone(),
            control: vm.control().clone(),
            ram: vm.ram().clone(),
        })
        .collect();
    let pressure = match pressure::Guard::start(pressure_vms) {
        Ok(guard) => Some(guard),
        Err(e) => {
            log::warn!("cannot start the memory pressure guard ({e}); running without it");
            None
        }
    };

    let control = Arc::new(Mutex::new(Control {
        vms,
        signals: signals.clone(),
        notify,
        timer: None,
        stdin: interactive,
        input_drained,
        pending_input: VecDeque::new(),
        escape: EscapeDecoder::default(),
        timed_out: false,
        signal: stopped_by,
        merge,
        stats: stats.map(StatsFile::lane),
        stats_timer: None,
        status_line: cfg.status_line,
        seccomp_events,
        seccomp_blocked: false,
        urgent: None,
        stopping_all: false,
        planned_end: false,
    }));
    let looped = control_loop(cfg, &control);
    let mut c = lock(&control);
    // The stop, whatever ended the run, at real-time priority where permitted (see stop_all).
    let urgent = c
        .urgent
        .take()
        .or(urgent_at_start)
        .or_else(RtBoost::this_thread);
    let vms = std::mem::take(&mut c.vms);
    if let Err(e) = looped {
        let _urgent = stop_all(&vms, VmEnd::Vmm("control loop failed".into()));
        drop(c.merge.take());
        drop(pressure);
        teardown(vms);
        return Err(e);
    }
    // Guests are out of the guest (or on their way out) but their RAM is still mapped: the merge
    // thread's last accounting sees what they ended with.
    let started = Instant::now();
    let dedup = c.merge.take().map(MergeThread::stop);
    log::debug!("merge thread stopped in {:?}", started.elapsed());
    if let (Some(status), Some(stats)) = (&dedup, &c.stats) {
        write_stats(stats, status, true);
    }
    drop(pressure);
    let started = Instant::now();
    let reports = retire(vms, expects);
    log::debug!(
        "collected and destroyed every VM in {:?}",
        started.elapsed()
    );
    // Back to normal priority: restoring the knobs may make the kernel unmerge every KSM page of
    // the host in this thread, which must not keep other processes off a core meanwhile.
    drop(urgent);
    if seccomp::parked(ThreadKind::Merge) {
        // The parked merge thread keeps its reference to the KSM hold: restore explicitly.
        if let Some(Err(e)) = ksm_owner
            .as_ref()
            .and_then(|hold| hold.owner())
            .map(|owner| owner.restore())
        {
            log::error!("host KSM knobs: {e}");
        }
    }
    // Guest RAM is gone, so restoring the knobs (which may unmerge) has nothing of ours to do.
    drop(ksm_owner);
    drop(raw);
    Ok(Report {
        vms: reports,
        timed_out: c.timed_out,
        signal: c.signal,
        dedup,
        seccomp_blocked: c.seccomp_blocked,
    })
}

/// Runs the control loop until every VM has stopped (at once when they all have already).
fn control_loop(cfg: &Config, control: &Arc<Mutex<Control>>) -> Result<()> {
    if lock(control).finished() {
        return Ok(());
    }
    if cfg.status_line || cfg.stats.is_some() {
        let mut timer = TimerFd::new().map_err(|e| Error::Control(e.to_string()))?;
        timer
            .reset(STATS_PERIOD, Some(STATS_PERIOD))
            .map_err(|e| Error::Control(e.to_string()))?;
        lock(control).stats_timer = Some(timer);
    }
    if let Some(end) = cfg.timeout.or(cfg.duration) {
        let mut timer = TimerFd::new().map_err(|e| Error::Control(e.to_string()))?;
        timer
            .reset(end, None)
            .map_err(|e| Error::Control(e.to_string()))?;
        let mut c = lock(control);
        c.timer = Some(timer);
        c.planned_end = cfg.duration.is_some();
    }
    let mut events: EventManager<Arc<Mutex<Control>>> =
        EventManager::new().map_err(|e| Error::Control(format!("{e:?}")))?;
    events.add_subscriber(control.clone());
    while !lock(control).finished() {
        events.run().map_err(|e| Error::Control(format!("{e:?}")))?;
        seccomp::injection_point();
    }
    Ok(())
}

/// Starts every VM: posts Start to every vCPU of every VM, then waits for them to acknowledge.
/// Stops as soon as a stop signal arrives (the caller looks at `signals.caught()`) or a thread
/// has been stopped by its seccomp filter.
///
/// A vCPU thread acknowledges when it first gets a time slice. On a host whose cores are busy
/// with the guests started first that can take long (512 churning guests on 2 cores: over a
/// second), so the wait is bounded by [`START_TIMEOUT`], which only a thread that cannot run at
/// all reaches, and is checked for signals every [`START_POLL`].
fn resume_all(vms: &[Vm], signals: &SignalFd) -> std::result::Result<(), (usize, vm::Error)> {
    // A stop signal, or a thread stopped by its seccomp filter (a vCPU thread that will never
    // acknowledge): the control loop takes it from there (exit 128+N, or 159).
    let interrupted = || signals.take().is_some() || seccomp::blocked().is_some();
    let tickets = {
        // Posting is quick, but needs the CPU that the guests started first are taking.
        let _boost = RtBoost::this_thread();
        let mut tickets = Vec::with_capacity(vms.len());
        for vm in vms {
            if interrupted() {
                return Ok(());
            }
            tickets.push(vm.start().map_err(|e| (vm.index(), e))?);
        }
        tickets
    };
    let bound = Instant::now() + START_TIMEOUT;
    for (vm, ticket) in vms.iter().zip(&tickets) {
        loop {
            if interrupted() {
                return Ok(());
            }
            let until = (Instant::now() + START_POLL).min(bound);
            match vm.confirm_start(ticket, until) {
                Ok(()) => break,
                Err(vm::Error::Vcpu(crate::vcpu::Error::NoAck { .. }))
                    if Instant::now() < bound => {}
                Err(vm::Error::Vcpu(crate::vcpu::Error::NoAck {
                    index,
                    command,
                    seq,
                    ..
                })) => {
                    // Say how long the start waited in all, not the last poll.
                    let e = crate::vcpu::Error::NoAck {
                        index,
                        command,
                        seq,
                        timeout: START_TIMEOUT,
                    };
                    return Err((vm.index(), e.into()));
                }
                Err(e) => return Err((vm.index(), e)),
            }
        }
    }
    Ok(())
}

/// This process's part in steering the host's KSM (see [`ksm::join_for_run`]).
fn take_ksm(cfg: &Config) -> Option<Arc<ksm::KsmHold>> {
    let any_full = cfg.vms.iter().any(|vm| vm.dedup == DedupMode::Full);
    ksm::join_for_run(cfg.ksm_policy, any_full)
}

/// How often the status line and `--stats` are refreshed.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// `--stats FILE`: one JSON object per line, written by its own writer thread so that a file that
/// is not read (a FIFO) never stalls the control loop; lines that do not fit are dropped.
struct StatsFile {
    path: PathBuf,
    writer: Writer,
    lane: Lane,
}

/// Room for many seconds of figures even for large fleets (a line grows with the fleet).
const STATS_CAPACITY: usize = 8 << 20;

impl StatsFile {
    fn create(path: &Path) -> Result<StatsFile> {
        let file = create_sink_file(path).map_err(|source| Error::StatsFile {
            path: path.display().to_string(),
            source,
        })?;
        let spec = LaneSpec {
            sink: Sink::File(file),
            capacity: STATS_CAPACITY,
            marker: Marker::Silent,
            name: format!("--stats {}", path.display()),
        };
        let (writer, mut lanes) = Writer::start("kvmerge-stats", vec![spec])
            .map_err(|e| Error::Control(format!("cannot start the --stats writer: {e}")))?;
        let lane = lanes
            .pop()
            .ok_or_else(|| Error::Control("no --stats lane".into()))?;
        Ok(StatsFile {
            path: path.to_path_buf(),
            writer,
            lane,
        })
    }

    fn lane(&self) -> Lane {
        self.lane.clone()
    }

    /// Writes out what is queued until `deadline`; says what was lost.
    fn finish(self, deadline: Instant) {
        let path = self.path.display();
        if !self
            .writer
            .finish(deadline.saturating_duration_since(Instant::now()))
        {
            log::warn!("--stats {path}: not written to the end (the file is not being read)");
        }
        let dropped = self.lane.dropped();
        if dropped > 0 {
            log::warn!(
                "--stats {path}: {dropped} bytes of figures dropped: the file was not being read"
            );
        }
    }
}

/// Queues one `--stats` line.
fn write_stats(lane: &Lane, status: &merge::Status, last: bool) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(rename = "final")]
        last: bool,
        #[serde(flatten)]
        status: &'a merge::Status,
    }
    match serde_json::to_vec(&Line { last, status }) {
        Ok(mut line) => {
            line.push(b'\n');
            lane.push(&line);
        }
        Err(e) => log::warn!("--stats: cannot encode the figures: {e}"),
    }
}

/// Builds every VM of the fleet, spread over the host's CPUs: most of a VM's build time is spent
/// in KVM ioctls, which run in parallel. Each worker looks at the stop signals before each VM, so
/// a signal stops the build within one VM's build time. On failure or a signal, the VMs already
/// built are torn down; a failure returns the error of the lowest-numbered VM.
fn build_fleet(
    pre: &Preflight,
    cfg: &Config,
    consoles: Vec<ConsoleSink>,
    notify: &Arc<EventFd>,
    input_drained: &Arc<EventFd>,
    signals: &SignalFd,
) -> Result<Built> {
    let slots: Vec<Mutex<Option<ConsoleSink>>> =
        consoles.into_iter().map(|c| Mutex::new(Some(c))).collect();
    let results: Vec<Mutex<Option<Result<Vm>>>> =
        (0..cfg.vms.len()).map(|_| Mutex::new(None)).collect();
    let failed = AtomicBool::new(false);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    spread(cfg.vms.len(), workers, |index| {
        if failed.load(Ordering::Relaxed) || signals.take().is_some() {
            return;
        }
        let Some(console) = lock(&slots[index]).take() else {
            return;
        };
        let vm_cfg = &cfg.vms[index];
        let sources = BootSources {
            kernel: &pre.kernels[&vm_cfg.kernel],
            initrd: vm_cfg.initrd.as_ref().map(|p| &pre.initrds[p]),
        };
        let io = VmIo {
            console,
            notify: notify.clone(),
            input_drained: input_drained.clone(),
        };
        let result = Vm::build(&pre.host, index, vm_cfg, &sources, io)
            .map_err(|source| Error::Build { index, source });
        failed.fetch_or(result.is_err(), Ordering::Relaxed);
        *lock(&results[index]) = Some(result);
    });
    let mut vms = Vec::with_capacity(cfg.vms.len());
    let mut first_error = None;
    for result in results
        .into_iter()
        .filter_map(|r| r.into_inner().unwrap_or_else(|p| p.into_inner()))
    {
        match result {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        teardown(vms);
        return Err(e);
    }
    if let Some(sig) = signals.caught() {
        teardown(vms);
        return Ok(Built::Stopped(sig));
    }
    Ok(Built::All(vms))
}

/// What [`build_fleet`] ended with.
enum Built {
    All(Vec<Vm>),
    /// A stop signal arrived first; nothing is left running.
    Stopped(i32),
}

/// How long the vCPU threads of a fleet may take to acknowledge Start, all together.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a fleet's start looks for stop signals while it waits.
const START_POLL: Duration = Duration::from_millis(50);

/// Threads that collect and destroy VMs at once. Closing a VM fd makes KVM free the VM, which
/// mostly waits for RCU grace periods: many threads overlap those waits (measured with 512 VMs
/// of 4 MiB on 2 cores: 5.8 s with 2 threads, 0.65 s with 64).
const STOP_WORKERS: usize = 64;

/// Calls `f(i)` for every `i` in `0..n` on the calling thread and up to `workers - 1` more, and
/// returns when every call has. Threads that cannot be started are done without.
fn spread(n: usize, workers: usize, f: impl Fn(usize) + Sync) {
    spread_with(n, workers, false, f);
}

/// [`spread`] for the work of a stop: every thread doing it runs at real-time priority where the
/// process may ([`RtBoost`]), so that a stop on a host whose cores are all taken by busy vCPU
/// threads is not spread over as many scheduler rounds as there are vCPU threads.
fn spread_urgent(n: usize, workers: usize, f: impl Fn(usize) + Sync) {
    spread_with(n, workers, true, f);
}

fn spread_with(n: usize, workers: usize, urgent: bool, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    let work = || {
        let _boost = if urgent { RtBoost::this_thread() } else { None };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..workers.min(n) {
            let spawned = std::thread::Builder::new()
                .name("kvmerge-worker".into())
                .spawn_scoped(scope, work);
            if spawned.is_err() {
                break;
            }
        }
        work();
    });
}

/// Collects every VM's vCPU threads (which flushes its console into its lane, so `--expect` has
/// seen its last line), reports on it and destroys it, many VMs at a time (see [`STOP_WORKERS`]).
/// Two passes: the first lets KVM destroy every VM ([`Vm::dismantle`]), the second ends their
/// vCPU threads and unmaps guest RAM. Every munmap in the process (a thread's end includes two)
/// calls into the MMU notifier of every live VM: done after the first pass, none is left.
/// Measured: docs/fleet.md, "Stopping a big fleet".
fn retire(vms: Vec<Vm>, expects: &[Option<Expect>]) -> Vec<VmReport> {
    let n = vms.len();
    let slots: Vec<Mutex<Option<Vm>>> = vms.into_iter().map(|vm| Mutex::new(Some(vm))).collect();
    let reports: Vec<Mutex<Option<VmReport>>> = (0..n).map(|_| Mutex::new(None)).collect();
    spread_urgent(n, STOP_WORKERS, |i| {
        let mut slot = lock(&slots[i]);
        let Some(vm) = slot.as_mut() else {
            return;
        };
        vm.dismantle();
        let (end, at) = vm
            .outcome()
            .cloned()
            .unwrap_or((VmEnd::Vmm("no outcome recorded".into()), Instant::now()));
        let expect = expects.get(vm.index()).and_then(Option::as_ref);
        *lock(&reports[i]) = Some(VmReport {
            name: vm.name().to_string(),
            end,
            expect_missed: expect
                .filter(|e| !e.matched())
                .map(|e| e.pattern().to_string()),
            lifetime: at.saturating_duration_since(vm.created()),
            console_dropped: 0,
        });
    });
    teardown_dismantled(slots);
    reports
        .into_iter()
        .filter_map(|r| r.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

/// Stops and destroys VMs, many at a time (see [`STOP_WORKERS`]), in the two passes of
/// [`retire`].
fn teardown(vms: Vec<Vm>) {
    let n = vms.len();
    let slots: Vec<Mutex<Option<Vm>>> = vms.into_iter().map(|vm| Mutex::new(Some(vm))).collect();
    spread_urgent(n, STOP_WORKERS, |i| {
        if let Some(vm) = lock(&slots[i]).as_mut() {
            vm.dismantle();
        }
    });
    teardown_dismantled(slots);
}

/// The second pass of [`retire`]: ends the vCPU threads of dismantled VMs and unmaps their RAM.
fn teardown_dismantled(slots: Vec<Mutex<Option<Vm>>>) {
    spread_urgent(slots.len(), STOP_WORKERS, |i| drop(lock(&slots[i]).take()));
}

/// Ends every VM still running with `why`: tells every vCPU thread of every VM to leave the guest
/// and exit, without waiting; [`retire`] or [`teardown`] collects them, all at once.
///
/// The calling thread runs at real-time priority from here on where the process may (the
/// returned boost; keep it until the fleet is torn down). A busy fleet of N vCPU threads on a
/// few cores gives a thread of normal priority one time slice per round of all of them: with
/// 1024 busy guests on 2 cores the kicks alone took 5 s at normal priority, 12 ms boosted.
#[must_use = "the stop runs at real-time priority only while the boost is kept"]
fn stop_all(vms: &[Vm], why: VmEnd) -> Option<RtBoost> {
    let boost = RtBoost::this_thread();
    for vm in vms {
        vm.shared().end(why.clone());
        vm.request_stop();
    }
    boost
}

/// Waits (bounded) for the vCPU threads of `vms[which]`, after `request_stop`, many at a time.
fn collect(vms: &[Vm], which: &[usize]) {
    spread(which.len(), STOP_WORKERS, |k| vms[which[k]].finish_stop());
}

/// Event tokens of the control loop.
const EV_SIGNAL: u32 = 1;
const EV_NOTIFY: u32 = 2;
const EV_TIMER: u32 = 3;
const EV_STDIN: u32 = 4;
const EV_INPUT_DRAINED: u32 = 5;
const EV_STATS: u32 = 6;
const EV_SECCOMP: u32 = 7;

struct Control {
    vms: Vec<Vm>,
    signals: Arc<SignalFd>,
    notify: Arc<EventFd>,
    timer: Option<TimerFd>,
    /// Console input is on (interactive single guest).
    stdin: bool,
    input_drained: Arc<EventFd>,
    /// Console input the guest's UART had no room for yet; stdin is not read while it is queued,
    /// so the terminal holds the rest.
    pending_input: VecDeque<u8>,
    escape: EscapeDecoder,
    timed_out: bool,
    signal: Option<i32>,
    merge: Option<MergeThread>,
    stats: Option<Lane>,
    stats_timer: Option<TimerFd>,
    status_line: bool,
    /// Written by the SIGSYS handler when a thread's seccomp filter stopped it.
    seccomp_events: Option<std::os::fd::RawFd>,
    seccomp_blocked: bool,
    /// This thread's real-time priority while the fleet stops (see [`stop_all`]).
    urgent: Option<RtBoost>,
    /// Every VM has been told to stop.
    stopping_all: bool,
    /// The timer is `--duration`'s (a planned end), not `--timeout`'s.
    planned_end: bool,
}

impl Control {
    fn stop_all(&mut self, why: VmEnd) {
        self.stopping_all = true;
        if let Some(boost) = stop_all(&self.vms, why) {
            self.urgent = Some(boost);
        }
    }

    /// Publishes the merge thread's latest figures: status line and `--stats`.
    fn on_stats_tick(&mut self) {
        let Some(merge) = &self.merge else { return };
        let status = merge.status();
        if self.status_line {
            // Skipped while earlier output still waits for the terminal: a newer line follows.
            output::eprint_if_idle(format!("\r{}\x1b[K", report::status_line(&status)).as_bytes());
        }
        if let Some(stats) = &self.stats {
            write_stats(stats, &status, false);
        }
    }

    /// Every VM has stopped or been told to (its vCPU threads are collected at the end).
    fn finished(&self) -> bool {
        self.vms
            .iter()
            .all(|vm| matches!(vm.state(), vm::Lifecycle::Stopping | vm::Lifecycle::Stopped))
    }

    /// Stops the VMs whose guests have ended.
    fn reap(&mut self) {
        if self.urgent.is_some() || self.stopping_all {
            // The whole fleet is stopping: `retire` collects it, after the merge thread's last
            // look at guest memory.
            return;
        }
        let ended: Vec<usize> = (0..self.vms.len())
            .filter(|&i| {
                self.vms[i].outcome().is_some() && self.vms[i].state() != vm::Lifecycle::Stopped
            })
            .collect();
        for &i in &ended {
            self.vms[i].request_stop();
        }
        collect(&self.vms, &ended);
        for &i in &ended {
            if let Some((end, at)) = self.vms[i].outcome() {
                log::info!(
                    "{}: {end} after {:.1} ms",
                    self.vms[i].name(),
                    at.saturating_duration_since(self.vms[i].created())
                        .as_secs_f64()
                        * 1e3
                );
            }
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into our own buffer from the process's stdin.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                return;
            }
            log::warn!("console input failed ({err}); input disabled");
        }
        if n <= 0 {
            // EOF or a real error: stop listening, the guest keeps running.
            self.watch_stdin(ops, false);
            return;
        }
        let (bytes, quit) = match self.escape.feed(&buf[..n as usize]) {
            Input::Guest(b) => (b, false),
            Input::Quit(b) => (b, true),
        };
        if quit {
            self.stop_all(VmEnd::Quit);
            return;
        }
        self.pending_input.extend(bytes);
        self.feed_input(ops);
    }

    /// Moves queued console input into the guest's UART as room allows.
    fn feed_input(&mut self, ops: &mut EventOps) {
        if let Some(vm) = self.vms.first() {
            let (front, _) = self.pending_input.as_slices();
            let taken = vm.shared().devices().serial_input(front);
            self.pending_input.drain(..taken);
        }
        let backlog = !self.pending_input.is_empty();
        self.watch_stdin(ops, !backlog);
    }

    fn watch_stdin(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.stdin {
            return;
        }
        let events = Events::with_data_raw(libc::STDIN_FILENO, EV_STDIN, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.stdin = on,
            Err(e) => log::warn!("cannot change console input watch: {e:?}"),
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, data: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.signals.fd.as_raw_fd(), EV_SIGNAL);
        add(self.notify.as_raw_fd(), EV_NOTIFY);
        add(self.input_drained.as_raw_fd(), EV_INPUT_DRAINED);
        if let Some(timer) = &self.timer {
            add(timer.as_raw_fd(), EV_TIMER);
        }
        if let Some(timer) = &self.stats_timer {
            add(timer.as_raw_fd(), EV_STATS);
        }
        if self.stdin {
            add(libc::STDIN_FILENO, EV_STDIN);
        }
        if let Some(fd) = self.seccomp_events {
            add(fd, EV_SECCOMP);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_SIGNAL => {
                if let Some(sig) = self.signals.read() {
                    log::info!("received signal {sig}; stopping all guests");
                    // The first stop decides the exit status; later signals only repeat it.
                    if self.signal.is_none() {
                        self.signal = Some(sig);
                        self.stop_all(VmEnd::Signal(sig));
                    }
                }
            }
            EV_NOTIFY => {
                let _ = self.notify.read();
                self.reap();
            }
            EV_TIMER => {
                if let Some(timer) = &mut self.timer {
                    let _ = timer.wait();
                }
                let _ = ops.remove(events);
                if self.planned_end {
                    log::info!("--duration is over; stopping all guests");
                    self.stop_all(VmEnd::Planned);
                } else {
                    self.timed_out = true;
                    self.stop_all(VmEnd::Timeout);
                }
            }
            EV_STDIN => self.on_stdin(ops),
            EV_STATS => {
                if let Some(timer) = &mut self.stats_timer {
                    let _ = timer.wait();
                }
                self.on_stats_tick();
            }
            EV_SECCOMP => {
                // The handler said which thread and call; the guests stop, host state is restored.
                let _ = ops.remove(events);
                self.seccomp_blocked = true;
                let why = "a kvmerge thread was stopped by its seccomp filter";
                self.stop_all(VmEnd::Vmm(why.into()));
            }
            EV_INPUT_DRAINED => {
                let _ = self.input_drained.read();
                if !self.pending_input.is_empty() {
                    self.feed_input(ops);
                }
            }
            _ => {}
        }
    }
}

/// A signalfd for `signals`, which are blocked in the calling thread (and so in every thread it
/// spawns afterwards). On drop, signals still pending are discarded and the previous mask comes
/// back.
struct SignalFd {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
    /// The first signal read through [`SignalFd::take`] (0: none yet).
    caught: AtomicI32,
}

impl SignalFd {
    fn new(signals: &[libc::c_int]) -> std::io::Result<SignalFd> {
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
    fn read(&self) -> Option<i32> {
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
    fn take(&self) -> Option<i32> {
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
    fn caught(&self) -> Option<i32> {
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
