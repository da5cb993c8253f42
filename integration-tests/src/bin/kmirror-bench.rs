//! `kmirror-bench [MIB]`: the kernel mirror device's figures, measured in one process
//! tree. Run as root where `specula_mirror.ko` and `specula_pin_baseline.ko` are
//! loaded, with swap on and two NUMA nodes (the nested L1 of `benches/nested.rs`).
//! Prints `NAME=VALUE` lines:
//!
//! - `scan_METHOD_PASS=ms`: a search of MIB MiB (default 1024) for a needle that is
//!   not there, through the device (`mirror`), a shared mapping of the memfd behind
//!   the same amount of memory (`memfd`, how Specula mirrors its own `vmm`) and
//!   `process_vm_readv` copies into a 4 MiB buffer (`readv`, drgn's and
//!   memflow-qemu's way); PASS is `first` (every page touched for the first time
//!   through that path) or `warm`;
//! - `latency_us=N`, repeated: from the source's `MADV_DONTNEED` of a page to its
//!   new contents read through the device;
//! - `stale_EVENT_METHOD=0|1|2` after each identity change of a page, then a write
//!   to it: 0 the reader sees the write, 1 it reads the old page (stale), 2 the event
//!   could not happen with that reader attached (its pin held the page in place).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::anon_source::*;
use mirror_driver::kernel_mirror::{KernelMirror, BASELINE_DEVICE, DEVICE};

/// Absent from every page: pages hold one repeated byte each.
const NEEDLE: [u8; 16] =
    [0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8, 0xf7, 0xf6, 0xf5, 0xf4, 0xf3, 0xf2, 0xf1, 0xf0];
const CHUNK: usize = 4 << 20;
const LATENCY_SAMPLES: u8 = 200;
/// The page each staleness case writes after its event.
const WRITTEN: usize = 3;

fn device(path: &str) -> KernelMirror {
    KernelMirror::open(Path::new(path)).unwrap_or_else(|e| panic!("open {path}: {}", vmm::error_chain(&e)))
}

fn attach(path: &str, source: &Source) -> (OwnedFd, View) {
    let len = source.pages * PAGE;
    let fd = device(path)
        .attach(source.pid as u32, source.pidfd().as_fd(), source.addr, len as u64)
        .unwrap_or_else(|e| panic!("attach through {path}: {}", vmm::error_chain(&e)));
    let view = View::map(&fd, len);
    (fd, view)
}

fn found(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, &NEEDLE).is_some()
}

/// Times `scan` once: milliseconds.
fn timed(scan: impl FnOnce() -> bool) -> f64 {
    let started = Instant::now();
    assert!(!scan(), "the needle is in no page");
    started.elapsed().as_secs_f64() * 1e3
}

/// Searches `len` bytes of `pid` at `addr` through `process_vm_readv`, a chunk at a time.
fn readv_scan(pid: libc::pid_t, addr: u64, len: usize, buf: &mut [u8]) -> bool {
    let mut hit = false;
    for at in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - at);
        read_remote(pid, addr + at as u64, &mut buf[..n]);
        hit |= found(&buf[..n]);
    }
    hit
}

fn read_remote(pid: libc::pid_t, addr: u64, buf: &mut [u8]) {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: one local buffer we own, one remote range of the source.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, buf.len() as isize, "process_vm_readv: {}", std::io::Error::last_os_error());
}

fn scans(mib: usize) {
    let pages = mib * 256;
    let len = pages * PAGE;
    {
        let mut source = Source::spawn_pages(pages, false);
        source.send(FILL_ALL, 0, 0);
        let (_fd, view) = attach(DEVICE, &source);
        // SAFETY: the whole read-only mapping of the mirror.
        let bytes = unsafe { std::slice::from_raw_parts(view.base, len) };
        println!("scan_mirror_first={:.1}", timed(|| found(bytes)));
        println!("scan_mirror_warm={:.1}", timed(|| found(bytes)));
        let mut buf = vec![0u8; CHUNK];
        println!("scan_readv_first={:.1}", timed(|| readv_scan(source.pid, source.addr, len, &mut buf)));
        println!("scan_readv_warm={:.1}", timed(|| readv_scan(source.pid, source.addr, len, &mut buf)));
    }
    let mut source = Source::spawn_memfd(pages);
    source.send(FILL_ALL, 0, 0);
    let memfd = source.memfd.as_ref().expect("a memfd source");
    let view = View::map(memfd, len);
    // SAFETY: the whole read-only mapping of the memfd.
    let bytes = unsafe { std::slice::from_raw_parts(view.base, len) };
    println!("scan_memfd_first={:.1}", timed(|| found(bytes)));
    println!("scan_memfd_warm={:.1}", timed(|| found(bytes)));
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn latency() {
    let mut source = Source::spawn();
    let (_fd, view) = attach(DEVICE, &source);
    for round in 1..=LATENCY_SAMPLES {
        let _ = view.byte(0);
        source.send_nowait(REPLACE_STAMPED, 0, round);
        let deadline = Instant::now() + Duration::from_secs(1);
        while view.byte(0) != round && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        let seen = monotonic_ns();
        assert!(source.ack(), "the source's replace");
        assert_eq!(view.byte(0), round, "round {round}: the new page never showed through the mirror");
        println!("latency_us={:.1}", seen.saturating_sub(source.stamped_ns()) as f64 / 1e3);
    }
}

/// How a reader reads a page of the source.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    Mirror,
    Pinned,
    Readv,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Mirror => "mirror",
            Method::Pinned => "pinned",
            Method::Readv => "readv",
        }
    }
}

