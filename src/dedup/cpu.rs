//! How much of the host's CPU sat idle, from the aggregate line of /proc/stat.
//!
//! Zero-page reclaim holds a guest's vCPUs for a fraction of a millisecond of work; on a host with
//! no idle CPU the scheduler can preempt the merge thread inside that window, or leave a kicked
//! vCPU waiting for a CPU, and the hold stretches to several scheduler ticks. The merge thread
//! therefore reclaims only when the host had CPU to spare over the last tick.

use std::fs;

/// Cumulative CPU time of all online CPUs, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Times {
    idle: u64,
    total: u64,
    cpus: u32,
}

/// Parses /proc/stat: the `cpu` line's idle + iowait against the sum of its first eight columns
/// (user, nice, system, idle, iowait, irq, softirq, steal; guest time is already inside user and
/// nice), and the number of `cpuN` lines (online CPUs).
pub(crate) fn parse(text: &str) -> Option<Times> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 5 {
        return None;
    }
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    // Sums that overflow are not /proc/stat: no answer rather than a wrapped or panicking one.
    Some(Times {
        idle: values[3].checked_add(values[4])?,
        total: values.iter().try_fold(0u64, |sum, &v| sum.checked_add(v))?,
        cpus: u32::try_from(cpus).ok().filter(|&n| n > 0)?,
    })
}

/// Idle CPUs (0..=number of CPUs) between two readings; None when no time passed.
pub(crate) fn idle_between(before: Times, after: Times) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    if total == 0 {
        return None;
    }
    Some(idle.min(total) as f64 / total as f64 * f64::from(after.cpus))
}

/// Samples the host's idle CPU time between calls.
#[derive(Default)]
pub struct HostCpu {
    prev: Option<Times>,
}

impl HostCpu {
    pub fn new() -> HostCpu {
        HostCpu::default()
    }

    /// Idle CPUs, on average, since the previous call (e.g. 1.5 on a host with two CPUs that were
    /// busy a quarter of the time). None on the first call or when /proc/stat cannot be read.
    pub fn idle_cpus(&mut self) -> Option<f64> {
        let now = fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse);
        let before = std::mem::replace(&mut self.prev, now);
        idle_between(before?, now?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  635821 6710 198227 1816708 3503 0 1187 1177 10541 0\n\
                        cpu0 319901 3213 96754 908270 590 0 376 566 5280 0\n\
                        cpu1 315920 3496 101473 908438 2913 0 810 610 5260 0\n\
                        intr 1 2 3\nctxt 99\n";

    #[test]
    fn parses_the_aggregate_line() {
        let t = parse(STAT).unwrap();
        assert_eq!(t.cpus, 2);
        assert_eq!(t.idle, 1816708 + 3503);
        assert_eq!(
            t.total,
            635821 + 6710 + 198227 + 1816708 + 3503 + 1187 + 1177
        );
        assert!(parse("intr 1 2\n").is_none());
        assert!(parse("cpu  1 2 x 4 5\ncpu0 1 2 3 4 5\n").is_none());
        assert!(parse("cpu  1 2 3 4 5\n").is_none(), "no per-CPU lines");
        // Found by tests/fuzz (proc_text): column sums that overflow panicked.
        let max = u64::MAX;
        assert!(parse(&format!("cpu  {max} 1 2 3 4\ncpu0 1 2 3 4 5\n")).is_none());
        assert!(parse(&format!("cpu  1 2 3 {max} 4\ncpu0 1 2 3 4 5\n")).is_none());
    }

    #[test]
    fn idle_share_scales_to_cpus() {
        let before = Times {
            idle: 100,
            total: 400,
            cpus: 2,
        };
        // 200 ticks passed, 150 of them idle: 1.5 of 2 CPUs.
        let after = Times {
            idle: 250,
            total: 600,
            cpus: 2,
        };
        assert_eq!(idle_between(before, after), Some(1.5));
        assert_eq!(idle_between(after, after), None);
        // Counters never go backwards; if they do (CPU hot-unplug), there is no answer.
        assert_eq!(idle_between(after, before), None);
    }

    #[test]
    fn reads_this_host() {
        let mut cpu = HostCpu::new();
        assert_eq!(cpu.idle_cpus(), None, "first call has nothing to compare");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let idle = cpu.idle_cpus().expect("/proc/stat moved on in 100 ms");
        let cpus = f64::from(
            parse(&fs::read_to_string("/proc/stat").unwrap())
                .unwrap()
                .cpus,
        );
        assert!((0.0..=cpus).contains(&idle), "{idle} idle of {cpus} CPUs");
    }
}
