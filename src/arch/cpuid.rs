//! Per-vCPU CPUID: KVM_GET_SUPPORTED_CPUID describes the host, not this vCPU's place in the
//! guest's topology. Every vCPU is presented as a core of one single-threaded package with
//! `num_vcpus` cores, and its APIC ID is its index. The fix-ups apply to whichever leaves the
//! host reports, with no vendor-specific paths.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use super::{Error, Result};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_CACHE_PARAMS: u32 = 0x8000_001d;

/// CPUID.1:EDX.HTT: EBX[23:16] of leaf 1 is valid.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Level types of leaves 0xb/0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Rewrites the supported CPUID table for vCPU `index` of `num_vcpus`.
///
/// Fails only if the table has no room for the two topology sub-leaves it may need to add.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, num_vcpus: u8) -> Result<()> {
    let apic_id = u32::from(index);
    let cpus = u32::from(num_vcpus.max(1));
    // APIC-ID bits that the cores of the package take: ceil(log2(cpus)).
    let core_bits = cpus.next_power_of_two().trailing_zeros();
    let addressable = 1u32 << core_bits;

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID; EBX[23:16] addressable logical processor IDs in the
                // package, valid when HTT is set.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (addressable.min(0xff) << 16);
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                // Guests enable paravirtual features (kvmclock, PV EOI...) only when they see it.
                entry.ecx |= ECX_HYPERVISOR;
            }
            // Deterministic cache parameters (0x8000_001d is the same layout without the core
            // count): L1/L2 are private to each single-threaded core, L3 is shared by all.
            LEAF_CACHE_PARAMS | LEAF_EXT_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level <= 2 { 0 } else { addressable - 1 };
                // EAX[25:14]: logical processors sharing this cache - 1.
                entry.eax = (entry.eax & !(0xfff << 14)) | (sharing.min(0xfff) << 14);
                if entry.function == LEAF_CACHE_PARAMS {
                    // EAX[31:26]: addressable core IDs in the package - 1.
                    entry.eax = (entry.eax & 0x03ff_ffff) | ((addressable - 1).min(0x3f) << 26);
                }
            }
            // Extended address sizes: where the host reports a core count in ECX (ECX[7:0]
            // cores - 1, ECX[15:12] APIC-ID bits for cores), report ours.
            LEAF_EXT_ADDRESS_SIZES if entry.ecx & 0xf0ff != 0 => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (cpus - 1);
            }
            // Thermal and power management: the guest cannot drive the host's sensors and
            // P-states.
            LEAF_THERMAL_POWER => clear(entry),
            // Architectural PMU: no vPMU is configured, so hide it rather than let the guest
            // program counters that may not exist.
            LEAF_PERFMON => clear(entry),
            _ => {}
        }
    }

    // x2APIC topology, both leaves if present: KVM reports them without topology (all zero),
    // so the SMT and core sub-leaves are rebuilt from scratch.
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if cpuid.as_slice().iter().any(|e| e.function == leaf) {
            cpuid.retain(|e| e.function != leaf);
            let levels = [(0, LEVEL_SMT, 0, 1), (1, LEVEL_CORE, core_bits, cpus)];
            for (sub, kind, shift, count) in levels {
                cpuid
                    .push(kvm_cpuid_entry2 {
                        function: leaf,
                        index: sub,
                        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                        // Bits to shift the x2APIC ID right to get the next level's ID.
                        eax: shift,
                        // Logical processors at this level.
                        ebx: count,
                        ecx: sub | (kind << 8),
                        // x2APIC ID of this vCPU.
                        edx: apic_id,
                        ..Default::default()
                    })
                    .map_err(Error::CpuidFull)?;
            }
            // KVM answers the absent higher sub-leaves with level type 0 (and this EDX), which
            // ends the guest's enumeration.
        }
    }
    Ok(())
}

