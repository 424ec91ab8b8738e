//! The command-line value parsers: `--memory` sizes (`config::parse_size`), durations
//! (`config::parse_duration`: `--timeout`), and `--ksm-policy` (`PolicyKind::from_str`), each
//! on the whole input. Errors are one line; a parsed policy prints back as itself.

use kvmerge::config::{self, format_size};
use kvmerge::dedup::policy::PolicyKind;
use kvmerge_fuzz::assert_one_line;

fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse_size(text) {
        Ok(bytes) => {
            let _ = format_size(bytes);
        }
        Err(e) => assert_one_line(&e.to_string()),
    }
    if let Err(e) = config::parse_duration(text) {
        assert_one_line(&e.to_string());
    }
    match text.parse::<PolicyKind>() {
        Ok(policy) => assert_eq!(policy.to_string().parse::<PolicyKind>(), Ok(policy)),
        Err(e) => assert_one_line(&e.to_string()),
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
