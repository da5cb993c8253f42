//! Agentless tracing of the guest, for inspectors the source lets trace it
//! (`--mirror-allow-trace`): its writes to the system-call MSRs ([`msr`]), execution
//! breakpoints with captures ([`breakpoints`]) and its writes to trapped ranges of
//! guest RAM ([`write_traps`]). Every vCPU reports to one
//! trace feed, which the mirror exporter drains. What no inspector asked for is not
//! armed: no MSR filter, no debug registers, no read-only memslots.

pub mod breakpoints;
pub mod guest_view;
pub mod msr;
pub mod write_traps;

use std::sync::Arc;

use mirror_driver::protocol::TRACED_MSRS;
use mirror_driver::trace::TraceFeed;

use self::breakpoints::Breakpoints;
use self::write_traps::WriteTraps;
use super::ram_slots::RamMemslots;
use super::vm::{Vm, VmError};
use crate::memory::SharedMemory;

/// The trace state of one VM: its feed, what is armed, and how to arm it.
pub struct GuestTrace {
    vm: Arc<Vm>,
    feed: Arc<TraceFeed>,
    breakpoints: Arc<Breakpoints>,
    write_traps: Arc<WriteTraps>,
}

impl GuestTrace {
    /// The trace of `vm`, whose guest RAM is `memory` (software breakpoints are
    /// written there) in the memslots `slots` (write traps make pieces read-only).
    /// `memory` keeps guest RAM mapped: an inspector's connection may disarm the
    /// breakpoints (reading and writing RAM) after the VM ended and its owner let go.
    pub fn new(vm: Arc<Vm>, feed: Arc<TraceFeed>, memory: SharedMemory, slots: Arc<RamMemslots>) -> Self {
        Self {
            vm,
            feed,
            breakpoints: Arc::new(Breakpoints::new(memory)),
            write_traps: Arc::new(WriteTraps::new(slots)),
        }
    }

    /// The trace of a test VM whose RAM `ram` was registered first (its memslots are
    /// the first numbers).
    #[cfg(test)]
    pub(crate) fn of_test_vm(vm: &Arc<Vm>, feed: Arc<TraceFeed>, ram: &crate::memory::GuestRam) -> Self {
        let slots: Vec<u32> = (0..ram.slots().len() as u32).collect();
        let memslots = Arc::new(RamMemslots::new(vm.clone(), ram, &slots));
        Self::new(vm.clone(), feed, ram.shared_memory(), memslots)
    }

    /// The write traps the vCPUs complete.
    pub fn write_traps(&self) -> &Arc<WriteTraps> {
        &self.write_traps
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
    pub fn for_vcpu(&self, memory: SharedMemory) -> VcpuTrace {
        VcpuTrace {
            feed: self.feed.clone(),
            breakpoints: self.breakpoints.clone(),
            write_traps: self.write_traps.clone(),
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
    pub write_traps: Arc<WriteTraps>,
    pub memory: SharedMemory,
    /// The breakpoint generation this vCPU's debug registers hold.
    pub applied_debug: u64,
    /// Whether the vCPU is single-stepping past a breakpoint it hit.
    pub stepping: bool,
}
