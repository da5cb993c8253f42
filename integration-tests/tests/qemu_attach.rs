//! Foreign attach: the inspector mirrors an unmodified QEMU's RAM through QMP and
//! QEMU's own memfd, read-only. These tests start QEMU stopped (`-S`, no guest
//! code runs) to check layouts, refusals, control and events; the live Linux
//! tests use the Linux guest fixture.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::linux_guest::StoppedQemu;
use integration_tests::{binary, run_with_timeout, unix_request, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

type Qemu = StoppedQemu;

struct Inspector {
    proc: Running,
    control: PathBuf,
}

impl Inspector {
    fn attach(dir: &TempDir, qmp: &Path) -> Self {
        let control = dir.join("control.sock");
        let mut proc = Running::spawn(Command::new(binary("inspector")).args([
            "--qemu-qmp",
            qmp.to_str().unwrap(),
            "--all",
            "--serial",
            "null",
            "--control-socket",
            control.to_str().unwrap(),
        ]));
        proc.expect_line("inspector: agent ready", LIMIT);
        Self { proc, control }
    }

    fn ask(&self, line: &str) -> String {
        unix_request(&self.control, line)
    }

    /// `grants` as (gpa, len).
    fn grants(&self) -> Vec<(u64, u64)> {
        let reply = self.ask("grants");
        let list = reply.strip_prefix("ok ").unwrap_or_else(|| panic!("{reply}"));
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        list.split_whitespace()
            .map(|g| {
                let parts: Vec<&str> = g.split(':').collect();
                (hex(parts[1]), hex(parts[2]))
            })
            .collect()
    }
}

/// Checks RAM as mapped: from 0 up to `below_end` (less at most the legacy 640 KiB-1 MiB
/// windows, which depend on the firmware's state), then `above_len` bytes from 4 GiB.
fn assert_layout(grants: &[(u64, u64)], below_end: u64, above_len: u64) {
    let below: Vec<_> = grants.iter().filter(|(gpa, _)| *gpa < 1 << 32).collect();
    assert_eq!(below.first().map(|g| g.0), Some(0), "{grants:?}");
    assert_eq!(below.last().map(|(gpa, len)| gpa + len), Some(below_end), "{grants:?}");
    let mapped: u64 = below.iter().map(|(_, len)| len).sum();
    assert!(mapped >= below_end - (0x100000 - 0xa0000) && mapped <= below_end, "{grants:?}");
    assert!(below.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "sorted, not overlapping: {grants:?}");
    let above: Vec<_> = grants.iter().filter(|(gpa, _)| *gpa >= 1 << 32).copied().collect();
    let want = if above_len == 0 { vec![] } else { vec![(1u64 << 32, above_len)] };
    assert_eq!(above, want, "{grants:?}");
}

fn attach_error(qmp: &Path, uid: Option<u32>) -> String {
    let mut cmd = Command::new(binary("inspector"));
    cmd.args(["--qemu-qmp", qmp.to_str().unwrap(), "--all", "--serial", "null"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = run_with_timeout(&mut cmd, LIMIT);
    assert_eq!(out.status.code(), Some(1), "the attach must fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn pc_ram_below_and_above_the_4_gib_hole_is_mapped_at_its_guest_physical_addresses() {
    let dir = TempDir::new("qemu-pc");
    let args = Qemu::memfd_ram("4608M", "pc");
    let qemu = Qemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let inspector = Inspector::attach(&dir, &qemu.qmp);
    // pc: 3 GiB below the hole, the rest above 4 GiB.
    assert_layout(&inspector.grants(), 0xc000_0000, 0x6000_0000);
    let status = inspector.ask("status");
    assert!(
        status.starts_with("ok source=attached kind=qemu grants=3 ")
            && status.ends_with("window=0x160000000 dirty=none"),
        "{status}"
    );
    // Every file of QEMU's RAM the inspector holds is open read-only.
    let pid = inspector.proc.child.id();
    let mut memfds = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).map(|t| t.display().to_string()).unwrap_or_default();
        if target.starts_with("/memfd:memory-backend-memfd") {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy())).unwrap();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap();
            let flags = i32::from_str_radix(flags, 8).unwrap();
            assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "{target} is open with flags {flags:o}");
            memfds += 1;
        }
    }
    assert!(memfds >= 1, "the inspector holds QEMU's RAM memfd");
    // The reset vector state of a stopped machine.
    let vcpus = inspector.ask("vcpus");
    assert!(vcpus.starts_with("ok 0:rip=0xfff0:cr3=0x0"), "{vcpus}");
}

