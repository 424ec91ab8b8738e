//! The run-time overcommit guard. Admission (`host::admit`) checks the fleet's guest RAM before
//! it starts, but with `--overcommit` above 1, or when merged pages un-merge as guests diverge
//! (each write to a KSM page breaks copy-on-write and allocates), or when other processes grow,
//! the host or the memory cgroup can still run short. Without swap, the kernel's OOM killer then
//! ends the whole kvmerge process: every guest at once, with the host's KSM knobs left changed.
//!
//! The guard thread polls the memory kvmerge may still use and sheds load before that happens:
//!
//! - **What it watches** (every [`POLL`]): the tightest level of this process's memory cgroup
//!   (v2 `memory.max` − `memory.current`, or v1 `memory.limit_in_bytes` − `memory.usage_in_bytes`,
//!   over the cgroup and its ancestors), the host's `MemAvailable`, and how often a cgroup limit
//!   was hit (v2 `memory.events` `max`, v1 `memory.failcnt`).
//! - **When it acts**: free memory under the reserve, which is 1/16 of the cgroup limit (1/64 of
//!   the host's RAM for MemAvailable) and at least [`MIN_RESERVE`]; or the limit-hit counter rising
//!   while free memory is under twice the reserve. PSI is not used as the trigger: without swap,
//!   anonymous guest memory cannot be reclaimed, so the OOM killer can strike before a stall shows.
//! - **What it does**: first it releases the RAM of guests that have already ended (their RAM
//!   stays mapped until the run ends, for the final accounting). If that is not enough, it stops
//!   the running guest that frees most: the most resident memory (mincore), refined for the four
//!   largest by the pages only that guest maps (pagemap's exclusive bit, which leaves out pages KSM
//!   shares with other guests). The guest ends with [`VmEnd::Shed`] (a failure: exit status 1),
//!   its RAM is released at once, and one warning line says so. The others keep running.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::PAGE_SIZE as PAGE;
use crate::host::{self, MemoryCgroup};
use crate::memory::GuestRam;
use crate::vcpu::VmEnd;
use crate::vm::{Lifecycle, VmControl, VmShared};

/// How often memory is read: at 1-2 GiB/s of guest page faults (two cores), the reserve below
/// lasts several polls.
pub const POLL: Duration = Duration::from_millis(10);
/// The smallest reserve kept free.
pub const MIN_RESERVE: u64 = 64 << 20;
/// How many of the most resident guests are measured page by page before one is chosen.
const REFINE: usize = 4;
/// Scratch space of the page walks: 8192 pagemap entries, or mincore bytes for 256 MiB.
const BUF: usize = 64 << 10;

/// One guest as the guard sees it.
pub struct Guarded {
    pub shared: Arc<VmShared>,
    pub control: Arc<VmControl>,
    pub ram: Arc<GuestRam>,
}

/// A change to the guarded fleet (`kvmerge serve` adds and removes VMs as it runs).
enum Change {
    Add(Guarded),
    Remove(Arc<VmControl>),
}

/// The guard thread; stopped and joined on drop.
pub struct Guard {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Change>>>,
    thread: Option<JoinHandle<()>>,
}

impl Guard {
    /// Starts watching; the guests may already run.
    pub fn start(vms: Vec<Guarded>) -> std::io::Result<Guard> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let inbox = changes.clone();
        let thread = std::thread::Builder::new()
            .name("kvmerge-pressure".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Monitor) {
                    log::error!("{e}; running without the memory pressure guard");
                    return;
                }
                raise_priority();
                Watch::new(vms).run(&flag, &inbox)
            })?;
        Ok(Guard {
            stop,
            changes,
            thread: Some(thread),
        })
    }

    /// Guards a VM that started after the guard (taken in at the next poll).
    pub fn add(&self, vm: Guarded) {
        crate::sync::lock(&self.changes).push(Change::Add(vm));
    }

    /// Stops guarding a VM that is being destroyed, letting go of its RAM.
    pub fn remove(&self, control: &Arc<VmControl>) {
        crate::sync::lock(&self.changes).push(Change::Remove(control.clone()));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Free memory and what it is measured against, at one level (cgroup or host).
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub free: u64,
    pub reserve: u64,
    pub place: String,
}

impl Reading {
    pub fn short(&self) -> bool {
        self.free < self.reserve
    }
}

