//! Mirror benchmarks, side by side in one run, written to BENCHMARKS.md (with a
//! plot in docs/benchmarks/mirror-scan.svg):
//! - attach latency for 1, 16, 64 and 256 GiB sparse sources, two ways: inspector connect to
//!   memslots ready (self-reported), and inspector process start to agent ready (wall clock);
//! - coherence latency: a source ring-3 write until the agent's ring-3 code sees it (negative
//!   TSC deltas are counted and left out, never clamped);
//! - integrity-watch cost (CPU time per second of the inspector and of its agent vCPU) for
//!   1 GiB watched while the source writes 0.1 %, 1 % and 10 % of its pages a second, with the
//!   dirty-log feed and with re-hashing, and the source's slowdown with dirty logging on;
//! - scanning 1 GiB for a pattern: the agent (cold and warm) beside memchr::memmem in a host
//!   process over the same shared pages (the limit), and beside copying the memory out
//!   with process_vm_readv and with /proc/PID/mem, then scanning the copy;
//! - the source guest's slowdown while an inspector scans it, with and without a scan rate limit.
//!
//!   cargo build --release --workspace && cargo bench -p integration-tests --bench mirror

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_images::workload::{HEADER_GPA, NEEDLE, STAMP_GPA};
use integration_tests::bench::{bar_chart_svg, ms, source_hvas, summarize, workspace_root, write_section};
use integration_tests::{binary, require_kvm, unix_request, Running, SourceVm, TempDir};
use mirror_driver::importer::Importer;
use mirror_driver::protocol::Range;

const LIMIT: Duration = Duration::from_secs(300);
const FILL_GPA: u64 = 0x0400_0000;
const GIB: u64 = 1 << 30;
const ATTACH_RUNS: usize = 5;
/// Seconds each watch-cost row is measured over.
const WATCH_SECONDS: u64 = 3;

struct Source {
    vm: Running,
    mirror: PathBuf,
    _dir: TempDir,
}

fn start_source(memory: &str, cpus: &str) -> Source {
    let dir = TempDir::new("bench-source");
    let SourceVm { mut vm, mirror, .. } = SourceVm::spawn(&dir, &["--memory", memory, "--cpus", cpus, "--host-tsc"]);
    vm.expect_line("workload: ready", LIMIT);
    Source { vm, mirror, _dir: dir }
}

struct Inspector {
    proc: Running,
    control: PathBuf,
    attach_ms: f64,
    /// Process start to agent ready, measured here.
    ready: Duration,
    _dir: TempDir,
}

fn start_inspector(source: &Source, args: &[&str]) -> Inspector {
    let dir = TempDir::new("bench-inspector");
    let control = dir.join("control.sock");
    let mut cmd = Command::new(binary("inspector"));
    cmd.args(["--source-socket", source.mirror.to_str().unwrap(), "--control-socket", control.to_str().unwrap()]);
    cmd.args(["--serial", "null"]);
    cmd.args(args);
    let started = Instant::now();
    let mut proc = Running::spawn(&mut cmd);
    let line = proc.expect_line("memslots ready after", LIMIT);
    let attach_ms: f64 = line.rsplit("after ").next().unwrap().trim_end_matches(" ms").parse().unwrap();
    proc.expect_line("inspector: agent ready", LIMIT);
    let ready = started.elapsed();
    Inspector { proc, control, attach_ms, ready, _dir: dir }
}

/// CPU time of one thread (its schedstat: nanoseconds on a CPU).
fn thread_cpu(task: &std::path::Path) -> Duration {
    let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
    Duration::from_nanos(stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// Each thread of a process: its name (`comm`) and CPU time.
fn threads_cpu(pid: u32) -> Vec<(String, Duration)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| task.unwrap().path())
        .map(|task| {
            (std::fs::read_to_string(task.join("comm")).unwrap_or_default().trim().to_string(), thread_cpu(&task))
        })
        .collect()
}

/// CPU time of every thread of a process, and of its agent vCPU thread.
fn cpu_times(pid: u32) -> (Duration, Duration) {
    let threads = threads_cpu(pid);
    (threads.iter().map(|(_, t)| *t).sum(), named(&threads, "vcpu0"))
}

/// CPU time of the threads named `name`.
fn named(threads: &[(String, Duration)], name: &str) -> Duration {
    threads.iter().filter(|(comm, _)| comm == name).map(|(_, t)| *t).sum()
}

