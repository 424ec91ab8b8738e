//! Guest-physical memory layout of an x86_64 guest at boot.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB, in RAM that the
//! e820 map reports as usable (Linux reserves the whole low megabyte for itself anyway). The
//! payload protocol (guest-images/payload/PROTOCOL.md) publishes the same addresses.
//!
//! ```text
//! 0x0000_0500  boot GDT
//! 0x0000_1000  64-bit TSS + I/O permission bitmap
//! 0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  initial stack of the Linux BSP (grows down)
//! 0x0000_9000  PML4, PDPT, 4 page directories (up to 0xefff)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer + MP configuration table
//! 0x000a_0000  legacy VGA/ROM hole, reserved in e820
//! 0x0010_0000  high memory: kernel, payload, initrd (top of the first RAM region)
//! 0xc000_0000  MMIO gap: IOAPIC, LAPIC, KVM's private pages, devices
//! 0x1_0000_0000  RAM beyond 3 GiB, if any
//! ```

/// The boot GDT (see `gdt.rs` for its slots).
pub const BOOT_GDT_START: u64 = 0x500;

/// The 64-bit TSS, followed by its I/O permission bitmap.
pub const TSS_START: u64 = 0x1000;
/// Size of the TSS proper: the I/O bitmap starts right after it.
pub const TSS_HEADER_SIZE: u64 = 0x68;
/// One bit per port for all 65536 ports.
pub const TSS_IO_BITMAP_SIZE: u64 = 8192;
/// TSS + I/O bitmap + the trailing 0xFF byte the CPU may read past the last bitmap byte.
pub const TSS_SIZE: u64 = TSS_HEADER_SIZE + TSS_IO_BITMAP_SIZE + 1;

/// Linux `boot_params` ("zero page"); RSI points here at entry in both modes.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial RSP/RBP of the Linux BSP: the top of the page after the zero page, 16-byte aligned.
pub const BOOT_STACK: u64 = 0x8ff0;

/// Page-map level 4 table; this is CR3 at entry.
pub const PML4_START: u64 = 0x9000;
/// The one page-directory-pointer table, covering 512 GiB.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`PDE_COUNT`] consecutive page directories of 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Page directories needed to identity-map the first 4 GiB (1 GiB each).
pub const PDE_COUNT: u64 = 4;

/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Bytes reserved for the command line, NUL included.
pub const CMDLINE_MAX_SIZE: u64 = 0x10000;

/// Extended BIOS data area: the last KiB of conventional memory. Linux scans it for the MP
/// floating pointer, and e820 reports it as reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The system BIOS area (64 KiB below 1 MiB): Linux scans it for the MP floating pointer, and
/// e820 reports it as reserved.
pub const BIOS_AREA_START: u64 = 0xf0000;
/// MP floating pointer, immediately followed by the MP configuration table. The BIOS area rather
/// than the 1 KiB EBDA, so that the table can describe up to 254 vCPUs.
pub const MPTABLE_START: u64 = BIOS_AREA_START;
/// End of conventional memory: VGA memory and option/BIOS ROMs follow up to [`HIMEM_START`].
pub const LEGACY_HOLE_START: u64 = 0xa0000;

/// Start of high memory: the boot protocol's "loaded high" area.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO gap (3 GiB). RAM beyond this size continues at [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Default base of the IOAPIC, as announced in the MP table.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default base of the local APIC, as announced in the MP table.
pub const APIC_START: u64 = 0xfee0_0000;

/// One page KVM uses for the identity page table of real-mode guests on Intel with EPT
/// (`KVM_SET_IDENTITY_MAP_ADDR`). Like [`KVM_TSS_START`] it must not overlap a memslot, so both
/// sit in the MMIO gap, above the LAPIC and below 4 GiB; no device may be mapped there.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// Three pages KVM uses for the real-mode TSS on Intel (`KVM_SET_TSS_ADDR`), right after the
/// identity-map page.
pub const KVM_TSS_START: u64 = KVM_IDENTITY_MAP_START + 0x1000;
/// Size of KVM's TSS area.
pub const KVM_TSS_SIZE: u64 = 0x3000;

// The fixed areas must not overlap (the GDT's own bound is checked in gdt.rs).
const _: () = {
    assert!(TSS_START + TSS_SIZE <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK && BOOT_STACK < PML4_START);
    assert!(PML4_START + 0x1000 == PDPTE_START && PDPTE_START + 0x1000 == PDE_START);
    assert!(PDE_START + PDE_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE <= EBDA_START);
    assert!(EBDA_START < LEGACY_HOLE_START && LEGACY_HOLE_START < HIMEM_START);
    assert!(LEGACY_HOLE_START < BIOS_AREA_START && BIOS_AREA_START < HIMEM_START);
    assert!(APIC_START < KVM_IDENTITY_MAP_START);
    assert!(KVM_TSS_START + KVM_TSS_SIZE <= MMIO_GAP_END);
};
