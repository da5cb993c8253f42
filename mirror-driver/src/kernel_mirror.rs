//! The kernel mirror device (`/dev/specula-mirror`, built from `mirror-driver/kmod`):
//! attach to any KVM VMM by pid, whatever backs its guest RAM (private anonymous
//! memory included), and map that RAM read-only and zero-copy.
//!
//! The device maps a range of another process's memory through a file whose pages
//! are looked up at fault time and zapped by an MMU interval notifier whenever the
//! source's page changes identity; so the mapping stays coherent, and KVM's own MMU
//! notifier in the inspector drops its stale entries. Layout comes from the source's
//! own KVM VM: the device reports its memslots given a VM fd, which we take from the
//! source with `pidfd_getfd` (the same ptrace permission the device checks).
//!
//! The ABI is `mirror-driver/kmod/specula_mirror.h`; the structures here mirror it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};

use crate::importer::{map_device, ImportError, MappedGrant, SourceEvent};
use crate::protocol::{Grant, Range};

/// Where the device appears once `specula_mirror.ko` is loaded.
pub const DEVICE: &str = "/dev/specula-mirror";
/// The pinning baseline's device (`specula_pin_baseline.ko`): pins every page at attach
/// and never learns of changes, as memflow's kvm module does. Tests and benchmarks only.
pub const BASELINE_DEVICE: &str = "/dev/specula-pin-baseline";

const PAGE: u64 = 4096;
/// Memslots asked for in one layout query; KVM allows 32764 per address space, but a
/// VMM with more than this many is not one we know.
const MAX_MEMSLOTS: usize = 4096;

const IOC_MAGIC: u64 = 0xB7;

/// `_IOC(dir, 0xB7, nr, size)` of the kernel's asm-generic/ioctl.h.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (IOC_MAGIC << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;
const ATTACH: u64 = ioc(IOC_READ_WRITE, 1, std::mem::size_of::<Attach>());
const VM_LAYOUT: u64 = ioc(IOC_READ_WRITE, 2, std::mem::size_of::<VmLayout>());
const INFO: u64 = ioc(IOC_READ, 3, std::mem::size_of::<MirrorInfo>());

/// `struct specula_mirror_attach`.
#[repr(C)]
#[derive(Debug, Default)]
struct Attach {
    pidfd: u32,
    flags: u32,
    start: u64,
    length: u64,
    fd: i32,
    reserved: u32,
}

/// `struct specula_mirror_memslot`: one memslot of the source's KVM VM.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// Where the slot's RAM is in the source process.
    pub userspace_addr: u64,
    /// `(address space << 16) | slot id`.
    pub slot: u32,
    /// `KVM_MEM_*`.
    pub flags: u32,
}

impl Memslot {
    /// KVM's address space of the slot (1 is x86's SMM).
    pub fn address_space(&self) -> u32 {
        self.slot >> 16
    }
}

/// `struct specula_mirror_vm_layout`.
#[repr(C)]
#[derive(Debug, Default)]
struct VmLayout {
    pidfd: u32,
    vm_fd: i32,
    capacity: u32,
    count: u32,
    slots_ptr: u64,
}

/// `struct specula_mirror_info`: what the device knows of one mapping fd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MirrorInfo {
    /// Source address of the fd's offset 0.
    pub start: u64,
    pub length: u64,
    /// Notifier invalidations that hit the range so far.
    pub invalidations: u64,
    /// Pages inserted so far.
    pub faults: u64,
    /// 0 once the source's address space is gone.
    pub source_alive: u32,
    pub reserved: u32,
}

/// Failures of the kernel mirror path, each naming what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KernelMirrorError {
    #[error(
        "cannot open the kernel mirror device {path} (is specula_mirror.ko loaded? see mirror-driver/kmod/README.md)"
    )]
    OpenDevice {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a pidfd for process {pid}")]
    Pidfd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list process {pid}'s file descriptors to find its KVM VM")]
    ListFds {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read process {pid}'s memory map (/proc/{pid}/smaps)")]
    Smaps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} holds no KVM VM (no anon_inode:kvm-vm among its file descriptors)")]
    NoKvmVm { pid: u32 },
    #[error("process {pid} holds {count} KVM VMs (fds {fds:?}); name one with its fd")]
    SeveralKvmVms { pid: u32, count: usize, fds: Vec<i32> },
    #[error("cannot take fd {fd} of process {pid} (pidfd_getfd needs the right to ptrace it)")]
    GetFd {
        pid: u32,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("the device refused to report process {pid}'s memslots")]
    Layout {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}'s VM has {count} memslots, more than the {MAX_MEMSLOTS} this inspector reads")]
    TooManyMemslots { pid: u32, count: u32 },
    #[error("the device refused to attach {start:#x}+{len:#x} of process {pid}")]
    Attach {
        pid: u32,
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("range {gpa:#x}+{len:#x} is not page-aligned")]
    Unaligned { gpa: u64, len: u64 },
    #[error("cannot map the mirror of {gpa:#x}+{len:#x}")]
    Map {
        gpa: u64,
        len: u64,
        #[source]
        source: ImportError,
    },
    #[error("cannot query a mirror mapping")]
    Info(#[source] std::io::Error),
    #[error(
        "process {pid} backs {kib} KiB of its guest RAM with transparent huge pages, which KVM before Linux 6.13 \
         cannot map into the inspector's VM through the device (it cannot take a reference on a huge page's tail \
         pages): echo never > /sys/kernel/mm/transparent_hugepage/enabled, then split the existing ones with \
         echo 1 > /sys/kernel/debug/split_huge_pages, and attach again (docs/kernel-mirror.md, Limits)"
    )]
    TransparentHugePages { pid: u32, kib: u64 },
}

