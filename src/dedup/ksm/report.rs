//! `kvmerge ksm`: the host's KSM state, and the journal kvmerge keeps of it.

use crate::config::PAGE_SIZE;
use crate::dedup::ksm::owner::{JournalState, inspect};
use crate::dedup::ksm::{Knob, KsmSysfs, Result, RunDir};
use crate::dedup::procfs::ksmd_cpu_time;

/// The host's KSM state for `kvmerge ksm`: presence, run state, every knob and counter, derived
/// figures, and whether this process may change the knobs.
pub fn report(sysfs: &KsmSysfs, run_dir: &RunDir) -> Result<String> {
    let root = sysfs.root().display();
    let control = match sysfs.writable() {
        Ok(()) => "kvmerge may change the knobs (they are restored on exit)".to_owned(),
        Err(why) => format!("kvmerge will not change the knobs: {why}"),
    };
    if !sysfs.exists() {
        return Ok(format!(
            "KSM: not available (no {root}): kernel built without CONFIG_KSM\nKnob control: {control}\n"
        ));
    }

    let run = sysfs.read_knob(Knob::Run)?;
    let state = match run.as_deref() {
        Some("0") => "stopped",
        Some("1") => "running",
        Some("2") => "stopped, all pages unmerged",
        _ => "unknown",
    };
    let mut lines = vec![
        format!(
            "KSM: {root}: {state} (run={})",
            run.as_deref().unwrap_or("?")
        ),
        format!("Knob control: {control}"),
        "Knobs:".to_owned(),
    ];
    for knob in Knob::ALL {
        let value = sysfs.read_knob(knob)?;
        let value = value.as_deref().unwrap_or("- (not on this kernel)");
        lines.push(format!("  {:<36}{value}", knob.file_name()));
    }

    let c = sysfs.read_counters()?;
    lines.push("Counters:".to_owned());
    let counters: [(&str, String); 11] = [
        ("pages_shared", c.pages_shared.to_string()),
        ("pages_sharing", c.pages_sharing.to_string()),
        ("pages_unshared", c.pages_unshared.to_string()),
        ("pages_volatile", c.pages_volatile.to_string()),
        ("full_scans", c.full_scans.to_string()),
        ("pages_scanned", c.pages_scanned.to_string()),
        ("pages_skipped", c.pages_skipped.to_string()),
        ("ksm_zero_pages", c.ksm_zero_pages.to_string()),
        ("general_profit", format!("{} bytes", c.general_profit)),
        ("stable_node_chains", c.stable_node_chains.to_string()),
        ("stable_node_dups", c.stable_node_dups.to_string()),
    ];
    for (name, value) in counters {
        lines.push(format!("  {name:<36}{value}"));
    }

    let page = PAGE_SIZE;
    let saved_mib = c.saved_pages() as f64 * page as f64 / f64::from(1 << 20);
    let ratio = match c.sharing_ratio() {
        Some(ratio) => format!("{ratio:.2} (pages_sharing / pages_shared)"),
        None => "- (no KSM pages)".to_owned(),
    };
    let ksmd = match ksmd_cpu_time() {
        Some(time) => format!("{:.2} s", time.as_secs_f64()),
        None => "- (ksmd not visible)".to_owned(),
    };
    lines.push("Derived:".to_owned());
    lines.push(format!(
        "  {:<36}{saved_mib:.1} MiB ((pages_sharing + ksm_zero_pages) x {page} bytes)",
        "saved memory"
    ));
    lines.push(format!("  {:<36}{ratio}", "sharing ratio"));
    lines.push(format!("  {:<36}{ksmd}", "ksmd CPU time"));
    lines.push(format!("Journal: {}", journal_line(run_dir)));
    lines.push(String::new());
    Ok(lines.join("\n"))
}

/// What the journal of `run_dir` says, in one line.
fn journal_line(run_dir: &RunDir) -> String {
    let path = run_dir.journal_path();
    match inspect(run_dir) {
        Ok(JournalState::None) => format!(
            "none ({} absent: no kvmerge has changed knobs to restore)",
            path.display()
        ),
        Ok(JournalState::InUse(j)) => format!(
            "{}: kvmerge pid {} steers KSM{}; originals {}",
            path.display(),
            j.pid,
            if j.writer_alive() {
                ""
            } else {
                " (changing hands)"
            },
            j.values()
        ),
        Ok(JournalState::Stale(j)) => format!(
            "STALE {}: left by kvmerge pid {} (killed?), which no longer runs; the knobs were {} \
             before it; `kvmerge ksm --restore` (as root) puts them back",
            path.display(),
            j.pid,
            j.values()
        ),
        Err(e) => format!(
            "cannot read {} ({}): run as root to see it",
            path.display(),
            crate::dedup::ksm::error_chain(&e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::ksm::fixture::Fixture;

    #[test]
    fn report_of_a_fixture_and_of_a_host_without_ksm() {
        let fx = Fixture::new("report");
        let text = report(&fx.sysfs(), &fx.run_dir()).unwrap();
        assert!(text.starts_with("KSM: "), "{text}");
        assert!(text.contains(": stopped (run=0)"), "{text}");
        for knob in Knob::ALL {
            assert!(text.contains(knob.file_name()), "{knob} missing:\n{text}");
        }
        assert!(text.contains("general_profit"));
        assert!(text.contains("-4096 bytes"));
        assert!(
            text.contains("3.00 (pages_sharing / pages_shared)"),
            "{text}"
        );
        let mib = 35.0 * PAGE_SIZE as f64 / f64::from(1 << 20);
        assert!(text.contains(&format!("{mib:.1} MiB")), "{text}");

        fx.remove("merge_across_nodes");
        assert!(
            report(&fx.sysfs(), &fx.run_dir())
                .unwrap()
                .contains("- (not on this kernel)")
        );

        let missing = KsmSysfs::at(std::env::temp_dir().join("kvmerge-ksm-does-not-exist"));
        let text = report(&missing, &RunDir::at("/nonexistent/kvmerge-run")).unwrap();
        assert!(text.starts_with("KSM: not available"), "{text}");
        assert!(text.contains("KSM not built into this kernel"), "{text}");
    }
}
