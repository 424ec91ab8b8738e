//! `kvmerge`: arguments → `Config` → `runner::run` → exit status.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kvmerge::cli::{Cli, Command};
use kvmerge::runner;

/// Exit status for bad usage or bad input, as clap uses for usage errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.verbose);
    // Host KSM knobs kvmerge changed are put back even if some thread panics.
    kvmerge::dedup::ksm::install_panic_hook();
    match cli.command {
        Command::Ksm(args) => ksm_command(args.restore),
        Command::Run(args) => {
            let config = match args.into_config(kvmerge::cli::on_terminal()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("kvmerge: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match runner::run(&config) {
                Ok(report) => {
                    for line in report.vms.iter().filter_map(|vm| vm.failure_line()) {
                        eprintln!("kvmerge: {line}");
                    }
                    if report.timed_out {
                        eprintln!("kvmerge: --timeout expired");
                    }
                    ExitCode::from(report.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("kvmerge: {}", error_chain(&e));
                    ExitCode::from(if e.is_bad_input() { EXIT_USAGE } else { 1 })
                }
            }
        }
    }
}

/// `kvmerge ksm [--restore]`. A journal left by a killed kvmerge is restored first (as root).
fn ksm_command(restore: bool) -> ExitCode {
    use kvmerge::dedup::ksm;
    if restore {
        return match ksm::restore_by_hand() {
            Ok(line) => {
                println!("kvmerge: {line}");
                ExitCode::SUCCESS
            }
            Err(line) => {
                eprintln!("kvmerge: {line}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(line) = ksm::repair_on_start() {
        eprintln!("kvmerge: {line}");
    }
    match ksm::report(&ksm::KsmSysfs::host(), &ksm::RunDir::host()) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvmerge: {}", error_chain(&e));
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
    eprintln!("kvmerge: {text} (try --help)");
    ExitCode::from(EXIT_USAGE)
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
            let _ = writeln!(
                std::io::stderr().lock(),
                "kvmerge: {level}: {}",
                record.args()
            );
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
