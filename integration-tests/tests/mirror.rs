//! The mirror device and the inspector, end to end on /dev/kvm: a source `vmm`
//! running `source-workload`, an `inspector` whose agent guest reads the
//! source's RAM through read-only memslots, and the source's API socket.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_images::workload;
use integration_tests::{binary, unix_request, Running, SourceVm, TempDir};

const LIMIT: Duration = Duration::from_secs(60);
const POKE_GPA: u64 = 0x0180_0000;

struct Source {
    vm: Running,
    mirror: PathBuf,
    api: PathBuf,
    pokes: u32,
}

impl Source {
    fn start(dir: &TempDir, extra: &[&str]) -> Self {
        let mut args = vec!["--memory", "256M", "--cpus", "2"];
        args.extend_from_slice(extra);
        let SourceVm { mut vm, mirror, api } = SourceVm::spawn(dir, &args);
        vm.expect_line("workload: ready", LIMIT);
        Self { vm, mirror, api, pokes: 0 }
    }

    fn api(&self, line: &str) -> String {
        unix_request(&self.api, line)
    }

    /// Has the source guest write `bytes` at `gpa`, and waits until it says it did.
    fn poke(&mut self, gpa: u64, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.vm.send(&format!("poke {gpa:#x} {hex}\n"));
        self.pokes += 1;
        self.vm.expect_line(&format!("ack poke seq={}", self.pokes), LIMIT);
    }
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

#[test]
fn the_agent_sees_source_writes_across_many_updates_without_stale_reads() {
    let dir = TempDir::new("coherence");
    let mut source = Source::start(&dir, &[]);
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
    let mut source = Source::start(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    let page = workload::POOL_GPA;
    source.poke(page + 8, b"BEFORE!!");
    assert_eq!(inspector.read(page + 8, 8), b"BEFORE!!");
    assert_eq!(source.api(&format!("discard {page:#x} 4096")), "ok");
    assert_eq!(inspector.read(page, 4096), vec![0u8; 4096], "the agent reads the punched page as zeros");
    source.poke(page + 8, b"AFTER!!!");
    assert_eq!(inspector.read(page + 8, 8), b"AFTER!!!", "new source writes show again");
}

#[test]
fn a_revoked_grant_is_unmapped_before_the_source_hears_back() {
    let dir = TempDir::new("revoke");
    let source = Source::start(&dir, &[]);
    let mut inspector = Inspector::start(&dir, &source, &["--all"]);
    let grants = source.api("grants");
    let id = grants
        .split_whitespace()
        .find_map(|g| {
            let parts: Vec<&str> = g.split(':').collect();
            (parts.len() == 4
                && u64::from_str_radix(parts[1].trim_start_matches("0x"), 16).ok() == Some(workload::HEADER_GPA))
            .then(|| parts[0].to_string())
        })
        .unwrap_or_else(|| panic!("a grant starting at the workload header in {grants}"));
    assert_eq!(source.api(&format!("revoke {id}")), "ok");
    // The API returned only after the inspector acknowledged, which it does after removing the slot.
    inspector.proc.expect_line(&format!("grant {id} ("), LIMIT);
    let reply = inspector.ask(&format!("read {:#x} 16", workload::HEADER_GPA));
    assert!(reply.starts_with("error") && reply.contains("not granted"), "{reply}");
    assert!(!source.api("grants").split_whitespace().any(|g| g.starts_with(&format!("{id}:"))));
    assert!(inspector.ask("read 0x0 16").starts_with("ok"), "other grants keep working");
}

#[test]
fn the_inspector_outlives_a_killed_source_and_keeps_the_last_contents() {
    let dir = TempDir::new("sigkill");
    let mut source = Source::start(&dir, &[]);
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
    let mut source = Source::start(&dir, &[]);
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
    let mut source = Source::start(&dir, &[]);
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

#[test]
fn the_agent_scans_and_reads_the_task_list() {
    let dir = TempDir::new("scan");
    let source = Source::start(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--range", "0x1000000:2M"]);
    let pattern: String = b"postgres".iter().map(|b| format!("{b:02x}")).collect();
    let reply = inspector.ask(&format!("scan 0x1000000 0x200000 {pattern}"));
    // Task names repeat every 8 slots; 64 tasks hold "postgres" 8 times.
    assert!(reply.starts_with("ok hits=8 "), "{reply}");
    let reply = inspector.ask("read 0x0 16");
    assert!(reply.contains("not granted"), "only the asked range is mapped: {reply}");
    let vcpus = inspector.ask("vcpus");
    assert_eq!(vcpus.matches("cr3=").count(), 2, "{vcpus}");
    let _ = source;
}

#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused() {
    let dir = TempDir::new("uid");
    let source = Source::start(&dir, &["--mirror-allow-uid", "4242"]);
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
    let source = Source::start(&dir, &[]);
    let (dir_a, dir_b) = (TempDir::new("several-a"), TempDir::new("several-b"));
    let a = Inspector::start(&dir_a, &source, &["--all"]);
    let b = Inspector::start(&dir_b, &source, &["--range", "0x1000000:2M"]);
    assert_eq!(source.api("inspectors"), "ok 2");
    assert_eq!(a.read(workload::HEADER_GPA, 16), b.read(workload::HEADER_GPA, 16));
}

#[test]
fn the_source_keeps_running_while_an_inspector_is_stalled() {
    let dir = TempDir::new("stall");
    let source = Source::start(&dir, &[]);
    let inspector = Inspector::start(&dir, &source, &["--all"]);
    // Freeze the inspector process: the source must not care.
    inspector.proc.signal(libc::SIGSTOP);
    let start = Instant::now();
    assert_eq!(source.api(&format!("discard {:#x} 4096", workload::POOL_GPA)), "ok");
    assert!(source.api("vcpus").starts_with("ok 0:rip="));
    assert!(start.elapsed() < Duration::from_secs(5), "events to a stalled inspector do not block the source");
    inspector.proc.signal(libc::SIGCONT);
}

#[test]
fn pausing_the_source_freezes_its_memory_and_tells_the_inspector() {
    let dir = TempDir::new("pause");
    let source = Source::start(&dir, &[]);
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
    let mut source = Source::start(&dir, &[]);
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
    let source = Source::start(&dir, &[]);
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
