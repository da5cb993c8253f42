//! KVM's per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING, or its _ACQ_REL form).
//!
//! With the ring, KVM appends one entry (memslot, page offset) to the writing vCPU's
//! ring the first time a page of a dirty-logged memslot is written after it was last
//! protected. Collecting is then O(pages written): the collector reads the entries,
//! marks them harvested, and KVM_RESET_DIRTY_RINGS write-protects exactly those pages
//! again. The bitmap (KVM_GET_DIRTY_LOG) costs O(memslot size) per collection instead,
//! whatever was written, and is refused by KVM once the ring is on.
//!
//! The ring must be enabled before any vCPU exists, and a vCPU whose ring is nearly full
//! leaves KVM_RUN with KVM_EXIT_DIRTY_RING_FULL: its thread then harvests (see
//! [`DirtyRing::harvest`]) and runs on.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{VcpuFd, VmFd};
use specula_common::sync::lock;

/// An entry KVM has filled and userspace has not yet harvested.
const GFN_DIRTY: u32 = 1;
/// An entry userspace has harvested, for KVM_RESET_DIRTY_RINGS to recycle.
const GFN_RESET: u32 = 2;
/// Bytes per ring entry (`struct kvm_dirty_gfn`).
const ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;
/// The fewest entries Specula asks for. KVM takes a power of two no smaller than its
/// reserved entries (64, plus Intel PML's 512-entry buffer where the host uses PML):
/// 1024 is accepted everywhere.
pub const MIN_ENTRIES: u32 = 1024;
/// The most entries Specula asks for (1 MiB per vCPU, the most KVM offers on x86).
pub const MAX_ENTRIES: u32 = (1 << 20) / ENTRY_BYTES;
/// Entries per vCPU by default: 256 KiB, room for 64 MiB of newly written pages per 20 ms
/// collection before a vCPU has to stop and harvest.
pub const DEFAULT_ENTRIES: u32 = 16384;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// Failures of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    #[error("KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    NotOffered,
    #[error("a dirty ring of {entries} entries is {bytes} bytes, more than the {max} bytes KVM offers")]
    TooLarge { entries: u32, bytes: u32, max: u32 },
    #[error("dirty ring entries must be a power of two between {MIN_ENTRIES} and {MAX_ENTRIES}, not {0}")]
    BadSize(u32),
    #[error(
        "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING{}, {bytes} bytes) failed (KVM needs a power of two no smaller \
         than its reserved entries, and no vCPU yet)",
        if *.acq_rel { "_ACQ_REL" } else { "" }
    )]
    Enable {
        acq_rel: bool,
        bytes: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot duplicate the VM fd for the dirty ring")]
    DupVm(#[source] std::io::Error),
    #[error("cannot map the dirty ring of a vCPU")]
    Map(#[source] std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
}

/// The dirty rings of a VM's vCPUs and the pages harvested from them but not yet taken.
pub struct DirtyRing {
    /// A duplicate of the VM fd, for KVM_RESET_DIRTY_RINGS from any thread.
    vm: File,
    entries: u32,
    state: Mutex<RingState>,
}

#[derive(Default)]
struct RingState {
    rings: Vec<MappedRing>,
    /// Harvested pages: key (memslot id << 40 | page / 64), value one bit per page.
    pending: BTreeMap<u64, u64>,
    /// Entries were marked harvested and KVM_RESET_DIRTY_RINGS has not yet succeeded
    /// since: the next harvest resets even if it finds nothing new, or the rings would
    /// never drain (and a vCPU whose ring is full would never run again).
    reset_owed: bool,
}

/// One vCPU's ring, mapped from its vCPU fd.
struct MappedRing {
    gfns: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// The next entry to harvest (free-running; KVM wraps the same way).
    next: u32,
}

// SAFETY: the mapping is shared memory owned by this struct; the entries are read and
// written only under the DirtyRing's mutex (and by KVM, through atomics on `flags`).
unsafe impl Send for MappedRing {}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: `gfns` is the start of our own mapping of `entries` entries, unmapped once.
        unsafe { libc::munmap(self.gfns.as_ptr().cast(), (self.entries * ENTRY_BYTES) as usize) };
    }
}

