//! Deduplication: the host's KSM, the merge policy, zero-page reclaim, and per-VM accounting,
//! coordinated by the one merge thread of the process.

pub mod ksm;
pub mod zero;
