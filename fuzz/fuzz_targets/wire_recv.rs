//! Fuzzes `mirror_driver::wire::recv` over a real Unix socketpair, the way an
//! importer or exporter reads a frame from its (untrusted) peer. The fuzzer's
//! bytes are written raw into one end, optionally with file descriptors riding
//! on the first byte as SCM_RIGHTS, then that end is shut down and `recv` reads
//! the other. Checks:
//!
//! - `recv` never panics and never blocks (the writer is shut down, so a short
//!   frame must end in `WireError::Closed`, not a hang);
//! - what it returns agrees with decoding the same bytes directly
//!   (`decode_header` + `Message::decode`): same message, or an error;
//! - the fds that came with an accepted frame are handed over, and no fd leaks
//!   (the lowest free descriptor number stays put across runs).
//!
//! Input: byte 0 picks how many fds to send (0-3, or 250-253 to exceed
//! `MAX_FDS_PER_FRAME`); the rest is the byte stream.
#![no_main]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mirror_driver::protocol::{decode_header, Message, HEADER_LEN, MAX_FDS_PER_FRAME};
use mirror_driver::wire::{recv, WireError};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Lowest free fd seen after a run; grows only if descriptors leak.
static LOWEST_FREE_FD: AtomicI32 = AtomicI32::new(-1);

fn lowest_free_fd() -> i32 {
    // SAFETY: dup of stdin and close of the fresh duplicate; no other fd is touched.
    unsafe {
        let fd = libc::dup(0);
        libc::close(fd);
        fd
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else { return };
    let nfds = if selector >= 0xf0 { 250 + usize::from(selector - 0xf0) % 4 } else { usize::from(selector) % 4 };
    let (writer, reader) = UnixStream::pair().expect("socketpair");
    static DEVNULL: OnceLock<std::fs::File> = OnceLock::new();
    let devnull = DEVNULL.get_or_init(|| std::fs::File::open("/dev/null").expect("/dev/null"));
    let fds = vec![devnull.as_raw_fd(); nfds];
    let mut written = 0;
    if nfds > 0 && !stream.is_empty() {
        written = writer.send_with_fds(&[&stream[..1]], &fds).expect("send fds");
    }
    (&writer).write_all(&stream[written..]).expect("the whole input fits in the socket buffer");
    writer.shutdown(std::net::Shutdown::Write).expect("shutdown");

    let got = recv(&reader);

    // What decoding the bytes directly says.
    let expected = if stream.len() < HEADER_LEN {
        None
    } else {
        let header: [u8; HEADER_LEN] = stream[..HEADER_LEN].try_into().unwrap();
        match decode_header(&header) {
            Err(_) => Some(Err(())),
            Ok(h) if stream.len() - HEADER_LEN >= h.len => {
                Some(Message::decode(h.kind, &stream[HEADER_LEN..HEADER_LEN + h.len]).map_err(|_| ()))
            }
            Ok(_) => None, // short payload: the peer closed mid-frame
        }
    };
    match (&got, &expected) {
        (Ok(frame), Some(Ok(direct))) => {
            assert_eq!(&frame.message, direct, "recv and Message::decode disagree");
            let id = u32::from_le_bytes(stream[8..12].try_into().unwrap());
            assert_eq!(frame.id, id, "the correlation id comes through");
            if nfds <= MAX_FDS_PER_FRAME {
                assert_eq!(frame.fds.len(), nfds, "fds sent beside the frame are handed over");
            }
        }
        (Ok(frame), _) => panic!("recv accepted {:?}, direct decoding did not", frame.message),
        (Err(WireError::Closed), None) | (Err(WireError::Io(_) | WireError::Idle), _) => {}
        (Err(WireError::BadHeader(_) | WireError::BadMessage { .. }), Some(Err(()))) => {}
        (Err(e), _) => panic!("recv failed with {e:?}; direct decoding says {expected:?}"),
    }
    drop(got);
    drop((writer, reader));

    let now = lowest_free_fd();
    let first = LOWEST_FREE_FD.load(Ordering::Relaxed);
    if first < 0 {
        LOWEST_FREE_FD.store(now, Ordering::Relaxed);
    } else {
        assert!(now <= first + 4, "file descriptors leak: lowest free fd went from {first} to {now}");
    }
});
