//! Write traps: guest-physical ranges whose pages are made read-only memslots
//! ([`crate::vstate::ram_slots`]), so that every guest write to them exits to the vmm
//! as an MMIO write. KVM has already decoded and emulated the instruction (a wider or
//! repeated store exits once per piece of at most 8 bytes, a locked read-modify-write
//! as the write it ends in); the vCPU thread completes the write in guest RAM with one
//! store of the same width (atomic where aligned), notes the page for the dirty-page
//! feed, which KVM's log cannot see, and reports it with the writer's RIP, CR3 and
//! stack when it touches a trapped range. The guest sees its write done as it asked.
//!
//! Writes to the rest of a trapped page are completed the same way and not reported:
//! a kernel table rarely fills its pages, and what shares them is not traced.
//!
//! An instruction KVM's emulator does not know (AVX stores, say) cannot be completed:
//! KVM ends the run with an emulation failure, which stops the guest as any MMIO
//! access by such an instruction would. Only the guest can do that to itself.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kvm_ioctls::VcpuFd;
use mirror_driver::protocol::{MemoryWrite, Range, MEMORY_WRITE_MAX_LEN};
use mirror_driver::trace::TraceEvent;

use super::guest_view::GuestView;
use super::VcpuTrace;
use crate::vstate::ram_slots::{RamMemslots, RamSlotsError};

const PAGE: u64 = 4096;

/// The write traps of one VM.
pub struct WriteTraps {
    slots: Arc<RamMemslots>,
    /// The byte ranges whose writes are reported, sorted by address.
    watched: RwLock<Vec<Range>>,
}

impl WriteTraps {
    pub fn new(slots: Arc<RamMemslots>) -> Self {
        Self { slots, watched: RwLock::new(Vec::new()) }
    }

    /// Traps exactly `ranges` (none: every page writable again); returns the pages
    /// trapped. The caller holds the vCPUs outside KVM_RUN.
    pub fn set(&self, ranges: &[Range]) -> Result<u64, RamSlotsError> {
        self.slots.set_read_only(ranges)?;
        let mut watched = ranges.to_vec();
        watched.sort_by_key(|r| r.gpa);
        let pages = self.slots.pieces().iter().filter(|p| p.read_only).map(|p| p.ram.size / PAGE).sum();
        *self.watched.write().unwrap_or_else(|p| p.into_inner()) = watched;
        Ok(pages)
    }

    /// Handles a guest write of `data` to `gpa` that exited as MMIO on vCPU `index`:
    /// if `gpa` is in a trapped page, completes the write, reports it where it touches
    /// a trapped range, and returns true; false leaves the exit to the devices.
    pub fn on_mmio_write(&self, fd: &VcpuFd, index: u8, gpa: u64, data: &[u8], trace: &VcpuTrace) -> bool {
        if data.is_empty() || data.len() > MEMORY_WRITE_MAX_LEN as usize || !self.slots.is_read_only(gpa) {
            return false;
        }
        // KVM splits a write at page boundaries, so all of it is in this page.
        let Some(host) = self.slots.host_address(gpa) else { return false };
        // SAFETY: `host` is the vmm's mapping of guest RAM at `gpa`, live for the VM's
        // life, and the write stays inside its page (KVM splits at page boundaries).
        let previous = unsafe { complete_write(host as *mut u8, data) };
        self.slots.note_written(gpa, data.len() as u64);
        if self.touches_watched(gpa, data.len() as u64) {
            let (rip, rsp) = fd.get_regs().map_or((0, 0), |r| (r.rip, r.rsp));
            let cr3 = fd.get_sregs().map_or(0, |s| s.cr3);
            let stack = GuestView::new(fd, &trace.memory).stack_words(rsp);
            let mut value = [0u8; 8];
            value[..data.len()].copy_from_slice(data);
            let write = MemoryWrite {
                vcpu: u32::from(index),
                gpa,
                len: data.len() as u32,
                value: u64::from_le_bytes(value),
                previous,
                rip,
                cr3,
                stack,
            };
            trace.feed.report(TraceEvent::MemoryWrite(write));
        }
        true
    }

