//! Locking shared state that a panicked thread may have left poisoned.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering it if a thread panicked while holding it.
///
/// Specula's shared state (device registers, grant tables, rings) stays consistent
/// between statements, so a panic in one holder (a vCPU thread, a client thread) must
/// not take every later user down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_recovered_with_its_value() {
        let mutex = Mutex::new(7);
        let panicked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut guard = mutex.lock().unwrap();
                    *guard = 8;
                    panic!("holder dies");
                })
                .join()
        });
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 8);
    }

    #[test]
    fn unsized_values_lock_too() {
        let mutex: &Mutex<[u8]> = &Mutex::new([1u8, 2]);
        assert_eq!(lock(mutex).len(), 2);
    }
}
