//! The command line: clap definitions turned into a plain `Config`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::config::{self, Config, ConsoleMode, DedupMode, VmConfig};
use crate::dedup::policy::PolicyKind;
use crate::fleet;
use crate::seccomp::SeccompMode;

const RUN_EXAMPLES: &str = "\
Examples:
  # Boot one guest and talk to its console (Ctrl-A x quits):
  kvmerge run --kernel bzImage --initrd initramfs.cpio.gz --cmdline 'console=ttyS0'

  # Eight identical guests in one process, consoles prefixed [vm0] .. [vm7]:
  kvmerge run --kernel bzImage --initrd initramfs.cpio.gz --count 8 --memory 256M

  # CI: pass when the guest prints 'TESTS PASSED' and exits 0 within 60 s; keep the logs:
  kvmerge run --kernel bzImage --initrd test.cpio.gz --expect 'TESTS PASSED' \\
              --timeout 60s --console logs/

  # A payload guest (guest-images/out/payload.elf) filling 64 MiB with 16 distinct pages:
  kvmerge run --kernel guest-images/out/payload.elf --cmdline 'fill=64 patterns=16' --count 4

Exit status:
  0    every guest exited with code 0 (debug-exit port 0xf4), reset/powered off cleanly or ran
       until --duration ended it, and matched --expect when given
  1    some guest failed: non-zero exit code, crash, or no --expect match (one line each on stderr)
  1    ... or a guest was stopped to relieve host memory pressure (see --overcommit)
  2    bad usage or bad input, or the fleet does not fit this host (nothing was started)
  124  --timeout expired
  130  interrupted: SIGINT or Ctrl-A x on the console (143 for SIGTERM)
  159  a kvmerge thread made a system call its seccomp filter forbids (--seccomp kill)";

/// kvmerge: boot several lightweight guests in one process on KVM, with built-in memory
/// deduplication across them.
#[derive(Debug, Parser)]
#[command(name = "kvmerge", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one or more guests (identical ones, or the kinds a fleet file lists) and wait for them
    /// to end.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Show the host's kernel same-page merging (KSM) state: knobs, counters, savings, ksmd's CPU
    /// time, whether kvmerge may steer it here, and the settings a killed kvmerge left.
    Ksm(KsmArgs),
    /// Run a long-lived fleet that takes VMs over an HTTP/JSON API on a Unix socket (drive it
    /// with `kvmerge vm`, curl --unix-socket, or any HTTP client). See docs/api.md.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
    /// Talk to a `kvmerge serve`: create, list, pause, resume, stop, remove and wait for VMs.
    #[command(after_help = VM_EXAMPLES)]
    Vm(VmArgs),
}

const SERVE_EXAMPLES: &str = "\
Examples:
  # A server with at most 8 GiB of guest RAM; VMs come and go through the socket:
  kvmerge serve --api-socket /run/kvmerge.sock --memory-limit 8G &
  kvmerge vm --api-socket /run/kvmerge.sock create --kernel bzImage --initrd rootfs.cpio.gz
  curl --unix-socket /run/kvmerge.sock http://localhost/v1/vms

Exit status:
  0    stopped by POST /v1/shutdown (kvmerge vm shutdown)
  1    the server failed while running
  2    bad usage, or the socket is in use by another server or cannot be created
  130  interrupted: SIGINT (143 for SIGTERM, 128+N for signal N); every VM is stopped first
  159  a kvmerge thread made a system call its seccomp filter forbids";

const VM_EXAMPLES: &str = "\
Examples:
  kvmerge vm -s /run/kvmerge.sock create --kernel guest-images/out/payload.elf \\
             --cmdline 'fill=64' --memory 128M --count 4 --name web --ready READY
  kvmerge vm -s /run/kvmerge.sock list
  kvmerge vm -s /run/kvmerge.sock wait web-0      # exit status: the guest's
  kvmerge vm -s /run/kvmerge.sock --json info web-1
  kvmerge vm -s /run/kvmerge.sock rm web-1
  kvmerge vm -s /run/kvmerge.sock shutdown

Exit status: 0 on success; 1 when the server answered with an error or cannot be reached;
2 for bad usage. `wait` exits with the guest's debug-exit code, 0 for a clean end and 1 for any
other failure.";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to serve the API on (created owner-only; removed on exit).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// As for `kvmerge run`: how KSM is steered while the server owns the knobs.
    #[arg(long, value_name = "POLICY", default_value = "adaptive", value_parser = parse_policy)]
    pub ksm_policy: PolicyKind,
    /// As for `kvmerge run`.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Most guest RAM of all VMs together (those not ended yet): a create call beyond it is
    /// refused (409). Without it, only the host's memory (and --overcommit) bounds the fleet.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// As for `kvmerge run`, checked for each create call against the memory available then.
    #[arg(long, value_name = "RATIO", default_value_t = config::DEFAULT_OVERCOMMIT,
          value_parser = parse_ratio)]
    pub overcommit: f64,
}

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The socket of the `kvmerge serve` to talk to.
    #[arg(
        short = 's',
        long,
        value_name = "PATH",
        env = "KVMERGE_API_SOCKET",
        global = true
    )]
    pub api_socket: Option<PathBuf>,
    /// Print the server's JSON answer instead of text for people.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: VmAction,
}

