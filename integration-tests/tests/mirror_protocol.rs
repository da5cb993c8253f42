//! The mirror device's wire protocol against a real source `vmm`: refused
//! grants get error replies; malformed, oversized and unknown messages never
//! crash or hang the source; granted fds can never be made writable.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{unix_request, Running, SourceVm, TempDir};
use mirror_driver::importer::{ImportError, Importer};
use mirror_driver::protocol::{
    trace_kind, Breakpoint, ErrorCode, Message, Range, MAX_PAYLOAD, MAX_WRITE_TRAP_BYTES, PROTOCOL_VERSION,
};
use mirror_driver::wire;

const LIMIT: Duration = Duration::from_secs(60);

fn start_source(dir: &TempDir, extra: &[&str]) -> (Running, PathBuf, PathBuf) {
    let mut args = vec!["--memory", "128M", "--serial", "null"];
    args.extend_from_slice(extra);
    let SourceVm { vm, mirror, api } = SourceVm::spawn(dir, &args);
    (vm, mirror, api)
}

fn refused(result: Result<impl Sized, ImportError>) -> (ErrorCode, String) {
    match result {
        Err(ImportError::Refused { code, text }) => (code, text),
        Err(other) => panic!("expected an error reply, got {other}"),
        Ok(_) => panic!("expected an error reply, got success"),
    }
}

/// The source is alive and serving: its API answers and a new inspector can attach.
/// Peers that just hung up may still count against the per-uid connection limit
/// until the source has seen them go, so a refusal for that reason is retried for a
/// while; any other failure, or one that outlasts the wait, fails the test.
fn assert_source_healthy(vm: &mut Running, mirror: &Path, api: &Path) {
    assert!(vm.child.try_wait().unwrap().is_none(), "the source vmm is still running");
    assert!(unix_request(api, "vcpus").starts_with("ok 0:rip="));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let importer = loop {
        match Importer::connect(mirror) {
            Err(ImportError::Refused { code: ErrorCode::PeerRefused, text })
                if text.contains("connections") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.expect("a fresh inspector can attach once the dead peers are gone"),
        }
    };
    assert_eq!(importer.memory_map().unwrap(), vec![Range { gpa: 0, len: 128 << 20 }]);
}

#[test]
fn grants_beyond_ram_or_policy_or_asking_for_write_are_refused_with_error_replies() {
    let dir = TempDir::new("policy");
    let (mut vm, mirror, api) = start_source(&dir, &["--mirror-policy", "0x1000000:2M"]);
    let importer = Importer::connect(&mirror).unwrap();
    let ok = importer.grant(&[Range { gpa: 0x1000000, len: 0x1000 }]).expect("inside the policy");
    assert_eq!(ok.len(), 1);
    let (code, text) = refused(importer.grant(&[Range { gpa: 0, len: 0x1000 }]));
    assert_eq!(code, ErrorCode::PolicyDenied, "{text}");
    let (code, text) = refused(importer.grant(&[Range { gpa: 256 << 20, len: 0x1000 }]));
    assert_eq!(code, ErrorCode::OutOfRange, "{text}");
    assert!(text.contains("not within the source's RAM"), "{text}");
    let (code, _) = refused(importer.grant(&[Range { gpa: u64::MAX - 10, len: 0x1000 }]));
    assert_eq!(code, ErrorCode::OutOfRange);
    let (code, _) = refused(
        importer.request(&Message::GrantRequest { access: 2, ranges: vec![Range { gpa: 0x1000000, len: 4096 }] }),
    );
    assert_eq!(code, ErrorCode::BadAccess);
    let (code, _) = refused(importer.release(999_999));
    assert_eq!(code, ErrorCode::UnknownGrant);
    assert_source_healthy(&mut vm, &mirror, &api);
}

