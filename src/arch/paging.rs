//! Identity page tables for the first 4 GiB: PML4 -> PDPT -> 4 page directories of 2 MiB pages.
//!
//! Every level carries the user bit so that ring-3 payloads can run on the same tables as Linux.
//! That is harmless for Linux: it switches to its own page tables long before it creates any
//! user space, and nothing runs at ring 3 on these ones meanwhile.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_COUNT, PDE_START, PDPTE_START, PML4_START};
use super::{Error, Result};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
/// In a page-directory entry: maps a 2 MiB page instead of pointing to a page table.
const PAGE_SIZE_2M: u64 = 1 << 7;

const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
const ENTRIES_PER_TABLE: u64 = 512;
const SIZE_2M: u64 = 2 << 20;

/// Writes the tables and returns the CR3 value that uses them.
pub fn setup_identity_map(mem: &GuestMemoryMmap<()>) -> Result<u64> {
    let write = |addr: u64, entries: &[u64]| {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| Error::WriteMemory {
                what: "page tables",
                source,
            })
    };

    let mut pml4 = vec![0u64; ENTRIES_PER_TABLE as usize];
    pml4[0] = PDPTE_START | TABLE_FLAGS;
    write(PML4_START, &pml4)?;

    let mut pdpt = vec![0u64; ENTRIES_PER_TABLE as usize];
    for (i, entry) in pdpt.iter_mut().take(PDE_COUNT as usize).enumerate() {
        *entry = (PDE_START + i as u64 * 0x1000) | TABLE_FLAGS;
    }
    write(PDPTE_START, &pdpt)?;

    // The directories are contiguous, so page n of the identity map is entry n of the run.
    let pds: Vec<u64> = (0..PDE_COUNT * ENTRIES_PER_TABLE)
        .map(|n| (n * SIZE_2M) | TABLE_FLAGS | PAGE_SIZE_2M)
        .collect();
    write(PDE_START, &pds)?;

    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a user-mode access, checking P, RW and US on the way.
    fn translate(mem: &GuestMemoryMmap<()>, cr3: u64, va: u64) -> Option<u64> {
        const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
        let mut table = cr3 & ADDR_MASK;
        for (level, shift) in [(4, 39), (3, 30), (2, 21)] {
            let index = (va >> shift) & 0x1ff;
            let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).unwrap();
            if entry & TABLE_FLAGS != TABLE_FLAGS {
                return None;
            }
            if level == 2 {
                assert_ne!(entry & PAGE_SIZE_2M, 0);
                return Some((entry & ADDR_MASK & !(SIZE_2M - 1)) | (va & (SIZE_2M - 1)));
            }
            assert_eq!(entry & PAGE_SIZE_2M, 0);
            table = entry & ADDR_MASK;
        }
        unreachable!()
    }

    #[test]
    fn identity_maps_first_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let cr3 = setup_identity_map(&mem).unwrap();
        assert_eq!(cr3, 0x9000);
        for va in [
            0,
            0x7000,
            0x20_1234,
            0x3fff_ffff,
            0x4000_0000,
            0xbfff_f000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
        assert_eq!(translate(&mem, cr3, 0x80_0000_0000), None);
    }

    #[test]
    fn fails_without_memory_for_tables() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(matches!(
            setup_identity_map(&mem),
            Err(Error::WriteMemory { .. })
        ));
    }
}
