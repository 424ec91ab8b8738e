//! The plain description of a run: what `main` builds from the command line and what tests build
//! directly. Nothing here touches the host; `validate` only checks values against each other.

use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

use crate::dedup::policy::PolicyKind;
use crate::seccomp::SeccompMode;

/// Smallest guest RAM kvmerge accepts: the boot structures live below 1 MiB and the kernel above it.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Guest RAM is mapped and registered in whole pages.
pub const PAGE_SIZE: u64 = 4096;
/// Most guest RAM per VM. KVM allocates its per-page metadata for a memory slot up front
/// (reverse maps and large-page tracking, about 0.2% of the slot in kernel memory, plus shadow
/// paging on hosts without EPT/NPT), so a 1 TiB guest already costs gigabytes of kernel memory
/// and seconds before its first instruction; 256 GiB keeps set-up under a second and is far
/// beyond what the lightweight guests kvmerge is made for need.
pub const MAX_MEMORY: u64 = 256 << 30;
/// Longest `--timeout`: a year. Longer values are typos, and timerfd takes no more than
/// `time_t` seconds anyway.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most vCPUs per VM: what the MP table describes (APIC ID 255 is the broadcast ID). The one
/// bound used by the command line, fleet files and `validate`; KVM's own limit is the host's
/// (checked at admission).
pub const MAX_VCPUS: u8 = crate::arch::mptable::MAX_VCPUS;
/// `--overcommit` default: the fleet's whole guest RAM must fit in the memory the host (or the
/// memory cgroup) has available now. Guests touch RAM lazily and dedup saves more, so users who
/// count on that pass a larger ratio; the run-time shedding guard then protects the rest.
pub const DEFAULT_OVERCOMMIT: f64 = 1.0;
/// Largest `--overcommit`: beyond it the admission check would check nothing.
pub const MAX_OVERCOMMIT: f64 = 100.0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("--memory {0}: {1}")]
    Memory(String, &'static str),
    #[error("--count must be at least 1")]
    ZeroCount,
    #[error("--vcpus must be at least 1")]
    ZeroVcpus,
    #[error("--vcpus {0} is more than a VM can have ({MAX_VCPUS}, what the MP table describes)")]
    TooManyVcpus(u8),
    #[error("--timeout {0:?} is longer than a year: give a shorter one, or none")]
    LongTimeout(Duration),
    #[error("--duration {0:?} is longer than a year: give a shorter one, or none")]
    LongDuration(Duration),
    #[error("--duration and --timeout both end the run: give one of them")]
    DurationAndTimeout,
    #[error("--overcommit {0}: give a ratio from 0.1 to {MAX_OVERCOMMIT} (1 = guest RAM must fit)")]
    Overcommit(String),
    #[error("--console '{0}': give 'prefix', 'none' or a directory for the vmK.log files")]
    ConsoleEmpty(String),
    // The user's text is escaped: a message stays one line whatever it holds.
    #[error(
        "invalid size '{}': use a number with an optional K, M, G or T suffix (bare numbers are MiB)",
        .0.escape_debug()
    )]
    BadSize(String),
    #[error(
        "invalid duration '{}': use e.g. 500ms, 30s, 2m (bare numbers are seconds)",
        .0.escape_debug()
    )]
    BadDuration(String),
    #[error("--timeout must be longer than zero")]
    ZeroTimeout,
    #[error("--duration must be longer than zero")]
    ZeroDuration,
    #[error(
        "trust groups '{}' and '{}' both use dedup 'full', but the kernel has one KSM pool per \
         host, so their memory would be merged together; give all but one group dedup 'zero'",
        .0.escape_debug(),
        .1.escape_debug()
    )]
    GroupsShareKsm(String, String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What kvmerge does with a VM's guest RAM for deduplication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupMode {
    /// Kernel same-page merging across VMs plus zero-page reclaim.
    #[default]
    Full,
    /// Zero-page reclaim only: no content shared between VMs (no KSM side channel).
    Zero,
    /// Guest RAM is never marked mergeable.
    Off,
}

/// Where guest consoles go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Lines on stdout, each prefixed with `[vmK] ` when more than one guest runs.
    Prefix,
    /// Console output discarded.
    None,
    /// One file per guest: `DIR/vmK.log`.
    Dir(PathBuf),
}

/// One guest's description.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `{index}` stands for the guest's index in the fleet.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: u8,
    pub dedup: DedupMode,
    /// Trust group: guests that may share memory contents with each other through KSM.
    pub group: String,
}

/// The trust group of guests that name none.
pub const DEFAULT_GROUP: &str = "default";

impl VmConfig {
    /// The command line guest `index` receives.
    pub fn cmdline_for(&self, index: usize) -> String {
        self.cmdline.replace("{index}", &index.to_string())
    }
}

