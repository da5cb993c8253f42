//! The KVM VM: capability checks, memslots, in-kernel irqchip and PIT.

use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

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
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM and the /dev/kvm handle it came from.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    next_slot: std::sync::atomic::AtomicU32,
    /// Memslots that exist now (added and not removed).
    live_slots: std::sync::atomic::AtomicU32,
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
        Ok(Self {
            kvm,
            fd,
            next_slot: std::sync::atomic::AtomicU32::new(0),
            live_slots: std::sync::atomic::AtomicU32::new(0),
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
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set_memslot_flags(slot, ram.guest_addr, ram.size, ram.host_addr, flags)
    }

    /// The pages of a dirty-logged memslot written since the last call, one bit per page
    /// (KVM_GET_DIRTY_LOG: read, cleared and write-protected again in one step).
    pub fn take_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        self.fd.get_dirty_log(slot, size as usize).map_err(|source| VmError::DirtyLog { slot, source })
    }

    /// Adds a memslot mapping `size` bytes at host address `host_addr` to `gpa`; returns its slot.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must stay mapped until the slot is removed or the VM is dropped.
    pub unsafe fn add_memslot(&self, gpa: u64, size: u64, host_addr: u64, read_only: bool) -> Result<u32, VmError> {
        let slot = self.next_slot.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.set_memslot(slot, gpa, size, host_addr, read_only)?;
        self.live_slots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(slot)
    }

    /// Removes a memslot (KVM deletes a slot when it is set to size 0).
    pub fn remove_memslot(&self, slot: u32, gpa: u64) -> Result<(), VmError> {
        self.set_memslot(slot, gpa, 0, 0, false)?;
        self.live_slots.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
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
}