/// The reserve kept free under a limit of `limit` bytes, `fraction` being 16 for a cgroup limit
/// and 64 for the host's RAM.
pub fn reserve(limit: u64, fraction: u64) -> u64 {
    (limit / fraction).max(MIN_RESERVE)
}

struct Watch {
    vms: Vec<Guarded>,
    cgroup: Option<MemoryCgroup>,
    host_total: Option<u64>,
    pagemap: Option<File>,
    hits: u64,
    released: Vec<bool>,
    /// Allocated up front: when memory is short, an allocation may itself stall in reclaim.
    buf: Vec<u8>,
}

impl Watch {
    fn new(vms: Vec<Guarded>) -> Watch {
        let cgroup = MemoryCgroup::of_self();
        let hits = cgroup.as_ref().map_or(0, MemoryCgroup::limit_hits);
        let released = vec![false; vms.len()];
        Watch {
            vms,
            cgroup,
            host_total: meminfo("MemTotal:"),
            pagemap: File::open("/proc/self/pagemap").ok(),
            hits,
            released,
            buf: vec![0u8; BUF],
        }
    }

    fn run(mut self, stop: &AtomicBool, changes: &Mutex<Vec<Change>>) {
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(POLL);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let changed = std::mem::take(&mut *crate::sync::lock(changes));
            for change in changed {
                self.apply(change);
            }
            let Some(reading) = self.tightest() else {
                continue;
            };
            log::trace!("memory pressure reading: {reading:?}");
            let hits = self.cgroup.as_ref().map_or(0, MemoryCgroup::limit_hits);
            let hit = hits > self.hits && reading.free < 2 * reading.reserve;
            self.hits = hits;
            if !(reading.short() || hit) {
                continue;
            }
            if self.release_ended() {
                continue;
            }
            self.shed(&reading);
            self.hits = self.cgroup.as_ref().map_or(0, MemoryCgroup::limit_hits);
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Add(vm) => {
                self.vms.push(vm);
                self.released.push(false);
            }
            Change::Remove(control) => {
                if let Some(i) = self
                    .vms
                    .iter()
                    .position(|vm| Arc::ptr_eq(&vm.control, &control))
                {
                    self.vms.remove(i);
                    self.released.remove(i);
                }
            }
        }
    }

    /// The level with the least free memory relative to its reserve.
    fn tightest(&self) -> Option<Reading> {
        let cgroup = self
            .cgroup
            .as_ref()
            .and_then(MemoryCgroup::room)
            .map(|room| Reading {
                free: room.free(),
                reserve: reserve(room.limit, 16),
                place: format!(
                    "memory cgroup {}: {} free of {}",
                    room.dir.display(),
                    host::format_mib(room.free()),
                    host::format_mib(room.limit)
                ),
            });
        let host = self
            .host_total
            .zip(meminfo("MemAvailable:"))
            .map(|(total, avail)| Reading {
                free: avail,
                reserve: reserve(total, 64),
                place: format!(
                    "host: {} available of {}",
                    host::format_mib(avail),
                    host::format_mib(total)
                ),
            });
        [cgroup, host]
            .into_iter()
            .flatten()
            .min_by_key(|r| r.free as i128 - r.reserve as i128)
    }

    /// Releases the RAM of guests that have ended; true if there was any.
    fn release_ended(&mut self) -> bool {
        let mut any = false;
        for (i, vm) in self.vms.iter().enumerate() {
            if !self.released[i] && vm.control.state() == Lifecycle::Stopped {
                discard(&vm.ram);
                self.released[i] = true;
                any = true;
                log::info!("{}: released the RAM of the ended guest", vm.shared.name());
            }
        }
        any
    }

    /// Stops the running guest that frees most and releases its RAM.
    fn shed(&mut self, reading: &Reading) {
        let Some(victim) = self.victim() else {
            return;
        };
        let vm = &self.vms[victim];
        let held = resident(&vm.ram, &mut self.buf);
        if !vm.shared.end(VmEnd::Shed) {
            return; // it ended on its own meanwhile
        }
        vm.control.request_stop();
        discard(&vm.ram);
        self.released[victim] = true;
        log::warn!(
            "{}: stopped to relieve memory pressure ({}, reserve {}); it held {}",
            vm.shared.name(),
            reading.place,
            host::format_mib(reading.reserve),
            host::format_mib(held)
        );
    }

    /// The running guest whose RAM only it maps is largest, among the most resident ones.
    fn victim(&mut self) -> Option<usize> {
        let buf = &mut self.buf;
        let mut running: Vec<(usize, u64)> = self
            .vms
            .iter()
            .enumerate()
            .filter(|(i, vm)| !self.released[*i] && vm.shared.outcome().is_none())
            .map(|(i, vm)| (i, resident(&vm.ram, buf)))
            .collect();
        running.sort_by_key(|&(i, bytes)| (std::cmp::Reverse(bytes), std::cmp::Reverse(i)));
        running.truncate(REFINE);
        running
            .into_iter()
            .max_by_key(|&(i, bytes)| {
                let unique = self
                    .pagemap
                    .as_ref()
                    .and_then(|pm| exclusive(pm, &self.vms[i].ram, buf))
                    .unwrap_or(bytes);
                (unique, i)
            })
            .map(|(i, _)| i)
    }
}