/// A whole run: the guests, in index order, and how they are watched.
#[derive(Clone, Debug)]
pub struct Config {
    pub vms: Vec<VmConfig>,
    pub console: ConsoleMode,
    pub timeout: Option<Duration>,
    /// A planned end: stop every guest after this long, a success (`--duration`).
    pub duration: Option<Duration>,
    pub expect: Option<Regex>,
    /// Forward stdin to the guest's serial port (single guest on a terminal).
    pub interactive: bool,
    /// How kvmerge steers the host's KSM while it owns the knobs.
    pub ksm_policy: PolicyKind,
    /// Append one JSON object of dedup figures per second (and a final one) to this file.
    pub stats: Option<PathBuf>,
    /// Refresh a one-line dedup status on stderr about once a second.
    pub status_line: bool,
    /// Print the per-VM dedup summary table on stderr at the end.
    pub summary: bool,
    /// What a system call outside a kvmerge thread's seccomp allowlist does.
    pub seccomp: SeccompMode,
    /// How much more guest RAM than the host (or memory cgroup) has available the fleet may be
    /// given: 1.0 admits only fleets whose whole guest RAM fits.
    pub overcommit: f64,
}

impl Config {
    /// A run of `vms` with every other setting at its default: consoles on stdout, no timeout,
    /// no `--expect`, adaptive KSM policy, no stats output.
    pub fn new(vms: Vec<VmConfig>) -> Config {
        Config {
            vms,
            console: ConsoleMode::Prefix,
            timeout: None,
            duration: None,
            expect: None,
            interactive: false,
            ksm_policy: PolicyKind::Adaptive,
            stats: None,
            status_line: false,
            summary: false,
            seccomp: SeccompMode::Kill,
            overcommit: DEFAULT_OVERCOMMIT,
        }
    }

    /// Checks values that are wrong whatever the host (the host-dependent checks happen at build time).
    pub fn validate(&self) -> Result<()> {
        if self.vms.is_empty() {
            return Err(Error::ZeroCount);
        }
        for vm in &self.vms {
            validate_memory(vm.memory)?;
            if vm.vcpus == 0 {
                return Err(Error::ZeroVcpus);
            }
            if vm.vcpus > MAX_VCPUS {
                return Err(Error::TooManyVcpus(vm.vcpus));
            }
        }
        match self.timeout {
            Some(Duration::ZERO) => return Err(Error::ZeroTimeout),
            Some(t) if t > MAX_TIMEOUT => return Err(Error::LongTimeout(t)),
            _ => {}
        }
        match self.duration {
            Some(Duration::ZERO) => return Err(Error::ZeroDuration),
            Some(t) if t > MAX_TIMEOUT => return Err(Error::LongDuration(t)),
            Some(_) if self.timeout.is_some() => return Err(Error::DurationAndTimeout),
            _ => {}
        }
        if !(0.1..=MAX_OVERCOMMIT).contains(&self.overcommit) {
            return Err(Error::Overcommit(self.overcommit.to_string()));
        }
        if let ConsoleMode::Dir(dir) = &self.console {
            if dir.as_os_str().is_empty() {
                return Err(Error::ConsoleEmpty(String::new()));
            }
        }
        let mut full = self.vms.iter().filter(|vm| vm.dedup == DedupMode::Full);
        if let Some(first) = full.next() {
            if let Some(other) = full.find(|vm| vm.group != first.group) {
                return Err(Error::GroupsShareKsm(
                    first.group.clone(),
                    other.group.clone(),
                ));
            }
        }
        Ok(())
    }
}

fn validate_memory(bytes: u64) -> Result<()> {
    let shown = format_size(bytes);
    if bytes == 0 {
        return Err(Error::Memory(shown, "guest RAM cannot be empty"));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(Error::Memory(shown, "must be a multiple of 4 KiB"));
    }
    if bytes < MIN_MEMORY {
        return Err(Error::Memory(
            shown,
            "kvmerge needs at least 2 MiB of guest RAM",
        ));
    }
    if bytes > MAX_MEMORY {
        return Err(Error::Memory(
            shown,
            "kvmerge gives a VM at most 256 GiB of guest RAM",
        ));
    }
    Ok(())
}

