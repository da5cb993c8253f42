//! A doorbell between a ring-3 guest agent and its host: the guest blocks on
//! [`WAIT_PORT`] until the host rings; it writes [`DONE_PORT`] when it has
//! completed work. Neither side polls.
//!
//! The vmm knows nothing of it: an embedding program (the inspector) registers it on
//! [`PORTS`] like any other port-I/O device, through `VmConfig::extra_pio_devices`.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use specula_common::sync::lock;

use super::bus::{PioAction, PioContext, PioDevice, PortRange};

/// Guest writes here to sleep until the host rings.
pub const WAIT_PORT: u16 = 0x510;
/// Guest writes here after completing commands.
pub const DONE_PORT: u16 = 0x511;
/// Both ports, where the doorbell is registered.
pub const PORTS: PortRange = PortRange::new(WAIT_PORT, 2);
/// How often a vCPU waiting on the doorbell looks whether the VM is stopping or pausing.
const GUEST_WAIT_TICK: Duration = Duration::from_millis(10);

/// How long [`Doorbell::wait_until`] polls before it sleeps: about the time an OS
/// view (a 200-process listing) takes in the agent.
pub const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(300);

#[derive(Debug, Default)]
struct State {
    rung: bool,
    completions: u64,
}

/// The doorbell shared by the host and one guest vCPU.
#[derive(Debug, Default)]
pub struct Doorbell {
    state: Mutex<State>,
    changed: Condvar,
}

impl Doorbell {
    pub fn new() -> Self {
        Self::default()
    }

    /// Host: wakes the guest (or lets its next wait return at once).
    pub fn ring(&self) {
        lock(&self.state).rung = true;
        self.changed.notify_all();
    }

    /// Guest side, on the vCPU thread: waits for a ring, looking every `tick` whether
    /// `interrupted` (a stop or a pause of the VM) ends the wait. Returns true when it
    /// took a ring; false when interrupted, leaving a ring that comes later pending.
    pub fn guest_wait(&self, tick: Duration, interrupted: impl Fn() -> bool) -> bool {
        let mut state = lock(&self.state);
        while !state.rung {
            if interrupted() {
                return false;
            }
            state = self.changed.wait_timeout(state, tick).unwrap_or_else(|p| p.into_inner()).0;
        }
        state.rung = false;
        true
    }

    /// Guest side: records a completion and wakes host waiters.
    pub fn guest_done(&self) {
        lock(&self.state).completions += 1;
        self.changed.notify_all();
    }

    /// Host: waits until `done()` holds, re-checking on every completion; false on timeout.
    ///
    /// It polls `done()` for up to [`POLL_BEFORE_SLEEP`] before it sleeps, as KVM's halt
    /// polling does: most commands finish within that time, and a caller that never
    /// slept needs no wake-up (tens of microseconds each on an idle, virtualized host).
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let started = Instant::now();
        let deadline = started + timeout;
        let poll_until = started + POLL_BEFORE_SLEEP.min(timeout);
        while Instant::now() < poll_until {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        let mut state = lock(&self.state);
        loop {
            if done() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl PioDevice for Doorbell {
    fn name(&self) -> &str {
        "doorbell"
    }

    fn read(&self, _base: u16, _offset: u16, _data: &mut [u8]) {}

    /// A write to [`WAIT_PORT`] blocks the vCPU until a ring. A pause must not wait for
    /// the next ring: the wait gives way to it (and to a stop), and the ring stays
    /// pending until the vCPU runs again.
    fn write(&self, base: u16, offset: u16, _data: &[u8], context: &PioContext<'_>) -> PioAction {
        match base + offset {
            WAIT_PORT => {
                self.guest_wait(GUEST_WAIT_TICK, || context.interrupted());
            }
            DONE_PORT => self.guest_done(),
            _ => {}
        }
        PioAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let bell = Doorbell::new();
        bell.ring();
        assert!(bell.guest_wait(Duration::from_millis(10), || true), "the earlier ring is taken, not the stop");
        assert!(!bell.guest_wait(Duration::from_millis(10), || true), "and taken only once");
    }

    #[test]
    fn host_wakes_when_the_guest_completes() {
        let bell = Arc::new(Doorbell::new());
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, f) = (bell.clone(), flag.clone());
        let guest = std::thread::spawn(move || {
            assert!(b.guest_wait(Duration::from_millis(10), || false));
            f.store(true, std::sync::atomic::Ordering::SeqCst);
            b.guest_done();
        });
        bell.ring();
        assert!(bell.wait_until(Duration::from_secs(5), || flag.load(std::sync::atomic::Ordering::SeqCst)));
        guest.join().unwrap();
    }

    #[test]
    fn on_the_bus_the_wait_port_takes_a_ring_or_gives_way_and_the_done_port_completes() {
        let bell = Arc::new(Doorbell::new());
        let mut bus = crate::devices::PioBus::new();
        bus.insert(PORTS, bell.clone()).unwrap();
        let (running, interrupted) = (|| false, || true);
        bell.ring();
        assert_eq!(bus.write(WAIT_PORT, &[0], &PioContext::new(&running)), PioAction::Continue, "the ring is taken");
        assert!(!lock(&bell.state).rung);
        assert_eq!(bus.write(WAIT_PORT, &[0], &PioContext::new(&interrupted)), PioAction::Continue, "gave way");
        assert_eq!(bus.write(DONE_PORT, &[0], &PioContext::new(&running)), PioAction::Continue);
        assert_eq!(lock(&bell.state).completions, 1);
    }

    #[test]
    fn an_interruption_ends_the_guest_wait_and_a_later_ring_stays_pending() {
        let bell = Arc::new(Doorbell::new());
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, i) = (bell.clone(), interrupted.clone());
        let guest = std::thread::spawn(move || b.guest_wait(Duration::from_millis(1), || i.load(Ordering::SeqCst)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!guest.is_finished(), "the guest waits while nothing happens");
        interrupted.store(true, Ordering::SeqCst);
        assert!(!guest.join().unwrap(), "the wait ended by the interruption, not by a ring");
        bell.ring();
        assert!(bell.guest_wait(Duration::from_millis(1), || true), "the ring after the interruption is kept");
    }
}
