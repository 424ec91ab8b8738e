//! The merge thread: the one deduplication coordinator of the process.
//!
//! Once per tick it samples the guests (vCPU CPU time), the host's KSM (counters, ksmd's CPU
//! time), lets the policy decide KSM's scan rate and applies it when kvmerge owns the knobs,
//! reclaims zero pages of `full` and `zero` guests (pausing their vCPUs around each drop), and
//! every few ticks accounts what each VM holds. The latest figures are published as a [`Status`]
//! for the status line, `--stats` and the end-of-run summary.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{DedupMode, PAGE_SIZE};
use crate::dedup::accounting::{self, Accountant, Snapshot, VmRange};
use crate::dedup::cpu::HostCpu;
use crate::dedup::ksm::{self, Counters, Knob, KsmHold, KsmOwner, KsmSysfs};
use crate::dedup::policy::{CpuBudget, Knobs, Policy, PolicyKind, Sample};
use crate::dedup::procfs;
use crate::dedup::touched::Touched;
use crate::dedup::zero::{self, PassReport, ZeroScanner};
use crate::memory::GuestRam;
use crate::sync::lock;
use crate::vm::{Lifecycle, VmControl};

/// Pages of zero-reclaim scanning per VM per tick while a VM's scans still find zero pages.
const ZERO_PAGES_PER_TICK: usize = 64 * 1024;
/// Longest wait between zero-reclaim passes over a VM whose passes find nothing.
const ZERO_MAX_BACKOFF_TICKS: u32 = 30;
/// Zero pages are reclaimed only from guests whose vCPUs were busy less than this share of the last
/// tick: pausing a busy guest costs it most, and a guest that is booting or working reuses the
/// zero pages it has (a booting kernel zeroes much of its memory) before long.
const ZERO_IDLE_BELOW: f64 = 0.5;
/// Zero pages are reclaimed only while the host had at least this many CPUs idle over the last tick
/// (not counting the merge thread's own work): with none to spare, the scheduler stretches a hold
/// of a fraction of a millisecond to several of its ticks (see [`crate::dedup::cpu`]).
const ZERO_HEADROOM_CPUS: f64 = 0.5;
/// Longest run of ticks reclaim waits for such a host before it goes ahead anyway.
const ZERO_MAX_DEFER_TICKS: u32 = 5;
/// Pause durations kept for the p99 figure.
const PAUSE_WINDOW: usize = 4096;

/// One guest as the merge thread sees it.
pub struct MergeVm {
    pub name: String,
    pub dedup: DedupMode,
    pub control: Arc<VmControl>,
    pub ram: Arc<GuestRam>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub policy: PolicyKind,
    pub tick: Duration,
    /// Account every this many ticks: accounting reads page tables, and once guests have merged it
    /// is most of the merge thread's own CPU time.
    pub account_every: u32,
    /// Nice value for the thread (None: the creating thread's). The control thread runs raised
    /// ([`crate::sched`]); the merge thread's work is paced by its policy and runs at the
    /// process's own priority.
    pub nice: Option<libc::c_int>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            policy: PolicyKind::Adaptive,
            tick: Duration::from_secs(1),
            account_every: 4,
            nice: None,
        }
    }
}

/// One VM's figures, in MiB.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub dedup: &'static str,
    pub running: bool,
    pub resident_mib: f64,
    pub ksm_mib: f64,
    pub zero_mib: f64,
    pub unique_mib: f64,
    pub shared_with_other_vms_mib: f64,
    /// What dedup saves this VM now (see [`Status::saved_mib`]).
    pub saved_mib: f64,
    /// Reclaimed zero pages the guest has not touched again: still given back now.
    pub zero_unbacked_mib: f64,
    /// Zero pages reclaimed over the whole run (cumulative: a page reclaimed, re-touched and
    /// reclaimed again counts twice).
    pub zero_reclaimed_mib: f64,
}

