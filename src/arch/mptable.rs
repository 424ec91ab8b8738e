//! The MP table (Intel MultiProcessor Specification 1.4): how an SMP guest without ACPI learns
//! its CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! The floating pointer sits at the start of the BIOS area (0xf0000), where Linux scans for it,
//! and the configuration table follows it; both must fit below 1 MiB, which allows the full
//! 254 vCPUs ([`MAX_VCPUS`]).

use std::mem::{offset_of, size_of};

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, HIMEM_START, IOAPIC_START, MPTABLE_START};
use super::{Error, Result};

const SPEC_REVISION: u8 = 4;
/// Version register of KVM's local APIC (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// Version register of KVM's IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
/// Processor signature: family 6. Informational only; Linux takes the real one from CPUID.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX flags of the processor entry: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_ENABLED: u8 = 1 << 0;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforming to the bus": edge/active high for ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
/// Local interrupt destination: every local APIC.
const ALL_LOCAL_APICS: u8 = 0xff;

const ISA_BUS_ID: u8 = 0;
/// ISA IRQs 0..15. Each goes to the IOAPIC pin of the same number: KVM's default GSI routing
/// (which kvmerge keeps) sends GSI n to pin n, the PIT included. QEMU instead reroutes IRQ 0 to
/// pin 2 and says so in its tables; we have no such override.
const ISA_IRQS: u8 = 16;
/// ExtINT on LINT0 and NMI on LINT1.
const LOCAL_INTERRUPTS: usize = 2;

/// MP floating pointer structure: "_MP_" and where the configuration table is.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    /// In 16-byte units.
    length: u8,
    spec_rev: u8,
    checksum: u8,
    /// 0: a configuration table is present (no default configuration).
    feature1: u8,
    /// Bit 7 clear: no IMCR, the PIC is wired in virtual-wire mode.
    feature2: u8,
    feature3_5: [u8; 3],
}

/// MP configuration table header ("PCMP").
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    /// Header plus base entries, in bytes.
    length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    local_apic: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ProcessorEntry {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    cpu_flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApicEntry {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    address: u32,
}

/// Both I/O interrupt (to an IOAPIC pin) and local interrupt (to a LINT pin) entries.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    entry_type: u8,
    irq_type: u8,
    flags: u16,
    source_bus: u8,
    source_irq: u8,
    dest_apic: u8,
    dest_pin: u8,
}

// SAFETY: each of these is `repr(C, packed)` with only integer and byte-array fields, so it has
// no padding and every bit pattern is a valid value.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

// Sizes fixed by the specification.
const _: () = {
    assert!(size_of::<FloatingPointer>() == 16);
    assert!(size_of::<ConfigHeader>() == 44);
    assert!(size_of::<ProcessorEntry>() == 20);
    assert!(size_of::<BusEntry>() == 8);
    assert!(size_of::<IoApicEntry>() == 8);
    assert!(size_of::<InterruptEntry>() == 8);
};

const AREA_SIZE: usize = (HIMEM_START - MPTABLE_START) as usize;
const FIXED_SIZE: usize = size_of::<FloatingPointer>()
    + size_of::<ConfigHeader>()
    + size_of::<BusEntry>()
    + size_of::<IoApicEntry>()
    + (ISA_IRQS as usize + LOCAL_INTERRUPTS) * size_of::<InterruptEntry>();

/// The most vCPUs the MP table can describe: as many processor entries as fit in the BIOS area
/// next to the fixed entries, and never more than 254 (APIC ID 255 is the broadcast ID, and the
/// IOAPIC takes the ID after the last CPU).
pub const MAX_VCPUS: u8 = {
    let fit = (AREA_SIZE - FIXED_SIZE) / size_of::<ProcessorEntry>();
    if fit > 254 { 254 } else { fit as u8 }
};

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_sub(b))
}

fn push<T: ByteValued>(buf: &mut Vec<u8>, value: T) {
    buf.extend_from_slice(value.as_slice());
}

