//! A run: pre-flight checks, building the fleet, the control loop (signals, timeout, guest ends,
//! console input) and the per-guest report.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::EntryMode;
use crate::config::DedupMode;
use crate::config::{self, Config, ConsoleMode};
use crate::console::{ConsoleSink, Expect, Output};
use crate::dedup::ksm::{self, Knob, KsmOwner, KsmSysfs};
use crate::dedup::merge::{self, MergeThread, MergeVm};
use crate::dedup::policy::PolicyKind;
use crate::dedup::report;
use crate::host;
use crate::kvm::{self, Flavor, Host};
use crate::loader::{self, InitrdImage, KernelImage};
use crate::memory;
use crate::pressure;
use crate::terminal::{EscapeDecoder, Input, RawMode};
use crate::vcpu::VmEnd;
use crate::vm::{self, BootSources, Vm, VmIo};

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
            Error::Control(_) | Error::Memory(_) => false,
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
}

#[derive(Clone, Debug)]
pub struct Report {
    pub vms: Vec<VmReport>,
    pub timed_out: bool,
    pub signal: Option<i32>,
    /// The merge thread's final figures.
    pub dedup: Option<merge::Status>,
}

impl Report {
    /// 0 when every guest succeeded; 124 on timeout; 128+N on signal N (Ctrl-A x on the console
    /// counts as SIGINT); 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.timed_out {
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

fn console_for(cfg: &Config, index: usize, expect: Option<Expect>) -> Result<ConsoleSink> {
    let output = match &cfg.console {
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
            let file = File::create(&path).map_err(|source| Error::ConsoleFile {
                path: path.display().to_string(),
                source,
            })?;
            Output::File(file)
        }
    };
    Ok(ConsoleSink::new(output, expect))
}

