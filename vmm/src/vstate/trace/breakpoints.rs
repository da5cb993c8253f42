//! Execution breakpoints for tracing: the inspector sets up to four guest virtual
//! addresses, each with what to capture when a vCPU reaches it. A hit exits to the
//! vCPU's thread, which reads the captures through the vCPU's own translation, reports
//! the hit and lets the guest go on as if nothing had happened. Two kinds:
//!
//! - **Hardware** (KVM_SET_GUEST_DEBUG with the debug registers): nothing is written
//!   into guest memory. After a hit the vCPU single-steps that one instruction with
//!   the breakpoint off and interrupts held (KVM_GUESTDBG_BLOCKIRQ, so the step is the
//!   breakpoint's instruction and not an interrupt handler's), then re-arms it: two
//!   exits per hit. RFLAGS.RF would take one, but not every KVM honours it (PVM's
//!   emulated kernel mode re-takes the breakpoint), and a breakpoint re-taken forever
//!   would stall the guest. While they are armed, KVM loads ours into the debug
//!   registers and keeps the guest's own DR0-DR7 values aside: the guest reads back
//!   what it wrote, but its own breakpoints do not fire on the hardware, and every #DB
//!   it raises exits here; one that is not ours (a single step, `int1`) is given back
//!   to it. Where KVM's emulator runs guest code (PVM's kernel mode), it checks the
//!   guest's DR7 as well and hands the guest its own #DB without an exit. Either way a
//!   guest's breakpoint is never reported as ours (tested with a guest that arms DR0).
//! - **Software**, where the debug registers do not work (QEMU's TCG, which emulates
//!   SVM for the nested test bed, neither arms the DR7 a VMRUN loads nor intercepts an
//!   L2's `int3` as #BP). The vmm writes `out %al, $TRACE_PORT` (2 bytes, one aligned
//!   16-bit store) over the start of a no-op at the address, or just past an `endbr64`
//!   there (Linux's `__fentry__` slot, a 5-byte NOP unless ftrace uses it). A port
//!   write exits to the vmm on every KVM; a hit sets RIP past the whole no-op, so the
//!   guest runs exactly what it would have, in one exit, and no vCPU can run into a
//!   half-written instruction. An address with no such no-op is refused. This is the
//!   one way an inspector makes the source write guest memory, so the source must
//!   allow it apart (`--mirror-allow-trace-patches`); the guest can see the patch if it
//!   reads its own text there (Specula's kernel-text check does). Disarming writes each
//!   no-op back where the patch still is.
//!
//! Disarmed, there is nothing: no debug registers of ours, no patch, no intercepts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

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
use vm_memory::{Bytes, GuestAddress};

use super::guest_view::GuestView;
use super::VcpuTrace;
use crate::memory::SharedMemory;

/// DR6.BS: the #DB is a single step's.
const DR6_BS: u64 = 1 << 14;
/// DR7 bit 10 always reads 1.
const DR7_FIXED_1: u64 = 1 << 10;
/// The port a software breakpoint's `out` writes: no device of the vmm's, and none a
/// PC guest probes (0x80 and 0xed are Linux's I/O delay ports).
pub const TRACE_PORT: u8 = 0xeb;
/// `out %al, $TRACE_PORT`.
const PATCH: [u8; 2] = [0xe6, TRACE_PORT];
/// What may start a function before its `__fentry__` slot: `endbr64`, or the 4-byte
/// NOP Linux writes over it where IBT is off.
const FUNCTION_PROLOGUES: [[u8; 4]; 2] = [[0xf3, 0x0f, 0x1e, 0xfa], [0x66, 0x0f, 0x1f, 0x00]];
/// The no-ops a software breakpoint may go on: the 5-byte NOP compilers emit for
/// `__fentry__` calls that Linux turns off, and the 4-byte NOPs.
const NOPS: [&[u8]; 3] = [&[0x0f, 0x1f, 0x44, 0x00, 0x00], &[0x66, 0x0f, 0x1f, 0x00], &[0x0f, 0x1f, 0x40, 0x00]];
/// How long setting software breakpoints waits for a vCPU to place them.
const PLACE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why breakpoints could not be set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BreakpointError {
    /// A software breakpoint's address holds no no-op to write the patch over.
    #[error("no no-op instruction at {address:#x} to place a software breakpoint on (found {found:02x?})")]
    NoNop { address: u64, found: Vec<u8> },
    #[error("breakpoint address {0:#x} is not mapped by the guest")]
    Unmapped(u64),
    #[error("no vCPU placed the software breakpoints within {0:?} (is the source paused?)")]
    Timeout(Duration),
}

