//! The VM's lifecycle, shared by the vCPU threads and the event loop: who ended the
//! VM, whether the vCPUs stop or pause, and snapshots of their registers taken between
//! two KVM_RUNs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use specula_common::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::msr;

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler is installed by
/// `vcpu::install_kick_handler`).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Why a request to every vCPU (a pause, a register snapshot) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// Some vCPUs did not leave KVM_RUN within `waited`; the pause hold was released
    /// again, so nothing stays paused.
    #[error("{still_running} vCPU(s) did not pause within {waited:?}")]
    PauseTimeout { still_running: usize, waited: Duration },
    /// Not every vCPU published its registers within `waited`.
    #[error("not every vCPU answered the snapshot request")]
    SnapshotTimeout { waited: Duration },
    /// The VM began stopping before every vCPU published its registers.
    #[error("not every vCPU answered the snapshot request")]
    SnapshotStopping,
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the debug-exit port.
    GuestStatus(u8),
    /// The guest reset the machine (ACPI reset register, i8042 pulse, or KVM's reset event).
    Reset,
    /// The guest powered the machine off (ACPI S5 through the FADT's sleep control register).
    PowerOff,
    /// The host asked the VM to stop (SIGINT/SIGTERM, or a library caller).
    Stopped(&'static str),
    /// The guest crashed or KVM could not go on.
    Crash(String),
}

impl VmExit {
    /// The `vmm` process exit code for this end: the guest's status, 0 for a power-off, a
    /// reset or a requested stop, [`CRASH_EXIT_CODE`] for a guest crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestStatus(status) => i32::from(*status),
            VmExit::Reset | VmExit::PowerOff | VmExit::Stopped(_) => 0,
            VmExit::Crash(_) => CRASH_EXIT_CODE,
        }
    }
}

/// Exit code when the guest crashed (triple fault, emulation failure, failed entry).
pub const CRASH_EXIT_CODE: i32 = 3;

/// A vCPU's registers at one moment.
#[derive(Debug, Clone, Copy)]
pub struct VcpuSnapshot {
    pub index: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// KERNEL_GS_BASE (what SWAPGS swaps in) and the system-call MSRs; all 0 if KVM
    /// would not tell.
    pub msrs: msr::SyscallMsrs,
}

/// Requests the vCPU threads serve between two KVM_RUNs.
struct Requests {
    /// Generation of the newest snapshot request.
    wanted: u64,
    /// Per vCPU: the generation it last published, and what it published.
    published: Vec<(u64, Option<VcpuSnapshot>)>,
    /// Pause holds taken and not yet released; vCPUs run only when it is 0.
    pause_holds: u32,
    /// vCPUs that run no guest code until a resume or a stop: held by a pause, parked
    /// by the guest, or ended. A pause is complete when every vCPU is counted here.
    quiescent: usize,
}

/// How long a snapshot or pause waits for every vCPU.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared by the vCPU threads and the event loop: who ended the VM, whether to
/// stop or pause, and snapshots of vCPU registers.
pub struct Lifecycle {
    stopping: AtomicBool,
    paused: AtomicBool,
    wanted: AtomicU64,
    exit: Mutex<Option<VmExit>>,
    parked: Condvar,
    exit_evt: EventFd,
    requests: Mutex<Requests>,
    served: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Held (shared) by a device while it touches guest RAM; a pause takes it
    /// exclusively once, so no device write is in flight when a pause returns.
    device_work: RwLock<()>,
    /// Written when the last pause hold goes: devices serve what waited meanwhile.
    resume_evt: EventFd,
    /// Devices whose RAM writes the kernel makes (vhost), where `device_work` cannot
    /// reach: called with `true` at each pause and `false` when the last hold goes.
    pause_hooks: Mutex<Vec<PauseHook>>,
    /// Asked when KVM_RUN fails with EFAULT; see [`Lifecycle::on_memory_fault`].
    memory_fault: Mutex<Option<Arc<MemoryFaultHandler>>>,
}

/// See [`Lifecycle::on_pause`].
pub type PauseHook = Box<dyn Fn(bool) + Send + Sync>;

