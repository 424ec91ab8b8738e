//! `kvmerge serve`: a long-lived fleet driven over HTTP/1.1 + JSON on a Unix socket.
//!
//! Threads: the calling thread runs the control loop ([`Server`]), which owns every VM and is
//! the only one to change the fleet; the API threads ([`api`]) read requests and hand each to the
//! control loop as an [`Op`] with a channel for the answer; the builder thread ([`build`])
//! builds and starts the VMs a create call asks for. The merge thread and the memory-pressure
//! guard are those of `kvmerge run`, with VMs added and removed as the server runs. Host state
//! (the KSM knobs, the socket) is restored on every way out, as in `kvmerge run`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use regex::Regex;
use serde_json::{Value, json};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{Config, DedupMode, VmConfig};
use crate::console::Expect;
use crate::dedup::merge::{self, MergeThread, MergeVm, VmStatus};
use crate::dedup::policy::PolicyKind;
use crate::kvm::Host;
use crate::pressure;
use crate::runner::signals::SignalFd;
use crate::runner::{self, STOP_SIGNALS};
use crate::sched;
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::sync::lock;
use crate::vcpu::VmEnd;
use crate::vm::{Lifecycle, Vm};

pub mod api;
mod build;
pub mod client;
pub mod http;
mod metrics;
mod socket;

/// `kvmerge serve`'s settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub ksm_policy: PolicyKind,
    pub seccomp: SeccompMode,
    /// Most guest RAM of all VMs not yet ended together (None: only the host's memory bounds it).
    pub memory_limit: Option<u64>,
    /// As `kvmerge run --overcommit`, checked for each create call.
    pub overcommit: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Socket(#[from] socket::Error),
    #[error(transparent)]
    Kvm(#[from] crate::kvm::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error("cannot set up the server: {0}")]
    Setup(String),
}

impl Error {
    /// Bad usage or bad input (exit status 2) as opposed to a failure while running (1).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::Socket(_) | Error::Kvm(_))
    }
}

/// How a server ended: 0 after a shutdown call, 128+N after signal N, 159 after a seccomp stop.
pub struct Ended {
    pub exit_code: i32,
}

/// An API request for the control loop.
pub(crate) enum Op {
    Create(Vec<NewVm>),
    List,
    Info(String),
    Pause(String),
    Resume(String),
    Stop(String),
    Delete(String),
    /// Answers when the VM has ended (or, `ready`, when its ready marker was seen).
    Wait {
        id: String,
        ready: bool,
    },
    Stats,
    Metrics,
    Shutdown,
}

/// One VM of a create call, checked by the API thread (values) but not yet against the server
/// (names, limits, trust groups).
pub(crate) struct NewVm {
    pub name: Option<String>,
    pub cfg: VmConfig,
    pub console: Option<PathBuf>,
    pub ready: Option<Arc<Regex>>,
    pub timeout: Option<Duration>,
}

/// The answer to an [`Op`].
pub(crate) struct Reply {
    pub status: u16,
    pub body: Body,
}

pub(crate) enum Body {
    Json(Value),
    /// Prometheus text exposition.
    Text(String),
}

impl Reply {
    fn json(status: u16, value: Value) -> Reply {
        Reply {
            status,
            body: Body::Json(value),
        }
    }

    pub(crate) fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error": message.into() }))
    }
}

pub(crate) struct Call {
    pub op: Op,
    pub reply: Sender<Reply>,
    /// Set by the API thread when the client left before the answer.
    pub gone: Arc<AtomicBool>,
}

/// Someone waiting for a VM's end or ready marker.
struct Waiter {
    reply: Sender<Reply>,
    gone: Arc<AtomicBool>,
}

impl Waiter {
    fn answer(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }
}

/// Where API threads post their calls.
#[derive(Clone)]
pub(crate) struct Inbox {
    calls: Sender<Call>,
    wake: Arc<EventFd>,
}

impl Inbox {
    /// Posts `op`; the answer comes on the returned channel (closed if the server stops first).
    /// Set the flag when the answer is no longer wanted (the client left).
    pub(crate) fn post(&self, op: Op) -> (Receiver<Reply>, Arc<AtomicBool>) {
        let (reply, answer) = mpsc::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let call = Call {
            op,
            reply,
            gone: gone.clone(),
        };
        if self.calls.send(call).is_ok() {
            let _ = self.wake.write(1);
        }
        (answer, gone)
    }
}