/// Runs the fleet described by `cfg` to its end.
pub fn run(cfg: &Config) -> Result<Report> {
    let pre = preflight(cfg)?;
    if let ConsoleMode::Dir(dir) = &cfg.console {
        std::fs::create_dir_all(dir).map_err(|source| Error::ConsoleDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    // Signals become events of the control loop; the mask is inherited by every vCPU thread, so
    // SIGINT/SIGTERM are only ever read from the signalfd.
    let signals =
        SignalFd::new(&[libc::SIGINT, libc::SIGTERM]).map_err(|e| Error::Control(e.to_string()))?;
    let notify =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Control(e.to_string()))?);
    let pattern = cfg.expect.clone().map(Arc::new);

    let mut consoles = Vec::with_capacity(cfg.vms.len());
    let mut expects = Vec::with_capacity(cfg.vms.len());
    for index in 0..cfg.vms.len() {
        let expect = pattern.clone().map(Expect::new);
        consoles.push(console_for(cfg, index, expect.clone())?);
        expects.push(expect);
    }
    let input_drained =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Control(e.to_string()))?);
    let mut vms = build_fleet(&pre, cfg, consoles, &notify, &input_drained)?;
    if let Err(e) = memory::verify_mergeable(vms.iter().map(|vm| vm.ram().as_ref())) {
        teardown(vms);
        return Err(Error::Memory(e));
    }
    log::info!("built {} VM(s)", vms.len());

    let stats = match &cfg.stats {
        Some(path) => Some(StatsFile::create(path)?),
        None => None,
    };

    let _raw = if cfg.interactive {
        match RawMode::enter(libc::STDIN_FILENO) {
            Ok(guard) => {
                eprintln!("kvmerge: console attached; press Ctrl-A x to quit");
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
    let interactive = cfg.interactive && _raw.is_some();

    for vm in &mut vms {
        if let Err(source) = vm.resume() {
            let index = vm.index();
            stop_all(&mut vms, VmEnd::Vmm("start failed".into()));
            return Err(Error::Build { index, source });
        }
    }

    // Dedup starts once the guests run, so it adds nothing to their start-up: kvmerge's hold on
    // the host's KSM knobs (restored when the last reference drops, on every way out of this
    // function), and the merge thread.
    let ksm_owner = take_ksm(cfg);
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
        ..merge::Options::default()
    };
    let merge = match MergeThread::start(merge_vms, ksm_owner.clone(), merge_opts) {
        Ok(merge) => merge,
        Err(e) => {
            stop_all(&mut vms, VmEnd::Vmm("merge thread failed".into()));
            return Err(Error::Control(format!(
                "cannot start the merge thread: {e}"
            )));
        }
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
        signals,
        notify,
        timer: None,
        stdin: interactive,
        input_drained,
        pending_input: VecDeque::new(),
        escape: EscapeDecoder::default(),
        timed_out: false,
        signal: None,
        merge: Some(merge),
        stats,
        stats_timer: None,
        status_line: cfg.status_line,
    }));
    if cfg.status_line || cfg.stats.is_some() {
        let mut timer = TimerFd::new().map_err(|e| Error::Control(e.to_string()))?;
        timer
            .reset(STATS_PERIOD, Some(STATS_PERIOD))
            .map_err(|e| Error::Control(e.to_string()))?;
        lock(&control).stats_timer = Some(timer);
    }
    if let Some(timeout) = cfg.timeout {
        let mut timer = TimerFd::new().map_err(|e| Error::Control(e.to_string()))?;
        timer
            .reset(timeout, None)
            .map_err(|e| Error::Control(e.to_string()))?;
        lock(&control).timer = Some(timer);
    }
    let mut events: EventManager<Arc<Mutex<Control>>> =
        EventManager::new().map_err(|e| Error::Control(format!("{e:?}")))?;
    events.add_subscriber(control.clone());
    while !lock(&control).finished() {
        if let Err(e) = events.run() {
            let mut c = lock(&control);
            stop_all(&mut c.vms, VmEnd::Vmm("control loop failed".into()));
            return Err(Error::Control(format!("{e:?}")));
        }
    }

    let mut c = lock(&control);
    let vms = std::mem::take(&mut c.vms);
    // Guests have stopped but their RAM is still mapped: the merge thread's last accounting sees
    // what they ended with.
    let dedup = c.merge.take().map(MergeThread::stop);
    if let Some(status) = &dedup {
        if c.status_line {
            eprintln!();
        }
        if let Some(stats) = &mut c.stats {
            stats.write(status, true);
        }
        if cfg.summary {
            eprintln!("{}", report::summary_table(status));
        }
    }
    let reports: Vec<VmReport> = vms
        .iter()
        .zip(&expects)
        .map(|(vm, expect)| {
            let (end, at) = vm
                .outcome()
                .cloned()
                .unwrap_or((VmEnd::Vmm("no outcome recorded".into()), Instant::now()));
            VmReport {
                name: vm.name().to_string(),
                end,
                expect_missed: expect
                    .as_ref()
                    .filter(|e| !e.matched())
                    .map(|e| e.pattern().to_string()),
                lifetime: at.saturating_duration_since(vm.created()),
            }
        })
        .collect();
    drop(pressure);
    teardown(vms);
    drop(ksm_owner);
    Ok(Report {
        vms: reports,
        timed_out: c.timed_out,
        signal: c.signal,
        dedup,
    })
}

