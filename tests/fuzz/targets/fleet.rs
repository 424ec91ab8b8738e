//! Fleet files (`--fleet FILE`): `fleet::parse` and then `Config::validate`, as `kvmerge run`
//! does. Every error must be one line.

use std::path::Path;

use kvmerge::config::Config;
use kvmerge::fleet;
use kvmerge_fuzz::assert_one_line;

fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match fleet::parse(text, Path::new("/fleets"), "fuzz.toml") {
        Ok(vms) => {
            assert!(!vms.is_empty(), "a parsed fleet has VMs");
            assert!(vms.len() <= fleet::MAX_VMS as usize);
            for vm in vms.iter().take(4) {
                assert!(vm.kernel.starts_with("/"), "kernel paths are resolved");
                let _ = vm.cmdline_for(3);
            }
            if let Err(e) = Config::new(vms).validate() {
                assert_one_line(&e.to_string());
            }
        }
        Err(e) => assert_one_line(&e.to_string()),
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
