//! The KVM memslots of guest RAM as they are now. Each contiguous run of RAM is one
//! writable memslot, until the trace's write traps (`super::trace::write_traps`) ask
//! for some of its pages to be read-only: then the run is split into pieces, writable
//! and read-only, each its own memslot. KVM cannot change a slot's read-only flag in
//! place, so a run is re-slotted with the vCPUs held outside KVM_RUN.
//!
//! The dirty-page feed reads KVM's dirty log through this layout, so it follows the
//! pieces. Two kinds of writes KVM's log never sees are added here: the log of a slot
//! that is removed (taken just before), and the guest's writes to read-only pages,
//! which the vmm completes itself ([`RamMemslots::note_written`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MEM_READONLY;
use mirror_driver::protocol::Range;
use specula_common::sync::lock;

use super::dirty_ring::DirtyRingError;
use super::vm::{dirty_log_flags, Vm, VmError};
use crate::memory::{GuestRam, RamSlot};

const PAGE: u64 = 4096;

/// Why the memslot layout or its dirty log could not be changed or read.
#[derive(Debug, thiserror::Error)]
pub enum RamSlotsError {
    /// A memslot ioctl (adding, removing, its flags, the dirty log) failed.
    #[error(transparent)]
    Memslot(#[from] VmError),
    /// Harvesting or resetting the dirty ring failed.
    #[error(transparent)]
    Ring(#[from] DirtyRingError),
    /// A read-only range is not inside guest RAM.
    #[error("{gpa:#x} (+{len:#x}) is not inside guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
}

/// One memslot of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub slot: u32,
    pub ram: RamSlot,
    pub read_only: bool,
}

struct Layout {
    /// Every memslot of guest RAM, in guest-physical order; together they are the runs.
    pieces: Vec<Piece>,
    /// Whether KVM logs the writes to the writable pieces.
    dirty_logging: bool,
    /// Pages written that KVM's dirty log will not report, for the next take.
    written: BTreeSet<u64>,
}

/// Reports (`note(gpa, len)`) the guest RAM a device wrote outside the vmm's view
/// since it was last asked (a kernel backend's DMA).
pub type DmaHarvest = Box<dyn Fn(&mut dyn FnMut(u64, u64)) + Send + Sync>;

/// Guest RAM's memslots, shared by the dirty-page feed and the write traps.
pub struct RamMemslots {
    vm: Arc<Vm>,
    /// The contiguous runs of RAM (`GuestRam::slots`).
    runs: Vec<RamSlot>,
    layout: Mutex<Layout>,
    /// Asked at each [`RamMemslots::take_dirty`].
    dma_harvests: Mutex<Vec<DmaHarvest>>,
}

impl RamMemslots {
    /// The layout of `ram`, whose runs are registered as the memslots `slots`.
    pub fn new(vm: Arc<Vm>, ram: &GuestRam, slots: &[u32]) -> Self {
        let runs = ram.slots().to_vec();
        let pieces = slots.iter().zip(&runs).map(|(&slot, &ram)| Piece { slot, ram, read_only: false }).collect();
        Self {
            vm,
            runs,
            layout: Mutex::new(Layout { pieces, dirty_logging: false, written: BTreeSet::new() }),
            dma_harvests: Mutex::new(Vec::new()),
        }
    }

    /// Adds a device's report of the RAM it wrote, asked at each take of the dirty pages.
    pub fn add_dma_harvest(&self, harvest: DmaHarvest) {
        lock(&self.dma_harvests).push(harvest);
    }

    /// The VM the slots belong to.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The memslots now.
    pub fn pieces(&self) -> Vec<Piece> {
        lock(&self.layout).pieces.clone()
    }

    /// Starts (`on`) or stops KVM's dirty logging of the writable pieces; the pages
    /// noted written are forgotten when it stops.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), RamSlotsError> {
        let mut layout = lock(&self.layout);
        for piece in layout.pieces.iter().filter(|p| !p.read_only) {
            self.vm.set_dirty_logging(piece.slot, &piece.ram, on)?;
        }
        layout.dirty_logging = on;
        if !on {
            layout.written.clear();
        }
        Ok(())
    }

    /// Pages written since the last call, as runs in guest-physical order: KVM's log
    /// of each writable piece (from the dirty ring where it is on), the pages noted
    /// written, and those the devices' DMA harvests report.
    pub fn take_dirty(&self) -> Result<Vec<Range>, RamSlotsError> {
        for harvest in lock(&self.dma_harvests).iter() {
            harvest(&mut |gpa, len| self.note_written(gpa, len));
        }
        let mut layout = lock(&self.layout);
        if let Some(ring) = self.vm.dirty_ring() {
            ring.harvest()?;
        }
        let mut runs = Vec::new();
        for piece in layout.pieces.iter().filter(|p| !p.read_only) {
            runs.extend(self.take_piece_log(piece)?);
        }
        let written = std::mem::take(&mut layout.written);
        runs.extend(page_runs(written.into_iter()));
        runs.sort_by_key(|r| r.gpa);
        Ok(runs)
    }

