//! A run: pre-flight checks, then the fleet (src/runner/fleet.rs) under the control loop
//! (src/runner/control.rs), and the per-guest report.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::EntryMode;
use crate::config::DedupMode;
use crate::config::{self, Config, ConsoleMode};
use crate::console::{ConsoleSink, Consoles, Expect, Output};
use crate::dedup::ksm;
use crate::dedup::merge::{self, MergeThread, MergeVm};
use crate::host;
use crate::kvm::{self, Flavor, Host};
use crate::loader::{self, InitrdImage, KernelImage};
use crate::memory;
use crate::output;
use crate::pressure;
use crate::sched;
use crate::seccomp::{self, ThreadKind};
use crate::terminal::{EscapeDecoder, RawMode};
use crate::vcpu::{RtBoost, VmEnd};
use crate::vm;

use crate::sync::lock;

mod control;
mod fleet;
pub(crate) mod signals;
mod stats;

pub(crate) use control::watch;
use control::{Control, control_loop};
use fleet::{Built, build_fleet, resume_all, retire};
pub(crate) use fleet::{spread, stop_all, teardown};
use signals::SignalFd;
use stats::{StatsFile, write_stats};

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
pub(crate) fn create_sink_file(path: &Path) -> std::io::Result<File> {
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

/// Every catchable signal whose default action ends the process: each stops all guests, restores
/// host state and makes kvmerge exit with 128+N. (SIGPIPE is ignored by Rust programs: a closed
/// pipe is a write error, which ends only the output that hit it. SIGXFSZ, blocked, makes a write
/// past the file size limit fail with EFBIG instead: the output that hit it ends.)
pub const STOP_SIGNALS: [libc::c_int; 14] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
];

/// How long queued console and `--stats` output may take to drain at the end before it is
/// abandoned (a sink that does not read cannot hold the exit).
const OUTPUT_FLUSH: Duration = Duration::from_secs(1);

/// How long the console banner may take to reach the terminal before the guest starts anyway.
const BANNER_FLUSH: Duration = Duration::from_secs(1);

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
                // On the terminal before the guest writes to it (a separate writer thread):
                // bounded, since the terminal may be suspended (Ctrl-S).
                output::flush_stderr(BANNER_FLUSH);
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
    // Guest RAM is gone, so restoring the knobs (which may unmerge) has nothing of ours to do.
    release_ksm(ksm_owner);
    drop(raw);
    Ok(Report {
        vms: reports,
        timed_out: c.timed_out,
        signal: c.signal,
        dedup,
        seccomp_blocked: c.seccomp_blocked,
    })
}

/// Lets go of this process's part in steering the host's KSM: the knobs are restored when the
/// last reference goes. A merge thread parked by its seccomp filter keeps its reference for good,
/// so then they are restored here.
pub(crate) fn release_ksm(hold: Option<Arc<ksm::KsmHold>>) {
    if seccomp::parked(ThreadKind::Merge) {
        if let Some(Err(e)) = hold
            .as_ref()
            .and_then(|hold| hold.owner())
            .map(|owner| owner.restore())
        {
            log::error!("host KSM knobs: {e}");
        }
    }
    drop(hold);
}

/// This process's part in steering the host's KSM (see [`ksm::join_for_run`]).
pub(crate) fn take_ksm(cfg: &Config) -> Option<Arc<ksm::KsmHold>> {
    let any_full = cfg.vms.iter().any(|vm| vm.dedup == DedupMode::Full);
    ksm::join_for_run(cfg.ksm_policy, any_full)
}
