use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;

use super::*;
use crate::protocol::Grant;

/// A source that answers each request first with a stale reply (another id), then
/// with the right one.
fn double_talking_source(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        while let Ok(frame) = wire::recv(&stream) {
            let reply = match frame.message {
                Message::Hello { .. } => Message::HelloAck { version: PROTOCOL_VERSION, ram_size: 1 << 20, vcpus: 1 },
                Message::GetMemoryMap => Message::MemoryMap { regions: vec![Range { gpa: 0, len: 1 << 20 }] },
                _ => Message::Error { code: ErrorCode::UnknownMessage, text: "no".into() },
            };
            let stale = Message::MemoryMap { regions: vec![Range { gpa: 0xbad000, len: 4096 }] };
            wire::send(&stream, frame.id.wrapping_add(1000), &stale, &[]).unwrap();
            wire::send(&stream, frame.id, &reply, &[]).unwrap();
        }
    })
}

#[test]
fn replies_to_other_requests_are_never_taken_for_this_one() {
    let dir = std::env::temp_dir().join(format!("specula-importer-ids-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let source = double_talking_source(&path);
    let importer = Importer::connect(&path).expect("the HelloAck with the right id is found");
    for _ in 0..3 {
        assert_eq!(importer.memory_map().unwrap(), vec![Range { gpa: 0, len: 1 << 20 }]);
    }
    drop(importer);
    source.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn grant_fd(size: u64, grant_seals: bool) -> OwnedFd {
    let file = crate::memfd::create_ram_memfd(size).unwrap();
    if grant_seals {
        crate::memfd::seal_future_writes(&file).unwrap();
    }
    std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap().into()
}

#[test]
fn a_relocated_grant_leaves_zero_pages_not_a_hole_when_dropped() {
    let file = crate::memfd::create_ram_memfd(8192).unwrap();
    file.write_all_at(b"SOURCE!!", 4096).unwrap();
    crate::memfd::seal_future_writes(&file).unwrap();
    let fd: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap().into();
    let mut mapped = map_grant(Grant { id: 7, gpa: 0, len: 8192, fd_index: 0, offset: 0 }, fd).unwrap();
    // SAFETY: a fresh anonymous reservation of our own, never unmapped by this test
    // until the grant is gone.
    let reservation = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(reservation, libc::MAP_FAILED);
    // SAFETY: the reservation is ours and exactly as long as the grant's mapping.
    unsafe { mapped.relocate(reservation as u64) }.unwrap();
    assert_eq!(mapped.host_addr(), reservation as u64);
    assert_eq!(&mapped.bytes()[4096..4104], b"SOURCE!!");
    drop(mapped);
    // SAFETY: the dropped grant left a readable private mapping there.
    let after = unsafe { std::slice::from_raw_parts(reservation as *const u8, 8192) };
    assert!(after.iter().all(|&b| b == 0), "the source's bytes are gone, and the range still reads");
    // SAFETY: the test's own reservation, no longer used.
    unsafe { libc::munmap(reservation, 8192) };
}

#[test]
fn received_fds_are_checked_before_they_are_mapped() {
    let grant = |offset, len| Grant { id: 1, gpa: 0, len, fd_index: 0, offset };
    assert!(map_grant(grant(0, 8192), grant_fd(8192, true)).is_ok());
    let beyond = map_grant(grant(4096, 8192), grant_fd(8192, true));
    assert!(matches!(beyond, Err(ImportError::OutOfFile { size: 8192, .. })), "a grant past the file's end");
    let unaligned = map_grant(grant(100, 4096), grant_fd(8192, true));
    assert!(matches!(unaligned, Err(ImportError::OutOfFile { .. })));
    let empty = map_grant(grant(0, 0), grant_fd(8192, true));
    assert!(matches!(empty, Err(ImportError::OutOfFile { .. })));
    let unsealed = map_grant(grant(0, 4096), grant_fd(8192, false));
    assert!(matches!(unsealed, Err(ImportError::WritableSeals { .. })), "a grant its holder could make writable");
}