/// The merge thread's latest view of the fleet.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// Seconds since the merge thread started.
    pub t: f64,
    pub vms_running: usize,
    pub guest_ram_mib: f64,
    pub resident_mib: f64,
    /// Host memory dedup saves now (docs/stats.md): guest pages mapped to KSM pages or the zero
    /// page beyond the frames backing them, plus reclaimed zero pages still given back. Never more
    /// than `guest_ram_mib`.
    pub saved_mib: f64,
    pub ksm_mib: f64,
    pub zero_mib: f64,
    pub unique_mib: f64,
    pub shared_with_other_vms_mib: f64,
    /// Reclaimed zero pages still given back now (part of `saved_mib`).
    pub zero_unbacked_mib: f64,
    /// Zero pages reclaimed over the whole run (cumulative, not a saving now).
    pub zero_reclaimed_mib: f64,
    pub zero_pause_p99_us: f64,
    pub zero_pauses: u64,
    /// Guest RAM the zero-page scanner has read, and the time it spent (pauses included).
    pub zero_scanned_mib: f64,
    pub zero_scan_s: f64,
    /// Ticks on which zero-page reclaim waited because the host had no CPU to spare.
    pub zero_deferred_ticks: u64,
    /// Idle CPUs of the host over the last tick, the merge thread's own share counted as idle.
    pub host_headroom_cpus: Option<f64>,
    /// ksmd's CPU use over the last tick, in % of one core.
    pub ksmd_cpu_pct: f64,
    pub ksmd_cpu_s: f64,
    pub merge_thread_cpu_pct: f64,
    /// The merge thread's CPU time since it started.
    pub merge_thread_cpu_s: f64,
    pub ksm_owned: bool,
    pub policy_phase: String,
    pub pages_to_scan: Option<u32>,
    pub sleep_millisecs: Option<u32>,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub accounting: &'static str,
    pub vms: Vec<VmStatus>,
}

/// What the merge thread is told between ticks.
enum Msg {
    /// A VM that started after the merge thread (`kvmerge serve`).
    Add(MergeVm),
    /// A VM that has ended and is being destroyed: the thread lets go of its RAM.
    Remove(Arc<VmControl>),
    /// This process's part in steering the host's KSM, taken after the thread started.
    Ksm(Arc<KsmHold>),
    Stop,
}

pub struct MergeThread {
    thread: Option<JoinHandle<()>>,
    stop: Sender<Msg>,
    /// Set with the stop request: a tick under way skips the rest of its per-guest work.
    stopping: Arc<AtomicBool>,
    /// The thread's Linux id (0 until it has started), to raise its priority for the stop.
    tid: Arc<AtomicI32>,
    status: Arc<Mutex<Status>>,
}