#[test]
fn q35_has_its_own_layout() {
    let dir = TempDir::new("qemu-q35");
    let args = Qemu::memfd_ram("4608M", "q35");
    let qemu = Qemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let inspector = Inspector::attach(&dir, &qemu.qmp);
    // q35: 2 GiB below the hole.
    assert_layout(&inspector.grants(), 0x8000_0000, 0xa000_0000);
}

#[test]
fn each_numa_node_backend_is_found_and_placed() {
    let dir = TempDir::new("qemu-numa");
    let qemu = Qemu::start(
        &dir,
        &[
            "-m",
            "640M",
            "-object",
            "memory-backend-memfd,id=m0,size=256M,share=on",
            "-object",
            "memory-backend-memfd,id=m1,size=384M,share=on",
            "-numa",
            "node,memdev=m0",
            "-numa",
            "node,memdev=m1",
            "-machine",
            "pc",
        ],
    );
    let inspector = Inspector::attach(&dir, &qemu.qmp);
    // Node 0 fills the start of RAM (less the legacy VGA and ROM windows), node 1 follows it.
    let grants = inspector.grants();
    assert_layout(&grants[..grants.len() - 1], 0x1000_0000, 0);
    assert_eq!(grants.last(), Some(&(0x1000_0000, 0x1800_0000)), "node 1's backend at its place: {grants:?}");
}

#[test]
fn anonymous_ram_is_refused_with_the_options_that_fix_it() {
    let dir = TempDir::new("qemu-anon");
    let qemu = Qemu::start(&dir, &["-m", "128M", "-machine", "pc"]);
    let stderr = attach_error(&qemu.qmp, None);
    // QEMU's default RAM is an anonymous private backend of its own (pc.ram).
    assert!(stderr.contains("pc.ram is private") && stderr.contains("anonymous"), "{stderr}");
    assert!(stderr.contains("memory-backend-memfd") && stderr.contains("<memoryBacking>"), "{stderr}");
}

#[test]
fn private_ram_is_refused_with_the_options_that_fix_it() {
    let dir = TempDir::new("qemu-private");
    let qemu = Qemu::start(
        &dir,
        &[
            "-m",
            "128M",
            "-object",
            "memory-backend-memfd,id=m0,size=128M,share=off",
            "-machine",
            "pc,memory-backend=m0",
        ],
    );
    let stderr = attach_error(&qemu.qmp, None);
    assert!(stderr.contains("m0 is private") && stderr.contains("share=on"), "{stderr}");
    assert!(stderr.contains("<access mode='shared'/>"), "{stderr}");
}

#[test]
fn an_inspector_without_access_to_qemus_fds_says_what_it_needs() {
    let dir = TempDir::new("qemu-perm");
    std::os::unix::fs::chown(&dir.0, Some(65534), Some(65534)).unwrap();
    let args = Qemu::memfd_ram("128M", "pc");
    let qemu = Qemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    // Let uid 65534 reach the monitor: the fds are what it must not get.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&qemu.qmp, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = attach_error(&qemu.qmp, Some(65534));
    assert!(stderr.contains("needs QEMU's uid or CAP_SYS_PTRACE"), "{stderr}");
}

#[test]
fn pause_resume_and_exit_of_qemu_become_inspector_events() {
    let dir = TempDir::new("qemu-events");
    let args = Qemu::memfd_ram("256M", "pc");
    let mut qemu = Qemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut inspector = Inspector::attach(&dir, &qemu.qmp);
    assert_eq!(inspector.ask("resume"), "ok");
    inspector.proc.expect_line("inspector: source resumed", LIMIT);
    assert_eq!(inspector.ask("pause"), "ok");
    inspector.proc.expect_line("inspector: source paused", LIMIT);
    let before = inspector.ask("read 0xf0000 16");
    qemu.child.kill().unwrap();
    qemu.child.wait().unwrap();
    inspector.proc.expect_line("source gone", LIMIT);
    let deadline = Instant::now() + LIMIT;
    while !inspector.ask("status").starts_with("ok source=gone") {
        assert!(Instant::now() < deadline, "the inspector never noticed QEMU's exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(inspector.ask("read 0xf0000 16"), before, "the last contents stay readable");
    assert!(inspector.ask("pause").starts_with("error"), "nothing to pause any more");
}

#[test]
fn a_qmp_socket_another_client_holds_is_reported_not_waited_on_forever() {
    let dir = TempDir::new("qemu-busy");
    let args = Qemu::memfd_ram("128M", "pc");
    let qemu = Qemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let _first = Inspector::attach(&dir, &qemu.qmp);
    let stderr = attach_error(&qemu.qmp, None);
    assert!(stderr.contains("did not greet us") && stderr.contains("second `-qmp"), "{stderr}");
}
