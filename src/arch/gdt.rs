//! The boot GDT and the 64-bit TSS.
//!
//! Slots: null, null, kernel code (0x10) and data (0x18) as the Linux boot protocol requires
//! (`__BOOT_CS`/`__BOOT_DS`), user code (0x20) and data (0x28) at DPL 3 for payloads, and the
//! 16-byte TSS descriptor (0x30). Both modes load the same table.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_GDT_START, TSS_HEADER_SIZE, TSS_SIZE, TSS_START};
use super::{Error, Result};

/// Slot of the 64-bit kernel code segment (selector 0x10).
pub const KERNEL_CODE: usize = 2;
/// Slot of the kernel data segment (selector 0x18).
pub const KERNEL_DATA: usize = 3;
/// Slot of the 64-bit user code segment (selector 0x23 with RPL 3).
pub const USER_CODE: usize = 4;
/// Slot of the user data segment (selector 0x2b with RPL 3).
pub const USER_DATA: usize = 5;
/// First of the two slots of the TSS descriptor (selector 0x30).
pub const TSS: usize = 6;
/// Number of 8-byte slots, the TSS taking two.
pub const GDT_ENTRIES: usize = 8;

// Access byte: present, DPL, code/data (S) and type. The accessed bit is preset so the CPU never
// needs to write the table when a segment register is reloaded.
const PRESENT: u8 = 1 << 7;
const DPL3: u8 = 3 << 5;
const CODE_DATA: u8 = 1 << 4;
const TYPE_CODE_READ_ACCESSED: u8 = 0xb;
const TYPE_DATA_WRITE_ACCESSED: u8 = 0x3;
// A TR loaded through KVM_SET_SREGS is busy, as after `ltr`; VMX rejects an available one.
const TYPE_TSS64_BUSY: u8 = 0xb;

// Flags nibble: granularity (limit in 4 KiB units), default size (32-bit), long mode.
const FLAG_G: u8 = 1 << 3;
const FLAG_DB: u8 = 1 << 2;
const FLAG_L: u8 = 1 << 1;

/// Encodes a code/data or system segment descriptor (the low 8 bytes for system descriptors).
pub const fn descriptor(access: u8, flags: u8, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags & 0xf) as u64) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Encodes a 16-byte 64-bit TSS descriptor: the low slot, then the upper half of the base.
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    [
        descriptor(PRESENT | TYPE_TSS64_BUSY, 0, base as u32, limit),
        base >> 32,
    ]
}

/// The boot GDT.
pub const fn table() -> [u64; GDT_ENTRIES] {
    const FLAT: u32 = 0xf_ffff;
    let tss = tss_descriptor(TSS_START, (TSS_SIZE - 1) as u32);
    let code = PRESENT | CODE_DATA | TYPE_CODE_READ_ACCESSED;
    let data = PRESENT | CODE_DATA | TYPE_DATA_WRITE_ACCESSED;
    [
        0,
        0,
        descriptor(code, FLAG_G | FLAG_L, 0, FLAT),
        descriptor(data, FLAG_G | FLAG_DB, 0, FLAT),
        descriptor(code | DPL3, FLAG_G | FLAG_L, 0, FLAT),
        descriptor(data | DPL3, FLAG_G | FLAG_DB, 0, FLAT),
        tss[0],
        tss[1],
    ]
}

/// GDTR limit: the table's size minus one.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;

const _: () = assert!(BOOT_GDT_START + (GDT_ENTRIES as u64) * 8 <= TSS_START);

/// The segment register value for GDT slot `index`: the decoded descriptor and a selector whose
/// RPL equals the descriptor's DPL.
pub fn segment(index: usize) -> kvm_segment {
    let table = table();
    let desc = table[index];
    let access = (desc >> 40) as u8;
    let flags = ((desc >> 52) & 0xf) as u8;
    let dpl = (access >> 5) & 3;
    let g = flags & FLAG_G != 0;
    let raw_limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let mut base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
    if index == TSS {
        base |= table[index + 1] << 32;
    }
    kvm_segment {
        base,
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: ((index as u16) << 3) | u16::from(dpl),
        type_: access & 0xf,
        present: access >> 7,
        dpl,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: u8::from(g),
        avl: flags & 1,
        unusable: u8::from(access & PRESENT == 0),
        padding: 0,
    }
}

