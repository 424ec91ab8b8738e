//! Guest RAM: created in exactly one place, one anonymous private mapping per VM, advised for
//! deduplication right here and nowhere else.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::config::{DedupMode, format_size};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {size} of guest RAM ({source}): lower --memory or --count")]
    Map {
        size: String,
        #[source]
        source: std::io::Error,
    },
    #[error("madvise({advice}) on guest RAM failed")]
    Advise {
        advice: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM layout rejected by vm-memory: {0}")]
    Layout(String),
    #[error(
        "guest RAM was advised MADV_MERGEABLE but /proc/self/smaps does not show the 'mg' flag"
    )]
    NotMergeable,
    #[error("cannot read /proc/self/smaps to check that guest RAM is mergeable")]
    Smaps(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What happened when guest RAM was offered to KSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mergeable {
    /// MADV_MERGEABLE accepted (see [`verify_mergeable`] for the check that it took effect).
    Yes,
    /// The kernel has no KSM (madvise returned EINVAL): zero-page reclaim still works.
    NoKsm,
    /// Dedup mode `off` or `zero`: never offered.
    NotRequested,
}

/// One VM's guest RAM. Owns the mapping; the `GuestMemoryMmap` views it through raw regions.
///
/// The view can be cloned (vm-memory's type is `Clone`), and a clone shares the view's regions.
/// The mapping is unmapped only when no clone of the view is left when the `GuestRam` drops;
/// otherwise it is leaked (and logged) rather than left dangling behind a clone. Every vCPU
/// thread holds an `Arc<GuestRam>`, so the mapping also outlives every VcpuFd (and so KVM's
/// memslots on it).
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    /// The view's regions, to see at drop whether a clone of the view still uses them.
    regions: Vec<Arc<GuestRegionMmap<()>>>,
    host: NonNull<u8>,
    len: usize,
    mergeable: Mergeable,
}