/// Tracing is the source's to allow: without `--mirror-allow-trace` a subscription is
/// refused by policy, naming the flag; with it, kinds this source does not know are
/// refused as malformed, and a subscription is granted with the source's rate cap and
/// can be dropped again.
#[test]
fn trace_subscriptions_need_the_sources_consent_and_known_kinds() {
    let dir = TempDir::new("trace-refused");
    let (mut vm, mirror, api) = start_source(&dir, &[]);
    let importer = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(importer.subscribe_trace(trace_kind::MSR_WRITES));
    assert_eq!(code, ErrorCode::PolicyDenied, "{text}");
    assert!(text.contains("--mirror-allow-trace"), "{text}");
    let (code, text) = refused(importer.set_write_traps(&[Range { gpa: 0x100_0000, len: 8 }]));
    assert_eq!(code, ErrorCode::PolicyDenied, "write traps need the consent too: {text}");
    drop(importer);
    assert_source_healthy(&mut vm, &mirror, &api);

    let dir = TempDir::new("trace-allowed");
    let (mut vm, mirror, api) = start_source(&dir, &["--mirror-allow-trace"]);
    let importer = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(importer.subscribe_trace(0x80));
    assert_eq!(code, ErrorCode::Malformed, "{text}");
    assert!(text.contains("0x80"), "{text}");
    assert_eq!(importer.subscribe_trace(trace_kind::MSR_WRITES).unwrap(), 1000, "the source's rate cap");
    assert_eq!(importer.subscribe_trace(0).unwrap(), 1000);
    // Breakpoints: hardware ones are one inspector's at a time; software ones (a patch
    // of guest text) need the source's own consent; a non-canonical address is refused.
    let point = |address| Breakpoint { address, captures: vec![] };
    assert_eq!(importer.set_breakpoints(false, &[point(0xffff_ffff_8100_0000)]).unwrap(), 1);
    let other = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(other.set_breakpoints(false, &[point(0xffff_ffff_8100_0000)]));
    assert_eq!(code, ErrorCode::NotNow, "{text}");
    assert!(text.contains("holds this source's breakpoints"), "{text}");
    let (code, text) = refused(importer.set_breakpoints(true, &[point(0xffff_ffff_8100_0000)]));
    assert_eq!(code, ErrorCode::PolicyDenied, "{text}");
    assert!(text.contains("--mirror-allow-trace-patches"), "{text}");
    let (code, _) = refused(importer.set_breakpoints(false, &[point(0x0000_8000_0000_0000)]));
    assert_eq!(code, ErrorCode::OutOfRange);
    // Released when their holder leaves: the other inspector may set them then.
    drop(importer);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while other.set_breakpoints(false, &[point(0xffff_ffff_8100_0000)]).is_err() {
        assert!(std::time::Instant::now() < deadline, "the breakpoints outlived the inspector that held them");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(other.set_breakpoints(false, &[]).unwrap(), 0);
    // Write traps: inside guest RAM (128 MiB here) and within the byte limit, one
    // inspector's at a time, and released when it leaves.
    let (code, text) = refused(other.set_write_traps(&[Range { gpa: 0x800_0000 - 8, len: 16 }]));
    assert_eq!(code, ErrorCode::OutOfRange, "{text}");
    let (code, _) = refused(other.set_write_traps(&[Range { gpa: u64::MAX - 7, len: 16 }]));
    assert_eq!(code, ErrorCode::OutOfRange, "an overflowing range");
    let (code, _) = refused(other.set_write_traps(&[Range { gpa: 0x100_0000, len: 0 }]));
    assert_eq!(code, ErrorCode::OutOfRange, "an empty range");
    let (code, text) = refused(other.set_write_traps(&[Range { gpa: 0, len: MAX_WRITE_TRAP_BYTES + 4096 }]));
    assert_eq!(code, ErrorCode::TooLarge, "{text}");
    assert_eq!(other.set_write_traps(&[Range { gpa: 0x100_0000, len: 0x2001 }]).unwrap(), 3, "whole pages");
    let third = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(third.set_write_traps(&[Range { gpa: 0x100_0000, len: 8 }]));
    assert_eq!(code, ErrorCode::NotNow, "{text}");
    assert!(text.contains("holds this source's write traps"), "{text}");
    drop(other);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while third.set_write_traps(&[Range { gpa: 0x100_0000, len: 8 }]).is_err() {
        assert!(std::time::Instant::now() < deadline, "the write traps outlived the inspector that held them");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(third);
    assert_source_healthy(&mut vm, &mirror, &api);
}

/// Write traps report the bytes the guest writes, so they stay inside what the
/// source's grant policy lets its peers read.
#[test]
fn trace_write_traps_stay_inside_the_grant_policy() {
    let dir = TempDir::new("trace-policy");
    let (_vm, mirror, _api) = start_source(&dir, &["--mirror-allow-trace", "--mirror-policy", "0x1000000:2M"]);
    let importer = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(importer.set_write_traps(&[Range { gpa: 0x2000000, len: 8 }]));
    assert_eq!(code, ErrorCode::PolicyDenied, "{text}");
    assert!(text.contains("grant policy"), "{text}");
    let (code, _) = refused(importer.set_write_traps(&[Range { gpa: 0x11ffff8, len: 16 }]));
    assert_eq!(code, ErrorCode::PolicyDenied, "a range that runs past the policy's end");
    assert_eq!(importer.set_write_traps(&[Range { gpa: 0x1000008, len: 8 }]).unwrap(), 1);
}

#[test]
fn a_policy_narrower_than_a_chunk_grants_nothing_of_that_chunk() {
    // An fd exposes its whole chunk, so a 4 KiB policy inside a 2 MiB chunk cannot be honoured.
    let dir = TempDir::new("policy-chunk");
    let (_vm, mirror, _api) = start_source(&dir, &["--mirror-policy", "0x1000000:4K"]);
    let importer = Importer::connect(&mirror).unwrap();
    let (code, text) = refused(importer.grant(&[Range { gpa: 0x1000000, len: 0x1000 }]));
    assert_eq!(code, ErrorCode::PolicyDenied, "{text}");
    assert!(text.contains("does not cover whole"), "{text}");
}

#[test]
fn a_granted_fd_cannot_be_made_writable() {
    let dir = TempDir::new("readonly");
    let (_vm, mirror, _api) = start_source(&dir, &[]);
    let stream = UnixStream::connect(&mirror).unwrap();
    wire::send(&stream, 1, &Message::Hello { version: PROTOCOL_VERSION }, &[]).unwrap();
    assert!(matches!(wire::recv(&stream).unwrap().message, Message::HelloAck { .. }));
    let request = Message::GrantRequest { access: 1, ranges: vec![Range { gpa: 0x1000000, len: 0x1000 }] };
    wire::send(&stream, 1, &request, &[]).unwrap();
    let wire::Frame { message: reply, fds, .. } = wire::recv(&stream).unwrap();
    assert!(matches!(reply, Message::GrantReply { more: false, .. }), "{reply:?}");
    let fd = fds[0].as_raw_fd();
    // SAFETY: fcntl queries and mapping attempts on an fd this test owns.
    unsafe {
        assert_eq!(libc::fcntl(fd, libc::F_GETFL) & libc::O_ACCMODE, libc::O_RDONLY);
        let rw = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert_eq!(rw, libc::MAP_FAILED, "a writable shared mapping of a grant must fail");
        let ro = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
        assert_ne!(ro, libc::MAP_FAILED);
        assert_eq!(libc::mprotect(ro, 4096, libc::PROT_READ | libc::PROT_WRITE), -1, "nor can it be upgraded");
        libc::munmap(ro, 4096);
        let punch = libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 4096);
        assert_eq!(punch, -1, "nor can the inspector punch holes in source RAM");
    }
    // Nor re-opened for writing through /proc by a process without CAP_DAC_OVERRIDE: the
    // memfd is mode 0400. Grant fds arrive close-on-exec; this one is handed on to the
    // child on purpose, which runs as an unprivileged uid.
    use std::os::unix::process::CommandExt;
    // SAFETY: clearing FD_CLOEXEC on an fd this test owns.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let script = format!("exec 9<>/proc/self/fd/{fd}; echo WRITABLE");
    let out = Command::new("/bin/sh").args(["-c", &script]).uid(65534).gid(65534).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("WRITABLE") && stderr.contains("Permission denied"), "{stdout} {stderr}");
}

