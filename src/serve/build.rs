//! The builder thread of `kvmerge serve`: builds and starts the VMs the API asks for, one job
//! (one create call) at a time, so that the control loop keeps answering meanwhile. A job is
//! all or nothing: if one of its VMs cannot be built or started, the ones already built are torn
//! down and the job fails with the reason.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::Regex;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::EntryMode;
use crate::config::{DedupMode, VmConfig};
use crate::console::{ConsoleSink, Expect, Output};
use crate::kvm::{Flavor, Host};
use crate::loader::{InitrdImage, KernelImage};
use crate::sync::lock;
use crate::vm::{BootSources, Vm, VmIo};

/// How long the vCPU threads of a new VM may take to acknowledge Start (as for a fleet).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One VM to build.
pub(super) struct Spec {
    pub index: usize,
    pub name: String,
    pub cfg: VmConfig,
    pub console: Option<PathBuf>,
    pub ready: Option<Arc<Regex>>,
}

pub(super) struct Job {
    pub id: u64,
    pub specs: Vec<Spec>,
    /// `--overcommit`, for the admission check.
    pub overcommit: f64,
}

/// A built and started VM with its ready matcher.
pub(super) struct BuiltVm {
    pub vm: Vm,
    pub ready: Option<Expect>,
}

/// One VM's build: the VM, or an HTTP status and why not.
type Built = Result<BuiltVm, (u16, String)>;

/// What a job ended with: every VM started, or why none is left.
pub(super) struct Done {
    pub id: u64,
    pub result: Result<Vec<BuiltVm>, Failure>,
}

pub(super) struct Failure {
    /// 400 for what the caller gave (a kernel that cannot be read), 500 otherwise.
    pub status: u16,
    pub message: String,
}

/// Kernel and initrd images, read once per file version: a file replaced or changed on disk is
/// read again.
#[derive(Default)]
struct Images {
    kernels: HashMap<PathBuf, (FileId, Arc<KernelImage>)>,
    initrds: HashMap<PathBuf, (FileId, Arc<InitrdImage>)>,
    /// Guest RAM of a `full` VM was seen MERGEABLE in /proc/self/smaps. Every VM's RAM is made
    /// the same way, so once is enough: reading smaps walks the page tables of every guest
    /// (with a few hundred VMs, longer than the build).
    mergeable_checked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

impl Images {
    fn kernel(&mut self, path: &Path) -> crate::loader::Result<Arc<KernelImage>> {
        cached(&mut self.kernels, path, KernelImage::open)
    }

    fn initrd(&mut self, path: &Path) -> crate::loader::Result<Arc<InitrdImage>> {
        cached(&mut self.initrds, path, InitrdImage::open)
    }
}

/// The image at `path` from `cache` while the file is unchanged, else read with `open`.
fn cached<T>(
    cache: &mut HashMap<PathBuf, (FileId, Arc<T>)>,
    path: &Path,
    open: impl FnOnce(&Path) -> crate::loader::Result<T>,
) -> crate::loader::Result<Arc<T>> {
    let id = file_id(path);
    if let (Some(id), Some((seen, image))) = (id, cache.get(path)) {
        if id == *seen {
            return Ok(image.clone());
        }
    }
    let image = Arc::new(open(path)?);
    if let Some(id) = id {
        cache.insert(path.to_path_buf(), (id, image.clone()));
    }
    Ok(image)
}

/// What the builder shares with the control loop.
pub(super) struct Wiring {
    pub host: Host,
    pub jobs: Receiver<Job>,
    pub done: Sender<Done>,
    /// Signalled with every `Done`.
    pub wake: Arc<EventFd>,
    /// VM ends and ready markers.
    pub notify: Arc<EventFd>,
    /// The server is stopping: a job under way stops between VMs.
    pub stopping: Arc<AtomicBool>,
}

/// The builder thread's body: installs its seccomp filter, then builds jobs until the control
/// loop drops its end of the channel.
pub(super) fn run(w: Wiring) {
    // A build must not wait for a round of every busy vCPU thread on the host (with a thousand
    // idle guests, each create took a second at nice 0): raised as the control thread is, for
    // good (the vCPU threads it starts go back to the base priority themselves).
    std::mem::forget(crate::sched::Raised::this_thread(
        crate::sched::RESPONSIVE,
        "the builder",
    ));
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Builder) {
        log::error!("{e}; the server cannot build VMs");
        return;
    }
    let input_drained = match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            log::error!("builder: cannot create an eventfd: {e}");
            return;
        }
    };
    let mut images = Images::default();
    while let Ok(job) = w.jobs.recv() {
        let result =
            admit(&job).and_then(|()| build_job(&w, &mut images, &input_drained, job.specs));
        if w.done.send(Done { id: job.id, result }).is_err() {
            break;
        }
        let _ = w.wake.write(1);
    }
}

/// What the host can hold now (memory, cgroup, files, threads), as for `kvmerge run`.
fn admit(job: &Job) -> Result<(), Failure> {
    let check = crate::config::Config {
        vms: job.specs.iter().map(|s| s.cfg.clone()).collect(),
        overcommit: job.overcommit,
        console: crate::config::ConsoleMode::None,
        ..crate::config::Config::new(Vec::new())
    };
    crate::host::admit(&check).map_err(|e| Failure {
        status: 409,
        message: e.to_string(),
    })
}

