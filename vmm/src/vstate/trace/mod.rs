//! Agentless tracing of the guest, for inspectors the source lets trace it
//! (`--mirror-allow-trace`): its writes to the system-call MSRs ([`msr`]) and hardware
//! execution breakpoints with captures ([`breakpoints`]). Every vCPU reports to one
//! trace feed, which the mirror exporter drains. What no inspector asked for is not
//! armed: no MSR filter, no debug registers.

pub mod breakpoints;
pub mod guest_view;
pub mod msr;

use std::sync::Arc;

use mirror_driver::protocol::TRACED_MSRS;
use mirror_driver::trace::TraceFeed;
use vm_memory::GuestMemoryMmap;

use self::breakpoints::Breakpoints;
use super::vm::{Vm, VmError};

/// The trace state of one VM: its feed, what is armed, and how to arm it.
pub struct GuestTrace {
    vm: Arc<Vm>,
    feed: Arc<TraceFeed>,
    breakpoints: Arc<Breakpoints>,
}

impl GuestTrace {
    /// The trace of `vm`, whose guest RAM is `memory` (software breakpoints are
    /// written there).
    pub fn new(vm: Arc<Vm>, feed: Arc<TraceFeed>, memory: GuestMemoryMmap) -> Self {
        Self { vm, feed, breakpoints: Arc::new(Breakpoints::new(memory)) }
    }

    /// Where the vCPUs report.
    pub fn feed(&self) -> &Arc<TraceFeed> {
        &self.feed
    }

    /// The breakpoints the vCPUs arm.
    pub fn breakpoints(&self) -> &Arc<Breakpoints> {
        &self.breakpoints
    }

    /// Makes the guest's writes to the traced MSRs exit (`on`), or removes the filter.
    pub fn arm_msr_writes(&self, on: bool) -> Result<(), VmError> {
        let msrs: Vec<u32> = if on { TRACED_MSRS.iter().map(|(index, _)| *index).collect() } else { Vec::new() };
        self.vm.set_msr_write_exits(&msrs)
    }

    /// What one vCPU thread needs to report: the feed, the breakpoints, and guest RAM
    /// (to read what a hit captures).
    pub fn for_vcpu(&self, memory: GuestMemoryMmap) -> VcpuTrace {
        VcpuTrace {
            feed: self.feed.clone(),
            breakpoints: self.breakpoints.clone(),
            memory,
            applied_debug: 0,
            stepping: false,
        }
    }
}

/// One vCPU's side of the trace.
pub struct VcpuTrace {
    pub feed: Arc<TraceFeed>,
    pub breakpoints: Arc<Breakpoints>,
    pub memory: GuestMemoryMmap,
    /// The breakpoint generation this vCPU's debug registers hold.
    pub applied_debug: u64,
    /// Whether the vCPU is single-stepping past a breakpoint it hit.
    pub stepping: bool,
}
