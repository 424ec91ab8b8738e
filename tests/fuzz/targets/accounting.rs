//! Memory accounting (`Accountant::snapshot`) over fuzzed /proc files: pagemap entries decoded
//! per page, and either kpageflags/kpagecount (per-page accounting, as root) or smaps text
//! (per-VMA accounting, unprivileged). Checks that the figures stay honest: per VM, merged and
//! zero pages never exceed resident ones, and per page no more pages are resident than the range
//! holds; the fleet's distinct frames never exceed its resident pages.
//!
//! Input: mode (bit 0: frames, bit 1: a zero-page frame follows as u16), 1-4 ranges of (vm,
//! first page u16, pages u8, byte offset into the first page u8), pagemap/kpageflags/kpagecount
//! lengths in 8-byte entries (u16 each) and their bytes; the rest is the smaps text. Pagemap
//! entries start at the lowest range's first page.

use kvmerge::dedup::accounting::{PAGE_SIZE, VmRange};
use kvmerge::fuzzing;
use kvmerge_fuzz::{Fields, memfd, memfd_at};

fn run(data: &[u8]) {
    let mut f = Fields::new(data);
    let mode = f.u8();
    let zero_pfn = (mode & 2 != 0).then(|| u64::from(f.u16()));
    let count = usize::from(f.u8() % 4) + 1;
    let ranges: Vec<VmRange> = (0..count)
        .map(|_| {
            let vm = usize::from(f.u8() % 4);
            let first = u64::from(f.u16());
            let pages = u64::from(f.u8());
            let offset = u64::from(f.u8()) * 16;
            VmRange {
                vm,
                host_start: first * PAGE_SIZE + offset,
                len: (pages * PAGE_SIZE).saturating_sub(offset),
            }
        })
        .collect();
    let pagemap_len = usize::from(f.u16()) * 8;
    let flags_len = usize::from(f.u16()) * 8;
    let counts_len = usize::from(f.u16()) * 8;
    let pagemap = f.bytes(pagemap_len);
    let kpageflags = f.bytes(flags_len);
    let kpagecount = f.bytes(counts_len);
    let smaps = f.rest();

    let lowest = ranges
        .iter()
        .map(|r| r.host_start / PAGE_SIZE)
        .min()
        .unwrap_or(0);
    let highest = ranges
        .iter()
        .map(|r| (r.host_start + r.len).div_ceil(PAGE_SIZE))
        .max()
        .unwrap_or(0);
    let pagemap = memfd_at(pagemap, lowest * 8, highest * 8);
    let frames = (mode & 1 != 0).then(|| (memfd(kpageflags), memfd(kpagecount), zero_pfn));
    let Ok(snapshot) = fuzzing::accounting_snapshot(pagemap, memfd(smaps), frames, &ranges) else {
        return;
    };
    for (usage, range) in snapshot.per_vm.iter().zip(&ranges) {
        assert!(usage.ksm + usage.zero <= usage.resident, "{usage:?}");
        assert!(usage.shared_with_other_vms <= usage.resident, "{usage:?}");
        // Per page, residency is exact. Per VMA it is exact for the kernel's smaps, whose VMAs
        // never overlap; fuzzed smaps text may list a page in two VMAs and count it twice.
        if mode & 1 != 0 {
            assert!(
                usage.resident <= range.len.div_ceil(PAGE_SIZE) + 1,
                "{usage:?}"
            );
        }
    }
    if let Some(distinct) = snapshot.distinct_frames {
        assert!(distinct <= snapshot.total.resident, "{snapshot:?}");
        assert!(snapshot.frames_mapped_elsewhere.unwrap_or(0) <= distinct);
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
