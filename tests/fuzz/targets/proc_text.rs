//! The parsers of text kvmerge reads from /proc: ksm_stat, a task's stat (ksmd detection and
//! its CPU time), /proc/stat (idle CPUs; two readings separated by an empty line), smaps
//! `VmFlags` (`memory::vma_flags`), and the sysfs multiple-choice format, all on one input.

use std::num::NonZeroU64;

use kvmerge::fuzzing;
use kvmerge::memory::vma_flags;

const HZ: [u64; 4] = [1, 100, 250, 1000];

fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = fuzzing::ksm_stat(&text);
    for hz in HZ {
        let _ = fuzzing::task_stat(&text, NonZeroU64::new(hz).expect("non-zero"));
    }
    let (before, after) = text.split_once("\n\n").unwrap_or((&text, &text));
    if let Some(idle) = fuzzing::idle_cpus(before, after) {
        assert!(idle.is_finite() && idle >= 0.0, "idle CPUs {idle}");
    }
    for addr in [0, 0x7f00_0000_1000, u64::MAX] {
        let _ = vma_flags(&text, addr);
    }
    let choice = fuzzing::selected_choice(&text);
    assert!(choice.len() <= text.len());
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
