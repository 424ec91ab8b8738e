//! Deduplication: the host's KSM, the merge policy, zero-page reclaim, and per-VM accounting,
//! coordinated by the one merge thread of the process.

pub mod accounting;
pub mod cpu;
pub mod ksm;
pub mod merge;
pub mod policy;
pub mod procfs;
pub mod report;
pub mod touched;
pub mod zero;