impl MergeThread {
    /// Starts the merge thread for `vms`. `ksm` is this process's part in steering the host's
    /// KSM, when it has one: as owner it steers; waiting, it takes over when the owner leaves.
    pub fn start(
        vms: Vec<MergeVm>,
        ksm: Option<Arc<KsmHold>>,
        opts: Options,
    ) -> std::io::Result<MergeThread> {
        let status = Arc::new(Mutex::new(Status::default()));
        let (stop, stop_rx) = mpsc::channel();
        let published = status.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_seen = stopping.clone();
        let tid = Arc::new(AtomicI32::new(0));
        let tid_out = tid.clone();
        let thread = std::thread::Builder::new()
            .name("kvmerge-merge".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_out.store(unsafe { libc::gettid() }, Ordering::Release);
                if let Some(nice) = opts.nice {
                    if let Err(e) = crate::sched::set_this_thread_nice(nice) {
                        log::debug!("merge thread: cannot set nice {nice}: {e}");
                    }
                }
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Merge) {
                    log::error!("{e}; no zero-page reclaim, KSM steering or accounting");
                    return;
                }
                let mut worker = Worker::new(vms, ksm, opts, stop_seen);
                'ticks: loop {
                    worker.tick();
                    crate::seccomp::injection_point();
                    *lock(&published) = worker.status.clone();
                    let next = Instant::now() + worker.opts.tick;
                    loop {
                        let left = next.saturating_duration_since(Instant::now());
                        match stop_rx.recv_timeout(left) {
                            Ok(Msg::Add(vm)) => worker.add(vm),
                            Ok(Msg::Ksm(hold)) => worker.ksm = Some(hold),
                            Ok(Msg::Remove(control)) => {
                                worker.remove(&control);
                                *lock(&published) = worker.status.clone();
                            }
                            Err(RecvTimeoutError::Timeout) => break,
                            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break 'ticks,
                        }
                    }
                }
                // A last look for the summary.
                worker.last_look = true;
                worker.sample_vcpus();
                worker.account();
                *lock(&published) = worker.status.clone();
            })?;
        Ok(MergeThread {
            thread: Some(thread),
            stop,
            stopping,
            tid,
            status,
        })
    }

    /// The latest published figures.
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// Adds a VM that started after the thread: it joins accounting, KSM steering and zero-page
    /// reclaim from the next tick on.
    pub fn add(&self, vm: MergeVm) {
        let _ = self.stop.send(Msg::Add(vm));
    }

    /// Lets go of a VM that has ended: its RAM is released by the merge thread's reference as
    /// soon as the thread is between ticks, and it leaves the published figures.
    pub fn remove(&self, control: &Arc<VmControl>) {
        let _ = self.stop.send(Msg::Remove(control.clone()));
    }

    /// Gives the thread this process's part in steering the host's KSM (`kvmerge serve` takes it
    /// when its first VM with dedup `full` starts, not before).
    pub fn steer_ksm(&self, hold: Arc<KsmHold>) {
        let _ = self.stop.send(Msg::Ksm(hold));
    }

    /// Stops the thread and returns its final figures.
    pub fn stop(mut self) -> Status {
        self.shutdown();
        self.status()
    }

    fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Its last look and exit run at real-time priority where permitted: on a host whose
        // cores are taken by busy vCPU threads, a tick at normal priority lasts seconds.
        let finished = self.thread.as_ref().is_none_or(JoinHandle::is_finished);
        let boost = if finished {
            None
        } else {
            crate::vcpu::RtBoost::thread(self.tid.load(Ordering::Acquire))
        };
        let _ = self.stop.send(Msg::Stop);
        if crate::seccomp::parked(crate::seccomp::ThreadKind::Merge) {
            // Stopped by its seccomp filter for good: joining would wait forever.
            self.thread = None;
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the merge thread panicked");
            }
            // The thread is gone and its id may be another's by now: nothing to put back.
            std::mem::forget(boost);
        }
    }
}

impl Drop for MergeThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct VmState {
    vm: MergeVm,
    scanner: ZeroScanner,
    reclaimed: u64,
    /// Ticks to wait before the next zero scan, and the current back-off.
    wait: u32,
    backoff: u32,
    found_this_pass: u64,
    /// vCPU CPU time at the previous tick, to tell an idle guest from a busy one.
    vcpu_cpu: Option<Duration>,
    /// This tick's view of the guest, sampled once and shared by reclaim and the KSM policy.
    running: bool,
    vcpus: u32,
    /// Share of its vCPUs' time the guest ran during the last tick (None on its first tick).
    busy: Option<f64>,
    /// Pages the guest has used, to tell which reclaimed pages are still given back.
    touched: Touched,
    /// Of those, not resident at the last accounting.
    unbacked: u64,
}

