//! Per-VM and fleet memory accounting: how much guest RAM is resident, merged by KSM, mapped to
//! the shared zero page, private to one VM, and shared across VMs.
//!
//! An [`Accountant`] picks its [`Source`] once, when it is created:
//!
//! - [`Source::Pagemap`] (needs CAP_SYS_ADMIN): the frame number of every resident guest page from
//!   /proc/self/pagemap, classified with /proc/kpageflags (KSM, zero page) and /proc/kpagecount.
//!   Exact per page, so exact per VM, including cross-VM sharing and the distinct frames the fleet
//!   occupies.
//! - [`Source::Smaps`] (unprivileged): pagemap still shows which pages are present and which are
//!   mapped exclusively, but not their frames. Residency per VM stays exact; KSM and zero-page
//!   figures come per VMA from /proc/self/smaps. When one VMA holds more than one VM (or other
//!   memory), its figures are apportioned and the VMs are flagged in [`Snapshot::estimated`].
//!   Cross-VM sharing and distinct frames cannot be measured without frame numbers.
//!
//! Pages are 4 KiB. A transparent huge page counts as 512 resident pages.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::ops::{AddAssign, Range};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

pub use crate::config::PAGE_SIZE;

/// Pages to MiB, for printing.
pub fn mib(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / (1024.0 * 1024.0)
}

const PAGEMAP: &str = "/proc/self/pagemap";
const SMAPS: &str = "/proc/self/smaps";
const KPAGEFLAGS: &str = "/proc/kpageflags";
const KPAGECOUNT: &str = "/proc/kpagecount";

// /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PFN_MASK: u64 = (1 << 55) - 1;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_FILE: u64 = 1 << 61;
const PM_PRESENT: u64 = 1 << 63;
// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_KSM: u64 = 1 << 21;
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// Pagemap entries per read: 256 KiB of entries describe 128 MiB of guest RAM.
const PAGEMAP_CHUNK: u64 = 32 * 1024;
/// Most frames read from kpageflags/kpagecount at once (256 KiB each).
const KPAGE_RUN_MAX: u64 = 32 * 1024;
/// Frames not backing guest RAM that a read may step over rather than start another read. The
/// kernel spends ~100 ns per frame on these files, about a tenth of a system call.
const KPAGE_GAP: u64 = 16;

/// One VM's guest RAM in this process (`GuestRam::host_range()`).
#[derive(Clone, Copy, Debug)]
pub struct VmRange {
    /// Which VM the range belongs to. Ranges with the same id are one VM: frames they share are
    /// not counted as shared with other VMs.
    pub vm: usize,
    pub host_start: u64,
    pub len: u64,
}

impl VmRange {
    /// Virtual page numbers covered, partial pages included.
    fn pages(&self) -> Range<u64> {
        self.host_start / PAGE_SIZE..self.host_start.saturating_add(self.len).div_ceil(PAGE_SIZE)
    }
}

/// Memory of one VM or of the fleet, in 4 KiB pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Pages mapped in (zero-page mappings included; swapped-out pages are not).
    pub resident: u64,
    /// Resident pages backed by a KSM page that is mapped more than once (here or in another
    /// process): merged pages, the kept copy included. A KSM page left with one mapping (its
    /// sharers wrote to their copies) saves nothing and counts as unique.
    pub ksm: u64,
    /// Resident pages mapped to the shared zero page: read but never written, or merged by KSM
    /// with `use_zero_pages`. They cost the host nothing.
    pub zero: u64,
    /// Resident pages that are neither KSM nor zero pages.
    pub unique: u64,
    /// Resident pages whose frame also backs a page of another VM (KSM merges across VMs; the
    /// zero page is counted in `zero` instead). [`Source::Pagemap`] only; 0 otherwise.
    pub shared_with_other_vms: u64,
}

impl AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.resident += other.resident;
        self.ksm += other.ksm;
        self.zero += other.zero;
        self.unique += other.unique;
        self.shared_with_other_vms += other.shared_with_other_vms;
    }
}

impl Usage {
    /// What is left of `self` without `part` (a VM leaving the fleet).
    pub fn minus(&self, part: &Usage) -> Usage {
        Usage {
            resident: self.resident.saturating_sub(part.resident),
            ksm: self.ksm.saturating_sub(part.ksm),
            zero: self.zero.saturating_sub(part.zero),
            unique: self.unique.saturating_sub(part.unique),
            shared_with_other_vms: self
                .shared_with_other_vms
                .saturating_sub(part.shared_with_other_vms),
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "resident {:.1} MiB (ksm {:.1}, zero {:.1}, unique {:.1}, shared with other VMs {:.1})",
            mib(self.resident),
            mib(self.ksm),
            mib(self.zero),
            mib(self.unique),
            mib(self.shared_with_other_vms)
        )
    }
}

/// Where the figures of a [`Snapshot`] come from (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Per page, from frame numbers: exact.
    Pagemap,
    /// Per VMA, from /proc/self/smaps, with residency per page from pagemap.
    Smaps,
}

/// One accounting pass over the guest RAM of a fleet.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub source: Source,
    /// Indexed like the `ranges` given to [`Accountant::snapshot`].
    pub per_vm: Vec<Usage>,
    pub total: Usage,
    /// Distinct frames backing the resident pages of all ranges, the zero page left out: what the
    /// host actually spends on guest RAM. [`Source::Pagemap`] only.
    pub distinct_frames: Option<u64>,
    /// Of `distinct_frames`, those also mapped outside the ranges (KSM pages merged with another
    /// process, pages shared with a forked child): their cost is shared. [`Source::Pagemap`] only.
    pub frames_mapped_elsewhere: Option<u64>,
    /// Per VM: its `ksm`, `zero` and `unique` were apportioned from a VMA that also held another
    /// VM's (or non-guest) resident memory, so they are estimates; `resident` stays exact. Happens
    /// only with [`Source::Smaps`], when the kernel merged adjacent mappings into one VMA.
    pub estimated: Vec<bool>,
    pub taken_in: Duration,
}

impl Snapshot {
    /// Pages the host does not spend thanks to KSM and the zero page: the fleet's resident pages
    /// minus the frames backing them. [`Source::Pagemap`] only.
    pub fn saved(&self) -> Option<u64> {
        self.distinct_frames
            .map(|frames| self.total.resident.saturating_sub(frames))
    }
}

/// Takes [`Snapshot`]s of guest memory. Keeps its files open and its buffers between snapshots,
/// so that a snapshot every few seconds stays cheap.
pub struct Accountant {
    /// None only if /proc/self/pagemap could not be opened; each snapshot retries.
    pagemap: Option<File>,
    backend: Backend,
    /// Pagemap entries of one read.
    entries: Vec<u8>,
    /// Positions in `ranges`, sorted by address.
    order: Vec<usize>,
}

