//! The inspector's API and OS views, measured through the real API socket, written to
//! BENCHMARKS.md:
//! - request latency (p50, p99) for a small read and for a process listing;
//! - bulk read throughput (GB/s) of 1 GiB streamed through the API, beside the agent's
//!   own scan rate over the same memory;
//! - OS views of a live Linux guest under QEMU: discovery (VMCOREINFO to BTF ready),
//!   process listing and module listing, request to reply; every rootkit check;
//! - Volatility 3's `linux.pslist` through the `specula://` layer beside Specula's own
//!   process view, on the same guest in the same run.
//!
//!   cargo build --release --workspace && cargo bench -p integration-tests --bench api

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::bench::{ms, summarize, write_section};
use integration_tests::linux_guest::LinuxGuest;
use integration_tests::{binary, python_tool, require_kvm, volatility, workspace_root, Running, SourceVm, TempDir};

const LIMIT: Duration = Duration::from_secs(300);
const GIB: u64 = 1 << 30;

/// One request; returns (status, body length) after reading the whole reply.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, usize) {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reply = Vec::with_capacity(1 << 16);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n.min(1 << 16)]);
    }
    let status = std::str::from_utf8(&reply[9..12]).unwrap().parse().unwrap();
    (status, reply.len())
}

/// Streams a body and returns its length (the bytes are counted, not kept).
fn stream_len(socket: &Path, path: &str) -> u64 {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

fn timed(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn inspector(args: &[&str], dir: &TempDir) -> (Running, PathBuf) {
    let api = dir.join("api.sock");
    let mut proc = Running::spawn(Command::new(binary("inspector")).args(args).args([
        "--serial",
        "null",
        "--api-socket",
        api.to_str().unwrap(),
    ]));
    proc.expect_line("inspector: agent ready", LIMIT);
    (proc, api)
}

fn main() {
    require_kvm();
    let mut body = String::from("## API and OS views\n\n");
    let dir = TempDir::new("bench-api");
    let SourceVm { vm: mut source, mirror, .. } = SourceVm::spawn(&dir, &["--memory", "1280M", "--serial", "null"]);
    let _ = &mut source;
    std::thread::sleep(Duration::from_millis(500));
    let (source_inspector, api) = inspector(&["--source-socket", mirror.to_str().unwrap(), "--all"], &dir);

    let small =
        timed(500, || assert_eq!(request(&api, "GET", "/v1/memory/physical/hex?gpa=0x1000000&len=64", "").0, 200));
    let small = summarize(&small);
    let start = Instant::now();
    let got = stream_len(&api, &format!("/v1/memory/physical?gpa=0x4000000&len={GIB}"));
    let read = start.elapsed();
    assert!(got > GIB);
    let scan_body = format!(r#"{{"gpa": "0x4000000", "len": "{GIB}", "pattern": "53504543554c41"}}"#);
    request(&api, "POST", "/v1/scan", &scan_body); // warm
    let scans = summarize(&timed(5, || assert_eq!(request(&api, "POST", "/v1/scan", &scan_body).0, 200)));
    let gbps = |d: Duration| GIB as f64 / d.as_secs_f64() / 1e9;
    let (yara_api, yara_cli, yara_bytes, yara_matches) = yara_side_by_side(&api, &dir);
    body.push_str(&format!(
        "Through the real API socket (HTTP/1.1, a new connection per request), a Specula source with 1.25 GiB.\n\n\
         | request | p50 (ms) | p99 (ms) | runs |\n|---|---|---|---|\n\
         | `GET /v1/memory/physical/hex` (64 bytes) | {} | {} | {} |\n",
        ms(small.median),
        ms(small.p99),
        small.n
    ));

    // The Specula source's workload keeps a vCPU busy: stop it and its inspector so
    // that the Linux rows below compete with nothing but the guest they measure.
    drop(source_inspector);
    drop(source);

    // A live Linux guest under QEMU: OS views computed in the agent.
    let guest = LinuxGuest::shared();
    let qdir = TempDir::new("bench-api-linux");
    let (_linux_inspector, linux_api) =
        inspector(&["--qemu-qmp", guest.qmp_socket().to_str().unwrap(), "--all"], &qdir);
    let discover = timed(5, || assert_eq!(request(&linux_api, "POST", "/v1/os/discover", "").0, 200));
    // About 200 processes, as the issue asks: 150 more sleeps beside the workload's.
    guest.console(
        "i=0; while [ $i -lt 150 ]; do sleep 1000000 & i=$((i+1)); done; echo started",
        Duration::from_secs(60),
    );
    let processes = summarize(&timed(100, || assert_eq!(request(&linux_api, "GET", "/v1/os/processes", "").0, 200)));
    // The same listing by the same library in this process, over the guest's memfd: what
    // the walk itself costs with warm caches, without the agent, the daemon or HTTP.
    let ram = guest.map_ram();
    let mem = specula_os::SliceMem::new(vec![(0, ram[0].as_slice())]);
    let library = specula_os::Linux::discover(&mem).expect("host-side discovery of the guest kernel");
    let in_process = summarize(&timed(100, || assert!(library.processes().expect("host-side listing").len() > 150)));
    let modules = summarize(&timed(100, || assert_eq!(request(&linux_api, "GET", "/v1/os/modules", "").0, 200)));
    let checks = summarize(&timed(20, || assert_eq!(request(&linux_api, "GET", "/v1/os/checks", "").0, 200)));
    let check_one = |name: &str| {
        let path = format!("/v1/os/checks?only={name}");
        summarize(&timed(20, || assert_eq!(request(&linux_api, "GET", &path, "").0, 200)))
    };
    let per_check: Vec<(&str, _)> = ["processes", "modules", "syscalls", "interrupts", "kernel_text", "msrs"]
        .into_iter()
        .map(|c| (c, check_one(c)))
        .collect();
    let count = {
        let mut s = UnixStream::connect(&linux_api).unwrap();
        write!(s, "GET /v1/os/processes HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.matches("\"pid\":").count()
    };
    let discover = summarize(&discover);
    body.push_str(&format!(
        "| `GET /v1/os/processes` ({count} processes, Linux 6.1 under QEMU TCG) | {} | {} | {} |\n\
         | `GET /v1/os/modules` | {} | {} | {} |\n\
         | `POST /v1/os/discover` (VMCOREINFO scan of 512 MiB, kallsyms, BTF, kernel text hashes) | {} | {} | {} |\n\
         | `GET /v1/os/checks` (every check that reads guest memory; `msrs` below pauses the guest for a device-state snapshot) | {} | {} | {} |\n",
        ms(processes.median),
        ms(processes.p99),
        processes.n,
        ms(modules.median),
        ms(modules.p99),
        modules.n,
        ms(discover.median),
        ms(discover.p99),
        discover.n,
        ms(checks.median),
        ms(checks.p99),
        checks.n
    ));
    for (name, c) in &per_check {
        body.push_str(&format!("| `GET /v1/os/checks?only={name}` | {} | {} | {} |\n", ms(c.median), ms(c.p99), c.n));
    }
    let (isf_first, vol_runs, dump_time, dump_runs) = volatility_pslist(&linux_api);
    let vol = summarize(&vol_runs);
    let vol_dump = summarize(&dump_runs);
    body.push_str(&format!(
        "\nThe same process list, three ways, on this guest ({count} processes):\n\n\
         | tool | median (ms) | runs |\n|---|---|---|\n\
         | Specula's process view (`GET /v1/os/processes`, computed in the agent) | {} | {} |\n\
         | the library alone: `specula_os::Linux::processes` in the bench process over the guest's memfd, back to back (no agent, no HTTP) | {} | {} |\n\
         | Volatility 3 ({}) `linux.pslist` through `specula://` (process start to exit, symbol table cached) | {} | {} |\n\
         | the same, first run: `specula isf` builds the table from BTF and kallsyms | {} | 1 |\n\
         | Volatility 3 on a `specula dump` ELF core (the dump itself: {} ms, the guest paused) | {} | {} |\n",
        ms(processes.median),
        processes.n,
        ms(in_process.median),
        in_process.n,
        volatility_version(),
        ms(vol.median),
        vol.n,
        ms(isf_first),
        ms(dump_time),
        ms(vol_dump.median),
        vol_dump.n
    ));
    body.push_str(&format!(
        "\nThe OS views are recomputed from guest memory on every request (no cache): a process listing walks \
         the task list, each process's cred and mm, and reads every command line through that process's page tables. \
         That is about ten structures per process that a request finds out of cache, so a listing is bound by memory \
         latency (which nested virtualization and PVM's shadow paging raise on this runner); the agent requests them \
         in batches so their misses overlap. The library row above is the same walk run back to back in one process.\n\n\
         | 1 GiB of source RAM | time (ms) | GB/s |\n|---|---|---|\n\
         | streamed through `GET /v1/memory/physical` (8 MiB copies from the inspector's read-only mappings, HTTP body) | {} | {:.2} |\n\
         | scanned by the agent (`POST /v1/scan`, median of 5) | {} | {:.2} |\n",
        ms(read),
        gbps(read),
        ms(scans.median),
        gbps(scans.median)
    ));
    let rate = |d: Duration| yara_bytes as f64 / d.as_secs_f64() / 1e9;
    body.push_str(&format!(
        "\nYARA, one rule with one 7-byte string (\"SPECULA\"), over all {:.2} GiB of the same source's RAM:\n\n\
         | scanner | time (ms) | GB/s |\n|---|---|---|\n\
         | `POST /v1/yara` (libyara {} in the inspector, 64 MiB pieces copied from its read-only mappings) | {} | {:.2} |\n\
         | `yara` {} command-line tool (Debian) on a `specula dump` ELF core of that memory (file in the page cache) | {} | {:.2} |\n\n\
         Both found the same {yara_matches} matches (the same guest-physical addresses).\n",
        yara_bytes as f64 / GIB as f64,
        libyara_version(),
        ms(yara_api),
        rate(yara_api),
        yara_cli_version(),
        ms(yara_cli),
        rate(yara_cli)
    ));
    let path = write_section("api", &body).unwrap();
    println!("{body}\nwritten to {}", path.display());
}

/// Runs the pinned Volatility 3's `linux.pslist` through the `specula://` layer: the
/// first run (which builds the symbol table), then three timed runs; then `specula
/// dump` and three runs on the dump. Returns (first, live runs, dump, dump runs).
fn volatility_pslist(api: &Path) -> (Duration, Vec<Duration>, Duration, Vec<Duration>) {
    let cache = TempDir::new("bench-volatility");
    let run = |location: &str| {
        let started = Instant::now();
        let out = volatility(location, &cache.0).arg("linux.pslist").output().unwrap();
        assert!(out.status.success(), "vol: {}", String::from_utf8_lossy(&out.stderr));
        started.elapsed()
    };
    let live = format!("specula://{}", api.display());
    let first = run(&live);
    let runs = (0..3).map(|_| run(&live)).collect();
    let core = cache.join("guest.core");
    let started = Instant::now();
    let out = Command::new(binary("specula")).arg("--socket").arg(api).arg("dump").arg(&core).output().unwrap();
    assert!(out.status.success(), "specula dump: {}", String::from_utf8_lossy(&out.stderr));
    let dump = started.elapsed();
    let on_dump = (0..3).map(|_| run(core.to_str().unwrap())).collect();
    (first, runs, dump, on_dump)
}

/// YARA over all of the source's RAM through the API, beside the `yara` command-line
/// tool on a dump of the same memory, after checking that the two found the same
/// matches. Returns (API scan, CLI scan, bytes scanned, matches).
fn yara_side_by_side(api: &Path, dir: &TempDir) -> (Duration, Duration, u64, usize) {
    let rules = r#"rule specula { strings: $s = "SPECULA" condition: $s }"#;
    let body = serde_json::json!({ "rules": rules, "target": "physical" }).to_string();
    // The warm-up run's matches, as guest-physical addresses.
    let report: serde_json::Value = serde_json::from_str(&request_body(api, "POST", "/v1/yara", &body)).unwrap();
    assert_eq!(report["truncated"], false, "too many matches to compare: {}", report["scanned_bytes"]);
    let api_matches: BTreeSet<u64> = report["matches"]
        .as_array()
        .expect("a YARA report")
        .iter()
        .map(|m| m["gpa"].as_u64().unwrap_or_else(|| panic!("a physical match: {m}")))
        .collect();
    let through_api = summarize(&timed(3, || assert_eq!(request(api, "POST", "/v1/yara", &body).0, 200))).median;
    let core = dir.join("source.core");
    let out = Command::new(binary("specula")).arg("--socket").arg(api).arg("dump").arg(&core).output().unwrap();
    assert!(out.status.success(), "specula dump: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::metadata(&core).unwrap().len();
    let file = dir.join("rules.yar");
    std::fs::write(&file, rules).unwrap();
    let yara = || {
        let out = Command::new("yara").arg(&file).arg(&core).output().expect("the yara command (Debian package yara)");
        assert!(out.status.success(), "yara: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The warm-up run (the dump into the page cache) prints its matches (`-s`): file
    // offsets, placed in guest-physical memory by the core's PT_LOAD headers. A match
    // outside them (the core's own notes name SPECULA) is not guest memory.
    let out = Command::new("yara").arg("-s").arg(&file).arg(&core).output().expect("the yara command");
    assert!(out.status.success(), "yara -s: {}", String::from_utf8_lossy(&out.stderr));
    let loads = elf_loads(&core);
    let cli_matches: BTreeSet<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("0x")?.split_once(':').map(|(offset, _)| offset.to_string()))
        .map(|offset| u64::from_str_radix(&offset, 16).unwrap())
        .filter_map(|offset| {
            loads.iter().find(|(at, _, len)| (*at..at + len).contains(&offset)).map(|(at, gpa, _)| gpa + (offset - at))
        })
        .collect();
    assert!(!api_matches.is_empty(), "the rule matches somewhere in the source's RAM");
    assert!(
        api_matches == cli_matches,
        "the API and the yara command found different matches: only the API {:x?}, only the CLI {:x?}",
        api_matches.difference(&cli_matches).collect::<Vec<_>>(),
        cli_matches.difference(&api_matches).collect::<Vec<_>>()
    );
    let cli = summarize(&timed(3, yara)).median;
    let _ = std::fs::remove_file(&core);
    (through_api, cli, bytes, api_matches.len())
}

/// An ELF core's PT_LOAD segments: (file offset, guest-physical address, length).
fn elf_loads(core: &Path) -> Vec<(u64, u64, u64)> {
    let mut file = std::fs::File::open(core).unwrap();
    let mut ehdr = [0u8; 64];
    file.read_exact(&mut ehdr).unwrap();
    assert_eq!(&ehdr[..4], b"\x7fELF", "an ELF core");
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 0x20), u16_at(&ehdr, 0x36) as usize, u16_at(&ehdr, 0x38) as usize);
    let mut phdrs = vec![0u8; phentsize * phnum];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut phdrs, phoff).unwrap();
    phdrs
        .chunks(phentsize)
        .filter(|p| u32::from_le_bytes(p[..4].try_into().unwrap()) == 1)
        .map(|p| (u64_at(p, 8), u64_at(p, 24), u64_at(p, 32)))
        .collect()
}

/// The whole body of one request's reply (status 200 asserted).
fn request_body(socket: &Path, method: &str, path: &str, body: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply).to_string();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{method} {path}: {reply}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {head}");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    }
}

/// A chunked HTTP body's data.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The first line a tool prints, or `what` and why not.
fn first_line(command: &mut Command, what: &str) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string()
}

/// The pinned Volatility 3's version, from the package itself.
fn volatility_version() -> String {
    let script = "import volatility3.framework.constants as c; print(c.PACKAGE_VERSION)";
    first_line(Command::new(python_tool("python")).args(["-c", script]), "volatility3's PACKAGE_VERSION")
}

/// The `yara` command's own `--version`.
fn yara_cli_version() -> String {
    first_line(Command::new("yara").arg("--version"), "yara --version")
}

/// The libyara the inspector links: the version in the headers of the vendored source
/// its `yara-sys` dependency compiled (found with `cargo metadata`).
fn libyara_version() -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--manifest-path"])
        .arg(workspace_root().join("inspector/Cargo.toml"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "yara-sys")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("the inspector depends on yara-sys");
    let header = Path::new(manifest).parent().unwrap().join("yara/libyara/include/yara/libyara.h");
    let text = std::fs::read_to_string(&header).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
    let part = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} not in {}", header.display()))
            .trim()
            .to_string()
    };
    format!("{}.{}.{}", part("YR_MAJOR_VERSION"), part("YR_MINOR_VERSION"), part("YR_MICRO_VERSION"))
}
