//! The inspector on live Linux guests under QEMU TCG (the `linux_guest` fixture):
//! what a guest process writes is what the agent reads, at the physical address the
//! guest itself reports; QEMU's `stop` freezes the view; a killed QEMU leaves the
//! inspector serving its last contents; q35 with RAM above 4 GiB; and the inspector
//! never holds QEMU's RAM writable.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::linux_guest::{GuestInspector, LinuxGuest, LinuxGuestConfig, Machine};

const LIMIT: Duration = Duration::from_secs(120);
const CONSOLE: Duration = Duration::from_secs(60);

/// QEMU serves one QMP client at a time: tests on the shared guest attach in turn.
static SHARED_GUEST_QMP: Mutex<()> = Mutex::new(());

type Inspector = GuestInspector;

/// What these tests ask of an inspector beyond its control requests.
trait Requests {
    fn read(&self, gpa: u64, len: u64) -> Vec<u8>;
    fn scan(&self, text: &[u8]) -> Vec<u64>;
    fn fingerprint(&self) -> Vec<String>;
}

impl Requests for Inspector {
    fn read(&self, gpa: u64, len: u64) -> Vec<u8> {
        let hex = self.ask(&format!("read {gpa:#x} {len}"));
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    /// Every GPA where `text` occurs in granted RAM.
    fn scan(&self, text: &[u8]) -> Vec<u64> {
        let hex: String = text.iter().map(|b| format!("{b:02x}")).collect();
        let mut hits = Vec::new();
        for g in self.ask("grants").split_whitespace() {
            let parts: Vec<&str> = g.split(':').collect();
            let (gpa, len) = (parse_hex(parts[1]), parse_hex(parts[2]));
            let reply = self.ask(&format!("scan {gpa:#x} {len:#x} {hex}"));
            let list = reply.split("gpas=").nth(1).unwrap_or("");
            hits.extend(list.split(',').filter(|s| !s.is_empty()).map(parse_hex));
        }
        hits
    }

    /// xxh64 over every granted range, in order.
    fn fingerprint(&self) -> Vec<String> {
        let grants = self.ask("grants");
        grants
            .split_whitespace()
            .map(|g| {
                let parts: Vec<&str> = g.split(':').collect();
                self.ask(&format!("hash {} {}", parts[1], parts[2])).split(' ').next().unwrap().to_string()
            })
            .collect()
    }
}

fn parse_hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {text}"))
}

/// The guest-physical address of `vaddr` in process `pid`, from the guest's own pagemap.
fn guest_physical(guest: &LinuxGuest, pid: u32, vaddr: u64) -> u64 {
    let out = guest.console(
        &format!("dd if=/proc/{pid}/pagemap bs=8 skip={} count=1 2>/dev/null | od -An -tx8", vaddr / 4096),
        CONSOLE,
    );
    let entry = parse_hex(out.trim());
    assert!(entry >> 63 == 1, "page {vaddr:#x} of pid {pid} is present: {out}");
    (entry & ((1 << 55) - 1)) * 4096 + vaddr % 4096
}

#[test]
fn a_marker_a_guest_process_holds_is_found_at_the_physical_address_the_guest_reports() {
    let _one = SHARED_GUEST_QMP.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let marker = guest.ground_truth().marker("specula-workerA").expect("the fixture's marker").clone();
    let physical = guest_physical(guest, marker.pid, marker.vaddr);
    let inspector = Inspector::attach(guest);
    let hits = inspector.scan(marker.text.as_bytes());
    assert!(hits.contains(&physical), "the agent finds {} at {physical:#x}: {hits:x?}", marker.text);
    assert_eq!(inspector.read(physical, marker.text.len() as u64), marker.text.as_bytes());
    // The inspector holds QEMU's RAM only read-only: no writable mapping of it.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", inspector.proc.child.id())).unwrap();
    let ram: Vec<&str> = maps.lines().filter(|l| l.contains("memfd:memory-backend-memfd")).collect();
    assert!(!ram.is_empty(), "the inspector maps QEMU's RAM");
    assert!(ram.iter().all(|l| l.split_whitespace().nth(1).is_some_and(|p| !p.contains('w'))), "{ram:#?}");
}

