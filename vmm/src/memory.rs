//! Guest RAM: sealed memfd chunks, mapped MAP_SHARED, split around the MMIO gap
//! (or, with [`MemoryBackend::Anonymous`], private anonymous memory).
//!
//! The memfds are what make mirroring possible: the mirror device hands other
//! processes read-only re-opens of them. RAM is cut into chunks, one memfd
//! each, so that a grant's file descriptors expose no more than the chunks the
//! grant overlaps (an fd always exposes its whole file). Every chunk keeps its
//! fd, file offset and guest address reachable through [`GuestRam::regions`].
//!
//! Chunks side by side in guest-physical space are mapped back to back in one
//! reserved address range, so each contiguous run of RAM (below and above the MMIO
//! gap) is one KVM memslot: KVM pays an SRCU synchronisation per memslot change and
//! per dirty-log query, so their number stays two whatever the RAM size.
//!
//! The mirror device seals a chunk against future writes before it grants it
//! (see `mirror_driver::memfd`), and may re-home a chunk into a fresh memfd on
//! revocation; [`GuestRam::chunk_file`] is the file the chunk was born with.

use std::fs::File;
use std::sync::Arc;

use mirror_driver::memfd::create_ram_memfd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest RAM accepted: room for the boot structures below 1 MiB and a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted (the backing is sparse, but page tables and memslots are finite).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Smallest RAM chunk (one memfd, one memslot).
pub const MIN_CHUNK: u64 = 2 << 20;
/// Chunks per VM that the default chunk size aims at (memslots and fds stay bounded).
const TARGET_CHUNKS: u64 = 1024;

/// What backs guest RAM (`--memory-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBackend {
    /// Sealed memfd chunks: the mirror socket hands out read-only re-opens of them.
    #[default]
    Memfd,
    /// Private anonymous memory, as QEMU and Firecracker use by default: no file to
    /// share, so only the kernel mirror device (`inspector --pid`) can mirror it.
    Anonymous,
}