    /// Records that the vmm wrote the pages of `gpa..gpa+len` for the guest (a write
    /// to a read-only page it completed), for the next [`RamMemslots::take_dirty`].
    pub fn note_written(&self, gpa: u64, len: u64) {
        let mut layout = lock(&self.layout);
        if !layout.dirty_logging || len == 0 {
            return;
        }
        // The read-only pages the vmm completes writes to, and the virtio devices' DMA.
        let last = gpa.saturating_add(len - 1) / PAGE;
        layout.written.extend(gpa / PAGE..=last);
    }

    /// Whether `gpa` lies in a read-only piece.
    pub fn is_read_only(&self, gpa: u64) -> bool {
        lock(&self.layout).pieces.iter().any(|p| p.read_only && contains(&p.ram, gpa))
    }

    /// The host address of guest-physical `gpa` in RAM.
    pub fn host_address(&self, gpa: u64) -> Option<u64> {
        self.runs.iter().find(|r| contains(r, gpa)).map(|r| r.host_addr + (gpa - r.guest_addr))
    }

    /// Makes exactly the pages of `ranges` read-only (none: every page writable again),
    /// re-slotting the runs whose pieces change. The caller holds the vCPUs outside
    /// KVM_RUN: between a slot's removal and its pieces' addition its pages are not
    /// RAM to KVM. On a failure the run is put back whole and writable.
    pub fn set_read_only(&self, ranges: &[Range]) -> Result<(), RamSlotsError> {
        for r in ranges {
            let end = r.gpa.checked_add(r.len);
            let inside = end.is_some_and(|end| {
                r.len > 0 && self.runs.iter().any(|run| r.gpa >= run.guest_addr && end <= run.guest_addr + run.size)
            });
            if !inside {
                return Err(RamSlotsError::OutsideRam { gpa: r.gpa, len: r.len });
            }
        }
        let pages = page_ranges(ranges);
        let mut layout = lock(&self.layout);
        for run in &self.runs {
            let wanted = split_run(run, &pages);
            let now: Vec<(RamSlot, bool)> = layout
                .pieces
                .iter()
                .filter(|p| contains(run, p.ram.guest_addr))
                .map(|p| (p.ram, p.read_only))
                .collect();
            if now == wanted {
                continue;
            }
            self.reslot(&mut layout, run, &wanted)?;
        }
        Ok(())
    }

    /// Replaces the pieces of `run` by `wanted`.
    fn reslot(&self, layout: &mut Layout, run: &RamSlot, wanted: &[(RamSlot, bool)]) -> Result<(), RamSlotsError> {
        let (old, kept): (Vec<Piece>, Vec<Piece>) = layout.pieces.iter().partition(|p| contains(run, p.ram.guest_addr));
        if layout.dirty_logging {
            if let Some(ring) = self.vm.dirty_ring() {
                ring.harvest()?;
            }
            for piece in old.iter().filter(|p| !p.read_only) {
                let runs = self.take_piece_log(piece)?;
                for r in runs {
                    layout.written.extend(r.gpa / PAGE..(r.gpa + r.len).div_ceil(PAGE));
                }
            }
        }
        layout.pieces = kept;
        for (i, piece) in old.iter().enumerate() {
            if let Err(e) = self.vm.remove_memslot(piece.slot, piece.ram.guest_addr) {
                // The pieces not removed stay as they were; those removed go back, so
                // that no page of RAM is left out of the VM.
                layout.pieces.extend_from_slice(&old[i..]);
                for removed in &old[..i] {
                    match self.add_piece(removed.ram, removed.read_only, layout.dirty_logging) {
                        Ok(piece) => layout.pieces.push(piece),
                        Err(e) => log::error!(
                            "RAM at {:#x} is out of the VM: {}",
                            removed.ram.guest_addr,
                            crate::error_chain(&e)
                        ),
                    }
                }
                layout.pieces.sort_by_key(|p| p.ram.guest_addr);
                return Err(e.into());
            }
        }
        let mut added = Vec::new();
        for &(ram, read_only) in wanted {
            match self.add_piece(ram, read_only, layout.dirty_logging) {
                Ok(piece) => added.push(piece),
                Err(e) => {
                    self.restore_whole(layout, run, &added);
                    return Err(e.into());
                }
            }
        }
        layout.pieces.extend(added);
        layout.pieces.sort_by_key(|p| p.ram.guest_addr);
        Ok(())
    }