/// Takes ownership of the host's KSM knobs when kvmerge should steer them: some guest uses
/// `full` dedup, the policy is not `kernel`, and this process may write them. Otherwise says
/// once why not, and guests are merged (or not) at the host's own settings.
fn take_ksm(cfg: &Config) -> Option<Arc<KsmOwner>> {
    if cfg.ksm_policy == PolicyKind::Kernel || !cfg.vms.iter().any(|vm| vm.dedup == DedupMode::Full)
    {
        return None;
    }
    let sysfs = KsmSysfs::host();
    if let Err(why) = sysfs.writable() {
        log::warn!(
            "not steering host KSM ({why}): guests merge at the host's own KSM settings; \
             zero-page reclaim and accounting still run"
        );
        return None;
    }
    match KsmOwner::take(sysfs, merge::OWNED_KNOBS) {
        Ok(owner) => {
            // Zero pages merge into the kernel's zero page instead of one KSM page per content;
            // smart scanning skips pages that keep failing to merge; the kernel's own advisor
            // would fight the policy over pages_to_scan.
            for (knob, value) in [
                (Knob::AdvisorMode, "none"),
                (Knob::UseZeroPages, "1"),
                (Knob::SmartScan, "1"),
            ] {
                if owner.original(knob).is_some() {
                    if let Err(e) = owner.set(knob, value) {
                        log::warn!("cannot set KSM {knob}: {e}");
                    }
                }
            }
            Some(Arc::new(owner))
        }
        // Another kvmerge steers the host's one KSM pool, for our guests too: nothing to report.
        Err(e @ ksm::Error::OwnedElsewhere(_)) => {
            log::info!("not steering host KSM ({e})");
            None
        }
        Err(e) => {
            log::warn!("not steering host KSM ({e}); zero-page reclaim and accounting still run");
            None
        }
    }
}

/// How often the status line and `--stats` are refreshed.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// `--stats FILE`: one JSON object per line.
struct StatsFile {
    out: std::io::BufWriter<File>,
    failed: bool,
}

impl StatsFile {
    fn create(path: &std::path::Path) -> Result<StatsFile> {
        let file = File::create(path).map_err(|source| Error::StatsFile {
            path: path.display().to_string(),
            source,
        })?;
        Ok(StatsFile {
            out: std::io::BufWriter::new(file),
            failed: false,
        })
    }

    fn write(&mut self, status: &merge::Status, last: bool) {
        if self.failed {
            return;
        }
        #[derive(serde::Serialize)]
        struct Line<'a> {
            #[serde(rename = "final")]
            last: bool,
            #[serde(flatten)]
            status: &'a merge::Status,
        }
        let result = serde_json::to_writer(&mut self.out, &Line { last, status })
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .and_then(|()| self.out.flush());
        if let Err(e) = result {
            log::warn!("--stats: cannot write ({e}); no more figures will be written");
            self.failed = true;
        }
    }
}

/// Builds every VM of the fleet, spread over the host's CPUs: most of a VM's build time is spent
/// in KVM ioctls, which run in parallel. On failure, the VMs already built are torn down and the
/// error of the lowest-numbered VM is returned.
fn build_fleet(
    pre: &Preflight,
    cfg: &Config,
    consoles: Vec<ConsoleSink>,
    notify: &Arc<EventFd>,
    input_drained: &Arc<EventFd>,
) -> Result<Vec<Vm>> {
    let slots: Vec<Mutex<Option<ConsoleSink>>> =
        consoles.into_iter().map(|c| Mutex::new(Some(c))).collect();
    let results: Vec<Mutex<Option<Result<Vm>>>> =
        (0..cfg.vms.len()).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(cfg.vms.len());
    let work = || {
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= cfg.vms.len() || failed.load(Ordering::Relaxed) {
                break;
            }
            let vm_cfg = &cfg.vms[index];
            let sources = BootSources {
                kernel: &pre.kernels[&vm_cfg.kernel],
                initrd: vm_cfg.initrd.as_ref().map(|p| &pre.initrds[p]),
            };
            let console = lock(&slots[index])
                .take()
                .expect("each console is used once");
            let io = VmIo {
                console,
                notify: notify.clone(),
                input_drained: input_drained.clone(),
            };
            let result = Vm::build(&pre.host, index, vm_cfg, &sources, io)
                .map_err(|source| Error::Build { index, source });
            failed.fetch_or(result.is_err(), Ordering::Relaxed);
            *lock(&results[index]) = Some(result);
        }
    };
    in_workers(workers, &work);
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
    match first_error {
        None => Ok(vms),
        Some(e) => {
            teardown(vms);
            Err(e)
        }
    }
}