/// A VM name: what `{id}` in a path is. Letters, digits, `_`, `.`, `-`; 1 to 63 characters,
/// starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() < 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Runs the server until a shutdown call, a stop signal or a seccomp stop.
pub fn serve(cfg: &ServeConfig) -> Result<Ended, Error> {
    let signals = Arc::new(SignalFd::new(&STOP_SIGNALS).map_err(|e| Error::Setup(e.to_string()))?);
    // The socket first: a second server on the same path is refused before anything else.
    let listener = socket::Listener::bind(&cfg.socket)?;
    let host = Host::open()?;
    // The vCPU kick handler, installed here: the builder thread's filter forbids sigaction.
    crate::vcpu::init_kick_signal().map_err(|e| Error::Setup(e.to_string()))?;
    let seccomp_events = seccomp::prepare(cfg.seccomp)?;
    crate::output::start_stderr();

    let setup = |e: std::io::Error| Error::Setup(e.to_string());
    let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?);
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?);
    let (calls_tx, calls) = mpsc::channel();
    let inbox = Inbox {
        calls: calls_tx,
        wake: wake.clone(),
    };
    let stopping = Arc::new(AtomicBool::new(false));

    // Builder and API threads start before this thread's filter (which forbids what they do)
    // and install their own.
    let (jobs_tx, jobs) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let wiring = build::Wiring {
        host,
        jobs,
        done: done_tx,
        wake: wake.clone(),
        notify: notify.clone(),
        stopping: stopping.clone(),
    };
    let builder = std::thread::Builder::new()
        .name("kvmerge-builder".into())
        .spawn(move || build::run(wiring))
        .map_err(setup)?;
    let api = api::start(listener.take()?, inbox.clone(), stopping.clone()).map_err(setup)?;

    let base_nice = sched::this_thread_nice().ok();
    let _responsive = sched::Raised::this_thread(sched::RESPONSIVE, "the control thread");
    seccomp::install(ThreadKind::Control)?;

    // The host's KSM knobs are taken when the first VM with dedup `full` starts (Server::on_built).
    let merge = MergeThread::start(
        Vec::new(),
        None,
        merge::Options {
            policy: cfg.ksm_policy,
            nice: base_nice,
            ..merge::Options::default()
        },
    )
    .map_err(|e| Error::Setup(format!("cannot start the merge thread: {e}")))?;
    let pressure = match pressure::Guard::start(Vec::new()) {
        Ok(guard) => Some(guard),
        Err(e) => {
            log::warn!("cannot start the memory pressure guard ({e}); running without it");
            None
        }
    };
    output_ready(&cfg.socket);

    let server = Arc::new(Mutex::new(Server {
        cfg: cfg.clone(),
        signals: signals.clone(),
        notify,
        wake,
        calls,
        jobs: Some(jobs_tx),
        done,
        timer: TimerFd::new().map_err(|e| Error::Setup(e.to_string()))?,
        seccomp_events,
        entries: BTreeMap::new(),
        pending: HashMap::new(),
        next_job: 0,
        next_index: 0,
        merge: Some(merge),
        pressure,
        stopping: stopping.clone(),
        shutdown_replies: Vec::new(),
        exit_code: None,
        started: Instant::now(),
        created_total: 0,
        ksm: None,
        api: api.counts(),
    }));
    let looped = run_loop(&server);
    let mut s = lock(&server);
    if let Err(e) = &looped {
        log::error!("{e}");
        s.begin_shutdown(VmEnd::Vmm("control loop failed".into()), Some(1));
    }
    // Whatever is left (a failed loop leaves VMs behind): stopped and destroyed.
    let left: Vec<Vm> = s.entries.values_mut().filter_map(|e| e.vm.take()).collect();
    let urgent = runner::stop_all(&left, VmEnd::Requested);
    runner::teardown(left);
    // Back to normal priority before the KSM restore, which may unmerge for seconds.
    drop(urgent);
    s.jobs = None;
    drop(s.merge.take().map(MergeThread::stop));
    drop(s.pressure.take());
    runner::release_ksm(s.ksm.take());
    let exit_code = s.exit_code.unwrap_or(1);
    for (_, (_, reply, _)) in s.pending.drain() {
        let _ = reply.send(Reply::error(
            500,
            "the server stopped before the VMs were built",
        ));
    }
    for reply in s.shutdown_replies.drain(..) {
        let _ = reply.send(Reply::json(200, json!({ "stopped": true })));
    }
    drop(s);
    // Calls still queued are answered 503 (their reply channels close with the server).
    drop(server);
    // API threads finish the answers under way (bounded); then the socket goes.
    api.finish(Duration::from_secs(1));
    drop(listener);
    if !seccomp::parked(ThreadKind::Builder) && builder.join().is_err() {
        log::error!("the builder thread panicked");
    }
    looped.map(|()| Ended { exit_code })
}

