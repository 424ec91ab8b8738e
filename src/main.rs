//! `kvmerge`: arguments → `Config` → `runner::run` → exit status.
//!
//! Everything kvmerge itself writes to stderr goes through `output`: it never panics on a failing
//! stderr (`2>/dev/full`, a closed pipe) and never blocks on one that does not read (a stopped
//! terminal) for longer than [`STDERR_FLUSH`] at the end.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kvmerge::cli::{Cli, Command};
use kvmerge::output;
use kvmerge::runner;

/// Exit status for bad usage or bad input, as clap uses for usage errors.
const EXIT_USAGE: u8 = 2;

/// How long kvmerge's last messages may wait for stderr before the process exits anyway.
const STDERR_FLUSH: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let code = run_command();
    output::finish_stderr(STDERR_FLUSH);
    code
}

fn run_command() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    // Host KSM knobs kvmerge changed are put back even if some thread panics; so is a terminal
    // the interactive console made raw (that hook runs first).
    kvmerge::dedup::ksm::install_panic_hook();
    kvmerge::terminal::install_panic_hook();
    // A terminal left raw by a kvmerge that was killed (SIGKILL, OOM) is put back first.
    if let Some(line) = kvmerge::terminal::repair_on_start(libc::STDIN_FILENO) {
        say(&line);
    }
    match cli.command {
        Command::Ksm(args) => ksm_command(args.restore),
        Command::Serve(args) => match kvmerge::serve::serve(&args.into_config()) {
            Ok(ended) => ExitCode::from(ended.exit_code as u8),
            Err(e) => {
                say(&format!("kvmerge: {}", error_chain(&e)));
                ExitCode::from(if e.is_bad_input() { EXIT_USAGE } else { 1 })
            }
        },
        Command::Vm(args) => {
            let outcome = kvmerge::serve::client::run(args);
            if let Err(e) = write_stdout(outcome.stdout.as_bytes()) {
                say(&format!("kvmerge: cannot write to stdout: {e}"));
                return ExitCode::from(1);
            }
            if let Some(line) = &outcome.error {
                say(&format!("kvmerge: {line}"));
            }
            ExitCode::from(outcome.exit_code)
        }
        Command::Run(args) => {
            let config = match args.into_config(kvmerge::cli::on_terminal()) {
                Ok(config) => config,
                Err(e) => {
                    say(&format!("kvmerge: {e}"));
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            // Everything below is written after the run restored host state (KSM knobs, the
            // terminal).
            match runner::run(&config) {
                Ok(report) => {
                    if let Some(status) = &report.dedup {
                        if config.status_line {
                            output::eprintln("");
                        }
                        if config.summary {
                            output::eprintln(&kvmerge::dedup::report::summary_table(status));
                        }
                    }
                    for vm in &report.vms {
                        for line in [vm.failure_line(), vm.dropped_line()].into_iter().flatten() {
                            say(&format!("kvmerge: {line}"));
                        }
                    }
                    if report.timed_out {
                        say("kvmerge: --timeout expired");
                    }
                    ExitCode::from(report.exit_code() as u8)
                }
                Err(e) => {
                    say(&format!("kvmerge: {}", error_chain(&e)));
                    ExitCode::from(if e.is_bad_input() { EXIT_USAGE } else { 1 })
                }
            }
        }
    }
}

/// Writes all of `bytes` to stdout, reporting (never panicking on) an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// `kvmerge ksm [--restore]`. A journal left by a killed kvmerge is restored first (as root).
fn ksm_command(restore: bool) -> ExitCode {
    use kvmerge::dedup::ksm;
    if restore {
        return match ksm::restore_by_hand() {
            Ok(line) => match write_stdout(format!("kvmerge: {line}\n").as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    say(&format!(
                        "kvmerge: {line} (and cannot write to stdout: {e})"
                    ));
                    ExitCode::SUCCESS
                }
            },
            Err(line) => {
                say(&format!("kvmerge: {line}"));
                ExitCode::from(1)
            }
        };
    }
    if let Some(line) = ksm::repair_on_start() {
        say(&format!("kvmerge: {line}"));
    }
    match ksm::report(&ksm::KsmSysfs::host(), &ksm::RunDir::host()) {
        Ok(report) => match write_stdout(report.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say(&format!("kvmerge: cannot write the report: {e}"));
                ExitCode::from(1)
            }
        },
        Err(e) => {
            say(&format!("kvmerge: {}", error_chain(&e)));
            ExitCode::from(1)
        }
    }
}

/// Help and version go to stdout as usual; a usage error becomes one line on stderr, exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(EXIT_USAGE);
    }
    let rendered = e.render().to_string();
    let text: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let text = text.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    say(&format!("kvmerge: {text} (try --help)"));
    ExitCode::from(EXIT_USAGE)
}

/// Writes one message line to stderr: control characters in it (a newline in a file name, say)
/// are shown escaped, so every message stays one line.
fn say(text: &str) {
    output::eprintln(&one_line(text));
}

fn one_line(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

/// `outer: inner: innermost`, skipping causes whose text the outer message already includes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A minimal stderr logger: `-v` info, `-vv` debug, `-vvv` trace; warnings and errors always.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let level = record.level().to_string().to_lowercase();
            say(&format!("kvmerge: {level}: {}", record.args()));
        }
    }

    fn flush(&self) {}
}

fn init_logging(verbose: u8) {
    static LOGGER: StderrLogger = StderrLogger;
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