    /// After a failed re-slot: removes the pieces added so far and adds `run` back as
    /// one writable slot, so that no page of RAM is left out of the VM.
    fn restore_whole(&self, layout: &mut Layout, run: &RamSlot, added: &[Piece]) {
        for piece in added {
            let _ = self.vm.remove_memslot(piece.slot, piece.ram.guest_addr);
        }
        match self.add_piece(*run, false, layout.dirty_logging) {
            Ok(piece) => layout.pieces.push(piece),
            Err(e) => log::error!("RAM at {:#x} is out of the VM: {}", run.guest_addr, crate::error_chain(&e)),
        }
        layout.pieces.sort_by_key(|p| p.ram.guest_addr);
    }

    /// Adds `ram` (a part of a run of guest RAM) as a memslot, read-only or writable and
    /// dirty-logged while logging is on.
    fn add_piece(&self, ram: RamSlot, read_only: bool, dirty_logging: bool) -> Result<Piece, VmError> {
        let flags = if read_only { KVM_MEM_READONLY } else { dirty_log_flags(dirty_logging) };
        // SAFETY: every piece lies inside a run of GuestRam, whose mappings outlive the VM.
        let slot = unsafe { self.vm.add_memslot_with_flags(ram.guest_addr, ram.size, ram.host_addr, flags) }?;
        Ok(Piece { slot, ram, read_only })
    }

    /// KVM's log of one writable piece (the ring must have been harvested).
    fn take_piece_log(&self, piece: &Piece) -> Result<Vec<Range>, RamSlotsError> {
        Ok(match self.vm.dirty_ring() {
            Some(ring) => {
                let words = ring.take_slot(piece.slot);
                mirror_driver::dirty::sparse_bitmap_runs(piece.ram.guest_addr, &words, piece.ram.size)
            }
            None => {
                let bitmap = self.vm.take_dirty_log(piece.slot, piece.ram.size)?;
                mirror_driver::dirty::bitmap_runs(piece.ram.guest_addr, &bitmap, piece.ram.size)
            }
        })
    }
}

fn contains(ram: &RamSlot, gpa: u64) -> bool {
    gpa >= ram.guest_addr && gpa - ram.guest_addr < ram.size
}

/// `ranges` widened to whole pages, sorted and merged.
fn page_ranges(ranges: &[Range]) -> Vec<Range> {
    let mut pages: Vec<Range> = ranges
        .iter()
        .map(|r| {
            let start = r.gpa / PAGE * PAGE;
            Range { gpa: start, len: (r.gpa + r.len).div_ceil(PAGE) * PAGE - start }
        })
        .collect();
    pages.sort_by_key(|r| r.gpa);
    let mut merged: Vec<Range> = Vec::with_capacity(pages.len());
    for r in pages {
        match merged.last_mut() {
            Some(last) if r.gpa <= last.gpa + last.len => last.len = last.len.max(r.gpa + r.len - last.gpa),
            _ => merged.push(r),
        }
    }
    merged
}

/// The pieces of `run` with `read_only` (sorted, merged, whole pages) taken out of it.
fn split_run(run: &RamSlot, read_only: &[Range]) -> Vec<(RamSlot, bool)> {
    let mut pieces = Vec::new();
    let end = run.guest_addr + run.size;
    let mut at = run.guest_addr;
    let piece = |from: u64, to: u64| RamSlot {
        guest_addr: from,
        size: to - from,
        host_addr: run.host_addr + (from - run.guest_addr),
    };
    for r in read_only {
        let (from, to) = (r.gpa.max(run.guest_addr), (r.gpa + r.len).min(end));
        if from >= to {
            continue;
        }
        if from > at {
            pieces.push((piece(at, from), false));
        }
        pieces.push((piece(from, to), true));
        at = to;
    }
    if at < end {
        pieces.push((piece(at, end), false));
    }
    pieces
}