fn output_ready(socket: &std::path::Path) {
    crate::output::eprintln(&format!(
        "kvmerge: serving the API on {} (kvmerge vm --help; Ctrl-C or POST /v1/shutdown stops)",
        socket.display()
    ));
}

fn run_loop(server: &Arc<Mutex<Server>>) -> Result<(), Error> {
    let mut events: EventManager<Arc<Mutex<Server>>> =
        EventManager::new().map_err(|e| Error::Setup(format!("{e:?}")))?;
    events.add_subscriber(server.clone());
    while !lock(server).finished() {
        events
            .run()
            .map_err(|e| Error::Setup(format!("control loop: {e:?}")))?;
        seccomp::injection_point();
    }
    Ok(())
}

/// How long a new VM's vCPU threads keep the builder's raised priority, unless its ready marker
/// comes first: its start (the first guest instructions, the console's first lines) is not
/// stretched over a round of every busy vCPU thread of the host, and then it runs as they do.
const START_BOOST: Duration = Duration::from_millis(50);

const EV_SIGNAL: u32 = 1;
const EV_NOTIFY: u32 = 2;
const EV_WAKE: u32 = 3;
const EV_TIMER: u32 = 4;
const EV_SECCOMP: u32 = 5;

/// One VM the server knows (until it is deleted).
struct Entry {
    index: usize,
    cfg: VmConfig,
    console: Option<PathBuf>,
    timeout: Option<Duration>,
    /// None while the builder has it, and once it has ended and been destroyed.
    vm: Option<Vm>,
    ready: Option<Expect>,
    requested: Instant,
    started: Option<Instant>,
    ready_at: Option<Instant>,
    deadline: Option<Instant>,
    /// Until when its vCPU threads keep their start priority (see [`START_BOOST`]).
    boost_until: Option<Instant>,
    end: Option<(VmEnd, Instant)>,
    /// The merge thread's figures when the VM ended.
    last_figures: Option<VmStatus>,
    wait_end: Vec<Waiter>,
    wait_ready: Vec<Waiter>,
    /// Delete calls waiting for the VM to be gone.
    deletes: Vec<Sender<Reply>>,
    /// The builder job that builds it, while it does.
    job: Option<u64>,
}

impl Entry {
    fn state(&self) -> &'static str {
        if self.end.is_some() {
            return "exited";
        }
        match &self.vm {
            None => "booting",
            Some(vm) => match vm.state() {
                Lifecycle::Paused => "paused",
                Lifecycle::Stopping | Lifecycle::Stopped => "stopping",
                _ if self.ready.is_some() && self.ready_at.is_none() => "booting",
                _ => "running",
            },
        }
    }

    /// Counts against the memory limit: not ended yet.
    fn live(&self) -> bool {
        self.end.is_none()
    }

    fn is_ready(&self) -> bool {
        self.ready_at.is_some()
    }
}

struct Server {
    cfg: ServeConfig,
    signals: Arc<SignalFd>,
    notify: Arc<EventFd>,
    wake: Arc<EventFd>,
    calls: Receiver<Call>,
    jobs: Option<Sender<build::Job>>,
    done: Receiver<build::Done>,
    timer: TimerFd,
    seccomp_events: Option<std::os::fd::RawFd>,
    entries: BTreeMap<String, Entry>,
    /// Create calls whose job the builder has: job id → (names, reply, first index).
    pending: HashMap<u64, (Vec<String>, Sender<Reply>, usize)>,
    next_job: u64,
    next_index: usize,
    merge: Option<MergeThread>,
    pressure: Option<pressure::Guard>,
    stopping: Arc<AtomicBool>,
    shutdown_replies: Vec<Sender<Reply>>,
    exit_code: Option<i32>,
    started: Instant,
    created_total: u64,
    /// This process's part in steering the host's KSM, once a VM with dedup `full` has started.
    ksm: Option<Arc<crate::dedup::ksm::KsmHold>>,
    api: Arc<api::Counts>,
}