/// A software breakpoint's patch over a no-op: where, and what it replaced.
#[derive(Clone, Copy, Debug)]
struct Patch {
    /// The breakpoint it stands for.
    index: usize,
    /// Guest virtual and physical address of the patch.
    at: u64,
    gpa: u64,
    original: [u8; 2],
    /// The length of the no-op a hit skips.
    skip: u64,
}

#[derive(Default)]
struct State {
    generation: u64,
    software: bool,
    points: Vec<Breakpoint>,
    patches: Vec<Patch>,
    /// The generation whose software breakpoints a vCPU placed, and how that went.
    placed: Option<(u64, Result<(), BreakpointError>)>,
}

/// The breakpoints the vCPUs arm, and a generation each vCPU compares with its own.
pub struct Breakpoints {
    memory: SharedMemory,
    state: Mutex<State>,
    placed: Condvar,
    generation: AtomicU64,
}

impl Breakpoints {
    pub fn new(memory: SharedMemory) -> Self {
        Self { memory, state: Mutex::new(State::default()), placed: Condvar::new(), generation: AtomicU64::new(0) }
    }

    /// Replaces the breakpoints (at most [`MAX_BREAKPOINTS`]; the rest are ignored).
    /// Hardware ones are armed by each vCPU before it next enters the guest; software
    /// ones are placed by the first vCPU that does (`kick` makes them all leave the
    /// guest now), and this waits for that, so that a refused address is an error here.
    pub fn set(&self, software: bool, points: &[Breakpoint], kick: impl Fn()) -> Result<(), BreakpointError> {
        let mut state = lock(&self.state);
        self.remove_patches(&mut state);
        state.software = software;
        state.points = points.iter().take(MAX_BREAKPOINTS).cloned().collect();
        state.generation += 1;
        self.generation.store(state.generation, Ordering::SeqCst);
        kick();
        if !software || state.points.is_empty() {
            return Ok(());
        }
        let generation = state.generation;
        let (state, timeout) = self
            .placed
            .wait_timeout_while(state, PLACE_TIMEOUT, |s| s.placed.as_ref().is_none_or(|(g, _)| *g != generation))
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            return Err(BreakpointError::Timeout(PLACE_TIMEOUT));
        }
        state.placed.as_ref().map_or(Ok(()), |(_, outcome)| outcome.clone())
    }

    /// Puts back the no-op of every patch still there (one 16-bit store each).
    fn remove_patches(&self, state: &mut State) {
        for patch in state.patches.drain(..) {
            if self.memory.read_obj::<u16>(GuestAddress(patch.gpa)).ok() == Some(u16::from_le_bytes(PATCH)) {
                let _ = self.memory.write_obj(u16::from_le_bytes(patch.original), GuestAddress(patch.gpa));
            }
        }
    }

    /// Writes the patches of the current generation, through this vCPU's translation
    /// (kernel text is mapped alike in every address space); all or none.
    fn place(&self, view: &GuestView, state: &mut State) {
        let mut patches = Vec::new();
        let mut outcome = Ok(());
        for (index, point) in state.points.iter().enumerate() {
            match self.patch_for(view, index, point.address) {
                Ok(patch) => {
                    // One aligned 16-bit store: a vCPU fetching the no-op meanwhile sees
                    // it whole, or the whole patch.
                    if let Err(e) = self.memory.write_obj(u16::from_le_bytes(PATCH), GuestAddress(patch.gpa)) {
                        log::warn!("trace: cannot write a breakpoint at {:#x}: {e}", patch.gpa);
                        outcome = Err(BreakpointError::Unmapped(point.address));
                        break;
                    }
                    patches.push(patch);
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        state.patches = patches;
        if outcome.is_err() {
            self.remove_patches(state);
        }
        state.placed = Some((state.generation, outcome));
        self.placed.notify_all();
    }

    /// Where the patch for a breakpoint at `address` goes: on the no-op just past an
    /// `endbr64` (or its NOP) there, or on a no-op there; 2-byte aligned.
    fn patch_for(&self, view: &GuestView, index: usize, address: u64) -> Result<Patch, BreakpointError> {
        let mut code = [0u8; 9];
        if !view.read(address, &mut code) {
            return Err(BreakpointError::Unmapped(address));
        }
        let nop_at = |offset: usize| NOPS.iter().find(|nop| code[offset..].starts_with(nop)).map(|nop| (offset, nop));
        let past_prologue = FUNCTION_PROLOGUES.iter().any(|p| code.starts_with(p)).then(|| nop_at(4)).flatten();
        let (offset, nop) = past_prologue
            .or_else(|| nop_at(0))
            .filter(|(offset, _)| (address + *offset as u64).is_multiple_of(2))
            .ok_or_else(|| BreakpointError::NoNop { address, found: code.to_vec() })?;
        let at = address + offset as u64;
        let gpa = view.translate(at).ok_or(BreakpointError::Unmapped(at))?;
        Ok(Patch { index, at, gpa, original: [code[offset], code[offset + 1]], skip: nop.len() as u64 })
    }
}

/// KVM's guest-debug state for `state`'s breakpoints but `skip`, with the `extra`
/// control bits: hardware ones in the debug address registers, locally enabled for
/// execution (R/W and LEN 0); software ones by intercepting #BP; nothing disables.
fn guest_debug(state: &State, skip: Option<usize>, extra: u32) -> kvm_guest_debug {
    let mut debug = kvm_guest_debug::default();
    if state.points.is_empty() && extra == 0 {
        return debug;
    }
    if state.software {
        // Patches need nothing of KVM: a port write always exits.
        return debug;
    }
    debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | extra;
    let mut dr7 = DR7_FIXED_1;
    for (i, point) in state.points.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        debug.arch.debugreg[i] = point.address;
        dr7 |= 1 << (2 * i);
    }
    debug.arch.debugreg[7] = dr7;
    debug
}

/// Arms what [`Breakpoints::set`] last set (placing software ones if no vCPU has yet),
/// and records its generation as applied.
fn arm_latest(fd: &VcpuFd, trace: &mut VcpuTrace) -> Result<(), kvm_ioctls::Error> {
    let breakpoints = trace.breakpoints.clone();
    let mut state = lock(&breakpoints.state);
    if state.software && !state.points.is_empty() && state.placed.as_ref().is_none_or(|(g, _)| *g != state.generation) {
        breakpoints.place(&GuestView::new(fd, &trace.memory), &mut state);
    }
    fd.set_guest_debug(&guest_debug(&state, None, 0))?;
    trace.applied_debug = state.generation;
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
/// stepped past; any other #DB is the guest's own, and is delivered to it.
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
    let state = lock(&trace.breakpoints.state);
    let hit = (0..state.points.len()).find(|i| exit.dr6 & (1 << i) != 0).filter(|_| !state.software);
    let Some(hit) = hit else {
        return fd.set_guest_debug(&guest_debug(&state, None, KVM_GUESTDBG_INJECT_DB));
    };
    let regs = fd.get_regs()?;
    report(fd, index, &regs, &state.points[hit], hit, trace)?;
    // Past the hit: one instruction with this breakpoint off and interrupts held
    // (without KVM_GUESTDBG_BLOCKIRQ, before Linux 5.15, an interrupt may come first
    // and the breakpoint is then taken again, and reported again, after it).
    let step = KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
    fd.set_guest_debug(&guest_debug(&state, Some(hit), step))
        .or_else(|_| fd.set_guest_debug(&guest_debug(&state, Some(hit), KVM_GUESTDBG_SINGLESTEP)))?;
    trace.stepping = true;
    Ok(())
}

/// A write to [`TRACE_PORT`] on vCPU `index`: a software breakpoint's hit when the vCPU
/// stands at one of the patches (its captures are read, the hit reported, and the rest
/// of the no-op skipped); otherwise the guest's own write, ignored like any write to a
/// port no device claims.
///
/// Where the vCPU stands depends on how KVM took the `out`: its fast path (hardware
/// VMX/SVM) exits with RIP still on the instruction and skips it on the next entry
/// unless RIP was changed meanwhile; its emulator (PVM's emulated kernel mode) exits
/// with RIP already past it. Both are met.
pub fn on_trace_port(fd: &VcpuFd, index: u8, trace: &VcpuTrace) -> Result<(), kvm_ioctls::Error> {
    let state = lock(&trace.breakpoints.state);
    let mut regs = fd.get_regs()?;
    let past = regs.rip.wrapping_sub(PATCH.len() as u64);
    let Some(patch) = state.patches.iter().find(|p| p.at == regs.rip || p.at == past).copied() else {
        return Ok(());
    };
    report(fd, index, &regs, &state.points[patch.index], patch.index, trace)?;
    regs.rip = patch.at + patch.skip;
    fd.set_regs(&regs)
}

/// Reads breakpoint `index`'s captures and reports its hit.
fn report(
    fd: &VcpuFd,
    vcpu: u8,
    regs: &kvm_regs,
    point: &Breakpoint,
    index: usize,
    trace: &VcpuTrace,
) -> Result<(), kvm_ioctls::Error> {
    let sregs = fd.get_sregs()?;
    let view = GuestView::new(fd, &trace.memory);
    let values = point.captures.iter().map(|c| capture(&view, regs, sregs.gs.base, c)).collect();
    let hit = BreakpointHit { vcpu: u32::from(vcpu), index: index as u32, rip: regs.rip, cr3: sregs.cr3, values };
    trace.feed.report(TraceEvent::Breakpoint(hit));
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
    use crate::vstate::trace::msr::tests::{real_mode_vcpu, vm_with_code};
    use crate::vstate::trace::GuestTrace;

    const CODE: u64 = 0x1000;

    /// Sets software breakpoints from another thread while `vcpu` places them (as a
    /// vCPU thread does between two runs; `set` waits for that).
    fn set_software(
        trace: &Arc<GuestTrace>,
        vcpu: &VcpuFd,
        vcpu_trace: &mut VcpuTrace,
        point: Option<Breakpoint>,
    ) -> Result<(), BreakpointError> {
        let setter = {
            let trace = trace.clone();
            std::thread::spawn(move || trace.breakpoints().set(true, point.as_slice(), || {}))
        };
        while !setter.is_finished() {
            sync(vcpu, vcpu_trace).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        sync(vcpu, vcpu_trace).unwrap();
        setter.join().unwrap()
    }

    /// `endbr64; nop5; hlt` with a software breakpoint on its address: the patch goes
    /// on the NOP past the `endbr64`, a real hit exits on the trace port, is reported
    /// with its captures and skips the NOP; the guest's own write to the port elsewhere
    /// is no hit; an address with no NOP is refused; disarming puts the NOP back.
    #[test]
    fn a_software_breakpoint_sits_on_the_nop_past_endbr64_and_is_skipped() {
        const FUNC: u64 = 0x2000;
        const OWN_OUT: u64 = 0x2100;
        let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let (vm, ram) = vm_with_code();
        let memory = ram.memory().clone();
        memory.write_slice(&[0xf3, 0x0f, 0x1e, 0xfa], GuestAddress(FUNC)).unwrap();
        memory.write_slice(&nop5, GuestAddress(FUNC + 4)).unwrap();
        memory.write_slice(&[0xf4], GuestAddress(FUNC + 9)).unwrap();
        // The guest's own `out %al, $0xeb; hlt`.
        memory.write_slice(&[0xe6, TRACE_PORT, 0xf4], GuestAddress(OWN_OUT)).unwrap();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = Arc::new(GuestTrace::of_test_vm(&vm, feed.clone(), &ram));
        let mut vcpu_trace = trace.for_vcpu(ram.shared_memory());
        let mut vcpu = real_mode_vcpu(&vm, |regs| (regs.rip, regs.rbx) = (FUNC, 42));
        let capture = Capture { base: 1, derefs: vec![], offset: 0, kind: CaptureKind::Address, max_len: 0 };
        set_software(&trace, &vcpu, &mut vcpu_trace, Some(Breakpoint { address: FUNC, captures: vec![capture] }))
            .unwrap();
        assert_eq!(memory.read_obj::<[u8; 2]>(GuestAddress(FUNC + 4)).unwrap(), PATCH, "on the NOP, not the endbr64");
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, _) => assert_eq!(port, u16::from(TRACE_PORT)),
            other => panic!("the patch must exit to the vmm, not {other:?}"),
        }
        on_trace_port(&vcpu, 0, &vcpu_trace).unwrap();
        assert_eq!(vcpu.get_regs().unwrap().rip, FUNC + 9, "the whole NOP skipped");
        let (events, _) = feed.take(Duration::ZERO).unwrap();
        let TraceEvent::Breakpoint(hit) = &events[0] else { panic!("{events:?}") };
        assert_eq!((hit.index, hit.rip, hit.values.clone()), (0, FUNC + 6, vec![Captured::Number(42)]));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt), "on past the NOP, in one exit");
        // The guest's own write to the port is not a hit.
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = OWN_OUT;
        vcpu.set_regs(&regs).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut(..)));
        on_trace_port(&vcpu, 0, &vcpu_trace).unwrap();
        assert_eq!(vcpu.get_regs().unwrap().rip, OWN_OUT + 2, "left alone");
        assert!(feed.take(Duration::ZERO).unwrap().0.is_empty(), "no report");
        // No NOP at the address: refused, and the earlier patch is gone.
        let hlt = Some(Breakpoint { address: FUNC + 9, captures: vec![] });
        let refused = set_software(&trace, &vcpu, &mut vcpu_trace, hlt).unwrap_err();
        assert!(matches!(refused, BreakpointError::NoNop { address: 0x2009, .. }), "{refused}");
        assert_eq!(memory.read_obj::<[u8; 5]>(GuestAddress(FUNC + 4)).unwrap(), nop5, "the NOP is back");
        set_software(&trace, &vcpu, &mut vcpu_trace, None).unwrap();
    }

    /// The VM's end and an inspector's disarm race: the connection that disarms the
    /// software breakpoints (reading and writing guest RAM) may run after the VM's
    /// owner dropped its RAM (a vmm crashed there with SIGSEGV as a traced guest powered
    /// off). The trace keeps guest RAM mapped, and the disarm puts the NOP back: read
    /// here from the RAM's memfd, once nothing else holds the mapping.
    #[test]
    fn software_breakpoints_are_disarmed_after_the_vms_ram_is_dropped() {
        use std::os::unix::fs::FileExt;
        const FUNC: u64 = 0x2000;
        let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let (vm, ram) = vm_with_code();
        let memory = ram.memory();
        memory.write_slice(&[0xf3, 0x0f, 0x1e, 0xfa], GuestAddress(FUNC)).unwrap();
        memory.write_slice(&nop5, GuestAddress(FUNC + 4)).unwrap();
        memory.write_slice(&[0xf4], GuestAddress(FUNC + 9)).unwrap();
        let region = ram.regions()[0];
        assert_eq!(region.guest_addr, 0, "the test VM's RAM starts at 0 in one memfd");
        let (file, at) = (ram.chunk_file(region.chunk).clone(), region.file_offset + FUNC + 4);
        let in_file = || {
            let mut bytes = [0u8; 2];
            file.read_exact_at(&mut bytes, at).unwrap();
            bytes
        };
        let trace = Arc::new(GuestTrace::of_test_vm(&vm, Arc::new(TraceFeed::new(TraceLimits::default())), &ram));
        {
            let mut vcpu_trace = trace.for_vcpu(ram.shared_memory());
            let vcpu = real_mode_vcpu(&vm, |regs| regs.rip = FUNC);
            set_software(&trace, &vcpu, &mut vcpu_trace, Some(Breakpoint { address: FUNC, captures: vec![] })).unwrap();
        }
        assert_eq!(in_file(), PATCH, "the patch is in guest RAM");
        drop(ram);
        trace.breakpoints().set(false, &[], || {}).unwrap();
        assert_eq!(in_file(), [nop5[0], nop5[1]], "the NOP is back");
    }

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
        let trace = GuestTrace::of_test_vm(&vm, feed.clone(), &ram);
        let mut vcpu_trace = trace.for_vcpu(ram.shared_memory());
        // The instruction under the breakpoint writes the TSC (RCX 0x10): harmless.
        let mut vcpu = real_mode_vcpu(&vm, |regs| {
            (regs.rip, regs.rdi, regs.rsi, regs.rbx, regs.rcx) = (CODE, 0x3300, 0x3200, 7, 0x10)
        });
        let capture = |base, derefs: Vec<i64>, kind, max_len| Capture { base, derefs, offset: 0, kind, max_len };
        trace
            .breakpoints()
            .set(
                false,
                &[Breakpoint {
                    address: CODE,
                    captures: vec![
                        capture(5, vec![0], CaptureKind::String, 256),
                        capture(4, vec![], CaptureKind::StringArray, 16),
                        capture(1, vec![], CaptureKind::Address, 0),
                        capture(5, vec![0x10_0000_0000], CaptureKind::U64, 0),
                    ],
                }],
                || {},
            )
            .unwrap();
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
        trace.breakpoints().set(false, &[], || {}).unwrap();
        sync(&vcpu, &mut vcpu_trace).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE;
        vcpu.set_regs(&regs).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    }

    /// A guest that uses its own debug registers while ours are armed is not confused
    /// with us, either way: it reads back the DR0 and DR7 it wrote (not ours), its own
    /// breakpoint (DR0, on an instruction it then runs) is not reported as a hit of
    /// ours (at most its own handler takes it), and ours, one instruction later, is
    /// reported once, as index 0.
    #[test]
    fn a_guests_own_debug_registers_are_its_own_and_never_our_hits() {
        const GUEST_BP: u64 = 0x1100;
        let (vm, ram) = vm_with_code();
        let memory = ram.memory();
        let code = [
            0x66, 0xb8, 0x00, 0x11, 0x00, 0x00, // mov $0x1100, %eax
            0x0f, 0x23, 0xc0, // mov %eax, %dr0
            0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov $1, %eax (L0: execution, DR0)
            0x0f, 0x23, 0xf8, // mov %eax, %dr7
            0x0f, 0x21, 0xfb, // mov %dr7, %ebx
            0x0f, 0x21, 0xc1, // mov %dr0, %ecx
            0xe9, 0xe5, 0x00, // jmp 0x1100
        ];
        memory.write_slice(&code, GuestAddress(CODE)).unwrap();
        memory.write_slice(&[0x90, 0x90, 0xf4], GuestAddress(GUEST_BP)).unwrap(); // nop; nop; hlt
                                                                                  // The guest's #DB handler (IVT vector 1): clears its DR7, counts in SI, returns.
        let handler = [0x66, 0x31, 0xc0, 0x0f, 0x23, 0xf8, 0x46, 0xcf]; // xor %eax,%eax; mov %eax,%dr7; inc %si; iret
        memory.write_slice(&handler, GuestAddress(0x1200)).unwrap();
        memory.write_obj(0x0000_1200u32, GuestAddress(4)).unwrap();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = GuestTrace::of_test_vm(&vm, feed.clone(), &ram);
        let mut vcpu_trace = trace.for_vcpu(ram.shared_memory());
        let mut vcpu = real_mode_vcpu(&vm, |regs| (regs.rip, regs.rsp, regs.rsi) = (CODE, 0x8000, 0));
        trace.breakpoints().set(false, &[Breakpoint { address: GUEST_BP + 1, captures: vec![] }], || {}).unwrap();
        sync(&vcpu, &mut vcpu_trace).unwrap();
        let mut exits = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::Hlt => break,
                VcpuExit::Debug(exit) => {
                    exits.push((vcpu.get_regs().unwrap().rip, exit.dr6));
                    on_debug_exit(&vcpu, 0, &exit, &mut vcpu_trace).unwrap();
                }
                other => {
                    let other = format!("{other:?}");
                    panic!("unexpected exit {other} at {:#x}", vcpu.get_regs().unwrap().rip)
                }
            }
            assert!(exits.len() < 8, "the guest's breakpoint keeps exiting: {exits:x?}");
        }
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rbx & 0xffff_ffff, 0x401, "the guest reads its own DR7 (bit 10 reads 1), not ours");
        assert_eq!(regs.rcx & 0xffff_ffff, GUEST_BP, "the guest reads its own DR0");
        let (events, _) = feed.take(Duration::ZERO).unwrap();
        let hits: Vec<(u32, u64)> = events
            .iter()
            .map(|e| match e {
                TraceEvent::Breakpoint(hit) => (hit.index, hit.rip),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(hits, vec![(0, GUEST_BP + 1)], "our one hit, and not the guest's breakpoint: exits {exits:x?}");
        // Where KVM runs the guest on the hardware, ours are in the debug registers and
        // its own do not fire; where KVM's emulator runs it (PVM's kernel mode here),
        // the emulator checks the guest's DR7 too and gives it its #DB directly. Either
        // way its breakpoint is its own: taken by its handler at most once, never ours.
        assert!(regs.rsi & 0xffff <= 1, "the guest's #DB handler ran {} times", regs.rsi & 0xffff);
    }
}
