//! The mirror's security promises against a real source `vmm`, with the real attacks:
//! holders of any uid short of root cannot write source RAM by any path; a holder
//! that ignores a revoke sees no later write; peers cannot exhaust the source.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{binary, run_with_timeout, unix_request, TempDir, Workload};
use mirror_driver::importer::{map_grant, MappedGrant};
use mirror_driver::protocol::{ErrorCode, Message, Range, ACCESS_READ_ONLY, EVENT_ID, PROTOCOL_VERSION};
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
        self.map_range(gpa, 4096)
    }

    /// Maps a read-only grant of `gpa..gpa+len`, which must lie in one chunk.
    fn map_range(&mut self, gpa: u64, len: u64) -> MappedGrant {
        let request = Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa, len }] };
        let Frame { message, fds, .. } = self.ask(request);
        let Message::GrantReply { grants, more: false } = message else { panic!("grant refused: {message:?}") };
        assert_eq!((grants.len(), fds.len()), (1, 1), "one grant, one fd for {gpa:#x}+{len:#x}");
        map_grant(grants[0], fds.into_iter().next().expect("an fd")).expect("map the grant")
    }

    /// Waits for the source's `Revoke` event; returns its (grant id, nonce).
    fn next_revoke(&mut self) -> (u64, u64) {
        loop {
            let frame = wire::recv(&self.stream).expect("the Revoke event");
            if let (EVENT_ID, Message::Revoke { grant_id, nonce }) = (frame.id, &frame.message) {
                return (*grant_id, *nonce);
            }
        }
    }

    /// Every GPA of source RAM where `needle` lies: reads the whole of RAM (the source's
    /// memory map), one read-only grant of at most one 2 MiB chunk at a time, so a match
    /// across two chunks is found too.
    fn find_in_ram(&mut self, needle: &[u8]) -> Vec<u64> {
        const CHUNK: u64 = 2 << 20;
        let Message::MemoryMap { regions } = self.ask(Message::GetMemoryMap).message else { panic!("no memory map") };
        let (mut hits, mut scanned) = (Vec::new(), 0);
        for region in &regions {
            // The tail of the previous piece, so a match across pieces is not missed.
            let mut tail: Vec<u8> = Vec::new();
            let mut gpa = region.gpa;
            while gpa < region.gpa + region.len {
                let len = (CHUNK - gpa % CHUNK).min(region.gpa + region.len - gpa);
                let piece = self.map_range(gpa, len);
                assert_eq!(piece.bytes().len() as u64, len);
                let start = gpa - tail.len() as u64;
                let mut window = std::mem::take(&mut tail);
                window.extend_from_slice(piece.bytes());
                hits.extend(memchr::memmem::find_iter(&window, needle).map(|at| start + at as u64));
                tail = window[window.len().saturating_sub(needle.len() - 1)..].to_vec();
                scanned += len;
                gpa += len;
            }
        }
        assert_eq!(scanned, regions.iter().map(|r| r.len).sum::<u64>());
        hits
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

/// What `mirror-attack` writes with every attempt (its `MARK`).
const MARK: &[u8] = b"PWNED!!!";

/// Each write path and why it must fail, as the steps of its `blocked` line in order,
/// each with the errno it got: for a holder of the source's uid, then for another uid.
fn expected_blocks(source_pid: u32) -> Vec<(&'static str, Vec<String>, Vec<String>)> {
    let both = |steps: &[&str]| steps.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pid = source_pid;
    vec![
        // The fd is O_RDONLY.
        ("mmap-shared-writable", both(&["mmap: EACCES"]), both(&["mmap: EACCES"])),
        // The read-only mapping was made without VM_MAYWRITE.
        ("mprotect", both(&["mprotect: EACCES"]), both(&["mprotect: EACCES"])),
        ("pwrite", both(&["pwrite: EBADF"]), both(&["pwrite: EBADF"])),
        ("fallocate-punch-hole", both(&["fallocate: EBADF"]), both(&["fallocate: EBADF"])),
        ("ftruncate", both(&["ftruncate: EINVAL"]), both(&["ftruncate: EINVAL"])),
        ("add-seals", both(&["F_ADD_SEALS: EPERM"]), both(&["F_ADD_SEALS: EPERM"])),
        // The source's uid owns the inode: the chmod and the re-open succeed, and every
        // write through it fails on F_SEAL_FUTURE_WRITE. Another uid gets neither.
        (
            "fchmod-reopen",
            both(&["fchmod 0600: ok", "O_RDWR: ok", "pwrite: EPERM", "mmap: EPERM", "fallocate: EPERM"]),
            both(&["fchmod 0600: EPERM", "O_RDWR: EACCES"]),
        ),
        // The source is non-dumpable: its /proc files are root's, and ptrace is refused.
        (
            "proc-pid-mem",
            vec![format!("open /proc/{pid}/mem O_RDWR: EACCES")],
            vec![format!("open /proc/{pid}/mem O_RDWR: EACCES")],
        ),
        ("proc-pid-fd", vec![format!("list /proc/{pid}/fd: EACCES")], vec![format!("list /proc/{pid}/fd: EACCES")]),
        ("ptrace", both(&["PTRACE_ATTACH: EPERM"]), both(&["PTRACE_ATTACH: EPERM"])),
    ]
}

/// The one line `mirror-attack` printed for `path`, which must say `blocked`, for the
/// reasons `steps` (in that order).
fn assert_blocked_because(report: &str, uid: u32, path: &str, steps: &[String]) {
    let lines: Vec<&str> = report.lines().filter(|l| l.split(':').next().unwrap_or("").ends_with(path)).collect();
    assert_eq!(lines.len(), 1, "uid {uid}: one line for {path}:\n{report}");
    let why = lines[0]
        .strip_prefix(&format!("blocked {path}: "))
        .unwrap_or_else(|| panic!("uid {uid}: {path} was not blocked: {}\n{report}", lines[0]));
    let mut rest = why;
    for step in steps {
        let at = rest
            .find(step.as_str())
            .unwrap_or_else(|| panic!("uid {uid}: {path} was blocked, but not by {step:?} (in order): {why}"));
        rest = &rest[at + step.len()..];
    }
}

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
    let expected = expected_blocks(source.vm.child.id());
    // Another uid first: it meets the mode the source gave the chunk (0400), not the
    // 0600 the source uid's fchmod leaves behind.
    for uid in [OTHER_UID, SOURCE_UID] {
        let report = attack_as(uid, &source);
        assert!(report.contains(&format!("attacking as uid {uid}")) && report.contains("done"), "{report}");
        assert!(!report.contains("WROTE") && !report.contains("MISSING"), "uid {uid}:\n{report}");
        for (path, as_source_uid, as_other_uid) in &expected {
            let steps = if uid == SOURCE_UID { as_source_uid } else { as_other_uid };
            assert_blocked_because(&report, uid, path, steps);
        }
        assert_eq!(report.lines().filter(|l| l.starts_with("blocked ")).count(), expected.len(), "{report}");
    }
    // Nothing the attackers did reached source RAM, anywhere in it, and the source runs on.
    let mut root = Peer::connect(&source);
    let hits = root.find_in_ram(MARK);
    assert!(hits.is_empty(), "the attack's mark is in source RAM at {hits:#x?}");
    let page = root.map_page(POKE_GPA);
    assert_eq!(&page.bytes()[..8], b"SOURCE!!");
    source.poke(POKE_GPA, b"STILLOK!");
    assert_eq!(&page.bytes()[..8], b"STILLOK!", "the source's own writes land and stay coherent");
    // The scan sees a mark wherever it lands, across two chunks too.
    let seam = 0x01e0_0000 - 4;
    source.poke(seam, MARK);
    assert_eq!(root.find_in_ram(MARK), vec![seam], "the scan finds a mark the source guest wrote");
    // Discard works on the sealed chunk: the page reads as zeros, in the source's view too.
    assert_eq!(source.api(&format!("discard {POKE_GPA:#x} 4096")), "ok");
    assert!(page.bytes().iter().all(|&b| b == 0), "the discarded page reads as zeros");
    source.poke(POKE_GPA, b"AGAIN!!!");
    assert_eq!(&page.bytes()[..8], b"AGAIN!!!");
}

