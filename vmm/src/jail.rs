//! Process hardening shared by the `vmm` and the `inspector`.
//!
//! - [`forbid_tracing`] makes the process non-dumpable: /proc/PID/mem, /proc/PID/fd
//!   and ptrace are refused to every process without CAP_SYS_PTRACE, the same uid
//!   included. Without it a same-uid peer could write the source's RAM through
//!   /proc/PID/mem or re-open its read-write RAM fds through /proc/PID/fd.
//! - [`drop_privileges`] is Firecracker's jailer pattern: open /dev/kvm and the
//!   images as the launching user, then run as an unprivileged uid of its own.

/// Failures hardening the process.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot make the process non-dumpable (PR_SET_DUMPABLE)")]
    Dumpable(#[source] std::io::Error),
    #[error("cannot drop supplementary groups")]
    Groups(#[source] std::io::Error),
    #[error("cannot switch to gid {0}")]
    Gid(u32, #[source] std::io::Error),
    #[error("cannot switch to uid {0}")]
    Uid(u32, #[source] std::io::Error),
    #[error("dropped to uid {0}, yet the process could switch back to root")]
    Regained(u32),
}

/// Makes the process non-dumpable (see the module documentation).
pub fn forbid_tracing() -> Result<(), JailError> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) affects only this process's own flags.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(JailError::Dumpable(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Switches every thread of the process to `uid`/`gid` for good (no supplementary
/// groups), checks that root cannot be regained, and stays non-dumpable.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let os = std::io::Error::last_os_error;
    // SAFETY: setgroups/setresgid/setresuid with valid arguments; glibc applies them to
    // every thread of the process.
    unsafe {
        if libc::getuid() == 0 && libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::Groups(os()));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(JailError::Gid(gid, os()));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(JailError::Uid(uid, os()));
        }
        if uid != 0 && libc::setuid(0) == 0 {
            return Err(JailError::Regained(uid));
        }
    }
    forbid_tracing()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_becomes_non_dumpable() {
        forbid_tracing().unwrap();
        // SAFETY: PR_GET_DUMPABLE reads this process's flag.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