/// Failures while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {size} bytes is outside [{MIN_MEMORY}, {MAX_MEMORY}]")]
    BadSize { size: u64 },
    #[error("cannot create a sealed, owner-read-only {size}-byte guest RAM memfd")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reserve {len:#x} bytes of address space for guest RAM at {gpa:#x}")]
    Reserve {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {len:#x} bytes of anonymous guest RAM at {gpa:#x}")]
    Anonymous {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest RAM chunk at {gpa:#x}")]
    Map {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot describe guest RAM chunk at {gpa:#x} to vm-memory")]
    Region {
        gpa: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest RAM regions")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One chunk of guest RAM and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Index of the chunk's memfd in [`GuestRam::chunk_file`].
    pub chunk: usize,
    /// Offset of this range inside that memfd.
    pub file_offset: u64,
    /// Host virtual address of the VMM's MAP_SHARED mapping.
    pub host_addr: u64,
}

/// A contiguous run of guest RAM, mapped back to back in this process: one memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSlot {
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// The address ranges guest RAM is mapped in; unmapped when the last holder is gone.
#[derive(Debug)]
struct Reservations(Vec<RamSlot>);

impl Drop for Reservations {
    fn drop(&mut self) {
        for slot in &self.0 {
            // SAFETY: each range was reserved by `reserve` for guest RAM and nothing else;
            // the last holder of the mappings is going.
            unsafe { libc::munmap(slot.host_addr as *mut libc::c_void, slot.size as usize) };
        }
    }
}

/// A clone of guest RAM's vm-memory view that keeps its mappings alive (a plain clone
/// of [`GuestRam::memory`] must not outlive the [`GuestRam`]).
#[derive(Clone)]
pub struct SharedMemory {
    memory: GuestMemoryMmap,
    _mappings: Arc<Reservations>,
}

impl std::ops::Deref for SharedMemory {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Guest RAM of one VM.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    mappings: Arc<Reservations>,
    chunk_files: Vec<Arc<File>>,
    regions: Vec<RamRegion>,
    size: u64,
    chunk_size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM with the default chunk size.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_chunk_size(size, default_chunk_size(size))
    }

    /// Creates `size` bytes of guest RAM backed as `backend` says.
    pub fn with_backend(size: u64, backend: MemoryBackend) -> Result<Self, MemoryError> {
        match backend {
            MemoryBackend::Memfd => Self::new(size),
            MemoryBackend::Anonymous => Self::anonymous(size),
        }
    }

    /// Creates `size` bytes of private anonymous guest RAM: one mapping per side of the
    /// MMIO gap and no chunk files ([`GuestRam::regions`] is empty).
    pub fn anonymous(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let mut mmap_regions = Vec::new();
        let mut mappings = Reservations(Vec::new());
        for (start, len) in split_around_mmio_gap(size) {
            let base = reserve_address_space(len).map_err(|source| MemoryError::Reserve { gpa: start, len, source })?;
            mappings.0.push(RamSlot { guest_addr: start, size: len, host_addr: base });
            map_anonymous(base, len).map_err(|source| MemoryError::Anonymous { gpa: start, len, source })?;
            // SAFETY: base..+len is the anonymous mapping just made, inside a reservation
            // that `mappings` keeps until every holder of the regions is gone.
            let mapping = unsafe {
                vm_memory::mmap::MmapRegionBuilder::new(len as usize)
                    .with_raw_mmap_pointer(base as *mut u8)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED)
                    .build()
            }
            .map_err(|source| MemoryError::Region { gpa: start, source })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(start))
                .expect("RAM below 1 TiB does not wrap the address space");
            mmap_regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mmap_regions).map_err(MemoryError::Collection)?;
        Ok(Self {
            memory,
            mappings: Arc::new(mappings),
            chunk_files: Vec::new(),
            regions: Vec::new(),
            size,
            chunk_size: 0,
        })
    }

    /// Creates `size` bytes of guest RAM, laid out below and above the MMIO gap, in chunks
    /// of `chunk_size` bytes (a power of two, at least [`MIN_CHUNK`]).
    pub fn with_chunk_size(size: u64, chunk_size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let chunk_size = chunk_size.max(MIN_CHUNK).next_power_of_two();
        let mut mmap_regions = Vec::new();
        let mut regions = Vec::new();
        let mut chunk_files = Vec::new();
        let mut mappings = Reservations(Vec::new());
        for (start, len) in split_around_mmio_gap(size) {
            let base = reserve_address_space(len).map_err(|source| MemoryError::Reserve { gpa: start, len, source })?;
            mappings.0.push(RamSlot { guest_addr: start, size: len, host_addr: base });
            let mut gpa = start;
            while gpa < start + len {
                let chunk_len = chunk_size.min(start + len - gpa);
                let file = Arc::new(
                    create_ram_memfd(chunk_len).map_err(|source| MemoryError::Memfd { size: chunk_len, source })?,
                );
                let host_addr = base + (gpa - start);
                map_chunk(&file, host_addr, chunk_len).map_err(|source| MemoryError::Map { gpa, source })?;
                // SAFETY: host_addr..+chunk_len is the chunk's mapping just made, inside a
                // reservation that `mappings` keeps until every holder of the regions is gone.
                let mapping = unsafe {
                    vm_memory::mmap::MmapRegionBuilder::new(chunk_len as usize)
                        .with_raw_mmap_pointer(host_addr as *mut u8)
                        .with_file_offset(FileOffset::from_arc(file.clone(), 0))
                        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_FIXED)
                        .build()
                }
                .map_err(|source| MemoryError::Region { gpa, source })?;
                let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                    .expect("a chunk below 1 TiB does not wrap the address space");
                regions.push(RamRegion {
                    guest_addr: gpa,
                    size: chunk_len,
                    chunk: chunk_files.len(),
                    file_offset: 0,
                    host_addr,
                });
                chunk_files.push(file);
                mmap_regions.push(region);
                gpa += chunk_len;
            }
        }
        let memory = GuestMemoryMmap::from_regions(mmap_regions).map_err(MemoryError::Collection)?;
        Ok(Self { memory, mappings: Arc::new(mappings), chunk_files, regions, size, chunk_size })
    }

    /// The vm-memory view used by loaders and devices. Hold a [`GuestRam::shared_memory`]
    /// rather than a clone of it where the view may outlive this `GuestRam`.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// A clone of the vm-memory view that keeps the mappings alive for as long as it lives.
    pub fn shared_memory(&self) -> SharedMemory {
        SharedMemory { memory: self.memory.clone(), _mappings: self.mappings.clone() }
    }

    /// The contiguous runs of RAM (one each side of the MMIO gap), each one memslot.
    pub fn slots(&self) -> &[RamSlot] {
        &self.mappings.0
    }

    /// The sealed memfd of chunk `index`.
    pub fn chunk_file(&self, index: usize) -> &Arc<File> {
        &self.chunk_files[index]
    }

    /// Gives every chunk's memfd to `uid`/`gid`, for a VMM that is about to drop to them:
    /// the mirror device re-opens chunks through /proc/self/fd, which needs the owner.
    pub fn chown_chunks(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        for file in &self.chunk_files {
            // SAFETY: fchown on an fd we own.
            if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Bytes per chunk (the last chunk of each side of the MMIO gap may be shorter; 0 for
    /// anonymous RAM).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The RAM chunks in guest-address order (none for anonymous RAM).
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of the RAM below the MMIO gap.
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_GAP_START)
    }

    /// Whether `[gpa, gpa + len)` is all RAM.
    pub fn contains_range(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else { return false };
        split_around_mmio_gap(self.size).iter().any(|&(start, size)| gpa >= start && end <= start + size)
    }

    /// The chunks overlapping `[gpa, gpa + len)`, each with the overlapping sub-range.
    pub fn chunks_overlapping(&self, gpa: u64, len: u64) -> impl Iterator<Item = (&RamRegion, u64, u64)> {
        let end = gpa.saturating_add(len);
        self.regions.iter().filter_map(move |r| {
            let lo = gpa.max(r.guest_addr);
            let hi = end.min(r.guest_addr + r.size);
            (lo < hi).then(|| (r, lo, hi - lo))
        })
    }
}

/// Reserves `len` bytes of address space that nothing can touch until something is
/// mapped over it with `MAP_FIXED` (guest RAM chunks here, grants in the inspector's
/// mirror window); returns its address.
pub fn reserve_address_space(len: u64) -> std::io::Result<u64> {
    // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel picks.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(base as u64)
}

/// Fails unless `size` is an acceptable guest RAM size.
fn check_size(size: u64) -> Result<(), MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
        return Err(MemoryError::BadSize { size });
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size));
    }
    Ok(())
}