#[test]
fn the_attack_fails_where_it_finds_no_source_ram_instead_of_passing_for_blocked() {
    // A "source" pid that maps no guest RAM and holds no fd of it: a process of the
    // attacker's own uid (root), so /proc/PID/mem and /proc/PID/fd are open to it.
    let dir = TempDir::new("attack-no-ram");
    let source = start_source(&dir, &[]);
    let mut decoy = Command::new("sleep");
    // Without the grant fds other tests of this process may hold right now (an fd
    // received with SCM_RIGHTS is inherited across exec).
    // SAFETY: close_range is async-signal-safe and touches only the child's fds.
    unsafe {
        decoy.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut decoy = decoy.arg("600").spawn().expect("spawn sleep");
    let out = run_with_timeout(
        Command::new(binary("mirror-attack")).args([
            source.mirror.to_str().unwrap(),
            &format!("{POKE_GPA:x}"),
            &decoy.id().to_string(),
        ]),
        LIMIT,
    );
    decoy.kill().unwrap();
    decoy.wait().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "mirror-attack must fail:\n{stdout}{stderr}");
    assert!(stderr.contains("not every path was tried"), "{stderr}");
    for path in ["proc-pid-mem", "proc-pid-fd"] {
        assert!(stdout.contains(&format!("MISSING {path}: ")), "{path}:\n{stdout}");
        assert!(!stdout.contains(&format!("blocked {path}:")), "{path} passed for blocked:\n{stdout}");
    }
    assert!(stdout.contains("specula-guest-ram"), "the message names what it looked for:\n{stdout}");
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

/// Starts `revoke ID` on the source's API in a thread (it waits for the holders);
/// the thread returns the reply.
fn revoke_in_background(source: &Source, id: u64) -> std::thread::JoinHandle<String> {
    let api = source.api.clone();
    std::thread::spawn(move || unix_request(&api, &format!("revoke {id}")))
}

#[test]
fn an_acknowledgement_with_a_wrong_nonce_sent_while_the_revoke_is_pending_does_not_count() {
    let dir = TempDir::new("wrong-nonce");
    let mut source = start_source(&dir, &[]);
    let mut holder = Peer::connect(&source);
    let kept = holder.map_page(POKE_GPA);
    let id = kept.grant.id;
    source.poke(POKE_GPA, b"BEFORE!!");
    let revoke = revoke_in_background(&source, id);
    let (revoked, nonce) = holder.next_revoke();
    assert_eq!(revoked, id);
    // The revoke is pending now: acknowledge it, with every nonce but its own.
    for wrong in [nonce ^ 1, nonce.wrapping_add(1), !nonce, 0, u64::MAX] {
        if wrong != nonce {
            holder.send(&Message::RevokeAck { grant_id: id, nonce: wrong });
        }
    }
    let reply = revoke.join().unwrap();
    let unacknowledged = reply
        .strip_prefix(&format!("ok revoked={id} unacknowledged="))
        .unwrap_or_else(|| panic!("unexpected reply: {reply}"));
    assert_eq!(unacknowledged.split(',').filter(|c| !c.is_empty()).count(), 1, "the holder acknowledged: {reply}");
    // The holder that did not acknowledge is disconnected, and its access is gone anyway.
    loop {
        match wire::recv(&holder.stream) {
            Ok(_) => continue,
            Err(wire::WireError::Closed) => break,
            Err(other) => panic!("expected the source to disconnect the holder, got {other}"),
        }
    }
    source.poke(POKE_GPA, b"AFTER!!!");
    assert_eq!(&kept.bytes()[..8], b"BEFORE!!", "the kept mapping is a dead snapshot");
    assert!(!source.api("grants").split_whitespace().any(|g| g.starts_with(&format!("{id}:"))));
}

#[test]
fn an_acknowledgement_with_the_revokes_nonce_completes_it() {
    let dir = TempDir::new("right-nonce");
    let source = start_source(&dir, &[]);
    let mut holder = Peer::connect(&source);
    let kept = holder.map_page(POKE_GPA);
    let id = kept.grant.id;
    let revoke = revoke_in_background(&source, id);
    let (revoked, nonce) = holder.next_revoke();
    assert_eq!(revoked, id);
    drop(kept);
    holder.send(&Message::RevokeAck { grant_id: id, nonce });
    assert_eq!(revoke.join().unwrap(), format!("ok revoked={id} unacknowledged="));
    // The holder stays connected and served.
    assert!(matches!(holder.ask(Message::GetMemoryMap).message, Message::MemoryMap { .. }));
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