enum Backend {
    Frames(Frames),
    Smaps(Smaps),
}

impl Default for Accountant {
    fn default() -> Self {
        Accountant::new()
    }
}

impl Accountant {
    /// Uses frame numbers when this process may see them, per-VMA smaps figures otherwise.
    pub fn new() -> Accountant {
        Accountant::open(true)
    }

    fn open(allow_frames: bool) -> Accountant {
        let pagemap = open_proc(PAGEMAP);
        let frames = match &pagemap {
            Ok(pagemap) if allow_frames => Frames::open(pagemap),
            Ok(_) => Err(io::Error::other("not requested")),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        let backend = match frames {
            Ok(frames) => {
                log::debug!("memory accounting: per page, from frame numbers");
                Backend::Frames(frames)
            }
            Err(e) => {
                log::info!(
                    "memory accounting: per VMA from smaps, no cross-VM sharing figures \
                     (frame numbers unavailable: {e})"
                );
                Backend::Smaps(Smaps::default())
            }
        };
        Accountant {
            pagemap: pagemap.ok(),
            backend,
            entries: Vec::new(),
            order: Vec::new(),
        }
    }

    /// An accountant that reads the given files instead of /proc: per page when `frames`
    /// (kpageflags, kpagecount, the zero page's frame) is given, per VMA from `smaps` otherwise.
    /// For the fuzz targets (tests/fuzz, through `crate::fuzzing`).
    pub(crate) fn over_files(
        pagemap: File,
        smaps: File,
        frames: Option<(File, File, Option<u64>)>,
    ) -> Accountant {
        let backend = match frames {
            Some((kpageflags, kpagecount, zero_pfn)) => Backend::Frames(Frames {
                kpageflags,
                kpagecount,
                zero_pfn,
                pairs: Vec::new(),
                flags: Vec::new(),
                counts: Vec::new(),
            }),
            None => Backend::Smaps(Smaps {
                file: Some(smaps),
                ..Smaps::default()
            }),
        };
        Accountant {
            pagemap: Some(pagemap),
            backend,
            entries: Vec::new(),
            order: Vec::new(),
        }
    }

    pub fn source(&self) -> Source {
        match self.backend {
            Backend::Frames(_) => Source::Pagemap,
            Backend::Smaps(_) => Source::Smaps,
        }
    }

    /// Accounts the pages of `ranges`, which must not overlap.
    pub fn snapshot(&mut self, ranges: &[VmRange]) -> io::Result<Snapshot> {
        let started = Instant::now();
        sort_ranges(ranges, &mut self.order)?;
        let pagemap = match &mut self.pagemap {
            Some(pagemap) => &*pagemap,
            slot @ None => slot.insert(open_proc(PAGEMAP)?),
        };
        let mut per_vm = vec![Usage::default(); ranges.len()];
        let mut estimated = vec![false; ranges.len()];
        let fleet = match &mut self.backend {
            Backend::Frames(frames) => {
                Some(frames.account(pagemap, &mut self.entries, ranges, &mut per_vm)?)
            }
            Backend::Smaps(smaps) => {
                let (entries, order) = (&mut self.entries, &self.order);
                smaps.account(pagemap, entries, ranges, order, &mut per_vm, &mut estimated)?;
                None
            }
        };
        let mut total = Usage::default();
        for usage in &mut per_vm {
            usage.unique = usage.resident.saturating_sub(usage.ksm + usage.zero);
            total += *usage;
        }
        Ok(Snapshot {
            source: self.source(),
            per_vm,
            total,
            distinct_frames: fleet.map(|f| f.distinct),
            frames_mapped_elsewhere: fleet.map(|f| f.elsewhere),
            estimated,
            taken_in: started.elapsed(),
        })
    }
}

fn open_proc(path: &str) -> io::Result<File> {
    File::open(path).map_err(|e| io::Error::new(e.kind(), format!("cannot open {path}: {e}")))
}

/// Sorts positions in `ranges` by address into `order` and rejects overlaps, which would count
/// pages twice.
fn sort_ranges(ranges: &[VmRange], order: &mut Vec<usize>) -> io::Result<()> {
    if let Some(r) = ranges
        .iter()
        .find(|r| r.host_start.checked_add(r.len).is_none())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("VM {} range overflows the address space", r.vm),
        ));
    }
    order.clear();
    order.extend(0..ranges.len());
    order.sort_unstable_by_key(|&i| ranges[i].host_start);
    for pair in order.windows(2) {
        let (a, b) = (&ranges[pair[0]], &ranges[pair[1]]);
        if a.pages().end > b.pages().start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("memory ranges of VM {} and VM {} overlap", a.vm, b.vm),
            ));
        }
    }
    Ok(())
}

/// Feeds `f` the pagemap entry of each page in `pages`, reading many entries per system call.
fn for_each_entry(
    pagemap: &File,
    buf: &mut Vec<u8>,
    pages: Range<u64>,
    mut f: impl FnMut(u64),
) -> io::Result<()> {
    let mut next = pages.start;
    while next < pages.end {
        let count = (pages.end - next).min(PAGEMAP_CHUNK);
        let bytes = count as usize * 8;
        if buf.len() < bytes {
            buf.resize(bytes, 0);
        }
        pagemap.read_exact_at(&mut buf[..bytes], next * 8)?;
        buf[..bytes].chunks_exact(8).for_each(|e| f(word(e)));
        next += count;
    }
    Ok(())
}

/// One native-endian 64-bit word, as /proc's page files store them.
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(bytes);
    u64::from_ne_bytes(w)
}

/// Per-page accounting from frame numbers.
struct Frames {
    kpageflags: File,
    kpagecount: File,
    /// Frame of the shared zero page, recognised without a kpageflags lookup.
    zero_pfn: Option<u64>,
    /// One `frame << shift | position in ranges` per resident page that may be mapped more than
    /// once.
    pairs: Vec<u64>,
    flags: Vec<u8>,
    counts: Vec<u8>,
}

#[derive(Clone, Copy)]
struct FleetFrames {
    distinct: u64,
    elsewhere: u64,
}