const EVENTS: [&str; 7] = ["inplace", "dontneed", "remap", "ksm", "migrate", "collapse", "swap"];

/// Node of each page of `pages` in `pid`, or with `to`, moves them there first.
fn move_pages(pid: libc::pid_t, pages: &[*mut libc::c_void], to: Option<&[i32]>) -> Vec<i32> {
    let mut status = vec![-1i32; pages.len()];
    let (nodes, flags) = match to {
        Some(to) => (to.as_ptr(), 1 << 1),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: move_pages on the source's pages (we are root); status filled per page.
    let r = unsafe {
        libc::syscall(libc::SYS_move_pages, pid, pages.len(), pages.as_ptr(), nodes, status.as_mut_ptr(), flags)
    };
    assert!(r >= 0, "move_pages: {}", std::io::Error::last_os_error());
    status
}

/// Runs `event` on a fresh source read through `method`, then writes page `WRITTEN`;
/// 0 fresh, 1 stale, 2 the event did not happen.
fn staleness(event: &str, method: Method) -> u8 {
    let huge = event == "collapse";
    let mut source = if huge { Source::spawn_pages(512, true) } else { Source::spawn_pages(16, false) };
    let base = 0x21u8;
    for page in 0..source.pages {
        // KSM needs identical pages; the others are told apart.
        let byte = if event == "ksm" { base } else { base.wrapping_add(page as u8) };
        source.send(FILL, page as u32, byte);
    }
    let reader = match method {
        Method::Mirror => Some(attach(DEVICE, &source)),
        Method::Pinned => Some(attach(BASELINE_DEVICE, &source)),
        Method::Readv => None,
    };
    let read = |source: &Source, page: usize| -> u8 {
        match &reader {
            Some((_, view)) => view.byte(page),
            None => {
                let mut b = [0u8];
                read_remote(source.pid, source.addr + (page * PAGE) as u64, &mut b);
                b[0]
            }
        }
    };
    for page in 0..source.pages {
        let _ = read(&source, page);
    }
    let happened = match event {
        "inplace" => true,
        "dontneed" => {
            source.send(DONTNEED, 0, 0);
            true
        }
        "remap" => {
            source.send(REMAP, 0, 0x5a);
            true
        }
        "ksm" => {
            source.send(MERGEABLE, 0, 0);
            let merging = format!("/proc/{}/ksm_merging_pages", source.pid);
            let deadline = Instant::now() + Duration::from_secs(30);
            let merged =
                || std::fs::read_to_string(&merging).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
            while merged() < source.pages as u64 - 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            merged() >= source.pages as u64 - 1
        }
        "migrate" => {
            let pages: Vec<*mut libc::c_void> =
                (0..source.pages).map(|p| (source.addr as usize + p * PAGE) as *mut _).collect();
            let to: Vec<i32> = move_pages(source.pid, &pages, None).iter().map(|&n| i32::from(n == 0)).collect();
            move_pages(source.pid, &pages, Some(&to))[WRITTEN] == to[WRITTEN]
        }
        "collapse" => {
            source.send_nowait(COLLAPSE, 0, 0);
            source.ack() && source.huge_kb() == 2048
        }
        "swap" => {
            source.send(PAGEOUT, 0, 0);
            source.status_kb("VmSwap") > 0
        }
        other => panic!("no event {other}"),
    };
    if !happened {
        return 2;
    }
    source.send(FILL, WRITTEN as u32, 0xee);
    u8::from(read(&source, WRITTEN) != 0xee)
}

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(1024, |a| a.parse().expect("MIB: a number of MiB"));
    for (path, value) in [
        ("/sys/kernel/mm/ksm/sleep_millisecs", "0"),
        ("/sys/kernel/mm/ksm/pages_to_scan", "10000"),
        ("/sys/kernel/mm/ksm/run", "1"),
    ] {
        std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    for event in EVENTS {
        for method in [Method::Mirror, Method::Pinned, Method::Readv] {
            println!("stale_{event}_{}={}", method.name(), staleness(event, method));
        }
    }
    latency();
    scans(mib);
    let _ = std::fs::write("/sys/kernel/mm/ksm/run", "0");
}
