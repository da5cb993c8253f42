//! Grants mapped read-only into this process: the fd checks (access mode, seals,
//! extent) made before anything is mapped, and the zero pages left behind.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{ImportError, PAGE};
use crate::memfd::GRANT_SEALS;
use crate::protocol::Grant;

/// A grant mapped read-only into this process.
pub struct MappedGrant {
    pub grant: Grant,
    map_base: *mut libc::c_void,
    map_len: usize,
    /// Address of the grant's first byte in this process.
    host_addr: u64,
    /// Moved into a caller's reservation ([`MappedGrant::relocate`]).
    relocated: bool,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid until drop; no thread affinity.
unsafe impl Send for MappedGrant {}
// SAFETY: read-only shared memory may be read from any thread.
unsafe impl Sync for MappedGrant {}

impl MappedGrant {
    /// Host address of the grant's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// Bytes this grant's mapping spans (whole pages).
    pub fn map_len(&self) -> u64 {
        self.map_len as u64
    }

    /// Moves the mapping to `addr` (page-aligned), so that grants side by side in
    /// guest-physical space sit side by side in this process and one memslot covers them.
    /// From then on, dropping the grant leaves private zero pages where it was instead of
    /// a hole: the memslot over it keeps a backing that holds nothing of the source, and
    /// no later mapping of this process can land inside the memslot.
    ///
    /// # Safety
    /// `addr..addr + self.map_len()` must be a mapping the caller owns and hands over to
    /// this grant for the life of the process (the caller never unmaps it).
    pub unsafe fn relocate(&mut self, addr: u64) -> Result<(), ImportError> {
        // SAFETY: moves exactly this grant's mapping over the caller's reservation (the
        // caller's contract); MREMAP_FIXED replaces what was there atomically.
        let moved = unsafe {
            libc::mremap(
                self.map_base,
                self.map_len,
                self.map_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                addr as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(ImportError::Map { grant: self.grant.id, source: std::io::Error::last_os_error() });
        }
        let lead = self.host_addr - self.map_base as u64;
        self.map_base = moved;
        self.host_addr = moved as u64 + lead;
        self.relocated = true;
        Ok(())
    }

    /// The granted bytes. They change as the source guest runs.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: host_addr..+len lies inside the live PROT_READ mapping.
        unsafe { std::slice::from_raw_parts(self.host_addr as *const u8, self.grant.len as usize) }
    }
}

impl Drop for MappedGrant {
    fn drop(&mut self) {
        if !self.relocated {
            // SAFETY: unmapping exactly the mapping this object created.
            unsafe { libc::munmap(self.map_base, self.map_len) };
            return;
        }
        // SAFETY: exactly this grant's mapping, inside the reservation it was handed.
        if let Err(e) = unsafe { put_zero_pages(self.map_base, self.map_len) } {
            // The old mapping may be gone and a hole left inside a memslot, where a later
            // mapping of this process could land and be read by the agent: stop here.
            eprintln!(
                "mirror: cannot put zero pages in place of grant {} ({e}); aborting rather than leave a hole",
                self.grant.id,
            );
            std::process::abort();
        }
    }
}

/// Replaces whatever is mapped at `addr..addr + len` with private read-only zero pages,
/// in place (`MAP_FIXED`): the kernel's MMU notifiers zap every secondary mapping
/// (KVM's) of the old pages before it returns, so a memslot over the range reads zeros.
///
/// # Safety
/// The range must be page-aligned and belong to the caller, who gives up what was
/// mapped there: nothing may still hold references into it.
pub unsafe fn put_zero_pages(addr: *mut libc::c_void, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller's contract: its own range, replaced in place.
    let zeros = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if zeros == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Maps a range of another VMM's RAM file (QEMU's memfd) opened read-only: the fd must
/// be O_RDONLY and large enough; seals are the other VMM's business.
pub fn map_foreign(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    check_extent(&grant, &fd)?;
    map_checked(grant, fd)
}

/// Maps a range the kernel mirror device attached ([`crate::kernel_mirror`]): the fd
/// must be read-only. Its extent is the device's (an anonymous inode has no size to
/// check): it refuses a mapping beyond the attached range.
pub fn map_device(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    let aligned = grant.len > 0 && grant.offset.is_multiple_of(PAGE) && grant.len.is_multiple_of(PAGE);
    if !aligned || usize::try_from(grant.len).is_err() {
        return Err(ImportError::OutOfFile { grant: grant.id, offset: grant.offset, len: grant.len, size: 0 });
    }
    map_checked(grant, fd)
}

/// Checks a received fd (read-only, sealed against shrink and future writes, large
/// enough for the grant) and maps `grant` from it.
pub fn map_grant(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl queries on an fd we own.
    let (seals, flags) = unsafe { (libc::fcntl(raw, libc::F_GET_SEALS), libc::fcntl(raw, libc::F_GETFL)) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(ImportError::Unsealed { grant: grant.id });
    }
    if seals & GRANT_SEALS != GRANT_SEALS {
        return Err(ImportError::WritableSeals { grant: grant.id });
    }
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    check_extent(&grant, &fd)?;
    map_checked(grant, fd)
}

/// Maps a grant whose fd passed its checks, PROT_READ and MAP_SHARED.
fn map_checked(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    let raw = fd.as_raw_fd();
    let aligned = grant.offset & !(PAGE - 1);
    let lead = grant.offset - aligned;
    let map_len = (lead + grant.len).div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh PROT_READ shared mapping of a checked file; the kernel picks the address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            raw,
            aligned as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(ImportError::Map { grant: grant.id, source: std::io::Error::last_os_error() });
    }
    Ok(MappedGrant {
        grant,
        map_base: base,
        map_len: map_len as usize,
        host_addr: base as u64 + lead,
        relocated: false,
        _fd: fd,
    })
}

/// Fails unless the grant is page-aligned, non-empty and lies inside the fd's file
/// (a mapping beyond the end would SIGBUS on first touch).
fn check_extent(grant: &Grant, fd: &OwnedFd) -> Result<(), ImportError> {
    // SAFETY: stat is plain data; fstat fills it for an fd we own.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let size = if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } == 0 { stat.st_size as u64 } else { 0 };
    let fits = grant.len > 0
        && grant.offset.is_multiple_of(PAGE)
        && grant.len.is_multiple_of(PAGE)
        && grant.offset.checked_add(grant.len).is_some_and(|end| end <= size)
        && usize::try_from(grant.len).is_ok();
    if fits {
        Ok(())
    } else {
        Err(ImportError::OutOfFile { grant: grant.id, offset: grant.offset, len: grant.len, size })
    }
}