impl Frames {
    /// Fails unless pagemap shows us frame numbers and the kpage files are readable.
    fn open(pagemap: &File) -> io::Result<Frames> {
        let probe = Probe::run(pagemap)?;
        if !probe.frames_visible {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "pagemap hides frame numbers without CAP_SYS_ADMIN",
            ));
        }
        let mut frames = Frames {
            kpageflags: open_proc(KPAGEFLAGS)?,
            kpagecount: open_proc(KPAGECOUNT)?,
            zero_pfn: None,
            pairs: Vec::new(),
            flags: Vec::new(),
            counts: Vec::new(),
        };
        // Trust the probe only if the kernel agrees: had something populated the page we read
        // (mlockall, say), its frame would be an ordinary page that is now free for reuse.
        if let Some(pfn) = probe.zero_pfn {
            let mut flags = [0; 8];
            frames.kpageflags.read_exact_at(&mut flags, pfn * 8)?;
            if u64::from_ne_bytes(flags) & KPF_ZERO_PAGE != 0 {
                frames.zero_pfn = Some(pfn);
            }
        }
        Ok(frames)
    }

    fn account(
        &mut self,
        pagemap: &File,
        entries: &mut Vec<u8>,
        ranges: &[VmRange],
        per_vm: &mut [Usage],
    ) -> io::Result<FleetFrames> {
        // Low bits of each pair hold the position in `ranges`; the frame goes above them.
        let shift = usize::BITS - (ranges.len().max(2) - 1).leading_zeros();
        let mask = (1u64 << shift) - 1;
        self.pairs.clear();
        let mut fleet = FleetFrames {
            distinct: 0,
            elsewhere: 0,
        };
        let mut all_frames = 0;
        for (pos, range) in ranges.iter().enumerate() {
            let usage = &mut per_vm[pos];
            let (pairs, zero_pfn) = (&mut self.pairs, self.zero_pfn);
            for_each_entry(pagemap, entries, range.pages(), |e| {
                if e & PM_PRESENT == 0 {
                    return;
                }
                usage.resident += 1;
                let pfn = e & PM_PFN_MASK;
                if Some(pfn) == zero_pfn {
                    usage.zero += 1;
                } else if e & (PM_EXCLUSIVE | PM_FILE) == PM_EXCLUSIVE {
                    // A private page mapped exactly once: not the zero page, not shared with
                    // anyone, nothing the kpage files could add. Most pages of an unmerged VM.
                    fleet.distinct += 1;
                } else {
                    all_frames |= pfn;
                    pairs.push(pfn << shift | pos as u64);
                }
            })?;
        }
        if all_frames >> (64 - shift) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame numbers too large to account {} ranges", ranges.len()),
            ));
        }
        // Sorting groups the mappings of each frame together and lets the kpage files be read in
        // a few long runs instead of once per page.
        self.pairs.sort_unstable();

        let pairs = &self.pairs;
        let mut run = 0..0;
        let mut i = 0;
        while i < pairs.len() {
            let pfn = pairs[i] >> shift;
            let mut j = i + 1;
            while j < pairs.len() && pairs[j] >> shift == pfn {
                j += 1;
            }
            if !run.contains(&pfn) {
                run = plan_run(&pairs[i..], shift);
                read_run(&self.kpageflags, &mut self.flags, &run)?;
                read_run(&self.kpagecount, &mut self.counts, &run)?;
            }
            let at = (pfn - run.start) as usize * 8;
            let flags = word(&self.flags[at..at + 8]);
            let mapcount = word(&self.counts[at..at + 8]);
            let group = &pairs[i..j];
            let vm_of = |pair: u64| (pair & mask) as usize;
            if flags & KPF_ZERO_PAGE != 0 {
                // The huge zero page, or the zero page when the probe could not find it.
                group.iter().for_each(|&p| per_vm[vm_of(p)].zero += 1);
            } else {
                fleet.distinct += 1;
                if mapcount > group.len() as u64 {
                    fleet.elsewhere += 1;
                }
                let ksm = u64::from(flags & KPF_KSM != 0 && mapcount > 1);
                let first_vm = ranges[vm_of(group[0])].vm;
                let cross = u64::from(group.iter().any(|&p| ranges[vm_of(p)].vm != first_vm));
                for &p in group {
                    let usage = &mut per_vm[vm_of(p)];
                    usage.ksm += ksm;
                    usage.shared_with_other_vms += cross;
                }
            }
            i = j;
        }
        Ok(fleet)
    }
}

/// The frames to read next, starting at the first of sorted `pairs`: extended over later frames
/// while the gaps are small and the run stays bounded.
fn plan_run(pairs: &[u64], shift: u32) -> Range<u64> {
    let Some(&first) = pairs.first() else {
        return 0..0;
    };
    let start = first >> shift;
    let mut end = start + 1;
    for &pair in &pairs[1..] {
        let pfn = pair >> shift;
        if pfn < end {
            continue;
        }
        if pfn - end > KPAGE_GAP || pfn + 1 - start > KPAGE_RUN_MAX {
            break;
        }
        end = pfn + 1;
    }
    start..end
}

