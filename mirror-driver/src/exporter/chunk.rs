//! RAM chunks: discards (hole punch or zeroing) and re-homing into a fresh memfd.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::{lock, Chunk, ExportError, Shared};
use crate::memfd;

impl Chunk {
    pub(super) fn current_file(&self) -> Arc<File> {
        lock(&self.file).clone()
    }

    /// Zeros `len` bytes at `offset`: a hole punch where the chunk is not sealed, an
    /// in-place zeroing where it is.
    pub(super) fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let file = self.current_file();
        match punch_hole(&file, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // SAFETY: offset + len lies within this chunk, which the source keeps mapped
                // read-write at host_addr for the VM's lifetime (a re-home replaces the
                // mapping in place, under the same `ops` lock the caller holds).
                unsafe { std::ptr::write_bytes((self.host_addr + offset) as *mut u8, 0, len as usize) };
                Ok(())
            }
            other => other,
        }
    }
}

impl Shared {
    /// Moves `chunk` into a fresh memfd mapped at the same address, with the vCPUs held,
    /// so every fd of the old memfd becomes a snapshot nobody writes. Caller holds `ops`.
    pub(super) fn rehome(&self, chunk: &Chunk) -> Result<(), ExportError> {
        let gpa = chunk.gpa;
        let io = |source| ExportError::Rehome { gpa, source };
        let fresh = memfd::create_ram_memfd(chunk.len).map_err(io)?;
        let len = chunk.len as usize;
        // SAFETY: a new shared read-write mapping of our own fresh memfd; unmapped below.
        let staging = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fresh.as_raw_fd(),
                0,
            )
        };
        if staging == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        let old = chunk.current_file();
        let moved = self.source.pause().map_err(|source| ExportError::Pause { gpa, source }).and_then(|()| {
            let moved = copy_and_remap(chunk, &old, staging.cast(), &fresh).map_err(io);
            self.source.resume();
            moved
        });
        // SAFETY: unmapping the staging mapping created above.
        unsafe { libc::munmap(staging, len) };
        moved?;
        *lock(&chunk.file) = Arc::new(fresh);
        Ok(())
    }
}

/// Copies the chunk's data (holes stay holes) into `staging` and maps `fresh` over the
/// source's range. The vCPUs are held, so no guest write is lost between the two.
fn copy_and_remap(chunk: &Chunk, old: &File, staging: *mut u8, fresh: &File) -> std::io::Result<()> {
    for (offset, len) in data_segments(old, chunk.len)? {
        // SAFETY: both ranges lie inside live `chunk.len`-byte mappings (the source's RAM
        // mapping and the staging mapping), which do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (chunk.host_addr + offset) as *const u8,
                staging.add(offset as usize),
                len as usize,
            )
        };
    }
    // SAFETY: replaces exactly the source's own read-write mapping of this chunk, in place,
    // with the same length and protection; KVM's MMU notifiers drop stale translations.
    let mapped = unsafe {
        libc::mmap(
            chunk.host_addr as *mut libc::c_void,
            chunk.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fresh.as_raw_fd(),
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The (offset, len) ranges of `file` that hold data, by SEEK_DATA/SEEK_HOLE.
pub(super) fn data_segments(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut segments = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        // SAFETY: lseek on a valid fd; it does not touch memory.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole > data {
            segments.push((data, hole - data));
        }
        offset = hole.max(data + 1);
    }
    Ok(segments)
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file we own; the range was checked against its size.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