/// An open kernel mirror device.
#[derive(Debug)]
pub struct KernelMirror {
    device: File,
}

impl KernelMirror {
    /// Opens the device at `path` ([`DEVICE`] or [`BASELINE_DEVICE`]).
    pub fn open(path: &Path) -> Result<Self, KernelMirrorError> {
        let device = std::fs::OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| KernelMirrorError::OpenDevice { path: path.to_path_buf(), source })?;
        Ok(Self { device })
    }

    /// Attaches `[start, start + len)` of the process behind `pidfd`: a read-only fd
    /// whose offset 0 is `start`.
    pub fn attach(&self, pid: u32, pidfd: BorrowedFd<'_>, start: u64, len: u64) -> Result<OwnedFd, KernelMirrorError> {
        let mut request = Attach { pidfd: pidfd.as_raw_fd() as u32, start, length: len, fd: -1, ..Default::default() };
        // SAFETY: ATTACH reads and writes a struct specula_mirror_attach, which Attach lays
        // out; the device is ours and the struct lives across the call.
        if unsafe { libc::ioctl(self.device.as_raw_fd(), ATTACH as _, &mut request) } != 0 {
            return Err(KernelMirrorError::Attach { pid, start, len, source: std::io::Error::last_os_error() });
        }
        // SAFETY: on success the device installed a new fd in our table and gave it to us.
        Ok(unsafe { OwnedFd::from_raw_fd(request.fd) })
    }

    /// The memslots of the KVM VM `vm_fd` (an fd of ours for the source's VM).
    pub fn vm_layout(
        &self,
        pid: u32,
        pidfd: BorrowedFd<'_>,
        vm_fd: BorrowedFd<'_>,
    ) -> Result<Vec<Memslot>, KernelMirrorError> {
        self.vm_layout_into(pid, pidfd, vm_fd, MAX_MEMSLOTS)
    }

    /// [`KernelMirror::vm_layout`] with room for `capacity` memslots: more than the VM
    /// has is [`KernelMirrorError::TooManyMemslots`] with its count, and a capacity over
    /// the device's own cap (4096, as ours) is refused by the device (EINVAL). For tests
    /// of the device's bounds; an inspector asks with [`KernelMirror::vm_layout`].
    pub fn vm_layout_into(
        &self,
        pid: u32,
        pidfd: BorrowedFd<'_>,
        vm_fd: BorrowedFd<'_>,
        capacity: usize,
    ) -> Result<Vec<Memslot>, KernelMirrorError> {
        let capacity = u32::try_from(capacity).expect("a memslot capacity fits in 32 bits");
        let mut slots = vec![Memslot::default(); capacity as usize];
        let mut request = VmLayout {
            pidfd: pidfd.as_raw_fd() as u32,
            vm_fd: vm_fd.as_raw_fd(),
            capacity,
            count: 0,
            slots_ptr: slots.as_mut_ptr() as u64,
        };
        // SAFETY: VM_LAYOUT writes at most `capacity` Memslots to slots_ptr, which points
        // at that many, alive across the call.
        if unsafe { libc::ioctl(self.device.as_raw_fd(), VM_LAYOUT as _, &mut request) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(KernelMirrorError::TooManyMemslots { pid, count: request.count });
            }
            return Err(KernelMirrorError::Layout { pid, source });
        }
        slots.truncate((request.count as usize).min(capacity as usize));
        Ok(slots)
    }
}

