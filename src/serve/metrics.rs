//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4) of the server's
//! figures. Memory is in bytes and CPU time in seconds, as Prometheus names want; the figures are
//! the merge thread's latest ([`Status`]), so they are as old as its last accounting.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::dedup::merge::Status;

pub(super) struct Input<'a> {
    pub status: &'a Status,
    /// VMs the server knows, by state.
    pub states: &'a BTreeMap<&'static str, u64>,
    pub created_total: u64,
    pub uptime: Duration,
    /// API connections under way (this one included), and of them `wait` calls.
    pub connections: usize,
    pub waits: usize,
}

const MIB: f64 = 1024.0 * 1024.0;

/// One per-VM figure, in MiB.
type PerVm = fn(&crate::dedup::merge::VmStatus) -> f64;

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

pub(super) fn render(input: &Input) -> String {
    let s = input.status;
    let mut out = Out(String::with_capacity(4096 + 512 * s.vms.len()));
    out.family("kvmerge_vms", "gauge", "VMs the server knows, by state.");
    for (state, n) in input.states {
        out.sample("kvmerge_vms", &[("state", state)], *n as f64);
    }
    out.one(
        "kvmerge_vms_created_total",
        "counter",
        "VMs started since the server started.",
        input.created_total as f64,
    );
    out.one(
        "kvmerge_api_connections",
        "gauge",
        "API connections under way, this one included.",
        input.connections as f64,
    );
    out.one(
        "kvmerge_api_waits",
        "gauge",
        "API wait calls under way.",
        input.waits as f64,
    );
    out.one(
        "kvmerge_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        input.uptime.as_secs_f64(),
    );
    let fleet = [
        (
            "kvmerge_guest_ram_bytes",
            "Guest RAM of the running VMs.",
            s.guest_ram_mib,
        ),
        (
            "kvmerge_resident_bytes",
            "Guest RAM mapped in (touched by the guests).",
            s.resident_mib,
        ),
        (
            "kvmerge_saved_bytes",
            "Host memory deduplication saves now (KSM and zero pages).",
            s.saved_mib,
        ),
        (
            "kvmerge_ksm_bytes",
            "Guest pages backed by a KSM page mapped more than once.",
            s.ksm_mib,
        ),
        (
            "kvmerge_zero_bytes",
            "Guest pages mapped to the shared zero page.",
            s.zero_mib,
        ),
        (
            "kvmerge_unique_bytes",
            "Guest pages that are neither KSM nor zero pages.",
            s.unique_mib,
        ),
        (
            "kvmerge_shared_with_other_vms_bytes",
            "Guest pages whose frame also backs another VM's page.",
            s.shared_with_other_vms_mib,
        ),
        (
            "kvmerge_zero_unbacked_bytes",
            "Reclaimed zero pages still given back.",
            s.zero_unbacked_mib,
        ),
    ];
    for (name, help, mib) in fleet {
        out.one(name, "gauge", help, (mib * MIB).round());
    }
    out.one(
        "kvmerge_zero_reclaimed_bytes_total",
        "counter",
        "Zero pages reclaimed since the server started.",
        (s.zero_reclaimed_mib * MIB).round(),
    );
    out.one(
        "kvmerge_ksmd_cpu_seconds_total",
        "counter",
        "CPU time of the host's ksmd thread.",
        s.ksmd_cpu_s,
    );
    out.one(
        "kvmerge_merge_thread_cpu_seconds_total",
        "counter",
        "CPU time of kvmerge's merge thread.",
        s.merge_thread_cpu_s,
    );
    out.one(
        "kvmerge_ksm_pages_shared",
        "gauge",
        "The host's KSM pages_shared (all processes).",
        s.pages_shared as f64,
    );
    out.one(
        "kvmerge_ksm_pages_sharing",
        "gauge",
        "The host's KSM pages_sharing (all processes).",
        s.pages_sharing as f64,
    );
    out.one(
        "kvmerge_ksm_owned",
        "gauge",
        "1 when this server steers the host's KSM knobs.",
        f64::from(u8::from(s.ksm_owned)),
    );
    let per_vm: [(&str, &str, PerVm); 6] = [
        (
            "kvmerge_vm_resident_bytes",
            "Guest RAM mapped in, per VM.",
            |v| v.resident_mib,
        ),
        (
            "kvmerge_vm_saved_bytes",
            "Host memory deduplication saves, per VM.",
            |v| v.saved_mib,
        ),
        (
            "kvmerge_vm_ksm_bytes",
            "Guest pages backed by shared KSM pages, per VM.",
            |v| v.ksm_mib,
        ),
        (
            "kvmerge_vm_zero_bytes",
            "Guest pages mapped to the zero page, per VM.",
            |v| v.zero_mib,
        ),
        (
            "kvmerge_vm_unique_bytes",
            "Guest pages of its own, per VM.",
            |v| v.unique_mib,
        ),
        (
            "kvmerge_vm_shared_with_other_vms_bytes",
            "Guest pages shared with other VMs, per VM.",
            |v| v.shared_with_other_vms_mib,
        ),
    ];
    for (name, help, get) in per_vm {
        out.family(name, "gauge", help);
        for vm in &s.vms {
            out.sample(
                name,
                &[("vm", &vm.name), ("dedup", vm.dedup)],
                (get(vm) * MIB).round(),
            );
        }
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_family_has_help_and_type_and_vms_are_labelled() {
        let mut status = Status::default();
        status.vms.push(crate::dedup::merge::VmStatus {
            name: "web-1".into(),
            dedup: "full",
            resident_mib: 2.0,
            ..Default::default()
        });
        let states = [("running", 1u64)].into_iter().collect();
        let text = render(&Input {
            status: &status,
            states: &states,
            created_total: 3,
            uptime: Duration::from_secs(1),
            connections: 1,
            waits: 0,
        });
        assert!(text.contains("kvmerge_vms{state=\"running\"} 1\n"));
        assert!(text.contains("kvmerge_vm_resident_bytes{vm=\"web-1\",dedup=\"full\"} 2097152\n"));
        assert!(text.contains("kvmerge_vms_created_total 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }
}