fn clear(entry: &mut kvm_cpuid_entry2) {
    entry.eax = 0;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn synthetic() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            // Host APIC ID 7, 16 logical CPUs, CLFLUSH size 8.
            entry(
                1,
                0,
                0x000a_0655,
                0x0710_0800,
                0x7ffa_3203,
                0x178b_fbff & !EDX_HTT,
            ),
            // L1d, L2, L3, then the null terminator.
            entry(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            entry(4, 1, 0x1c00_4143, 0x03c0_003f, 0x3ff, 0),
            entry(4, 2, 0x1c03_c163, 0x03c0_003f, 0x3fff, 6),
            entry(4, 3, 0, 0, 0, 0),
            entry(6, 0, 0x77, 0x2, 0x9, 0),
            entry(0xa, 0, 0x0703_0805, 0, 0, 0x603),
            // As KVM reports it: no topology.
            entry(0xb, 0, 0, 0, 0, 7),
            entry(0x1f, 0, 0, 0, 0, 7),
            entry(0x8000_0000, 0, 0x8000_001d, 0, 0, 0),
            // 48/48-bit addresses, 2 cores, 7 APIC-ID bits, PerfTscSize 1.
            entry(0x8000_0008, 0, 0x3030, 0, 0x1_7001, 0),
            entry(0x8000_001d, 0, 0x121, 0x01c0_003f, 0x3f, 0),
            entry(0x8000_001d, 3, 0x4163, 0x03c0_003f, 0x7fff, 1),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_apic_id_count_htt_hypervisor() {
        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 5, 6).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 5);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 8);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.eax, 0x000a_0655);

        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 0, 1).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 16, 1);
        assert_eq!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves() {
        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 3, 5).unwrap();
        for leaf in [0xb, 0x1f] {
            let smt = find(&cpuid, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            let core = find(&cpuid, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 5, 0x201, 3));
            let count = cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == leaf)
                .count();
            assert_eq!(count, 2);
        }
    }

    #[test]
    fn topology_leaves_not_invented() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0, 0, 0, 0, 0)]).unwrap();
        filter_cpuid(&mut cpuid, 1, 2).unwrap();
        assert_eq!(cpuid.as_slice().len(), 1);
    }

    #[test]
    fn cache_sharing() {
        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 0, 3).unwrap();
        let l1 = find(&cpuid, 4, 0);
        assert_eq!(l1.eax, (3 << 26) | 0x121);
        let l3 = find(&cpuid, 4, 2);
        assert_eq!(l3.eax, (3 << 26) | (3 << 14) | 0x163);
        assert_eq!(find(&cpuid, 4, 3).eax, 0);
        // Only EAX changes.
        assert_eq!(find(&cpuid, 4, 2).edx, 6);

        assert_eq!(find(&cpuid, 0x8000_001d, 0).eax, 0x121);
        assert_eq!(find(&cpuid, 0x8000_001d, 3).eax, (3 << 14) | 0x163);
    }

    #[test]
    fn extended_core_count() {
        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 0, 5).unwrap();
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx, 0x1_3004);
        assert_eq!(find(&cpuid, 0x8000_0008, 0).eax, 0x3030);

        // A host that reports no core count there (reserved field) keeps it zero.
        let mut cpuid = CpuId::from_entries(&[entry(0x8000_0008, 0, 0x3030, 0, 0, 0)]).unwrap();
        filter_cpuid(&mut cpuid, 0, 5).unwrap();
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn power_and_pmu_hidden() {
        let mut cpuid = synthetic();
        filter_cpuid(&mut cpuid, 0, 1).unwrap();
        for leaf in [6, 0xa] {
            let e = find(&cpuid, leaf, 0);
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        }
        // Unrelated leaves untouched.
        assert_eq!(find(&cpuid, 0, 0).ebx, 0x756e_6547);
    }

    #[test]
    fn full_table_is_an_error() {
        let mut entries = vec![entry(0xb, 0, 0, 0, 0, 0)];
        entries.extend(
            (0..kvm_bindings::KVM_MAX_CPUID_ENTRIES as u32 - 1)
                .map(|i| entry(0x4000_0100 + i, 0, 0, 0, 0, 0)),
        );
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        assert!(matches!(
            filter_cpuid(&mut cpuid, 0, 1),
            Err(Error::CpuidFull(_))
        ));
    }
}