struct Worker {
    vms: Vec<VmState>,
    ksm: Option<Arc<KsmHold>>,
    sysfs: KsmSysfs,
    policy: Policy,
    opts: Options,
    accountant: Accountant,
    started: Instant,
    ticks: u64,
    prev: Option<Sample>,
    pauses: Vec<Duration>,
    total_pauses: u64,
    scanned_pages: u64,
    scan_time: Duration,
    vcpu_cpu_total: Duration,
    cpu_at_last_tick: Duration,
    host_cpu: HostCpu,
    /// Idle CPUs over the last tick plus the merge thread's own share (None until known).
    headroom: Option<f64>,
    deferred_in_a_row: u32,
    last_snapshot: Option<Snapshot>,
    last_counters: Counters,
    status: Status,
    /// Fault injection for the tests of the panic path (`KVMERGE_INJECT_PANIC=merge-thread`).
    inject_panic: bool,
    /// The run is ending: the tick under way stops scanning guests (a pass over a big fleet
    /// takes long enough to delay the stop otherwise).
    stopping: Arc<AtomicBool>,
    /// The tick after the stop, for the summary: done whole.
    last_look: bool,
    /// The fleet changed since the last accounting: account at the next tick.
    account_next_tick: bool,
    /// Zero pages reclaimed from VMs no longer in the fleet.
    reclaimed_by_removed: u64,
}

impl VmState {
    fn new(vm: MergeVm) -> VmState {
        VmState {
            vm,
            scanner: ZeroScanner::new(zero::DEFAULT_BATCH_PAGES),
            reclaimed: 0,
            wait: 0,
            backoff: 1,
            found_this_pass: 0,
            vcpu_cpu: None,
            running: false,
            vcpus: 0,
            busy: None,
            touched: Touched::new(),
            unbacked: 0,
        }
    }
}

impl Worker {
    fn add(&mut self, vm: MergeVm) {
        self.vms.push(VmState::new(vm));
        self.account_next_tick = true;
    }

    /// Forgets a VM, keeping the last snapshot's per-VM figures in step with the list.
    fn remove(&mut self, control: &Arc<VmControl>) {
        let Some(i) = self
            .vms
            .iter()
            .position(|s| Arc::ptr_eq(&s.vm.control, control))
        else {
            return;
        };
        let gone = self.vms.remove(i);
        // Its CPU time stays in the total the policy sees, and its reclaimed pages in the
        // cumulative count: neither goes backwards.
        self.reclaimed_by_removed += gone.reclaimed;
        drop(gone);
        self.account_next_tick = true;
        if let Some(snap) = &mut self.last_snapshot {
            if i < snap.per_vm.len() {
                let usage = snap.per_vm.remove(i);
                snap.total = snap.total.minus(&usage);
                // Its unique pages had frames of their own; what it shared stays with the
                // others. Exact again at the next accounting, which comes at the next tick.
                snap.distinct_frames = snap.distinct_frames.map(|f| f.saturating_sub(usage.unique));
            }
            if i < snap.estimated.len() {
                snap.estimated.remove(i);
            }
        }
        self.publish_usage();
    }

    fn new(
        vms: Vec<MergeVm>,
        ksm: Option<Arc<KsmHold>>,
        opts: Options,
        stopping: Arc<AtomicBool>,
    ) -> Worker {
        let status = Status {
            ksm_owned: ksm.as_ref().is_some_and(|k| k.owner().is_some()),
            ..Status::default()
        };
        Worker {
            vms: vms.into_iter().map(VmState::new).collect(),
            ksm,
            sysfs: KsmSysfs::host(),
            policy: Policy::new(
                opts.policy,
                CpuBudget {
                    host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
                    ..CpuBudget::default()
                },
            ),
            opts,
            accountant: Accountant::new(),
            started: Instant::now(),
            ticks: 0,
            prev: None,
            pauses: Vec::new(),
            total_pauses: 0,
            scanned_pages: 0,
            scan_time: Duration::ZERO,
            vcpu_cpu_total: Duration::ZERO,
            cpu_at_last_tick: Duration::ZERO,
            host_cpu: HostCpu::new(),
            headroom: None,
            deferred_in_a_row: 0,
            last_snapshot: None,
            last_counters: Counters::default(),
            status,
            inject_panic: std::env::var("KVMERGE_INJECT_PANIC").as_deref() == Ok("merge-thread"),
            stopping,
            last_look: false,
            account_next_tick: false,
            reclaimed_by_removed: 0,
        }
    }

