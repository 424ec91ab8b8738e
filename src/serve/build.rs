//! The builder thread of `kvmerge serve`: builds and starts the VMs the API asks for, one job
//! (one create call) at a time, so that the control loop keeps answering meanwhile. A job is
//! all or nothing: if one of its VMs cannot be built or started, the ones already built are torn
//! down and the job fails with the reason.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use regex::Regex;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::EntryMode;
use crate::config::VmConfig;
use crate::console::{ConsoleSink, Expect, Output};
use crate::kvm::{Flavor, Host};
use crate::loader::{InitrdImage, KernelImage};
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
        let id = file_id(path);
        if let (Some(id), Some((seen, image))) = (id, self.kernels.get(path)) {
            if id == *seen {
                return Ok(image.clone());
            }
        }
        let image = Arc::new(KernelImage::open(path)?);
        if let Some(id) = id {
            self.kernels.insert(path.to_path_buf(), (id, image.clone()));
        }
        Ok(image)
    }

    fn initrd(&mut self, path: &Path) -> crate::loader::Result<Arc<InitrdImage>> {
        let id = file_id(path);
        if let (Some(id), Some((seen, image))) = (id, self.initrds.get(path)) {
            if id == *seen {
                return Ok(image.clone());
            }
        }
        let image = Arc::new(InitrdImage::open(path)?);
        if let Some(id) = id {
            self.initrds.insert(path.to_path_buf(), (id, image.clone()));
        }
        Ok(image)
    }
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
    let mut built: Vec<BuiltVm> = Vec::with_capacity(specs.len());
    let fail = |built: Vec<BuiltVm>, status: u16, message: String| {
        crate::runner::teardown(built.into_iter().map(|b| b.vm).collect());
        Err(Failure { status, message })
    };
    for spec in specs {
        if w.stopping.load(Ordering::Relaxed) {
            return fail(built, 503, "the server is shutting down".into());
        }
        match build_one(w, images, input_drained, &spec) {
            Ok(vm) => built.push(vm),
            Err((status, message)) => {
                return fail(built, status, format!("{}: {message}", spec.name));
            }
        }
    }
    Ok(built)
}

fn build_one(
    w: &Wiring,
    images: &mut Images,
    input_drained: &Arc<EventFd>,
    spec: &Spec,
) -> Result<BuiltVm, (u16, String)> {
    let bad = |e: &dyn std::fmt::Display| (400, e.to_string());
    let kernel = images.kernel(&spec.cfg.kernel).map_err(|e| bad(&e))?;
    kernel
        .check_cmdline(&spec.cfg.cmdline_for(spec.index))
        .map_err(|e| bad(&e))?;
    kernel.check_fits(spec.cfg.memory).map_err(|e| bad(&e))?;
    if w.host.flavor() == Flavor::Pvm && kernel.mode() == EntryMode::Linux {
        return Err(bad(&crate::runner::Error::PvmLinux(
            spec.cfg.kernel.display().to_string(),
        )));
    }
    let initrd = match &spec.cfg.initrd {
        Some(path) => Some(images.initrd(path).map_err(|e| bad(&e))?),
        None => None,
    };
    if u32::from(spec.cfg.vcpus) as usize > w.host.max_vcpus() {
        return Err(bad(&format!(
            "vcpus {} is more than this host's KVM allows ({})",
            spec.cfg.vcpus,
            w.host.max_vcpus()
        )));
    }
    let ready = spec
        .ready
        .clone()
        .map(|re| Expect::notifying(re, w.notify.clone()));
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
        notify: w.notify.clone(),
        input_drained: input_drained.clone(),
    };
    let sources = BootSources {
        kernel: &kernel,
        initrd: initrd.as_deref(),
    };
    let status = |e: &crate::vm::Error| {
        if matches!(e, crate::vm::Error::Loader(_)) {
            400
        } else {
            500
        }
    };
    let vm = Vm::build_named(
        &w.host,
        spec.index,
        spec.name.clone(),
        &spec.cfg,
        &sources,
        io,
    )
    .map_err(|e| (status(&e), e.to_string()))?;
    if let Err(e) = crate::memory::verify_mergeable(std::iter::once(vm.ram().as_ref())) {
        crate::runner::teardown(vec![vm]);
        return Err((500, e.to_string()));
    }
    let started = vm
        .start()
        .and_then(|ticket| vm.confirm_start(&ticket, Instant::now() + START_TIMEOUT));
    if let Err(e) = started {
        crate::runner::teardown(vec![vm]);
        return Err((500, format!("cannot start: {e}")));
    }
    Ok(BuiltVm { vm, ready })
}
