//! Building, starting and tearing down a fleet of VMs, many at a time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::config::Config;
use crate::console::{ConsoleSink, Expect};
use crate::seccomp;
use crate::vcpu::{RtBoost, VmEnd};
use crate::vm::{self, BootSources, Vm, VmIo};

use super::signals::SignalFd;
use super::{Error, Preflight, Result, VmReport};
use crate::sync::lock;

/// Builds every VM of the fleet, spread over the host's CPUs: most of a VM's build time is spent
/// in KVM ioctls, which run in parallel. Each worker looks at the stop signals before each VM, so
/// a signal stops the build within one VM's build time. On failure or a signal, the VMs already
/// built are torn down; a failure returns the error of the lowest-numbered VM.
pub(super) fn build_fleet(
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
pub(super) enum Built {
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
pub(crate) fn spread(n: usize, workers: usize, f: impl Fn(usize) + Sync) {
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
pub(super) fn retire(vms: Vec<Vm>, expects: &[Option<Expect>]) -> Vec<VmReport> {
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
pub(crate) fn teardown(vms: Vec<Vm>) {
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
pub(crate) fn stop_all(vms: &[Vm], why: VmEnd) -> Option<RtBoost> {
    let boost = RtBoost::this_thread();
    for vm in vms {
        vm.shared().end(why.clone());
        vm.request_stop();
    }
    boost
}

/// Waits (bounded) for the vCPU threads of `vms[which]`, after `request_stop`, many at a time.
pub(super) fn collect(vms: &[Vm], which: &[usize]) {
    spread(which.len(), STOP_WORKERS, |k| vms[which[k]].finish_stop());
}

/// Starts every VM: posts Start to every vCPU of every VM, then waits for them to acknowledge.
/// Stops as soon as a stop signal arrives (the caller looks at `signals.caught()`) or a thread
/// has been stopped by its seccomp filter.
///
/// A vCPU thread acknowledges when it first gets a time slice. On a host whose cores are busy
/// with the guests started first that can take long (512 churning guests on 2 cores: over a
/// second), so the wait is bounded by [`START_TIMEOUT`], which only a thread that cannot run at
/// all reaches, and is checked for signals every [`START_POLL`].
pub(super) fn resume_all(
    vms: &[Vm],
    signals: &SignalFd,
) -> std::result::Result<(), (usize, vm::Error)> {
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
