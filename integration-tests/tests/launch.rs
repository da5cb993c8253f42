//! `specula launch`: a paired source and inspector from one command, supervised:
//! Ctrl-C stops both cleanly, and a crash of the inspector is reported and stops the source.

use std::process::Command;
use std::time::Duration;

use integration_tests::{binary, guest, run_with_timeout, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

fn launch(dir: &TempDir) -> (Running, String) {
    let run = dir.join("run");
    let mut launcher = Running::spawn(Command::new(binary("specula")).args([
        "launch",
        "--kernel",
        guest("source-workload").to_str().unwrap(),
        "--memory",
        "256M",
        "--dir",
        run.to_str().unwrap(),
    ]));
    launcher.expect_line("running", LIMIT);
    launcher.expect_line("API at", LIMIT);
    (launcher, run.join("api.sock").display().to_string())
}

fn pid_of(launcher: &Running, what: &str) -> libc::pid_t {
    let line = launcher.seen.iter().find(|l| l.contains("running")).expect("the running line");
    let after = line.split(&format!("{what} pid ")).nth(1).expect(what);
    after.split_whitespace().next().unwrap().parse().unwrap()
}

fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn ctrl_c_stops_the_source_and_the_inspector() {
    let dir = TempDir::new("launch-int");
    let (mut launcher, api) = launch(&dir);
    let out = run_with_timeout(Command::new(binary("specula")).args(["--socket", &api, "status"]), LIMIT);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("attached") && status.contains("specula"), "{status}");
    let (source, inspector) = (pid_of(&launcher, "source"), pid_of(&launcher, "inspector"));
    launcher.signal(libc::SIGINT);
    launcher.expect_line("stopping both", LIMIT);
    let report = launcher.expect_line("inspector stopped", LIMIT);
    assert!(report.contains("source stopped"), "{report}");
    assert_eq!(launcher.wait(LIMIT).code(), Some(0));
    assert!(!alive(source) && !alive(inspector), "no child outlives the launcher");
}

#[test]
fn a_crashed_inspector_is_reported_and_the_source_stopped() {
    let dir = TempDir::new("launch-crash");
    let (mut launcher, _) = launch(&dir);
    let (source, inspector) = (pid_of(&launcher, "source"), pid_of(&launcher, "inspector"));
    // SAFETY: kill(2) on the launcher's inspector.
    unsafe { libc::kill(inspector, libc::SIGKILL) };
    let line = launcher.expect_line("the inspector exited unexpectedly", LIMIT);
    assert!(line.contains("signal: 9"), "{line}");
    assert_eq!(launcher.wait(LIMIT).code(), Some(1));
    assert!(!alive(source), "the source was stopped");
}

#[test]
fn a_linux_guest_under_qemu_launches_from_a_toml_file() {
    let dir = TempDir::new("launch-qemu");
    let linux = integration_tests::linux_guest::linux_image("vmlinuz");
    let initrd = integration_tests::linux_guest::linux_image("introspect.cpio.gz");
    let file = dir.join("launch.toml");
    std::fs::write(
        &file,
        format!(
            "source = \"qemu\"\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory = \"256M\"\ndir = \"{}\"\n",
            linux.display(),
            initrd.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    let mut launcher =
        Running::spawn(Command::new(binary("specula")).args(["launch", "--config", file.to_str().unwrap()]));
    launcher.expect_line("qemu source pid", LIMIT);
    let api = dir.join("run").join("api.sock");
    let out = run_with_timeout(
        Command::new(binary("specula")).args(["--socket", api.to_str().unwrap(), "--json", "status"]),
        LIMIT,
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status["kind"].as_str(), status["window_len"].as_u64()), (Some("qemu"), Some(256 << 20)), "{status}");
    launcher.signal(libc::SIGTERM);
    assert_eq!(launcher.wait(LIMIT).code(), Some(0));
}

/// Runs `cmd` on a new pseudo-terminal as its controlling terminal; returns the child
/// and the terminal's master side.
fn spawn_on_pty(cmd: &mut Command) -> (std::process::Child, std::fs::File) {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two fds we then own.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: the fds come from openpty and are ours.
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave);
    // SAFETY: setsid and TIOCSCTTY in the child before exec make the pty its controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    (cmd.spawn().expect("spawn on the pty"), master)
}

#[test]
fn on_a_terminal_launch_shows_findings_as_they_happen_and_ctrl_c_stops_both() {
    use std::io::{Read, Write};
    let dir = TempDir::new("launch-pty");
    let run = dir.join("run");
    let watch = format!("{:#x}:{:#x}", guest_images::workload::TEXT_GPA, guest_images::workload::TEXT_LEN);
    let (mut child, mut master) = spawn_on_pty(Command::new(binary("specula")).args([
        "launch",
        "--kernel",
        guest("source-workload").to_str().unwrap(),
        "--dir",
        run.to_str().unwrap(),
        "--watch",
        &watch,
    ]));
    let mut seen = String::new();
    fn wait_for(needle: &str, master: &mut std::fs::File, seen: &mut String) {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut buf = [0u8; 4096];
        while !seen.contains(needle) {
            assert!(std::time::Instant::now() < deadline, "no {needle:?} on the terminal: {seen}");
            // Wait at most a second for output, so a silent terminal ends at the deadline
            // instead of blocking the read forever.
            use std::os::fd::AsRawFd;
            let mut pollfd = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd for an fd we own.
            if unsafe { libc::poll(&mut pollfd, 1, 1000) } <= 0 {
                continue;
            }
            let n = master.read(&mut buf).unwrap_or(0);
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    wait_for("API at", &mut master, &mut seen);
    std::thread::sleep(Duration::from_millis(500)); // the watch takes its baseline
                                                    // The source discards a page of the watched text: the agent sees it change.
    let page = guest_images::workload::TEXT_GPA + 0x3000;
    let reply = integration_tests::unix_request(&run.join("source-api.sock"), &format!("discard {page:#x} 4096"));
    assert_eq!(reply, "ok");
    wait_for("watch.changed", &mut master, &mut seen);
    assert!(seen.contains(&page.to_string()), "the changed page is shown: {seen}");
    master.write_all(b"\x03").unwrap(); // Ctrl-C
    wait_for("stopping both", &mut master, &mut seen);
    let status = integration_tests::wait_deadline(&mut child, LIMIT).expect("the launcher exits");
    assert!(status.success(), "{status:?}: {seen}");
}
