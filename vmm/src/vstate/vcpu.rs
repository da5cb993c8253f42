//! vCPUs: boot configuration, the KVM_RUN loop on its own thread, and the
//! kick (immediate_exit plus a signal) that stops it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_run, kvm_sregs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::dirty_ring::{DirtyRing, DirtyRingError};
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::boot::KernelEntry;
use crate::devices::{PioAction, PioBus};
use crate::memory::GuestRam;

/// Failures while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the dirty ring of vCPU {index}")]
    DirtyRing {
        index: u8,
        #[source]
        source: DirtyRingError,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 on vCPU {index} failed")]
    SetCpuid {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("boot MSRs on vCPU {index}")]
    Msrs {
        index: u8,
        #[source]
        source: msr::MsrError,
    },
    #[error("boot registers on vCPU {index}")]
    Regs {
        index: u8,
        #[source]
        source: regs::RegsError,
    },
    #[error("LAPIC setup on vCPU {index}")]
    Lapic {
        index: u8,
        #[source]
        source: interrupts::InterruptError,
    },
    #[error("cannot make vCPU {index} read the host TSC (KVM_VCPU_TSC_OFFSET)")]
    TscOffset {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_SET_MP_STATE on vCPU {index} failed")]
    MpState {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
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
}

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
        })
    }

    /// Records the running vCPU threads, so requests can kick them.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        let count = threads.len();
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).published = vec![(0, None); count];
    }

    fn kick_all(&self) {
        for &thread in self.threads.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            // SAFETY: the threads are joined only after `begin_stop`, so each handle is live.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Registers of every vCPU, taken by kicking each out of KVM_RUN for a moment.
    pub fn snapshot_vcpus(&self) -> Result<Vec<VcpuSnapshot>, String> {
        let generation = {
            let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            req.wanted += 1;
            self.wanted.store(req.wanted, Ordering::SeqCst);
            req.wanted
        };
        self.parked.notify_all();
        self.kick_all();
        let req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let (req, timeout) = self
            .served
            .wait_timeout_while(req, REQUEST_TIMEOUT, |r| {
                !self.stopping() && r.published.iter().any(|(g, _)| *g < generation)
            })
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() || self.stopping() {
            return Err("not every vCPU answered the snapshot request".into());
        }
        Ok(req.published.iter().filter_map(|(_, s)| *s).collect())
    }

    /// Holds every vCPU outside KVM_RUN until [`Lifecycle::resume`]; holds nest (the API
    /// and the mirror device may both hold the VM). Returns once every vCPU is paused,
    /// parked or ended; on a timeout the hold is released again and nothing stays paused.
    pub fn pause(&self) -> Result<(), String> {
        {
            let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            req.pause_holds += 1;
            self.paused.store(true, Ordering::SeqCst);
        }
        self.parked.notify_all();
        self.kick_all();
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner()).len();
        let req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let (req, timeout) = self
            .served
            .wait_timeout_while(req, REQUEST_TIMEOUT, |r| !self.stopping() && r.quiescent < threads)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            let still_running = threads - req.quiescent;
            drop(req);
            self.resume();
            Err(format!("{still_running} vCPU(s) did not pause within {REQUEST_TIMEOUT:?}"))
        } else {
            Ok(())
        }
    }

    /// Releases one pause hold; the vCPUs run again when none is left.
    pub fn resume(&self) {
        let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        req.pause_holds = req.pause_holds.saturating_sub(1);
        if req.pause_holds == 0 {
            self.paused.store(false, Ordering::SeqCst);
        }
        self.served.notify_all();
    }

    /// Whether a pause hold is in place.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Counts the calling vCPU thread in or out of the quiescent set.
    fn set_quiescent(&self, quiescent: bool) {
        let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if quiescent {
            req.quiescent += 1;
        } else {
            req.quiescent -= 1;
        }
        self.served.notify_all();
    }

    /// Called by a vCPU thread between runs: publishes a snapshot if one is wanted,
    /// and holds the thread while the VM is paused.
    fn serve_requests(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        self.publish_if_wanted(vcpu, index, last_published);
        if !self.paused.load(Ordering::SeqCst) {
            return;
        }
        let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        req.quiescent += 1;
        self.served.notify_all();
        while self.paused.load(Ordering::SeqCst) && !self.stopping() {
            req = self.served.wait_timeout(req, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            if self.wanted.load(Ordering::SeqCst) > *last_published {
                drop(req);
                self.publish_if_wanted(vcpu, index, last_published);
                req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut req = self.requests.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(reason);
            let _ = self.exit_evt.write(1);
        }
    }

    /// The recorded exit reason, if any.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells every vCPU to stop and wakes the parked and paused ones.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        {
            let _guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
            self.parked.notify_all();
        }
        let _guard = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        self.served.notify_all();
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks the calling vCPU thread until the VM stops, still answering snapshot requests.
    fn park(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        // A parked vCPU runs no guest code until the VM stops: it counts as paused.
        self.set_quiescent(true);
        self.park_until_stop(vcpu, index, last_published);
        self.set_quiescent(false);
    }

    fn park_until_stop(&self, vcpu: &VcpuFd, index: u8, last_published: &mut u64) {
        let mut guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stopping() {
            if self.wanted.load(Ordering::SeqCst) > *last_published {
                drop(guard);
                self.publish_if_wanted(vcpu, index, last_published);
                guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            guard = self.parked.wait_timeout(guard, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping, set before KVM_RUN
            // and cleared before the VcpuFd is dropped; a volatile byte store is signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result.map_err(VcpuError::KickHandler)
}

/// One vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The VM's dirty ring, harvested here when this vCPU's ring fills.
    dirty_ring: Option<Arc<DirtyRing>>,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(index)).map_err(|source| VcpuError::Create { index, source })?;
        let dirty_ring = vm.dirty_ring().cloned();
        if let Some(ring) = &dirty_ring {
            ring.map_vcpu(&fd).map_err(|source| VcpuError::DirtyRing { index, source })?;
        }
        Ok(Self { index, fd, dirty_ring })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID, MSRs and the LAPIC; sets boot registers on the boot vCPU, and on every
    /// vCPU when the image asked for all of them to start at its entry.
    pub fn configure(
        &self,
        vm: &Vm,
        ram: &GuestRam,
        entry: &KernelEntry,
        cpu_count: u8,
        host_tsc: bool,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VcpuError::SupportedCpuid)?;
        cpuid::normalize(&mut cpuid, index, cpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        interrupts::set_lint(&self.fd).map_err(|source| VcpuError::Lapic { index, source })?;
        if host_tsc {
            // After the boot MSRs, which set the guest TSC to 0 through an offset.
            set_tsc_offset_zero(&self.fd).map_err(|source| VcpuError::TscOffset { index, source })?;
        }
        let starts_at_entry = index == 0 || entry.smp_entry_max_cpus.is_some();
        if starts_at_entry {
            let regs_err = |source| VcpuError::Regs { index, source };
            regs::setup_regs(&self.fd, entry.entry, entry.protocol).map_err(regs_err)?;
            regs::setup_sregs(ram.memory(), &self.fd, entry.protocol).map_err(regs_err)?;
            regs::setup_fpu(&self.fd).map_err(regs_err)?;
        }
        if index != 0 && starts_at_entry {
            // Application processors normally wait for INIT/SIPI; Specula images start them directly.
            let state = kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE };
            self.fd.set_mp_state(state).map_err(|source| VcpuError::MpState { index, source })?;
        }
        Ok(())
    }

    /// Spawns the thread that runs this vCPU until the VM stops.
    pub fn start(self, bus: Arc<PioBus>, lifecycle: Arc<Lifecycle>) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&bus, &lifecycle))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, bus: &PioBus, lifecycle: &Lifecycle) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut last_published = 0;
        while !lifecycle.stopping() {
            lifecycle.serve_requests(&self.fd, self.index, &mut last_published);
            if let Some(reason) = self.run_once(bus, lifecycle, &mut last_published) {
                lifecycle.request_exit(reason);
                break;
            }
        }
        // An ended vCPU never runs guest code again: pauses need not wait for it.
        lifecycle.set_quiescent(true);
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }

    /// Runs the vCPU until one exit is handled; returns a reason when the VM must end.
    fn run_once(&mut self, bus: &PioBus, lifecycle: &Lifecycle, last_published: &mut u64) -> Option<VmExit> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => match bus.write(port, data) {
                PioAction::Continue => {}
                PioAction::Exit(status) => return Some(VmExit::GuestStatus(status)),
                PioAction::PowerOff => return Some(VmExit::PowerOff),
                PioAction::Reset => return Some(VmExit::Reset),
                PioAction::Park => lifecycle.park(&self.fd, index, last_published),
                PioAction::DoorbellWait => {
                    if let Some(bell) = bus.doorbell() {
                        // A pause must not wait for the next ring: the wait gives way to it
                        // and the ring stays pending until the vCPU runs again.
                        bell.guest_wait(Duration::from_millis(10), || lifecycle.stopping() || lifecycle.is_paused());
                    }
                }
            },
            // Nothing is mapped in the MMIO gap but the in-kernel APICs: reads see an open bus.
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(addr, _)) => {
                log::debug!("vcpu{index}: MMIO write to unclaimed {addr:#x}")
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                return Some(VmExit::Crash(format!("vCPU {index} shut down (triple fault) near RIP {rip:#x}")));
            }
            Ok(VcpuExit::InternalError) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the union holds `internal`.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = if suberror == 1 { "instruction emulation failed" } else { "KVM internal error" };
                return Some(VmExit::Crash(format!("vCPU {index}: {what} (suberror {suberror}) at RIP {rip:#x}")));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VmExit::Crash(format!(
                    "vCPU {index}: VM entry failed, reason {reason:#x} on host CPU {cpu}"
                )));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    other => VmExit::Crash(format!("vCPU {index}: system event {other}")),
                });
            }
            // KVM stops a vCPU whose dirty ring is nearly full until someone harvests it:
            // this thread does, rather than wait for the collector (which may also have
            // harvested since; then there is nothing left, and KVM_RUN goes on).
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                if let Err(e) = self.dirty_ring.as_ref().map_or(Ok(0), |ring| ring.harvest()) {
                    return Some(VmExit::Crash(format!("vCPU {index}: {}", crate::error_chain(&e))));
                }
            }
            Ok(other) => return Some(VmExit::Crash(format!("vCPU {index}: unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Some(VmExit::Crash(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
        None
    }
}

vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe1, kvm_bindings::kvm_device_attr);

/// Makes the guest TSC read exactly the host TSC (offset 0), so that timestamps
/// taken in different VMs compare.
fn set_tsc_offset_zero(vcpu: &VcpuFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let offset: u64 = 0;
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: &offset as *const u64 as u64,
        flags: 0,
    };
    // SAFETY: KVM_SET_DEVICE_ATTR on a vCPU fd with a valid attr that points at a live u64.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_DEVICE_ATTR(), &attr) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
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
    fn exit_codes() {
        assert_eq!(VmExit::GuestStatus(42).exit_code(), 42);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Stopped("SIGTERM").exit_code(), 0);
        assert_eq!(VmExit::Crash("x".into()).exit_code(), CRASH_EXIT_CODE);
    }
}
