//! The mirror device and the inspector, end to end on /dev/kvm: a source `vmm`
//! running `source-workload`, an `inspector` whose agent guest reads the
//! source's RAM through read-only memslots, and the source's API socket.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_images::workload;
use integration_tests::{binary, unix_request, Running, TempDir, Workload};

const LIMIT: Duration = Duration::from_secs(60);
const POKE_GPA: u64 = 0x0180_0000;

type Source = Workload;

/// The source of these tests: `source-workload` on 256 MiB and 2 vCPUs.
fn start_source(dir: &TempDir, extra: &[&str]) -> Source {
    let mut args = vec!["--memory", "256M", "--cpus", "2"];
    args.extend_from_slice(extra);
    Workload::start(dir, &args)
}

struct Inspector {
    proc: Running,
    control: PathBuf,
}

impl Inspector {
    fn start(dir: &TempDir, source: &Source, extra: &[&str]) -> Self {
        let control = dir.join("control.sock");
        let mut cmd = Command::new(binary("inspector"));
        cmd.args(["--source-socket", source.mirror.to_str().unwrap(), "--control-socket", control.to_str().unwrap()]);
        cmd.args(extra);
        let mut proc = Running::spawn(&mut cmd);
        proc.expect_line("inspector: agent ready", LIMIT);
        Self { proc, control }
    }

    fn ask(&self, line: &str) -> String {
        unix_request(&self.control, line)
    }

