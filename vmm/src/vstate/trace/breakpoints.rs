//! Hardware execution breakpoints (KVM_SET_GUEST_DEBUG with the debug registers): the
//! inspector sets up to four guest virtual addresses, each with what to capture when a
//! vCPU reaches it; nothing is written into guest memory. A hit exits to the vCPU's
//! thread, which reads the captures through the vCPU's own translation, reports the hit
//! and resumes the guest past the breakpoint (RFLAGS.RF).
//!
//! While breakpoints are armed, KVM loads ours into the debug registers and keeps the
//! guest's own DR0-DR7 values aside: the guest reads back what it wrote, but its own
//! breakpoints do not fire (a debugger inside the guest would see none), and every #DB
//! the guest raises exits here. One that is not ours (a single step, `int1`) is given
//! back to the guest as it would have been delivered. Disarmed, the guest's debug
//! registers are its own again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_regs, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;
use mirror_driver::protocol::{
    Breakpoint, BreakpointHit, Capture, CaptureKind, Captured, CAPTURE_BASE_GS, MAX_BREAKPOINTS, MAX_CAPTURE_STRINGS,
};
use mirror_driver::trace::TraceEvent;
use specula_common::sync::lock;

use super::guest_view::GuestView;
use super::VcpuTrace;

/// DR6.BS: the #DB is a single step's.
const DR6_BS: u64 = 1 << 14;
/// DR7 bit 10 always reads 1.
const DR7_FIXED_1: u64 = 1 << 10;

/// The breakpoints the vCPUs arm, and a generation each vCPU compares with its own.
#[derive(Default)]
pub struct Breakpoints {
    points: Mutex<Vec<Breakpoint>>,
    generation: AtomicU64,
}

