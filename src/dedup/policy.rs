//! The KSM scan policy: turns one [`Sample`] of counters per merge-thread tick into settings for
//! `/sys/kernel/mm/ksm`. Pure: no I/O and no clock; time comes in as [`Sample::at`].
//!
//! The adaptive controller has four states, re-evaluated on every sample:
//! - **Burst** when resident mergeable memory grows (guests boot or are added) or, with vCPUs
//!   calm, when unmerged pages (`mergeable - shared - sharing`) rise well above what the last
//!   convergence left (COW breaks, rewritten memory). Merging needs two looks at an unchanged page,
//!   and a page like an existing KSM page merges at first sight, so savings arrive as fast as ksmd
//!   scans: while memory grows, scan at [`CpuBudget::burst`]; after, aim for a ~1.5 s pass.
//! - **Steady** once saved pages grew less than 0.2% over two full passes (three at least): scans
//!   stopped paying. A ~30 s pass within [`CpuBudget::converged`] still catches stray changes.
//! - **Backoff** after 2 s of busy vCPUs while memory is not growing: their pages are volatile and
//!   ksmd would take their cores, so scan at half the converged budget. After 2 s of calm, Burst if
//!   unmerged memory grew meanwhile, else Steady.
//! - **Idle** while no guest memory is resident: burst settings, which cost nothing until the first
//!   pages appear and then found KSM pages at once; after 10 s, the converged cap.
//!
//! Hysteresis: busy/calm thresholds with hold times; the re-burst trigger re-arms at each
//! convergence and doubles after each burst that gained nothing; knobs move only on a >10% change.
//! Sizing: ksmd alternates a batch of P pages (P·c of CPU) with a sleep S, so it takes P·c/(S+P·c)
//! of a core. The per-page cost c is learnt from ksmd's CPU time under the knobs in force, and P
//! solved for the lower of the pass-time rate and 85% of the budget.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Largest `pages_to_scan` kvmerge writes. The kernel takes any u32, but ksmd scans a whole batch
/// before it sleeps, so bigger batches only add latency.
pub const MAX_PAGES_TO_SCAN: u32 = 100_000;
/// Longest `sleep_millisecs` kvmerge writes.
pub const MAX_SLEEP_MILLISECS: u32 = 60_000;

/// A `--ksm-policy` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown KSM policy {0:?}: use adaptive, kernel, off or fixed:PAGES:MS (e.g. fixed:5000:10)"
    )]
    Unknown(String),
    #[error(
        "invalid KSM policy {spec:?}: {reason}; use fixed:PAGES:MS with PAGES 1-{max_pages} and MS 1-{max_ms}",
        max_pages = MAX_PAGES_TO_SCAN,
        max_ms = MAX_SLEEP_MILLISECS
    )]
    Fixed { spec: String, reason: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Who sets the KSM knobs while kvmerge owns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// The controller described in the module docs.
    Adaptive,
    /// Leave the host's settings alone (including a kernel advisor, if the host enabled one).
    Kernel,
    /// Constant knobs.
    Fixed {
        pages_to_scan: u32,
        sleep_millisecs: u32,
    },
    /// `run=0` while kvmerge owns KSM: no merging.
    Off,
}

impl FromStr for PolicyKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adaptive" => Ok(Self::Adaptive),
            "kernel" => Ok(Self::Kernel),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("fixed:") {
                Some(rest) => parse_fixed(s, rest),
                None => Err(Error::Unknown(s.to_owned())),
            },
        }
    }
}

fn parse_fixed(spec: &str, rest: &str) -> Result<PolicyKind> {
    let bad = |reason| Error::Fixed {
        spec: spec.to_owned(),
        reason,
    };
    let (pages, ms) = rest.split_once(':').ok_or_else(|| bad("MS is missing"))?;
    // Parsed wider than the knobs, so that a too large number is called out of range.
    let pages: u64 = pages.parse().map_err(|_| bad("PAGES is not a number"))?;
    let ms: u64 = ms.parse().map_err(|_| bad("MS is not a number"))?;
    if !(1..=u64::from(MAX_PAGES_TO_SCAN)).contains(&pages) {
        return Err(bad("PAGES is out of range"));
    }
    // A zero sleep makes ksmd spin; the kernel allows it, kvmerge does not.
    if !(1..=u64::from(MAX_SLEEP_MILLISECS)).contains(&ms) {
        return Err(bad("MS is out of range"));
    }
    let (pages, ms) = (pages as u32, ms as u32);
    Ok(PolicyKind::Fixed {
        pages_to_scan: pages,
        sleep_millisecs: ms,
    })
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Adaptive => f.write_str("adaptive"),
            Self::Kernel => f.write_str("kernel"),
            Self::Fixed {
                pages_to_scan,
                sleep_millisecs,
            } => {
                write!(f, "fixed:{pages_to_scan}:{sleep_millisecs}")
            }
            Self::Off => f.write_str("off"),
        }
    }
}

/// Counters read by the merge thread once per tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Monotonic time since the merge thread started.
    pub at: Duration,
    /// Cumulative CPU time of all vCPU threads.
    pub vcpu_cpu: Duration,
    /// vCPUs currently running.
    pub vcpus: u32,
    /// Cumulative ksmd CPU time.
    pub ksmd_cpu: Duration,
    /// Resident pages of guest RAM marked MADV_MERGEABLE (what KSM could look at).
    pub mergeable_pages: u64,
    /// The `/sys/kernel/mm/ksm` counters of the same names (host-wide).
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub full_scans: u64,
    pub ksm_zero_pages: u64,
}

impl Sample {
    /// Pages KSM saves: every sharer beyond the kept copy, plus pages mapped to the zero page.
    pub fn saved_pages(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }

    /// Mergeable pages that are not (yet) part of a KSM page.
    pub fn unmerged_pages(&self) -> u64 {
        self.mergeable_pages
            .saturating_sub(self.pages_shared + self.pages_sharing)
    }
}

/// ksmd's CPU use between two samples, as a fraction of one core.
pub fn ksmd_cpu_fraction(prev: &Sample, cur: &Sample) -> f64 {
    share(
        cur.ksmd_cpu.saturating_sub(prev.ksmd_cpu),
        cur.at.saturating_sub(prev.at),
    )
}

/// How busy the vCPUs were between two samples: 0 (all halted) to 1 (all running guest code).
/// `host_cpus` (0 if unknown) caps the capacity, since 8 vCPUs on 2 cores can use 2 cores at most.
pub fn vcpu_busy_fraction(prev: &Sample, cur: &Sample, host_cpus: u32) -> f64 {
    let capacity = match host_cpus {
        0 => cur.vcpus,
        n => cur.vcpus.min(n),
    };
    if capacity == 0 {
        return 0.0;
    }
    let used = share(
        cur.vcpu_cpu.saturating_sub(prev.vcpu_cpu),
        cur.at.saturating_sub(prev.at),
    );
    used / f64::from(capacity)
}

fn share(busy: Duration, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        busy.as_secs_f64() / over.as_secs_f64()
    }
}