#[derive(Debug, Subcommand)]
pub enum VmAction {
    /// Create and start VMs (the flags of `kvmerge run`); prints their ids.
    Create(Box<CreateArgs>),
    /// List the server's VMs with their state and dedup figures.
    #[command(alias = "ls")]
    List,
    /// Everything about one VM: state, configuration, boot and exit, dedup figures.
    Info { id: String },
    /// Pause a VM (its vCPUs leave the guest until resumed).
    Pause { id: String },
    /// Resume a paused VM.
    Resume { id: String },
    /// Stop a VM (it ends with a clean status); it stays listed until removed.
    Stop { id: String },
    /// Stop a VM if needed, destroy it and forget it.
    #[command(alias = "delete")]
    Rm { id: String },
    /// Wait until a VM ends (or, --ready, until its ready marker appears); exits with its status.
    Wait {
        id: String,
        /// Wait for the VM's ready marker (create --ready) instead of its end.
        #[arg(long)]
        ready: bool,
    },
    /// The server's dedup figures (the JSON object of `kvmerge run --stats`).
    Stats,
    /// The server's Prometheus metrics.
    Metrics,
    /// Stop every VM, restore the host and end the server.
    Shutdown,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Guest kernel: an x86_64 bzImage, an ELF vmlinux, or a kvmerge payload ELF.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `{index}` is replaced by the VM's index on the server.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM per VM: 256M, 1G; a bare number is MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// vCPUs per VM.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=i64::from(config::MAX_VCPUS)))]
    pub vcpus: Option<u8>,
    /// How many identical VMs (named NAME-0, NAME-1, ... with --name).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(fleet::MAX_VMS)))]
    pub count: Option<u32>,
    #[arg(long, value_enum)]
    /// Deduplication: full, zero, off (as for `kvmerge run`).
    pub dedup: Option<DedupMode>,
    /// Trust group: VMs with dedup full must all be in one (see docs/fleet.md).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// The VM's id (default: vmN).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Write the guest console to this file (`{id}` is replaced by the VM's id; needed with
    /// --count). Default: discarded.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// The VM is "booting" until a console line matches this regular expression ("running"
    /// after); `wait --ready` waits for it.
    #[arg(long, value_name = "REGEX")]
    pub ready: Option<String>,
    /// Stop the VM after this long (its end: timed out, a failure).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Wait for the new VMs' ready marker (or their start) before printing their ids.
    #[arg(long)]
    pub wait_ready: bool,
}