/// Stops and destroys VMs, spread over the host's CPUs: closing a VM fd makes KVM free the whole
/// VM, which takes milliseconds per VM.
fn teardown(vms: Vec<Vm>) {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queue = Mutex::new(vms);
    in_workers(workers, &|| {
        while let Some(vm) = lock(&queue).pop() {
            drop(vm);
        }
    });
}

/// Runs `work` on up to `workers` scoped threads. A thread that cannot be created (a thread
/// limit reached after admission) is not an error: fewer threads do the work, and with none the
/// calling thread does it alone.
fn in_workers(workers: usize, work: &(dyn Fn() + Sync)) {
    std::thread::scope(|scope| {
        let mut started = 0;
        for _ in 0..workers {
            match std::thread::Builder::new().spawn_scoped(scope, work) {
                Ok(_) => started += 1,
                Err(e) => {
                    log::warn!("cannot start a worker thread ({e}); continuing with {started}");
                    break;
                }
            }
        }
        if started == 0 {
            work();
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends every VM still running with `why`, then collects all vCPU threads.
fn stop_all(vms: &mut [Vm], why: VmEnd) {
    for vm in vms.iter() {
        vm.shared().end(why.clone());
        vm.request_stop();
    }
    for vm in vms.iter_mut() {
        vm.finish_stop();
    }
}

/// Event tokens of the control loop.
const EV_SIGNAL: u32 = 1;
const EV_NOTIFY: u32 = 2;
const EV_TIMER: u32 = 3;
const EV_STDIN: u32 = 4;
const EV_INPUT_DRAINED: u32 = 5;
const EV_STATS: u32 = 6;

struct Control {
    vms: Vec<Vm>,
    signals: SignalFd,
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
    stats: Option<StatsFile>,
    stats_timer: Option<TimerFd>,
    status_line: bool,
}

impl Control {
    /// Publishes the merge thread's latest figures: status line and `--stats`.
    fn on_stats_tick(&mut self) {
        let Some(merge) = &self.merge else { return };
        let status = merge.status();
        if self.status_line {
            eprint!("\r{}\x1b[K", report::status_line(&status));
        }
        if let Some(stats) = &mut self.stats {
            stats.write(&status, false);
        }
    }

    fn finished(&self) -> bool {
        self.vms
            .iter()
            .all(|vm| vm.state() == vm::Lifecycle::Stopped)
    }

    /// Stops the VMs whose guests have ended.
    fn reap(&mut self) {
        let ended: Vec<usize> = (0..self.vms.len())
            .filter(|&i| {
                self.vms[i].outcome().is_some() && self.vms[i].state() != vm::Lifecycle::Stopped
            })
            .collect();
        for &i in &ended {
            self.vms[i].request_stop();
        }
        for &i in &ended {
            self.vms[i].finish_stop();
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
            stop_all(&mut self.vms, VmEnd::Quit);
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
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_SIGNAL => {
                if let Some(sig) = self.signals.read() {
                    log::info!("received signal {sig}; stopping all guests");
                    self.signal = Some(sig);
                    stop_all(&mut self.vms, VmEnd::Signal(sig));
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
                self.timed_out = true;
                stop_all(&mut self.vms, VmEnd::Timeout);
            }
            EV_STDIN => self.on_stdin(ops),
            EV_STATS => {
                if let Some(timer) = &mut self.stats_timer {
                    let _ = timer.wait();
                }
                self.on_stats_tick();
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
/// spawns afterwards). The previous mask comes back on drop.
struct SignalFd {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
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
        })
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let mut file = File::from(self.fd.try_clone().ok()?);
        // SAFETY: the slice covers exactly `info`.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut info as *mut libc::signalfd_siginfo).cast::<u8>(),
                size,
            )
        };
        match file.read(buf) {
            Ok(n) if n == size => Some(info.ssi_signo as i32),
            _ => None,
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`. Pending signals are then delivered normally.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
