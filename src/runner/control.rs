//! The control loop: one thread that waits on signals, the `--timeout`/`--duration` timer,
//! guest ends, console input, seccomp reports and the stats tick, and acts on them.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::Config;
use crate::dedup::merge::MergeThread;
use crate::dedup::report;
use crate::output::{self, Lane};
use crate::seccomp;
use crate::terminal::{EscapeDecoder, Input};
use crate::vcpu::{RtBoost, VmEnd};
use crate::vm::{self, Vm};

use super::fleet::{collect, stop_all};
use super::signals::SignalFd;
use super::stats::{STATS_PERIOD, write_stats};
use super::{Error, Result};
use crate::sync::lock;

/// Runs the control loop until every VM has stopped (at once when they all have already).
pub(super) fn control_loop(cfg: &Config, control: &Arc<Mutex<Control>>) -> Result<()> {
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

/// Adds `fd` (readable) to an event loop under token `data`; a failure is logged.
pub(crate) fn watch(ops: &mut EventOps, fd: i32, data: u32) {
    if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
        log::error!("cannot watch fd {fd}: {e:?}");
    }
}

/// Event tokens of the control loop.
const EV_SIGNAL: u32 = 1;
const EV_NOTIFY: u32 = 2;
const EV_TIMER: u32 = 3;
const EV_STDIN: u32 = 4;
const EV_INPUT_DRAINED: u32 = 5;
const EV_STATS: u32 = 6;
const EV_SECCOMP: u32 = 7;

pub(super) struct Control {
    pub(super) vms: Vec<Vm>,
    pub(super) signals: Arc<SignalFd>,
    pub(super) notify: Arc<EventFd>,
    pub(super) timer: Option<TimerFd>,
    /// Console input is on (interactive single guest).
    pub(super) stdin: bool,
    pub(super) input_drained: Arc<EventFd>,
    /// Console input the guest's UART had no room for yet; stdin is not read while it is queued,
    /// so the terminal holds the rest.
    pub(super) pending_input: VecDeque<u8>,
    pub(super) escape: EscapeDecoder,
    pub(super) timed_out: bool,
    pub(super) signal: Option<i32>,
    pub(super) merge: Option<MergeThread>,
    pub(super) stats: Option<Lane>,
    pub(super) stats_timer: Option<TimerFd>,
    pub(super) status_line: bool,
    /// Written by the SIGSYS handler when a thread's seccomp filter stopped it.
    pub(super) seccomp_events: Option<std::os::fd::RawFd>,
    pub(super) seccomp_blocked: bool,
    /// This thread's real-time priority while the fleet stops (see [`stop_all`]).
    pub(super) urgent: Option<RtBoost>,
    /// Every VM has been told to stop.
    pub(super) stopping_all: bool,
    /// The timer is `--duration`'s (a planned end), not `--timeout`'s.
    pub(super) planned_end: bool,
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
        let mut add = |fd: i32, data: u32| watch(ops, fd, data);
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