impl Server {
    /// The server has been told to stop and nothing is left running or building.
    fn finished(&self) -> bool {
        // A builder stopped by its filter never finishes its job.
        let building = !self.pending.is_empty() && !seccomp::parked(ThreadKind::Builder);
        self.stopping.load(Ordering::Relaxed)
            && !building
            && self.entries.values().all(|e| e.vm.is_none())
    }

    fn begin_shutdown(&mut self, why: VmEnd, exit_code: Option<i32>) {
        if self.exit_code.is_none() {
            self.exit_code = exit_code;
        }
        if self.stopping.swap(true, Ordering::Relaxed) {
            return;
        }
        let vms: Vec<&Vm> = self
            .entries
            .values()
            .filter_map(|e| e.vm.as_ref())
            .collect();
        for vm in vms {
            vm.shared().end(why.clone());
            vm.request_stop();
        }
        self.reap();
    }

    fn on_call(&mut self, call: Call) {
        let waiter = Waiter {
            reply: call.reply.clone(),
            gone: call.gone,
        };
        let reply = call.reply;
        let answer = match call.op {
            Op::Create(new) => {
                return self.create(new, reply);
            }
            Op::List => {
                let figures = self.figures();
                Reply::json(
                    200,
                    Value::Array(
                        self.entries
                            .iter()
                            .map(|(n, e)| self.info_with(n, e, figures.as_ref()))
                            .collect(),
                    ),
                )
            }
            Op::Info(id) => match self.entries.get(&id) {
                Some(e) => Reply::json(200, self.info(&id, e)),
                None => unknown(&id),
            },
            Op::Pause(id) => self.pause_resume(&id, true),
            Op::Resume(id) => self.pause_resume(&id, false),
            Op::Stop(id) => return self.stop(&id, waiter, false),
            Op::Delete(id) => return self.stop(&id, waiter, true),
            Op::Wait { id, ready } => return self.wait(&id, ready, waiter),
            Op::Stats => Reply::json(200, self.stats_json()),
            Op::Metrics => Reply {
                status: 200,
                body: Body::Text(self.metrics()),
            },
            Op::Shutdown => {
                log::info!("shutdown requested through the API; stopping every VM");
                self.shutdown_replies.push(reply);
                self.begin_shutdown(VmEnd::Requested, Some(0));
                return;
            }
        };
        let _ = reply.send(answer);
    }

    fn create(&mut self, new: Vec<NewVm>, reply: Sender<Reply>) {
        if self.stopping.load(Ordering::Relaxed) {
            let _ = reply.send(Reply::error(503, "the server is shutting down"));
            return;
        }
        match self.admit(&new) {
            Ok(()) => {}
            Err(r) => {
                let _ = reply.send(r);
                return;
            }
        }
        let count = new.len();
        let job_id = self.next_job;
        self.next_job += 1;
        let first_index = self.next_index;
        let mut specs = Vec::with_capacity(count);
        let mut names = Vec::with_capacity(count);
        for (k, vm) in new.into_iter().enumerate() {
            let index = self.next_index;
            self.next_index += 1;
            let name = match &vm.name {
                Some(n) if count > 1 => format!("{n}-{k}"),
                Some(n) => n.clone(),
                None => self.free_name(index),
            };
            self.entries.insert(
                name.clone(),
                Entry {
                    index,
                    cfg: vm.cfg.clone(),
                    console: vm.console.clone(),
                    timeout: vm.timeout,
                    vm: None,
                    ready: None,
                    requested: Instant::now(),
                    started: None,
                    ready_at: None,
                    deadline: None,
                    boost_until: None,
                    end: None,
                    last_figures: None,
                    wait_end: Vec::new(),
                    wait_ready: Vec::new(),
                    deletes: Vec::new(),
                    job: Some(job_id),
                },
            );
            names.push(name.clone());
            let console = vm
                .console
                .map(|p| PathBuf::from(p.to_string_lossy().replace("{id}", &name)));
            if let Some(entry) = self.entries.get_mut(&name) {
                entry.console = console.clone();
            }
            specs.push(build::Spec {
                index,
                name,
                cfg: vm.cfg,
                console,
                ready: vm.ready,
            });
        }
        let sent = self.jobs.as_ref().is_some_and(|jobs| {
            jobs.send(build::Job {
                id: job_id,
                specs,
                overcommit: self.cfg.overcommit,
            })
            .is_ok()
        });
        if !sent {
            for name in &names {
                self.entries.remove(name);
            }
            let _ = reply.send(Reply::error(500, "the builder thread is gone"));
            return;
        }
        self.pending.insert(job_id, (names, reply, first_index));
    }