impl Breakpoints {
    /// Replaces the breakpoints (at most [`MAX_BREAKPOINTS`]; the rest are ignored);
    /// each vCPU arms them before it next enters the guest.
    pub fn set(&self, points: &[Breakpoint]) {
        let mut held = lock(&self.points);
        *held = points.iter().take(MAX_BREAKPOINTS).cloned().collect();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// KVM's guest-debug state for `points` but `skip`: enabled with hardware breakpoints,
/// one debug address register each, locally enabled for execution (R/W and LEN 0), with
/// the `extra` control bits; nothing at all disables.
fn guest_debug(points: &[Breakpoint], skip: Option<usize>, extra: u32) -> kvm_guest_debug {
    let mut debug = kvm_guest_debug::default();
    if points.is_empty() && extra == 0 {
        return debug;
    }
    debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | extra;
    let mut dr7 = DR7_FIXED_1;
    for (i, point) in points.iter().take(MAX_BREAKPOINTS).enumerate().filter(|(i, _)| Some(*i) != skip) {
        debug.arch.debugreg[i] = point.address;
        dr7 |= 1 << (2 * i);
    }
    debug.arch.debugreg[7] = dr7;
    debug
}

/// Arms what [`Breakpoints::set`] last set, and records its generation as applied.
fn arm_latest(fd: &VcpuFd, trace: &mut VcpuTrace) -> Result<(), kvm_ioctls::Error> {
    let generation = trace.breakpoints.generation.load(Ordering::SeqCst);
    let points = lock(&trace.breakpoints.points).clone();
    fd.set_guest_debug(&guest_debug(&points, None, 0))?;
    trace.applied_debug = generation;
    Ok(())
}

/// Arms on this vCPU what [`Breakpoints::set`] last set, if it has not yet (and it is
/// not stepping past a hit: the step's end arms them). Called by the vCPU's thread
/// between two KVM_RUNs.
pub fn sync(fd: &VcpuFd, trace: &mut VcpuTrace) -> Result<(), kvm_ioctls::Error> {
    if trace.stepping || trace.breakpoints.generation.load(Ordering::SeqCst) == trace.applied_debug {
        return Ok(());
    }
    arm_latest(fd, trace)
}

/// Handles a debug exit on vCPU `index`: a hit of one of ours is captured, reported and
/// stepped past (the step's own exit re-arms it); any other #DB is the guest's own,
/// and is delivered to it.
pub fn on_debug_exit(
    fd: &VcpuFd,
    index: u8,
    exit: &kvm_debug_exit_arch,
    trace: &mut VcpuTrace,
) -> Result<(), kvm_ioctls::Error> {
    if trace.stepping && exit.dr6 & DR6_BS != 0 {
        trace.stepping = false;
        return arm_latest(fd, trace);
    }
    let points = lock(&trace.breakpoints.points).clone();
    let Some(hit) = (0..points.len()).find(|i| exit.dr6 & (1 << i) != 0) else {
        return fd.set_guest_debug(&guest_debug(&points, None, KVM_GUESTDBG_INJECT_DB));
    };
    let regs = fd.get_regs()?;
    let sregs = fd.get_sregs()?;
    let view = GuestView::new(fd, &trace.memory);
    let values = points[hit].captures.iter().map(|c| capture(&view, &regs, sregs.gs.base, c)).collect();
    let report = BreakpointHit { vcpu: u32::from(index), index: hit as u32, rip: regs.rip, cr3: sregs.cr3, values };
    trace.feed.report(TraceEvent::Breakpoint(report));
    // Past the hit: one instruction with this breakpoint off and interrupts held
    // (without KVM_GUESTDBG_BLOCKIRQ, before Linux 5.15, an interrupt may come first
    // and the breakpoint is then taken again, and reported again, after it).
    let step = KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
    fd.set_guest_debug(&guest_debug(&points, Some(hit), step))
        .or_else(|_| fd.set_guest_debug(&guest_debug(&points, Some(hit), KVM_GUESTDBG_SINGLESTEP)))?;
    trace.stepping = true;
    Ok(())
}

/// The register a capture starts from ([`mirror_driver::protocol::VcpuRegs::gprs`]
/// order, then the GS base).
fn base_value(regs: &kvm_regs, gs_base: u64, base: u32) -> u64 {
    let gprs = [
        regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp, regs.r8, regs.r9, regs.r10,
        regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ];
    match base {
        CAPTURE_BASE_GS => gs_base,
        n => gprs.get(n as usize).copied().unwrap_or(0),
    }
}

/// What one capture reads (bounded: [`MAX_DEREFS`](mirror_driver::protocol::MAX_DEREFS)
/// pointers, strings of `max_len`, [`MAX_CAPTURE_STRINGS`] of them).
fn capture(view: &GuestView, regs: &kvm_regs, gs_base: u64, c: &Capture) -> Captured {
    let mut address = base_value(regs, gs_base, c.base);
    for &deref in &c.derefs {
        match view.read_u64(address.wrapping_add_signed(deref)) {
            Some(next) => address = next,
            None => return Captured::Missing,
        }
    }
    address = address.wrapping_add_signed(c.offset);
    let max = c.max_len as usize;
    let value = match c.kind {
        CaptureKind::Address => Some(Captured::Number(address)),
        CaptureKind::U64 => view.read_u64(address).map(Captured::Number),
        CaptureKind::U32 => view.read_u32(address).map(|v| Captured::Number(u64::from(v))),
        CaptureKind::String => view.read_c_string(address, max).map(Captured::Bytes),
        CaptureKind::StringArray => {
            let mut strings = Vec::new();
            for i in 0..MAX_CAPTURE_STRINGS as u64 {
                match view.read_u64(address.wrapping_add(8 * i)) {
                    Some(0) | None => break,
                    Some(p) => strings.push(view.read_c_string(p, max).unwrap_or_default()),
                }
            }
            Some(Captured::Strings(strings))
        }
    };
    value.unwrap_or(Captured::Missing)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kvm_ioctls::VcpuExit;
    use mirror_driver::trace::{TraceFeed, TraceLimits};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::trace::msr::tests::vm_with_code;
    use crate::vstate::trace::GuestTrace;

    const CODE: u64 = 0x1000;

    /// A real-mode vCPU about to run `wrmsr; hlt` at `CODE` (the test VM's code), with
    /// a breakpoint there whose captures follow RDI to a string and RSI to an argv-style
    /// array, take RBX's value, and follow a pointer into nothing.
    #[test]
    fn a_hit_is_captured_reported_and_stepped_past() {
        let (vm, ram) = vm_with_code();
        let memory = ram.memory();
        memory.write_slice(b"/bin/true\0", GuestAddress(0x3000)).unwrap();
        memory.write_slice(b"true\0--help\0", GuestAddress(0x3100)).unwrap();
        for (i, p) in [0x3100u64, 0x3105, 0].iter().enumerate() {
            memory.write_obj(*p, GuestAddress(0x3200 + 8 * i as u64)).unwrap();
        }
        memory.write_obj(0x3000u64, GuestAddress(0x3300)).unwrap();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = GuestTrace::new(vm.clone(), feed.clone());
        let mut vcpu_trace = trace.for_vcpu(memory.clone());
        let mut vcpu = vm.fd().create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        (sregs.cs.base, sregs.cs.selector) = (0, 0);
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rip, regs.rdi, regs.rsi, regs.rbx) = (CODE, 0x3300, 0x3200, 7);
        // The instruction under the breakpoint writes the TSC: harmless.
        regs.rcx = 0x10;
        vcpu.set_regs(&regs).unwrap();
        let capture = |base, derefs: Vec<i64>, kind, max_len| Capture { base, derefs, offset: 0, kind, max_len };
        trace.breakpoints().set(&[Breakpoint {
            address: CODE,
            captures: vec![
                capture(5, vec![0], CaptureKind::String, 256),
                capture(4, vec![], CaptureKind::StringArray, 16),
                capture(1, vec![], CaptureKind::Address, 0),
                capture(5, vec![0x10_0000_0000], CaptureKind::U64, 0),
            ],
        }]);
        sync(&vcpu, &mut vcpu_trace).unwrap();
        let exit = match vcpu.run().unwrap() {
            VcpuExit::Debug(exit) => exit,
            other => panic!("the breakpoint must exit to the vmm, not {other:?}"),
        };
        on_debug_exit(&vcpu, 0, &exit, &mut vcpu_trace).unwrap();
        let (events, _) = feed.take(Duration::ZERO).unwrap();
        let TraceEvent::Breakpoint(hit) = &events[0] else { panic!("{events:?}") };
        assert_eq!((hit.vcpu, hit.index, hit.rip), (0, 0, CODE));
        assert_eq!(
            hit.values,
            vec![
                Captured::Bytes(b"/bin/true".to_vec()),
                Captured::Strings(vec![b"true".to_vec(), b"--help".to_vec()]),
                Captured::Number(7),
                Captured::Missing,
            ],
            "the string behind a pointer, argv, a register, and a pointer into nothing"
        );
        // Stepped past: one instruction (the wrmsr), the breakpoint armed again, then
        // the hlt, without a second hit.
        let step = match vcpu.run().unwrap() {
            VcpuExit::Debug(step) => step,
            other => panic!("the step past the hit must exit, not {other:?}"),
        };
        assert_ne!(step.dr6 & DR6_BS, 0, "a single step: {step:?}");
        on_debug_exit(&vcpu, 0, &step, &mut vcpu_trace).unwrap();
        assert_eq!(vcpu.get_regs().unwrap().rip, CODE + 2, "past the wrmsr");
        let next = format!("{:?}", vcpu.run().unwrap());
        assert_eq!(next, "Hlt", "at {:#x}", vcpu.get_regs().unwrap().rip);
        assert_eq!(feed.take(Duration::ZERO).unwrap().0.len(), 0, "one report for one hit");
        // Disarmed, the same code runs with no exit.
        trace.breakpoints().set(&[]);
        sync(&vcpu, &mut vcpu_trace).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE;
        vcpu.set_regs(&regs).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    }
}