/// See [`Lifecycle::on_memory_fault`]: given the vCPU's index, whether the memory
/// behind the fault was replaced so that the vCPU may run again.
pub type MemoryFaultHandler = dyn Fn(u32) -> bool + Send + Sync;

impl Lifecycle {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            wanted: AtomicU64::new(0),
            exit: Mutex::new(None),
            parked: Condvar::new(),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            requests: Mutex::new(Requests { wanted: 0, published: Vec::new(), pause_holds: 0, quiescent: 0 }),
            served: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            device_work: RwLock::new(()),
            resume_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            pause_hooks: Mutex::new(Vec::new()),
            memory_fault: Mutex::new(None),
        })
    }

    /// Has `hook(true)` called when a pause holds the VM (after the device work in
    /// flight ended), and `hook(false)` when the last hold goes: a device that writes
    /// RAM outside the vmm's threads stops and starts with it.
    pub fn on_pause(&self, hook: PauseHook) {
        lock(&self.pause_hooks).push(hook);
    }

    fn run_pause_hooks(&self, paused: bool) {
        for hook in lock(&self.pause_hooks).iter() {
            hook(paused);
        }
    }

    /// Records the running vCPU threads, so requests can kick them.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        let count = threads.len();
        *lock(&self.threads) = threads;
        lock(&self.requests).published = vec![(0, None); count];
    }

    /// Kicks every vCPU out of KVM_RUN once, so that each serves what was asked of it
    /// (arming the trace's breakpoints, say) before it enters the guest again.
    /// Returns how many vCPU threads it signalled.
    pub fn kick_vcpus(&self) -> usize {
        self.kick_all()
    }

    /// Signals every vCPU thread still registered; returns how many it signalled.
    fn kick_all(&self) -> usize {
        let threads = lock(&self.threads);
        for &thread in threads.iter() {
            // SAFETY: a handle stays registered only until `forget_threads`, which takes
            // this lock before anyone joins the thread, so each one here is live.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
        threads.len()
    }

    /// Sets who decides about a vCPU whose KVM_RUN failed with EFAULT: host memory
    /// behind one of its memslots that cannot be faulted in (a kernel mirror mapping
    /// whose source exited, say). Without one, or when it answers `false`, the VM ends
    /// as crashed; `true` means the memory was replaced (zero pages, say) and the vCPU
    /// runs again, a bounded number of times in a row.
    pub fn on_memory_fault(&self, handler: Arc<MemoryFaultHandler>) {
        *lock(&self.memory_fault) = Some(handler);
    }

    /// Asks the memory fault handler about vCPU `index` (see [`Lifecycle::on_memory_fault`]).
    pub fn memory_fault_recovered(&self, index: u32) -> bool {
        let handler = lock(&self.memory_fault).clone();
        handler.is_some_and(|h| h(index))
    }

    /// Unregisters the vCPU threads, which the caller is about to join: a pthread_t of a
    /// joined thread must never be signalled (its descriptor may be freed). Later kicks,
    /// from a pause or a trace disarm that races the VM's end, signal no one.
    pub fn forget_threads(&self) {
        lock(&self.threads).clear();
    }

    /// Registers of every vCPU, taken by kicking each out of KVM_RUN for a moment.
    pub fn snapshot_vcpus(&self) -> Result<Vec<VcpuSnapshot>, LifecycleError> {
        let generation = {
            let mut req = lock(&self.requests);
            req.wanted += 1;
            self.wanted.store(req.wanted, Ordering::SeqCst);
            req.wanted
        };
        self.parked.notify_all();
        self.kick_all();
        let req = lock(&self.requests);
        let (req, timeout) = self
            .served
            .wait_timeout_while(req, REQUEST_TIMEOUT, |r| {
                !self.stopping() && r.published.iter().any(|(g, _)| *g < generation)
            })
            .unwrap_or_else(|p| p.into_inner());
        if self.stopping() {
            return Err(LifecycleError::SnapshotStopping);
        }
        if timeout.timed_out() {
            return Err(LifecycleError::SnapshotTimeout { waited: REQUEST_TIMEOUT });
        }
        Ok(req.published.iter().filter_map(|(_, s)| *s).collect())
    }

    /// Holds every vCPU outside KVM_RUN until [`Lifecycle::resume`]; holds nest (the API
    /// and the mirror device may both hold the VM). Returns once every vCPU is paused,
    /// parked or ended; on a timeout the hold is released again and nothing stays paused.
    pub fn pause(&self) -> Result<(), LifecycleError> {
        {
            let mut req = lock(&self.requests);
            req.pause_holds += 1;
            self.paused.store(true, Ordering::SeqCst);
        }
        // Devices start no work once `paused` is set; wait out the one in flight.
        drop(self.device_work.write().unwrap_or_else(PoisonError::into_inner));
        self.run_pause_hooks(true);
        self.parked.notify_all();
        self.kick_all();
        let threads = lock(&self.threads).len();
        let req = lock(&self.requests);
        let (req, timeout) = self
            .served
            .wait_timeout_while(req, REQUEST_TIMEOUT, |r| !self.stopping() && r.quiescent < threads)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            let still_running = threads - req.quiescent;
            drop(req);
            self.resume();
            Err(LifecycleError::PauseTimeout { still_running, waited: REQUEST_TIMEOUT })
        } else {
            Ok(())
        }
    }

    /// Releases one pause hold; the vCPUs run again when none is left.
    pub fn resume(&self) {
        let mut req = lock(&self.requests);
        req.pause_holds = req.pause_holds.saturating_sub(1);
        if req.pause_holds == 0 && self.paused.swap(false, Ordering::SeqCst) {
            // Under the requests lock: a pause that comes next runs its hooks after.
            self.run_pause_hooks(false);
            let _ = self.resume_evt.write(1);
        }
        self.served.notify_all();
    }

    /// Leave for a device to touch guest RAM (serve its queues): `None` while the VM
    /// is paused, when the device must wait for [`Lifecycle::resume_evt`]. A pause
    /// waits for every leave given out to be dropped.
    pub fn device_work(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let leave = self.device_work.read().unwrap_or_else(PoisonError::into_inner);
        (!self.is_paused()).then_some(leave)
    }

    /// Readable after the VM resumes from a pause.
    pub fn resume_evt(&self) -> &EventFd {
        &self.resume_evt
    }

    /// Whether a pause hold is in place.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Counts the calling vCPU thread in or out of the quiescent set.
    pub(super) fn set_quiescent(&self, quiescent: bool) {
        let mut req = lock(&self.requests);
        if quiescent {
            req.quiescent += 1;
        } else {
            req.quiescent -= 1;
        }
        self.served.notify_all();
    }

    /// Called by a vCPU thread between runs: publishes a snapshot if one is wanted,
    /// and holds the thread while the VM is paused.
    pub(super) fn serve_requests(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        self.publish_if_wanted(vcpu, index, last_published);
        if !self.paused.load(Ordering::SeqCst) {
            return;
        }
        let mut req = lock(&self.requests);
        req.quiescent += 1;
        self.served.notify_all();
        while self.paused.load(Ordering::SeqCst) && !self.stopping() {
            req = self.served.wait_timeout(req, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            if self.wanted.load(Ordering::SeqCst) > *last_published {
                drop(req);
                self.publish_if_wanted(vcpu, index, last_published);
                req = lock(&self.requests);
            }
        }
        req.quiescent -= 1;
    }

    /// Publishes a snapshot if one newer than this vCPU's last is wanted; true if it did.
    fn publish_if_wanted(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) -> bool {
        let wanted = self.wanted.load(Ordering::SeqCst);
        if wanted <= *last_published {
            return false;
        }
        self.publish(vcpu, index, wanted);
        *last_published = wanted;
        true
    }

    fn publish(&self, vcpu: &VcpuFd, index: u8, generation: u64) {
        let snapshot = match (vcpu.get_regs(), vcpu.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                Some(VcpuSnapshot { index, regs, sregs, msrs: msr::syscall_msrs(vcpu).unwrap_or_default() })
            }
            _ => None,
        };
        let mut req = lock(&self.requests);
        if let Some(slot) = req.published.get_mut(usize::from(index)) {
            *slot = (generation, snapshot);
        }
        self.served.notify_all();
    }

    /// Readable once an exit has been requested.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Records why the VM ends (the first reason wins) and wakes the event loop.
    pub fn request_exit(&self, reason: VmExit) {
        let mut exit = lock(&self.exit);
        if exit.is_none() {
            *exit = Some(reason);
            let _ = self.exit_evt.write(1);
        }
    }

    /// The recorded exit reason, if any.
    pub fn exit_reason(&self) -> Option<VmExit> {
        lock(&self.exit).clone()
    }

    /// Tells every vCPU to stop and wakes the parked and paused ones.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        {
            let _guard = lock(&self.exit);
            self.parked.notify_all();
        }
        let _guard = lock(&self.requests);
        self.served.notify_all();
    }

    /// Whether the VM is stopping: the vCPUs leave their run loops.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks the calling vCPU thread until the VM stops, still answering snapshot requests.
    pub(super) fn park(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        // A parked vCPU runs no guest code until the VM stops: it counts as paused.
        self.set_quiescent(true);
        self.park_until_stop(vcpu, index, last_published);
        self.set_quiescent(false);
    }

    fn park_until_stop(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        let mut guard = lock(&self.exit);
        while !self.stopping() {
            if self.wanted.load(Ordering::SeqCst) > *last_published {
                drop(guard);
                self.publish_if_wanted(vcpu, index, last_published);
                guard = lock(&self.exit);
                continue;
            }
            guard = self.parked.wait_timeout(guard, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_reason_wins_and_signals_the_event() {
        let life = Lifecycle::new().unwrap();
        life.request_exit(VmExit::GuestStatus(7));
        life.request_exit(VmExit::Reset);
        assert_eq!(life.exit_reason(), Some(VmExit::GuestStatus(7)));
        assert_eq!(life.exit_evt().read().unwrap(), 1);
    }

    #[test]
    fn requests_fail_with_the_text_the_tests_of_a_stuck_vcpu_look_for() {
        let text = "not every vCPU answered the snapshot request";
        assert_eq!(LifecycleError::SnapshotTimeout { waited: REQUEST_TIMEOUT }.to_string(), text);
        assert_eq!(LifecycleError::SnapshotStopping.to_string(), text);
        let pause = LifecycleError::PauseTimeout { still_running: 2, waited: REQUEST_TIMEOUT };
        assert_eq!(pause.to_string(), "2 vCPU(s) did not pause within 2s");
    }

    #[test]
    fn without_vcpu_threads_requests_are_answered_at_once() {
        let life = Lifecycle::new().unwrap();
        assert_eq!(life.snapshot_vcpus().unwrap().len(), 0);
        life.pause().unwrap();
        assert!(life.is_paused());
        life.resume();
        life.begin_stop();
        assert_eq!(life.snapshot_vcpus().unwrap_err(), LifecycleError::SnapshotStopping);
    }

    /// A device that writes RAM from the kernel (vhost) is stopped by every pause and
    /// started again only when the last of nested holds goes.
    #[test]
    fn pause_hooks_stop_at_each_pause_and_start_at_the_last_resume() {
        let life = Lifecycle::new().unwrap();
        let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        life.on_pause(Box::new(move |paused| seen.lock().unwrap().push(paused)));
        life.pause().unwrap();
        life.pause().unwrap();
        life.resume();
        assert_eq!(*calls.lock().unwrap(), [true, true], "one hold remains: still stopped");
        life.resume();
        assert_eq!(*calls.lock().unwrap(), [true, true, false]);
        life.resume();
        assert_eq!(calls.lock().unwrap().len(), 3, "a resume without a hold starts nothing");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExit::GuestStatus(42).exit_code(), 42);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Stopped("SIGTERM").exit_code(), 0);
        assert_eq!(VmExit::Crash("x".into()).exit_code(), CRASH_EXIT_CODE);
    }
}