    /// The run is ending and this is not the last look: leave the work of this tick.
    fn interrupted(&self) -> bool {
        self.interruption()()
    }

    /// [`Worker::interrupted`] for loops that borrow the worker.
    fn interruption(&self) -> impl Fn() -> bool + use<> {
        let (stopping, last_look) = (self.stopping.clone(), self.last_look);
        move || !last_look && stopping.load(Ordering::Relaxed)
    }

    fn tick(&mut self) {
        self.ticks += 1;
        self.sample_vcpus();
        if self.interrupted() {
            return;
        }
        self.headroom = self
            .host_cpu
            .idle_cpus()
            .map(|idle| idle + self.status.merge_thread_cpu_pct / 100.0);
        self.status.host_headroom_cpus = self.headroom;
        // Pages resident now may be reclaimed below: mark them used first.
        self.observe_residency();
        self.reclaim_zero_pages();
        if self.interrupted() {
            return;
        }
        if self.ticks % u64::from(self.opts.account_every.max(1)) == 1
            || self.ticks == 1
            || self.account_next_tick
        {
            self.account_next_tick = false;
            self.account();
        }
        if self.interrupted() {
            return;
        }
        self.steer_ksm();
        if self.inject_panic && self.ticks == 3 {
            panic!("injected panic (KVMERGE_INJECT_PANIC=merge-thread)");
        }
        // SAFETY: gettid has no preconditions.
        let cpu = procfs::thread_cpu_time(unsafe { libc::gettid() }).unwrap_or_default();
        self.status.merge_thread_cpu_pct = 100.0
            * (cpu.saturating_sub(self.cpu_at_last_tick)).as_secs_f64()
            / self.opts.tick.as_secs_f64();
        self.cpu_at_last_tick = cpu;
        self.status.merge_thread_cpu_s = cpu.as_secs_f64();
        self.status.t = self.started.elapsed().as_secs_f64();
    }

    /// Reads each guest's state and vCPU CPU time once per tick.
    fn sample_vcpus(&mut self) {
        let tick = self.opts.tick.as_secs_f64();
        let interrupted = self.interruption();
        for state in &mut self.vms {
            if interrupted() {
                break;
            }
            state.running = state.vm.control.state() == Lifecycle::Running;
            if !state.running {
                state.vcpus = 0;
                state.busy = None;
                continue;
            }
            let tids = state.vm.control.vcpu_tids();
            state.vcpus = tids.len() as u32;
            let cpu: Duration = tids
                .iter()
                .filter_map(|&t| procfs::thread_cpu_time(t))
                .sum();
            let delta = state
                .vcpu_cpu
                .replace(cpu)
                .map(|prev| cpu.saturating_sub(prev));
            // Ended guests stop adding; the total the policy sees never goes backwards.
            self.vcpu_cpu_total += delta.unwrap_or(Duration::ZERO);
            state.busy = delta.map(|d| d.as_secs_f64() / (tick * tids.len().max(1) as f64));
        }
    }