    /// `vm{index}`, or the first `vm{index}-K` no VM has.
    fn free_name(&self, index: usize) -> String {
        let base = format!("vm{index}");
        if !self.entries.contains_key(&base) {
            return base;
        }
        (1..)
            .map(|k| format!("{base}-{k}"))
            .find(|n| !self.entries.contains_key(n))
            .expect("a free name")
    }

    /// Checks a create call against the server: names, the memory limit, trust groups and what
    /// the host can hold now.
    fn admit(&self, new: &[NewVm]) -> Result<(), Reply> {
        let count = new.len();
        for vm in new {
            if let Some(name) = &vm.name {
                let taken = if count > 1 {
                    (0..count).any(|k| self.entries.contains_key(&format!("{name}-{k}")))
                } else {
                    self.entries.contains_key(name)
                };
                if taken {
                    return Err(Reply::error(
                        409,
                        format!(
                            "a VM named '{name}' exists already: choose another name, or delete it first"
                        ),
                    ));
                }
            }
        }
        let adding: u64 = new.iter().map(|v| v.cfg.memory).sum();
        if let Some(limit) = self.cfg.memory_limit {
            let held: u64 = self
                .entries
                .values()
                .filter(|e| e.live())
                .map(|e| e.cfg.memory)
                .sum();
            if held + adding > limit {
                return Err(Reply::error(
                    409,
                    format!(
                        "guest RAM would be {} with these VMs, over --memory-limit {} ({} held now)",
                        crate::host::format_mib(held + adding),
                        crate::host::format_mib(limit),
                        crate::host::format_mib(held)
                    ),
                ));
            }
        }
        // One KSM pool per host: every `full` VM of the server in one trust group.
        let live_full = self
            .entries
            .values()
            .filter(|e| e.live() && e.cfg.dedup == DedupMode::Full)
            .map(|e| &e.cfg);
        let all_full = live_full
            .chain(new.iter().map(|v| &v.cfg))
            .filter(|c| c.dedup == DedupMode::Full);
        let mut groups = all_full.map(|c| c.group.as_str());
        if let Some(first) = groups.next() {
            if let Some(other) = groups.find(|g| *g != first) {
                return Err(Reply::error(
                    409,
                    crate::config::Error::GroupsShareKsm(first.into(), other.into()).to_string(),
                ));
            }
        }
        // What the host can hold now is the builder's check (it reads limits and /proc).
        let check = Config {
            vms: new.iter().map(|v| v.cfg.clone()).collect(),
            ..Config::new(Vec::new())
        };
        check
            .validate()
            .map_err(|e| Reply::error(400, e.to_string()))
    }