/// Reads the words of frames `run` from a kpage file into `buf`. Frames past the end of the file
/// (beyond the last frame of RAM) read as 0.
fn read_run(file: &File, buf: &mut Vec<u8>, run: &Range<u64>) -> io::Result<()> {
    let bytes = (run.end - run.start) as usize * 8;
    if buf.len() < bytes {
        buf.resize(bytes, 0);
    }
    let buf = &mut buf[..bytes];
    let mut done = 0;
    while done < bytes {
        match file.read_at(&mut buf[done..], run.start * 8 + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// What two pages of our own tell about pagemap: whether it shows frame numbers to this process
/// (a page we wrote has a real frame), and the frame of the shared zero page (a page we only read
/// is mapped to it).
struct Probe {
    frames_visible: bool,
    zero_pfn: Option<u64>,
}

impl Probe {
    fn run(pagemap: &File) -> io::Result<Probe> {
        let len = 2 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let _unmap = Unmap { addr, len };
        let page = addr.cast::<u8>();
        // SAFETY: both pages lie in the mapping above, which `_unmap` keeps until we return.
        // Volatile so that the write and the read really fault the pages in.
        unsafe {
            page.write_volatile(1);
            page.add(PAGE_SIZE as usize).read_volatile();
        }
        let mut entries = [0; 16];
        pagemap.read_exact_at(&mut entries, addr as u64 / PAGE_SIZE * 8)?;
        let (written, read) = (word(&entries[..8]), word(&entries[8..]));
        let frames_visible = written & PM_PRESENT != 0 && written & PM_PFN_MASK != 0;
        let zero_pfn = Some(read & PM_PFN_MASK)
            .filter(|&pfn| frames_visible && read & PM_PRESENT != 0 && pfn != 0);
        Ok(Probe {
            frames_visible,
            zero_pfn,
        })
    }
}

struct Unmap {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: the probe's own mapping; no reference into it outlives the probe.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Per-VMA accounting from /proc/self/smaps, for processes that cannot see frame numbers.
///
/// Exact per VM: resident pages (pagemap's present bit). Per VMA: zero-page mappings, exactly
/// (present in pagemap but left out of smaps `Rss:`, which counts only normal pages), and KSM
/// pages (smaps `KSM:`). Pagemap marks a private page exclusive when it is mapped once; zero-page
/// and merged KSM mappings never are, so a VMA's KSM pages are capped at its non-exclusive pages
/// minus its zero pages, which leaves out lone KSM pages as [`Usage::ksm`] does.
///
/// A VMA with resident pages of one VM only gives that VM its figures exactly. A VMA shared with
/// other VMs or other memory is split by each part's non-exclusive pages, where its zero and KSM
/// pages are; such VMs are flagged estimated.
#[derive(Default)]
struct Smaps {
    /// Kept open and re-read from the start: seq files regenerate on rewind.
    file: Option<File>,
    text: String,
    vmas: Vec<Vma>,
    parts: Vec<Part>,
    warned_no_ksm_field: bool,
}

/// The smaps figures of a VMA that overlaps guest RAM, in pages.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Vma {
    pages: Range<u64>,
    rss: u64,
    /// None on kernels without the `KSM:` field.
    ksm: Option<u64>,
}

/// The part of a VMA that lies in one range (`owner`, a position in `ranges`) or in none.
#[derive(Clone, Debug)]
struct Part {
    owner: Option<usize>,
    pages: Range<u64>,
    present: u64,
    /// Present pages that pagemap does not mark exclusively mapped.
    not_exclusive: u64,
}

impl Smaps {
    fn account(
        &mut self,
        pagemap: &File,
        entries: &mut Vec<u8>,
        ranges: &[VmRange],
        order: &[usize],
        per_vm: &mut [Usage],
        estimated: &mut [bool],
    ) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            slot @ None => slot.insert(open_proc(SMAPS)?),
        };
        file.rewind()?;
        self.text.clear();
        file.read_to_string(&mut self.text)?;
        parse_smaps(&self.text, ranges, order, &mut self.vmas);
        for vma in &self.vmas {
            if vma.ksm.is_none() && !self.warned_no_ksm_field {
                log::warn!("this kernel's smaps has no KSM field: merged pages are counted as 0");
                self.warned_no_ksm_field = true;
            }
            split_vma(&vma.pages, ranges, order, &mut self.parts);
            for part in &mut self.parts {
                let (present, not_exclusive) = (&mut part.present, &mut part.not_exclusive);
                for_each_entry(pagemap, entries, part.pages.clone(), |e| {
                    if e & PM_PRESENT != 0 {
                        *present += 1;
                        *not_exclusive += u64::from(e & PM_EXCLUSIVE == 0);
                    }
                })?;
            }
            attribute(vma, &self.parts, per_vm, estimated);
        }
        Ok(())
    }
}

/// The first position in `order` whose range ends after page `page`.
fn first_ending_after(ranges: &[VmRange], order: &[usize], page: u64) -> usize {
    order.partition_point(|&i| ranges[i].pages().end <= page)
}

/// Collects into `out` the VMAs of `smaps` text that overlap any of `ranges`.
fn parse_smaps(smaps: &str, ranges: &[VmRange], order: &[usize], out: &mut Vec<Vma>) {
    out.clear();
    let mut current = false;
    for line in smaps.lines() {
        if let Some(pages) = vma_header(line) {
            let next = first_ending_after(ranges, order, pages.start);
            current = order
                .get(next)
                .is_some_and(|&i| ranges[i].pages().start < pages.end);
            if current {
                out.push(Vma {
                    pages,
                    rss: 0,
                    ksm: None,
                });
            }
            continue;
        }
        let Some(vma) = out.last_mut().filter(|_| current) else {
            continue;
        };
        // kB to pages by division: `kb * 1024` overflows on absurd values.
        if let Some(kb) = kb_field(line, "Rss:") {
            vma.rss = kb / (PAGE_SIZE / 1024);
        } else if let Some(kb) = kb_field(line, "KSM:") {
            vma.ksm = Some(kb / (PAGE_SIZE / 1024));
        }
    }
}

/// The pages of a VMA from its smaps header line (`start-end perms offset dev inode [name]`).
fn vma_header(line: &str) -> Option<Range<u64>> {
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    Some(start / PAGE_SIZE..end.div_ceil(PAGE_SIZE))
}

/// The value of a `Key:   N kB` line.
fn kb_field(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Cuts a VMA into the parts that lie in each range and the parts in none.
fn split_vma(vma: &Range<u64>, ranges: &[VmRange], order: &[usize], out: &mut Vec<Part>) {
    out.clear();
    let mut push = |owner, pages: Range<u64>| {
        if !pages.is_empty() {
            out.push(Part {
                owner,
                pages,
                present: 0,
                not_exclusive: 0,
            });
        }
    };
    let mut cursor = vma.start;
    for &i in &order[first_ending_after(ranges, order, vma.start)..] {
        let range = ranges[i].pages();
        if range.start >= vma.end {
            break;
        }
        push(None, cursor..range.start.max(cursor));
        let end = range.end.min(vma.end);
        push(Some(i), range.start.max(cursor)..end);
        cursor = end;
    }
    push(None, cursor..vma.end);
}

/// Adds the figures of `vma` to the VMs owning its `parts` (see [`Smaps`]).
fn attribute(vma: &Vma, parts: &[Part], per_vm: &mut [Usage], estimated: &mut [bool]) {
    let present: u64 = parts.iter().map(|p| p.present).sum();
    let not_exclusive: u64 = parts.iter().map(|p| p.not_exclusive).sum();
    // Smaps and pagemap are read one after the other, so pages faulted in between would pass
    // for zero pages; those are never exclusive, which bounds the error.
    let zero = present.saturating_sub(vma.rss).min(not_exclusive);
    let ksm = vma.ksm.unwrap_or(0).min(not_exclusive.saturating_sub(zero));
    let alone = parts.iter().filter(|p| p.present > 0).count() <= 1;
    let mut before = 0;
    for part in parts {
        let upto = before + part.not_exclusive;
        if let Some(vm) = part.owner {
            let usage = &mut per_vm[vm];
            let zero = share(zero, before..upto, not_exclusive).min(part.present);
            usage.resident += part.present;
            usage.zero += zero;
            usage.ksm += share(ksm, before..upto, not_exclusive).min(part.present - zero);
            estimated[vm] |= !alone;
        }
        before = upto;
    }
}

/// The share of `total` for the weights in `span` out of `weights`. Rounding by cumulative weight
/// makes the shares of consecutive spans add up to `total` exactly.
fn share(total: u64, span: Range<u64>, weights: u64) -> u64 {
    if weights == 0 {
        return 0;
    }
    let upto = |w: u64| (u128::from(total) * u128::from(w) / u128::from(weights)) as u64;
    upto(span.end) - upto(span.start)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Anonymous test memory standing in for guest RAM: pages are written, read or left alone.
    pub(crate) struct Mem {
        base: *mut u8,
        pages: usize,
    }

    impl Mem {
        pub(crate) fn map(pages: usize) -> Mem {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            // SAFETY: advises our own mapping: 4 KiB pages, as guest RAM has, whatever THP says.
            let rc = unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            Mem {
                base: addr.cast(),
                pages,
            }
        }

        pub(crate) fn page(&self, page: usize) -> *mut u8 {
            assert!(page < self.pages);
            // SAFETY: `page` is inside the mapping (checked above).
            unsafe { self.base.add(page * PAGE_SIZE as usize) }
        }

        /// Fills a page with content determined by `seed`: equal seeds, equal pages.
        pub(crate) fn write(&self, page: usize, seed: u64) {
            let words = self.page(page).cast::<u64>();
            for i in 0..PAGE_SIZE as usize / 8 {
                let value = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
                // SAFETY: word `i` lies in the page, which is mapped read-write by `self`.
                unsafe { words.add(i).write_volatile(value) };
            }
        }

        /// Reads a never-written page, which maps the shared zero page.
        fn read(&self, page: usize) {
            // SAFETY: the page is mapped readable by `self`.
            unsafe { self.page(page).read_volatile() };
        }

        /// Makes a page inaccessible, so that the pages on each side are separate VMAs.
        fn guard(&self, page: usize) {
            // SAFETY: changes only the protection of one page of our own mapping.
            let rc = unsafe {
                libc::mprotect(self.page(page).cast(), PAGE_SIZE as usize, libc::PROT_NONE)
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }

        fn range(&self, vm: usize, first: usize, pages: usize) -> VmRange {
            assert!(first + pages <= self.pages);
            VmRange {
                vm,
                host_start: self.page(first) as u64,
                len: pages as u64 * PAGE_SIZE,
            }
        }

        /// Offers the pages of `range` to KSM; false where the kernel has no KSM.
        fn mergeable(&self, range: &VmRange) -> bool {
            // SAFETY: advises a range of our own mapping; it does not change its contents.
            let rc = unsafe {
                libc::madvise(
                    range.host_start as *mut libc::c_void,
                    range.len as usize,
                    libc::MADV_MERGEABLE,
                )
            };
            rc == 0
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: our own mapping; nothing refers to it any more.
            unsafe { libc::munmap(self.base.cast(), self.pages * PAGE_SIZE as usize) };
        }
    }

    /// Seeds no other test or process uses, so that KSM finds nothing equal outside the test.
    fn nonce() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        nanos ^ (u64::from(std::process::id()) << 40)
    }

    /// An accountant that reads frame numbers, or None (with the reason printed) where the test
    /// cannot have one.
    fn frames_accountant(test: &str) -> Option<Accountant> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping {test}: needs root to read frame numbers");
            return None;
        }
        let accountant = Accountant::new();
        if accountant.source() != Source::Pagemap {
            eprintln!("skipping {test}: root, but pagemap frame numbers or kpageflags unavailable");
            return None;
        }
        Some(accountant)
    }

    fn usage(resident: u64, ksm: u64, zero: u64, unique: u64, shared: u64) -> Usage {
        Usage {
            resident,
            ksm,
            zero,
            unique,
            shared_with_other_vms: shared,
        }
    }

    /// Two VMs of 64 pages in separate VMAs (guard pages around each): some pages equal across
    /// the VMs, some unique, some only read, the rest untouched.
    struct TwoVms {
        mem: Mem,
        ranges: [VmRange; 2],
    }

    impl TwoVms {
        const PAGES: usize = 64;

        fn new() -> TwoVms {
            let mem = Mem::map(2 * Self::PAGES + 3);
            for guard in [0, Self::PAGES + 1, 2 * Self::PAGES + 2] {
                mem.guard(guard);
            }
            let ranges = [
                mem.range(0, 1, Self::PAGES),
                mem.range(1, Self::PAGES + 2, Self::PAGES),
            ];
            TwoVms { mem, ranges }
        }

        fn fill(&self) {
            let (a, b, seed) = (1, Self::PAGES + 2, nonce());
            for i in 0..10 {
                self.mem.write(a + i, seed + i as u64);
                self.mem.write(b + i, seed + i as u64);
            }
            (10..20).for_each(|i| self.mem.write(a + i, seed + 100 + i as u64));
            (20..30).for_each(|i| self.mem.read(a + i));
            (10..15).for_each(|i| self.mem.write(b + i, seed + 200 + i as u64));
            (15..40).for_each(|i| self.mem.read(b + i));
        }
    }

    #[test]
    fn frames_classify_pages_exactly() {
        let Some(mut accountant) = frames_accountant("frames_classify_pages_exactly") else {
            return;
        };
        let vms = TwoVms::new();
        vms.fill();
        // Another test thread's fork (before its exec) briefly maps every page of this process
        // twice; wait that out against a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut snap = accountant.snapshot(&vms.ranges).unwrap();
        while snap.frames_mapped_elsewhere != Some(0) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            snap = accountant.snapshot(&vms.ranges).unwrap();
        }
        assert_eq!(snap.source, Source::Pagemap);
        // Equal content is not shared without KSM: every written page has its own frame.
        assert_eq!(snap.per_vm[0], usage(30, 0, 10, 20, 0));
        assert_eq!(snap.per_vm[1], usage(40, 0, 25, 15, 0));
        assert_eq!(snap.total, usage(70, 0, 35, 35, 0));
        assert_eq!(snap.distinct_frames, Some(35));
        assert_eq!(snap.frames_mapped_elsewhere, Some(0));
        assert_eq!(snap.saved(), Some(35));
        assert_eq!(snap.estimated, [false, false]);
        // Without the probed zero frame, kpageflags' zero-page bit finds the same pages.
        if let Backend::Frames(frames) = &mut accountant.backend {
            assert!(frames.zero_pfn.is_some(), "the probe finds the zero page");
            frames.zero_pfn = None;
        }
        let again = accountant.snapshot(&vms.ranges).unwrap();
        assert_eq!(again.per_vm, snap.per_vm);
        assert_eq!(again.distinct_frames, Some(35));
    }

    /// A forked child that shares all our pages copy-on-write until it is killed on drop.
    struct Child(libc::pid_t);

    impl Child {
        fn fork() -> Child {
            // SAFETY: the child only calls pause(), which is async-signal-safe, until it is
            // killed; it never returns into the test harness.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                loop {
                    // SAFETY: as above.
                    unsafe { libc::pause() };
                }
            }
            assert!(pid > 0, "fork: {}", io::Error::last_os_error());
            Child(pid)
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            // SAFETY: kills and reaps our own child; no memory is involved.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }

    #[test]
    fn frames_shared_with_a_forked_child_are_mapped_elsewhere() {
        let Some(mut accountant) = frames_accountant("frames_shared_with_a_forked_child") else {
            return;
        };
        let vms = TwoVms::new();
        vms.fill();
        let _child = Child::fork();
        // No page is exclusive now, so every frame is looked up in kpageflags and kpagecount.
        let snap = accountant.snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.per_vm[0], usage(30, 0, 10, 20, 0));
        assert_eq!(snap.per_vm[1], usage(40, 0, 25, 15, 0));
        assert_eq!(snap.distinct_frames, Some(35));
        assert_eq!(snap.frames_mapped_elsewhere, Some(35));
        let snap = Accountant::open(false).snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.per_vm[0], usage(30, 0, 10, 20, 0));
        assert_eq!(snap.per_vm[1], usage(40, 0, 25, 15, 0));
    }

    #[test]
    fn smaps_classify_separate_vmas_exactly() {
        let mut accountant = Accountant::open(false);
        assert_eq!(accountant.source(), Source::Smaps);
        let vms = TwoVms::new();
        vms.fill();
        let snap = accountant.snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.source, Source::Smaps);
        assert_eq!(snap.per_vm[0], usage(30, 0, 10, 20, 0));
        assert_eq!(snap.per_vm[1], usage(40, 0, 25, 15, 0));
        assert_eq!(snap.distinct_frames, None);
        assert_eq!(snap.saved(), None);
        assert_eq!(snap.estimated, [false, false]);
    }

    #[test]
    fn smaps_apportions_a_vma_holding_two_vms() {
        // One mapping, guarded at both ends so that it is one VMA of exactly the two VMs.
        let mem = Mem::map(66);
        mem.guard(0);
        mem.guard(65);
        let ranges = [mem.range(0, 1, 32), mem.range(1, 33, 32)];
        (1..11).for_each(|p| mem.write(p, nonce() + p as u64));
        (11..17).for_each(|p| mem.read(p));
        (33..37).for_each(|p| mem.write(p, nonce() + p as u64));
        let snap = Accountant::open(false).snapshot(&ranges).unwrap();
        // Residency stays exact; the zero pages follow the non-exclusive mappings, all in VM 0.
        assert_eq!(snap.per_vm[0], usage(16, 0, 6, 10, 0));
        assert_eq!(snap.per_vm[1], usage(4, 0, 0, 4, 0));
        assert_eq!(snap.estimated, [true, true]);
        if let Some(mut accountant) = frames_accountant("frames on the same layout") {
            let exact = accountant.snapshot(&ranges).unwrap();
            assert_eq!(exact.per_vm, snap.per_vm);
            assert_eq!(exact.estimated, [false, false]);
        }
    }

    #[test]
    fn reads_span_several_pagemap_chunks() {
        // Touch pages on both sides of a chunk boundary; the rest stays untouched (and free).
        let pages = PAGEMAP_CHUNK as usize + 8;
        let mem = Mem::map(pages + 2);
        mem.guard(0);
        mem.guard(pages + 1);
        let boundary = PAGEMAP_CHUNK as usize;
        (boundary - 2..boundary + 2).for_each(|p| mem.write(p, nonce() + p as u64));
        mem.read(boundary + 3);
        let ranges = [mem.range(0, 1, pages)];
        let want = usage(5, 0, 1, 4, 0);
        let snap = Accountant::open(false).snapshot(&ranges).unwrap();
        assert_eq!(snap.per_vm[0], want);
        if let Some(mut accountant) = frames_accountant("reads_span_several_pagemap_chunks") {
            let snap = accountant.snapshot(&ranges).unwrap();
            assert_eq!(snap.per_vm[0], want);
            assert_eq!(snap.distinct_frames, Some(4));
        }
    }

    #[test]
    fn ranges_must_not_overlap() {
        let range = |vm, host_start| VmRange {
            vm,
            host_start,
            len: 8 * PAGE_SIZE,
        };
        let mut accountant = Accountant::new();
        let err = accountant
            .snapshot(&[range(0, 0x10_0000), range(1, 0x10_7000)])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let overflow = VmRange {
            vm: 0,
            host_start: u64::MAX - 10,
            len: 20,
        };
        assert!(accountant.snapshot(&[overflow]).is_err());
        let empty = accountant.snapshot(&[]).unwrap();
        assert_eq!(empty.total, Usage::default());
        assert!(empty.per_vm.is_empty());
    }

    const SMAPS_FIXTURE: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/kvmerge
