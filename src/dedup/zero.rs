//! Zero-page reclaim: guest pages that hold only zeros are given back to the host with
//! MADV_DONTNEED, so they cost nothing until the guest writes them again (then a fresh zero page is
//! faulted in, exactly as the guest expects).
//!
//! Dropping a page is only safe while nothing can write it between the check and the drop, so a
//! batch goes in two steps: a racy scan while the guest runs finds candidates (cheap, most pages
//! fail at their first word); then the VM's vCPUs are held out of the guest (those inside KVM_RUN
//! are kicked and waited for, the others are stopped at its door: the protocol is described in
//! [`crate::vcpu`]), only the candidates are checked again, the zero ones are dropped, and the
//! vCPUs go on. The scanner holds at real-time priority where permitted ([`vcpu::RtBoost`]). No device of a VM
//! writes guest memory today (serial and i8042 only do port I/O, and KVM writes guest memory only
//! inside KVM_RUN), so holding the vCPUs is enough; a DMA-capable device would have to be
//! quiesced in the same window. Batches are small so that a hold stays well under a millisecond.

use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use crate::vcpu;
use crate::vm::{self, VmControl};

/// [`crate::config::PAGE_SIZE`] as a `usize`, for pointer arithmetic.
pub const PAGE_SIZE: usize = crate::config::PAGE_SIZE as usize;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Pages checked per pause at first; the scanner then sizes batches so that a pause lasts about
/// [`TARGET_PAUSE`] on this host (dropping a page costs more where the hypervisor shadows guest
/// page tables than with EPT/NPT).
pub const DEFAULT_BATCH_PAGES: usize = 64;
const MIN_BATCH_PAGES: usize = 16;
const MAX_BATCH_PAGES: usize = 4096;
/// What one pause should cost the guest.
pub const TARGET_PAUSE: Duration = Duration::from_micros(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mincore on guest RAM failed")]
    Mincore(#[source] std::io::Error),
    #[error("madvise(MADV_DONTNEED) on guest RAM failed")]
    Drop(#[source] std::io::Error),
    #[error("cannot pause the VM")]
    Pause(#[source] vm::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What one pass (or part of one) over a VM's RAM did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub scanned_pages: u64,
    /// Pages that looked zero in the racy scan.
    pub candidates: u64,
    /// Pages dropped after the check under pause.
    pub reclaimed: u64,
    /// How long the vCPUs were held, one entry per pause.
    pub pauses: Vec<Duration>,
    pub took: Duration,
}

impl PassReport {
    fn merge(&mut self, other: PassReport) {
        self.scanned_pages += other.scanned_pages;
        self.candidates += other.candidates;
        self.reclaimed += other.reclaimed;
        self.pauses.extend(other.pauses);
        self.took += other.took;
    }
}

/// Walks one VM's RAM in batches, resuming where the previous call stopped.
pub struct ZeroScanner {
    cursor: usize,
    batch_pages: usize,
    residency: Vec<u8>,
}

impl ZeroScanner {
    pub fn new(batch_pages: usize) -> ZeroScanner {
        ZeroScanner {
            cursor: 0,
            batch_pages: batch_pages.clamp(MIN_BATCH_PAGES, MAX_BATCH_PAGES),
            residency: Vec::new(),
        }
    }

    /// Sizes the next batch from what the last pause cost per page it had to check and drop:
    /// a batch's pause grows with its zero pages, which can be all of them.
    fn adapt(&mut self, held: Duration, candidates: u64) {
        let per_page = held.as_secs_f64() / candidates.max(1) as f64;
        let fit = (TARGET_PAUSE.as_secs_f64() / per_page.max(1e-9)) as usize;
        // Grow gently (a cheap pause may have been a lucky one), shrink at once.
        self.batch_pages = fit
            .min(self.batch_pages * 2)
            .clamp(MIN_BATCH_PAGES, MAX_BATCH_PAGES);
    }

    /// Pages per batch (and so at most per pause) right now.
    pub fn batch_pages(&self) -> usize {
        self.batch_pages
    }

    /// Scans up to `max_pages` pages of `ram` from where the last call stopped (wrapping around at
    /// the end), reclaiming zero pages with `control`'s vCPUs paused. Stops early, without error,
    /// when the VM is not running or its vCPUs could not be held in time. Returns whether the scan wrapped past the end.
    pub fn scan(
        &mut self,
        ram: &GuestRam,
        control: &VmControl,
        max_pages: usize,
        report: &mut PassReport,
    ) -> Result<bool> {
        let (base, len) = ram.host_range();
        let total_pages = len / PAGE_SIZE;
        let mut done = 0;
        let mut wrapped = false;
        while done < max_pages && total_pages > 0 {
            if self.cursor >= total_pages {
                self.cursor = 0;
                wrapped = true;
            }
            let n = self
                .batch_pages
                .min(total_pages - self.cursor)
                .min(max_pages - done);
            let start = base as usize + self.cursor * PAGE_SIZE;
            // SAFETY: [start, start + n pages) lies inside the VM's mapping, which `ram` keeps
            // alive for the whole call.
            let batch = unsafe { scan_batch(start as *mut u8, n, &mut self.residency, control)? };
            let Some(batch) = batch else {
                break; // the VM is not running: nothing to do now
            };
            if let Some(&held) = batch.pauses.last() {
                self.adapt(held, batch.candidates);
            }
            report.merge(batch);
            self.cursor += n;
            done += n;
        }
        Ok(wrapped)
    }
}

/// One batch: find candidates, then re-check and drop them with the vCPUs paused. None when the
/// VM was not running at pause time.
///
/// # Safety
/// `start` must point to `pages` pages of a live anonymous private mapping.
unsafe fn scan_batch(
    start: *mut u8,
    pages: usize,
    residency: &mut Vec<u8>,
    control: &VmControl,
) -> Result<Option<PassReport>> {
    let began = Instant::now();
    residency.resize(pages, 0);
    // Only resident pages can cost memory; reading others would fault them in.
    // SAFETY: the range is a valid mapping (caller) and `residency` has one byte per page.
    let rc = unsafe { libc::mincore(start.cast(), pages * PAGE_SIZE, residency.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Mincore(std::io::Error::last_os_error()));
    }
    let page = |i: usize| {
        // SAFETY: i < pages, so the page lies inside the caller's range.
        unsafe { start.add(i * PAGE_SIZE) }
    };
    let candidates: Vec<usize> = (0..pages)
        .filter(|&i| residency[i] & 1 != 0)
        // SAFETY: each page is inside the live mapping; the guest may write it concurrently,
        // which only makes this pre-check wrong, never unsafe (volatile reads of plain memory).
        .filter(|&i| unsafe { page_is_zero(page(i)) })
        .collect();
    let mut report = PassReport {
        scanned_pages: pages as u64,
        candidates: candidates.len() as u64,
        ..PassReport::default()
    };
    if !candidates.is_empty() {
        // Not preempted by a busy host's other threads while holding (none without privilege).
        let boost = vcpu::RtBoost::this_thread();
        let paused = control.with_paused(|| {
            let mut dropped = 0u64;
            let mut run: Option<(usize, usize)> = None; // (first page, count) of zero pages
            let mut result = Ok(());
            for &i in &candidates {
                // SAFETY: as above; now no vCPU runs, so the answer holds until the drop.
                if !unsafe { page_is_zero(page(i)) } {
                    continue;
                }
                dropped += 1;
                run = match run {
                    Some((first, count)) if first + count == i => Some((first, count + 1)),
                    Some((first, count)) => {
                        // SAFETY: the run lies inside the range and every page in it is zero.
                        result = result.and(unsafe { drop_pages(page(first), count) });
                        Some((i, 1))
                    }
                    None => Some((i, 1)),
                };
            }
            if let Some((first, count)) = run {
                // SAFETY: as above.
                result = result.and(unsafe { drop_pages(page(first), count) });
            }
            result.map(|()| dropped)
        });
        drop(boost);
        let paused = match paused {
            // A vCPU did not leave the guest in time (a long exit, or a host too busy to run
            // it): skip this batch; the next pass looks again.
            Err(vm::Error::Vcpu(vcpu::Error::NoHold { index, timeout })) => {
                log::debug!("zero-page reclaim skipped: vCPU {index} not out within {timeout:?}");
                return Ok(None);
            }
            other => other.map_err(Error::Pause)?,
        };
        match paused {
            Some((dropped, held)) => {
                report.reclaimed = dropped?;
                report.pauses.push(held);
            }
            None => return Ok(None),
        }
    }
    report.took = began.elapsed();
    Ok(Some(report))
}

/// Whether a page holds only zeros. Volatile reads: the guest may be writing it.
///
/// # Safety
/// `page` must point to a readable, page-aligned 4 KiB page.
pub unsafe fn page_is_zero(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    // Most non-zero pages differ in their first word.
    // SAFETY: the first word of a readable page.
    if unsafe { words.read_volatile() } != 0 {
        return false;
    }
    for chunk in (0..WORDS_PER_PAGE).step_by(8) {
        let mut acc = 0u64;
        for w in chunk..chunk + 8 {
            // SAFETY: w < WORDS_PER_PAGE, inside the page.
            acc |= unsafe { words.add(w).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// # Safety
/// `[start, start + count pages)` must be private anonymous memory that may be zero-filled.
unsafe fn drop_pages(start: *mut u8, count: usize) -> Result<()> {
    // SAFETY: per the contract, discarding these pages only turns zeros into fresh zeros.
    let rc = unsafe { libc::madvise(start.cast(), count * PAGE_SIZE, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::Drop(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The `q` quantile (0..=1) of `durations`, or zero when empty.
pub fn quantile(durations: &[Duration], q: f64) -> Duration {
    if durations.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u64; WORDS_PER_PAGE];
        // SAFETY: a live 4 KiB buffer.
        assert!(unsafe { page_is_zero(page.as_ptr().cast()) });
        for w in [0, 1, 7, 8, 300, WORDS_PER_PAGE - 1] {
            page.fill(0);
            page[w] = 1 << 63;
            // SAFETY: as above.
            assert!(!unsafe { page_is_zero(page.as_ptr().cast()) }, "word {w}");
        }
    }

    #[test]
    fn batches_follow_the_pause_target() {
        let mut s = ZeroScanner::new(256);
        // 256 pages took 4x the target: a quarter of that fits.
        s.adapt(TARGET_PAUSE * 4, 256);
        assert_eq!(s.batch_pages(), 64);
        // Cheap pauses grow the batch, at most doubling each time.
        s.adapt(TARGET_PAUSE / 100, 64);
        assert_eq!(s.batch_pages(), 128);
        for _ in 0..20 {
            s.adapt(TARGET_PAUSE / 100, 64);
        }
        assert_eq!(s.batch_pages(), MAX_BATCH_PAGES);
        s.adapt(TARGET_PAUSE * 1000, 1);
        assert_eq!(s.batch_pages(), MIN_BATCH_PAGES);
    }

    #[test]
    fn quantiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(quantile(&d, 0.99), Duration::from_micros(99));
        assert_eq!(quantile(&d, 0.5), Duration::from_micros(51));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }
}