/// Settings for `/sys/kernel/mm/ksm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    pub run: bool,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
}

impl Knobs {
    /// The kernel's defaults (with ksmd running).
    pub const KERNEL_DEFAULTS: Knobs = Knobs {
        run: true,
        pages_to_scan: 100,
        sleep_millisecs: 20,
    };

    /// Pages per second these knobs allow if scanning took no time: an upper bound on the rate.
    pub fn max_pages_per_sec(&self) -> f64 {
        if !self.run {
            return 0.0;
        }
        f64::from(self.pages_to_scan) * 1000.0 / f64::from(self.sleep_millisecs.max(1))
    }
}

/// How much CPU ksmd may use, in fractions of one core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuBudget {
    /// While bursting (guests booting, or idle with new unmerged memory). Bursts are short, and
    /// the total CPU of merging is the same at any rate, so a high cap only makes savings come
    /// sooner.
    pub burst: f64,
    /// Once converged, for as long as the guests run; Backoff uses half of it.
    pub converged: f64,
    /// Host cores (0 if unknown): vCPUs sharing few cores count as busy when the cores are.
    pub host_cpus: u32,
}

impl Default for CpuBudget {
    fn default() -> Self {
        Self {
            burst: 0.9,
            converged: 0.02,
            host_cpus: 0,
        }
    }
}

impl CpuBudget {
    /// Caps within (0, 1] with `converged <= burst`; nonsense falls back to the defaults.
    fn sanitized(self) -> Self {
        let fix = |v: f64, default: f64| {
            if v.is_finite() && v > 0.0 {
                v.min(1.0)
            } else {
                default
            }
        };
        let defaults = Self::default();
        let burst = fix(self.burst, defaults.burst);
        let converged = fix(self.converged, defaults.converged).min(burst);
        Self {
            burst,
            converged,
            host_cpus: self.host_cpus,
        }
    }
}

/// What the policy is doing, for status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No resident guest memory to scan.
    Idle,
    /// Scanning fast: new or unmerged memory appeared.
    Burst,
    /// Converged: scanning slowly.
    Steady,
    /// vCPUs busy: scanning slower still.
    Backoff,
    /// `fixed:PAGES:MS`.
    Fixed,
    /// Merging stopped (`run=0`).
    Off,
    /// The host's own settings are in force.
    Host,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Idle => "idle",
            Self::Burst => "burst",
            Self::Steady => "steady",
            Self::Backoff => "backoff",
            Self::Fixed => "fixed",
            Self::Off => "off",
            Self::Host => "host",
        })
    }
}

// Pass-time targets: a burst rescans everything in about this long unless the budget says no...
const BURST_PASS_SECS: f64 = 1.5;
// ...while converged scanning only has to notice stray changes within a minute or so.
const STEADY_PASS_SECS: f64 = 30.0;
const BACKOFF_PASS_SECS: f64 = 120.0;
// Short sleeps keep bursts smooth; long ones save wakeups when slow.
const BURST_SLEEP_MS: u32 = 10;
const SLOW_SLEEP_MS: u32 = 100;
const MIN_PAGES: u32 = 32;
const IDLE_GRACE: Duration = Duration::from_secs(10);
/// Aim below the budget: the cost estimate lags when the page mix changes.
const HEADROOM: f64 = 0.85;
/// Knob changes smaller than this are not worth a window of cost evidence.
const KNOB_DEADBAND: f64 = 0.1;

/// Pessimistic prior for ksmd's CPU time per scanned page; corrected within a sample or two.
const PRIOR_PAGE_COST: f64 = 10e-6;
const PRIOR_WEIGHT_SECS: f64 = 0.5;
/// Older cost evidence counts at most as much as this many seconds of new evidence: a few
/// seconds in a burst, where the page mix changes fast; about a pass when slow, since the cost
/// varies along the pass (merged pages are cheaper to scan).
const FAST_WEIGHT_SECS: f64 = 3.0;
const SLOW_WEIGHT_SECS: f64 = 60.0;
const MIN_PAGE_COST: f64 = 0.1e-6;
/// ksmd CPU time comes in clock ticks, so a window needs some CPU (or time) to mean anything.
const MIN_EVIDENCE_CPU_SECS: f64 = 0.03;
const MIN_EVIDENCE_SECS: f64 = 10.0;

/// Mergeable memory growing this fast means guests are booting or being added (8 MiB/s).
const GROWTH_PAGES_PER_SEC: f64 = 2048.0;
/// vCPUs count as busy at or above this, and calm below the lower one, after a hold time.
const BUSY_ENTER: f64 = 0.5;
const BUSY_LEAVE: f64 = 0.25;
const BUSY_HOLD: Duration = Duration::from_secs(2);
const CALM_HOLD: Duration = Duration::from_secs(2);
/// A burst lasts at least this many passes (the first one may be partial, merging needs two).
const MIN_BURST_PASSES: u64 = 3;
/// Converged: saved pages grew less than this over the last two passes.
const STALL_PASSES: u64 = 2;
const STALL_MIN_PAGES: u64 = 256;
const STALL_FRACTION: f64 = 0.002;
/// Unmerged pages this far above the last convergence (16 MiB or 2%) call for another burst.
const TRIGGER_MIN_PAGES: u64 = 4096;
const TRIGGER_FRACTION: f64 = 0.02;
/// Each fruitless burst doubles the trigger, up to 64 times: steady scanning merges whatever
/// the bursts would have, only later, so bursts that do not pay can become rare.
const MAX_FRUITLESS: u32 = 6;

/// Chooses KSM knob settings from counter samples.
pub struct Policy {
    kind: PolicyKind,
    budget: CpuBudget,
    applied: Option<Knobs>,
    ctl: Controller,
}

