//! Framed messages over a Unix stream socket, with file descriptors beside them.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::protocol::{decode_header, DecodeError, Message, HEADER_LEN, MAX_FDS_PER_FRAME};

/// Failures reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer closed the connection")]
    Closed,
    #[error("no frame arrived within the socket's read timeout")]
    Idle,
    #[error("socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("bad frame header: {0}")]
    BadHeader(#[source] DecodeError),
    #[error("bad {kind} message: {source}")]
    BadMessage {
        kind: u16,
        /// The frame's correlation id, so the error reply answers the right request.
        id: u32,
        #[source]
        source: DecodeError,
    },
    #[error("a frame carried {got} file descriptors, more than the {MAX_FDS_PER_FRAME} allowed")]
    TooManyFds { got: usize },
}

/// One received frame: its correlation id, message, and the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    pub id: u32,
    pub message: Message,
    pub fds: Vec<OwnedFd>,
}

/// Writes one frame with correlation id `id` ([`crate::protocol::EVENT_ID`] for events),
/// with `fds` beside it.
pub fn send(stream: &UnixStream, id: u32, message: &Message, fds: &[RawFd]) -> Result<(), WireError> {
    let frame = message.encode(id);
    if fds.is_empty() {
        return (&*stream).write_all(&frame).map_err(WireError::Io);
    }
    // The fds ride on the first byte sent; the rest of the frame follows normally.
    let sent = stream.send_with_fds(&[&frame[..]], fds).map_err(|e| WireError::Io(e.into()))?;
    (&*stream).write_all(&frame[sent..]).map_err(WireError::Io)
}

/// Reads one frame.
///
/// A payload that fails to decode is consumed whole, so the stream stays in
/// step; a bad header is fatal (the peer's framing cannot be trusted). Fds that
/// came with a frame that fails to decode are closed.
pub fn recv(stream: &UnixStream) -> Result<Frame, WireError> {
    let mut header = [0u8; HEADER_LEN];
    // Reading one byte keeps the fds attached to this frame only.
    let (got, fds) = recv_first_byte(stream, &mut header[..1]).map_err(|e| {
        // A read timeout before the first byte of a frame leaves the stream in step.
        if e.kind() == std::io::ErrorKind::WouldBlock {
            WireError::Idle
        } else {
            WireError::Io(e)
        }
    })?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    read_full(stream, &mut header[got..])?;
    let header = decode_header(&header).map_err(WireError::BadHeader)?;
    let mut payload = vec![0u8; header.len];
    read_full(stream, &mut payload)?;
    let kind = header.kind;
    let message =
        Message::decode(kind, &payload).map_err(|source| WireError::BadMessage { kind, id: header.id, source })?;
    Ok(Frame { id: header.id, message, fds })
}

/// Reads into `buf` with the fds that come with it, each close-on-exec from the moment
/// it exists (`MSG_CMSG_CLOEXEC`): a grant's fd must never reach a process this one
/// starts, not even one started by another thread between the receive and an fcntl.
/// More fds than a frame may carry are an error (the kernel closes what did not fit).
fn recv_first_byte(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    const FD_BYTES: usize = MAX_FDS_PER_FRAME * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES as u32) } as usize;
    // u64s, so the control buffer is aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a zeroed msghdr is a valid empty one; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg points at `iov` (covering `buf`) and `control` (`space` bytes), both
    // live across the call.
    let got = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: msg's control area was filled by recvmsg; the CMSG_* walk stays inside it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside `control`.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size; CMSG_DATA points inside this header.
            let (empty, data) = unsafe { (libc::CMSG_LEN(0) as usize, libc::CMSG_DATA(cmsg).cast::<RawFd>()) };
            let count = (header.cmsg_len as usize).saturating_sub(empty) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `count` fds follow the header; each is a new descriptor we own.
                fds.push(unsafe { OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))) });
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(format!("a frame came with more than {MAX_FDS_PER_FRAME} fds")));
    }
    Ok((got as usize, fds))
}

fn read_full(stream: &UnixStream, buf: &mut [u8]) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fd` is close-on-exec.
    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0, "F_GETFD");
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn received_fds_are_close_on_exec_and_stay_with_their_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        // An fd that is not close-on-exec on the sending side.
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: clearing FD_CLOEXEC on a File we own.
        assert_eq!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) }, 0);
        send(&a, 7, &Message::Paused, &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        send(&a, 8, &Message::Resumed, &[]).unwrap();
        let first = recv(&b).unwrap();
        assert_eq!((first.id, first.message, first.fds.len()), (7, Message::Paused, 2));
        assert!(first.fds.iter().all(cloexec), "a grant's fd must not reach a child process");
        let second = recv(&b).unwrap();
        assert_eq!((second.id, second.fds.len()), (8, 0));
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Closed)));
    }
}