impl DirtyRing {
    /// Enables a ring of `entries` per vCPU on `vm`, which must have no vCPUs yet.
    /// Prefers the _ACQ_REL capability, whose ordering contract is the one this code
    /// keeps (acquire of `flags` before the entry is read, release of the reset).
    pub fn enable(vm: &VmFd, entries: u32) -> Result<Self, DirtyRingError> {
        if !entries.is_power_of_two() || !(MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
            return Err(DirtyRingError::BadSize(entries));
        }
        let (cap, acq_rel, max) = Self::offered(vm).ok_or(DirtyRingError::NotOffered)?;
        let bytes = entries * ENTRY_BYTES;
        if bytes > max {
            return Err(DirtyRingError::TooLarge { entries, bytes, max });
        }
        let enable = kvm_bindings::kvm_enable_cap { cap, args: [u64::from(bytes), 0, 0, 0], ..Default::default() };
        vm.enable_cap(&enable).map_err(|source| DirtyRingError::Enable { acq_rel, bytes, source })?;
        // SAFETY: F_DUPFD_CLOEXEC on our live VM fd returns a new fd or -1.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(DirtyRingError::DupVm(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh fd that nothing else owns.
        let vm = unsafe { File::from_raw_fd(dup) };
        Ok(Self { vm, entries, state: Mutex::new(RingState::default()) })
    }

    /// The ring capability KVM offers on `vm`: (capability, whether it is _ACQ_REL,
    /// the most bytes per vCPU), or None.
    pub fn offered(vm: &VmFd) -> Option<(u32, bool, u32)> {
        [(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, true), (kvm_bindings::KVM_CAP_DIRTY_LOG_RING, false)]
            .into_iter()
            .find_map(|(cap, acq_rel)| {
                let max = vm.check_extension_raw(u64::from(cap));
                (max > 0).then_some((cap, acq_rel, max as u32))
            })
    }

    /// Entries per vCPU.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Maps `vcpu`'s ring (KVM allocates it when the vCPU is created).
    pub fn map_vcpu(&self, vcpu: &VcpuFd) -> Result<(), DirtyRingError> {
        let bytes = (self.entries * ENTRY_BYTES) as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a new shared mapping of the vCPU fd at KVM's ring offset; nothing else
        // lives at the address the kernel picks, and MappedRing unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DirtyRingError::Map(std::io::Error::last_os_error()));
        }
        let gfns = NonNull::new(addr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| DirtyRingError::Map(std::io::Error::other("mmap returned null")))?;
        lock(&self.state).rings.push(MappedRing { gfns, entries: self.entries, next: 0 });
        Ok(())
    }

    /// Moves every filled entry of every vCPU's ring into the pending set and has KVM
    /// write-protect those pages again; returns how many entries were harvested. Any
    /// thread may call it while the vCPUs run (a vCPU with a full ring does).
    ///
    /// On hosts whose CPUs log dirty pages in a per-vCPU buffer first (Intel PML), KVM
    /// moves that buffer into the ring at the vCPU's next full exit: a page written just
    /// before a harvest may be reported by the next one instead. Nothing is lost.
    pub fn harvest(&self) -> Result<usize, DirtyRingError> {
        let mut state = lock(&self.state);
        let RingState { rings, pending, reset_owed } = &mut *state;
        let mut harvested = 0;
        for ring in rings.iter_mut() {
            harvested += ring.harvest_into(pending);
        }
        if harvested > 0 || *reset_owed {
            *reset_owed = true;
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only KVM's state.
            let rc = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS()) };
            if rc < 0 {
                return Err(DirtyRingError::Reset(std::io::Error::last_os_error()));
            }
            *reset_owed = false;
        }
        Ok(harvested)
    }

    /// Hands over (and forgets) the harvested pages of memslot `slot`, as (first page,
    /// one bit per page from it) words in order; call [`DirtyRing::harvest`] first.
    /// Pages of other memslots stay pending for their own calls.
    pub fn take_slot(&self, slot: u32) -> Vec<(u64, u64)> {
        let first = u64::from(slot) << 40;
        let last = first | ((1 << 40) - 1);
        lock(&self.state)
            .pending
            .extract_if(first..=last, |_, _| true)
            .map(|(key, bits)| ((key & ((1 << 40) - 1)) * 64, bits))
            .collect()
    }

    /// Harvests and drops everything pending (when logging stops, so that a later
    /// subscriber hears only of later writes).
    pub fn discard(&self) -> Result<(), DirtyRingError> {
        self.harvest()?;
        lock(&self.state).pending.clear();
        Ok(())
    }
}