    /// A builder job is done: the VMs join the server, or the create call fails with nothing
    /// left behind.
    fn on_built(&mut self, done: build::Done) {
        let Some((names, reply, first_index)) = self.pending.remove(&done.id) else {
            return;
        };
        match done.result {
            Err(failure) => {
                for name in &names {
                    self.entries.remove(name);
                }
                // The indexes go back when no later create took any: default names and
                // `{index}` do not skip numbers for a failed create.
                if self.next_index == first_index + names.len() {
                    self.next_index = first_index;
                }
                let _ = reply.send(Reply::error(failure.status, failure.message));
            }
            Ok(built) => {
                let now = Instant::now();
                for (name, b) in names.iter().zip(built) {
                    let Some(entry) = self.entries.get_mut(name) else {
                        continue;
                    };
                    entry.job = None;
                    entry.started = Some(now);
                    entry.deadline = entry.timeout.map(|t| now + t);
                    // A batch's vCPU threads were put back by the builder as they started.
                    entry.boost_until = (names.len() == 1).then(|| now + START_BOOST);
                    if let Some(merge) = &self.merge {
                        merge.add(MergeVm {
                            name: name.clone(),
                            dedup: entry.cfg.dedup,
                            control: b.vm.control().clone(),
                            ram: b.vm.ram().clone(),
                        });
                    }
                    if let Some(guard) = &self.pressure {
                        guard.add(pressure::Guarded {
                            shared: b.vm.shared().clone(),
                            control: b.vm.control().clone(),
                            ram: b.vm.ram().clone(),
                        });
                    }
                    if b.ready.is_none() {
                        entry.ready_at = Some(now);
                    }
                    entry.ready = b.ready;
                    entry.vm = Some(b.vm);
                    self.created_total += 1;
                    log::info!("{name}: started");
                }
                self.take_ksm_for(&names);
                if self.stopping.load(Ordering::Relaxed) {
                    // A shutdown came while they were being built.
                    for name in &names {
                        if let Some(vm) = self.entries.get(name).and_then(|e| e.vm.as_ref()) {
                            vm.shared().end(VmEnd::Requested);
                            vm.request_stop();
                        }
                    }
                    let _ = reply.send(Reply::error(503, "the server is shutting down"));
                } else {
                    let ids: Vec<&String> = names.iter().collect();
                    let _ = reply.send(Reply::json(201, json!({ "id": ids.first(), "ids": ids })));
                }
                self.rearm_timer();
                self.check_ready();
                self.reap();
            }
        }
    }

    /// Takes this process's part in steering the host's KSM once a VM with dedup `full` runs
    /// (a server of `zero` and `off` VMs, or an idle one, leaves the host's settings alone).
    fn take_ksm_for(&mut self, names: &[String]) {
        if self.ksm.is_some() {
            return;
        }
        let Some(full) = names
            .iter()
            .filter_map(|n| self.entries.get(n))
            .find(|e| e.cfg.dedup == DedupMode::Full)
        else {
            return;
        };
        let full = Config {
            vms: vec![full.cfg.clone()],
            ksm_policy: self.cfg.ksm_policy,
            ..Config::new(Vec::new())
        };
        if let Some(hold) = runner::take_ksm(&full) {
            if let Some(merge) = &self.merge {
                merge.steer_ksm(hold.clone());
            }
            self.ksm = Some(hold);
        }
    }

    fn pause_resume(&mut self, id: &str, pause: bool) -> Reply {
        let Some(entry) = self.entries.get(id) else {
            return unknown(id);
        };
        let Some(vm) = entry.vm.as_ref().filter(|_| entry.end.is_none()) else {
            return Reply::error(
                409,
                format!(
                    "{id} is {}: only a started VM can be paused or resumed",
                    entry.state()
                ),
            );
        };
        let result = if pause { vm.pause() } else { vm.resume() };
        match result {
            Ok(()) => Reply::json(200, self.info(id, entry)),
            Err(e) => Reply::error(409, format!("{id}: {e}")),
        }
    }

    fn stop(&mut self, id: &str, reply: Waiter, delete: bool) {
        let Some(entry) = self.entries.get_mut(id) else {
            reply.answer(unknown(id));
            return;
        };
        if entry.job.is_some() {
            reply.answer(Reply::error(
                409,
                format!("{id} is still being built: stop it once its create call has answered"),
            ));
            return;
        }
        if let Some(vm) = &entry.vm {
            vm.shared().end(VmEnd::Requested);
            vm.request_stop();
        }
        if delete {
            entry.deletes.push(reply.reply);
        } else {
            entry.wait_end.push(reply);
        }
        self.reap();
    }

    fn wait(&mut self, id: &str, ready: bool, reply: Waiter) {
        let Some(entry) = self.entries.get_mut(id) else {
            reply.answer(unknown(id));
            return;
        };
        // Waits whose clients left are dropped here, so a long-lived VM does not collect them.
        entry.wait_end.retain(|w| !w.gone.load(Ordering::Relaxed));
        entry.wait_ready.retain(|w| !w.gone.load(Ordering::Relaxed));
        if ready {
            entry.wait_ready.push(reply);
            self.check_ready();
        } else {
            entry.wait_end.push(reply);
        }
        self.reap();
    }

