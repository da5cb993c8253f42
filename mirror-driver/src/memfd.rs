//! Guest-RAM memfds and the seals that make a granted fd read-only for good.
//!
//! A RAM chunk is a memfd sealed against shrink and grow from birth (a mapper
//! of a shrunk file would take SIGBUS) and made mode 0400. That alone does not
//! keep a grant read-only: whoever holds an O_RDONLY re-open owns the inode if
//! it runs as the source's uid, so it can `fchmod` the inode and re-open it
//! read-write through /proc/self/fd. Before a chunk's first fd leaves the
//! source, [`seal_future_writes`] adds `F_SEAL_FUTURE_WRITE` (and `F_SEAL_SEAL`):
//! from then on every new write path (writable mmap, mprotect, write/pwrite,
//! hole punching, new seals) fails for every process, root included, while the
//! source's existing read-write mapping keeps working.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

/// Seals every guest-RAM chunk carries from birth.
pub const BIRTH_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
/// Seals added before a chunk is first granted.
pub const GRANT_SEALS: libc::c_int = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;

/// Creates a `size`-byte RAM memfd sealed with [`BIRTH_SEALS`] and made owner-read-only
/// (mode 0400). The returned fd itself is read-write: map it before anything else.
pub fn create_ram_memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"specula-guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    add_seals(&file, BIRTH_SEALS)?;
    // Writable re-opens through /proc/PID/fd are refused to everyone but the owner and
    // CAP_DAC_OVERRIDE; the seal above and [`seal_future_writes`] cover the owner.
    // SAFETY: fchmod on an fd we own.
    if unsafe { libc::fchmod(file.as_raw_fd(), 0o400) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Adds [`GRANT_SEALS`]: no new write path to the file exists afterwards, for anyone.
/// Idempotent.
pub fn seal_future_writes(file: &File) -> std::io::Result<()> {
    if seals(file)? & GRANT_SEALS == GRANT_SEALS {
        return Ok(());
    }
    add_seals(file, GRANT_SEALS)
}

/// The seals on `file`.
pub fn seals(file: &impl AsRawFd) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS on a valid fd.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(seals)
    }
}

fn add_seals(file: &File, seals: libc::c_int) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal bits.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn map(file: &File, len: usize, prot: libc::c_int) -> *mut libc::c_void {
        // SAFETY: a fresh shared mapping chosen by the kernel; callers unmap it.
        unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) }
    }

    #[test]
    fn sealed_ram_keeps_its_owner_mapping_writable_and_refuses_every_new_write_path() {
        let file = create_ram_memfd(1 << 20).unwrap();
        let rw = map(&file, 1 << 20, libc::PROT_READ | libc::PROT_WRITE);
        assert_ne!(rw, libc::MAP_FAILED);
        seal_future_writes(&file).unwrap();
        seal_future_writes(&file).expect("sealing twice is harmless");
        // SAFETY: rw maps 1 MiB of the file read-write.
        unsafe { rw.cast::<u8>().write_volatile(0x5a) };
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte[0], 0x5a, "the owner's existing mapping still writes");
        assert_eq!(map(&file, 4096, libc::PROT_READ | libc::PROT_WRITE), libc::MAP_FAILED);
        assert!(file.write_at(b"x", 0).is_err(), "write(2) is refused");
        // SAFETY: fallocate and F_ADD_SEALS on a file we own; both must fail.
        unsafe {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            assert_eq!(libc::fallocate(file.as_raw_fd(), punch, 0, 4096), -1, "hole punching is refused");
            assert_eq!(libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE), -1);
            libc::munmap(rw, 1 << 20);
        }
        assert!(file.set_len(4096).is_err(), "shrinking is refused");
    }

    #[test]
    fn unsealed_ram_can_still_punch_holes() {
        let file = create_ram_memfd(1 << 20).unwrap();
        file.write_at(b"data", 0).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a file we own.
        assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), punch, 0, 4096) }, 0);
        assert_eq!(seals(&file).unwrap() & GRANT_SEALS, 0);
    }
}