impl MappedRing {
    /// Moves the filled entries into `pending` and marks them for reset; at most one
    /// ring's worth, so a ring KVM keeps filling cannot hold the caller forever.
    fn harvest_into(&mut self, pending: &mut BTreeMap<u64, u64>) -> usize {
        let mut harvested = 0;
        while harvested < self.entries as usize {
            let index = (self.next & (self.entries - 1)) as usize;
            // SAFETY: index < entries, so the entry lies inside our mapping.
            let gfn = unsafe { self.gfns.as_ptr().add(index) };
            // SAFETY: `flags` is an aligned u32 in shared memory that KVM updates; an
            // AtomicU32 has the same layout, and acquire orders the reads below after it.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*gfn).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: a filled entry's slot and offset are stable until we reset it; read
            // through raw pointers, never references, as KVM shares the memory.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*gfn).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*gfn).offset)),
                )
            };
            // The address-space id (bits 16..) is 0 for every slot Specula adds; the
            // offset is bounded by the memslot size where the pages are taken.
            if slot >> 16 == 0 && offset < (1 << 46) {
                *pending.entry((u64::from(slot) << 40) | (offset / 64)).or_default() |= 1 << (offset % 64);
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            harvested += 1;
        }
        harvested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of `entries` in anonymous shared memory, as KVM would lay it out.
    fn fake_ring(entries: u32) -> MappedRing {
        // SAFETY: a fresh anonymous mapping; MappedRing unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (entries * ENTRY_BYTES) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        MappedRing { gfns: NonNull::new(addr.cast()).unwrap(), entries, next: 0 }
    }

    /// What KVM does when a vCPU dirties a page: fill the next entry.
    fn push(ring: &MappedRing, at: u32, slot: u32, offset: u64) {
        // SAFETY: `at` is reduced into the ring, which lies inside the mapping.
        unsafe {
            let gfn = ring.gfns.as_ptr().add((at & (ring.entries - 1)) as usize);
            (*gfn).slot = slot;
            (*gfn).offset = offset;
            (*gfn).flags = GFN_DIRTY;
        }
    }

    fn flags(ring: &MappedRing, at: u32) -> u32 {
        // SAFETY: as in `push`.
        unsafe { (*ring.gfns.as_ptr().add((at & (ring.entries - 1)) as usize)).flags }
    }

    #[test]
    fn harvest_takes_filled_entries_in_order_marks_them_reset_and_wraps() {
        let mut ring = fake_ring(256);
        let mut pending = BTreeMap::new();
        for (i, offset) in [0u64, 1, 63, 64, 1000].into_iter().enumerate() {
            push(&ring, i as u32, 3, offset);
        }
        assert_eq!(ring.harvest_into(&mut pending), 5);
        assert_eq!(pending.get(&(3 << 40)), Some(&(1 | 2 | 1 << 63)));
        assert_eq!(pending.get(&((3 << 40) | 1)), Some(&1));
        assert_eq!(pending.get(&((3 << 40) | (1000 / 64))), Some(&(1 << (1000 % 64))));
        assert!((0..5).all(|i| flags(&ring, i) == GFN_RESET));
        // Nothing new: nothing harvested, and the harvested entries are not taken again.
        assert_eq!(ring.harvest_into(&mut pending), 0);
        // KVM wraps: entries 5..=260 land on 5..=255 and then 0..=4 (recycled by a reset).
        pending.clear();
        for at in 5..=260 {
            push(&ring, at, 0, u64::from(at));
        }
        assert_eq!(ring.harvest_into(&mut pending), 256);
        assert_eq!(pending.values().map(|w| w.count_ones()).sum::<u32>(), 256);
        assert_eq!(ring.next, 261);
    }

