//! Entry points for the coverage-guided fuzz targets in tests/fuzz (see tests/fuzz/README.md):
//! thin wrappers that make the crate's private parsers reachable from another crate. Not an API.
//! Each function only forwards to the parser it names, so a parser that moves means one path to
//! change here. The other fuzzed parsers are public already (loader, fleet, config, policy,
//! `memory::vma_flags`, `KsmSysfs`).

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::time::Duration;

use crate::dedup::{accounting, cpu, ksm, procfs};

/// /proc/PID/ksm_stat: the figures, and whether a `ksm_merging_pages` line was present.
pub fn ksm_stat(text: &str) -> Result<(procfs::ProcessKsm, bool), String> {
    procfs::parse_ksm_stat(text)
}

/// /proc/PID/stat of a task: whether it is ksmd, and its user + system CPU time at `hz` clock
/// ticks per second (`None` when the sum overflows), as `ksmd_cpu_time` computes it.
pub fn task_stat(text: &str, hz: NonZeroU64) -> Option<(bool, Option<Duration>)> {
    let stat = procfs::parse_task_stat(text)?;
    let time = stat
        .utime
        .checked_add(stat.stime)
        .and_then(|ticks| procfs::ticks_to_duration(ticks, hz.get()));
    Some((stat.is_ksmd(), time))
}

/// The selection of a sysfs multiple-choice knob: `[none] scan-time` -> `none`.
pub fn selected_choice(text: &str) -> &str {
    ksm::sysfs::selected_choice(text)
}

/// Idle CPUs between two /proc/stat readings, as `HostCpu::idle_cpus` computes them; `None`
/// when either does not parse or no time passed.
pub fn idle_cpus(before: &str, after: &str) -> Option<f64> {
    cpu::idle_between(cpu::parse(before)?, cpu::parse(after)?)
}

/// One accounting snapshot of `ranges` from the given files instead of /proc: pagemap entries,
/// and either kpageflags + kpagecount + the zero page's frame (per-page accounting) or smaps
/// text (per-VMA accounting).
pub fn accounting_snapshot(
    pagemap: File,
    smaps: File,
    frames: Option<(File, File, Option<u64>)>,
    ranges: &[accounting::VmRange],
) -> io::Result<accounting::Snapshot> {
    accounting::Accountant::over_files(pagemap, smaps, frames).snapshot(ranges)
}
