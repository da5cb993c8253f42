//! Framed messages over a Unix stream socket, with file descriptors beside them.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
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
    let mut fd_slots = [-1 as RawFd; MAX_FDS_PER_FRAME];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: 1 }];
    // SAFETY: the iovec covers the first byte of `header`, which may take any value; the
    // fds land in `fd_slots`. Reading one byte keeps the fds attached to this frame only.
    let (got, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fd_slots) }.map_err(|e| {
        // A read timeout before the first byte of a frame leaves the stream in step.
        if e.errno() == libc::EAGAIN || e.errno() == libc::EWOULDBLOCK {
            WireError::Idle
        } else {
            WireError::Io(e.into())
        }
    })?;
    // SAFETY: recv_with_fds returned `nfds` new descriptors that we now own.
    let fds: Vec<OwnedFd> = fd_slots[..nfds].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
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