/// What the device knows of a mapping fd it returned.
pub fn info(mapping: BorrowedFd<'_>) -> Result<MirrorInfo, KernelMirrorError> {
    let mut info = MirrorInfo::default();
    // SAFETY: INFO writes one struct specula_mirror_info, which MirrorInfo lays out.
    if unsafe { libc::ioctl(mapping.as_raw_fd(), INFO as _, &mut info) } != 0 {
        return Err(KernelMirrorError::Info(std::io::Error::last_os_error()));
    }
    Ok(info)
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> Result<OwnedFd, KernelMirrorError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(KernelMirrorError::Pidfd { pid, source: std::io::Error::last_os_error() });
    }
    // SAFETY: a fresh fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A duplicate, in our table, of fd `target` of the process behind `pidfd`.
pub fn pidfd_getfd(pid: u32, pidfd: BorrowedFd<'_>, target: i32) -> Result<OwnedFd, KernelMirrorError> {
    // SAFETY: pidfd_getfd takes a pidfd, an fd number and flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(KernelMirrorError::GetFd { pid, fd: target, source: std::io::Error::last_os_error() });
    }
    // SAFETY: a fresh fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The fds of `pid` that are KVM VMs (`anon_inode:kvm-vm`).
pub fn kvm_vm_fds(pid: u32) -> Result<Vec<i32>, KernelMirrorError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| KernelMirrorError::ListFds { pid, source })?;
    let mut fds: Vec<i32> = entries
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:kvm-vm"))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// Whether this kernel's KVM maps a PFN-mapped tail page of a transparent huge page:
/// from 6.13 it no longer takes a page reference there (earlier it fails with EFAULT).
fn kvm_maps_thp_tail_pages(release: &str) -> bool {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (6, 13)
}

