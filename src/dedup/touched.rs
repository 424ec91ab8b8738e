//! Which guest pages the guest has used, so that reclaimed zero pages are counted as saved only
//! while they stay given back.
//!
//! Zero-page reclaim drops a page the guest touched; the host saves that page until the guest
//! touches it again (a read maps the shared zero page, which accounting counts as zero; a write
//! gets a fresh frame, which costs as much as before). So "saved by reclaim now" is the number of
//! pages that were resident once and are not resident now. Residency comes from mincore(2); a page
//! is marked used whenever it is seen resident. A page that became resident and was reclaimed
//! between two looks is missed, so the figure is a lower bound. Pages the host swapped out also
//! read as not resident; kvmerge's guest RAM is not expected to swap (see docs/stats.md).

use std::io;

use crate::config::PAGE_SIZE;

/// One VM's used-page bitmap and the mincore buffer it reuses.
#[derive(Default)]
pub struct Touched {
    used: Vec<u64>,
    residency: Vec<u8>,
}

impl Touched {
    pub fn new() -> Touched {
        Touched::default()
    }

    /// Marks the resident pages of `[base, base + len)` used, and returns the used pages that are
    /// not resident now.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must be one mapping of this process that stays mapped during the call,
    /// and the same range on every call.
    pub unsafe fn observe(&mut self, base: u64, len: usize) -> io::Result<u64> {
        let pages = len / PAGE_SIZE as usize;
        self.residency.resize(pages, 0);
        self.used.resize(pages.div_ceil(64), 0);
        // SAFETY: the caller guarantees the range is mapped; the vector holds one byte per page.
        let rc =
            unsafe { libc::mincore(base as *mut libc::c_void, len, self.residency.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut unbacked = 0;
        for (page, &state) in self.residency.iter().enumerate() {
            let (word, bit) = (page / 64, 1u64 << (page % 64));
            if state & 1 != 0 {
                self.used[word] |= bit;
            } else if self.used[word] & bit != 0 {
                unbacked += 1;
            }
        }
        Ok(unbacked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::accounting::tests::Mem;

    #[test]
    fn counts_pages_used_then_given_back() {
        let pages = 8;
        let len = pages * PAGE_SIZE as usize;
        let mem = Mem::map(pages);
        let base = mem.page(0) as u64;
        let mut touched = Touched::new();
        // SAFETY: `mem`'s mapping, alive until the end of the test.
        let observe = |t: &mut Touched| unsafe { t.observe(base, len) }.unwrap();
        assert_eq!(observe(&mut touched), 0, "nothing used yet");
        for i in [1, 2, 5] {
            mem.write(i, 7);
        }
        assert_eq!(observe(&mut touched), 0);
        // Given back, as zero-page reclaim does.
        // SAFETY: pages 1 and 2 of the mapping.
        let rc = unsafe {
            libc::madvise(
                mem.page(1).cast(),
                2 * PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(observe(&mut touched), 2);
        // Written again: no longer saved.
        mem.write(2, 1);
        assert_eq!(observe(&mut touched), 1);
    }
}
