//! The mirror's security promises against a real source `vmm`, with the real attacks:
//! holders of any uid short of root cannot write source RAM by any path; a holder
//! that ignores a revoke sees no later write; peers cannot exhaust the source.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{binary, run_with_timeout, TempDir, Workload};
use mirror_driver::importer::{map_grant, MappedGrant};
use mirror_driver::protocol::{ErrorCode, Message, Range, ACCESS_READ_ONLY, PROTOCOL_VERSION};
use mirror_driver::wire::{self, Frame};

const LIMIT: Duration = Duration::from_secs(60);
const POKE_GPA: u64 = 0x0180_0000;
/// The unprivileged uid the source drops to, and another one.
const SOURCE_UID: u32 = 65534;
const OTHER_UID: u32 = 65533;

type Source = Workload;

/// The source of these tests: `source-workload` on 128 MiB.
fn start_source(dir: &TempDir, extra: &[&str]) -> Source {
    let mut args = vec!["--memory", "128M"];
    args.extend_from_slice(extra);
    Workload::start(dir, &args)
}

/// A raw mirror session: frames in, frames out, nothing done on its behalf.
struct Peer {
    stream: UnixStream,
    next_id: u32,
}

impl Peer {
    fn connect(source: &Source) -> Self {
        let stream = UnixStream::connect(&source.mirror).expect("connect to the mirror socket");
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let mut peer = Self { stream, next_id: 1 };
        assert!(matches!(peer.ask(Message::Hello { version: PROTOCOL_VERSION }).message, Message::HelloAck { .. }));
        peer
    }

    fn send(&mut self, message: &Message) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        wire::send(&self.stream, id, message, &[]).expect("send");
        id
    }

    fn ask(&mut self, message: Message) -> Frame {
        let id = self.send(&message);
        let frame = wire::recv(&self.stream).expect("reply");
        assert_eq!(frame.id, id, "the reply carries the request's id: {:?}", frame.message);
        frame
    }

    /// Maps a read-only grant of the page at `gpa`.
    fn map_page(&mut self, gpa: u64) -> MappedGrant {
        let request = Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa, len: 4096 }] };
        let Frame { message, fds, .. } = self.ask(request);
        let Message::GrantReply { grants, .. } = message else { panic!("grant refused: {message:?}") };
        map_grant(grants[0], fds.into_iter().next().expect("an fd")).expect("map the grant")
    }
}

fn chown_to(dir: &TempDir, uid: u32) {
    std::os::unix::fs::chown(&dir.0, Some(uid), Some(uid)).expect("chown the socket directory");
}