    fn touches_watched(&self, gpa: u64, len: u64) -> bool {
        let watched = self.watched.read().unwrap_or_else(|p| p.into_inner());
        watched.iter().any(|r| gpa < r.gpa.saturating_add(r.len) && r.gpa < gpa + len)
    }
}

/// Stores `data` at `host` as the guest's one instruction would have: in one store of
/// its width where that is aligned (so other vCPUs never see half of it), byte by byte
/// otherwise. Returns the bytes it replaced (little-endian).
///
/// # Safety
/// `host..host + data.len()` must be writable memory (1 to 8 bytes).
unsafe fn complete_write(host: *mut u8, data: &[u8]) -> u64 {
    let aligned = (host as usize).is_multiple_of(data.len());
    match (data.len(), aligned) {
        (2, true) => {
            let v = u16::from_le_bytes([data[0], data[1]]);
            // SAFETY: the caller's 2 writable bytes, aligned for a u16 (checked above).
            u64::from(unsafe { AtomicU16::from_ptr(host.cast()) }.swap(v, Ordering::SeqCst))
        }
        (4, true) => {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            // SAFETY: the caller's 4 writable bytes, aligned for a u32 (checked above).
            u64::from(unsafe { AtomicU32::from_ptr(host.cast()) }.swap(v, Ordering::SeqCst))
        }
        (8, true) => {
            let v = u64::from_le_bytes(data.try_into().expect("8 bytes"));
            // SAFETY: the caller's 8 writable bytes, aligned for a u64 (checked above).
            unsafe { AtomicU64::from_ptr(host.cast()) }.swap(v, Ordering::SeqCst)
        }
        _ => {
            let mut previous = [0u8; 8];
            for (i, byte) in data.iter().enumerate() {
                // SAFETY: byte `i` of the caller's `data.len()` writable bytes.
                unsafe {
                    previous[i] = std::ptr::read_volatile(host.add(i));
                    std::ptr::write_volatile(host.add(i), *byte);
                }
            }
            u64::from_le_bytes(previous)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvm_ioctls::VcpuExit;
    use mirror_driver::trace::{TraceFeed, TraceLimits};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::{GuestRam, MemoryBackend};
    use crate::vstate::trace::msr::tests::real_mode_vcpu;
    use crate::vstate::trace::GuestTrace;
    use crate::vstate::vm::Vm;

    /// A VM whose real-mode code at 0x1000 stores a word to 0x5008 and a byte to
    /// 0x5100, then halts.
    fn guest() -> (Arc<Vm>, GuestRam, Arc<RamMemslots>) {
        let vm = Arc::new(Vm::new(std::path::Path::new("/dev/kvm")).expect("/dev/kvm (these tests need KVM)"));
        let ram = GuestRam::with_backend(2 << 20, MemoryBackend::default()).unwrap();
        let slots = vm.register_ram(&ram).unwrap();
        // mov %ax, (0x5008); mov %bl, (0x5100); hlt
        let code = [0xa3, 0x08, 0x50, 0x88, 0x1e, 0x00, 0x51, 0xf4];
        ram.memory().write_slice(&code, GuestAddress(0x1000)).unwrap();
        ram.memory().write_obj(0x1111u16, GuestAddress(0x5008)).unwrap();
        let memslots = Arc::new(RamMemslots::new(vm.clone(), &ram, &slots));
        (vm, ram, memslots)
    }

    /// Runs the vCPU to its `hlt`, completing each MMIO write through `trace`.
    fn run_to_hlt(vcpu: &mut VcpuFd, trace: &VcpuTrace) -> usize {
        let mut completed = 0;
        loop {
            let (gpa, data) = match vcpu.run().unwrap() {
                VcpuExit::Hlt => return completed,
                VcpuExit::MmioWrite(gpa, data) => (gpa, data.to_vec()),
                other => panic!("unexpected exit {other:?}"),
            };
            assert!(trace.write_traps.on_mmio_write(vcpu, 0, gpa, &data, trace), "{gpa:#x} is trapped");
            completed += 1;
        }
    }

    #[test]
    fn a_trapped_write_is_completed_as_the_guest_asked_and_reported_with_its_writer() {
        let (vm, ram, memslots) = guest();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = GuestTrace::new(vm.clone(), feed.clone(), ram.shared_memory(), memslots.clone());
        // The word is watched; the byte shares its page and is not.
        assert_eq!(trace.write_traps().set(&[Range { gpa: 0x5008, len: 8 }]).unwrap(), 1);
        let vcpu_trace = trace.for_vcpu(ram.shared_memory());
        let mut vcpu = real_mode_vcpu(&vm, |regs| (regs.rip, regs.rax, regs.rbx) = (0x1000, 0xbeef, 0x42));
        assert_eq!(run_to_hlt(&mut vcpu, &vcpu_trace), 2, "both stores exit: their page is read-only");
        assert_eq!(ram.memory().read_obj::<u16>(GuestAddress(0x5008)).unwrap(), 0xbeef, "the word is written");
        assert_eq!(ram.memory().read_obj::<u8>(GuestAddress(0x5100)).unwrap(), 0x42, "the byte is written");
        let (events, dropped) = feed.take(Duration::ZERO).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(
            events,
            vec![TraceEvent::MemoryWrite(MemoryWrite {
                vcpu: 0,
                gpa: 0x5008,
                len: 2,
                value: 0xbeef,
                previous: 0x1111,
                rip: 0x1003,
                cr3: 0,
                stack: [0; 4],
            })],
            "only the watched word is reported, with what it replaced and the next instruction's RIP"
        );
    }

    #[test]
    fn disarmed_traps_leave_writes_to_kvm_and_a_device_write_is_not_taken() {
        let (vm, ram, memslots) = guest();
        let feed = Arc::new(TraceFeed::new(TraceLimits::default()));
        let trace = GuestTrace::new(vm.clone(), feed.clone(), ram.shared_memory(), memslots);
        trace.write_traps().set(&[Range { gpa: 0x5008, len: 8 }]).unwrap();
        assert_eq!(trace.write_traps().set(&[]).unwrap(), 0);
        let vcpu_trace = trace.for_vcpu(ram.shared_memory());
        let mut vcpu = real_mode_vcpu(&vm, |regs| (regs.rip, regs.rax, regs.rbx) = (0x1000, 0xbeef, 0x42));
        assert_eq!(run_to_hlt(&mut vcpu, &vcpu_trace), 0, "no exit once disarmed");
        assert_eq!(ram.memory().read_obj::<u16>(GuestAddress(0x5008)).unwrap(), 0xbeef);
        assert!(feed.take(Duration::ZERO).unwrap().0.is_empty());
        // An MMIO write outside RAM (a device's) is not the traps' to complete.
        assert!(!vcpu_trace.write_traps.on_mmio_write(&vcpu, 0, 0xfee0_0000, &[1, 0, 0, 0], &vcpu_trace));
    }

    #[test]
    fn completed_writes_replace_what_was_there_at_every_width() {
        let mut word = [0x11u8; 16];
        let base = word.as_mut_ptr();
        // SAFETY: every store stays inside `word`.
        unsafe {
            let aligned8 = base.add(8 - (base as usize) % 8);
            assert_eq!(complete_write(aligned8, &0x2222_3333_4444_5555u64.to_le_bytes()), 0x1111_1111_1111_1111);
            assert_eq!(complete_write(aligned8, &[0xaa, 0xbb, 0xcc]), 0x44_5555, "an odd width, byte by byte");
            assert_eq!(complete_write(aligned8.add(1), &[1, 2, 3, 4]), 0x3344_ccbb, "unaligned");
        }
    }
}