/// Sorted page numbers as runs of bytes.
fn page_runs(pages: impl Iterator<Item = u64>) -> Vec<Range> {
    let mut runs: Vec<Range> = Vec::new();
    for page in pages {
        match runs.last_mut() {
            Some(last) if last.gpa + last.len == page * PAGE => last.len += PAGE,
            _ => runs.push(Range { gpa: page * PAGE, len: PAGE }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBackend;

    fn run() -> RamSlot {
        RamSlot { guest_addr: 0, size: 16 * PAGE, host_addr: 0x7f00_0000_0000 }
    }

    #[test]
    fn a_run_splits_around_its_read_only_pages_and_keeps_its_host_offsets() {
        let ro = page_ranges(&[Range { gpa: 2 * PAGE + 100, len: 8 }, Range { gpa: 3 * PAGE, len: 2 * PAGE }]);
        assert_eq!(ro, vec![Range { gpa: 2 * PAGE, len: 3 * PAGE }], "whole pages, merged");
        let pieces = split_run(&run(), &ro);
        let shape: Vec<(u64, u64, u64, bool)> =
            pieces.iter().map(|(r, ro)| (r.guest_addr, r.size, r.host_addr - run().host_addr, *ro)).collect();
        assert_eq!(
            shape,
            vec![(0, 2 * PAGE, 0, false), (2 * PAGE, 3 * PAGE, 2 * PAGE, true), (5 * PAGE, 11 * PAGE, 5 * PAGE, false)]
        );
        assert_eq!(split_run(&run(), &[]), vec![(run(), false)], "nothing read-only: the run whole");
    }

    #[test]
    fn read_only_pages_exit_as_mmio_writes_and_writable_again_do_not() {
        use kvm_ioctls::VcpuExit;
        use vm_memory::{Bytes, GuestAddress};
        let vm = Arc::new(Vm::new(std::path::Path::new("/dev/kvm")).expect("/dev/kvm (these tests need KVM)"));
        let ram = GuestRam::with_backend(2 << 20, MemoryBackend::default()).unwrap();
        let slots = vm.register_ram(&ram).unwrap();
        let memslots = RamMemslots::new(vm.clone(), &ram, &slots);
        // mov %al, (0x5000); hlt, in real mode.
        ram.memory().write_slice(&[0xa2, 0x00, 0x50, 0xf4], GuestAddress(0x1000)).unwrap();
        memslots.set_dirty_logging(true).unwrap();
        memslots.set_read_only(&[Range { gpa: 0x5000, len: 1 }]).unwrap();
        assert!(memslots.is_read_only(0x5fff) && !memslots.is_read_only(0x6000) && !memslots.is_read_only(0x4fff));
        assert_eq!(memslots.pieces().len(), 3);
        let mut vcpu =
            crate::vstate::trace::msr::tests::real_mode_vcpu(&vm, |regs| (regs.rip, regs.rax) = (0x1000, 0x5a));
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(addr, data) => assert_eq!((addr, data.to_vec()), (0x5000, vec![0x5a])),
            other => panic!("a write to a read-only page must exit as MMIO, not {other:?}"),
        }
        assert_eq!(ram.memory().read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0, "KVM did not write it");
        memslots.note_written(0x5000, 1);
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
        let dirty = memslots.take_dirty().unwrap();
        assert!(dirty.contains(&Range { gpa: 0x5000, len: PAGE }), "a completed write is a dirty page: {dirty:?}");

        memslots.set_read_only(&[]).unwrap();
        assert_eq!(memslots.pieces().len(), 1, "the run is whole again");
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rip, regs.rax) = (0x1000, 0x6b);
        vcpu.set_regs(&regs).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt), "a writable page takes the write in KVM");
        assert_eq!(ram.memory().read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x6b);
        let dirty = memslots.take_dirty().unwrap();
        assert!(dirty.contains(&Range { gpa: 0x5000, len: PAGE }), "KVM's log of the new slot: {dirty:?}");
    }

    /// A kernel backend's writes (vhost's, which KVM never sees) are asked for at each
    /// take of the dirty pages.
    #[test]
    fn dma_harvests_are_asked_at_each_take() {
        let vm = Arc::new(Vm::new(std::path::Path::new("/dev/kvm")).expect("/dev/kvm (these tests need KVM)"));
        let ram = GuestRam::with_backend(2 << 20, MemoryBackend::default()).unwrap();
        let slots = vm.register_ram(&ram).unwrap();
        let memslots = RamMemslots::new(vm, &ram, &slots);
        memslots.set_dirty_logging(true).unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = asked.clone();
        memslots.add_dma_harvest(Box::new(move |note| {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                note(0x7010, 0x1000);
            }
        }));
        let dirty = memslots.take_dirty().unwrap();
        assert!(dirty.contains(&Range { gpa: 0x7000, len: 2 * PAGE }), "both pages of the write: {dirty:?}");
        assert!(memslots.take_dirty().unwrap().is_empty(), "reported once");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_range_outside_ram_is_refused_and_changes_nothing() {
        let vm = Arc::new(Vm::new(std::path::Path::new("/dev/kvm")).expect("/dev/kvm (these tests need KVM)"));
        let ram = GuestRam::with_backend(2 << 20, MemoryBackend::default()).unwrap();
        let slots = vm.register_ram(&ram).unwrap();
        let memslots = RamMemslots::new(vm, &ram, &slots);
        for (gpa, len) in [(2 << 20, 1), ((2 << 20) - 1, 2), (u64::MAX, 2), (0x1000, 0)] {
            let e = memslots.set_read_only(&[Range { gpa, len }]).unwrap_err();
            assert!(matches!(e, RamSlotsError::OutsideRam { .. }), "{e}");
        }
        assert_eq!(memslots.pieces().len(), 1);
    }
}
