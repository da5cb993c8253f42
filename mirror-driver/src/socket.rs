//! Private Unix listening sockets and their peers' credentials.
//!
//! [`bind_private`] gives the socket inode its mode *before* `bind(2)` creates
//! the file: Linux creates the socket file with the socket inode's mode less the
//! umask, so there is no moment at which the path exists with a wider mode (a
//! `bind` then `chmod` leaves such a window, in which anyone may connect).
//! [`peer_cred`] reads who is at the other end of an accepted connection
//! (SO_PEERCRED: the peer's pid, uid and gid when it connected).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Connections the kernel queues before they are accepted.
const BACKLOG: libc::c_int = 16;

/// Creates a Unix stream socket listening on `path`, whose file has mode `mode`
/// (less the process umask) from the moment it exists. A stale file at `path`
/// is removed first.
pub fn bind_private(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let fd = bind_with_mode(path, mode)?;
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// The credentials (pid, uid, gid) of the process at the other end of `stream`.
pub fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred of that size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The bind step of [`bind_private`]: a new socket, its inode set to `mode`
/// (fchmod), then bound to `path`. Not yet listening.
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    let addr = socket_address(path)?;
    let _ = std::fs::remove_file(path);
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod(2) on a socket we own; Linux's bind creates the file with this mode & ~umask.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `path` as a NUL-terminated AF_UNIX address.
fn socket_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data, for which all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad socket path {}", path.display())));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("specula-socket-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `f` with umask 0, so only the socket's own mode can keep the file private.
    fn with_umask_zero<T>(f: impl FnOnce() -> T) -> T {
        // SAFETY: umask(2) only swaps the process's file mode creation mask.
        let old = unsafe { libc::umask(0) };
        let result = f();
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        result
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_socket_file_is_private_the_moment_bind_creates_it() {
        let dir = scratch("bind");
        let path = dir.join("s.sock");
        // Stat straight after the bind step, before anything could chmod the path:
        // with umask 0 a plain bind leaves the file 0777 here.
        let (fd, mode) = with_umask_zero(|| {
            let fd = bind_with_mode(&path, 0o600).unwrap();
            (fd, mode_of(&path))
        });
        assert_eq!(mode, 0o600, "socket file mode straight after bind");
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
        drop(fd);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bind_private_listens_replaces_stale_files_and_reports_peers() {
        let dir = scratch("listen");
        let path = dir.join("s.sock");
        std::fs::write(&path, b"stale").unwrap();
        let listener = bind_private(&path, 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        let cred = peer_cred(&server).unwrap();
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!((cred.pid, cred.uid, cred.gid), (std::process::id() as libc::pid_t, uid, gid));
        drop(client);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlong_and_empty_paths_are_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert_eq!(bind_private(&long, 0o600).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(bind_private(Path::new(""), 0o600).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