/// Writes the GDT at [`BOOT_GDT_START`].
pub fn write_gdt(mem: &GuestMemoryMmap<()>) -> Result<()> {
    let bytes: Vec<u8> = table().iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(|source| Error::WriteMemory {
            what: "GDT",
            source,
        })
}

/// Writes the TSS at [`TSS_START`]: all stack pointers zero (the IDT is empty, so no privilege
/// change through it can happen), and an I/O bitmap that lets ring 3 use every port. kvm_pvm
/// ignores RFLAGS.IOPL, so the bitmap is how ring-3 payloads reach their devices.
pub fn write_tss(mem: &GuestMemoryMmap<()>) -> Result<()> {
    let mut tss = vec![0u8; TSS_SIZE as usize];
    // I/O map base at offset 0x66: the bitmap follows the 0x68-byte TSS.
    tss[0x66..0x68].copy_from_slice(&(TSS_HEADER_SIZE as u16).to_le_bytes());
    // The CPU reads two bitmap bytes per access, so the byte after the bitmap must have all bits
    // set for accesses to the last ports to stay bounded.
    tss[TSS_SIZE as usize - 1] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_START))
        .map_err(|source| Error::WriteMemory {
            what: "TSS",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn descriptor_encodings() {
        let gdt = table();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0);
        assert_eq!(gdt[KERNEL_CODE], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[KERNEL_DATA], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[USER_CODE], 0x00af_fb00_0000_ffff);
        assert_eq!(gdt[USER_DATA], 0x00cf_f300_0000_ffff);
        // Base 0x1000, limit 0x2068, present busy 64-bit TSS.
        assert_eq!(gdt[TSS], 0x0000_8b00_1000_2068);
        assert_eq!(gdt[TSS + 1], 0);
        assert_eq!(GDT_LIMIT, 63);
    }

    #[test]
    fn descriptor_splits_base_and_limit() {
        let d = descriptor(0x89, 0x8, 0x1234_5678, 0xa_bcde);
        assert_eq!(d, 0x128a_8934_5678_bcde);
        assert_eq!(tss_descriptor(0x1_2345_6789, 0x67)[1], 0x1);
    }

    #[test]
    fn segments_match_descriptors() {
        let cs = segment(KERNEL_CODE);
        assert_eq!(
            (cs.selector, cs.type_, cs.dpl, cs.l, cs.db),
            (0x10, 0xb, 0, 1, 0)
        );
        assert_eq!(
            (cs.base, cs.limit, cs.g, cs.s, cs.present),
            (0, 0xffff_ffff, 1, 1, 1)
        );

        let ds = segment(KERNEL_DATA);
        assert_eq!(
            (ds.selector, ds.type_, ds.dpl, ds.l, ds.db),
            (0x18, 0x3, 0, 0, 1)
        );

        let ucs = segment(USER_CODE);
        assert_eq!((ucs.selector, ucs.type_, ucs.dpl, ucs.l), (0x23, 0xb, 3, 1));
        let uds = segment(USER_DATA);
        assert_eq!(
            (uds.selector, uds.type_, uds.dpl, uds.db),
            (0x2b, 0x3, 3, 1)
        );

        let tr = segment(TSS);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.dpl), (0x30, 0xb, 0, 0));
        assert_eq!(
            (tr.base, tr.limit, tr.g, tr.present),
            (TSS_START, 0x2068, 0, 1)
        );
        assert_eq!(tr.unusable, 0);
    }

    #[test]
    fn writes_gdt_and_tss() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt(&mem).unwrap();
        write_tss(&mem).unwrap();

        let user_code: u64 = mem
            .read_obj(GuestAddress(BOOT_GDT_START + 8 * USER_CODE as u64))
            .unwrap();
        assert_eq!(user_code, table()[USER_CODE]);

        let iomap_base: u16 = mem.read_obj(GuestAddress(TSS_START + 0x66)).unwrap();
        assert_eq!(iomap_base, 0x68);
        let mut bitmap = vec![0xaau8; 8192];
        mem.read_slice(&mut bitmap, GuestAddress(TSS_START + 0x68))
            .unwrap();
        assert!(bitmap.iter().all(|&b| b == 0));
        let tail: u8 = mem.read_obj(GuestAddress(TSS_START + 0x68 + 8192)).unwrap();
        assert_eq!(tail, 0xff);
    }
}
