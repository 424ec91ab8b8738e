//! Human-readable dedup figures: the live status line and the end-of-run summary table.

use std::fmt::Write;

use crate::dedup::merge::Status;

/// One line, refreshed about once a second on a terminal.
pub fn status_line(s: &Status) -> String {
    let mut line = format!(
        "kvmerge: {} VM(s) running | guest RAM {:.0} MiB | resident {:.0} MiB | saved {:.0} MiB | ksmd {:.0}%",
        s.vms_running, s.guest_ram_mib, s.resident_mib, s.saved_mib, s.ksmd_cpu_pct
    );
    if s.ksm_owned {
        let _ = write!(line, " ({})", s.policy_phase);
    }
    line
}

/// The end-of-run table: one row per VM and a total, in MiB. `saved` is what dedup saves now;
/// `reclaimed` counts zero pages reclaimed over the whole run.
pub fn summary_table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>12} {:>9} {:>11}",
        "vm", "dedup", "resident", "ksm", "zero", "unique", "shared-vms", "saved", "reclaimed"
    );
    for vm in &s.vms {
        let _ = writeln!(
            out,
            "{:<8} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>9.1} {:>11.1}",
            vm.name,
            vm.dedup,
            vm.resident_mib,
            vm.ksm_mib,
            vm.zero_mib,
            vm.unique_mib,
            vm.shared_with_other_vms_mib,
            vm.saved_mib,
            vm.zero_reclaimed_mib
        );
    }
    let _ = writeln!(
        out,
        "{:<8} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>9.1} {:>11.1}",
        "total",
        "",
        s.resident_mib,
        s.ksm_mib,
        s.zero_mib,
        s.unique_mib,
        s.shared_with_other_vms_mib,
        s.saved_mib,
        s.zero_reclaimed_mib
    );
    let _ = write!(
        out,
        "saved {:.1} MiB of {:.1} MiB guest RAM now ({:.1} MiB of it zero pages given back; {:.1} MiB reclaimed over the run); ksmd {:.2} CPU-s; zero-page pauses {} (p99 {:.0} us); accounting from {}",
        s.saved_mib,
        s.guest_ram_mib,
        s.zero_unbacked_mib,
        s.zero_reclaimed_mib,
        s.ksmd_cpu_s,
        s.zero_pauses,
        s.zero_pause_p99_us,
        s.accounting
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::merge::VmStatus;

    fn status() -> Status {
        Status {
            vms_running: 2,
            guest_ram_mib: 512.0,
            resident_mib: 300.0,
            saved_mib: 120.5,
            ksmd_cpu_pct: 12.0,
            ksm_owned: true,
            policy_phase: "burst".into(),
            accounting: "pagemap",
            vms: vec![
                VmStatus {
                    name: "vm0".into(),
                    dedup: "full",
                    resident_mib: 150.0,
                    ksm_mib: 60.0,
                    saved_mib: 45.5,
                    ..VmStatus::default()
                },
                VmStatus {
                    name: "vm1".into(),
                    dedup: "zero",
                    resident_mib: 150.0,
                    ..VmStatus::default()
                },
            ],
            ..Status::default()
        }
    }

    #[test]
    fn line_and_table() {
        let s = status();
        let line = status_line(&s);
        assert!(line.contains("2 VM(s) running"), "{line}");
        assert!(
            line.contains("saved 120 MiB") || line.contains("saved 121 MiB"),
            "{line}"
        );
        assert!(line.ends_with("(burst)"), "{line}");
        let table = summary_table(&s);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 5, "{table}");
        assert!(
            rows[1].starts_with("vm0") && rows[1].contains("60.0") && rows[1].contains("45.5"),
            "{table}"
        );
        assert!(rows[2].contains("zero"), "{table}");
        assert!(
            rows[3].starts_with("total") && rows[3].contains("300.0"),
            "{table}"
        );
        assert!(rows[4].contains("accounting from pagemap"), "{table}");
        assert!(
            rows[4].starts_with("saved 120.5 MiB of 512.0 MiB guest RAM now"),
            "{table}"
        );
    }
}