    /// Answers ready-waiters of VMs whose marker has been seen.
    fn check_ready(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self
            .entries
            .iter_mut()
            .filter_map(|(name, e)| {
                if e.ready_at.is_none() && e.ready.as_ref().is_some_and(Expect::matched) {
                    e.ready_at = Some(now);
                    end_boost(e);
                }
                (!e.wait_ready.is_empty() && (e.is_ready() || e.end.is_some()))
                    .then(|| name.clone())
            })
            .collect();
        for name in names {
            let info = self.info(&name, &self.entries[&name]);
            for w in self
                .entries
                .get_mut(&name)
                .map_or_else(Vec::new, |e| std::mem::take(&mut e.wait_ready))
            {
                w.answer(Reply::json(200, info.clone()));
            }
        }
    }

    /// Collects and destroys the VMs whose guests have ended; answers their waiters and deletes.
    fn reap(&mut self) {
        let ended: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.vm.as_ref().is_some_and(|vm| vm.outcome().is_some()))
            .map(|(n, _)| n.clone())
            .collect();
        let figures = self.merge.as_ref().map(MergeThread::status);
        let mut gone = Vec::with_capacity(ended.len());
        for name in &ended {
            let Some(entry) = self.entries.get_mut(name) else {
                continue;
            };
            let Some(vm) = entry.vm.take() else {
                continue;
            };
            vm.request_stop();
            entry.end = vm.outcome().cloned();
            entry.last_figures = figures
                .as_ref()
                .and_then(|f| f.vms.iter().find(|v| v.name == *name).cloned());
            if let Some(merge) = &self.merge {
                merge.remove(vm.control());
            }
            if let Some(guard) = &self.pressure {
                guard.remove(vm.control());
            }
            if let Some((end, _)) = &entry.end {
                log::info!("{name}: {end}");
            }
            gone.push(vm);
        }
        // Collected and destroyed many at a time, as a run's fleet is (a shutdown of a thousand
        // VMs one by one took 20 s); their consoles are flushed before any waiter is answered.
        if !gone.is_empty() {
            runner::teardown(gone);
        }
        // Answer whoever waits on an ended VM.
        let done: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.end.is_some()
                    && (!e.wait_end.is_empty() || !e.deletes.is_empty() || !e.wait_ready.is_empty())
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let info = self.info(&name, &self.entries[&name]);
            let entry = self.entries.get_mut(&name).expect("listed above");
            for w in entry.wait_end.drain(..).chain(entry.wait_ready.drain(..)) {
                w.answer(Reply::json(200, info.clone()));
            }
            let deletes = std::mem::take(&mut entry.deletes);
            if !deletes.is_empty() {
                self.entries.remove(&name);
                for d in deletes {
                    let _ = d.send(Reply::json(200, info.clone()));
                }
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for entry in self.entries.values_mut() {
            if entry.boost_until.is_some_and(|b| b <= now) {
                end_boost(entry);
            }
            if entry.deadline.is_some_and(|d| d <= now) {
                entry.deadline = None;
                if let Some(vm) = &entry.vm {
                    vm.shared().end(VmEnd::Timeout);
                    vm.request_stop();
                }
            }
        }
        self.rearm_timer();
        self.reap();
    }

    /// Arms the timer for the earliest VM timeout (disarms it when there is none).
    fn rearm_timer(&mut self) {
        let next = self
            .entries
            .values()
            .filter(|e| e.vm.is_some())
            .flat_map(|e| [e.deadline, e.boost_until])
            .flatten()
            .min();
        let result = match next {
            Some(at) => {
                let left = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(left, None)
            }
            None => self.timer.reset(Duration::ZERO, None),
        };
        if let Err(e) = result {
            log::error!("cannot arm the VM timeout timer: {e}");
        }
    }

    /// The merge thread's latest figures.
    fn figures(&self) -> Option<merge::Status> {
        self.merge.as_ref().map(MergeThread::status)
    }

    fn info(&self, name: &str, e: &Entry) -> Value {
        self.info_with(name, e, self.figures().as_ref())
    }