// SAFETY: the mapping is plain anonymous memory owned by this struct; all access goes through
// vm-memory's volatile accessors or KVM, both of which are thread-safe.
unsafe impl Send for GuestRam {}
// SAFETY: as above; `&GuestRam` only hands out the vm-memory view and the address range.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `regions` (guest address, size) back to back in one anonymous private mapping, names it
    /// `kvmerge-<name>` in /proc/self/maps where the kernel supports it, and advises it for `dedup`.
    pub fn new(name: &str, regions: &[(GuestAddress, u64)], dedup: DedupMode) -> Result<GuestRam> {
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let map_err = |source| Error::Map {
            size: format_size(total),
            source,
        };
        let len = usize::try_from(total)
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected. NORESERVE because guest
        // RAM is meant to be overcommitted: untouched and merged pages cost nothing.
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
        if addr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let host = NonNull::new(addr.cast::<u8>()).expect("mmap never returns NULL on success");
        // From here on, Drop unmaps.
        let mut ram = GuestRam {
            mem: GuestMemoryMmap::default(),
            regions: Vec::new(),
            host,
            len,
            mergeable: Mergeable::NotRequested,
        };
        name_mapping(addr, len, name);
        ram.advise(libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        // KSM cannot merge pages inside a transparent huge page; keep guest RAM in 4 KiB pages.
        if dedup != DedupMode::Off {
            ram.advise(libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
        }
        if dedup == DedupMode::Full {
            ram.mergeable = ram.make_mergeable()?;
        }
        ram.regions = ram.build_view(regions)?;
        ram.mem = GuestMemoryMmap::from_arc_regions(ram.regions.clone())
            .map_err(|e| Error::Layout(e.to_string()))?;
        Ok(ram)
    }

    fn build_view(&self, regions: &[(GuestAddress, u64)]) -> Result<Vec<Arc<GuestRegionMmap<()>>>> {
        let mut offset = 0usize;
        let mut views = Vec::with_capacity(regions.len());
        for &(guest, size) in regions {
            let size = size as usize;
            // SAFETY: [offset, offset + size) lies inside our mapping (sizes sum to `len`), which
            // outlives every user of the region: Drop unmaps only when no one else holds it.
            let region = unsafe {
                MmapRegion::build_raw(
                    self.host.as_ptr().add(offset),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| Error::Layout(e.to_string()))?;
            views.push(Arc::new(GuestRegionMmap::new(region, guest).ok_or_else(
                || Error::Layout(format!("region at {:#x} overflows", guest.0)),
            )?));
            offset += size;
        }
        Ok(views)
    }

    fn advise(&self, advice: libc::c_int, name: &'static str) -> Result<()> {
        // SAFETY: the range is exactly our own mapping.
        let rc = unsafe { libc::madvise(self.host.as_ptr().cast(), self.len, advice) };
        if rc != 0 {
            return Err(Error::Advise {
                advice: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn make_mergeable(&self) -> Result<Mergeable> {
        match self.advise(libc::MADV_MERGEABLE, "MADV_MERGEABLE") {
            Ok(()) => {}
            Err(Error::Advise { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "this kernel has no KSM (CONFIG_KSM): guest RAM cannot be merged across VMs"
                );
                return Ok(Mergeable::NoKsm);
            }
            Err(e) => return Err(e),
        }
        Ok(Mergeable::Yes)
    }

    /// The vm-memory view used by loaders, devices and KVM memslots. Keep borrows; a clone
    /// that outlives this `GuestRam` makes the mapping leak instead of being unmapped.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Host virtual address and length of the whole mapping.
    pub fn host_range(&self) -> (u64, usize) {
        (self.host.as_ptr() as u64, self.len)
    }

    pub fn mergeable(&self) -> Mergeable {
        self.mergeable
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Drop our view first; its regions do not own the mapping.
        self.mem = GuestMemoryMmap::default();
        if self.regions.iter().any(|r| Arc::strong_count(r) > 1) {
            log::error!(
                "guest RAM at {:#x} is still used by a copy of its memory view; leaving {} mapped",
                self.host.as_ptr() as usize,
                format_size(self.len as u64)
            );
            return;
        }
        self.regions.clear();
        // SAFETY: we created this mapping in `new`, and no view of it is left (checked above:
        // regions cannot be cloned out of a view, only the view itself, which shares them).
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.len) };
    }
}

/// Checks that every mapping advised MADV_MERGEABLE shows the `mg` flag in /proc/self/smaps: a
/// silent no-op (shared, file-backed or hugetlb memory) is the classic KSM bug in VMMs. One read
/// of smaps covers a whole fleet.
pub fn verify_mergeable<'a>(rams: impl IntoIterator<Item = &'a GuestRam>) -> Result<()> {
    let mut smaps = None;
    for ram in rams {
        if ram.mergeable != Mergeable::Yes {
            continue;
        }
        if smaps.is_none() {
            smaps = Some(std::fs::read_to_string("/proc/self/smaps").map_err(Error::Smaps)?);
        }
        let smaps = smaps.as_deref().unwrap_or_default();
        match vma_flags(smaps, ram.host.as_ptr() as u64) {
            Some(flags) if flags.iter().any(|f| f == "mg") => {}
            _ => return Err(Error::NotMergeable),
        }
    }
    Ok(())
}

/// Names the mapping `[anon:kvmerge-<name>]` (Linux 5.17+, CONFIG_ANON_VMA_NAME), which makes guest
/// RAM easy to find in /proc/PID/smaps. Best effort: older kernels just keep it anonymous.
fn name_mapping(addr: *mut libc::c_void, len: usize, name: &str) {
    const PR_SET_VMA: libc::c_int = 0x5356_4d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    let Ok(label) = CString::new(format!("kvmerge-{name}")) else {
        return;
    };
    // SAFETY: prctl reads the NUL-terminated label and only renames our own mapping.
    let rc = unsafe {
        libc::prctl(
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            label.as_ptr() as libc::c_ulong,
        )
    };
    if rc != 0 {
        log::debug!(
            "cannot name guest RAM mapping: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The `VmFlags` of the smaps entry that contains `addr` (neighbouring mappings with equal flags
/// may have been merged into one VMA, so the entry need not start at `addr`).
pub fn vma_flags(smaps: &str, addr: u64) -> Option<Vec<String>> {
    let mut in_vma = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if in_vma {
                return Some(flags.split_whitespace().map(str::to_string).collect());
            }
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                in_vma = (lo..hi).contains(&addr);
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn smaps_flags() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0                          [anon:kvmerge-vm0]
Size:               1024 kB
VmFlags: rd wr mr mw me ac dd nh mg
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Size:               1024 kB
VmFlags: rd wr mr mw me ac
";
        assert_eq!(
            vma_flags(smaps, 0x7f00_0000_0000)
                .unwrap()
                .last()
                .map(String::as_str),
            Some("mg")
        );
        assert!(
            !vma_flags(smaps, 0x7f00_0010_0000)
                .unwrap()
                .contains(&"mg".to_string())
        );
        assert!(vma_flags(smaps, 0x7f00_0010_0fff).is_some());
        assert_eq!(vma_flags(smaps, 0x7f00_0020_0000), None);
    }

    #[test]
    fn ram_regions_are_one_mapping() {
        let regions = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let ram = GuestRam::new("unit", &regions, DedupMode::Off).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(ram.host_range().1, 6 << 20);
        mem.write_obj(0xdead_beefu32, GuestAddress((1 << 32) + 8))
            .unwrap();
        // The high region sits right after the low one in the host mapping.
        let host = ram.host_range().0 as *const u32;
        // SAFETY: offset 4 MiB + 8 lies inside the 6 MiB mapping that `ram` keeps alive.
        let v = unsafe { host.byte_add((4 << 20) + 8).read_volatile() };
        assert_eq!(v, 0xdead_beef);
        assert!(
            mem.read_obj::<u8>(GuestAddress(4 << 20)).is_err(),
            "gap must be unmapped"
        );
    }

    /// Whether guest RAM named `name` (see [`name_mapping`]) and containing `addr` is mapped.
    /// By name where the kernel names mappings, so that an unrelated mapping made at the same
    /// address by a test running in parallel does not count.
    pub fn mapped(name: &str, addr: u64) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let named = maps.contains("[anon:kvmerge-");
        maps.lines().any(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).unwrap_or(0),
                u64::from_str_radix(hi, 16).unwrap_or(0),
            );
            (lo..hi).contains(&addr) && (!named || l.ends_with(&format!("[anon:kvmerge-{name}]")))
        })
    }

    #[test]
    fn a_clone_of_the_view_keeps_guest_ram_mapped() {
        let ram =
            GuestRam::new("unit-clone", &[(GuestAddress(0), 2 << 20)], DedupMode::Off).unwrap();
        ram.memory()
            .write_obj(0x5a5a_u16, GuestAddress(0x1000))
            .unwrap();
        let addr = ram.host_range().0;
        let copy = ram.memory().clone();
        drop(ram);
        assert!(
            mapped("unit-clone", addr),
            "unmapped under a live copy of the view"
        );
        assert_eq!(copy.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0x5a5a);
        drop(copy);
        // Without a copy the mapping goes.
        let ram =
            GuestRam::new("unit-unmap", &[(GuestAddress(0), 2 << 20)], DedupMode::Off).unwrap();
        let addr = ram.host_range().0;
        drop(ram);
        assert!(
            !mapped("unit-unmap", addr),
            "guest RAM stayed mapped with no user left"
        );
    }

    #[test]
    fn full_dedup_marks_mergeable() {
        let ram = GuestRam::new("unit-mg", &[(GuestAddress(0), 4 << 20)], DedupMode::Full).unwrap();
        // Where the kernel has KSM the flag must be verified; without it we degrade, never lie.
        let has_ksm = std::path::Path::new("/sys/kernel/mm/ksm").exists();
        let want = if has_ksm {
            Mergeable::Yes
        } else {
            Mergeable::NoKsm
        };
        assert_eq!(ram.mergeable(), want);
        let off = GuestRam::new("unit-off", &[(GuestAddress(0), 4 << 20)], DedupMode::Off).unwrap();
        assert_eq!(off.mergeable(), Mergeable::NotRequested);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags = vma_flags(&smaps, off.host_range().0).unwrap();
        assert!(!flags.contains(&"mg".to_string()));
    }
}
