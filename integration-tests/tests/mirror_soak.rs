//! Soak: many attach/detach cycles against one source `vmm`, some of them real
//! inspector processes killed with SIGKILL at random moments. The source's fd count,
//! RSS and grant table must stay flat.
//!
//! `SPECULA_SOAK_CYCLES` sets the number of cycles (default 2,000; docs/mirror-soak.md
//! has the figures of a 10,000-cycle run). Figures are printed and written to
//! `target/mirror-soak.txt`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{binary, target_profile_dir, unix_request, Running, SourceVm, TempDir};
use mirror_driver::importer::Importer;

const LIMIT: Duration = Duration::from_secs(60);
/// One cycle in this many starts a real inspector and SIGKILLs it.
const KILL_EVERY: u64 = 100;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the source's fds").count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("source status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// Waits until the source has let go of every connection.
fn settle(api: &Path) {
    let deadline = Instant::now() + LIMIT;
    while unix_request(api, "inspectors") != "ok 0" {
        assert!(Instant::now() < deadline, "connections of gone peers were never closed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One cycle: attach, map every chunk of RAM read-only, touch it, detach.
fn attach_map_detach(mirror: &Path) {
    let importer = Importer::connect(mirror).expect("attach");
    let map = importer.memory_map().expect("memory map");
    let grants = importer.grant(&map).expect("grant all of RAM");
    assert!(grants.iter().all(|g| g.bytes().len() as u64 == g.grant.len));
    drop(grants);
    drop(importer);
}

#[test]
fn attach_and_detach_cycles_leave_the_source_flat() {
    let cycles: u64 = std::env::var("SPECULA_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let dir = TempDir::new("soak");
    let SourceVm { vm: mut source, mirror, api } = SourceVm::spawn(&dir, &["--memory", "128M", "--serial", "null"]);
    let pid = source.child.id();
    let mut seed = Instant::now().elapsed().as_nanos() as u64 | 1;
    seed ^= u64::from(pid) << 17;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Warm up (thread stacks, allocator arenas), then take the baseline.
    for _ in 0..50 {
        attach_map_detach(&mirror);
    }
    settle(&api);
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));
    let started = Instant::now();
    let mut killed = 0;
    for cycle in 0..cycles {
        if cycle % KILL_EVERY == KILL_EVERY - 1 {
            let control = dir.join("control.sock");
            let mut inspector = Running::spawn(
                Command::new(binary("inspector"))
                    .args(["--source-socket", mirror.to_str().unwrap(), "--all", "--serial", "null"])
                    .args(["--control-socket", control.to_str().unwrap()]),
            );
            std::thread::sleep(Duration::from_millis(random() % 300));
            inspector.signal(libc::SIGKILL);
            inspector.wait(LIMIT);
            killed += 1;
        } else {
            attach_map_detach(&mirror);
        }
    }
    let elapsed = started.elapsed();
    settle(&api);
    let (fds_after, rss_after) = (fd_count(pid), rss_kib(pid));
    let grants = unix_request(&api, "grants");
    let records = grants.split_whitespace().count() - 1; // after "ok"
    let figures = format!(
        "cycles {cycles} ({killed} of them real inspectors SIGKILLed at random moments) in {:.1} s \
         ({:.2} ms/cycle)\nsource fds: {fds_before} before, {fds_after} after\nsource RSS: {rss_before} KiB before, \
         {rss_after} KiB after ({:+} KiB)\ngrant records left (disconnected, one per uid and chunk at most): {records}\n",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3 / cycles as f64,
        rss_after as i64 - rss_before as i64,
    );
    print!("{figures}");
    let _ = std::fs::write(target_profile_dir().join("..").join("mirror-soak.txt"), &figures);
    assert!(source.child.try_wait().unwrap().is_none(), "the source survived");
    assert!(unix_request(&api, "vcpus").starts_with("ok 0:rip="), "and still serves");
    assert!(fds_after <= fds_before + 2, "the source leaks fds: {fds_before} -> {fds_after}");
    assert!(rss_after <= rss_before + 16 * 1024, "the source's RSS grew by more than 16 MiB: {figures}");
    assert!(records <= 64, "the grant table grows with the cycles: {records} records");
}