    fn reclaim_zero_pages(&mut self) {
        if !may_reclaim(self.headroom, self.deferred_in_a_row) {
            self.deferred_in_a_row += 1;
            self.status.zero_deferred_ticks += 1;
            return;
        }
        self.deferred_in_a_row = 0;
        let interrupted = self.interruption();
        for state in &mut self.vms {
            if interrupted() {
                break;
            }
            if state.vm.dedup == DedupMode::Off || !state.running {
                continue;
            }
            // Unknown (first tick) counts as busy.
            if state.busy.is_none_or(|b| b >= ZERO_IDLE_BELOW) {
                continue;
            }
            if state.wait > 0 {
                state.wait -= 1;
                continue;
            }
            let mut report = PassReport::default();
            let wrapped = match state.scanner.scan(
                &state.vm.ram,
                &state.vm.control,
                ZERO_PAGES_PER_TICK,
                &mut report,
            ) {
                Ok(wrapped) => wrapped,
                Err(e) => {
                    log::warn!("{}: zero-page reclaim failed: {e}", state.vm.name);
                    false
                }
            };
            state.reclaimed += report.reclaimed;
            self.scanned_pages += report.scanned_pages;
            self.scan_time += report.took;
            state.found_this_pass += report.reclaimed;
            self.total_pauses += report.pauses.len() as u64;
            self.pauses.extend(report.pauses);
            if self.pauses.len() > PAUSE_WINDOW {
                let excess = self.pauses.len() - PAUSE_WINDOW;
                self.pauses.drain(..excess);
            }
            if wrapped {
                // A whole pass done: back off while passes find nothing, come back at once when
                // they do.
                if state.found_this_pass == 0 {
                    state.backoff = (state.backoff * 2).min(ZERO_MAX_BACKOFF_TICKS);
                    state.wait = state.backoff;
                } else {
                    state.backoff = 1;
                }
                state.found_this_pass = 0;
            }
        }
        self.status.zero_pause_p99_us = zero::quantile(&self.pauses, 0.99).as_secs_f64() * 1e6;
        self.status.zero_pauses = self.total_pauses;
        self.status.zero_scanned_mib = accounting::mib(self.scanned_pages);
        self.status.zero_scan_s = self.scan_time.as_secs_f64();
    }

    /// Marks resident guest pages used and counts used pages given back, for VMs with zero-page
    /// reclaim (elsewhere nothing gives pages back).
    fn observe_residency(&mut self) {
        let interrupted = self.interruption();
        for state in &mut self.vms {
            if interrupted() {
                break;
            }
            if state.vm.dedup == DedupMode::Off {
                continue;
            }
            let (base, len) = state.vm.ram.host_range();
            // SAFETY: the VM's guest RAM mapping, kept alive by the `Arc<GuestRam>` we hold; the
            // same range on every call.
            match unsafe { state.touched.observe(base, len) } {
                Ok(unbacked) => state.unbacked = unbacked,
                Err(e) => log::debug!("{}: mincore on guest RAM failed: {e}", state.vm.name),
            }
        }
    }

    fn account(&mut self) {
        self.observe_residency();
        let ranges: Vec<VmRange> = self
            .vms
            .iter()
            .enumerate()
            .map(|(vm, s)| {
                let (host_start, len) = s.vm.ram.host_range();
                VmRange {
                    vm,
                    host_start,
                    len: len as u64,
                }
            })
            .collect();
        match self.accountant.snapshot(&ranges) {
            Ok(snapshot) => self.last_snapshot = Some(snapshot),
            Err(e) => log::warn!("memory accounting failed: {e}"),
        }
        self.publish_usage();
    }

