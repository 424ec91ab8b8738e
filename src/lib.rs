//! kvmerge: a KVM mini-hypervisor that boots several lightweight guests in one process and
//! deduplicates their memory.
//!
//! The boot path, in reading order: `cli` → `runner` (pre-flight, fleet, control loop) → `vm`
//! (the build recipe) → `arch` (x86_64 boot state) → `vcpu` (threads and exits) → `devices`.

pub mod arch;
pub mod cli;
pub mod config;
pub mod console;
pub mod dedup;
pub mod devices;
pub mod fleet;
/// Entry points for tests/fuzz; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod output;
pub mod pressure;
pub mod runner;
pub mod sched;
pub mod seccomp;
pub mod serve;
pub mod sync;
pub mod terminal;
pub mod vcpu;
pub mod vm;