/// The guard must get a CPU within a poll or two even when every core runs guests: as root, its
/// thread runs at nice -10 (best effort; unprivileged users keep the default).
fn raise_priority() {
    if let Err(e) = crate::sched::set_this_thread_nice(crate::sched::RESPONSIVE) {
        log::debug!("pressure guard keeps the default priority: {e}");
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// Drops every page of a guest's RAM. Only called for guests that have ended or are being shed:
/// whatever a vCPU still running for a moment reads is never used.
fn discard(ram: &GuestRam) {
    let (addr, len) = ram.host_range();
    // SAFETY: the range is this guest's own anonymous mapping, alive while `ram` is; discarding
    // it only replaces its contents with zeros, which no one reads any more.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        log::warn!(
            "cannot release guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Resident bytes of a guest's RAM (mincore), in chunks `vec` covers.
fn resident(ram: &GuestRam, vec: &mut [u8]) -> u64 {
    let chunk = vec.len() * PAGE as usize;
    let (addr, len) = ram.host_range();
    let mut pages = 0u64;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        // SAFETY: the range lies inside the guest's mapping; `vec` has one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                (addr as usize + off) as *mut libc::c_void,
                n,
                vec.as_mut_ptr(),
            )
        };
        if rc == 0 {
            pages += vec[..n.div_ceil(PAGE as usize)]
                .iter()
                .filter(|&&b| b & 1 != 0)
                .count() as u64;
        }
        off += n;
    }
    pages * PAGE
}

/// Bytes of a guest's RAM that are present and mapped by this guest only (pagemap bit 56): what
/// stopping it gives back. None if pagemap cannot be read.
fn exclusive(pagemap: &File, ram: &GuestRam, buf: &mut [u8]) -> Option<u64> {
    const PRESENT: u64 = 1 << 63;
    const EXCLUSIVE: u64 = 1 << 56;
    let batch = buf.len() / 8;
    let (addr, len) = ram.host_range();
    let pages = len as u64 / PAGE;
    let mut count = 0u64;
    let mut page = 0u64;
    while page < pages {
        let n = (pages - page).min(batch as u64) as usize;
        let offset = (addr / PAGE + page) * 8;
        pagemap.read_exact_at(&mut buf[..n * 8], offset).ok()?;
        count += buf[..n * 8]
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()))
            .filter(|e| e & (PRESENT | EXCLUSIVE) == PRESENT | EXCLUSIVE)
            .count() as u64;
        page += n as u64;
    }
    Some(count * PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DedupMode;
    use vm_memory::GuestAddress;

    #[test]
    fn reserves() {
        assert_eq!(reserve(6 << 30, 16), 384 << 20);
        assert_eq!(reserve(512 << 20, 16), MIN_RESERVE);
        assert_eq!(reserve(24 << 30, 64), 384 << 20);
        let r = Reading {
            free: 10,
            reserve: 11,
            place: String::new(),
        };
        assert!(r.short());
    }

    #[test]
    fn resident_and_exclusive_pages_of_guest_ram() {
        let ram = GuestRam::new("t", &[(GuestAddress(0), 8 << 20)], DedupMode::Off).unwrap();
        // A small buffer, so that the walks take several chunks.
        let mut buf = vec![0u8; 1024];
        assert_eq!(resident(&ram, &mut buf), 0);
        let (addr, _) = ram.host_range();
        // SAFETY: writes inside the 8 MiB mapping owned by `ram`.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 1, 3 << 20) };
        assert_eq!(resident(&ram, &mut buf), 3 << 20);
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        assert_eq!(exclusive(&pagemap, &ram, &mut buf), Some(3 << 20));
        discard(&ram);
        assert_eq!(resident(&ram, &mut buf), 0);
    }
}