    fn publish_usage(&mut self) {
        let s = &mut self.status;
        s.vms_running = 0;
        s.guest_ram_mib = 0.0;
        s.vms.clear();
        for (i, state) in self.vms.iter().enumerate() {
            let running = state.running;
            s.vms_running += usize::from(running);
            let len = state.vm.ram.host_range().1 as u64;
            s.guest_ram_mib += accounting::mib(len / PAGE_SIZE);
            let usage = self
                .last_snapshot
                .as_ref()
                .and_then(|snap| snap.per_vm.get(i).copied())
                .unwrap_or_default();
            s.vms.push(VmStatus {
                name: state.vm.name.clone(),
                dedup: dedup_name(state.vm.dedup),
                running,
                resident_mib: accounting::mib(usage.resident),
                ksm_mib: accounting::mib(usage.ksm),
                zero_mib: accounting::mib(usage.zero),
                unique_mib: accounting::mib(usage.unique),
                shared_with_other_vms_mib: accounting::mib(usage.shared_with_other_vms),
                saved_mib: 0.0,
                zero_unbacked_mib: accounting::mib(state.unbacked),
                zero_reclaimed_mib: accounting::mib(state.reclaimed),
            });
        }
        let unbacked: u64 = self.vms.iter().map(|v| v.unbacked).sum();
        s.zero_unbacked_mib = accounting::mib(unbacked);
        s.zero_reclaimed_mib = accounting::mib(
            self.reclaimed_by_removed + self.vms.iter().map(|v| v.reclaimed).sum::<u64>(),
        );
        let Some(snap) = &self.last_snapshot else {
            return;
        };
        let t = snap.total;
        s.resident_mib = accounting::mib(t.resident);
        s.ksm_mib = accounting::mib(t.ksm);
        s.zero_mib = accounting::mib(t.zero);
        s.unique_mib = accounting::mib(t.unique);
        s.shared_with_other_vms_mib = accounting::mib(t.shared_with_other_vms);
        s.accounting = match snap.source {
            accounting::Source::Pagemap => "pagemap",
            accounting::Source::Smaps => "smaps",
        };
        let ksm_saved = ksm_saved_pages(snap, &self.last_counters);
        s.saved_mib = accounting::mib(ksm_saved + t.zero + unbacked);
        for (vm, usage) in s.vms.iter_mut().zip(&snap.per_vm) {
            // KSM's saving is the fleet's; each VM gets the share of its KSM-mapped pages.
            let ksm_share = if t.ksm == 0 {
                0.0
            } else {
                accounting::mib(usage.ksm) * ksm_saved as f64 / t.ksm as f64
            };
            vm.saved_mib = ksm_share + accounting::mib(usage.zero) + vm.zero_unbacked_mib;
        }
    }

    fn steer_ksm(&mut self) {
        let counters = self.sysfs.read_counters().unwrap_or_default();
        self.last_counters = counters;
        let sample = Sample {
            at: self.started.elapsed(),
            vcpu_cpu: self.vcpu_cpu_total,
            vcpus: self.vms.iter().map(|v| v.vcpus).sum(),
            ksmd_cpu: procfs::ksmd_cpu_time().unwrap_or_default(),
            mergeable_pages: self.mergeable_pages(),
            pages_shared: counters.pages_shared,
            pages_sharing: counters.pages_sharing,
            pages_unshared: counters.pages_unshared,
            pages_volatile: counters.pages_volatile,
            full_scans: counters.full_scans,
            ksm_zero_pages: counters.ksm_zero_pages,
        };
        if let Some(prev) = &self.prev {
            let dt = sample.at.saturating_sub(prev.at).as_secs_f64();
            if dt > 0.0 {
                self.status.ksmd_cpu_pct =
                    100.0 * sample.ksmd_cpu.saturating_sub(prev.ksmd_cpu).as_secs_f64() / dt;
            }
        }
        self.status.ksmd_cpu_s = sample.ksmd_cpu.as_secs_f64();
        self.status.pages_shared = counters.pages_shared;
        self.status.pages_sharing = counters.pages_sharing;
        // A waiting process takes over here when the owner has left.
        let owner = self.ksm.as_ref().and_then(|k| k.owner_or_take_over());
        if owner.is_some() && !self.status.ksm_owned {
            // Newly the owner: the next decision is applied in full.
            self.policy.invalidate();
        }
        self.status.ksm_owned = owner.is_some();
        if let Some(owner) = &owner {
            if let Some(knobs) = self.policy.decide(&sample) {
                if let Err(e) = apply(owner, knobs) {
                    log::warn!("cannot set KSM knobs: {e}");
                    // Ask again next tick, and keep the policy's cost model honest.
                    self.policy.invalidate();
                }
            }
        }
        self.status.policy_phase = format!("{:?}", self.policy.phase()).to_lowercase();
        let applied = self.policy.applied().filter(|_| owner.is_some());
        self.status.pages_to_scan = applied.map(|k| k.pages_to_scan);
        self.status.sleep_millisecs = applied.map(|k| k.sleep_millisecs);
        self.prev = Some(sample);
    }

