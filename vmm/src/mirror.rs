//! The source side of the mirror device, for this VMM: exports the RAM chunks,
//! answers vCPU-state requests from the vCPU threads' snapshots, and pauses the
//! vCPUs when the exporter re-homes a chunk.

use std::sync::Arc;

use mirror_driver::exporter::{ExportLimits, ExportPolicy, ExportRegion, Exporter, SourceVm, SourceVmError};
use mirror_driver::protocol::{trace_kind, Breakpoint, DirtyMechanism, Range, VcpuRegs};
use mirror_driver::trace::TraceFeed;

use crate::config::VmConfig;
use crate::memory::GuestRam;
use crate::vstate::ram_slots::{RamMemslots, RamSlotsError};
use crate::vstate::trace::GuestTrace;
use crate::vstate::vcpu::{Lifecycle, LifecycleError, VcpuSnapshot};

/// KVM's dirty log of the VM's RAM memslots, for the mirror's dirty-page feed.
pub struct DirtyLog {
    slots: Arc<RamMemslots>,
}

impl DirtyLog {
    /// The dirty log of guest RAM, through its memslots as they are at each call.
    pub fn new(slots: Arc<RamMemslots>) -> Self {
        Self { slots }
    }

    /// Starts (`on`) or stops KVM's dirty logging of every RAM memslot.
    fn set(&self, on: bool) -> Result<(), RamSlotsError> {
        self.slots.set_dirty_logging(on)?;
        if let Some(ring) = self.slots.vm().dirty_ring().filter(|_| !on) {
            // Writes between the last collection and now go to no one. Logging is off
            // whatever happens here: a failed discard only means a later subscriber may
            // hear of a few earlier writes (and the next harvest resets again).
            if let Err(e) = ring.discard() {
                log::warn!("mirror: dirty ring: {}", crate::error_chain(&e));
            }
        }
        Ok(())
    }

    /// How writes are learnt of.
    fn mechanism(&self) -> DirtyMechanism {
        let vm = self.slots.vm();
        if vm.dirty_ring().is_some() {
            DirtyMechanism::Ring
        } else if vm.manual_dirty_protect() {
            DirtyMechanism::BitmapManualProtect
        } else {
            DirtyMechanism::Bitmap
        }
    }

    /// Pages written since the last call, as runs in GPA order.
    fn take(&self) -> Result<Vec<Range>, RamSlotsError> {
        self.slots.take_dirty()
    }
}

/// Serves vCPU state and pauses from the VM's lifecycle, dirty pages from KVM, and
/// traced MSR writes from the vCPUs.
struct LifecycleSource(Arc<Lifecycle>, DirtyLog, Option<Arc<GuestTrace>>);

impl SourceVm for LifecycleSource {
    fn set_dirty_logging(&self, on: bool) -> Result<(), SourceVmError> {
        self.1.set(on).map_err(|e| SourceVmError::SetDirtyLogging { on, source: Box::new(e) })
    }

    fn take_dirty_pages(&self) -> Result<Vec<Range>, SourceVmError> {
        self.1.take().map_err(|e| SourceVmError::ReadDirtyLog(Box::new(e)))
    }

    fn dirty_mechanism(&self) -> DirtyMechanism {
        self.1.mechanism()
    }

    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceVmError> {
        let snapshots = self.0.snapshot_vcpus().map_err(source_vm_error)?;
        Ok(snapshots.into_iter().map(vcpu_regs).collect())
    }

    fn pause(&self) -> Result<(), SourceVmError> {
        self.0.pause().map_err(source_vm_error)
    }

    fn resume(&self) {
        self.0.resume()
    }

    fn trace_feed(&self) -> Option<Arc<TraceFeed>> {
        self.2.as_ref().map(|trace| trace.feed().clone())
    }

    fn arm_trace(&self, kinds: u32) -> Result<(), SourceVmError> {
        let trace = self.2.as_ref().ok_or(SourceVmError::NoTrace)?;
        trace
            .arm_msr_writes(kinds & trace_kind::MSR_WRITES != 0)
            .map_err(|e| SourceVmError::ArmTrace { kinds, source: Box::new(e) })
    }