    fn info_with(&self, name: &str, e: &Entry, status: Option<&merge::Status>) -> Value {
        let figures = match (&e.vm, status) {
            (Some(_), Some(status)) => status.vms.iter().find(|v| v.name == name).cloned(),
            _ => e.last_figures.clone(),
        };
        let since = |at: Option<Instant>| {
            at.map(|t| {
                (t.saturating_duration_since(e.requested).as_secs_f64() * 1e3 * 10.0).round() / 10.0
            })
        };
        json!({
            "id": name,
            "state": e.state(),
            "config": {
                "kernel": e.cfg.kernel,
                "initrd": e.cfg.initrd,
                "cmdline": e.cfg.cmdline_for(e.index),
                "memory_mib": e.cfg.memory as f64 / f64::from(1u32 << 20),
                "vcpus": e.cfg.vcpus,
                "dedup": merge::dedup_name(e.cfg.dedup),
                "group": e.cfg.group,
                "console": e.console,
                "ready": e.ready.as_ref().map(|r| r.pattern().to_string()),
                "timeout_s": e.timeout.map(|t| t.as_secs_f64()),
            },
            "started_ms": since(e.started),
            "ready_ms": since(e.ready_at),
            "exit": e.end.as_ref().map(|(end, at)| json!({
                "success": end.is_clean(),
                "code": match end { VmEnd::Exit(c) => Some(*c), _ => None },
                "reason": end.to_string(),
                "after_ms": (at.saturating_duration_since(e.requested).as_secs_f64() * 1e3).round(),
            })),
            "dedup": figures,
        })
    }

    fn stats_json(&self) -> Value {
        let status = self
            .merge
            .as_ref()
            .map(MergeThread::status)
            .unwrap_or_default();
        serde_json::to_value(status).unwrap_or(Value::Null)
    }

    fn metrics(&self) -> String {
        let status = self
            .merge
            .as_ref()
            .map(MergeThread::status)
            .unwrap_or_default();
        let mut states: BTreeMap<&'static str, u64> =
            ["booting", "running", "paused", "stopping", "exited"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for e in self.entries.values() {
            *states.entry(e.state()).or_default() += 1;
        }
        metrics::render(&metrics::Input {
            status: &status,
            states: &states,
            created_total: self.created_total,
            uptime: self.started.elapsed(),
            connections: self.api.active.load(Ordering::Relaxed),
            waits: self.api.waits.load(Ordering::Relaxed),
        })
    }
}

/// Puts a VM's vCPU threads back to the process's base priority after their start.
fn end_boost(e: &mut Entry) {
    if e.boost_until.take().is_none() {
        return;
    }
    if let Some(vm) = &e.vm {
        for tid in vm.vcpu_tids() {
            sched::lower_to_base(tid);
        }
    }
}

fn unknown(id: &str) -> Reply {
    Reply::error(
        404,
        format!(
            "no VM '{}' on this server (GET /v1/vms lists them)",
            id.escape_debug()
        ),
    )
}

impl MutEventSubscriber for Server {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, data: u32| runner::watch(ops, fd, data);
        add(self.signals.fd.as_raw_fd(), EV_SIGNAL);
        add(self.notify.as_raw_fd(), EV_NOTIFY);
        add(self.wake.as_raw_fd(), EV_WAKE);
        add(self.timer.as_raw_fd(), EV_TIMER);
        if let Some(fd) = self.seccomp_events {
            add(fd, EV_SECCOMP);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_SIGNAL => {
                if let Some(sig) = self.signals.read() {
                    log::info!("received signal {sig}; stopping every VM");
                    self.begin_shutdown(VmEnd::Signal(sig), Some(128 + sig));
                }
            }
            EV_NOTIFY => {
                let _ = self.notify.read();
                self.check_ready();
                self.reap();
            }
            EV_WAKE => {
                let _ = self.wake.read();
                while let Ok(done) = self.done.try_recv() {
                    self.on_built(done);
                }
                while let Ok(call) = self.calls.try_recv() {
                    self.on_call(call);
                }
            }
            EV_TIMER => {
                let _ = self.timer.wait();
                self.on_timer();
            }
            EV_SECCOMP => {
                let _ = ops.remove(events);
                let why = "a kvmerge thread was stopped by its seccomp filter";
                self.begin_shutdown(
                    VmEnd::Vmm(why.into()),
                    Some(i32::from(seccomp::EXIT_STATUS)),
                );
                // Whatever else was set, a seccomp stop decides the status.
                self.exit_code = Some(i32::from(seccomp::EXIT_STATUS));
            }
            _ => {}
        }
    }
}