/// KiB of `AnonHugePages` in process `pid`'s mappings that overlap the memslots' RAM
/// (`/proc/PID/smaps`, bounded: a VMA line at a time).
fn huge_page_kib(pid: u32, memslots: &[Memslot]) -> Result<u64, KernelMirrorError> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|source| KernelMirrorError::Smaps { pid, source })?;
    let overlaps = |lo: u64, hi: u64| {
        memslots.iter().any(|s| lo < s.userspace_addr.saturating_add(s.memory_size) && s.userspace_addr < hi)
    };
    let mut current = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((lo, hi)) =
            range.and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)))
        {
            current = overlaps(lo, hi);
        } else if let Some(value) = line.strip_prefix("AnonHugePages:") {
            if current {
                kib += value.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(kib)
}

/// A KVM VMM attached by pid through the kernel mirror device.
#[derive(Debug)]
pub struct PidSource {
    pid: u32,
    pidfd: OwnedFd,
    device: KernelMirror,
    memslots: Vec<Memslot>,
    /// A one-page attach of the first memslot, never mapped: asked ([`info`]) whether
    /// the source's address space is still there.
    probe: Option<OwnedFd>,
}

impl PidSource {
    /// Attaches to process `pid`'s only KVM VM through the device at `device`, and reads
    /// its memslots.
    pub fn attach(pid: u32, device: &Path) -> Result<Self, KernelMirrorError> {
        let device = KernelMirror::open(device)?;
        let pidfd = pidfd_open(pid)?;
        let fds = kvm_vm_fds(pid)?;
        let vm_fd = match fds.as_slice() {
            [] => return Err(KernelMirrorError::NoKvmVm { pid }),
            [fd] => pidfd_getfd(pid, pidfd.as_fd(), *fd)?,
            _ => return Err(KernelMirrorError::SeveralKvmVms { pid, count: fds.len(), fds }),
        };
        let mut memslots = device.vm_layout(pid, pidfd.as_fd(), vm_fd.as_fd())?;
        memslots.retain(|s| s.address_space() == 0 && s.memory_size > 0);
        memslots.sort_by_key(|s| s.guest_phys_addr);
        if !kvm_maps_thp_tail_pages(&kernel_release()) {
            let kib = huge_page_kib(pid, &memslots)?;
            if kib > 0 {
                return Err(KernelMirrorError::TransparentHugePages { pid, kib });
            }
        }
        // Best effort: without it, a source that exits mid-request ends the agent as
        // before (an EFAULT nobody mends), which is no reason to refuse the attach.
        let probe = memslots.first().and_then(|slot| {
            device
                .attach(pid, pidfd.as_fd(), slot.userspace_addr, PAGE)
                .inspect_err(|e| log::warn!("kernel mirror: no exit probe for process {pid}: {e}"))
                .ok()
        });
        Ok(Self { pid, pidfd, device, memslots, probe })
    }

    /// Whether the source's address space is gone (it exited, or is exiting): every
    /// mapping of it then faults (SIGBUS in a process, EFAULT in a vCPU), where its
    /// pidfd may not say so yet. The device's own answer, at once.
    pub fn memory_gone(&self) -> bool {
        self.probe.as_ref().is_some_and(|probe| info(probe.as_fd()).is_ok_and(|i| i.source_alive == 0))
    }

    /// The source's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VM's memslots of address space 0, by guest-physical address.
    pub fn memslots(&self) -> &[Memslot] {
        &self.memslots
    }

    /// The VM's RAM as guest-physical ranges (its memslots).
    pub fn memory_map(&self) -> Vec<Range> {
        self.memslots.iter().map(|s| Range { gpa: s.guest_phys_addr, len: s.memory_size }).collect()
    }

    /// Maps the parts of `wanted` that are RAM, one device attach per memslot piece.
    pub fn map(&self, wanted: &[Range]) -> Result<Vec<MappedGrant>, KernelMirrorError> {
        let mut mapped = Vec::new();
        for w in wanted {
            if !w.gpa.is_multiple_of(PAGE) || !w.len.is_multiple_of(PAGE) {
                return Err(KernelMirrorError::Unaligned { gpa: w.gpa, len: w.len });
            }
            for slot in &self.memslots {
                let lo = w.gpa.max(slot.guest_phys_addr);
                let hi = w.gpa.saturating_add(w.len).min(slot.guest_phys_addr + slot.memory_size);
                if lo >= hi {
                    continue;
                }
                let start = slot.userspace_addr + (lo - slot.guest_phys_addr);
                let fd = self.device.attach(self.pid, self.pidfd.as_fd(), start, hi - lo)?;
                let grant = Grant { id: mapped.len() as u64 + 1, gpa: lo, len: hi - lo, fd_index: 0, offset: 0 };
                let grant =
                    map_device(grant, fd).map_err(|source| KernelMirrorError::Map { gpa: lo, len: hi - lo, source })?;
                mapped.push(grant);
            }
        }
        Ok(mapped)
    }

    /// [`SourceEvent::Gone`] once the source process exits (its pidfd turns readable).
    pub fn watch_exit(&self) -> Result<Receiver<SourceEvent>, KernelMirrorError> {
        let pidfd = self.pidfd.try_clone().map_err(|source| KernelMirrorError::Pidfd { pid: self.pid, source })?;
        let (tx, events) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("pidfd-{}", self.pid))
            .spawn(move || {
                let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                loop {
                    // SAFETY: one pollfd for an fd this thread owns.
                    let n = unsafe { libc::poll(&mut poll, 1, -1) };
                    if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        break;
                    }
                }
                let _ = tx.send(SourceEvent::Gone);
            })
            .map_err(|source| KernelMirrorError::Pidfd { pid: self.pid, source })?;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_layouts_match_the_kernel_header() {
        // The numbers the C header's _IOWR/_IOR give (built and printed against it).
        assert_eq!(ATTACH, 0xc020_b701);
        assert_eq!(VM_LAYOUT, 0xc018_b702);
        assert_eq!(INFO, 0x8028_b703);
        assert_eq!(std::mem::size_of::<Memslot>(), 32);
        assert_eq!(std::mem::offset_of!(Attach, fd), 24);
        assert_eq!(std::mem::offset_of!(MirrorInfo, source_alive), 32);
    }

    #[test]
    fn kvm_maps_thp_tail_pages_from_6_13_on() {
        assert!(!kvm_maps_thp_tail_pages("6.1.0-57-cloud-amd64"));
        assert!(!kvm_maps_thp_tail_pages("6.12.117+deb13-cloud-amd64"));
        assert!(kvm_maps_thp_tail_pages("6.13.0"));
        assert!(kvm_maps_thp_tail_pages("6.18.2-pvm"));
        assert!(!kvm_maps_thp_tail_pages("5.15.0"));
        assert!(!kvm_maps_thp_tail_pages("garbage"));
    }

    #[test]
    fn a_missing_device_is_named_with_what_to_load() {
        let e = KernelMirror::open(Path::new("/nonexistent/specula-mirror")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/nonexistent/specula-mirror") && text.contains("specula_mirror.ko"), "{text}");
    }

    /// One test, as the VM fd it creates would show in another test's listing.
    #[test]
    fn the_kvm_vm_fds_of_a_process_are_found_and_nothing_else() {
        assert_eq!(kvm_vm_fds(std::process::id()).unwrap(), Vec::<i32>::new(), "no VM yet");
        assert!(matches!(kvm_vm_fds(u32::MAX), Err(KernelMirrorError::ListFds { .. })));
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").expect("/dev/kvm is needed");
        // SAFETY: KVM_CREATE_VM (0xAE01) with machine type 0 returns a new VM fd.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
        assert!(vm >= 0, "KVM_CREATE_VM: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd the kernel just gave us.
        let vm = unsafe { OwnedFd::from_raw_fd(vm) };
        assert_eq!(kvm_vm_fds(std::process::id()).unwrap(), vec![vm.as_raw_fd()]);
    }
}