impl Policy {
    /// A policy of `kind`; out-of-range budget values fall back to the defaults.
    pub fn new(kind: PolicyKind, budget: CpuBudget) -> Policy {
        Policy {
            kind,
            budget: budget.sanitized(),
            applied: None,
            ctl: Controller::new(),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Knob settings to apply after this sample, or None to leave them as they are (the
    /// Kernel policy always says None). Settings are returned once and again only when they change.
    pub fn decide(&mut self, s: &Sample) -> Option<Knobs> {
        let knobs = match self.kind {
            PolicyKind::Kernel => return None,
            PolicyKind::Off => Knobs {
                run: false,
                ..Knobs::KERNEL_DEFAULTS
            },
            PolicyKind::Fixed {
                pages_to_scan,
                sleep_millisecs,
            } => Knobs {
                run: true,
                pages_to_scan: pages_to_scan.clamp(1, MAX_PAGES_TO_SCAN),
                sleep_millisecs: sleep_millisecs.clamp(1, MAX_SLEEP_MILLISECS),
            },
            PolicyKind::Adaptive => self.ctl.step(s, &self.budget, self.applied)?,
        };
        if self.applied == Some(knobs) {
            return None;
        }
        self.applied = Some(knobs);
        self.ctl.cost.restart(s, knobs, self.ctl.mode);
        Some(knobs)
    }

    /// The settings returned last (and not invalidated since): what the caller applied.
    pub fn applied(&self) -> Option<Knobs> {
        self.applied
    }

    /// Forget what was returned last, so the next [`decide`](Self::decide) returns the full
    /// settings again: for when applying them failed or someone else rewrote them.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    pub fn phase(&self) -> Phase {
        match self.kind {
            PolicyKind::Adaptive => self.ctl.mode.into(),
            PolicyKind::Kernel => Phase::Host,
            PolicyKind::Fixed { .. } => Phase::Fixed,
            PolicyKind::Off => Phase::Off,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Idle,
    Burst,
    Steady,
    Backoff,
}

impl From<Mode> for Phase {
    fn from(mode: Mode) -> Phase {
        match mode {
            Mode::Idle => Phase::Idle,
            Mode::Burst => Phase::Burst,
            Mode::Steady => Phase::Steady,
            Mode::Backoff => Phase::Backoff,
        }
    }
}

/// State of the adaptive policy.
struct Controller {
    mode: Mode,
    /// When `mode` was entered.
    entered: Duration,
    /// Mergeable memory grew fast in the last interval.
    growing: bool,
    prev: Option<Sample>,
    /// Start of the current run of busy (or calm) intervals.
    busy_since: Option<Duration>,
    calm_since: Option<Duration>,
    cost: CostEstimate,
    burst: BurstProgress,
    /// Unmerged pages at the last convergence (or fewer, if they dropped since).
    unmerged_ref: u64,
    fruitless: u32,
}

impl Controller {
    fn new() -> Self {
        Self {
            mode: Mode::Idle,
            entered: Duration::ZERO,
            growing: false,
            prev: None,
            busy_since: None,
            calm_since: None,
            cost: CostEstimate::new(),
            burst: BurstProgress::default(),
            unmerged_ref: 0,
            fruitless: 0,
        }
    }

    fn step(&mut self, s: &Sample, budget: &CpuBudget, applied: Option<Knobs>) -> Option<Knobs> {
        let Some(prev) = self.prev else {
            self.prev = Some(*s);
            self.unmerged_ref = s.unmerged_pages();
            let first = if s.mergeable_pages == 0 {
                Mode::Idle
            } else {
                Mode::Burst
            };
            self.enter(first, s);
            return Some(self.size(s, budget, None));
        };
        // A repeated or out-of-order sample carries no interval to learn from.
        if s.at <= prev.at {
            return None;
        }
        self.prev = Some(*s);
        self.track_busy(&prev, s, budget.host_cpus);
        self.unmerged_ref = self.unmerged_ref.min(s.unmerged_pages());

        let dt = (s.at - prev.at).as_secs_f64();
        let growth = s.mergeable_pages.saturating_sub(prev.mergeable_pages) as f64 / dt;
        let grew = growth >= GROWTH_PAGES_PER_SEC;
        self.growing = grew;
        let busy = held(self.busy_since, s.at, BUSY_HOLD);
        let calm = held(self.calm_since, s.at, CALM_HOLD);
        let excess = s.unmerged_pages().saturating_sub(self.unmerged_ref) >= self.trigger(s);
        let next = if s.mergeable_pages == 0 {
            Mode::Idle
        } else if grew {
            // Booting guests are busy too: new memory wins, it is what there is to merge.
            Mode::Burst
        } else {
            match self.mode {
                Mode::Idle => Mode::Burst,
                Mode::Burst | Mode::Steady if busy => Mode::Backoff,
                Mode::Burst if self.burst.stalled(s) => Mode::Steady,
                Mode::Steady | Mode::Backoff if calm && excess => Mode::Burst,
                Mode::Backoff if calm => Mode::Steady,
                mode => mode,
            }
        };
        let same_regime = next == self.mode;
        if next != self.mode || (next == Mode::Burst && grew) {
            // New memory needs its own two passes, so growth restarts the burst's pass count.
            self.enter(next, s);
        } else if self.mode == Mode::Burst {
            self.burst.observe(s);
        }
        Some(self.size(s, budget, applied.filter(|_| same_regime)))
    }

    fn enter(&mut self, next: Mode, s: &Sample) {
        if self.mode == Mode::Burst && next == Mode::Steady {
            let gained = s.saved_pages().saturating_sub(self.burst.saved_at_start);
            self.fruitless = if gained < self.trigger(s) / 4 {
                (self.fruitless + 1).min(MAX_FRUITLESS)
            } else {
                0
            };
            self.unmerged_ref = s.unmerged_pages();
        }
        if next == Mode::Burst {
            self.burst.restart(s);
        }
        if next != self.mode {
            self.entered = s.at;
        }
        self.mode = next;
    }

    fn track_busy(&mut self, prev: &Sample, s: &Sample, host_cpus: u32) {
        let busy = vcpu_busy_fraction(prev, s, host_cpus);
        if busy >= BUSY_ENTER {
            self.calm_since = None;
            self.busy_since.get_or_insert(prev.at);
        } else if busy < BUSY_LEAVE {
            self.busy_since = None;
            self.calm_since.get_or_insert(prev.at);
        } else {
            self.busy_since = None;
            self.calm_since = None;
        }
    }

    /// Unmerged growth since the last convergence that calls for a burst.
    fn trigger(&self, s: &Sample) -> u64 {
        let base = TRIGGER_MIN_PAGES.max((s.mergeable_pages as f64 * TRIGGER_FRACTION) as u64);
        base << self.fruitless
    }

    /// Knobs for the current mode. `current` is what is in force if the mode did not change.
    fn size(&self, s: &Sample, budget: &CpuBudget, current: Option<Knobs>) -> Knobs {
        let (pass_secs, cap, sleep_ms) = match self.mode {
            // Scanning nothing costs nothing, and the first guest pages to appear should be seen
            // twice at once: they found the KSM pages that later copies merge into at first sight.
            // A long Idle gets the converged cap: whatever ksmd scans then is not ours.
            Mode::Idle if s.at.saturating_sub(self.entered) >= IDLE_GRACE => {
                (BURST_PASS_SECS, budget.converged, BURST_SLEEP_MS)
            }
            Mode::Idle | Mode::Burst => (BURST_PASS_SECS, budget.burst, BURST_SLEEP_MS),
            Mode::Steady => (STEADY_PASS_SECS, budget.converged, SLOW_SLEEP_MS),
            Mode::Backoff => (BACKOFF_PASS_SECS, budget.converged / 2.0, SLOW_SLEEP_MS),
        };
        // While memory grows, scan at the budget: a page seen twice founds a KSM page, and every
        // later copy merges at first sight, so the earlier the scans the sooner the savings.
        let wanted = if self.growing || self.mode == Mode::Idle {
            f64::INFINITY
        } else {
            s.mergeable_pages as f64 / pass_secs
        };
        let cost = self.cost.current(s);
        let rate = wanted.min(cap * HEADROOM / cost);
        let sleep = f64::from(sleep_ms) / 1000.0;
        // ksmd scans `rate` pages/s when P / (S + P·c) = rate, i.e. P = rate·S / (1 − rate·c);
        // rate·c ≤ cap·HEADROOM < 1 keeps the denominator positive.
        let pages = rate * sleep / (1.0 - rate * cost);
        if let Some(cur) = current.filter(|k| k.sleep_millisecs == sleep_ms) {
            let cur_pages = f64::from(cur.pages_to_scan);
            if (pages - cur_pages).abs() <= KNOB_DEADBAND * cur_pages {
                return cur;
            }
        }
        let pages = pages
            .round()
            .clamp(f64::from(MIN_PAGES), f64::from(MAX_PAGES_TO_SCAN));
        Knobs {
            run: true,
            pages_to_scan: pages as u32,
            sleep_millisecs: sleep_ms,
        }
    }
}

fn held(since: Option<Duration>, now: Duration, hold: Duration) -> bool {
    since.is_some_and(|t| now.saturating_sub(t) >= hold)
}

/// Learns ksmd's CPU time per page from the knobs in force and ksmd's CPU time meanwhile.
struct CostEstimate {
    secs_per_page: f64,
    weight_secs: f64,
    /// The controller's mode when the open window started.
    mode: Mode,
    /// The sample after which `knobs` were applied.
    window: Option<(Sample, Knobs)>,
}

impl CostEstimate {
    fn new() -> Self {
        Self {
            secs_per_page: PRIOR_PAGE_COST,
            weight_secs: PRIOR_WEIGHT_SECS,
            mode: Mode::Idle,
            window: None,
        }
    }

    /// The estimate including the open window.
    fn current(&self, s: &Sample) -> f64 {
        self.blended(s).0
    }

    /// Close the open window into the estimate and open one for `knobs`, applied after `s` in
    /// `mode`.
    fn restart(&mut self, s: &Sample, knobs: Knobs, mode: Mode) {
        (self.secs_per_page, self.weight_secs) = self.blended(s);
        // A new mode means a new page mix (busy guests dirty pages, bursts meet unmerged ones).
        let slow = matches!(mode, Mode::Steady | Mode::Backoff) && mode == self.mode;
        let max_weight = if slow {
            SLOW_WEIGHT_SECS
        } else {
            FAST_WEIGHT_SECS
        };
        self.weight_secs = self.weight_secs.min(max_weight);
        // Backoff starts from the pessimistic prior: under-scanning busy guests costs nothing.
        if mode == Mode::Backoff && self.mode != Mode::Backoff {
            self.secs_per_page = self.secs_per_page.max(PRIOR_PAGE_COST);
        }
        self.window = Some((*s, knobs));
        self.mode = mode;
    }

    fn blended(&self, s: &Sample) -> (f64, f64) {
        let Some((cost, secs)) = self
            .window
            .and_then(|(start, knobs)| measure(&start, s, knobs))
        else {
            return (self.secs_per_page, self.weight_secs);
        };
        let weight = self.weight_secs + secs;
        (
            (self.secs_per_page * self.weight_secs + cost * secs) / weight,
            weight,
        )
    }
}

/// Per-page cost (seconds) and the evidence behind it (seconds), from a window under `knobs`.
fn measure(start: &Sample, end: &Sample, knobs: Knobs) -> Option<(f64, f64)> {
    let secs = end.at.saturating_sub(start.at).as_secs_f64();
    let cpu = end.ksmd_cpu.saturating_sub(start.ksmd_cpu).as_secs_f64();
    if !knobs.run || secs <= 0.0 || (cpu < MIN_EVIDENCE_CPU_SECS && secs < MIN_EVIDENCE_SECS) {
        return None;
    }
    // ksmd's share is P·c / (S + P·c), so c = share·S / ((1 − share)·P).
    let share = (cpu / secs).min(0.98);
    let sleep = f64::from(knobs.sleep_millisecs) / 1000.0;
    let cost = share * sleep / ((1.0 - share) * f64::from(knobs.pages_to_scan.max(1)));
    Some((cost.max(MIN_PAGE_COST), secs))
}

/// Saved pages at the pass boundaries seen during a burst.
#[derive(Default)]
struct BurstProgress {
    start_scans: u64,
    saved_at_start: u64,
    /// (full_scans, saved pages) when each new full_scans value was first seen; the last few.
    marks: Vec<(u64, u64)>,
}

impl BurstProgress {
    fn restart(&mut self, s: &Sample) {
        self.start_scans = s.full_scans;
        self.saved_at_start = s.saved_pages();
        self.marks.clear();
        self.marks.push((s.full_scans, s.saved_pages()));
    }

    fn observe(&mut self, s: &Sample) {
        if self
            .marks
            .last()
            .is_none_or(|&(scans, _)| s.full_scans > scans)
        {
            if self.marks.len() > STALL_PASSES as usize + 1 {
                self.marks.remove(0);
            }
            self.marks.push((s.full_scans, s.saved_pages()));
        }
    }

    /// Whether the last two full passes stopped paying.
    fn stalled(&self, s: &Sample) -> bool {
        if s.full_scans < self.start_scans + MIN_BURST_PASSES {
            return false;
        }
        let Some(&(_, then)) = self
            .marks
            .iter()
            .rev()
            .find(|&&(scans, _)| scans + STALL_PASSES <= s.full_scans)
        else {
            return false;
        };
        let threshold = STALL_MIN_PAGES.max((s.mergeable_pages as f64 * STALL_FRACTION) as u64);
        s.saved_pages().saturating_sub(then) < threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic model of ksmd and guests, in blocks of `BLOCK` pages that are always
    /// written and scanned together (exact for the workloads below, and 16x cheaper to run).
    mod sim {
        use super::super::{Knobs, Sample};
        use std::time::Duration;

        pub const BLOCK: u64 = 16;
        /// 256 MiB of 4 KiB pages.
        pub const GUEST_BLOCKS: usize = 65_536 / BLOCK as usize;
        /// Distinct contents the guests fill memory with, in blocks (64 × 16 = 1024 page patterns).
        const PATTERNS: u32 = 64;
        /// ksmd CPU per page: checksum plus tree searches; a page that is already a KSM page
        /// only needs the stable-tree lookup. 5000 pages / 10 ms then takes 80% of a core and a
        /// pass over 2 GiB ~5 s.
        const PAGE_COST: f64 = 8e-6;
        const MERGED_PAGE_COST: f64 = 4e-6;
        const TICK: f64 = 0.01;
        /// Halted vCPUs still wake for timer ticks.
        const IDLE_VCPU: f64 = 0.01;

        #[derive(Clone, Copy, PartialEq, Eq)]
        enum State {
            Unseen,
            /// Seen, in no tree (its checksum changed, or it was just COW-broken).
            Volatile,
            /// In the unstable tree of the given pass.
            Unstable(u64),
            Merged,
        }

        #[derive(Clone, Copy)]
        struct Block {
            resident: bool,
            content: u32,
            checksum: Option<u32>,
            state: State,
        }

        #[derive(Clone, Copy)]
        pub enum Work {
            /// Write pattern content to blocks `from..to` of the guest, front to back.
            Fill { from: usize, to: usize },
            /// Rewrite random resident blocks with unique content.
            Churn { blocks_per_sec: f64 },
            /// Touch new blocks `from..` with unique content now and then (a vCPU mostly idle).
            Scribble { from: usize, blocks_per_sec: f64 },
        }

        #[derive(Clone, Copy)]
        pub struct Activity {
            pub guest: usize,
            pub start: f64,
            pub secs: f64,
            pub work: Work,
        }

        pub struct Sim {
            t: f64,
            blocks: Vec<Block>,
            activities: Vec<(Activity, f64)>,
            guests: usize,
            knobs: Knobs,
            /// When ksmd's current batch ends and when it next wakes.
            batch_end: f64,
            next_wake: f64,
            carry: f64,
            cursor: usize,
            full_scans: u64,
            /// Sharers per pattern's KSM page (0: none).
            mappers: Vec<u32>,
            /// Resident blocks holding each pattern.
            copies: Vec<u64>,
            unstable: Vec<Option<(usize, u64)>>,
            resident: u64,
            seen: u64,
            shared: u64,
            sharing: u64,
            unshared: u64,
            next_unique: u32,
            rng: u64,
            ksmd_cpu: f64,
            vcpu_cpu: f64,
        }

        impl Sim {
            pub fn new(guests: usize, activities: &[Activity]) -> Sim {
                let block = Block {
                    resident: false,
                    content: 0,
                    checksum: None,
                    state: State::Unseen,
                };
                Sim {
                    t: 0.0,
                    blocks: vec![block; guests * GUEST_BLOCKS],
                    activities: activities.iter().map(|a| (*a, 0.0)).collect(),
                    guests,
                    // The host's KSM is off until the policy says otherwise.
                    knobs: Knobs {
                        run: false,
                        ..Knobs::KERNEL_DEFAULTS
                    },
                    batch_end: 0.0,
                    next_wake: 0.0,
                    carry: 0.0,
                    cursor: 0,
                    full_scans: 0,
                    mappers: vec![0; PATTERNS as usize],
                    copies: vec![0; PATTERNS as usize],
                    unstable: vec![None; PATTERNS as usize],
                    resident: 0,
                    seen: 0,
                    shared: 0,
                    sharing: 0,
                    unshared: 0,
                    next_unique: PATTERNS,
                    rng: 0x2545_f491_4f6c_dd1d,
                    ksmd_cpu: 0.0,
                    vcpu_cpu: 0.0,
                }
            }

            pub fn apply(&mut self, knobs: Knobs) {
                // Writing sleep_millisecs wakes a sleeping ksmd, as does starting it.
                if knobs.run
                    && (!self.knobs.run || knobs.sleep_millisecs != self.knobs.sleep_millisecs)
                {
                    self.next_wake = self.next_wake.min(self.t.max(self.batch_end));
                }
                self.knobs = knobs;
            }

            /// Counters as the merge thread reads them: CPU times in 10 ms clock ticks.
            pub fn sample(&self) -> Sample {
                let ticks = |secs: f64| Duration::from_millis((secs * 100.0).floor() as u64 * 10);
                let pages = |blocks: u64| blocks * BLOCK;
                Sample {
                    at: Duration::from_secs_f64(self.t),
                    vcpu_cpu: ticks(self.vcpu_cpu),
                    vcpus: self.started_guests() as u32,
                    ksmd_cpu: ticks(self.ksmd_cpu),
                    mergeable_pages: pages(self.resident),
                    pages_shared: pages(self.shared),
                    pages_sharing: pages(self.sharing),
                    pages_unshared: pages(self.unshared),
                    pages_volatile: pages(self.seen - self.shared - self.sharing - self.unshared),
                    full_scans: self.full_scans,
                    ksm_zero_pages: 0,
                }
            }

            /// The most KSM could save right now: all resident copies of a pattern but one.
            pub fn max_saved(&self) -> u64 {
                let saved: u64 = self.copies.iter().map(|&n| n.saturating_sub(1)).sum();
                saved * BLOCK
            }

            fn started_guests(&self) -> usize {
                (0..self.guests)
                    .filter(|&g| {
                        self.activities
                            .iter()
                            .any(|(a, _)| a.guest == g && a.start <= self.t)
                    })
                    .count()
            }

            pub fn advance(&mut self, until: f64) {
                while self.t < until {
                    let end = (self.t + TICK).min(until);
                    self.guests_run(self.t, end);
                    while self.knobs.run && self.next_wake < end {
                        let cpu = self.batch();
                        self.ksmd_cpu += cpu;
                        self.batch_end = self.next_wake + cpu;
                        self.next_wake =
                            self.batch_end + f64::from(self.knobs.sleep_millisecs) / 1000.0;
                    }
                    if !self.knobs.run {
                        self.next_wake = end;
                    }
                    self.t = end;
                }
            }

            fn guests_run(&mut self, from: f64, to: f64) {
                let mut busy = vec![false; self.guests];
                for i in 0..self.activities.len() {
                    let (a, done) = self.activities[i];
                    let (start, end) = (a.start.max(from), (a.start + a.secs).min(to));
                    if start >= end {
                        continue;
                    }
                    busy[a.guest] |= !matches!(a.work, Work::Scribble { .. });
                    let base = a.guest * GUEST_BLOCKS;
                    match a.work {
                        Work::Fill {
                            from: first,
                            to: last,
                        } => {
                            let target = ((end - a.start) / a.secs * (last - first) as f64).round();
                            for off in first + done as usize..first + target as usize {
                                self.write(base + off, off as u32 % PATTERNS);
                            }
                            self.activities[i].1 = target;
                        }
                        Work::Churn { blocks_per_sec } => {
                            let due = done + blocks_per_sec * (end - start);
                            for _ in 0..due as usize {
                                let b = base + self.random(GUEST_BLOCKS);
                                if self.blocks[b].resident {
                                    self.next_unique += 1;
                                    self.write(b, self.next_unique);
                                }
                            }
                            self.activities[i].1 = due.fract();
                        }
                        Work::Scribble {
                            from: first,
                            blocks_per_sec,
                        } => {
                            let target = (end - a.start) * blocks_per_sec;
                            for off in first + done as usize..first + target as usize {
                                self.next_unique += 1;
                                self.write(base + off, self.next_unique);
                            }
                            self.activities[i].1 = target;
                        }
                    }
                }
                for (g, busy) in busy.into_iter().enumerate() {
                    if self
                        .activities
                        .iter()
                        .any(|(a, _)| a.guest == g && a.start < to)
                    {
                        self.vcpu_cpu += (to - from) * if busy { 1.0 } else { IDLE_VCPU };
                    }
                }
            }

            fn random(&mut self, n: usize) -> usize {
                self.rng = self
                    .rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((self.rng >> 33) % n as u64) as usize
            }

            fn write(&mut self, b: usize, content: u32) {
                let block = self.blocks[b];
                if !block.resident {
                    self.resident += 1;
                } else if block.content < PATTERNS {
                    self.copies[block.content as usize] -= 1;
                }
                if content < PATTERNS {
                    self.copies[content as usize] += 1;
                }
                if block.state == State::Merged {
                    // Copy-on-write: the guest gets its own page again.
                    self.unmap(block.content);
                    self.blocks[b].state = State::Volatile;
                }
                // An unstable-tree entry goes stale; lookups compare contents and skip it.
                self.blocks[b].resident = true;
                self.blocks[b].content = content;
            }

            fn unmap(&mut self, pattern: u32) {
                let m = &mut self.mappers[pattern as usize];
                *m -= 1;
                if *m == 0 {
                    self.shared -= 1
                } else {
                    self.sharing -= 1
                }
            }

            /// One ksmd batch: up to pages_to_scan resident pages, ending early at the end of a
            /// pass as `ksm_do_scan` does. Returns the CPU seconds it took.
            fn batch(&mut self) -> f64 {
                self.carry += f64::from(self.knobs.pages_to_scan) / BLOCK as f64;
                let mut todo = self.carry as usize;
                self.carry = self.carry.fract();
                let mut cpu = 0.0;
                while todo > 0 {
                    if self.cursor == self.blocks.len() {
                        self.cursor = 0;
                        self.full_scans += 1;
                        break;
                    }
                    let b = self.cursor;
                    self.cursor += 1;
                    if self.blocks[b].resident {
                        cpu += self.visit(b) * BLOCK as f64;
                        todo -= 1;
                    }
                }
                cpu
            }

            /// `cmp_and_merge_page` for one block; returns the CPU cost per page.
            fn visit(&mut self, b: usize) -> f64 {
                let pass = self.full_scans;
                let block = self.blocks[b];
                match block.state {
                    State::Merged => return MERGED_PAGE_COST,
                    State::Unseen => {
                        self.seen += 1;
                        self.blocks[b].state = State::Volatile;
                    }
                    State::Unstable(_) => {
                        // The unstable tree is rebuilt every pass.
                        self.unshared -= 1;
                        self.blocks[b].state = State::Volatile;
                    }
                    State::Volatile => {}
                }
                let c = block.content;
                let pattern = (c < PATTERNS).then_some(c as usize);
                // The stable tree first: a page like an existing KSM page merges at first sight.
                if let Some(p) = pattern.filter(|&p| self.mappers[p] > 0) {
                    self.mappers[p] += 1;
                    self.sharing += 1;
                    self.blocks[b].state = State::Merged;
                    return PAGE_COST;
                }
                // Changed since the last look: too volatile for the unstable tree.
                if block.checksum != Some(c) {
                    self.blocks[b].checksum = Some(c);
                    return PAGE_COST;
                }
                if let Some(p) = pattern {
                    match self.unstable[p] {
                        Some((other, seen_in))
                            if seen_in == pass
                                && self.blocks[other].state == State::Unstable(pass)
                                && self.blocks[other].content == c =>
                        {
                            self.blocks[other].state = State::Merged;
                            self.blocks[b].state = State::Merged;
                            self.unshared -= 1;
                            self.mappers[p] = 2;
                            self.shared += 1;
                            self.sharing += 1;
                            self.unstable[p] = None;
                            return PAGE_COST;
                        }
                        _ => self.unstable[p] = Some((b, pass)),
                    }
                }
                self.blocks[b].state = State::Unstable(pass);
                self.unshared += 1;
                PAGE_COST
            }
        }
    }

    use sim::{Activity, GUEST_BLOCKS, Sim, Work};

    /// Guests `guests` boot from `at`, 0.3 s apart, and fill `blocks` of RAM in 2 s (busy).
    fn boot(guests: std::ops::Range<usize>, at: f64, blocks: usize) -> Vec<Activity> {
        guests
            .enumerate()
            .map(|(i, guest)| Activity {
                guest,
                start: at + 0.3 * i as f64,
                secs: 2.0,
                work: Work::Fill {
                    from: 0,
                    to: blocks,
                },
            })
            .collect()
    }

    struct Point {
        s: Sample,
        phase: Phase,
        knobs: Knobs,
        max_saved: u64,
    }

    struct Trace(Vec<Point>);

    /// Runs the merge-thread loop for `secs` with a sample period wobbling between 0.8 and 1.2 s.
    fn run(
        guests: usize,
        acts: &[Activity],
        kind: PolicyKind,
        budget: CpuBudget,
        secs: f64,
    ) -> Trace {
        let mut sim = Sim::new(guests, acts);
        let mut policy = Policy::new(kind, budget);
        let mut knobs = Knobs {
            run: false,
            ..Knobs::KERNEL_DEFAULTS
        };
        let mut points = Vec::new();
        let mut at = 0.0;
        for i in 0.. {
            if at > secs {
                break;
            }
            sim.advance(at);
            let s = sim.sample();
            if let Some(k) = policy.decide(&s) {
                sim.apply(k);
                knobs = k;
            }
            points.push(Point {
                s,
                phase: policy.phase(),
                knobs,
                max_saved: sim.max_saved(),
            });
            at += 1.0 + 0.1 * ((i * 7 % 5) as f64 - 2.0);
        }
        Trace(points)
    }

    impl Trace {
        fn secs(p: &Point) -> f64 {
            p.s.at.as_secs_f64()
        }

        /// Seconds from `after` until savings reached `frac` of the most possible at time `at`.
        fn time_to(&self, frac: f64, after: f64, at: f64) -> Option<f64> {
            let goal = frac * self.at(at).max_saved as f64;
            self.0
                .iter()
                .find(|p| Self::secs(p) >= after && p.s.saved_pages() as f64 >= goal)
                .map(|p| Self::secs(p) - after)
        }

        fn at(&self, t: f64) -> &Point {
            self.0
                .iter()
                .find(|p| Self::secs(p) >= t)
                .unwrap_or_else(|| self.0.last().unwrap())
        }

        /// ksmd CPU seconds in [from, to].
        fn ksmd_cpu(&self, from: f64, to: f64) -> f64 {
            (self.at(to).s.ksmd_cpu - self.at(from).s.ksmd_cpu).as_secs_f64()
        }

        fn points(&self, from: f64, to: f64) -> impl Iterator<Item = &Point> {
            self.0
                .iter()
                .filter(move |p| (from..to).contains(&Self::secs(p)))
        }

        fn last(&self) -> &Point {
            self.0.last().unwrap()
        }
    }

    const FAST: PolicyKind = PolicyKind::Fixed {
        pages_to_scan: 5000,
        sleep_millisecs: 10,
    };
    const DEFAULTS: PolicyKind = PolicyKind::Fixed {
        pages_to_scan: 100,
        sleep_millisecs: 20,
    };

    #[test]
    fn boot_fill_idle_is_fast_cheap_and_complete() {
        let acts = boot(0..8, 0.5, GUEST_BLOCKS);
        let budget = CpuBudget::default();
        let adaptive = run(8, &acts, PolicyKind::Adaptive, budget, 300.0);
        let fast = run(8, &acts, FAST, budget, 300.0);
        let slow = run(8, &acts, DEFAULTS, budget, 300.0);

        let t_adaptive = adaptive.time_to(0.9, 0.0, 300.0).unwrap();
        let t_fast = fast.time_to(0.9, 0.0, 300.0).unwrap();
        let t_slow = slow.time_to(0.9, 0.0, 300.0).unwrap_or(300.0);
        let cpu_adaptive = adaptive.ksmd_cpu(0.0, 300.0);
        let cpu_fast = fast.ksmd_cpu(0.0, 300.0);
        let converged = adaptive.ksmd_cpu(60.0, 300.0) / 240.0;
        let end = adaptive.last();
        eprintln!(
            "time to 90%: adaptive {t_adaptive:.1} s, fixed 5000/10 {t_fast:.1} s, defaults {t_slow:.1} s; \
             ksmd CPU: adaptive {cpu_adaptive:.1} s, fast {cpu_fast:.1} s, defaults {:.1} s; \
             converged {:.2}% of a core; saved {} of {} pages",
            slow.ksmd_cpu(0.0, 300.0),
            converged * 100.0,
            end.s.saved_pages(),
            end.max_saved,
        );
        assert!(t_adaptive <= 1.5 * t_fast, "{t_adaptive} vs fast {t_fast}");
        assert!(
            5.0 * t_adaptive <= t_slow,
            "{t_adaptive} vs defaults {t_slow}"
        );
        assert!(
            cpu_adaptive <= 0.5 * cpu_fast,
            "{cpu_adaptive} vs fast {cpu_fast}"
        );
        assert!(converged <= 0.02, "converged ksmd use {converged}");
        assert!(end.s.saved_pages() as f64 >= 0.95 * end.max_saved as f64);
        assert_eq!(end.phase, Phase::Steady);
        // No oscillation once converged: one regime, and hardly any knob writes.
        let late: Vec<_> = adaptive.points(60.0, 301.0).collect();
        assert!(late.iter().all(|p| p.phase == Phase::Steady));
        let changes = late.windows(2).filter(|w| w[0].knobs != w[1].knobs).count();
        assert!(changes <= 3, "{changes} knob changes while converged");
    }

    #[test]
    fn busy_guests_back_off_then_idle_guests_burst_again() {
        let mut acts = boot(0..8, 0.5, 3 * GUEST_BLOCKS / 4);
        for guest in 0..8 {
            let churn = Work::Churn {
                blocks_per_sec: 400.0,
            };
            acts.push(Activity {
                guest,
                start: 60.0,
                secs: 60.0,
                work: churn,
            });
            // Then the guests rewrite what they scribbled on, go idle, and later grow.
            let restore = Work::Fill {
                from: 0,
                to: 3 * GUEST_BLOCKS / 4,
            };
            acts.push(Activity {
                guest,
                start: 120.0,
                secs: 1.0,
                work: restore,
            });
            let grow = Work::Fill {
                from: 3 * GUEST_BLOCKS / 4,
                to: GUEST_BLOCKS,
            };
            acts.push(Activity {
                guest,
                start: 150.0,
                secs: 1.0,
                work: grow,
            });
        }
        let t = run(8, &acts, PolicyKind::Adaptive, CpuBudget::default(), 200.0);
        let fast = run(8, &acts, FAST, CpuBudget::default(), 200.0);

        let burst_rate = t
            .points(0.0, 10.0)
            .map(|p| p.knobs.max_pages_per_sec())
            .fold(0.0, f64::max);
        let backoff: Vec<_> = t.points(64.0, 120.0).collect();
        assert!(backoff.iter().all(|p| p.phase == Phase::Backoff));
        let backoff_rate = backoff
            .iter()
            .map(|p| p.knobs.max_pages_per_sec())
            .fold(0.0, f64::max);
        let busy_share = t.ksmd_cpu(64.0, 120.0) / 56.0;
        eprintln!(
            "busy guests: scan rate bound {backoff_rate:.0} pages/s vs {burst_rate:.0} in the boot burst; \
             ksmd {:.2}% of a core (fixed 5000/10: {:.1}%)",
            busy_share * 100.0,
            fast.ksmd_cpu(64.0, 120.0) / 56.0 * 100.0
        );
        assert!(
            backoff_rate * 10.0 <= burst_rate,
            "{backoff_rate} vs {burst_rate}"
        );
        assert!(busy_share <= 0.01, "{busy_share}");

        // Calm again with rewritten memory: burst, and get the savings back.
        assert!(t.points(121.0, 127.0).any(|p| p.phase == Phase::Burst));
        let recovered = t.time_to(0.95, 121.0, 140.0).unwrap();
        let recovered_fast = fast.time_to(0.95, 121.0, 140.0).unwrap();
        eprintln!(
            "after the busy spell: 95% again in {recovered:.1} s (fixed 5000/10: {recovered_fast:.1} s)"
        );
        assert!(recovered <= 20.0, "{recovered}");
        assert_eq!(t.at(148.0).phase, Phase::Steady);

        // New memory in idle guests: burst at the first sample that sees it.
        let before = t.at(149.0).s.mergeable_pages;
        let grown = t
            .points(149.0, 200.0)
            .find(|p| p.s.mergeable_pages > before)
            .unwrap();
        assert_eq!(grown.phase, Phase::Burst);
        assert!(grown.s.at <= Duration::from_millis(151_500));
        let end = t.last();
        assert!(end.s.saved_pages() as f64 >= 0.95 * end.max_saved as f64);
    }

    #[test]
    fn guests_added_mid_run_burst_again() {
        let mut acts = boot(0..4, 0.5, GUEST_BLOCKS);
        acts.extend(boot(4..8, 100.0, GUEST_BLOCKS));
        let budget = CpuBudget::default();
        let t = run(8, &acts, PolicyKind::Adaptive, budget, 300.0);
        let fast = run(8, &acts, FAST, budget, 300.0);

        assert_eq!(t.at(99.0).phase, Phase::Steady);
        let first = t.points(100.0, 200.0).find(|p| p.s.vcpus > 4).unwrap();
        let reacted = t
            .points(100.0, 200.0)
            .find(|p| p.phase == Phase::Burst)
            .unwrap();
        assert!(reacted.s.at <= first.s.at + Duration::from_millis(1500));
        let t_adaptive = t.time_to(0.9, 100.0, 300.0).unwrap();
        let t_fast = fast.time_to(0.9, 100.0, 300.0).unwrap();
        let (cpu, cpu_fast) = (t.ksmd_cpu(0.0, 300.0), fast.ksmd_cpu(0.0, 300.0));
        eprintln!(
            "guests added at 100 s: 90% of the new maximum after {t_adaptive:.1} s (fixed 5000/10: {t_fast:.1} s); \
             ksmd CPU {cpu:.1} s vs {cpu_fast:.1} s"
        );
        assert!(t_adaptive <= 1.5 * t_fast + 1.0, "{t_adaptive} vs {t_fast}");
        assert!(cpu <= 0.5 * cpu_fast);
        let end = t.last();
        assert!(end.s.saved_pages() as f64 >= 0.95 * end.max_saved as f64);
        assert_eq!(end.phase, Phase::Steady);
    }

    #[test]
    fn burst_stays_inside_a_small_budget() {
        let acts = boot(0..8, 0.5, GUEST_BLOCKS);
        let budget = CpuBudget {
            burst: 0.3,
            ..CpuBudget::default()
        };
        let t = run(8, &acts, PolicyKind::Adaptive, budget, 60.0);
        let share = t.ksmd_cpu(2.0, 12.0) / 10.0;
        assert!(t.points(2.0, 12.0).all(|p| p.phase == Phase::Burst));
        assert!((0.2..=0.3).contains(&share), "{share}");
    }

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at: Duration::from_millis(at_ms),
            mergeable_pages: 1 << 16,
            ..Sample::default()
        }
    }

    #[test]
    fn kernel_policy_never_touches_the_knobs() {
        let mut p = Policy::new(PolicyKind::Kernel, CpuBudget::default());
        for i in 0..5 {
            assert_eq!(p.decide(&sample(i * 1000)), None);
        }
        assert_eq!(p.phase(), Phase::Host);
    }

    #[test]
    fn off_stops_ksmd_once() {
        let mut p = Policy::new(PolicyKind::Off, CpuBudget::default());
        let knobs = p.decide(&sample(0)).unwrap();
        assert!(!knobs.run);
        assert_eq!(p.decide(&sample(1000)), None);
        assert_eq!(p.phase(), Phase::Off);
    }

    #[test]
    fn fixed_applies_its_knobs_once_and_again_after_invalidate() {
        let mut p = Policy::new(FAST, CpuBudget::default());
        let want = Knobs {
            run: true,
            pages_to_scan: 5000,
            sleep_millisecs: 10,
        };
        assert_eq!(p.decide(&sample(0)), Some(want));
        assert_eq!(p.decide(&sample(1000)), None);
        assert_eq!(p.decide(&sample(2000)), None);
        p.invalidate();
        assert_eq!(p.decide(&sample(3000)), Some(want));
        assert_eq!(p.phase(), Phase::Fixed);
        // Constructed directly, nonsense is clamped to what keeps ksmd scanning.
        let zero = PolicyKind::Fixed {
            pages_to_scan: 0,
            sleep_millisecs: 0,
        };
        let knobs = Policy::new(zero, CpuBudget::default())
            .decide(&sample(0))
            .unwrap();
        assert_eq!((knobs.pages_to_scan, knobs.sleep_millisecs), (1, 1));
    }

    #[test]
    fn adaptive_ignores_stale_samples_and_never_stops_scanning() {
        let mut p = Policy::new(
            PolicyKind::Adaptive,
            CpuBudget {
                burst: f64::NAN,
                converged: -1.0,
                host_cpus: 0,
            },
        );
        let first = p.decide(&sample(1000)).unwrap();
        assert!(first.run && first.pages_to_scan > 0);
        assert_eq!(p.phase(), Phase::Burst);
        assert_eq!(p.decide(&sample(1000)), None);
        assert_eq!(p.decide(&sample(500)), None);
        let idle = p
            .decide(&Sample {
                at: Duration::from_secs(2),
                ..Sample::default()
            })
            .unwrap();
        assert_eq!(p.phase(), Phase::Idle);
        assert!(idle.run && idle.pages_to_scan >= MIN_PAGES);
    }

    #[test]
    fn parses_policies() {
        let ok = [
            ("adaptive", PolicyKind::Adaptive),
            ("kernel", PolicyKind::Kernel),
            ("off", PolicyKind::Off),
            ("fixed:5000:10", FAST),
            (
                "fixed:1:60000",
                PolicyKind::Fixed {
                    pages_to_scan: 1,
                    sleep_millisecs: 60_000,
                },
            ),
        ];
        for (text, kind) in ok {
            assert_eq!(text.parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), text);
        }
        let bad = [
            "",
            "Adaptive",
            "fast",
            "fixed",
            "fixed:",
            "fixed:5000",
            "fixed:0:10",
            "fixed:5000:0",
            "fixed:-1:10",
            "fixed:x:10",
            "fixed:5000:10:1",
            "fixed:100001:10",
            "fixed:100:60001",
            "fixed: 100:10",
        ];
        for text in bad {
            let err = text.parse::<PolicyKind>().unwrap_err().to_string();
            assert!(
                !err.contains('\n') && err.contains("fixed:PAGES:MS"),
                "{text}: {err}"
            );
        }
        assert_eq!(
            "fixed:0:10".parse::<PolicyKind>().unwrap_err().to_string(),
            "invalid KSM policy \"fixed:0:10\": PAGES is out of range; use fixed:PAGES:MS with PAGES 1-100000 and MS 1-60000"
        );
    }

    #[test]
    fn cpu_fractions() {
        let prev = Sample {
            vcpus: 8,
            ..Sample::default()
        };
        let cur = Sample {
            at: Duration::from_secs(2),
            vcpu_cpu: Duration::from_secs(4),
            vcpus: 8,
            ksmd_cpu: Duration::from_millis(500),
            ..Sample::default()
        };
        assert_eq!(ksmd_cpu_fraction(&prev, &cur), 0.25);
        assert_eq!(vcpu_busy_fraction(&prev, &cur, 0), 0.25);
        // Eight vCPUs on two cores using both cores are as busy as they can be.
        assert_eq!(vcpu_busy_fraction(&prev, &cur, 2), 1.0);
        assert_eq!(ksmd_cpu_fraction(&cur, &cur), 0.0);
        assert_eq!(vcpu_busy_fraction(&cur, &prev, 0), 0.0);
    }

    #[test]
    fn fruitless_bursts_get_rarer() {
        // After converging, the guests slowly touch new memory that holds nothing to merge.
        let mut acts = boot(0..8, 0.5, GUEST_BLOCKS / 2);
        for guest in 0..8 {
            let scribble = Work::Scribble {
                from: GUEST_BLOCKS / 2,
                blocks_per_sec: 2.0,
            };
            acts.push(Activity {
                guest,
                start: 60.0,
                secs: 900.0,
                work: scribble,
            });
        }
        let t = run(8, &acts, PolicyKind::Adaptive, CpuBudget::default(), 1860.0);
        let starts: Vec<f64> =
            t.0.windows(2)
                .filter(|w| w[0].phase != Phase::Burst && w[1].phase == Phase::Burst)
                .map(|w| Trace::secs(&w[1]))
                .filter(|&at| at > 60.0)
                .collect();
        let share = t.ksmd_cpu(60.0, 1860.0) / 1800.0;
        eprintln!(
            "unmergeable growth: bursts at {starts:?}; ksmd {:.2}% of a core",
            share * 100.0
        );
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= 30.0));
        let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] > g[0]), "{gaps:?}");
        assert!(share <= 0.03, "{share}");
    }
}
