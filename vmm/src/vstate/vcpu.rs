//! vCPUs: boot configuration, the KVM_RUN loop on its own thread, and the
//! kick (immediate_exit plus a signal) that stops it.

use std::cell::Cell;
use std::sync::{Arc, Once};

use kvm_bindings::{kvm_mp_state, kvm_run, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{MsrExitReason, VcpuExit, VcpuFd};
use vmm_sys_util::signal::register_signal_handler;

use super::dirty_ring::{DirtyRing, DirtyRingError};
pub use super::lifecycle::{kick_signal, Lifecycle, LifecycleError, VcpuSnapshot, VmExit, CRASH_EXIT_CODE};
use super::trace::{breakpoints, msr as msr_trace, VcpuTrace};
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::boot::KernelEntry;
use crate::devices::virtio::MmioBus;
use crate::devices::{PioAction, PioBus, PioContext};
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

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
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
    /// Where traced MSR writes are reported, when the VM may be traced.
    trace: Option<VcpuTrace>,
    /// KVM_RUN EFAULTs in a row that the memory fault handler said it mended.
    memory_fault_retries: u32,
}

/// EFAULTs in a row a vCPU retries after the handler mended one
/// ([`Lifecycle::on_memory_fault`]): memory that stays unmapped ends the VM.
const MAX_MEMORY_FAULT_RETRIES: u32 = 4;

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(index)).map_err(|source| VcpuError::Create { index, source })?;
        let dirty_ring = vm.dirty_ring().cloned();
        if let Some(ring) = &dirty_ring {
            ring.map_vcpu(&fd).map_err(|source| VcpuError::DirtyRing { index, source })?;
        }
        Ok(Self { index, fd, dirty_ring, trace: None, memory_fault_retries: 0 })
    }

    /// Reports this vCPU's traced events (see [`super::trace`]).
    pub fn set_trace(&mut self, trace: VcpuTrace) {
        self.trace = Some(trace);
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
    pub fn start(
        self,
        bus: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        lifecycle: Arc<Lifecycle>,
    ) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&bus, &mmio, &lifecycle))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self, bus: &PioBus, mmio: &MmioBus, lifecycle: &Lifecycle) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut last_published = 0;
        while !lifecycle.stopping() {
            lifecycle.serve_requests(&self.fd, self.index, &mut last_published);
            if let Some(trace) = self.trace.as_mut() {
                if let Err(e) = breakpoints::sync(&self.fd, trace) {
                    lifecycle.request_exit(VmExit::Crash(format!(
                        "vCPU {}: cannot arm the trace's breakpoints (KVM_SET_GUEST_DEBUG): {e}",
                        self.index
                    )));
                    break;
                }
            }
            if let Some(reason) = self.run_once(bus, mmio, lifecycle, &mut last_published) {
                lifecycle.request_exit(reason);
                break;
            }
        }
        // An ended vCPU never runs guest code again: pauses need not wait for it.
        lifecycle.set_quiescent(true);
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }

    /// Runs the vCPU until one exit is handled; returns a reason when the VM must end.
    fn run_once(
        &mut self,
        bus: &PioBus,
        mmio: &MmioBus,
        lifecycle: &Lifecycle,
        last_published: &mut u64,
    ) -> Option<VmExit> {
        let index = self.index;
        let exit = self.fd.run();
        if exit.is_ok() {
            self.memory_fault_retries = 0;
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::IoOut(port, _)) if port == u16::from(breakpoints::TRACE_PORT) && self.trace.is_some() => {
                let trace = self.trace.as_ref().expect("checked");
                if let Err(e) = breakpoints::on_trace_port(&self.fd, index, trace) {
                    return Some(VmExit::Crash(format!("vCPU {index}: a breakpoint hit could not be handled: {e}")));
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                // A device that blocks the vCPU (the agent doorbell) gives way to a stop or a pause.
                let give_way = || lifecycle.stopping() || lifecycle.is_paused();
                match bus.write(port, data, &PioContext::new(&give_way)) {
                    PioAction::Continue => {}
                    PioAction::Exit(status) => return Some(VmExit::GuestStatus(status)),
                    PioAction::PowerOff => return Some(VmExit::PowerOff),
                    PioAction::Reset => return Some(VmExit::Reset),
                    PioAction::Park => lifecycle.park(&self.fd, index, last_published),
                }
            }
            // Outside the virtio windows (and the in-kernel APICs) reads see an open bus.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff)
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) if mmio.write(addr, data) => {}
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let (mut bytes, len) = ([0u8; 8], data.len().min(8));
                bytes[..len].copy_from_slice(&data[..len]);
                // A write to a page the trace made read-only is the guest's own to RAM:
                // completed there; anything else is a device's.
                let trapped = self
                    .trace
                    .as_ref()
                    .is_some_and(|t| t.write_traps.on_mmio_write(&self.fd, index, addr, &bytes[..len], t));
                if !trapped {
                    log::debug!("vcpu{index}: MMIO write to unclaimed {addr:#x}")
                }
            }
            Ok(VcpuExit::X86Wrmsr(exit)) => {
                let (msr, value, filtered) = (exit.index, exit.data, exit.reason == MsrExitReason::Filter);
                // Only the trace's filter makes writes exit (KVM_CAP_X86_USER_SPACE_MSR is
                // enabled for no other reason); anything else gets the #GP KVM would give.
                let applied = filtered && msr_trace::on_msr_write(&self.fd, index, msr, value, self.trace.as_ref());
                if !applied {
                    // For KVM_EXIT_X86_WRMSR the union holds `msr`; KVM reads its `error`
                    // when the vCPU enters again (1: inject #GP).
                    self.fd.get_kvm_run().__bindgen_anon_1.msr.error = 1;
                }
            }
            Ok(VcpuExit::Debug(exit)) => {
                let outcome = match self.trace.as_mut() {
                    Some(trace) => breakpoints::on_debug_exit(&self.fd, index, &exit, trace),
                    None => Err(kvm_ioctls::Error::new(libc::ENOTSUP)),
                };
                if let Err(e) = outcome {
                    return Some(VmExit::Crash(format!("vCPU {index}: a debug exit could not be handled: {e}")));
                }
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
            // Memory behind a memslot that cannot be faulted in: the handler may replace it.
            Err(e)
                if e.errno() == libc::EFAULT
                    && self.memory_fault_retries < MAX_MEMORY_FAULT_RETRIES
                    && lifecycle.memory_fault_recovered(u32::from(index)) =>
            {
                self.memory_fault_retries += 1;
                log::info!("vcpu{index}: KVM_RUN met unmapped memory; its owner replaced it, running again");
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