#[derive(Debug, Args)]
pub struct KsmArgs {
    /// Put back the host KSM settings journaled by a kvmerge that was killed (SIGKILL, OOM) and
    /// say what was done; exit 1 if they cannot be restored (not root, or a kvmerge still runs).
    #[arg(long)]
    pub restore: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: an x86_64 bzImage, an ELF vmlinux, or a kvmerge payload ELF.
    #[arg(long, value_name = "PATH", required_unless_present = "fleet")]
    pub kernel: Option<PathBuf>,
    /// A fleet file (TOML) describing different kinds of guests; replaces --kernel, --initrd,
    /// --cmdline, --memory, --vcpus, --count and --dedup. See docs/fleet.md.
    #[arg(long, value_name = "FILE",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "count", "dedup"])]
    pub fleet: Option<PathBuf>,
    /// Initial ramdisk handed to the kernel (e.g. a gzip'd cpio archive).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `{index}` is replaced by each guest's index (0, 1, ...).
    #[arg(long, value_name = "STR", default_value = fleet::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM per VM: 256M, 1G, 1.5G; a bare number is MiB.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs per VM.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(config::MAX_VCPUS)))]
    pub vcpus: u8,
    /// Number of identical VMs to boot in this process.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(fleet::MAX_VMS)))]
    pub count: u32,
    /// Deduplication: full (KSM across VMs + zero-page reclaim), zero (zero pages only; no
    /// cross-VM sharing), off.
    #[arg(long, value_enum, default_value_t = DedupMode::Full)]
    pub dedup: DedupMode,
    /// Guest consoles: 'prefix' (stdout, lines tagged [vmK] when several guests run), 'none',
    /// or a directory that receives DIR/vmK.log.
    #[arg(long, value_name = "prefix|none|DIR", default_value = "prefix")]
    pub console: String,
    /// Stop every guest after this long and exit 124 (a failure): 500ms, 30s, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Run the guests for this long, then stop them: a planned end, exit 0 unless a guest failed
    /// before (demos, soak and density runs). Not together with --timeout.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "timeout")]
    pub duration: Option<std::time::Duration>,
    /// A guest passes only if a line of its console matches this regular expression.
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub expect: Option<Regex>,
    /// How kvmerge steers the host's KSM scanning while it owns the knobs (as root): 'adaptive'
    /// (fast while guests boot or idle with new memory, slow once merged, backs off while guests
    /// are busy), 'kernel' (leave the host's settings alone), 'fixed:PAGES:MS' (pages_to_scan and
    /// sleep_millisecs), 'off' (no merging while kvmerge runs). The host's settings are restored
    /// on exit.
    #[arg(long, value_name = "POLICY", default_value = "adaptive", value_parser = parse_policy)]
    pub ksm_policy: PolicyKind,
    /// Append one JSON object of dedup figures per second, and a final one, to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// Print the per-VM dedup summary table on stderr at the end (the default on a terminal).
    #[arg(long)]
    pub summary: bool,
    /// A system call outside a thread's seccomp allowlist: 'kill' (the run stops every guest and
    /// exits 159), 'log' (allowed, logged by the kernel), 'off' (no filters).
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Admit a fleet whose guest RAM (--memory x --count, or the fleet file's sum) is up to
    /// RATIO times the memory available to kvmerge: the host's MemAvailable or, when tighter,
    /// the memory cgroup's limit minus its usage. The default 1 admits only fleets that fit even
    /// if every guest touches all its RAM. Guests touch RAM lazily and dedup merges identical
    /// pages, so a fleet that counts on that may pass e.g. 4; if memory then runs short anyway,
    /// kvmerge stops the guests holding the most unique memory, one line each (see
    /// docs/fleet.md), before the kernel's OOM killer would end every guest at once.
    #[arg(long, value_name = "RATIO", default_value_t = config::DEFAULT_OVERCOMMIT,
          value_parser = parse_ratio)]
    pub overcommit: f64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.1..=config::MAX_OVERCOMMIT).contains(&r) => Ok(r),
        _ => Err(format!(
            "invalid ratio '{s}': give a number from 0.1 to {}",
            config::MAX_OVERCOMMIT
        )),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse::<PolicyKind>().map_err(|e| e.to_string())
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("not a valid regular expression: {e}"))
}

impl ServeArgs {
    pub fn into_config(self) -> crate::serve::ServeConfig {
        crate::serve::ServeConfig {
            socket: self.api_socket,
            ksm_policy: self.ksm_policy,
            seccomp: self.seccomp,
            memory_limit: self.memory_limit,
            overcommit: self.overcommit,
        }
    }
}

impl RunArgs {
    /// The run this command line describes. `terminal` says whether stdin and stdout are a TTY.
    pub fn into_config(self, terminal: bool) -> Result<Config, fleet::Error> {
        let console = match self.console.as_str() {
            "prefix" => ConsoleMode::Prefix,
            "none" => ConsoleMode::None,
            dir => ConsoleMode::Dir(PathBuf::from(dir)),
        };
        if self.console.is_empty() {
            return Err(fleet::Error::Usage(
                config::Error::ConsoleEmpty(self.console).to_string(),
            ));
        }
        let vms = match (&self.fleet, self.kernel) {
            (Some(file), _) => fleet::load(file)?,
            (None, Some(kernel)) => vec![
                VmConfig {
                    kernel,
                    initrd: self.initrd,
                    cmdline: self.cmdline,
                    memory: self.memory,
                    vcpus: self.vcpus,
                    dedup: self.dedup,
                    group: config::DEFAULT_GROUP.to_string(),
                };
                self.count as usize
            ],
            // clap requires one of the two.
            (None, None) => Vec::new(),
        };
        let interactive = terminal && vms.len() == 1 && console == ConsoleMode::Prefix;
        // The status line shares the terminal only when guest consoles do not write to it.
        let status_line = stderr_is_terminal() && console != ConsoleMode::Prefix;
        Ok(Config {
            vms,
            console,
            timeout: self.timeout,
            duration: self.duration,
            expect: self.expect,
            interactive,
            ksm_policy: self.ksm_policy,
            stats: self.stats,
            status_line,
            summary: self.summary || stderr_is_terminal(),
            seccomp: self.seccomp,
            overcommit: self.overcommit,
        })
    }
}

fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether kvmerge talks to a person: stdin and stdout both terminals.
pub fn on_terminal() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kvmerge").chain(args.iter().copied()))
    }

    fn run_config(args: &[&str], terminal: bool) -> Config {
        match parse(args).unwrap().command {
            Command::Run(run) => run.into_config(terminal).unwrap(),
            _ => panic!("not a run"),
        }
    }

    #[test]
    fn defaults() {
        let c = run_config(&["run", "--kernel", "k"], false);
        assert_eq!(c.vms.len(), 1);
        assert_eq!(c.vms[0].memory, 128 << 20);
        assert_eq!(c.vms[0].vcpus, 1);
        assert_eq!(c.vms[0].dedup, DedupMode::Full);
        assert_eq!(c.console, ConsoleMode::Prefix);
        assert!(c.vms[0].cmdline.contains("console=ttyS0"));
        assert!(!c.interactive);
        assert!(c.timeout.is_none() && c.expect.is_none());
        assert_eq!(c.seccomp, SeccompMode::Kill);
        let c = run_config(&["run", "--kernel", "k", "--seccomp", "log"], false);
        assert_eq!(c.seccomp, SeccompMode::Log);
        assert!(parse(&["run", "--kernel", "k", "--seccomp", "maybe"]).is_err());
        assert_eq!(c.overcommit, config::DEFAULT_OVERCOMMIT);
        let c = run_config(&["run", "--kernel", "k", "--overcommit", "2.5"], false);
        assert_eq!(c.overcommit, 2.5);
    }

    #[test]
    fn full_command_line() {
        let c = run_config(
            &[
                "run",
                "--kernel",
                "bz",
                "--initrd",
                "i.cpio",
                "--cmdline",
                "quiet",
                "--memory",
                "1G",
                "--vcpus",
                "2",
                "--count",
                "8",
                "--dedup",
                "zero",
                "--console",
                "/tmp/logs",
                "--timeout",
                "30s",
                "--expect",
                "READY$",
            ],
            true,
        );
        assert_eq!(c.vms.len(), 8);
        assert_eq!(c.vms[7].memory, 1 << 30);
        assert_eq!(c.vms[7].vcpus, 2);
        assert_eq!(c.vms[7].dedup, DedupMode::Zero);
        assert_eq!(c.console, ConsoleMode::Dir("/tmp/logs".into()));
        assert_eq!(c.timeout, Some(std::time::Duration::from_secs(30)));
        assert!(c.expect.unwrap().is_match("GUEST READY"));
        assert_eq!(c.vms[0].initrd, Some(PathBuf::from("i.cpio")));
        assert!(!c.interactive, "eight guests cannot share one terminal");
    }

    #[test]
    fn interactive_only_for_one_guest_on_a_terminal() {
        assert!(run_config(&["run", "--kernel", "k"], true).interactive);
        assert!(!run_config(&["run", "--kernel", "k", "--console", "none"], true).interactive);
        assert!(!run_config(&["run", "--kernel", "k", "--count", "2"], true).interactive);
    }

    #[test]
    fn ksm_subcommand_and_fleet_conflicts() {
        assert!(matches!(
            parse(&["ksm"]).unwrap().command,
            Command::Ksm(KsmArgs { restore: false })
        ));
        assert!(matches!(
            parse(&["ksm", "--restore"]).unwrap().command,
            Command::Ksm(KsmArgs { restore: true })
        ));
        assert!(parse(&["run", "--fleet", "f.toml"]).is_ok());
        assert!(parse(&["run", "--fleet", "f.toml", "--memory", "1G"]).is_err());
        assert!(parse(&["run", "--fleet", "f.toml", "--kernel", "k"]).is_err());
        let c = run_config(
            &["run", "--kernel", "k", "--ksm-policy", "fixed:5000:10"],
            false,
        );
        assert_eq!(
            c.ksm_policy,
            PolicyKind::Fixed {
                pages_to_scan: 5000,
                sleep_millisecs: 10
            }
        );
        assert!(parse(&["run", "--kernel", "k", "--ksm-policy", "fast"]).is_err());
        // Defaults shared with fleet files cannot drift apart.
        let c = run_config(&["run", "--kernel", "k"], false);
        assert_eq!(c.vms[0].memory, fleet::DEFAULT_MEMORY);
        assert_eq!(c.vms[0].cmdline, fleet::DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["run"][..],
            &["run", "--kernel", "k", "--memory", "lots"],
            &["run", "--kernel", "k", "--vcpus", "-1"],
            &["run", "--kernel", "k", "--vcpus", "300"],
            &["run", "--kernel", "k", "--count", "4000000000"],
            &["run", "--kernel", "k", "--dedup", "maybe"],
            &["run", "--kernel", "k", "--timeout", "soon"],
            &["run", "--kernel", "k", "--expect", "("],
            &["run", "--kernel", "k", "--overcommit", "0"],
            &["run", "--kernel", "k", "--overcommit", "lots"],
        ] {
            assert!(parse(args).is_err(), "{args:?} should not parse");
        }
    }
}