    fn set_breakpoints(&self, software: bool, points: &[Breakpoint]) -> Result<(), SourceVmError> {
        let trace = self.2.as_ref().ok_or(SourceVmError::NoTrace)?;
        // Each vCPU arms them before it enters the guest again: those in the guest now
        // are kicked out for it.
        trace
            .breakpoints()
            .set(software, points, || {
                self.0.kick_vcpus();
            })
            .map_err(|e| SourceVmError::ArmTrace { kinds: trace_kind::BREAKPOINTS, source: Box::new(e) })
    }

    fn set_write_traps(&self, ranges: &[Range]) -> Result<u64, SourceVmError> {
        let trace = self.2.as_ref().ok_or(SourceVmError::NoTrace)?;
        // Memslots are replaced, not changed in place: no vCPU may run meanwhile.
        self.0.pause().map_err(source_vm_error)?;
        let armed = trace.write_traps().set(ranges);
        self.0.resume();
        armed.map_err(|e| SourceVmError::ArmTrace { kinds: trace_kind::WRITE_TRAPS, source: Box::new(e) })
    }
}

/// The exporter's word for a request the vCPUs did not answer.
fn source_vm_error(error: LifecycleError) -> SourceVmError {
    match error {
        LifecycleError::PauseTimeout { still_running, waited } => SourceVmError::PauseTimeout { still_running, waited },
        LifecycleError::SnapshotTimeout { waited } => SourceVmError::SnapshotTimeout { waited },
        LifecycleError::SnapshotStopping => SourceVmError::Stopping,
    }
}

/// A vCPU's registers as the mirror protocol carries them.
fn vcpu_regs(s: VcpuSnapshot) -> VcpuRegs {
    VcpuRegs {
        index: u32::from(s.index),
        rip: s.regs.rip,
        rflags: s.regs.rflags,
        gprs: [
            s.regs.rax, s.regs.rbx, s.regs.rcx, s.regs.rdx, s.regs.rsi, s.regs.rdi, s.regs.rsp, s.regs.rbp, s.regs.r8,
            s.regs.r9, s.regs.r10, s.regs.r11, s.regs.r12, s.regs.r13, s.regs.r14, s.regs.r15,
        ],
        cr0: s.sregs.cr0,
        cr2: s.sregs.cr2,
        cr3: s.sregs.cr3,
        cr4: s.sregs.cr4,
        efer: s.sregs.efer,
        fs_base: s.sregs.fs.base,
        gs_base: s.sregs.gs.base,
        kernel_gs_base: s.msrs.kernel_gs_base,
        star: s.msrs.star,
        lstar: s.msrs.lstar,
        cstar: s.msrs.cstar,
        fmask: s.msrs.fmask,
    }
}

/// The uids allowed to attach to the mirror socket (and to use the API socket):
/// those configured, or the vmm's own uid.
pub fn allowed_uids(config: &VmConfig) -> Vec<u32> {
    if config.mirror_allow_uids.is_empty() {
        // SAFETY: getuid cannot fail.
        vec![unsafe { libc::getuid() }]
    } else {
        config.mirror_allow_uids.clone()
    }
}

/// Starts the exporter on `config.mirror_socket`, if one was asked for.
pub fn start_exporter(
    config: &VmConfig,
    ram: &GuestRam,
    lifecycle: Arc<Lifecycle>,
    dirty_log: DirtyLog,
    trace: Option<Arc<GuestTrace>>,
) -> Result<Option<Arc<Exporter>>, mirror_driver::exporter::ExportError> {
    let Some(path) = &config.mirror_socket else { return Ok(None) };
    let regions = ram
        .regions()
        .iter()
        .map(|r| ExportRegion {
            gpa: r.guest_addr,
            len: r.size,
            file: ram.chunk_file(r.chunk).clone(),
            host_addr: r.host_addr,
        })
        .collect();
    let policy = ExportPolicy {
        allowed_uids: allowed_uids(config),
        ranges: config.mirror_policy.clone(),
        regrant_after_revoke: config.mirror_regrant,
        allow_pause: config.mirror_allow_pause,
        allow_trace: trace.is_some(),
        allow_trace_patches: trace.is_some() && config.mirror_allow_trace_patches,
    };
    let source = Arc::new(LifecycleSource(lifecycle, dirty_log, trace));
    let exporter = Exporter::start(path, regions, u32::from(config.cpus), policy, ExportLimits::default(), source)?;
    Ok(Some(Arc::new(exporter)))
}
