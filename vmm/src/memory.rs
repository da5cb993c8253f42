//! Guest RAM: one sealed memfd, mapped MAP_SHARED, split around the MMIO gap.
//!
//! The memfd is what makes mirroring possible: the mirror device hands other
//! processes read-only re-opens of it, so every region keeps its fd, file
//! offset and guest address reachable through [`GuestRam::regions`].

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest RAM accepted: room for the boot structures below 1 MiB and a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted (the backing is sparse, but page tables and memslots are finite).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Failures while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {size} bytes is outside [{MIN_MEMORY}, {MAX_MEMORY}]")]
    BadSize { size: u64 },
    #[error("memfd_create for guest RAM failed")]
    MemfdCreate(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot seal the guest RAM memfd")]
    Seal(#[source] std::io::Error),
    #[error("cannot map guest RAM region at {gpa:#x}")]
    Map {
        gpa: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot assemble guest RAM regions")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous range of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this range inside the memfd.
    pub file_offset: u64,
    /// Host virtual address of the VMM's MAP_SHARED mapping.
    pub host_addr: u64,
}

/// Guest RAM of one VM.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    memfd: Arc<File>,
    regions: Vec<RamRegion>,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM, laid out below and above the MMIO gap.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(MemoryError::BadSize { size });
        }
        if !size.is_multiple_of(4096) {
            return Err(MemoryError::Unaligned(size));
        }
        let memfd = Arc::new(create_sealed_memfd(size)?);
        let layout = split_around_mmio_gap(size);
        let mut mmap_regions = Vec::with_capacity(layout.len());
        let mut regions = Vec::with_capacity(layout.len());
        for &(guest_addr, len, file_offset) in &layout {
            let region = GuestRegionMmap::from_range(
                GuestAddress(guest_addr),
                len as usize,
                Some(FileOffset::from_arc(memfd.clone(), file_offset)),
            )
            .map_err(|source| MemoryError::Map { gpa: guest_addr, source })?;
            regions.push(RamRegion { guest_addr, size: len, file_offset, host_addr: region.as_ptr() as u64 });
            mmap_regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mmap_regions).map_err(MemoryError::Collection)?;
        Ok(Self { memory, memfd, regions, size })
    }

    /// The vm-memory view used by loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The sealed memfd backing all regions.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// The RAM regions in guest-address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of the RAM below the MMIO gap.
    pub fn low_ram_end(&self) -> u64 {
        self.regions[0].guest_addr + self.regions[0].size
    }

    /// Finds the region holding `[gpa, gpa + len)`, if the range lies in one region.
    pub fn region_for(&self, gpa: u64, len: u64) -> Option<&RamRegion> {
        let end = gpa.checked_add(len)?;
        self.regions.iter().find(|r| gpa >= r.guest_addr && end <= r.guest_addr + r.size)
    }

    /// Number of bytes a `GuestMemoryMmap` region at `gpa` spans (used by tests).
    pub fn region_len_at(&self, gpa: u64) -> Option<u64> {
        self.memory.iter().find(|r| r.start_addr().0 == gpa).map(|r| r.len())
    }
}

/// Guest RAM layout as (guest address, length, memfd offset) triples.
pub fn split_around_mmio_gap(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size, 0)]
    } else {
        vec![(0, MMIO_GAP_START, 0), (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START)]
    }
}

/// Creates the RAM memfd and seals it against shrink, grow and further sealing.
///
/// F_SEAL_SHRINK matters most: a mapper of a shrunk file would take SIGBUS, and
/// the inspector maps this file. F_SEAL_WRITE is not set: the guest writes.
fn create_sealed_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"specula-guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::MemfdCreate(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal bits.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Parses a memory size such as `512M`, `2G`, `65536K` or a byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        b'T' | b't' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_at_zero() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.regions().len(), 1);
        assert_eq!(ram.regions()[0].guest_addr, 0);
        assert_eq!(ram.regions()[0].size, 64 << 20);
        assert_eq!(ram.region_len_at(0), Some(64 << 20));
    }

    #[test]
    fn large_ram_is_split_around_the_mmio_gap() {
        let size = 5 << 30;
        let ram = GuestRam::new(size).unwrap();
        let r = ram.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].guest_addr, r[0].size, r[0].file_offset), (0, MMIO_GAP_START, 0));
        assert_eq!(
            (r[1].guest_addr, r[1].size, r[1].file_offset),
            (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START)
        );
        assert_eq!(ram.memfd().metadata().unwrap().len(), size);
    }

    #[test]
    fn memfd_is_sealed_against_shrink_grow_and_seal() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // SAFETY: F_GET_SEALS on an fd we own.
        let seals = unsafe { libc::fcntl(ram.memfd().as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
        assert_eq!(seals & libc::F_SEAL_GROW, libc::F_SEAL_GROW);
        assert_eq!(seals & libc::F_SEAL_SEAL, libc::F_SEAL_SEAL);
        assert!(ram.memfd().set_len(1 << 20).is_err(), "shrink must be refused");
    }

    #[test]
    fn writes_through_the_mapping_land_in_the_memfd() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1234)).unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestRam::new(4096), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRam::new((4 << 20) + 1), Err(MemoryError::Unaligned(_))));
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