impl Inspector {
    fn ask(&self, line: &str) -> String {
        let reply = unix_request(&self.control, line);
        assert!(reply.starts_with("ok"), "{line}: {reply}");
        reply
    }

    fn heartbeat(&self) -> u64 {
        let reply = self.ask(&format!("read {:#x} 8", HEADER_GPA + 24));
        let hex = &reply[3..];
        let bytes: Vec<u8> = (0..16).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        u64::from_le_bytes(bytes.try_into().unwrap())
    }
}

/// The dirty-page feed's cost in the source for each size and KVM mechanism, with a peer
/// subscribed to all of RAM while the workload writes 1000 random pages a second.
fn collection_section(body: &mut String, hz: u64) {
    body.push_str(&format!(
        "\n### Dirty-page collection in the source: KVM's bitmap beside its dirty ring\n\n\
         A peer maps all of a sparse source's RAM and subscribes to the dirty-page feed (collected every \
         20 ms); the workload writes one word of a random page 1000 times a second within 512 MiB. CPU time \
         per second of wall time (schedstat) over {WATCH_SECONDS} s: the source's collector thread and its \
         vCPU thread. The bitmap costs the collector O(RAM) per collection (KVM_GET_DIRTY_LOG copies a bit \
         per page, then KVM_CLEAR_DIRTY_LOG re-protects the pages found); the ring costs O(pages written). \
         Pages reported: distinct pages per second the peer heard of.\n\n\
         | source RAM | mechanism | collector CPU (ms/s) | source vCPU CPU (ms/s) | source (it/s) | pages reported (/s) |\n\
         |---|---|---|---|---|---|\n"
    ));
    let mut bars = Vec::new();
    for (label, memory) in [("1 GiB", "1G"), ("64 GiB", "64G"), ("256 GiB", "256G")] {
        for mode in ["bitmap", "ring"] {
            let dir = TempDir::new("bench-collect");
            let SourceVm { mut vm, mirror, .. } =
                SourceVm::spawn(&dir, &["--memory", memory, "--cpus", "1", "--dirty-log", mode]);
            vm.expect_line("workload: ready", LIMIT);
            let peer = Importer::connect(&mirror).unwrap();
            let grants = peer.grant(&peer.memory_map().unwrap()).unwrap();
            let feed = peer.subscribe_dirty().unwrap();
            let heartbeat_at = HEADER_GPA + 24;
            let header =
                grants.iter().find(|g| g.grant.gpa <= heartbeat_at && heartbeat_at < g.grant.gpa + g.grant.len);
            let header = header.expect("a grant holds the workload header");
            let offset = (heartbeat_at - header.grant.gpa) as usize;
            let heartbeat = || u64::from_le_bytes(header.bytes()[offset..offset + 8].try_into().unwrap());
            let pages = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counted = pages.clone();
            let _reader = peer
                .start_events(move |_, event| {
                    if let mirror_driver::importer::SourceEvent::Dirty { ranges, .. } = event {
                        let n: u64 = ranges.iter().map(|r| r.len / 4096).sum();
                        counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                })
                .unwrap();
            vm.send(&format!("churn {FILL_GPA:#x} {:#x} 1000 {hz}\n", 512u64 << 20));
            vm.expect_line("ack churn", LIMIT);
            std::thread::sleep(Duration::from_secs(1));
            let pid = vm.child.id();
            let sample = || {
                let threads = threads_cpu(pid);
                (named(&threads, "mirror-dirty"), named(&threads, "vcpu0"), heartbeat())
            };
            let ((c0, v0, h0), p0, t0) = (sample(), pages.load(std::sync::atomic::Ordering::Relaxed), Instant::now());
            std::thread::sleep(Duration::from_secs(WATCH_SECONDS));
            let ((c1, v1, h1), p1) = (sample(), pages.load(std::sync::atomic::Ordering::Relaxed));
            let wall = t0.elapsed().as_secs_f64();
            let collector = (c1 - c0).as_secs_f64() * 1e3 / wall;
            let vcpu = (v1 - v0).as_secs_f64() * 1e3 / wall;
            let (it_s, pages_s) = ((h1 - h0) as f64 / wall, (p1 - p0) as f64 / wall);
            let name = feed.mechanism.name();
            body.push_str(&format!("| {label} | {name} | {collector:.2} | {vcpu:.0} | {it_s:.0} | {pages_s:.0} |\n"));
            bars.push((format!("{label}, {mode}"), collector));
            eprintln!("collect {label} {mode}: collector {collector:.2} ms/s vcpu {vcpu:.0} ms/s pages {pages_s:.0}/s");
        }
    }
    let plot = workspace_root().join("docs/benchmarks/mirror-collect.svg");
    std::fs::write(
        &plot,
        bar_chart_svg("Dirty-page collection: source collector CPU ms per second (lower is better)", "ms/s", &bars),
    )
    .unwrap();
    body.push_str("\n![collection cost](docs/benchmarks/mirror-collect.svg)\n");
}

fn tsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Host TSC ticks per nanosecond (the guests read the same TSC: --host-tsc).
fn tsc_per_ns() -> f64 {
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(300));
    (tsc() - c0) as f64 / t0.elapsed().as_nanos() as f64
}