    fn read(&self, gpa: u64, len: u64) -> Vec<u8> {
        let reply = self.ask(&format!("read {gpa:#x} {len}"));
        let hex = reply.strip_prefix("ok ").unwrap_or_else(|| panic!("read failed: {reply}"));
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    fn heartbeat(&self) -> u64 {
        u64::from_le_bytes(self.read(workload::HEADER_GPA + 24, 8).try_into().unwrap())
    }
}

/// An inspector binary copied alone into an empty directory (no guest-images beside it,
/// and `SPECULA_GUEST_IMAGES_DIR` naming a directory that does not exist, so no image
/// directory serves) boots the agent built into it, attaches and serves; `--agent PATH`
/// still names another image, and a missing one is refused by name.
#[test]
fn an_inspector_copied_alone_elsewhere_attaches_and_serves_with_its_built_in_agent() {
    let dir = TempDir::new("inspector-alone");
    let source = start_source(&dir, &[]);
    let alone = dir.join("elsewhere/bin");
    std::fs::create_dir_all(&alone).unwrap();
    let copy = alone.join("inspector");
    std::fs::copy(binary("inspector"), &copy).unwrap();
    let control = dir.join("alone.sock");
    let mut cmd = Command::new(&copy);
    cmd.env(guest_images::IMAGES_DIR_ENV, dir.join("no-images-here")).current_dir(&alone);
    cmd.args(["--source-socket", source.mirror.to_str().unwrap(), "--control-socket", control.to_str().unwrap()]);
    cmd.args(["--all", "--serial", "null"]);
    let mut proc = Running::spawn(&mut cmd);
    proc.expect_line("inspector: agent ready", LIMIT);
    let reply = unix_request(&control, &format!("read {:#x} 16", workload::HEADER_GPA));
    let magic: String = workload::HEADER_MAGIC.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(reply, format!("ok {magic}"), "the copied inspector's agent reads the source");
    drop(proc);

    let missing = dir.join("no-such-agent.elf");
    let out = integration_tests::run_with_timeout(
        Command::new(&copy)
            .env_remove(guest_images::IMAGES_DIR_ENV)
            .args(["--source-socket", source.mirror.to_str().unwrap(), "--all", "--agent"])
            .arg(&missing),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no-such-agent.elf"), "{stderr}");
}

#[test]
fn the_agent_sees_source_writes_across_many_updates_without_stale_reads() {
    let dir = TempDir::new("coherence");
    let mut source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    assert_eq!(&inspector.read(workload::HEADER_GPA, 16), &workload::HEADER_MAGIC);
    for i in 0..200u64 {
        let value = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a).to_le_bytes();
        source.poke(POKE_GPA + (i % 64) * 8, &value);
        // The source guest acknowledged the write, so the agent must see it now.
        assert_eq!(inspector.read(POKE_GPA + (i % 64) * 8, 8), value, "update {i}");
    }
    let first = inspector.heartbeat();
    std::thread::sleep(Duration::from_millis(50));
    assert!(inspector.heartbeat() > first, "the running workload's heartbeat advances in the mirror");
}

#[test]
fn a_hole_punched_by_the_source_reads_as_zeros_then_new_writes_show() {
    let dir = TempDir::new("punch");
    let mut source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    let page = workload::POOL_GPA;
    source.poke(page + 8, b"BEFORE!!");
    assert_eq!(inspector.read(page + 8, 8), b"BEFORE!!");
    assert_eq!(source.api(&format!("discard {page:#x} 4096")), "ok");
    assert_eq!(inspector.read(page, 4096), vec![0u8; 4096], "the agent reads the punched page as zeros");
    source.poke(page + 8, b"AFTER!!!");
    assert_eq!(inspector.read(page + 8, 8), b"AFTER!!!", "new source writes show again");
}

/// `status` reports `memslots=N`: every KVM memslot of the agent VM.
fn memslots(inspector: &Inspector) -> u64 {
    let status = inspector.ask("status");
    let field = status.split_whitespace().find_map(|w| w.strip_prefix("memslots="));
    field.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no memslots= in {status}"))
}

/// The id of the source's grant that starts at `gpa` (`grants` lists `id:gpa:len:uid:state`).
fn grant_at(source: &Source, gpa: u64) -> String {
    let grants = source.api("grants");
    grants
        .split_whitespace()
        .find_map(|g| {
            let parts: Vec<&str> = g.split(':').collect();
            (parts.len() == 5 && u64::from_str_radix(parts[1].trim_start_matches("0x"), 16).ok() == Some(gpa))
                .then(|| parts[0].to_string())
        })
        .unwrap_or_else(|| panic!("a grant starting at {gpa:#x} in {grants}"))
}

#[test]
fn a_revoked_grant_is_unmapped_before_the_source_hears_back() {
    let dir = TempDir::new("revoke");
    let mut source = start_source(&dir, &[]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    let id = grant_at(&source, workload::HEADER_GPA);
    // Every grant of the 256 MiB source (128 chunks) sits in one memslot beside the agent's RAM.
    let slots_before = memslots(&inspector);
    assert_eq!(slots_before, 2, "one memslot for the agent's RAM, one for the whole window");
    let audit = |inspector: &Inspector, gpa: u64, len: u64| {
        let reply = inspector.ask(&format!("audit-read {gpa:#x} {len}"));
        let hex = reply.strip_prefix("ok ").unwrap_or_else(|| panic!("audit-read failed: {reply}")).to_string();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect::<Vec<u8>>()
    };
    source.poke(workload::HEADER_GPA + 0x800, b"SECRET!!");
    let chunk_end = workload::HEADER_GPA + (2 << 20);
    source.poke(chunk_end, b"NEIGHBOR");
    assert_eq!(&audit(&inspector, workload::HEADER_GPA + 0x800, 8), b"SECRET!!", "audit-read sees the window");
    let reply = source.api(&format!("revoke {id}"));
    assert_eq!(reply, format!("ok revoked={id} unacknowledged="), "the inspector acknowledged in time");
    // The API returned only after the inspector acknowledged, which it does after the
    // grant's pages are replaced.
    inspector.proc.expect_line(&format!("grant {id} ("), LIMIT);
    assert_eq!(memslots(&inspector), slots_before, "the merged memslot stays; only the grant's pages change");
    let reply = inspector.ask(&format!("read {:#x} 16", workload::HEADER_GPA));
    assert!(reply.starts_with("error") && reply.contains("not granted"), "{reply}");
    // What the agent itself can read there: nothing of the source, before or after new writes.
    let revoked = audit(&inspector, workload::HEADER_GPA, 4096);
    let left = revoked.iter().filter(|&&b| b != 0).count();
    assert_eq!(left, 0, "the revoked chunk reads as zeros, not {:?}", String::from_utf8_lossy(&revoked[..16]));
    source.poke(workload::HEADER_GPA + 0x800, b"LATER!!!");
    let across = audit(&inspector, chunk_end - 4096, 8192);
    assert_eq!(&across[..4096], &[0u8; 4096][..], "the revoked chunk's last page reads as zeros");
    assert_eq!(&across[4096..4104], b"NEIGHBOR", "the next grant in the same memslot still reads the source");
    assert!(!source.api("grants").split_whitespace().any(|g| g.starts_with(&format!("{id}:"))));
    assert!(inspector.ask("read 0x0 16").starts_with("ok"), "other grants keep working");
    // The source runs on over its re-homed memory.
    source.poke(workload::HEADER_GPA + 0x800, b"REHOMED!");
    assert_eq!(audit(&inspector, workload::HEADER_GPA + 0x800, 8), vec![0u8; 8]);
    // By default the source does not grant a revoked range to the same uid again.
    let out = integration_tests::run_with_timeout(
        Command::new(binary("inspector")).args(["--source-socket", source.mirror.to_str().unwrap()]).args([
            "--range",
            &format!("{:#x}:4K", workload::HEADER_GPA),
            "--serial",
            "null",
        ]),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PolicyDenied") && stderr.contains("revoked from uid"), "{stderr}");
}

#[test]
fn with_regrant_allowed_a_re_attach_sees_the_memory_the_source_kept_across_the_re_home() {
    let dir = TempDir::new("regrant");
    let mut source = start_source(&dir, &["--mirror-allow-regrant"]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    source.poke(workload::HEADER_GPA + 0x800, b"BEFORE!!");
    let id = grant_at(&source, workload::HEADER_GPA);
    assert!(source.api(&format!("revoke {id}")).starts_with("ok revoked="));
    source.poke(workload::HEADER_GPA + 0x808, b"AFTER!!!");
    let fresh_dir = TempDir::new("regrant-fresh");
    let fresh = Inspector::start(&fresh_dir, &source, &["--range", "0x1000000:4K"]);
    assert_eq!(&fresh.read(workload::HEADER_GPA, 16), &workload::HEADER_MAGIC, "copied across the re-home");
    assert_eq!(fresh.read(workload::HEADER_GPA + 0x800, 16), b"BEFORE!!AFTER!!!");
    let first = fresh.heartbeat();
    std::thread::sleep(Duration::from_millis(50));
    assert!(fresh.heartbeat() > first, "the workload writes the re-homed memory");
    drop(inspector);
}

#[test]
fn the_inspector_outlives_a_killed_source_and_keeps_the_last_contents() {
    let dir = TempDir::new("sigkill");
    let mut source = start_source(&dir, &[]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    source.vm.signal(libc::SIGKILL);
    source.vm.wait(LIMIT);
    inspector.proc.expect_line("source gone", LIMIT);
    assert!(inspector.ask("status").starts_with("ok source=gone"));
    assert_eq!(&inspector.read(workload::HEADER_GPA, 16), &workload::HEADER_MAGIC, "last contents still readable");
    let frozen = inspector.heartbeat();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(inspector.heartbeat(), frozen, "nothing writes the pages any more");
    assert!(inspector.child_alive());
}

trait Alive {
    fn child_alive(&mut self) -> bool;
}

impl Alive for Inspector {
    fn child_alive(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_none()
    }
}

#[test]
fn a_write_by_the_agent_into_the_window_changes_nothing_in_the_source() {
    let dir = TempDir::new("isolation");
    let mut source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    source.poke(POKE_GPA, b"SOURCE");
    let reply = inspector.ask(&format!("write-probe {POKE_GPA:#x} 0x41"));
    assert_eq!(reply, format!("ok read-back={:#04x}", b'S'), "the agent's write did not land");
    // The source guest itself still sees its own bytes: ask it to rewrite the neighbours only.
    source.poke(POKE_GPA + 6, b"!!");
    assert_eq!(inspector.read(POKE_GPA, 8), b"SOURCE!!");
}

#[test]
fn the_integrity_watch_reports_when_the_workload_modifies_its_kernel_text() {
    let dir = TempDir::new("watch");
    let mut source = start_source(&dir, &[]);
    let watch = format!("{:#x}:{:#x}", workload::TEXT_GPA, workload::TEXT_LEN);
    let mut inspector = Inspector::start(&dir, &source, &["--all", "--watch", &watch, "--watch-interval-ms", "50"]);
    inspector.proc.expect_line("baseline taken", LIMIT);
    source.vm.send("text-modify 8192\n");
    source.vm.expect_line("ack text-modify", LIMIT);
    let report = inspector.proc.expect_line("integrity watch 0:", LIMIT);
    assert!(report.contains(&format!("{:#x}", workload::TEXT_GPA + 8192)), "{report}");
    // The agent's SHA-256 of the text now differs from the workload's recorded digest.
    let mut pristine = vec![0u8; workload::TEXT_LEN];
    workload::fill_text(&mut pristine);
    let expected = guest_images::sha256::hex(&guest_images::sha256::digest(&pristine));
    let hash = inspector.ask(&format!("hash {:#x} {:#x}", workload::TEXT_GPA, workload::TEXT_LEN));
    assert!(!hash.contains(std::str::from_utf8(&expected).unwrap()), "{hash}");
    source.vm.send("text-restore\n");
    source.vm.expect_line("ack text-restore", LIMIT);
    let hash = inspector.ask(&format!("hash {:#x} {:#x}", workload::TEXT_GPA, workload::TEXT_LEN));
    assert!(hash.contains(std::str::from_utf8(&expected).unwrap()), "{hash}");
}

/// Flips a text byte and back at once, then modifies another page as a marker; returns
/// the first watch report that names the marker page.
fn flip_then_mark(source: &mut Source, inspector: &mut Inspector) -> String {
    source.vm.send("text-flip 8192\n");
    source.vm.expect_line("ack text-flip", LIMIT);
    std::thread::sleep(Duration::from_millis(300));
    source.vm.send("text-modify 4096\n");
    source.vm.expect_line("ack text-modify", LIMIT);
    let marker = format!("{:#x}", workload::TEXT_GPA + 4096);
    loop {
        let report = inspector.proc.expect_line("integrity watch 0:", LIMIT);
        if report.contains(&marker) {
            return report;
        }
    }
}

#[test]
fn a_watched_page_written_and_restored_between_two_checks_is_reported_with_the_dirty_log_feed() {
    let dir = TempDir::new("watch-dirty");
    let mut source = start_source(&dir, &[]);
    let watch = format!("{:#x}:{:#x}", workload::TEXT_GPA, workload::TEXT_LEN);
    let mut inspector = Inspector::start(&dir, &source, &["--all", "--watch", &watch, "--watch-interval-ms", "100"]);
    inspector.proc.expect_line("baseline taken", LIMIT);
    let status = inspector.ask("status");
    assert!(status.ends_with(" dirty=ring"), "the vmm's default where KVM offers the ring: {status}");
    // Let the feed's first report (which may predate the watch) go by.
    std::thread::sleep(Duration::from_millis(300));
    source.vm.send("text-flip 8192\n");
    source.vm.expect_line("ack text-flip", LIMIT);
    let report = inspector.proc.expect_line("integrity watch 0:", LIMIT);
    let flipped = format!("{:#x}(restored)", workload::TEXT_GPA + 8192);
    assert!(report.contains(&flipped), "the page patched and unpatched is reported as restored: {report}");
    assert!(report.contains(" 1 page(s)"), "and nothing else in the text: {report}");

    // Re-hashing alone cannot see it: the same patch goes unnoticed without the feed.
    let dir = TempDir::new("watch-hash");
    let mut source = start_source(&dir, &[]);
    let mut inspector =
        Inspector::start(&dir, &source, &["--all", "--watch", &watch, "--watch-interval-ms", "100", "--no-dirty-log"]);
    inspector.proc.expect_line("baseline taken", LIMIT);
    let report = flip_then_mark(&mut source, &mut inspector);
    assert!(!report.contains(&format!("{:#x}", workload::TEXT_GPA + 8192)), "{report}");
}

#[test]
fn a_dirty_log_subscriber_that_stops_reading_gets_a_coalesced_backlog_and_blocks_no_one() {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::{Range, MAX_RANGES};
    let dir = TempDir::new("dirty-stall");
    let mut source = start_source(&dir, &[]);
    let watch = format!("{:#x}:{:#x}", workload::TEXT_GPA, workload::TEXT_LEN);
    let mut inspector = Inspector::start(&dir, &source, &["--all", "--watch", &watch, "--watch-interval-ms", "100"]);
    inspector.proc.expect_line("baseline taken", LIMIT);
    // A peer that subscribes to the feed and then never reads its socket.
    let stalled = Importer::connect(&source.mirror).expect("connect");
    let granted = Range { gpa: 0, len: 256 << 20 };
    let _mapped = stalled.grant(&[granted]).expect("grant");
    stalled.subscribe_dirty().expect("the vmm offers the feed");
    // Scattered writes: ~5000 random pages a second over 192 MiB, far more runs than a
    // backlog keeps once the stalled socket is full.
    let fill = workload::FILL_MIN_GPA;
    source.vm.send(&format!("churn {fill:#x} {:#x} 5000 2000000000\n", (256 << 20) - fill));
    source.vm.expect_line("ack churn", LIMIT);
    let first = inspector.heartbeat();
    std::thread::sleep(Duration::from_secs(5));
    assert!(inspector.heartbeat() > first, "the source runs on while a subscriber stalls");
    // The well-behaved inspector's feed still works: a patch put back at once is reported.
    source.vm.send("text-flip 8192\n");
    source.vm.expect_line("ack text-flip", LIMIT);
    let flipped = format!("{:#x}(restored)", workload::TEXT_GPA + 8192);
    loop {
        let report = inspector.proc.expect_line("integrity watch 0:", LIMIT);
        if report.contains(&flipped) {
            break;
        }
    }
    source.vm.send("churn 0 0 0 0\n");
    source.vm.expect_line("ack churn", LIMIT);
    // Now the stalled peer reads: bounded frames inside its grant, some of them coalesced.
    let (tx, rx) = std::sync::mpsc::channel();
    let _reader = stalled
        .start_events(move |_, event| {
            if let SourceEvent::Dirty { coalesced, ranges } = event {
                let _ = tx.send((coalesced, ranges));
            }
        })
        .expect("read events");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut frames, mut coalesced_frames) = (0, 0);
    while Instant::now() < deadline {
        let Ok((coalesced, ranges)) = rx.recv_timeout(Duration::from_millis(500)) else { continue };
        frames += 1;
        coalesced_frames += usize::from(coalesced);
        assert!(ranges.len() <= MAX_RANGES, "a frame of {} runs", ranges.len());
        for r in &ranges {
            assert!(r.gpa % 4096 == 0 && r.len % 4096 == 0 && r.len > 0, "{r:?}");
            assert!(r.gpa + r.len <= granted.gpa + granted.len, "{r:?} lies outside the grant");
        }
    }
    assert!(frames > 0, "the backlog arrives once the peer reads");
    assert!(coalesced_frames > 0, "the backlog outgrew its bound and was coalesced ({frames} frames)");
}

#[test]
fn a_page_written_once_is_reported_once_and_then_no_more_by_the_bitmap_and_by_the_ring() {
    use mirror_driver::protocol::DirtyMechanism;
    for (mode, mechanism) in [("bitmap", DirtyMechanism::BitmapManualProtect), ("ring", DirtyMechanism::Ring)] {
        page_written_once_is_reported_once(mode, mechanism);
    }
}

fn page_written_once_is_reported_once(mode: &str, mechanism: mirror_driver::protocol::DirtyMechanism) {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::Range;
    let dir = TempDir::new(&format!("dirty-once-{mode}"));
    let mut source = start_source(&dir, &["--dirty-log", mode]);
    let peer = Importer::connect(&source.mirror).expect("connect");
    // The workload's text: nothing writes it but `text-flip` (the heartbeat lives elsewhere).
    let text = Range { gpa: workload::TEXT_GPA, len: workload::TEXT_LEN as u64 };
    let _mapped = peer.grant(&[text]).expect("grant");
    let feed = peer.subscribe_dirty().expect("the vmm offers the feed");
    assert_eq!(feed.mechanism, mechanism, "--dirty-log {mode}");
    let (tx, rx) = std::sync::mpsc::channel();
    let _reader = peer
        .start_events(move |_, event| {
            if let SourceEvent::Dirty { ranges, .. } = event {
                let _ = tx.send((Instant::now(), ranges));
            }
        })
        .expect("read events");
    std::thread::sleep(Duration::from_millis(300));
    source.vm.send("text-flip 8192\n");
    source.vm.expect_line("ack text-flip", LIMIT);
    let flipped = workload::TEXT_GPA + 8192;
    let written = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let frames: Vec<(Instant, Vec<Range>)> = rx.try_iter().collect();
    let naming: Vec<Duration> = frames
        .iter()
        .filter(|(_, ranges)| ranges.iter().any(|r| r.gpa <= flipped && flipped < r.gpa + r.len))
        .map(|(at, _)| at.saturating_duration_since(written))
        .collect();
    assert!(!naming.is_empty(), "{mode}: the write was reported ({} frames)", frames.len());
    // The write and the restore may fall into two collections (20 ms apart); after that
    // the page is clean, and a log whose reported pages were never re-protected (or whose
    // bits were never cleared) would name it in every later collection.
    assert!(naming.len() <= 2, "{mode}: the page was reported {} times, at {naming:?} after the write", naming.len());
    assert!(naming.iter().all(|&after| after < Duration::from_millis(500)), "{mode}: {naming:?}");
}

/// The barrier OS views wait on before serving a kept reply: a `DirtySync` right after a
/// write (well inside the 20 ms collection interval) delivers that page before its
/// `DirtySynced` event, every time; a source that only answered the barrier would be
/// caught by one of the 32 tries.
#[test]
fn a_dirty_sync_delivers_every_page_written_before_it_ahead_of_its_barrier() {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::Range;
    use std::sync::{Arc, Mutex};
    let dir = TempDir::new("dirty-sync");
    let mut source = start_source(&dir, &["--dirty-log", "ring"]);
    let peer = Importer::connect(&source.mirror).expect("connect");
    let text = Range { gpa: workload::TEXT_GPA, len: workload::TEXT_LEN as u64 };
    let _mapped = peer.grant(&[text]).expect("grant");
    peer.subscribe_dirty().expect("the vmm offers the feed");
    let seen: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
    let log = seen.clone();
    let peer = peer.start_events(move |_, event| log.lock().unwrap().push(event)).expect("read events");
    for round in 0..32u64 {
        let offset = (round % 64) * 4096;
        source.vm.send(&format!("text-flip {offset}\n"));
        source.vm.expect_line("ack text-flip", LIMIT);
        let token = 1000 + round;
        peer.dirty_sync(token).expect("the source collects at once");
        let events = seen.lock().unwrap().clone();
        let barrier = events
            .iter()
            .position(|e| *e == SourceEvent::DirtySynced { token })
            .unwrap_or_else(|| panic!("round {round}: the barrier came after the reply: {events:?}"));
        let page = workload::TEXT_GPA + offset;
        let named = events[..barrier].iter().any(|e| {
            matches!(e, SourceEvent::Dirty { ranges, .. } if ranges.iter().any(|r| r.gpa <= page && page < r.gpa + r.len))
        });
        assert!(named, "round {round}: page {page:#x}, written before the sync, was not reported ahead of its barrier");
        seen.lock().unwrap().clear();
    }
    // A peer that never subscribed is refused by name.
    let other = Importer::connect(&source.mirror).expect("connect");
    let refused = other.dirty_sync(1).expect_err("no feed, no barrier");
    assert!(format!("{refused:?}").contains("does not subscribe"), "{refused:?}");
}

#[test]
fn a_dirty_ring_that_fills_stops_nothing_and_loses_no_page() {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::{DirtyMechanism, Range};
    let dir = TempDir::new("dirty-ring-full");
    // The smallest ring the vmm asks for (1024 entries): 16 MiB written at once fills it
    // 4 times over within one collection, so the vCPU must harvest it itself to go on.
    let mut source = start_source(&dir, &["--dirty-log", "ring", "--dirty-ring-entries", "1024"]);
    let peer = Importer::connect(&source.mirror).expect("connect");
    let filled = Range { gpa: workload::FILL_MIN_GPA, len: 16 << 20 };
    let _mapped = peer.grant(&[filled]).expect("grant");
    assert_eq!(peer.subscribe_dirty().expect("the vmm offers the feed").mechanism, DirtyMechanism::Ring);
    let (tx, rx) = std::sync::mpsc::channel();
    let _reader = peer
        .start_events(move |_, event| {
            if let SourceEvent::Dirty { coalesced, ranges } = event {
                let _ = tx.send((coalesced, ranges));
            }
        })
        .expect("read events");
    std::thread::sleep(Duration::from_millis(300));
    source.vm.send(&format!("fill {:#x} {:#x} 3\n", filled.gpa, filled.len));
    source.vm.expect_line("workload: filled", LIMIT);
    source.vm.expect_line("ack fill", LIMIT);
    let pages = (filled.len / 4096) as usize;
    let mut reported = vec![false; pages];
    let deadline = Instant::now() + Duration::from_secs(5);
    while reported.iter().any(|&r| !r) && Instant::now() < deadline {
        let Ok((coalesced, ranges)) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        assert!(!coalesced, "a reading peer's frames are exact");
        for r in ranges {
            assert!(r.gpa >= filled.gpa && r.gpa + r.len <= filled.gpa + filled.len, "{r:?} lies outside the grant");
            let first = ((r.gpa - filled.gpa) / 4096) as usize;
            reported[first..first + (r.len / 4096) as usize].fill(true);
        }
    }
    let missing = reported.iter().filter(|&&r| !r).count();
    assert_eq!(missing, 0, "{missing} of {pages} written pages were never reported");
    // The guest runs on after the ring-full exits.
    source.vm.send("text-flip 0\n");
    source.vm.expect_line("ack text-flip", LIMIT);
}

#[test]
fn a_scan_rate_limit_keeps_a_scan_at_or_under_its_rate_and_finds_the_same_matches() {
    let dir = TempDir::new("scan-limit");
    let source = start_source(&dir, &[]);
    // 100 MB/s over 64 MiB: steps of 10 MB, the seventh of which may not start before 0.6 s
    // (a warm scan of 64 MiB without the limit takes a few milliseconds).
    let inspector = Inspector::start(&dir, &source, &["--range", "0x1000000:64M", "--scan-rate-limit", "100"]);
    let pattern: String = b"postgres".iter().map(|b| format!("{b:02x}")).collect();
    let scan = format!("scan 0x1000000 0x4000000 {pattern}");
    // The first scan touches every page (slow under PVM whatever the limit); time the second.
    assert!(inspector.ask(&scan).starts_with("ok hits=8 "));
    let started = Instant::now();
    let reply = inspector.ask(&scan);
    let took = started.elapsed();
    assert!(reply.starts_with("ok hits=8 "), "the task names are found across the steps: {reply}");
    assert!(took >= Duration::from_millis(600), "64 MiB at 100 MB/s took only {took:?}");
}

#[test]
fn the_agent_scans_and_reads_the_task_list() {
    let dir = TempDir::new("scan");
    let source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--range", "0x1000000:2M"]);
    let pattern: String = b"postgres".iter().map(|b| format!("{b:02x}")).collect();
    let reply = inspector.ask(&format!("scan 0x1000000 0x200000 {pattern}"));
    // Task names repeat every 8 slots; 64 tasks hold "postgres" 8 times.
    assert!(reply.starts_with("ok hits=8 "), "{reply}");
    // Walk the workload's task list through the agent, as an OS view would: from the
    // header's head pointer along `next`, bounded by the table size.
    let header = inspector.read(workload::HEADER_GPA, std::mem::size_of::<workload::Header>() as u64);
    let field = |offset: usize| u64::from_le_bytes(header[offset..offset + 8].try_into().unwrap());
    let mut at = field(std::mem::offset_of!(workload::Header, task_list_head));
    let mut walked = Vec::new();
    while at != 0 {
        assert!(walked.len() < workload::TASK_COUNT, "the task list does not end");
        let record = inspector.read(at, workload::TASK_RECORD_SIZE as u64);
        let u32_at = |o: usize| u32::from_le_bytes(record[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(std::mem::offset_of!(workload::TaskRecord, magic)), workload::TASK_MAGIC, "at {at:#x}");
        let slot = ((at - workload::TASK_TABLE_GPA) / workload::TASK_RECORD_SIZE as u64) as usize;
        let name_at = std::mem::offset_of!(workload::TaskRecord, name);
        walked.push((
            slot,
            u32_at(std::mem::offset_of!(workload::TaskRecord, pid)),
            record[name_at..name_at + 16].to_vec(),
        ));
        let next_at = std::mem::offset_of!(workload::TaskRecord, next);
        at = u64::from_le_bytes(record[next_at..next_at + 8].try_into().unwrap());
    }
    assert_eq!(walked.len(), workload::TASK_COUNT, "every task is on the list");
    for (slot, pid, name) in &walked {
        assert_eq!(
            (*pid, name.as_slice()),
            (workload::task_pid(*slot), &workload::task_name(*slot)[..]),
            "slot {slot}"
        );
    }
    let mut slots: Vec<usize> = walked.iter().map(|(slot, ..)| *slot).collect();
    assert_ne!(slots, (0..workload::TASK_COUNT).collect::<Vec<_>>(), "the list order is not the table order");
    slots.sort_unstable();
    assert_eq!(slots, (0..workload::TASK_COUNT).collect::<Vec<_>>(), "each slot once");
    let reply = inspector.ask("read 0x0 16");
    assert!(reply.contains("not granted"), "only the asked range is mapped: {reply}");
    let vcpus = inspector.ask("vcpus");
    assert_eq!(vcpus.matches("cr3=").count(), 2, "{vcpus}");
    let _ = source;
}

#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused() {
    let dir = TempDir::new("uid");
    let source = start_source(&dir, &["--mirror-allow-uid", "4242"]);
    let out = integration_tests::run_with_timeout(
        Command::new(binary("inspector")).args(["--source-socket", source.mirror.to_str().unwrap(), "--all"]),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PeerRefused") && stderr.contains("is not allowed to attach"), "{stderr}");
    // The API socket serves the same allow list: ask it as uid 4242 that no grant was made.
    integration_tests::require_root();
    std::fs::set_permissions(&source.api, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = integration_tests::line_request_as(4242, &source.api, &["grants"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "no grants");
}

#[test]
fn several_inspectors_attach_at_once() {
    let dir = TempDir::new("several");
    let source = start_source(&dir, &[]);
    let (dir_a, dir_b) = (TempDir::new("several-a"), TempDir::new("several-b"));
    let a = Inspector::start(&dir_a, &source, &["--all"]);
    let b = Inspector::start(&dir_b, &source, &["--range", "0x1000000:2M"]);
    assert_eq!(source.api("inspectors"), "ok 2");
    assert_eq!(a.read(workload::HEADER_GPA, 16), b.read(workload::HEADER_GPA, 16));
}

/// Peers that said Hello and then never read again: their socket buffers fill.
fn stalled_peers(source: &Source, count: usize) -> Vec<std::os::unix::net::UnixStream> {
    use mirror_driver::protocol::{Message, PROTOCOL_VERSION};
    (0..count)
        .map(|_| {
            let peer = std::os::unix::net::UnixStream::connect(&source.mirror).unwrap();
            mirror_driver::wire::send(&peer, 1, &Message::Hello { version: PROTOCOL_VERSION }, &[]).unwrap();
            assert!(matches!(mirror_driver::wire::recv(&peer).unwrap().message, Message::HelloAck { .. }));
            peer
        })
        .collect()
}

#[test]
fn the_source_keeps_running_while_inspectors_are_stalled_with_full_buffers() {
    let dir = TempDir::new("stall");
    let source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    // Freeze the real inspector, and add raw peers that never read: the source must not care.
    inspector.proc.signal(libc::SIGSTOP);
    let stalled = stalled_peers(&source, 4);
    assert_eq!(source.api("inspectors"), "ok 5");
    // Events until every stalled peer's buffer is full and it has been dropped; no API
    // call may block for long, however many peers are stalled at once.
    let mut slowest = Duration::ZERO;
    let mut events = 0;
    while source.api("inspectors") != "ok 0" {
        assert!(events < 200_000, "the stalled peers were never dropped");
        let start = Instant::now();
        assert_eq!(source.api(&format!("discard {:#x} 4096", workload::POOL_GPA)), "ok");
        slowest = slowest.max(start.elapsed());
        events += 1;
    }
    assert!(events > 100, "only {events} events: the buffers cannot have filled");
    assert!(slowest < Duration::from_secs(3), "one event to 5 stalled peers blocked the source for {slowest:?}");
    assert!(source.api("vcpus").starts_with("ok 0:rip="), "the source still serves");
    inspector.proc.signal(libc::SIGCONT);
    drop(stalled);
}

#[test]
fn pausing_the_source_freezes_its_memory_and_tells_the_inspector() {
    let dir = TempDir::new("pause");
    let source = start_source(&dir, &[]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    assert_eq!(source.api("pause"), "ok");
    inspector.proc.expect_line("inspector: source paused", LIMIT);
    let frozen = inspector.heartbeat();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(inspector.heartbeat(), frozen, "no vCPU runs while paused");
    let vcpus = source.api("vcpus");
    assert_eq!(vcpus.matches("rip=").count(), 2, "paused vCPUs still report their registers: {vcpus}");
    assert_eq!(source.api("resume"), "ok");
    inspector.proc.expect_line("inspector: source resumed", LIMIT);
    std::thread::sleep(Duration::from_millis(50));
    assert!(inspector.heartbeat() > frozen, "the workload runs again");
}

#[test]
fn a_source_that_exits_says_so_and_the_inspector_keeps_serving() {
    let dir = TempDir::new("exit");
    let mut source = start_source(&dir, &[]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    source.vm.send("exit 0\n");
    assert_eq!(source.vm.wait(LIMIT).code(), Some(0), "the workload exits with the status it was given");
    inspector.proc.expect_line("source gone", LIMIT);
    assert!(inspector.ask("status").starts_with("ok source=gone"));
    assert_eq!(&inspector.read(workload::HEADER_GPA, 16), &workload::HEADER_MAGIC);
}

#[test]
fn a_copying_tool_finds_the_source_ram_in_its_mappings() {
    use std::os::unix::fs::FileExt;
    // What the benchmark's process_vm_readv and /proc/PID/mem baselines rely on.
    let dir = TempDir::new("hvas");
    let source = start_source(&dir, &[]);
    let importer = mirror_driver::importer::Importer::connect(&source.mirror).unwrap();
    let (gpa, len) = (0x0010_0000, 64 << 20);
    let grants = importer.grant(&[mirror_driver::protocol::Range { gpa, len }]).unwrap();
    assert!(grants.len() > 1, "the range spans several chunks");
    let pid = source.vm.child.id() as libc::pid_t;
    let pieces = integration_tests::bench::source_hvas(pid, &grants);
    assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), len);
    assert_eq!(source.api("pause"), "ok");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut copied = Vec::new();
    for (hva, piece) in pieces {
        let mut buf = vec![0u8; piece as usize];
        mem.read_exact_at(&mut buf, hva).unwrap();
        copied.extend_from_slice(&buf);
    }
    let granted: Vec<u8> = grants.iter().flat_map(|g| g.bytes().iter().copied()).collect();
    assert!(copied == granted, "the copy from the source's mappings equals the granted pages");
    assert!(copied.iter().any(|&b| b != 0), "and is not all zeros");
    assert_eq!(source.api("resume"), "ok");
}

#[test]
fn a_watch_over_a_revoked_range_reports_the_revocation_not_false_changes() {
    let dir = TempDir::new("watch-revoked");
    let source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    let watch = inspector.ask(&format!("watch {:#x} {:#x}", workload::TEXT_GPA, workload::TEXT_LEN));
    let id = watch.strip_prefix("ok id=").unwrap_or_else(|| panic!("{watch}"));
    assert_eq!(inspector.ask(&format!("check {id}")), "ok changed=0 gpas=");
    let grant = grant_at(&source, workload::HEADER_GPA); // the chunk holding the text
    assert!(source.api(&format!("revoke {grant}")).starts_with("ok revoked="));
    let reply = inspector.ask(&format!("check {id}"));
    assert!(reply.starts_with("error") && reply.contains("not granted"), "{reply}");
}

#[test]
fn sigterm_stops_the_inspector_cleanly_whichever_thread_it_lands_on() {
    let dir = TempDir::new("sigterm");
    let source = start_source(&dir, &[]);
    for _ in 0..3 {
        let mut inspector = Inspector::start(&dir, &source, &["--all", "--watch", "0x1010000:0x40000"]);
        inspector.proc.signal(libc::SIGTERM);
        let status = inspector.proc.wait(LIMIT);
        assert_eq!(status.code(), Some(0), "the inspector ended by the signal instead of stopping: {status:?}");
    }
    let deadline = Instant::now() + LIMIT;
    while source.api("inspectors") != "ok 0" {
        assert!(Instant::now() < deadline, "an inspector's connection outlived it");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_inspector_pauses_a_source_that_allows_it_and_its_pause_ends_when_it_leaves() {
    let dir = TempDir::new("mirror-pause");
    let source = start_source(&dir, &["--mirror-allow-pause"]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    assert_eq!(inspector.ask("pause"), "ok");
    inspector.proc.expect_line("inspector: source paused", LIMIT);
    let frozen = inspector.heartbeat();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(inspector.heartbeat(), frozen, "no vCPU runs while the inspector holds a pause");
    assert_eq!(inspector.ask("resume"), "ok");
    inspector.proc.expect_line("inspector: source resumed", LIMIT);
    std::thread::sleep(Duration::from_millis(50));
    assert!(inspector.heartbeat() > frozen);
    // A pause whose holder dies does not outlive it.
    assert_eq!(inspector.ask("pause"), "ok");
    let observer_dir = TempDir::new("mirror-pause-observer");
    let mut observer = Inspector::start(&observer_dir, &source, &["--range", "0x1000000:2M"]);
    let held = observer.heartbeat();
    inspector.proc.signal(libc::SIGKILL);
    inspector.proc.wait(LIMIT);
    observer.proc.expect_line("inspector: source resumed", LIMIT);
    std::thread::sleep(Duration::from_millis(50));
    assert!(observer.heartbeat() > held, "the source runs again");
}

#[test]
fn a_source_that_does_not_allow_pauses_refuses_them() {
    let dir = TempDir::new("mirror-nopause");
    let source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    let reply = inspector.ask("pause");
    assert!(reply.starts_with("error") && reply.contains("--mirror-allow-pause"), "{reply}");
    let first = inspector.heartbeat();
    std::thread::sleep(Duration::from_millis(50));
    assert!(inspector.heartbeat() > first);
}

#[test]
fn a_scan_counts_overlapping_matches() {
    let dir = TempDir::new("scan-overlap");
    let mut source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    source.poke(POKE_GPA, b"\x01zzzz\x02");
    let reply = inspector.ask(&format!("scan {POKE_GPA:#x} 16 7a7a"));
    let want = format!("ok hits=3 gpas={:#x},{:#x},{:#x}", POKE_GPA + 1, POKE_GPA + 2, POKE_GPA + 3);
    assert_eq!(reply, want, "\"zz\" starts at three places in \"zzzz\"");
}

#[test]
fn the_inspector_binary_is_a_client_of_its_control_socket() {
    let dir = TempDir::new("client");
    let source = start_source(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    let control = inspector.control.to_str().unwrap();
    let client = |args: &[&str]| {
        let out = integration_tests::run_with_timeout(Command::new(binary("inspector")).args(args), LIMIT);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (code, status) = client(&["status", "--control-socket", control]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.starts_with("source=attached"), "{status}");
    let (code, read) = client(&["read", &format!("{:#x}", workload::HEADER_GPA), "16", "--control-socket", control]);
    assert_eq!((code, read.as_str()), (Some(0), "53504543554c412d574f524b4c4f4144"), "arguments before the socket");
    let (code, read) = client(&["read", "--control-socket", control, &format!("{:#x}", workload::HEADER_GPA), "16"]);
    assert_eq!((code, read.as_str()), (Some(0), "53504543554c412d574f524b4c4f4144"), "and after it");
    // Every request the socket serves, not a list of the binary's own: the trace
    // requests came later, and this source does not trace.
    let (code, trace) = client(&["trace-status", &format!("--control-socket={control}")]);
    assert_eq!(code, Some(0), "{trace}");
    assert!(trace.contains("\"kinds\":[]"), "nothing traced: {trace}");
    let refused = |args: &[&str]| {
        let out = integration_tests::run_with_timeout(Command::new(binary("inspector")).args(args), LIMIT);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).trim().to_string())
    };
    let (code, err) = refused(&["stats", "--control-socket", control]);
    assert_eq!(code, Some(1));
    assert!(err.contains("bad request \"stats\": unrecognized subcommand 'stats'"), "{err}");
    let (code, err) = refused(&["read", "0x1000", "--control-socket", control]);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing LEN"), "{err}");
    let (code, err) = refused(&["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("a request needs --control-socket PATH"), "{err}");
}

/// Write traps on a real source (`--mirror-allow-trace`; on this runner's KVM, and on
/// NPT in the nest's trace tests): the guest's writes to a trapped range exit to the
/// vmm, are completed in its RAM as the guest asked (a later write reports the first as
/// what it replaced, and the guest goes on to acknowledge each), are reported byte by
/// byte (the workload stores bytes) with the writer's RIP and CR3, and are named in the
/// dirty-page feed, which KVM's own log cannot see for them; a write beside the range on
/// its page is completed and not reported; a subscription to other trace kinds does not
/// stop them; disarmed, nothing more is reported.
#[test]
fn trace_write_traps_report_the_guests_writes_and_complete_them() {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::{MemoryWrite, Range};
    use std::sync::{Arc, Mutex};
    let dir = TempDir::new("write-traps");
    let mut source = start_source(&dir, &["--mirror-allow-trace"]);
    let peer = Importer::connect(&source.mirror).expect("connect");
    let target = POKE_GPA + 0x40;
    // The feed names pages of the peer's grants.
    let _mapped = peer.grant(&[Range { gpa: POKE_GPA, len: 2 << 20 }]).expect("grant");
    peer.subscribe_dirty().expect("the vmm offers the feed");
    assert_eq!(peer.set_write_traps(&[Range { gpa: target, len: 2 }]).expect("armed"), 1, "one page");
    let seen: Arc<Mutex<Vec<SourceEvent>>> = Arc::default();
    let log = seen.clone();
    let peer = peer.start_events(move |_, event| log.lock().unwrap().push(event)).expect("read events");
    let writes = || -> Vec<MemoryWrite> {
        let events = seen.lock().unwrap();
        events.iter().filter_map(|e| if let SourceEvent::MemoryWrite(w) = e { Some(*w) } else { None }).collect()
    };
    let wait_for_writes = |n: usize| {
        let deadline = Instant::now() + LIMIT;
        while writes().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        writes()
    };

    // A subscription to other kinds keeps the write traps this peer holds reported.
    peer.subscribe_trace(mirror_driver::protocol::trace_kind::MSR_WRITES).expect("subscribed");
    source.poke(target, &[0xab, 0xcd]);
    source.poke(target + 8, &[0x77]);
    source.poke(target, &[0x12, 0x34]);
    let got = wait_for_writes(4);
    let shape: Vec<(u64, u32, u64)> = got.iter().map(|w| (w.gpa, w.len, w.value)).collect();
    assert_eq!(
        shape,
        vec![(target, 1, 0xab), (target + 1, 1, 0xcd), (target, 1, 0x12), (target + 1, 1, 0x34)],
        "each watched byte, in order, and not the one beside them: {got:#x?}"
    );
    assert_eq!((got[2].previous, got[3].previous), (0xab, 0xcd), "the first writes were completed in guest RAM");
    assert!(got.iter().all(|w| w.rip != 0 && w.cr3 != 0), "the writer's RIP and page tables: {got:#x?}");

    peer.dirty_sync(7).expect("the source collects at once");
    let events = seen.lock().unwrap().clone();
    let barrier = events.iter().position(|e| *e == SourceEvent::DirtySynced { token: 7 }).expect("the barrier");
    let page = target & !0xfff;
    let named = events[..barrier].iter().any(|e| {
        matches!(e, SourceEvent::Dirty { ranges, .. } if ranges.iter().any(|r| r.gpa <= page && page < r.gpa + r.len))
    });
    assert!(named, "the trapped page {page:#x}, written through the vmm, is in the dirty feed: {events:?}");

    assert_eq!(peer.set_write_traps(&[]).expect("disarmed"), 0);
    source.poke(target, &[0x56]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(writes().len(), 4, "nothing is reported once disarmed: {:#x?}", writes());
}

/// A guest that hammers trapped pages (the workload fills 64 KiB of them: thousands of
/// stores, each an exit) gets no more reports than the source's rate cap lets through:
/// the rest are counted in `TraceDropped`, so every completed write is reported or
/// counted and none is lost silently; every byte lands as the guest wrote it; and the
/// source goes on serving its guest.
#[test]
fn trace_write_traps_hold_the_rate_cap_against_a_guest_hammering_them() {
    use mirror_driver::importer::{Importer, SourceEvent};
    use mirror_driver::protocol::Range;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const FILL: u64 = 0x0400_0000;
    const LEN: u64 = 0x1_0000;
    let dir = TempDir::new("write-trap-flood");
    let mut source = start_source(&dir, &["--mirror-allow-trace"]);
    let peer = Importer::connect(&source.mirror).expect("connect");
    let mapped = peer.grant(&[Range { gpa: FILL, len: LEN }]).expect("grant");
    assert_eq!(peer.set_write_traps(&[Range { gpa: FILL, len: LEN }]).expect("armed"), LEN / 4096);
    let (reported, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r, d) = (reported.clone(), dropped.clone());
    let peer = peer
        .start_events(move |_, event| match event {
            SourceEvent::MemoryWrite(_) => {
                r.fetch_add(1, Ordering::SeqCst);
            }
            SourceEvent::TraceDropped { count } => {
                d.fetch_add(count, Ordering::SeqCst);
            }
            _ => {}
        })
        .expect("read events");
    let started = Instant::now();
    source.vm.send(&format!("fill {FILL:#x} {LEN:#x} 7\n"));
    source.vm.expect_line("workload: filled", LIMIT);
    let filled_after = started.elapsed();
    // Reports and drop counts still on their way settle.
    let total = || reported.load(Ordering::SeqCst) + dropped.load(Ordering::SeqCst);
    let mut last = total();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        if total() == last {
            break;
        }
        last = total();
    }
    let (reported, dropped) = (reported.load(Ordering::SeqCst), dropped.load(Ordering::SeqCst));
    eprintln!("flood: {reported} reported, {dropped} dropped, the fill took {filled_after:?}");
    assert!(
        reported + dropped >= LEN / 8,
        "every store (at most 8 bytes each) reported or counted: {reported} + {dropped}"
    );
    let windows = filled_after.as_secs() + 2;
    assert!(reported <= 1000 * windows, "{reported} reports in {filled_after:?} break the cap of 1000/s");
    assert!(dropped > 0, "a flood past the cap is counted: {reported} reported");
    let mut expected = vec![0u8; LEN as usize];
    workload::fill_with_needles(&mut expected, FILL, 7);
    let grant =
        mapped.iter().find(|m| m.grant.gpa <= FILL && FILL + LEN <= m.grant.gpa + m.grant.len).expect("one grant");
    let at = (FILL - grant.grant.gpa) as usize;
    assert!(grant.bytes()[at..at + LEN as usize] == expected[..], "every trapped store landed as the guest wrote it");
    // The guest still answers (its sequence counts the fill, so not through `poke`).
    source.vm.send(&format!("poke {POKE_GPA:#x} 414c495645\n"));
    source.vm.expect_line("ack poke", LIMIT);
    drop(peer);
}
