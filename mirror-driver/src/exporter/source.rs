//! What the exporter asks of the source VM, and how that fails.

use std::time::Duration;

use std::sync::Arc;

use crate::protocol::{Breakpoint, DirtyMechanism, Range, VcpuRegs};
use crate::trace::TraceFeed;

/// Any error a source VM wraps (its KVM ioctl errors, say): kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the source VM could not do what the exporter asked of it. Callers tell the cases
/// apart by variant, never by message text.
#[derive(Debug, thiserror::Error)]
pub enum SourceVmError {
    /// Some vCPUs did not leave KVM_RUN within `waited`; the pause hold was released
    /// again, so nothing stays paused.
    #[error("{still_running} vCPU(s) did not pause within {waited:?}")]
    PauseTimeout { still_running: usize, waited: Duration },
    /// Not every vCPU published its registers within `waited`.
    #[error("not every vCPU answered the snapshot request within {waited:?}")]
    SnapshotTimeout { waited: Duration },
    /// The source VM is shutting down: its vCPUs serve no more requests.
    #[error("the source VM is stopping")]
    Stopping,
    /// This source keeps no dirty log (the default of [`SourceVm::set_dirty_logging`]
    /// and [`SourceVm::take_dirty_pages`]).
    #[error("this source keeps no dirty log")]
    NoDirtyLog,
    /// KVM refused to start (`on`) or stop dirty logging of guest RAM (the memslot
    /// flags ioctl).
    #[error("cannot turn dirty logging {}", if *on { "on" } else { "off" })]
    SetDirtyLogging {
        on: bool,
        #[source]
        source: BoxError,
    },
    /// Reading or re-protecting the dirty log failed (KVM_GET_DIRTY_LOG,
    /// KVM_CLEAR_DIRTY_LOG, or a dirty-ring harvest and reset).
    #[error("cannot read the dirty log")]
    ReadDirtyLog(#[source] BoxError),
    /// This source cannot trace its guest (the default of [`SourceVm::trace_feed`] and
    /// [`SourceVm::arm_trace`]).
    #[error("this source cannot trace its guest")]
    NoTrace,
    /// KVM refused to arm or disarm what the trace kinds `kinds` need (the MSR filter,
    /// say).
    #[error("cannot arm tracing of kinds {kinds:#x}")]
    ArmTrace {
        kinds: u32,
        #[source]
        source: BoxError,
    },
}

/// What the exporter asks of the source VM.
pub trait SourceVm: Send + Sync {
    /// Registers of every vCPU.
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceVmError>;
    /// Holds every vCPU outside KVM_RUN until [`SourceVm::resume`]; holds nest.
    fn pause(&self) -> Result<(), SourceVmError>;
    /// Releases one hold taken by [`SourceVm::pause`].
    fn resume(&self);
    /// Starts (`true`) or stops KVM dirty logging of guest RAM.
    fn set_dirty_logging(&self, _on: bool) -> Result<(), SourceVmError> {
        Err(SourceVmError::NoDirtyLog)
    }
    /// Pages the guest wrote since the last call (or since logging started), as runs in
    /// GPA order.
    fn take_dirty_pages(&self) -> Result<Vec<Range>, SourceVmError> {
        Err(SourceVmError::NoDirtyLog)
    }
    /// How [`SourceVm::take_dirty_pages`] learns of writes.
    fn dirty_mechanism(&self) -> DirtyMechanism {
        DirtyMechanism::Bitmap
    }
    /// Where the source's vCPUs report trace events, if it can trace.
    fn trace_feed(&self) -> Option<Arc<TraceFeed>> {
        None
    }
    /// Arms exactly the trace kinds `kinds` (bits of [`crate::protocol::trace_kind`]);
    /// 0 disarms everything, so tracing off costs the guest nothing.
    fn arm_trace(&self, _kinds: u32) -> Result<(), SourceVmError> {
        Err(SourceVmError::NoTrace)
    }
    /// Arms exactly these execution breakpoints on every vCPU, in the debug registers
    /// or (`software`) as `int3`s over no-op instructions (none: disarms; the exporter
    /// keeps to `protocol::MAX_BREAKPOINTS`); each hit is reported to the trace feed
    /// with what its captures read.
    fn set_breakpoints(&self, _software: bool, _points: &[Breakpoint]) -> Result<(), SourceVmError> {
        Err(SourceVmError::NoTrace)
    }
    /// Traps the guest's writes to exactly these guest-physical ranges (none: disarms;
    /// the exporter checks them against RAM and `protocol::MAX_WRITE_TRAP_BYTES`): their
    /// pages become read-only to the guest, each write is completed by the source as the
    /// guest asked, and those that touch a range are reported to the trace feed. Returns
    /// the pages trapped.
    fn set_write_traps(&self, _ranges: &[Range]) -> Result<u64, SourceVmError> {
        Err(SourceVmError::NoTrace)
    }
}