fn raw_frame(len: u32, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(&kind.to_le_bytes());
    frame.extend_from_slice(&0u16.to_le_bytes());
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn expect_error(stream: &UnixStream, want: ErrorCode) {
    match wire::recv(stream) {
        Ok(wire::Frame { message: Message::Error { code, .. }, .. }) => assert_eq!(code, want),
        other => panic!("expected an {want:?} error reply, got {:?}", other.map(|f| f.message)),
    }
}

#[test]
fn malformed_oversized_and_unknown_messages_never_crash_or_hang_the_source() {
    let dir = TempDir::new("badinput");
    let (mut vm, mirror, api) = start_source(&dir, &[]);

    // Before Hello, anything else is refused.
    let s = UnixStream::connect(&mirror).unwrap();
    wire::send(&s, 1, &Message::GetMemoryMap, &[]).unwrap();
    expect_error(&s, ErrorCode::NotNow);
    // An unknown protocol version.
    wire::send(&s, 1, &Message::Hello { version: 99 }, &[]).unwrap();
    expect_error(&s, ErrorCode::BadVersion);
    wire::send(&s, 1, &Message::Hello { version: PROTOCOL_VERSION }, &[]).unwrap();
    assert!(matches!(wire::recv(&s).unwrap().message, Message::HelloAck { .. }));
    // An unknown message kind: an error reply, and the session goes on.
    (&s).write_all(&raw_frame(3, 999, b"abc")).unwrap();
    expect_error(&s, ErrorCode::UnknownMessage);
    // A truncated known message (a grant request whose count overstates its ranges).
    let mut bad = 1u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&5u32.to_le_bytes());
    (&s).write_all(&raw_frame(bad.len() as u32, 5, &bad)).unwrap();
    expect_error(&s, ErrorCode::Malformed);
    wire::send(&s, 1, &Message::GetMemoryMap, &[]).unwrap();
    assert!(matches!(wire::recv(&s).unwrap().message, Message::MemoryMap { .. }), "still in step after bad messages");
    // An oversized frame: refused, and the connection closed (its framing cannot be trusted).
    (&s).write_all(&raw_frame(MAX_PAYLOAD as u32 + 1, 5, &[])).unwrap();
    expect_error(&s, ErrorCode::TooLarge);
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!((&s).read(&mut buf).unwrap(), 0, "the source closed the connection");

    // A peer that sends half a header and stalls only stalls itself.
    let stalled = UnixStream::connect(&mirror).unwrap();
    (&stalled).write_all(&[1, 0, 0]).unwrap();
    // Garbage on several connections.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for _ in 0..20 {
        let g = UnixStream::connect(&mirror).unwrap();
        let garbage: Vec<u8> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = (&g).write_all(&garbage);
    }
    // A header claiming the maximum payload, then a disconnect mid-payload.
    let cut = UnixStream::connect(&mirror).unwrap();
    let _ = (&cut).write_all(&raw_frame(MAX_PAYLOAD as u32, 1, &[0; 100]));
    drop(cut);
    assert_source_healthy(&mut vm, &mirror, &api);
    drop(stalled);
}