    #[test]
    fn a_ring_kvm_keeps_refilling_is_harvested_at_most_once_around() {
        let mut ring = fake_ring(256);
        for at in 0..256 {
            push(&ring, at, 0, 7);
        }
        // Every entry is filled: one pass takes the ring once, never loops on.
        let mut pending = BTreeMap::new();
        assert_eq!(ring.harvest_into(&mut pending), 256);
        assert_eq!(pending, BTreeMap::from([(0, 1 << 7)]));
    }

    #[test]
    fn entries_of_other_address_spaces_or_absurd_offsets_are_reset_but_not_reported() {
        let mut ring = fake_ring(256);
        push(&ring, 0, 1 << 16 | 2, 5);
        push(&ring, 1, 2, u64::MAX);
        push(&ring, 2, 2, 9);
        let mut pending = BTreeMap::new();
        assert_eq!(ring.harvest_into(&mut pending), 3);
        assert_eq!(pending, BTreeMap::from([(2 << 40, 1 << 9)]));
        assert!((0..3).all(|i| flags(&ring, i) == GFN_RESET));
    }

    #[test]
    fn a_failed_reset_is_retried_by_the_next_harvest_even_with_nothing_new() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (these tests need KVM)");
        let ring = fake_ring(MIN_ENTRIES);
        push(&ring, 0, 1, 42);
        // An fd on which KVM_RESET_DIRTY_RINGS fails (ENOTTY).
        let broken = File::open("/dev/null").unwrap();
        let mut dirty = DirtyRing { vm: broken, entries: MIN_ENTRIES, state: Mutex::new(RingState::default()) };
        lock(&dirty.state).rings.push(ring);
        assert!(matches!(dirty.harvest(), Err(DirtyRingError::Reset(_))));
        assert_eq!(dirty.take_slot(1), vec![(0, 1 << 42)], "the harvested page is kept");
        // Nothing new, but the entries KVM still counts as used were never recycled.
        assert!(matches!(dirty.harvest(), Err(DirtyRingError::Reset(_))), "the reset is tried again");
        // Once the reset works (a VM with a ring), the debt is paid and not paid again.
        let vm = kvm.create_vm().unwrap();
        dirty.vm = DirtyRing::enable(&vm, MIN_ENTRIES).unwrap().vm;
        assert_eq!(dirty.harvest().unwrap(), 0);
        assert!(!lock(&dirty.state).reset_owed);
    }

    #[test]
    fn the_ring_is_sized_and_enabled_only_before_the_vcpus_and_maps_per_vcpu() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (these tests need KVM)");
        let vm = kvm.create_vm().unwrap();
        for bad in [0, 100, 256, 1000, MAX_ENTRIES * 2] {
            assert!(matches!(DirtyRing::enable(&vm, bad), Err(DirtyRingError::BadSize(n)) if n == bad));
        }
        let offered = DirtyRing::offered(&vm).expect("this host's KVM offers the dirty ring");
        let ring = DirtyRing::enable(&vm, MIN_ENTRIES).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        ring.map_vcpu(&vcpu).unwrap();
        assert_eq!((ring.harvest().unwrap(), ring.take_slot(0)), (0, Vec::new()));
        // KVM takes the ring only while no vCPU exists.
        let late = kvm.create_vm().unwrap();
        let _vcpu = late.create_vcpu(0).unwrap();
        let error = DirtyRing::enable(&late, MIN_ENTRIES).err().expect("refused after a vCPU");
        assert!(matches!(error, DirtyRingError::Enable { acq_rel, .. } if acq_rel == offered.1), "{error}");
    }
}
