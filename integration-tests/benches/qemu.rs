//! Inspecting an unmodified QEMU guest, side by side in one run, written to BENCHMARKS.md:
//! - attach latency to a QEMU guest with 1 GiB and 16 GiB of memfd RAM: inspector start
//!   to memslots ready (self-reported) and process start to agent ready (wall clock);
//! - finding a 16-byte pattern in 1 GiB of guest RAM: the agent over its zero-copy window,
//!   beside this bench's own loops (neither memflow, drgn nor LibVMI is run): copying the
//!   RAM out of QEMU's address space with `process_vm_readv` (the copy memflow-qemu and
//!   drgn's QEMU support make) and scanning the copy with the `memchr` crate's memmem,
//!   and reading it through QMP `xp` (the access LibVMI's QMP driver makes);
//! - reading 1 GiB through the inspector's control socket (1 MiB hex replies).
//!
//! QEMU runs stopped (`-S`): the bench writes the 1 GiB of test data into the guest's RAM
//! file itself before measuring.
//!
//!   cargo build --release --workspace && cargo bench -p integration-tests --bench qemu

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::bench::{mappings, ms, summarize, write_section};
use integration_tests::linux_guest::StoppedQemu;
use integration_tests::{binary, require_kvm, unix_request, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(300);
const GIB: u64 = 1 << 30;
const DATA_GPA: u64 = 0x1000_0000;
const NEEDLE: &[u8; 16] = b"QEMU-BENCH-NEEDL";
const NEEDLES: u64 = 64;
const XP_SAMPLE: u64 = 16 << 20;

struct Qemu {
    process: StoppedQemu,
    _dir: TempDir,
}

impl std::ops::Deref for Qemu {
    type Target = StoppedQemu;
    fn deref(&self) -> &StoppedQemu {
        &self.process
    }
}

fn start_qemu(size: &str) -> Qemu {
    let dir = TempDir::new("bench-qemu");
    let args = StoppedQemu::memfd_ram(size, "pc");
    let process = StoppedQemu::start(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    Qemu { process, _dir: dir }
}

struct Inspector {
    _proc: Running,
    control: PathBuf,
    attach_ms: f64,
    ready: Duration,
    _dir: TempDir,
}

fn start_inspector(qemu: &Qemu) -> Inspector {
    let dir = TempDir::new("bench-qemu-inspector");
    let control = dir.join("control.sock");
    let started = Instant::now();
    let mut proc = Running::spawn(Command::new(binary("inspector")).args([
        "--qemu-qmp",
        qemu.qmp.to_str().unwrap(),
        "--all",
        "--serial",
        "null",
        "--control-socket",
        control.to_str().unwrap(),
    ]));
    let line = proc.expect_line("memslots ready after", LIMIT);
    let attach_ms: f64 = line.rsplit("after ").next().unwrap().trim_end_matches(" ms").parse().unwrap();
    proc.expect_line("inspector: agent ready", LIMIT);
    Inspector { _proc: proc, control, attach_ms, ready: started.elapsed(), _dir: dir }
}

impl Inspector {
    fn ask(&self, line: &str) -> String {
        let reply = unix_request(&self.control, line);
        assert!(reply.starts_with("ok"), "{line}: {reply}");
        reply
    }
}

/// QEMU's RAM file and where QEMU maps it.
fn qemu_ram(pid: u32) -> (std::fs::File, u64) {
    // The QMP socket exists before QEMU's machine init has mapped the RAM: wait for it.
    let deadline = Instant::now() + LIMIT;
    let map = loop {
        let found = mappings(&pid.to_string())
            .into_iter()
            .find(|m| m.path.starts_with("/memfd:memory-backend-memfd") && m.offset == 0);
        match found {
            Some(map) => break map,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => panic!("QEMU (pid {pid}) did not map its RAM memfd within {LIMIT:?}"),
        }
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:memory-backend-memfd") {
            // The bench's own set-up writes the test data: read-write, as root.
            let file = std::fs::OpenOptions::new().read(true).write(true).open(entry.path()).unwrap();
            return (file, map.start);
        }
    }
    panic!("QEMU holds no RAM memfd");
}

/// Fills `len` bytes at `offset` with xorshift bytes and NEEDLES needles, 16 MiB apart.
fn fill(file: &std::fs::File, offset: u64, len: u64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 16 << 20];
    for (i, at) in (offset..offset + len).step_by(chunk.len()).enumerate() {
        for b in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        if (i as u64) < NEEDLES {
            chunk[4096 + 7..4096 + 7 + NEEDLE.len()].copy_from_slice(NEEDLE);
        }
        file.write_all_at(&chunk, at).unwrap();
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn count(hay: &[u8], finder: &memchr::memmem::Finder) -> u64 {
    finder.find_iter(hay).count() as u64
}

fn main() {
    require_kvm();
    let mut body = String::from("## Inspecting an unmodified QEMU guest\n\n");
    body.push_str(
        "### Attach latency to QEMU (`--qemu-qmp`, `--all`, memfd RAM, pc machine)\n\n\
         | guest RAM | connect to memslots ready (ms) | process start to agent ready (ms) | runs |\n|---|---|---|---|\n",
    );
    for (label, size) in [("1 GiB", "1G"), ("16 GiB", "16G")] {
        let qemu = start_qemu(size);
        let (mut attach, mut ready) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let inspector = start_inspector(&qemu);
            attach.push(Duration::from_secs_f64(inspector.attach_ms / 1e3));
            ready.push(inspector.ready);
        }
        let (a, r) = (summarize(&attach), summarize(&ready));
        body.push_str(&format!("| {label} | {} | {} | {} |\n", ms(a.median), ms(r.median), a.n));
        eprintln!("attach {label}: {} ms, ready {} ms", ms(a.median), ms(r.median));
    }

    let qemu = start_qemu("2G");
    let pid = qemu.child.id();
    let (ram, hva) = qemu_ram(pid);
    fill(&ram, DATA_GPA, GIB);
    // QMP `xp`: 512 words (4 KiB) per command, over a 16 MiB sample of the same data, before the
    // inspector takes QEMU's one QMP connection.
    let xp = || {
        let qmp = specula_qemu::Qmp::connect(&qemu.qmp).expect("a second QMP session");
        let start = Instant::now();
        let mut bytes = Vec::with_capacity(XP_SAMPLE as usize);
        for page in 0..XP_SAMPLE / 4096 {
            let text = qmp.hmp(&format!("xp /512gx {:#x}", DATA_GPA + page * 4096)).unwrap();
            bytes.extend(specula_qemu::hmp::parse_xp(&text, 512).unwrap());
        }
        let elapsed = start.elapsed();
        let mut expected = vec![0u8; XP_SAMPLE as usize];
        ram.read_exact_at(&mut expected, DATA_GPA).unwrap();
        assert!(bytes == expected, "xp reads what the guest holds");
        elapsed
    };
    let xp_sample = xp();
    let xp_gbps = gbps(XP_SAMPLE, xp_sample);
    let inspector = start_inspector(&qemu);
    let finder = memchr::memmem::Finder::new(NEEDLE);
    let hex: String = NEEDLE.iter().map(|b| format!("{b:02x}")).collect();
    let scan = format!("scan {DATA_GPA:#x} {GIB:#x} {hex}");
    let timed = |f: &mut dyn FnMut() -> u64| {
        let start = Instant::now();
        let hits = f();
        assert_eq!(hits, NEEDLES, "every method finds every needle");
        start.elapsed()
    };
    let agent = |_: ()| {
        let reply = inspector.ask(&scan);
        reply.split("hits=").nth(1).unwrap().split(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let agent_cold = timed(&mut || agent(()));
    let agent_warm = summarize(&(0..5).map(|_| timed(&mut || agent(()))).collect::<Vec<_>>()).median;

    let vm_readv = || {
        let mut buf = vec![0u8; 16 << 20];
        let mut hits = 0;
        let mut done = 0;
        while done < GIB {
            let n = (GIB - done).min(buf.len() as u64) as usize;
            let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n };
            let remote = libc::iovec { iov_base: (hva + DATA_GPA + done) as *mut libc::c_void, iov_len: n };
            // SAFETY: copies from QEMU's address space into our buffer of at least n bytes.
            let got = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
            assert_eq!(got, n as isize, "process_vm_readv");
            hits += count(&buf[..n], &finder);
            done += n as u64;
        }
        // Needles sit 4 KiB into each 16 MiB block: none straddles two copies.
        hits
    };
    let readv = summarize(&(0..3).map(|_| timed(&mut || vm_readv())).collect::<Vec<_>>()).median;

    let read_all = || {
        let start = Instant::now();
        for mib in 0..GIB >> 20 {
            let reply = inspector.ask(&format!("read {:#x} 1048576", DATA_GPA + (mib << 20)));
            assert_eq!(reply.len(), 3 + (2 << 20));
        }
        start.elapsed()
    };
    let control_read = read_all();

    body.push_str(&format!(
        "\n### Finding a 16-byte pattern in 1 GiB of QEMU guest RAM ({NEEDLES} occurrences, all found by every method)\n\n\
         | method | time (ms) | GB/s | vs agent (warm) |\n|---|---|---|---|\n"
    ));
    let rows = [
        ("agent scan over the zero-copy window, cold".to_string(), agent_cold),
        ("agent scan over the zero-copy window, warm".to_string(), agent_warm),
        (
            "this bench's own loop: process_vm_readv from QEMU, 16 MiB at a time, + memchr::memmem \
             (the copy memflow-qemu and drgn's QEMU support make; neither was run)"
                .to_string(),
            readv,
        ),
    ];
    for (name, d) in &rows {
        body.push_str(&format!(
            "| {name} | {} | {:.2} | {:.2}x |\n",
            ms(*d),
            gbps(GIB, *d),
            d.as_secs_f64() / agent_warm.as_secs_f64()
        ));
    }
    let xp_time = Duration::from_secs_f64(GIB as f64 / (xp_gbps * 1e9));
    body.push_str(&format!(
        "| this bench's own loop of QMP `xp` reads, 4 KiB per command (the access LibVMI's QMP driver makes; \
         LibVMI was not run), measured on 16 MiB: {} ms | {} (1 GiB, extrapolated) | {:.4} | {:.0}x |\n",
        ms(xp_sample),
        ms(xp_time),
        xp_gbps,
        xp_time.as_secs_f64() / agent_warm.as_secs_f64()
    ));
    body.push_str(&format!(
        "\nReading the same 1 GiB through the inspector's control socket (1 MiB per request, hex-encoded \
         replies): {} ms, {:.2} GB/s.\n",
        ms(control_read),
        gbps(GIB, control_read)
    ));
    let path = write_section("qemu", &body).unwrap();
    println!("{body}\nwritten to {}", path.display());
}