/// The one check of a VM's vCPU count in the boot layer: what the MP table can describe. Users
/// see the same limit earlier, from `Config::validate` (`config::MAX_VCPUS` is this one).
pub fn check_vcpu_count(num_vcpus: u8) -> Result<()> {
    if num_vcpus == 0 || num_vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount(num_vcpus));
    }
    Ok(())
}

/// The floating pointer followed by the configuration table, as written at [`MPTABLE_START`].
fn mptable_bytes(num_vcpus: u8) -> Result<Vec<u8>> {
    check_vcpu_count(num_vcpus)?;
    let ioapic_id = num_vcpus;

    let mut entries = Vec::new();
    for cpu in 0..num_vcpus {
        let boot = if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        push(
            &mut entries,
            ProcessorEntry {
                entry_type: ENTRY_PROCESSOR,
                apic_id: cpu,
                apic_version: APIC_VERSION,
                cpu_flags: CPU_ENABLED | boot,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                ..Default::default()
            },
        );
    }
    push(
        &mut entries,
        BusEntry {
            entry_type: ENTRY_BUS,
            bus_id: ISA_BUS_ID,
            bus_type: *b"ISA   ",
        },
    );
    push(
        &mut entries,
        IoApicEntry {
            entry_type: ENTRY_IOAPIC,
            apic_id: ioapic_id,
            apic_version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            address: IOAPIC_START as u32,
        },
    );
    for irq in 0..ISA_IRQS {
        push(
            &mut entries,
            InterruptEntry {
                entry_type: ENTRY_IO_INTERRUPT,
                irq_type: INT_TYPE_INT,
                flags: INT_FLAGS_CONFORMING,
                source_bus: ISA_BUS_ID,
                source_irq: irq,
                dest_apic: ioapic_id,
                dest_pin: irq,
            },
        );
    }
    // Virtual-wire mode: the PIC's output reaches the CPUs through LINT0 until the OS switches
    // to the IOAPIC; NMIs arrive on LINT1.
    for (irq_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        push(
            &mut entries,
            InterruptEntry {
                entry_type: ENTRY_LOCAL_INTERRUPT,
                irq_type,
                flags: INT_FLAGS_CONFORMING,
                source_bus: ISA_BUS_ID,
                source_irq: 0,
                dest_apic: ALL_LOCAL_APICS,
                dest_pin: lint,
            },
        );
    }
    let entry_count = u16::from(num_vcpus) + 2 + u16::from(ISA_IRQS) + LOCAL_INTERRUPTS as u16;

    let mut table = Vec::with_capacity(AREA_SIZE);
    push(
        &mut table,
        FloatingPointer {
            signature: *b"_MP_",
            config_table: (MPTABLE_START as usize + size_of::<FloatingPointer>()) as u32,
            length: 1,
            spec_rev: SPEC_REVISION,
            ..Default::default()
        },
    );
    table[offset_of!(FloatingPointer, checksum)] = checksum(&table);

    let config_start = table.len();
    push(
        &mut table,
        ConfigHeader {
            signature: *b"PCMP",
            length: (size_of::<ConfigHeader>() + entries.len()) as u16,
            spec_rev: SPEC_REVISION,
            oem_id: *b"KVMERGE ",
            product_id: *b"KVMERGE     ",
            entry_count,
            local_apic: APIC_START as u32,
            ..Default::default()
        },
    );
    table.extend_from_slice(&entries);
    table[config_start + offset_of!(ConfigHeader, checksum)] = checksum(&table[config_start..]);

    debug_assert!(table.len() <= AREA_SIZE);
    Ok(table)
}

