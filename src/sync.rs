//! Small helpers around std::sync shared by the crate.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks, ignoring poisoning: the data kvmerge guards with mutexes stays valid whatever a
/// panicking holder was doing, and a panic in one thread must not take the others down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