/// Runs the attack binary as `uid` against the page at POKE_GPA; returns its report.
fn attack_as(uid: u32, source: &Source) -> String {
    let pid = source.vm.child.id().to_string();
    let out = run_with_timeout(
        Command::new(binary("mirror-attack"))
            .args([source.mirror.to_str().unwrap(), &format!("{POKE_GPA:x}"), &pid])
            .uid(uid)
            .gid(uid),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "mirror-attack as uid {uid} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const WRITE_PATHS: &[&str] = &[
    "mmap-shared-writable",
    "mprotect",
    "pwrite",
    "fallocate-punch-hole",
    "ftruncate",
    "add-seals",
    "fchmod-reopen",
    "proc-pid-mem",
    "proc-pid-fd",
    "ptrace",
];

#[test]
fn holders_of_the_source_uid_or_another_cannot_write_source_ram_by_any_path() {
    let dir = TempDir::new("attack");
    chown_to(&dir, SOURCE_UID);
    let (source_uid, other_uid) = (SOURCE_UID.to_string(), OTHER_UID.to_string());
    let run_as = format!("{SOURCE_UID}:{SOURCE_UID}");
    let mut source = start_source(
        &dir,
        &[
            "--run-as",
            &run_as,
            "--mirror-allow-uid",
            &source_uid,
            "--mirror-allow-uid",
            &other_uid,
            "--mirror-allow-uid",
            "0",
        ],
    );
    source.poke(POKE_GPA, b"SOURCE!!");
    for uid in [SOURCE_UID, OTHER_UID] {
        let report = attack_as(uid, &source);
        assert!(report.contains(&format!("attacking as uid {uid}")) && report.contains("done"), "{report}");
        for path in WRITE_PATHS {
            assert!(report.contains(&format!("blocked {path}:")), "uid {uid}, path {path} was not blocked:\n{report}");
        }
        assert!(!report.contains("WROTE"), "uid {uid} wrote source RAM:\n{report}");
    }
    // Nothing the attackers did reached source RAM, and the source runs on.
    let mut root = Peer::connect(&source);
    let page = root.map_page(POKE_GPA);
    assert_eq!(&page.bytes()[..8], b"SOURCE!!");
    source.poke(POKE_GPA, b"STILLOK!");
    assert_eq!(&page.bytes()[..8], b"STILLOK!", "the source's own writes land and stay coherent");
    // Discard works on the sealed chunk: the page reads as zeros, in the source's view too.
    assert_eq!(source.api(&format!("discard {POKE_GPA:#x} 4096")), "ok");
    assert!(page.bytes().iter().all(|&b| b == 0), "the discarded page reads as zeros");
    source.poke(POKE_GPA, b"AGAIN!!!");
    assert_eq!(&page.bytes()[..8], b"AGAIN!!!");
}

#[test]
fn a_holder_that_ignores_a_revoke_sees_no_byte_the_source_writes_afterwards() {
    let dir = TempDir::new("ignore-revoke");
    let mut source = start_source(&dir, &["--mirror-allow-regrant"]);
    let mut holder = Peer::connect(&source);
    let kept = holder.map_page(POKE_GPA);
    source.poke(POKE_GPA, b"BEFORE!!");
    assert_eq!(&kept.bytes()[..8], b"BEFORE!!", "coherent while granted");
    let id = kept.grant.id;
    // The holder never reads its socket again: it neither unmaps nor acknowledges.
    let started = Instant::now();
    let reply = source.api(&format!("revoke {id}"));
    assert!(reply.starts_with(&format!("ok revoked={id}")) && !reply.ends_with("unacknowledged="), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(30), "the revoke gave up waiting for the holder");
    source.poke(POKE_GPA, b"AFTER!!!");
    assert_eq!(&kept.bytes()[..8], b"BEFORE!!", "the kept mapping is a dead snapshot");
    // A fresh grant sees the source's new bytes, so the write did happen.
    let mut fresh = Peer::connect(&source);
    assert_eq!(&fresh.map_page(POKE_GPA).bytes()[..8], b"AFTER!!!");
    assert!(!source.api("grants").split_whitespace().any(|g| g.starts_with(&format!("{id}:"))));
}

#[test]
fn an_acknowledgement_sent_before_the_revoke_does_not_count() {
    let dir = TempDir::new("preack");
    let source = start_source(&dir, &[]);
    let mut holder = Peer::connect(&source);
    let kept = holder.map_page(POKE_GPA);
    // Without the revoke's nonce an acknowledgement cannot match, whatever its timing.
    for nonce in 0..64 {
        holder.send(&Message::RevokeAck { grant_id: kept.grant.id, nonce });
    }
    let reply = source.api(&format!("revoke {}", kept.grant.id));
    assert!(
        reply.starts_with("ok revoked=") && !reply.ends_with("unacknowledged="),
        "the early ack was not taken: {reply}"
    );
}

#[test]
fn released_and_disconnected_grants_stay_listed_until_revoked() {
    let dir = TempDir::new("truthful-grants");
    let source = start_source(&dir, &[]);
    let mut holder = Peer::connect(&source);
    let first = holder.map_page(POKE_GPA);
    let second = holder.map_page(POKE_GPA + 0x20_0000);
    let reply = holder.ask(Message::Release { grant_id: first.grant.id });
    assert!(matches!(reply.message, Message::Released { .. }));
    drop(holder); // hang up, keeping both mappings
    let deadline = Instant::now() + LIMIT;
    let listed = loop {
        let grants = source.api("grants");
        if grants.contains(":disconnected") || Instant::now() > deadline {
            break grants;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(listed.contains(&format!("{}:{:#x}:0x1000:0:released", first.grant.id, POKE_GPA)), "{listed}");
    assert!(listed.contains(&format!("{}:", second.grant.id)) && listed.contains(":disconnected"), "{listed}");
    assert!(source.api(&format!("revoke {}", first.grant.id)).starts_with("ok revoked="));
    assert!(!source.api("grants").contains(&format!("{}:", first.grant.id)));
    drop((first, second));
}

#[test]
fn a_peer_that_never_says_hello_is_closed() {
    let dir = TempDir::new("hello-timeout");
    let source = start_source(&dir, &[]);
    let silent = UnixStream::connect(&source.mirror).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    match wire::recv(&silent) {
        Ok(Frame { message: Message::Error { code: ErrorCode::NotNow, text }, .. }) => {
            assert!(text.contains("no Hello"), "{text}")
        }
        other => panic!("expected a NotNow error before the close, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!((&silent).read_to_end(&mut rest).unwrap(), 0, "then the source closes the connection");
}

#[test]
fn one_uid_cannot_take_every_connection() {
    let dir = TempDir::new("per-uid");
    let other = OTHER_UID.to_string();
    let source = start_source(&dir, &["--mirror-allow-uid", "0", "--mirror-allow-uid", &other]);
    let held: Vec<Peer> = (0..16).map(|_| Peer::connect(&source)).collect();
    let extra = UnixStream::connect(&source.mirror).unwrap();
    extra.set_read_timeout(Some(LIMIT)).unwrap();
    match wire::recv(&extra) {
        Ok(Frame { message: Message::Error { code: ErrorCode::PeerRefused, text }, .. }) => {
            assert!(text.contains("uid 0 already has 16 connections"), "{text}")
        }
        other => panic!("expected the 17th connection of uid 0 to be refused, got {other:?}"),
    }
    // Another allowed uid still gets in (the attack binary greets and takes a grant).
    let report = attack_as(OTHER_UID, &source);
    assert!(report.contains("done"), "{report}");
    drop(held);
}

#[test]
fn one_request_cannot_open_thousands_of_fds() {
    let dir = TempDir::new("pieces");
    let source = start_source(&dir, &[]);
    let mut peer = Peer::connect(&source);
    // 100 ranges over all 64 chunks of RAM: 6400 pieces, one fd each.
    let ranges = vec![Range { gpa: 0, len: 128 << 20 }; 100];
    let reply = peer.ask(Message::GrantRequest { access: ACCESS_READ_ONLY, ranges });
    match reply.message {
        Message::Error { code: ErrorCode::TooLarge, text } => assert!(text.contains("6400 pieces"), "{text}"),
        other => panic!("expected TooLarge, got {other:?} with {} fds", reply.fds.len()),
    }
    assert!(reply.fds.is_empty());
    assert!(source.api("vcpus").starts_with("ok 0:rip="));
}

#[test]
fn fds_the_peer_sends_are_not_kept_by_the_source() {
    let dir = TempDir::new("peer-fds");
    let source = start_source(&dir, &[]);
    let peer = Peer::connect(&source);
    let pid = source.vm.child.id();
    let count = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = count();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    for _ in 0..200 {
        wire::send(&peer.stream, 9, &Message::GetMemoryMap, &[devnull.as_raw_fd(); 8]).unwrap();
        wire::recv(&peer.stream).unwrap();
    }
    assert!(count() <= before + 2, "the source kept fds a peer pushed at it: {before} -> {}", count());
}

#[test]
fn grants_one_uid_may_hold_are_bounded() {
    let dir = TempDir::new("per-uid-grants");
    let source = start_source(&dir, &[]);
    let mut peer = Peer::connect(&source);
    // 32 ranges over all 64 chunks: 2048 pieces, the most one request may ask for.
    let request =
        || Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa: 0, len: 128 << 20 }; 32] };
    let mut granted = 0;
    loop {
        let id = peer.send(&request());
        let mut frame = wire::recv(&peer.stream).expect("reply");
        assert_eq!(frame.id, id);
        if let Message::Error { code, text } = &frame.message {
            assert_eq!(*code, ErrorCode::TooLarge, "{text}");
            assert!(text.contains("must revoke some"), "{text}");
            break;
        }
        while let Message::GrantReply { more, grants } = frame.message {
            granted += grants.len();
            drop(frame.fds); // close them at once: the source must still count them
            if !more {
                break;
            }
            frame = wire::recv(&peer.stream).expect("next frame");
        }
        assert!(granted <= 8192, "{granted} grants handed to one uid");
    }
    assert_eq!(granted, 8192);
    assert!(source.api("vcpus").starts_with("ok 0:rip="));
}
