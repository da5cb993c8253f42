//! The guest's writes to the system-call MSRs (`mirror_driver::protocol::TRACED_MSRS`):
//! while an inspector traces them, KVM's MSR filter makes each write exit to the vmm,
//! whose vCPU thread reports it to the trace feed and then applies it with
//! KVM_SET_MSRS, so the guest sees exactly what it would have without tracing (a value
//! KVM refuses gets the #GP it would have got). Disarmed, there is no filter: the
//! guest's MSR writes cost what they cost before.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use mirror_driver::protocol::MsrWrite;
use mirror_driver::trace::TraceEvent;

use super::guest_view::GuestView;
use super::VcpuTrace;

/// Handles a guest write of `value` to `msr` that exited on vCPU `index` (the filter's
/// exit, the vCPU stopped at the `wrmsr`): applies it as KVM would have, and reports it
/// to `feed` with the MSR's previous value and where the vCPU wrote it from. Returns
/// whether KVM took the value; if not, the guest must get #GP, as it would have.
pub fn on_msr_write(fd: &VcpuFd, index: u8, msr: u32, value: u64, trace: Option<&VcpuTrace>) -> bool {
    let previous = read_msr(fd, msr).unwrap_or(0);
    let applied = write_msr(fd, msr, value);
    if let Some(trace) = trace {
        let (rip, rsp) = fd.get_regs().map_or((0, 0), |r| (r.rip, r.rsp));
        let cr3 = fd.get_sregs().map_or(0, |s| s.cr3);
        let stack = GuestView::new(fd, &trace.memory).stack_words(rsp);
        let write = MsrWrite { vcpu: u32::from(index), msr, value, previous, rip, cr3, stack, applied };
        trace.feed.report(TraceEvent::MsrWrite(write));
    }
    applied
}

/// One MSR, read as the host (no filter applies to the host).
fn read_msr(fd: &VcpuFd, msr: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: msr, ..Default::default() }]).ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
}

/// One MSR, written as the host; false where KVM refuses the value.
fn write_msr(fd: &VcpuFd, msr: u32, value: u64) -> bool {
    Msrs::from_entries(&[kvm_msr_entry { index: msr, data: value, ..Default::default() }])
        .ok()
        .and_then(|msrs| fd.set_msrs(&msrs).ok())
        == Some(1)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kvm_ioctls::{MsrExitReason, VcpuExit};
    use mirror_driver::trace::{TraceFeed, TraceLimits};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::{GuestRam, MemoryBackend};
    use crate::vstate::trace::GuestTrace;
    use crate::vstate::vm::Vm;

    const LSTAR: u32 = 0xc000_0082;
    const CODE: u64 = 0x1000;
    const STACK: u64 = 0x8000;

    /// vCPU 0 of `vm` in real mode with a flat code segment, its registers as `set`
    /// leaves them.
    pub(crate) fn real_mode_vcpu(vm: &Vm, set: impl FnOnce(&mut kvm_bindings::kvm_regs)) -> VcpuFd {
        let vcpu = vm.fd().create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        (sregs.cs.base, sregs.cs.selector) = (0, 0);
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        set(&mut regs);
        vcpu.set_regs(&regs).unwrap();
        vcpu
    }

    /// A real-mode vCPU about to run `wrmsr; hlt` at [`CODE`], writing `value` to LSTAR.
    fn vcpu_writing_lstar(vm: &Vm, value: u64) -> VcpuFd {
        real_mode_vcpu(vm, |regs| {
            (regs.rip, regs.rcx, regs.rax, regs.rdx) = (CODE, u64::from(LSTAR), value & 0xffff_ffff, value >> 32)
        })
    }

    pub(in crate::vstate::trace) fn vm_with_code() -> (Arc<Vm>, GuestRam) {
        let vm = Vm::new(std::path::Path::new("/dev/kvm")).expect("/dev/kvm (these tests need KVM)");
        let ram = GuestRam::with_backend(2 << 20, MemoryBackend::default()).unwrap();
        vm.register_ram(&ram).unwrap();
        ram.memory().write_slice(&[0x0f, 0x30, 0xf4], GuestAddress(CODE)).unwrap(); // wrmsr; hlt
        (Arc::new(vm), ram)
    }

    #[test]
    fn an_armed_msr_write_exits_is_reported_with_its_writer_and_is_applied() {
        let (vm, ram) = vm_with_code();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = GuestTrace::of_test_vm(&vm, feed.clone(), &ram);
        trace.arm_msr_writes(true).unwrap();
        let hook = 0xffff_ffff_c000_1000;
        let mut vcpu = vcpu_writing_lstar(&vm, hook);
        // The writer's stack: a return address and another word at RSP (real mode,
        // paging off: KVM_TRANSLATE maps RSP to itself).
        let mut regs = vcpu.get_regs().unwrap();
        regs.rsp = STACK;
        vcpu.set_regs(&regs).unwrap();
        ram.memory().write_obj(0xffff_ffff_c000_2040u64, GuestAddress(STACK)).unwrap();
        ram.memory().write_obj(0x1234u64, GuestAddress(STACK + 8)).unwrap();
        let vcpu_trace = trace.for_vcpu(ram.shared_memory());
        let (msr, value) = match vcpu.run().unwrap() {
            VcpuExit::X86Wrmsr(exit) => {
                assert_eq!(exit.reason, MsrExitReason::Filter);
                (exit.index, exit.data)
            }
            other => panic!("a traced LSTAR write must exit to the vmm, not {other:?}"),
        };
        assert_eq!((msr, value), (LSTAR, hook));
        assert!(on_msr_write(&vcpu, 0, msr, value, Some(&vcpu_trace)));
        assert_eq!(read_msr(&vcpu, LSTAR), Some(hook), "the write is applied");
        let (events, dropped) = feed.take(Duration::ZERO).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(
            events,
            vec![TraceEvent::MsrWrite(MsrWrite {
                vcpu: 0,
                msr: LSTAR,
                value: hook,
                previous: 0,
                rip: CODE,
                cr3: 0,
                stack: [0xffff_ffff_c000_2040, 0x1234, 0, 0],
                applied: true
            })]
        );
        // The guest goes on past its wrmsr.
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    }

    #[test]
    fn a_disarmed_trace_leaves_msr_writes_to_kvm() {
        let (vm, ram) = vm_with_code();
        let trace = GuestTrace::of_test_vm(&vm, Arc::new(TraceFeed::new(TraceLimits::default())), &ram);
        trace.arm_msr_writes(true).unwrap();
        trace.arm_msr_writes(false).unwrap();
        let mut vcpu = vcpu_writing_lstar(&vm, 0xffff_ffff_8120_0040);
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt), "no exit on the wrmsr once disarmed");
        assert_eq!(read_msr(&vcpu, LSTAR), Some(0xffff_ffff_8120_0040));
    }

    #[test]
    fn a_value_kvm_refuses_is_not_applied() {
        let (vm, ram) = vm_with_code();
        let vcpu = vm.fd().create_vcpu(0).unwrap();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let vcpu_trace = GuestTrace::of_test_vm(&vm, feed.clone(), &ram).for_vcpu(ram.shared_memory());
        // A non-canonical LSTAR: the guest would get #GP without tracing, and does with it.
        assert!(!on_msr_write(&vcpu, 0, LSTAR, 0x8000_0000_0000_0000, Some(&vcpu_trace)));
        let (events, _) = feed.take(Duration::ZERO).unwrap();
        assert!(matches!(events[..], [TraceEvent::MsrWrite(MsrWrite { applied: false, .. })]), "{events:?}");
    }
}
