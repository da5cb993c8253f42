//! The KVM VM: capability checks, memslots, in-kernel irqchip and PIT.

use std::os::fd::AsRawFd;
use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::dirty_ring::DirtyRing;
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::memory::{GuestRam, RamSlot};

/// KVM API version every Linux since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Capabilities Specula cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// Failures while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (is KVM available, and may this user open it?)")]
    OpenKvm {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not the supported version {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {gpa:#x} (+{size:#x}) failed")]
    SetMemslot {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG for slot {slot}, pages {first_page}..+{num_pages} failed")]
    ClearDirtyLog {
        slot: u32,
        first_page: u64,
        num_pages: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use KVM's dirty ring for the dirty-page feed")]
    DirtyRing(#[source] super::dirty_ring::DirtyRingError),
    #[error("the dirty ring is already enabled")]
    DirtyRingAgain,
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot make MSR accesses exit to the vmm (KVM_CAP_X86_USER_SPACE_MSR)")]
    UserSpaceMsr(#[source] kvm_ioctls::Error),
    #[error("KVM_X86_SET_MSR_FILTER for MSRs {msrs:x?} failed")]
    MsrFilter {
        msrs: Vec<u32>,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD for MMIO address {addr:#x} failed")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM and the /dev/kvm handle it came from.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    next_slot: std::sync::atomic::AtomicU32,
    /// Slot numbers removed and free again: KVM has a fixed number of them (32764 on
    /// x86), and the trace's write traps replace slots each time they are re-armed.
    free_slots: std::sync::Mutex<Vec<u32>>,
    /// Memslots that exist now (added and not removed).
    live_slots: std::sync::atomic::AtomicU32,
    /// Whether KVM_GET_DIRTY_LOG leaves pages writable and KVM_CLEAR_DIRTY_LOG
    /// re-protects the ones reported (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), or the get
    /// re-protects every dirty page itself (the original protocol).
    manual_dirty_protect: bool,
    /// The per-vCPU dirty ring, once enabled (then KVM refuses KVM_GET_DIRTY_LOG).
    dirty_ring: std::sync::OnceLock<std::sync::Arc<DirtyRing>>,
    /// Whether filtered MSR accesses exit to the vmm (enabled on the first filter).
    user_space_msr: std::sync::OnceLock<()>,
}

impl Vm {
    /// Opens `kvm_path` (normally /dev/kvm), checks the API and capabilities, creates a VM.
    pub fn new(kvm_path: &Path) -> Result<Self, VmError> {
        let open_error = |source| VmError::OpenKvm { path: kvm_path.display().to_string(), source };
        let c_path = std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes())
            .map_err(|_| open_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(c_path.as_c_str()).map_err(open_error)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let manual_dirty_protect = enable_manual_dirty_protect(&fd);
        Ok(Self {
            kvm,
            fd,
            next_slot: std::sync::atomic::AtomicU32::new(0),
            free_slots: std::sync::Mutex::new(Vec::new()),
            live_slots: std::sync::atomic::AtomicU32::new(0),
            manual_dirty_protect,
            dirty_ring: std::sync::OnceLock::new(),
            user_space_msr: std::sync::OnceLock::new(),
        })
    }

    /// Fails unless KVM supports `cap` (for features only some users need, such as read-only slots).
    pub fn require(&self, cap: Cap, name: &'static str) -> Result<(), VmError> {
        if self.kvm.check_extension(cap) {
            Ok(())
        } else {
            Err(VmError::MissingCapability(name))
        }
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPIC and the PIT, as a PC has them.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(VmError::SetTssAddress)?;
        self.fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(VmError::CreatePit)
    }

    /// Registers each contiguous run of RAM as one writable memslot; returns the slots in
    /// the order of [`GuestRam::slots`].
    pub fn register_ram(&self, ram: &GuestRam) -> Result<Vec<u32>, VmError> {
        ram.slots()
            .iter()
            // SAFETY: GuestRam keeps its mappings for the life of the VMM, which outlives the VM.
            .map(|slot| unsafe { self.add_memslot(slot.guest_addr, slot.size, slot.host_addr, false) })
            .collect()
    }

    /// Turns KVM's dirty logging of a writable RAM memslot on or off (the slot keeps its
    /// place and contents; KVM write-protects its pages to see the writes).
    pub fn set_dirty_logging(&self, slot: u32, ram: &RamSlot, on: bool) -> Result<(), VmError> {
        self.set_memslot_flags(slot, ram.guest_addr, ram.size, ram.host_addr, dirty_log_flags(on))
    }

    /// The pages of a dirty-logged memslot written since the last call, one bit per page.
    ///
    /// With manual protection (where KVM offers it) the get only reads the bitmap, and
    /// the pages it reports are cleared and write-protected again 256 MiB at a time, and
    /// only where some page was written: KVM holds its MMU lock for one chunk of dirty
    /// pages at a time instead of for the whole slot, and clean chunks cost nothing.
    /// Either way the reported pages are protected again before this returns, so a
    /// write after the return is in the next call's bitmap.
    pub fn take_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        let bitmap = self.fd.get_dirty_log(slot, size as usize).map_err(|source| VmError::DirtyLog { slot, source })?;
        if self.manual_dirty_protect {
            let pages = size / 4096;
            for (chunk, words) in bitmap.chunks(CLEAR_CHUNK_WORDS).enumerate() {
                if words.iter().all(|&w| w == 0) {
                    continue;
                }
                let first_page = (chunk * CLEAR_CHUNK_WORDS * 64) as u64;
                let num_pages = (words.len() as u64 * 64).min(pages - first_page) as u32;
                self.clear_dirty_log(slot, first_page, num_pages, words)?;
            }
        }
        Ok(bitmap)
    }

    /// Switches dirty logging from the bitmap to a per-vCPU ring of `entries` (see
    /// [`DirtyRing`]); only before the first vCPU is created.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<std::sync::Arc<DirtyRing>, VmError> {
        // KVM itself refuses the ring once a vCPU exists (DirtyRingError::Enable says so).
        if self.dirty_ring.get().is_some() {
            return Err(VmError::DirtyRingAgain);
        }
        let ring = std::sync::Arc::new(DirtyRing::enable(&self.fd, entries).map_err(VmError::DirtyRing)?);
        self.dirty_ring.set(ring.clone()).map_err(|_| VmError::DirtyRingAgain)?;
        Ok(ring)
    }

    /// The dirty ring, if [`Vm::enable_dirty_ring`] turned it on.
    pub fn dirty_ring(&self) -> Option<&std::sync::Arc<DirtyRing>> {
        self.dirty_ring.get()
    }

    /// Makes the guest's writes to `msrs` (at most 16) exit to the vmm as
    /// `KVM_EXIT_X86_WRMSR` with the filter reason, and every other MSR access stay in
    /// KVM; an empty list removes the filter. Filtered writes exit instead of raising #GP
    /// because KVM_CAP_X86_USER_SPACE_MSR is enabled first (once; it changes nothing
    /// while no filter denies). KVM re-reads the filter on every vCPU before its next
    /// entry, so this works while they run.
    pub fn set_msr_write_exits(&self, msrs: &[u32]) -> Result<(), VmError> {
        use kvm_ioctls::{MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
        if self.user_space_msr.get().is_none() {
            let cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                args: [u64::from(MsrExitReason::Filter.bits()), 0, 0, 0],
                ..Default::default()
            };
            self.fd.enable_cap(&cap).map_err(VmError::UserSpaceMsr)?;
            let _ = self.user_space_msr.set(());
        }
        // One range per MSR, its single bit clear: writes denied (they exit), reads
        // untouched.
        let deny = [0u8];
        let ranges: Vec<MsrFilterRange> = msrs
            .iter()
            .map(|&base| MsrFilterRange { flags: MsrFilterRangeFlags::WRITE, base, msr_count: 1, bitmap: &deny })
            .collect();
        self.fd
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(|source| VmError::MsrFilter { msrs: msrs.to_vec(), source })
    }

    /// Whether dirty pages are re-protected by KVM_CLEAR_DIRTY_LOG (see [`Vm::take_dirty_log`]).
    pub fn manual_dirty_protect(&self) -> bool {
        self.manual_dirty_protect
    }

    /// KVM_CLEAR_DIRTY_LOG: clears and re-protects the pages set in `words`, from
    /// `first_page` (a multiple of 64) for `num_pages`.
    fn clear_dirty_log(&self, slot: u32, first_page: u64, num_pages: u32, words: &[u64]) -> Result<(), VmError> {
        let mut clear = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 { padding2: 0 },
        };
        clear.__bindgen_anon_1.dirty_bitmap = words.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: KVM_CLEAR_DIRTY_LOG on our VM fd; the struct is live for the call and its
        // bitmap points at `words`, which holds at least num_pages bits (KVM only reads it).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            return Err(VmError::ClearDirtyLog { slot, first_page, num_pages, source });
        }
        Ok(())
    }

    /// Adds a memslot mapping `size` bytes at host address `host_addr` to `gpa`; returns its slot.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must stay mapped until the slot is removed or the VM is dropped.
    pub unsafe fn add_memslot(&self, gpa: u64, size: u64, host_addr: u64, read_only: bool) -> Result<u32, VmError> {
        // SAFETY: the caller's guarantee is the one add_memslot_with_flags needs.
        unsafe { self.add_memslot_with_flags(gpa, size, host_addr, if read_only { KVM_MEM_READONLY } else { 0 }) }
    }

    /// [`Vm::add_memslot`] with KVM's flags (`KVM_MEM_READONLY`, `KVM_MEM_LOG_DIRTY_PAGES`)
    /// as given.
    ///
    /// # Safety
    /// As [`Vm::add_memslot`].
    pub unsafe fn add_memslot_with_flags(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> Result<u32, VmError> {
        let reused = specula_common::sync::lock(&self.free_slots).pop();
        let slot = reused.unwrap_or_else(|| self.next_slot.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        if let Err(e) = self.set_memslot_flags(slot, gpa, size, host_addr, flags) {
            specula_common::sync::lock(&self.free_slots).push(slot);
            return Err(e);
        }
        self.live_slots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(slot)
    }

    /// Removes a memslot (KVM deletes a slot when it is set to size 0).
    pub fn remove_memslot(&self, slot: u32, gpa: u64) -> Result<(), VmError> {
        self.set_memslot(slot, gpa, 0, 0, false)?;
        self.live_slots.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        specula_common::sync::lock(&self.free_slots).push(slot);
        Ok(())
    }

    /// Memslots that exist in KVM now, as added and removed through this VM.
    pub fn memslot_count(&self) -> u32 {
        self.live_slots.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_memslot(&self, slot: u32, gpa: u64, size: u64, host_addr: u64, read_only: bool) -> Result<(), VmError> {
        self.set_memslot_flags(slot, gpa, size, host_addr, if read_only { KVM_MEM_READONLY } else { 0 })
    }

    fn set_memslot_flags(&self, slot: u32, gpa: u64, size: u64, host_addr: u64, flags: u32) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
            flags,
        };
        // SAFETY: the caller keeps `host_addr..host_addr+size` mapped for as long as the
        // slot exists (GuestRam and mirror mappings outlive the VM or remove the slot first).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::SetMemslot {
            slot,
            gpa,
            size,
            source,
        })
    }

    /// Routes `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Signals `evt` on each 4-byte guest write of `value` to MMIO address `addr`, in
    /// the kernel, with no exit to the vmm.
    pub fn register_mmio_ioeventfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }
}

/// The memslot flags of writable RAM with KVM's dirty logging on or off.
pub fn dirty_log_flags(on: bool) -> u32 {
    if on {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    }
}

/// Pages per KVM_CLEAR_DIRTY_LOG call, in bitmap words (64 pages each): 256 MiB.
const CLEAR_CHUNK_WORDS: usize = 1024;

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);

/// Turns on manual dirty-log protection where KVM offers it (without "initially set":
/// enabling logging on a slot still write-protects all of it at once); false where it
/// is absent or refused, and the original protocol is used.
fn enable_manual_dirty_protect(fd: &VmFd) -> bool {
    let offered = fd.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
        return false;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    fd.enable_cap(&cap).is_ok()
}