fn build_job(
    w: &Wiring,
    images: &mut Images,
    input_drained: &Arc<EventFd>,
    specs: Vec<Spec>,
) -> Result<Vec<BuiltVm>, Failure> {
    let Some(first) = specs.first() else {
        return Ok(Vec::new());
    };
    // One create call: every VM has the same kernel and initrd, read once.
    let bad = |e: &dyn std::fmt::Display| Failure {
        status: 400,
        message: format!("{}: {e}", first.name),
    };
    let kernel = images.kernel(&first.cfg.kernel).map_err(|e| bad(&e))?;
    if w.host.flavor() == Flavor::Pvm && kernel.mode() == EntryMode::Linux {
        return Err(bad(&crate::runner::Error::PvmLinux(
            first.cfg.kernel.display().to_string(),
        )));
    }
    let initrd = match &first.cfg.initrd {
        Some(path) => Some(images.initrd(path).map_err(|e| bad(&e))?),
        None => None,
    };
    // Many at a time, as a fleet of `kvmerge run` is built: most of a build waits in KVM.
    let results: Vec<Mutex<Option<Built>>> = specs.iter().map(|_| Mutex::new(None)).collect();
    let failed = AtomicBool::new(false);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (host, notify, stopping) = (&w.host, &w.notify, &w.stopping);
    crate::runner::spread(specs.len(), workers, |i| {
        if failed.load(Ordering::Relaxed) || stopping.load(Ordering::Relaxed) {
            return;
        }
        let io = (notify, input_drained);
        let result = build_one(host, &kernel, initrd.as_deref(), io, &specs[i]);
        failed.fetch_or(result.is_err(), Ordering::Relaxed);
        *lock(&results[i]) = Some(result);
    });
    let mut built = Vec::with_capacity(specs.len());
    let mut first_error = None;
    for (spec, slot) in specs.iter().zip(results) {
        match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(vm)) => built.push(vm),
            Some(Err((status, message))) => {
                first_error.get_or_insert(Failure {
                    status,
                    message: format!("{}: {message}", spec.name),
                });
            }
            None => {
                first_error.get_or_insert(Failure {
                    status: 503,
                    message: "the server is shutting down".into(),
                });
            }
        }
    }
    if first_error.is_none() && !images.mergeable_checked {
        // Every VM's RAM is made the same way: one look at smaps is enough (reading it walks
        // the page tables of every guest, longer than a build with a few hundred of them).
        if let Some(b) = built.first().filter(|_| first.cfg.dedup != DedupMode::Off) {
            match crate::memory::verify_mergeable(std::iter::once(b.vm.ram().as_ref())) {
                Ok(()) => images.mergeable_checked = true,
                Err(e) => {
                    first_error = Some(Failure {
                        status: 500,
                        message: e.to_string(),
                    })
                }
            }
        }
    }
    if first_error.is_none() {
        first_error = start_all(&built).err();
    }
    if let Some(e) = first_error {
        crate::runner::teardown(built.into_iter().map(|b| b.vm).collect());
        return Err(e);
    }
    Ok(built)
}

/// Starts every VM of a job once all are built, as `kvmerge run` starts a fleet: a guest that runs
/// while the rest are built takes CPU and mmap_lock turns from every later build.
fn start_all(built: &[BuiltVm]) -> Result<(), Failure> {
    let fail = |b: &BuiltVm, e: crate::vm::Error| Failure {
        status: 500,
        message: format!("{}: cannot start: {e}", b.vm.name()),
    };
    let mut tickets = Vec::with_capacity(built.len());
    for b in built {
        tickets.push(b.vm.start().map_err(|e| fail(b, e))?);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for (b, ticket) in built.iter().zip(&tickets) {
        b.vm.confirm_start(ticket, deadline)
            .map_err(|e| fail(b, e))?;
        if built.len() > 1 {
            // The vCPU threads inherited the builder's raised priority. A VM created alone keeps
            // it for its start (the control loop ends it); a batch's go back at once.
            for tid in b.vm.vcpu_tids() {
                crate::sched::lower_to_base(tid);
            }
        }
    }
    Ok(())
}

/// Builds one VM (started later, with the rest of its job); `events` are the VM-end notifier and the console-input eventfd.
fn build_one(
    host: &Host,
    kernel: &KernelImage,
    initrd: Option<&InitrdImage>,
    events: (&Arc<EventFd>, &Arc<EventFd>),
    spec: &Spec,
) -> Result<BuiltVm, (u16, String)> {
    let (notify, input_drained) = events;
    let bad = |e: &dyn std::fmt::Display| (400, e.to_string());
    kernel
        .check_cmdline(&spec.cfg.cmdline_for(spec.index))
        .map_err(|e| bad(&e))?;
    kernel.check_fits(spec.cfg.memory).map_err(|e| bad(&e))?;
    if usize::from(spec.cfg.vcpus) > host.max_vcpus() {
        return Err(bad(&format!(
            "vcpus {} is more than this host's KVM allows ({})",
            spec.cfg.vcpus,
            host.max_vcpus()
        )));
    }
    let ready = spec
        .ready
        .clone()
        .map(|re| Expect::notifying(re, notify.clone()));
    let console = match &spec.console {
        Some(path) => {
            let file = crate::runner::create_sink_file(path).map_err(|e| {
                (
                    400,
                    format!("cannot create console log {}: {e}", path.display()),
                )
            })?;
            ConsoleSink::new(Output::File(file), ready.clone())
        }
        None => ConsoleSink::discard(ready.clone()),
    };
    let io = VmIo {
        console,
        notify: notify.clone(),
        input_drained: input_drained.clone(),
    };
    let sources = BootSources { kernel, initrd };
    let status = |e: &crate::vm::Error| {
        if matches!(e, crate::vm::Error::Loader(_)) {
            400
        } else {
            500
        }
    };
    let vm = Vm::build_named(host, spec.index, spec.name.clone(), &spec.cfg, &sources, io)
        .map_err(|e| (status(&e), e.to_string()))?;
    Ok(BuiltVm { vm, ready })
}