#[test]
fn the_agent_reads_each_value_a_guest_process_writes_with_no_stale_read() {
    let _one = SHARED_GUEST_QMP.lock().unwrap_or_else(|p| p.into_inner());
    let guest = LinuxGuest::shared();
    let marker = guest.ground_truth().marker("specula-workerB").expect("the fixture's marker").clone();
    // A spot in the marker's own page, past its text.
    let vaddr = (marker.vaddr & !0xfff) + 0xc00;
    let physical = guest_physical(guest, marker.pid, vaddr);
    let inspector = Inspector::attach(guest);
    for i in 0..12u32 {
        let value = format!("SEQ{i:05}-{}", marker.pid);
        // The guest writes into the process's memory (dd through /proc/PID/mem), then says so.
        let written = guest.console(
            &format!(
                "printf '{value}' | dd of=/proc/{}/mem bs=1 seek={vaddr} conv=notrunc 2>/dev/null && echo written",
                marker.pid
            ),
            CONSOLE,
        );
        assert!(written.contains("written"), "{written}");
        assert_eq!(inspector.read(physical, value.len() as u64), value.as_bytes(), "value {i}");
    }
}

#[test]
fn qemu_stop_freezes_the_view_and_a_killed_qemu_leaves_the_last_contents_served() {
    let guest = LinuxGuest::start(LinuxGuestConfig::default());
    let marker = guest.ground_truth().marker("specula-workerA").expect("the fixture's marker").clone();
    let physical = guest_physical(&guest, marker.pid, marker.vaddr);
    let mut inspector = Inspector::attach(&guest);
    // A running Linux writes its RAM all the time (timers, at the least).
    let running = inspector.fingerprint();
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(inspector.fingerprint(), running, "a running guest's RAM changes");
    inspector.ask("pause");
    inspector.proc.expect_line("inspector: source paused", LIMIT);
    let frozen = inspector.fingerprint();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(inspector.fingerprint(), frozen, "nothing changes while QEMU is stopped");
    inspector.ask("resume");
    inspector.proc.expect_line("inspector: source resumed", LIMIT);
    // QEMU dies without a word.
    let pid = guest.pid();
    // SAFETY: kill(2) on the fixture's QEMU process.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    inspector.proc.expect_line("source gone", LIMIT);
    let deadline = Instant::now() + LIMIT;
    while !inspector.ask("status").starts_with("source=gone") {
        assert!(Instant::now() < deadline, "the inspector did not notice QEMU's death");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(inspector.read(physical, marker.text.len() as u64), marker.text.as_bytes(), "the last contents");
    assert!(inspector.proc.child.try_wait().unwrap().is_none(), "the inspector runs on");
}

#[test]
fn q35_with_ram_above_4_gib_is_mirrored_whole() {
    let guest = LinuxGuest::start(LinuxGuestConfig { memory_mib: 4608, machine: Machine::Q35, ..Default::default() });
    let marker = guest.ground_truth().marker("specula-workerA").expect("the fixture's marker").clone();
    let physical = guest_physical(&guest, marker.pid, marker.vaddr);
    let inspector = Inspector::attach(&guest);
    let grants = inspector.ask("grants");
    assert!(grants.contains(":0x100000000:0xa0000000"), "RAM above the hole is mapped: {grants}");
    assert!(inspector.scan(marker.text.as_bytes()).contains(&physical));
    let vcpus = inspector.ask("vcpus");
    assert!(vcpus.contains(":cr3=0x") && !vcpus.contains("gs_base=0x0 ") && vcpus.contains("rip=0xffff"), "{vcpus}");
}