    /// Resident pages of guests offered to KSM.
    fn mergeable_pages(&self) -> u64 {
        let Some(snap) = &self.last_snapshot else {
            return 0;
        };
        self.vms
            .iter()
            .zip(&snap.per_vm)
            .filter(|(v, _)| v.vm.dedup == DedupMode::Full)
            .map(|(_, u)| u.resident)
            .sum()
    }
}

fn apply(owner: &KsmOwner, knobs: Knobs) -> ksm::Result<()> {
    owner.set(Knob::PagesToScan, &knobs.pages_to_scan.to_string())?;
    owner.set(Knob::SleepMillisecs, &knobs.sleep_millisecs.to_string())?;
    owner.set(Knob::Run, if knobs.run { "1" } else { "0" })
}

/// Pages KSM saves the fleet now, at most its KSM-mapped pages: with page frames (root), resident
/// pages minus the frames backing them, zero-page mappings taken out; otherwise the host-wide
/// `pages_sharing`, which may include other processes' merging, capped by the fleet's KSM pages.
fn ksm_saved_pages(snap: &Snapshot, host: &Counters) -> u64 {
    let t = snap.total;
    let saved = match snap.saved() {
        Some(saved) => saved.saturating_sub(t.zero),
        None => host.pages_sharing,
    };
    saved.min(t.ksm)
}

pub(crate) fn dedup_name(mode: DedupMode) -> &'static str {
    match mode {
        DedupMode::Full => "full",
        DedupMode::Zero => "zero",
        DedupMode::Off => "off",
    }
}

/// Whether this tick may hold guests for reclaim: when the host can spare the CPU, or when reclaim
/// has already waited [`ZERO_MAX_DEFER_TICKS`] ticks in a row (a host that never has CPU to spare
/// still gets its memory back, at the cost of longer holds). Unknown headroom (first tick,
/// unreadable /proc/stat) leaves the decision to the per-guest idle check.
fn may_reclaim(idle_cpus: Option<f64>, deferred_in_a_row: u32) -> bool {
    deferred_in_a_row >= ZERO_MAX_DEFER_TICKS
        || idle_cpus.is_none_or(|idle| idle >= ZERO_HEADROOM_CPUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reclaim_waits_for_a_host_with_cpu_to_spare() {
        assert!(may_reclaim(None, 0));
        assert!(may_reclaim(Some(1.7), 0));
        assert!(may_reclaim(Some(ZERO_HEADROOM_CPUS), 0));
        assert!(!may_reclaim(Some(0.2), 0));
        assert!(!may_reclaim(Some(0.0), ZERO_MAX_DEFER_TICKS - 1));
        // A host that stays busy still gets reclaim after a bounded wait.
        assert!(may_reclaim(Some(0.0), ZERO_MAX_DEFER_TICKS));
    }

    #[test]
    fn ksm_saving_is_never_more_than_the_fleets_ksm_pages() {
        let total = accounting::Usage {
            resident: 1000,
            ksm: 600,
            zero: 100,
            unique: 300,
            shared_with_other_vms: 0,
        };
        let snap = |frames: Option<u64>| Snapshot {
            source: accounting::Source::Pagemap,
            per_vm: vec![total],
            total,
            distinct_frames: frames,
            frames_mapped_elsewhere: None,
            estimated: vec![false],
            taken_in: Duration::ZERO,
        };
        let host = |sharing| Counters {
            pages_sharing: sharing,
            ..Counters::default()
        };
        // 600 KSM mappings on 20 frames, 300 unique frames: 580 saved; zero pages apart.
        assert_eq!(ksm_saved_pages(&snap(Some(320)), &host(0)), 580);
        // Without frames, the host-wide figure (other processes included) is capped.
        assert_eq!(ksm_saved_pages(&snap(None), &host(10_000)), 600);
        assert_eq!(ksm_saved_pages(&snap(None), &host(42)), 42);
    }
}