/// Maps `len` bytes of private anonymous read-write memory over a reservation at `host_addr`.
fn map_anonymous(host_addr: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: host_addr..+len is a reservation of our own (PROT_NONE until now), which
    // MAP_FIXED replaces.
    let at = unsafe {
        libc::mmap(
            host_addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Maps all of `file` read-write and shared at `host_addr`, over part of a reservation.
fn map_chunk(file: &File, host_addr: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: host_addr..+len lies inside a reservation of our own (PROT_NONE until now),
    // which MAP_FIXED replaces; the file is at least `len` bytes long.
    let at = unsafe {
        libc::mmap(
            host_addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Default chunk size: 2 MiB, growing in powers of two so a VM has at most ~1024 chunks.
pub fn default_chunk_size(size: u64) -> u64 {
    size.div_ceil(TARGET_CHUNKS).max(MIN_CHUNK).next_power_of_two()
}

/// Guest RAM layout as (guest address, length) pairs.
pub fn split_around_mmio_gap(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Parses a memory size such as `512M`, `2G`, `65536K` or a byte count.
///
/// Kept for the fuzz targets, which take `None` for a bad size:
/// [`specula_common::parse::size`] says why.
pub fn parse_size(text: &str) -> Option<u64> {
    specula_common::parse::size(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_ram_is_chunked_from_zero() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.chunk_size(), MIN_CHUNK);
        assert_eq!(ram.regions().len(), 32);
        assert_eq!(ram.regions()[0].guest_addr, 0);
        assert_eq!(ram.regions()[31].guest_addr + ram.regions()[31].size, 64 << 20);
        let first = ram.memory().iter().next().unwrap();
        assert_eq!((first.start_addr().0, first.len()), (0, MIN_CHUNK), "vm-memory sees the same chunks");
        // All 32 chunks sit back to back in one mapping: one memslot.
        assert_eq!(ram.slots().len(), 1);
        assert!(ram.regions().windows(2).all(|w| w[1].host_addr == w[0].host_addr + w[0].size));
        assert_eq!(ram.slots()[0], RamSlot { guest_addr: 0, size: 64 << 20, host_addr: ram.regions()[0].host_addr });
    }

    #[test]
    fn anonymous_ram_is_private_memory_in_one_slot_per_side_of_the_gap_with_no_chunk_files() {
        let ram = GuestRam::with_backend((4 << 30) + (64 << 20), MemoryBackend::Anonymous).unwrap();
        assert!(ram.regions().is_empty());
        assert_eq!(ram.slots().len(), 2);
        assert_eq!(
            (ram.slots()[1].guest_addr, ram.slots()[1].size),
            (MMIO_GAP_END, (4 << 30) + (64 << 20) - MMIO_GAP_START)
        );
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let low = ram.slots()[0].host_addr;
        // Adjacent anonymous mappings may merge: the line whose range holds the slot.
        let line = maps
            .lines()
            .find(|l| {
                let range = l.split_whitespace().next().unwrap_or("");
                let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
                let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
                a <= low && low < b
            })
            .expect("the low slot's mapping");
        assert!(
            line.split_whitespace().nth(1) == Some("rw-p") && line.split_whitespace().nth(3) == Some("00:00"),
            "{line}"
        );
        ram.memory().write_obj(0xdead_beef_u32, GuestAddress(MMIO_GAP_END + 8)).unwrap();
        let high = ram.slots()[1].host_addr as *const u32;
        // SAFETY: the high slot's mapping is alive while `ram` is, and 8 bytes in is RAM.
        assert_eq!(unsafe { high.add(2).read_volatile() }, 0xdead_beef);
        assert!(matches!(GuestRam::anonymous(4097), Err(MemoryError::Unaligned(_)) | Err(MemoryError::BadSize { .. })));
    }

    #[test]
    fn large_ram_is_split_around_the_mmio_gap() {
        let size = 5 << 30;
        let ram = GuestRam::new(size).unwrap();
        assert!(ram.regions().len() <= TARGET_CHUNKS as usize + 2);
        let below: u64 = ram.regions().iter().filter(|r| r.guest_addr < MMIO_GAP_START).map(|r| r.size).sum();
        let above: u64 = ram.regions().iter().filter(|r| r.guest_addr >= MMIO_GAP_END).map(|r| r.size).sum();
        assert_eq!((below, above), (MMIO_GAP_START, size - MMIO_GAP_START));
        assert!(ram.contains_range(MMIO_GAP_END, 4096));
        assert!(!ram.contains_range(MMIO_GAP_START, 4096));
        assert_eq!(ram.low_ram_end(), MMIO_GAP_START);
        let slots: Vec<(u64, u64)> = ram.slots().iter().map(|s| (s.guest_addr, s.size)).collect();
        assert_eq!(slots, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]);
    }

    #[test]
    fn memfds_are_sealed_and_owner_read_only() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let file = ram.chunk_file(0);
        let seals = mirror_driver::memfd::seals(&**file).unwrap();
        let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        assert_eq!(seals & wanted, wanted);
        assert_eq!(seals & libc::F_SEAL_SEAL, 0, "the mirror device must still be able to seal future writes");
        assert!(file.set_len(4096).is_err(), "shrink must be refused");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o400);
    }

    #[test]
    fn writes_through_the_mapping_land_in_the_chunk_memfd() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let gpa = (2 << 20) + 0x1234;
        ram.memory().write_obj(0xdead_beef_u32, GuestAddress(gpa)).unwrap();
        let (region, lo, _) = ram.chunks_overlapping(gpa, 4).next().unwrap();
        let mut buf = [0u8; 4];
        ram.chunk_file(region.chunk).read_exact_at(&mut buf, lo - region.guest_addr).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn overlapping_chunks_are_clipped_to_the_range() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let parts: Vec<_> = ram.chunks_overlapping((2 << 20) - 16, 32).map(|(r, lo, len)| (r.chunk, lo, len)).collect();
        assert_eq!(parts, vec![(0, (2 << 20) - 16, 16), (1, 2 << 20, 16)]);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestRam::new(4096), Err(MemoryError::BadSize { .. })));
        assert!(matches!(GuestRam::new((4 << 20) + 1), Err(MemoryError::Unaligned(_))));
    }

    #[test]
    fn default_chunks_stay_bounded() {
        assert_eq!(default_chunk_size(64 << 20), MIN_CHUNK);
        assert_eq!(default_chunk_size(64 << 30), 64 << 20);
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