/// Writes the MP table for `num_vcpus` vCPUs (APIC IDs 0..n, 0 being the BSP) at
/// [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap<()>, num_vcpus: u8) -> Result<()> {
    let table = mptable_bytes(num_vcpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|source| Error::WriteMemory {
            what: "MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    /// Parses the table like a guest does: (processor entries as (apic id, flags), entry count).
    fn parse(table: &[u8]) -> (Vec<(u8, u8)>, usize) {
        let fp = FloatingPointer::from_slice(&table[..16]).unwrap();
        assert_eq!(&fp.signature, b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let start = fp.config_table as usize - MPTABLE_START as usize;
        assert_eq!(start, 16);

        let header = ConfigHeader::from_slice(&table[start..start + 44]).unwrap();
        assert_eq!(&header.signature, b"PCMP");
        let end = start + header.length as usize;
        assert_eq!(end, table.len());
        assert_eq!(sum(&table[start..end]), 0);
        assert_eq!({ header.local_apic }, 0xfee0_0000);

        let (mut cpus, mut count, mut at) = (Vec::new(), 0, start + 44);
        while at < end {
            let len = match table[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[at + 1], table[at + 3]));
                    20
                }
                ENTRY_BUS..=ENTRY_LOCAL_INTERRUPT => 8,
                other => panic!("unknown entry type {other}"),
            };
            at += len;
            count += 1;
        }
        assert_eq!(count, header.entry_count as usize);
        (cpus, count)
    }

    #[test]
    fn checksums_and_processors() {
        let table = mptable_bytes(4).unwrap();
        let (cpus, count) = parse(&table);
        assert_eq!(
            cpus,
            vec![
                (0, CPU_ENABLED | CPU_BOOT_PROCESSOR),
                (1, CPU_ENABLED),
                (2, CPU_ENABLED),
                (3, CPU_ENABLED)
            ]
        );
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
    }

    #[test]
    fn ioapic_and_interrupt_entries() {
        let table = mptable_bytes(2).unwrap();
        let entries = 16 + 44 + 2 * 20;
        let bus = BusEntry::from_slice(&table[entries..entries + 8]).unwrap();
        assert_eq!(&bus.bus_type, b"ISA   ");
        let ioapic = IoApicEntry::from_slice(&table[entries + 8..entries + 16]).unwrap();
        assert_eq!((ioapic.apic_id, ioapic.apic_version), (2, 0x11));
        assert_eq!({ ioapic.address }, 0xfec0_0000);
        for irq in 0..16 {
            let at = entries + 16 + irq * 8;
            let e = InterruptEntry::from_slice(&table[at..at + 8]).unwrap();
            assert_eq!(
                (
                    e.entry_type,
                    e.irq_type,
                    e.source_irq,
                    e.dest_apic,
                    e.dest_pin
                ),
                (ENTRY_IO_INTERRUPT, INT_TYPE_INT, irq as u8, 2, irq as u8)
            );
        }
        let at = entries + 16 + 16 * 8;
        let lint0 = InterruptEntry::from_slice(&table[at..at + 8]).unwrap();
        let lint1 = InterruptEntry::from_slice(&table[at + 8..at + 16]).unwrap();
        assert_eq!((lint0.irq_type, lint0.dest_pin), (INT_TYPE_EXTINT, 0));
        assert_eq!((lint1.irq_type, lint1.dest_pin), (INT_TYPE_NMI, 1));
    }

    #[test]
    fn max_vcpus_fit_below_the_legacy_hole() {
        assert_eq!(MAX_VCPUS, 254);
        let table = mptable_bytes(MAX_VCPUS).unwrap();
        assert!(MPTABLE_START + table.len() as u64 <= HIMEM_START);
        let (cpus, _) = parse(&table);
        assert_eq!(cpus.len(), usize::from(MAX_VCPUS));
        assert!(matches!(
            mptable_bytes(MAX_VCPUS + 1),
            Err(Error::VcpuCount(_))
        ));
        assert!(matches!(mptable_bytes(0), Err(Error::VcpuCount(0))));
    }

    #[test]
    fn writes_to_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 1).unwrap();
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&signature, b"_MP_");
        let mut table = vec![0u8; mptable_bytes(1).unwrap().len()];
        mem.read_slice(&mut table, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(parse(&table).0, vec![(0, CPU_ENABLED | CPU_BOOT_PROCESSOR)]);
    }
}