/// Parses `256M`, `1G`, `4096K`, `1.5G`, `512MiB`; a bare number is MiB, as in QEMU.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().ok_or_else(bad)? {
        'k' | 'K' => (&t[..t.len() - 1], 10),
        'm' | 'M' => (&t[..t.len() - 1], 20),
        'g' | 'G' => (&t[..t.len() - 1], 30),
        't' | 'T' => (&t[..t.len() - 1], 40),
        c if c.is_ascii_digit() => (t, 20),
        _ => return Err(bad()),
    };
    if num.is_empty() || num.starts_with(['+', '-']) {
        return Err(bad());
    }
    let unit = 1u64 << shift;
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(unit).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * unit as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses `500ms`, `30s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || Error::BadDuration(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// `268435456` → `256 MiB`; sizes that are not whole MiB are shown in bytes.
pub fn format_size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB && bytes % MIB == 0 {
        if bytes % (1 << 30) == 0 {
            format!("{} GiB", bytes >> 30)
        } else {
            format!("{} MiB", bytes / MIB)
        }
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(vec![VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: "id={index}".into(),
            memory: 64 << 20,
            vcpus: 1,
            dedup: DedupMode::Full,
            group: DEFAULT_GROUP.into(),
        }])
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in [
            "",
            "M",
            "-1M",
            "12X",
            "1.5.2G",
            "99999999999999999999T",
            "0.3K",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "10 parsecs", "-1s", "1e99h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn bad_values_are_quoted_on_one_line() {
        // Found by tests/fuzz (sizes): a line break in the value split the message.
        let size = parse_size("1\n5G").unwrap_err().to_string();
        assert!(size.starts_with(r"invalid size '1\n5G': "), "{size}");
        let duration = parse_duration("1\r5s").unwrap_err().to_string();
        assert!(
            duration.starts_with(r"invalid duration '1\r5s': "),
            "{duration}"
        );
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "invalid size 'lots': use a number with an optional K, M, G or T suffix (bare numbers are MiB)"
        );
    }

    #[test]
    fn validation() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(config().vms[0].cmdline_for(3), "id=3");
        let mut c = config();
        c.vms.clear();
        assert_eq!(c.validate(), Err(Error::ZeroCount));
        let mut c = config();
        c.vms[0].vcpus = 0;
        assert_eq!(c.validate(), Err(Error::ZeroVcpus));
        for (mem, why) in [
            (0, "guest RAM cannot be empty"),
            ((64 << 20) + 1, "must be a multiple of 4 KiB"),
            (1 << 20, "kvmerge needs at least 2 MiB of guest RAM"),
        ] {
            let mut c = config();
            c.vms[0].memory = mem;
            assert_eq!(c.validate(), Err(Error::Memory(format_size(mem), why)));
        }
        let mut c = config();
        c.timeout = Some(Duration::ZERO);
        assert_eq!(c.validate(), Err(Error::ZeroTimeout));
    }

    #[test]
    fn upper_bounds() {
        let mut c = config();
        c.vms[0].memory = MAX_MEMORY;
        assert_eq!(c.validate(), Ok(()));
        c.vms[0].memory = MAX_MEMORY + PAGE_SIZE;
        assert!(matches!(c.validate(), Err(Error::Memory(_, _))));
        let mut c = config();
        c.vms[0].vcpus = MAX_VCPUS;
        assert_eq!(c.validate(), Ok(()));
        c.vms[0].vcpus = MAX_VCPUS + 1;
        assert_eq!(c.validate(), Err(Error::TooManyVcpus(MAX_VCPUS + 1)));
        let mut c = config();
        c.timeout = Some(MAX_TIMEOUT);
        assert_eq!(c.validate(), Ok(()));
        c.timeout = parse_duration("10000000000000000000s").ok();
        assert!(matches!(c.validate(), Err(Error::LongTimeout(_))));
        let mut c = config();
        c.duration = Some(MAX_TIMEOUT);
        assert_eq!(c.validate(), Ok(()));
        c.duration = Some(MAX_TIMEOUT + Duration::from_secs(1));
        assert!(matches!(c.validate(), Err(Error::LongDuration(_))));
        c.duration = Some(Duration::ZERO);
        assert_eq!(c.validate(), Err(Error::ZeroDuration));
        c.duration = Some(Duration::from_secs(1));
        c.timeout = Some(Duration::from_secs(2));
        assert_eq!(c.validate(), Err(Error::DurationAndTimeout));
        let mut c = config();
        for bad in [0.0, 0.05, 100.5, f64::NAN] {
            c.overcommit = bad;
            assert!(matches!(c.validate(), Err(Error::Overcommit(_))), "{bad}");
        }
        let mut c = config();
        c.console = ConsoleMode::Dir(PathBuf::new());
        assert_eq!(c.validate(), Err(Error::ConsoleEmpty(String::new())));
    }

    #[test]
    fn one_ksm_trust_group_per_host() {
        let mut c = config();
        let mut other = c.vms[0].clone();
        other.group = "tenant-b".into();
        c.vms.push(other.clone());
        assert_eq!(
            c.validate(),
            Err(Error::GroupsShareKsm("default".into(), "tenant-b".into()))
        );
        // Found by tests/fuzz (fleet): a line break in a group name split the message.
        c.vms[1].group = "tenant\nb".into();
        let message = c.validate().unwrap_err().to_string();
        assert!(
            message.starts_with(r"trust groups 'default' and 'tenant\nb' both use"),
            "{message}"
        );
        // The second group without KSM is fine: zero-page reclaim shares nothing across VMs.
        c.vms[1].dedup = DedupMode::Zero;
        assert_eq!(c.validate(), Ok(()));
        c.vms[1].dedup = DedupMode::Off;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(2 << 30), "2 GiB");
        assert_eq!(format_size(4097), "4097 bytes");
    }
}