fn needle_hex() -> String {
    NEEDLE.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counts needles in `hay` with the `memchr` crate's memmem, the fastest well-kept
/// substring search (a fair peer: not a first-byte memchr that the data can slow down).
fn memmem_count(hay: &[u8]) -> u64 {
    memchr::memmem::find_iter(hay, &NEEDLE).count() as u64
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn copy_scan(pieces: &[(u64, u64)], mut read: impl FnMut(u64, &mut [u8])) -> (u64, Duration) {
    let mut buf = vec![0u8; 4 << 20];
    let start = Instant::now();
    let mut hits = 0;
    for &(hva, len) in pieces {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            read(hva + done, &mut buf[..n]);
            hits += memmem_count(&buf[..n]);
            done += n as u64;
        }
    }
    (hits, start.elapsed())
}

fn main() {
    require_kvm();
    let mut body = String::from("## Mirror: attach, coherence, scan, source slowdown\n\n");

    // Attach latency.
    body.push_str(
        "### Attach latency (`--all`, sparse sources)\n\n\
         Connect to memslots ready: self-reported by the inspector (mirror connect, grants, fds checked and \
         mapped, memslots added). Process start to agent ready: wall clock here, from spawning the inspector \
         to its agent guest's ready line (VM build and agent boot included; the vmm writes the agent's page \
         tables, which PVM would otherwise build by emulating one store per 2 MiB of window). Each run of \
         adjacent grants is one memslot; the agent VM's own RAM is one more. Most of the remaining time grows \
         with the bytes mirrored: PVM's KVM allocates and zeroes per-page reverse-map arrays for every \
         memslot it adds.\n\n\
         | source RAM | grants (chunks) | agent VM memslots | connect to memslots ready, median (ms) | \
         process start to agent ready, median (ms) | runs |\n|---|---|---|---|---|---|\n",
    );
    let mut attach_bars = Vec::new();
    for (label, memory) in [("1 GiB", "1G"), ("16 GiB", "16G"), ("64 GiB", "64G"), ("256 GiB", "256G")] {
        let source = start_source(memory, "1");
        let (mut connect, mut ready) = (Vec::new(), Vec::new());
        let (mut grants, mut slots) = (String::new(), String::new());
        for _ in 0..ATTACH_RUNS {
            let inspector = start_inspector(&source, &["--all"]);
            let status = inspector.ask("status");
            let field = |name: &str| status.split(name).nth(1).unwrap().split(' ').next().unwrap().to_string();
            (grants, slots) = (field("grants="), field("memslots="));
            connect.push(Duration::from_secs_f64(inspector.attach_ms / 1e3));
            ready.push(inspector.ready);
        }
        let (c, r) = (summarize(&connect), summarize(&ready));
        body.push_str(&format!("| {label} | {grants} | {slots} | {} | {} | {} |\n", ms(c.median), ms(r.median), c.n));
        attach_bars.push((format!("{label}: connect to memslots ready"), c.median.as_secs_f64() * 1e3));
        attach_bars.push((format!("{label}: process start to agent ready"), r.median.as_secs_f64() * 1e3));
        eprintln!("attach {label}: {} ms / {} ms", ms(c.median), ms(r.median));
    }
    let plot = workspace_root().join("docs/benchmarks/mirror-attach.svg");
    std::fs::create_dir_all(plot.parent().unwrap()).unwrap();
    std::fs::write(&plot, bar_chart_svg("Attach latency by source size (ms, lower is better)", "ms", &attach_bars))
        .unwrap();
    body.push_str("\n![attach latency](docs/benchmarks/mirror-attach.svg)\n");

    // Coherence latency, with the source's dirty logging off and on.
    let per_ns = tsc_per_ns();
    let mut source = start_source("1280M", "1");
    let count = 2000;
    body.push_str(&format!(
        "\n### Coherence latency: a source ring-3 write until the agent's ring-3 code sees it\n\n\
         Both guests read the host TSC (`--host-tsc`, KVM_VCPU_TSC_OFFSET = 0); the source publishes a \
         (sequence, TSC) pair every ~20 us, the agent spins on it; {count} stamps, TSC {per_ns:.3} GHz. Samples \
         with a negative TSC delta (the two vCPUs' TSC reads disagree by more than the latency) are counted and \
         left out, not clamped. With the dirty-log feed on, KVM write-protects the source's RAM again after each \
         20 ms collection, so the first write to a page after it takes a fault. The figure moves between runs \
         with where the two vCPU threads land (a shared physical core or not).\n\n\
         | dirty-log feed | samples | negative (left out) | median (ns) | p90 (ns) | p99 (ns) |\n\
         |---|---|---|---|---|---|\n"
    ));
    let ranges = ["--range", "0x1000000:2M", "--range", "0x4000000:1G"];
    let mut inspector = None;
    for (label, extra) in [("off (`--no-dirty-log`)", Some("--no-dirty-log")), ("on", None)] {
        let mut args = ranges.to_vec();
        args.extend(extra);
        let measured = start_inspector(&source, &args);
        let control = measured.control.clone();
        let waiter =
            std::thread::spawn(move || unix_request(&control, &format!("latency {STAMP_GPA:#x} {count} 10000")));
        std::thread::sleep(Duration::from_millis(300));
        source.vm.send(&format!("stamp {}\n", count + 100));
        let reply = waiter.join().unwrap();
        let cycles: Vec<i64> = reply.split("cycles=").nth(1).unwrap().split(',').map(|c| c.parse().unwrap()).collect();
        let negative = cycles.iter().filter(|&&c| c < 0).count();
        let samples: Vec<Duration> =
            cycles.iter().filter(|&&c| c >= 0).map(|&c| Duration::from_nanos((c as f64 / per_ns) as u64)).collect();
        let s = summarize(&samples);
        body.push_str(&format!(
            "| {label} | {} | {negative} | {} | {} | {} |\n",
            cycles.len(),
            s.median.as_nanos(),
            s.p90.as_nanos(),
            s.p99.as_nanos()
        ));
        eprintln!("coherence ({label}): median {} ns", s.median.as_nanos());
        inspector = Some(measured);
    }
    let inspector = inspector.expect("measured");

    // Scan throughput over 1 GiB.
    source.vm.send(&format!("fill {FILL_GPA:#x} {GIB:#x} 7\n"));
    source.vm.expect_line("with 64 needles", LIMIT);
    let scan = format!("scan {FILL_GPA:#x} {GIB:#x} {}", needle_hex());
    let timed = |line: &str| {
        let start = Instant::now();
        let reply = inspector.ask(line);
        (reply, start.elapsed())
    };
    let (reply, agent_cold) = timed(&scan);
    assert!(reply.starts_with("ok hits=64 "), "{reply}");
    let warm: Vec<Duration> = (0..5).map(|_| timed(&scan).1).collect();
    let agent_warm = summarize(&warm).median;

    let importer = Importer::connect(&source.mirror).unwrap();
    let grants = importer.grant(&[Range { gpa: FILL_GPA, len: GIB }]).unwrap();
    let host_scan = || {
        let start = Instant::now();
        let hits: u64 = grants.iter().map(|g| memmem_count(g.bytes())).sum();
        (hits, start.elapsed())
    };
    let (hits, host_cold) = host_scan();
    assert_eq!(hits, 64);
    let host_warm = summarize(&(0..5).map(|_| host_scan().1).collect::<Vec<_>>()).median;

    let pid = source.vm.child.id() as libc::pid_t;
    let pieces = source_hvas(pid, &grants);
    assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), GIB, "the source's mappings cover the scanned range");
    let vm_readv = |hva: u64, buf: &mut [u8]| {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: copies from the source process into our buffer of the same length.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        assert_eq!(n, buf.len() as isize, "process_vm_readv");
    };
    let readv: Vec<(u64, Duration)> = (0..3).map(|_| copy_scan(&pieces, vm_readv)).collect();
    assert!(readv.iter().all(|r| r.0 == 64));
    let readv = summarize(&readv.iter().map(|r| r.1).collect::<Vec<_>>()).median;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let proc_mem: Vec<(u64, Duration)> =
        (0..3).map(|_| copy_scan(&pieces, |hva, buf| mem.read_exact_at(buf, hva).unwrap())).collect();
    assert!(proc_mem.iter().all(|r| r.0 == 64));
    let proc_mem = summarize(&proc_mem.iter().map(|r| r.1).collect::<Vec<_>>()).median;

    let rows = [
        ("agent scan, cold (first touch)", agent_cold),
        ("agent scan, warm", agent_warm),
        ("host memmem over the shared pages, cold", host_cold),
        ("host memmem over the shared pages, warm", host_warm),
        ("copy out with process_vm_readv + memmem", readv),
        ("copy out with /proc/PID/mem + memmem", proc_mem),
    ];
    body.push_str(
        "\n### Finding a 16-byte pattern in 1 GiB of source RAM (64 occurrences, all found by every method)\n\n\
         Agent times are measured at the control socket (request to reply). Warm figures are medians of 5 (copying: 3).\n\n\
         | method | time (ms) | GB/s | vs host memmem (warm) |\n|---|---|---|---|\n",
    );
    for (name, d) in rows {
        body.push_str(&format!(
            "| {name} | {} | {:.2} | {:.2}x |\n",
            ms(d),
            gbps(GIB, d),
            d.as_secs_f64() / host_warm.as_secs_f64()
        ));
    }
    let svg = bar_chart_svg(
        "Scanning 1 GiB of source RAM for a pattern (GB/s, higher is better)",
        "GB/s",
        &rows.iter().map(|(n, d)| (n.to_string(), gbps(GIB, *d))).collect::<Vec<_>>(),
    );
    let plot = workspace_root().join("docs/benchmarks/mirror-scan.svg");
    std::fs::create_dir_all(plot.parent().unwrap()).unwrap();
    std::fs::write(&plot, svg).unwrap();
    body.push_str("\n![scan throughput](docs/benchmarks/mirror-scan.svg)\n");

    // Source slowdown while the agent scans, without and with a scan rate limit.
    let rate = |inspector: &Inspector| {
        let (h0, t0) = (inspector.heartbeat(), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        (inspector.heartbeat() - h0) as f64 / t0.elapsed().as_secs_f64()
    };
    let idle = rate(&inspector);
    let scanning = |inspector: &Inspector| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (control, stop2, scan2) = (inspector.control.clone(), stop.clone(), scan.clone());
        let scanner = std::thread::spawn(move || {
            let mut scans = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(unix_request(&control, &scan2).starts_with("ok hits=64"));
                scans += 1;
            }
            scans
        });
        std::thread::sleep(Duration::from_millis(300));
        let (h0, t0) = (inspector.heartbeat(), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let busy = (inspector.heartbeat() - h0) as f64 / t0.elapsed().as_secs_f64();
        let scanned_gb_s = {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let scans = scanner.join().unwrap();
            scans as f64 * GIB as f64 / 1e9 / (t0.elapsed().as_secs_f64() + 0.3)
        };
        (busy, scanned_gb_s)
    };
    let (busy, unlimited_rate) = scanning(&inspector);
    let mut rows = vec![("no limit".to_string(), busy, unlimited_rate)];
    for mbps in [2000u64, 500] {
        let limited = start_inspector(
            &source,
            &["--range", "0x1000000:2M", "--range", "0x4000000:1G", "--scan-rate-limit", &mbps.to_string()],
        );
        // A fresh inspector's first scan touches every page (seconds under PVM): not the limit.
        assert!(limited.ask(&scan).starts_with("ok hits=64"));
        let (busy, scanned) = scanning(&limited);
        rows.push((format!("`--scan-rate-limit {mbps}` (MB/s)"), busy, scanned));
    }
    body.push_str(
        "\n### Source guest slowdown while an inspector scans it\n\n\
         Workload iterations per second (1 source vCPU), read through the mirror over 2 s, with the agent idle \
         and while it scans 1 GiB back to back; the rate limit has the agent idle between steps.\n\n\
         | scanning | source (it/s) | vs agent idle | scan rate (GB/s) |\n|---|---|---|---|\n",
    );
    body.push_str(&format!("| agent idle | {idle:.0} | 1.000 | - |\n"));
    for (name, busy, scanned) in &rows {
        body.push_str(&format!("| {name} | {busy:.0} | {:.3} | {scanned:.2} |\n", busy / idle));
    }
    drop(inspector);

    // Integrity-watch cost with and without the dirty-log feed, and the source's slowdown
    // with dirty logging on.
    let hz = (per_ns * 1e9) as u64;
    let pages = GIB / 4096;
    body.push_str(&format!(
        "\n### Integrity watch over 1 GiB: cost with the dirty-log feed and with re-hashing\n\n\
         Two polled 512 MiB watches (250 ms interval) over a 1 GiB range in which the source's workload writes \
         one word of a random page at the given rate ({pages} pages in all). CPU time per second of wall time \
         (schedstat), over {WATCH_SECONDS} s: the inspector process without its agent vCPU, and the agent's vCPU \
         thread. Dirty-log rows run with KVM dirty logging on in the source; hash rows with it off. \
         Source speed is the workload's iterations per second during the same window.\n\n\
         | pages written per second | mode | inspector CPU (ms/s) | agent vCPU CPU (ms/s) | source (it/s) |\n\
         |---|---|---|---|---|\n"
    ));
    let mut watch_bars = Vec::new();
    for (label, per_mille) in [("0.1 %", 1u64), ("1 %", 10), ("10 %", 100)] {
        let writes = pages * per_mille / 1000;
        for (mode, extra) in [("dirty-log", None), ("hash", Some("--no-dirty-log"))] {
            let mut args = vec![
                "--range",
                "0x1000000:2M",
                "--range",
                "0x4000000:1G",
                "--watch",
                "0x4000000:512M",
                "--watch",
                "0x24000000:512M",
                "--watch-interval-ms",
                "250",
            ];
            args.extend(extra);
            let mut watcher = start_inspector(&source, &args);
            watcher.proc.expect_line("integrity watch 1 on", LIMIT);
            source.vm.send(&format!("churn {FILL_GPA:#x} {GIB:#x} {writes} {hz}\n"));
            source.vm.expect_line("ack churn", LIMIT);
            std::thread::sleep(Duration::from_secs(1));
            let pid = watcher.proc.child.id();
            let ((p0, v0), h0, t0) = (cpu_times(pid), watcher.heartbeat(), Instant::now());
            std::thread::sleep(Duration::from_secs(WATCH_SECONDS));
            let ((p1, v1), h1) = (cpu_times(pid), watcher.heartbeat());
            let wall = t0.elapsed().as_secs_f64();
            source.vm.send("churn 0 0 0 0\n");
            source.vm.expect_line("ack churn", LIMIT);
            let agent = (v1 - v0).as_secs_f64() * 1e3 / wall;
            let inspector_only = ((p1 - p0).as_secs_f64() - (v1 - v0).as_secs_f64()) * 1e3 / wall;
            let it_s = (h1 - h0) as f64 / wall;
            body.push_str(&format!(
                "| {label} ({writes}/s) | {mode} | {inspector_only:.1} | {agent:.1} | {it_s:.0} |\n"
            ));
            watch_bars.push((format!("{label}, {mode}"), inspector_only + agent));
            eprintln!(
                "watch {label} {mode}: inspector {inspector_only:.1} ms/s agent {agent:.1} ms/s source {it_s:.0}"
            );
        }
    }
    let plot = workspace_root().join("docs/benchmarks/mirror-watch.svg");
    std::fs::write(
        &plot,
        bar_chart_svg("Watching 1 GiB: CPU ms per second, inspector + agent (lower is better)", "ms/s", &watch_bars),
    )
    .unwrap();
    body.push_str("\n![watch cost](docs/benchmarks/mirror-watch.svg)\n");
    // The collection rows start their own sources; this one would compete for the CPUs.
    drop(source);
    collection_section(&mut body, hz);
    let path = write_section("mirror", &body).unwrap();
    println!("{body}\nwritten to {}", path.display());
}