Size:                328 kB
Rss:                 200 kB
KSM:                   0 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0000100000 rw-p 00000000 00:00 0      [anon:kvmerge-vm0]
Size:               1024 kB
Rss:                 512 kB
Anonymous:           500 kB
KSM:                  64 kB
VmFlags: rd wr mr mw me ac dd nh mg
7f0000100000-7f0000300000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                 800 kB
KSM:                 400 kB
VmFlags: rd wr mr mw me ac dd nh mg
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                  40 kB
VmFlags: rd wr mr mw me ac
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
Rss:                  16 kB
KSM:                   0 kB
";

    /// The fixture's VMs: vm0 is its own VMA, vm1 and vm2 share one, vm3 is half of a VMA from a
    /// kernel without the KSM field.
    fn fixture_ranges() -> [VmRange; 4] {
        let mib = 1 << 20;
        let range = |vm, start: u64| VmRange {
            vm,
            host_start: 0x7f00_0000_0000 + start,
            len: mib,
        };
        // Out of address order on purpose: positions and addresses differ.
        [
            range(2, 2 * mib),
            range(0, 0),
            range(1, mib),
            range(3, 4 * mib),
        ]
    }

    #[test]
    fn smaps_fixture_parses_the_guest_vmas() {
        let ranges = fixture_ranges();
        let mut order = Vec::new();
        sort_ranges(&ranges, &mut order).unwrap();
        assert_eq!(order, [1, 2, 0, 3]);
        let mut vmas = Vec::new();
        parse_smaps(SMAPS_FIXTURE, &ranges, &order, &mut vmas);
        let page = |addr: u64| addr / PAGE_SIZE;
        assert_eq!(
            vmas,
            [
                Vma {
                    pages: page(0x7f00_0000_0000)..page(0x7f00_0010_0000),
                    rss: 128,
                    ksm: Some(16)
                },
                Vma {
                    pages: page(0x7f00_0010_0000)..page(0x7f00_0030_0000),
                    rss: 200,
                    ksm: Some(100)
                },
                Vma {
                    pages: page(0x7f00_0040_0000)..page(0x7f00_0060_0000),
                    rss: 10,
                    ksm: None
                },
            ]
        );

        let mut parts = Vec::new();
        split_vma(&vmas[1].pages, &ranges, &order, &mut parts);
        let owners: Vec<_> = parts
            .iter()
            .map(|p| (p.owner, p.pages.end - p.pages.start))
            .collect();
        assert_eq!(owners, [(Some(2), 256), (Some(0), 256)]);
        split_vma(&vmas[2].pages, &ranges, &order, &mut parts);
        let owners: Vec<_> = parts
            .iter()
            .map(|p| (p.owner, p.pages.end - p.pages.start))
            .collect();
        assert_eq!(owners, [(Some(3), 256), (None, 256)]);
    }

    #[test]
    fn smaps_sizes_near_the_u64_limit_do_not_overflow() {
        // Found by tests/fuzz (accounting): converting kB to pages multiplied first.
        let ranges = fixture_ranges();
        let mut order = Vec::new();
        sort_ranges(&ranges, &mut order).unwrap();
        let text = "7f0000000000-7f0000100000 rw-p 00000000 00:00 0\n\
                    Rss: 18446744073709551615 kB\nKSM: 18014398509481984 kB\n";
        let mut vmas = Vec::new();
        parse_smaps(text, &ranges, &order, &mut vmas);
        assert_eq!(vmas[0].rss, u64::MAX / 4);
        assert_eq!(vmas[0].ksm, Some(1 << 52));
    }

    fn part(owner: Option<usize>, present: u64, not_exclusive: u64) -> Part {
        Part {
            owner,
            pages: 0..0,
            present,
            not_exclusive,
        }
    }

    #[test]
    fn a_vma_of_one_vm_is_attributed_exactly() {
        let vma = Vma {
            pages: 0..256,
            rss: 128,
            ksm: Some(16),
        };
        let (mut per_vm, mut estimated) = (vec![Usage::default(); 2], vec![false; 2]);
        // 140 present, 12 of them zero-page mappings (present but not in Rss); an untouched
        // neighbour does not make the figures estimates.
        attribute(
            &vma,
            &[part(Some(1), 140, 30), part(None, 0, 0)],
            &mut per_vm,
            &mut estimated,
        );
        assert_eq!(per_vm[1], usage(140, 16, 12, 0, 0));
        assert_eq!(per_vm[0], Usage::default());
        assert_eq!(estimated, [false, false]);
        // Only 20 - 12 = 8 pages are mapped more than once besides the zero pages: the other 8
        // KSM pages are lone copies that save nothing.
        let mut per_vm = vec![Usage::default(); 1];
        attribute(&vma, &[part(Some(0), 140, 20)], &mut per_vm, &mut estimated);
        assert_eq!((per_vm[0].zero, per_vm[0].ksm), (12, 8));
    }

    #[test]
    fn a_shared_vma_is_apportioned_by_non_exclusive_pages() {
        let vma = Vma {
            pages: 0..768,
            rss: 200,
            ksm: Some(100),
        };
        let (mut per_vm, mut estimated) = (vec![Usage::default(); 3], vec![false; 3]);
        // 230 present, 30 of them zero pages; the non-exclusive pages split 5:3:2.
        let parts = [
            part(Some(2), 100, 65),
            part(Some(0), 90, 39),
            part(None, 40, 26),
        ];
        attribute(&vma, &parts, &mut per_vm, &mut estimated);
        assert_eq!(per_vm[2].resident, 100);
        assert_eq!(per_vm[0].resident, 90);
        assert_eq!((per_vm[2].zero, per_vm[2].ksm), (15, 50));
        assert_eq!((per_vm[0].zero, per_vm[0].ksm), (9, 30));
        assert_eq!(estimated, [true, false, true]);
        assert_eq!(per_vm[1], Usage::default());
    }

    #[test]
    fn shares_add_up() {
        let weights = [3u64, 0, 7, 1, 5];
        let sum: u64 = weights.iter().sum();
        for total in [0, 1, 7, 16, 1000] {
            let mut before = 0;
            let mut given = 0;
            for w in weights {
                let s = share(total, before..before + w, sum);
                assert!(s.abs_diff(total * w / sum) <= 1);
                given += s;
                before += w;
            }
            assert_eq!(given, total);
        }
        assert_eq!(share(10, 0..0, 0), 0);
    }

    #[test]
    fn kpage_runs_step_over_small_gaps_only() {
        let shift = 4;
        // A gap of KPAGE_GAP frames is read through, one more starts a new run.
        let far = 21 + KPAGE_GAP;
        let farther = far + 1 + KPAGE_GAP + 1;
        let pairs: Vec<u64> = [10u64, 10, 11, 20, far, farther, farther + 1]
            .iter()
            .enumerate()
            .map(|(vm, pfn)| pfn << shift | vm as u64)
            .collect();
        assert_eq!(plan_run(&pairs, shift), 10..far + 1);
        assert_eq!(plan_run(&pairs[5..], shift), farther..farther + 2);
        let long: Vec<u64> = (0..KPAGE_RUN_MAX + 5).map(|pfn| pfn << shift).collect();
        assert_eq!(plan_run(&long, shift), 0..KPAGE_RUN_MAX);
        assert_eq!(plan_run(&[], shift), 0..0);
    }

    #[test]
    fn mib_and_display() {
        assert_eq!(mib(256), 1.0);
        assert_eq!(mib(0), 0.0);
        let text = usage(512, 256, 0, 256, 128).to_string();
        assert_eq!(
            text,
            "resident 2.0 MiB (ksm 1.0, zero 0.0, unique 1.0, shared with other VMs 0.5)"
        );
    }

    /// Boosts KSM scanning for one test and puts every knob it touched back when dropped, also
    /// when the test fails. Holds the flock on `run` that kvmerge's KSM owner (dedup::ksm) takes,
    /// so that it neither saves another owner's boosted values nor fights it over the knobs.
    struct KsmKnobs {
        saved: Vec<(PathBuf, String)>,
        /// Released when closed, after `drop` has restored the knobs.
        _lock: File,
    }

    impl KsmKnobs {
        const DIR: &str = "/sys/kernel/mm/ksm";

        /// Waits up to 30 s for another owner of the knobs to finish.
        fn boost() -> io::Result<KsmKnobs> {
            use std::os::fd::AsRawFd;
            let lock = File::open(format!("{}/run", Self::DIR))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            // SAFETY: flock on a descriptor we own; no memory is passed.
            while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut knobs = KsmKnobs {
                saved: Vec::new(),
                _lock: lock,
            };
            for (name, value) in [
                ("pages_to_scan", "5000"),
                ("sleep_millisecs", "10"),
                ("run", "1"),
            ] {
                let path = PathBuf::from(Self::DIR).join(name);
                let old = std::fs::read_to_string(&path)?.trim().to_string();
                knobs.saved.push((path.clone(), old));
                std::fs::write(&path, value)?;
            }
            Ok(knobs)
        }
    }

    impl Drop for KsmKnobs {
        fn drop(&mut self) {
            // `run` first: stop the boosted scanning before anything else.
            for (path, old) in self.saved.iter().rev() {
                if let Err(e) = std::fs::write(path, old) {
                    eprintln!("cannot restore {}={old}: {e}", path.display());
                }
            }
        }
    }

    fn ksm_counters() -> String {
        [
            "run",
            "pages_shared",
            "pages_sharing",
            "pages_volatile",
            "full_scans",
        ]
        .iter()
        .map(|name| {
            let value = std::fs::read_to_string(format!("{}/{name}", KsmKnobs::DIR));
            format!("{name}={}", value.unwrap_or_default().trim())
        })
        .collect::<Vec<_>>()
        .join(" ")
    }

    #[test]
    fn ksm_merges_within_and_across_vms() {
        let Some(mut accountant) = frames_accountant("ksm_merges_within_and_across_vms") else {
            return;
        };
        let vms = TwoVms::new();
        let [a, b] = vms.ranges;
        if !vms.mem.mergeable(&a) || !vms.mem.mergeable(&b) {
            eprintln!("skipping ksm_merges_within_and_across_vms: this kernel has no KSM");
            return;
        }
        let (pa, pb, seed) = (1, TwoVms::PAGES + 2, nonce());
        // 16 pages in both VMs (in another order in VM 1), two equal pages within VM 0 only,
        // and unique pages in each.
        for i in 0..16 {
            vms.mem.write(pa + i, seed + i as u64);
            vms.mem.write(pb + 15 - i, seed + i as u64);
        }
        vms.mem.write(pa + 16, seed + 50);
        vms.mem.write(pa + 17, seed + 50);
        (18..26).for_each(|i| vms.mem.write(pa + i, seed + 100 + i as u64));
        (16..20).for_each(|i| vms.mem.write(pb + i, seed + 200 + i as u64));

        let knobs = match KsmKnobs::boost() {
            Ok(knobs) => knobs,
            Err(e) => {
                eprintln!("skipping ksm_merges_within_and_across_vms: cannot tune KSM: {e}");
                return;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let snap = loop {
            let snap = accountant.snapshot(&vms.ranges).unwrap();
            if (snap.per_vm[0].ksm, snap.per_vm[1].ksm) == (18, 16) {
                break snap;
            }
            assert!(
                Instant::now() < deadline,
                "KSM did not merge the test pages within 60 s: {:?}; {}",
                snap.per_vm,
                ksm_counters()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(knobs);
        assert_eq!(snap.per_vm[0], usage(26, 18, 0, 8, 16));
        assert_eq!(snap.per_vm[1], usage(20, 16, 0, 4, 16));
        // 16 cross-VM frames, one for the pair inside VM 0, 12 unique.
        assert_eq!(snap.distinct_frames, Some(29));
        assert_eq!(snap.saved(), Some(17));
        assert_eq!(snap.frames_mapped_elsewhere, Some(0));
        // Two ranges of one VM share nothing "with other VMs".
        let one_vm = [a, VmRange { vm: a.vm, ..b }];
        let snap = accountant.snapshot(&one_vm).unwrap();
        assert_eq!(snap.total, usage(46, 34, 0, 12, 0));

        // Separate VMAs: smaps gives the same per-VM figures, without the cross-VM count.
        let mut smaps = Accountant::open(false);
        let snap = smaps.snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.per_vm[0], usage(26, 18, 0, 8, 0));
        assert_eq!(snap.per_vm[1], usage(20, 16, 0, 4, 0));
        assert_eq!(snap.estimated, [false, false]);

        // VM 1 writes to one merged page: it gets a copy of its own, and VM 0 keeps a KSM page
        // that nothing shares any more, which counts as unique.
        vms.mem.write(pb, seed + 300);
        let snap = accountant.snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.per_vm[0], usage(26, 17, 0, 9, 15));
        assert_eq!(snap.per_vm[1], usage(20, 15, 0, 5, 15));
        assert_eq!(snap.distinct_frames, Some(30));
        let snap = smaps.snapshot(&vms.ranges).unwrap();
        assert_eq!(snap.per_vm[0], usage(26, 17, 0, 9, 0));
        assert_eq!(snap.per_vm[1], usage(20, 15, 0, 5, 0));
    }

    /// A fleet of `vms` VMs of `mib` MiB each, every page written, in separate VMAs.
    fn touched_fleet(vms: usize, mib: usize) -> (Mem, Vec<VmRange>) {
        let pages = mib * 256;
        let mem = Mem::map(vms * (pages + 1) + 1);
        let mut ranges = Vec::new();
        for vm in 0..vms {
            let first = 1 + vm * (pages + 1);
            mem.guard(first - 1);
            ranges.push(mem.range(vm, first, pages));
            for p in first..first + pages {
                // SAFETY: page `p` is inside the mapping and writable.
                unsafe { mem.page(p).cast::<u64>().write_volatile(p as u64 + 1) };
            }
        }
        mem.guard(vms * (pages + 1));
        (mem, ranges)
    }

    fn time_snapshots(name: &str, accountant: &mut Accountant, ranges: &[VmRange]) {
        let snap = accountant.snapshot(ranges).unwrap();
        let first = snap.taken_in;
        let mut times: Vec<_> = (0..7)
            .map(|_| accountant.snapshot(ranges).unwrap().taken_in)
            .collect();
        times.sort();
        eprintln!(
            "{name}: {} VMs, {}: first snapshot {first:?}, then min {:?}, median {:?}, max {:?}",
            ranges.len(),
            snap.total,
            times[0],
            times[3],
            times[6],
        );
    }

    #[test]
    #[ignore = "benchmark: maps and touches 2 GiB; run with --ignored --nocapture"]
    fn bench_fleet_snapshot() {
        for (vms, mib) in [(8, 256), (64, 32)] {
            let (_mem, ranges) = touched_fleet(vms, mib);
            if let Some(mut accountant) = frames_accountant("bench (pagemap)") {
                time_snapshots("pagemap", &mut accountant, &ranges);
                // Worst case: no page exclusive, every frame looked up.
                let _child = Child::fork();
                time_snapshots("pagemap, forked", &mut accountant, &ranges);
            }
            time_snapshots("smaps", &mut Accountant::open(false), &ranges);
        }
    }
}
