//! Boot benchmark: `vmm` versus QEMU (`-accel kvm`, `-M microvm` and `-M pc`), side by
//! side in one run:
//! - the `hello` image (QEMU through its PVH note): process start to the first serial
//!   byte, to the guest's first line, and to guest exit;
//! - Debian's cloud kernels, 6.1 (lz4) and 6.12 (zstd), with an initramfs: process start
//!   to the first kernel line ("Linux version") and to the RAMDISK line, through the
//!   `vmm` (which decompresses the bzImage itself, and, for comparison, with the kernel's
//!   own decompressor), QEMU `-M microvm -kernel` (qboot, no BIOS emulation) with the
//!   bzImage and with the vmlinux inside it (PVH; the bench decompresses it with the
//!   vmm's code beforehand), and QEMU `-M pc -kernel` (SeaBIOS) with the bzImage. A
//!   configuration that fails (KVM's instruction emulator cannot run 6.12's zstd
//!   decompressor, BMI2 `shlx`) is reported with its reason, not timed;
//! - each VMM's own memory beside guest RAM while a guest runs.
//!
//! Writes medians, p90s and ratios into BENCHMARKS.md.
//!
//!   cargo build --release --workspace && cargo bench -p integration-tests --bench boot

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::bench::{ms, summarize, write_section, Summary};
use integration_tests::linux_guest::{DEBIAN_12, DEBIAN_13};
use integration_tests::{binary, guest, require_kvm, target_profile_dir, Running};

const RUNS: usize = 15;
/// Runs per Linux row whose boot takes seconds (decompressed by the vmm or beforehand).
const LINUX_FAST_RUNS: usize = 3;
/// Runs per Linux row that runs the kernel's own decompressor (about a minute each on PVM).
const LINUX_SLOW_RUNS: usize = 2;
/// Per-run limit on reaching the RAMDISK line.
const LINUX_RUN_LIMIT: Duration = Duration::from_secs(300);
const LINUX_MEMORY: &str = "512M";
const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";
const GUEST_LINE: &[u8] = b"Hello from Specula guest";

/// Picks one time out of a boot sample.
type Metric = fn(&BootSample) -> Duration;

struct BootSample {
    first_byte: Duration,
    first_guest_line: Duration,
    exit: Duration,
}

/// Runs one boot; returns the three times.
fn boot_once(cmd: &mut Command) -> BootSample {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut first_byte = None;
    let mut first_guest_line = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).expect("read stdout");
        if n == 0 {
            break;
        }
        let now = start.elapsed();
        first_byte.get_or_insert(now);
        seen.extend_from_slice(&buf[..n]);
        if first_guest_line.is_none() && seen.windows(GUEST_LINE.len()).any(|w| w == GUEST_LINE) {
            first_guest_line = Some(now);
        }
    }
    child.wait().expect("wait");
    let exit = start.elapsed();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("hello: exiting with status 0"), "guest did not finish: {text}");
    BootSample { first_byte: first_byte.unwrap(), first_guest_line: first_guest_line.unwrap(), exit }
}

fn vmm_hello() -> Command {
    let mut cmd = Command::new(binary("vmm"));
    cmd.args(["--kernel", guest("hello").to_str().unwrap(), "--memory", "64M", "--cmdline", "exit=0"]);
    cmd
}

fn qemu(machine: &str, image: &str, cmdline: &str, memory_backend: bool) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "kvm",
        "-M",
        machine,
        "-m",
        "64M",
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-display",
        "none",
    ]);
    cmd.args(["-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0x501,iosize=2"]);
    if memory_backend {
        cmd.args(["-object", "memory-backend-memfd,id=m0,size=64M,share=on", "-machine", "memory-backend=m0"]);
    }
    cmd.args(["-kernel", image, "-append", cmdline]);
    cmd
}

/// The VMM process's memory (KiB) while a guest runs: own anonymous and file-backed
/// pages, and guest RAM (shared memfd pages touched).
struct MemorySample {
    anon: u64,
    file: u64,
    shmem: u64,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn memory_while_running(cmd: &mut Command, ready: &str) -> MemorySample {
    let mut vm = Running::spawn(cmd.stderr(Stdio::null()));
    vm.expect_line(ready, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(200));
    let pid = vm.child.id();
    MemorySample {
        anon: status_kib(pid, "RssAnon:"),
        file: status_kib(pid, "RssFile:"),
        shmem: status_kib(pid, "RssShmem:"),
    }
}

fn main() {
    require_kvm();
    let mut body = hello_section();
    body.push_str(&linux_section());
    body.push_str(&memory_section());
    let path = write_section("boot", &body).expect("write BENCHMARKS.md");
    println!("{body}\nwritten to {}", path.display());
}

/// `hello` through the vmm, QEMU microvm and QEMU pc.
fn hello_section() -> String {
    let image = guest("hello");
    let image = image.to_str().unwrap();
    let mut vmm_samples = Vec::new();
    let mut microvm_samples = Vec::new();
    let mut pc_samples = Vec::new();
    for run in 0..RUNS {
        // Interleave so that drift on a noisy host affects all alike.
        vmm_samples.push(boot_once(&mut vmm_hello()));
        microvm_samples.push(boot_once(&mut qemu("microvm", image, "exit=0", false)));
        pc_samples.push(boot_once(&mut qemu("pc", image, "exit=0", false)));
        eprintln!("hello: run {}/{RUNS} done", run + 1);
    }
    let pick =
        |samples: &[BootSample], f: fn(&BootSample) -> Duration| summarize(&samples.iter().map(f).collect::<Vec<_>>());
    let metrics: [(&str, Metric); 3] = [
        ("start to first serial byte", |s| s.first_byte),
        ("start to guest's first line", |s| s.first_guest_line),
        ("start to guest exit", |s| s.exit),
    ];
    let mut body = format!(
        "## Boot: `vmm` vs QEMU (`-accel kvm`), `hello` image, 1 vCPU, 64 MiB\n\n\
         {RUNS} interleaved runs each, measured {} on this host (PVM: no VMX/SVM, guest CPL0 emulated).\n\
         QEMU boots the same ELF through its PVH note: `-M microvm` after qboot (a few real-mode instructions),\n\
         `-M pc` after SeaBIOS, whose real-mode code PVM also emulates (its first serial byte is SeaBIOS output).\n\n\
         | metric | vmm median (ms) | vmm p90 (ms) | QEMU microvm median (ms) | QEMU microvm p90 (ms) | QEMU pc median (ms) | QEMU pc p90 (ms) | vmm / microvm | vmm / pc |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        "2026-12"
    );
    for (name, f) in metrics {
        let (v, m, p) = (pick(&vmm_samples, f), pick(&microvm_samples, f), pick(&pc_samples, f));
        body.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:.3} | {:.4} |\n",
            ms(v.median),
            ms(v.p90),
            ms(m.median),
            ms(m.p90),
            ms(p.median),
            ms(p.p90),
            ratio(v.median, m.median),
            ratio(v.median, p.median)
        ));
    }
    body
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// One way of booting a Linux kernel, and what came of its runs.
struct LinuxRow {
    kernel: &'static str,
    how: String,
    runs: usize,
    command: Box<dyn Fn() -> Command>,
    samples: Vec<LinuxSample>,
    failure: Option<String>,
}

struct LinuxSample {
    banner: Duration,
    ramdisk: Duration,
}

fn linux_file(dir: &str, name: &str) -> PathBuf {
    let path = target_profile_dir().parent().expect("target dir").join("guest-images").join(dir).join(name);
    assert!(path.is_file(), "{} is missing: build the Linux guests with scripts/build.sh", path.display());
    path
}

/// The vmlinux inside `dir`'s bzImage, decompressed with the vmm's own code, in a temp file.
fn extract_vmlinux(dir: &str) -> PathBuf {
    let image = std::fs::read(linux_file(dir, "vmlinuz")).expect("read vmlinuz");
    let bz = vmm::boot::bzimage::parse(&image).expect("bzImage setup header");
    let limit = vmm::boot::MAX_DECOMPRESSED_KERNEL as usize;
    let (_, vmlinux) = vmm::boot::decompress::decompress(bz.payload, limit).expect("decompress the payload");
    let path = std::env::temp_dir().join(format!("specula-bench-{dir}-vmlinux-{}", std::process::id()));
    std::fs::write(&path, vmlinux).expect("write vmlinux");
    path
}

fn vmm_linux(dir: &'static str, decompress: &'static str) -> Box<dyn Fn() -> Command> {
    Box::new(move || {
        let mut cmd = Command::new(binary("vmm"));
        cmd.arg("--kernel").arg(linux_file(dir, "vmlinuz"));
        cmd.arg("--initramfs").arg(linux_file(dir, "initramfs.cpio.gz"));
        cmd.args(["--kernel-decompress", decompress, "--memory", LINUX_MEMORY, "--cmdline", LINUX_CMDLINE]);
        cmd
    })
}

fn qemu_linux(dir: &'static str, machine: &'static str, kernel: PathBuf) -> Box<dyn Fn() -> Command> {
    Box::new(move || {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-M", machine, "-m", LINUX_MEMORY, "-smp", "1", "-nographic", "-nodefaults"]);
        cmd.args(["-display", "none", "-serial", "stdio", "-no-reboot", "-append", LINUX_CMDLINE]);
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(linux_file(dir, "initramfs.cpio.gz"));
        cmd
    })
}

fn linux_rows() -> (Vec<LinuxRow>, Vec<PathBuf>) {
    let mut rows = Vec::new();
    let mut temp = Vec::new();
    for (kernel, dir) in [("6.1", DEBIAN_12), ("6.12", DEBIAN_13)] {
        let bzimage = linux_file(dir, "vmlinuz");
        let vmlinux = extract_vmlinux(dir);
        temp.push(vmlinux.clone());
        let row = |how: &str, runs: usize, command: Box<dyn Fn() -> Command>| LinuxRow {
            kernel,
            how: how.to_string(),
            runs,
            command,
            samples: Vec::new(),
            failure: None,
        };
        rows.push(row("vmm, bzImage decompressed by the vmm (default)", LINUX_FAST_RUNS, vmm_linux(dir, "vmm")));
        rows.push(row(
            "vmm, bzImage, kernel's own decompressor (`--kernel-decompress guest`)",
            LINUX_SLOW_RUNS,
            vmm_linux(dir, "guest"),
        ));
        rows.push(row(
            "QEMU `-M microvm -kernel` vmlinux (PVH; decompressed beforehand)",
            LINUX_FAST_RUNS,
            qemu_linux(dir, "microvm", vmlinux),
        ));
        rows.push(row(
            "QEMU `-M microvm -kernel` bzImage (qboot, kernel's own decompressor)",
            LINUX_SLOW_RUNS,
            qemu_linux(dir, "microvm", bzimage.clone()),
        ));
        rows.push(row(
            "QEMU `-M pc -kernel` bzImage (SeaBIOS, kernel's own decompressor)",
            LINUX_SLOW_RUNS,
            qemu_linux(dir, "pc", bzimage),
        ));
    }
    (rows, temp)
}

/// Debian's 6.1 and 6.12 to their first line and RAMDISK line, every way.
fn linux_section() -> String {
    let (mut rows, temp) = linux_rows();
    let most = rows.iter().map(|r| r.runs).max().unwrap_or(0);
    for run in 0..most {
        // Interleaved: run n of every row before run n+1 of any. A row stops at its first failure.
        for row in rows.iter_mut().filter(|r| run < r.runs && r.failure.is_none()) {
            match linux_boot_once(&mut (row.command)(), LINUX_RUN_LIMIT) {
                Ok(sample) => row.samples.push(sample),
                Err(reason) => row.failure = Some(reason),
            }
            eprintln!("linux {} / {}: run {} done", row.kernel, row.how, run + 1);
        }
    }
    for path in temp {
        let _ = std::fs::remove_file(path);
    }
    linux_table(&rows)
}

fn linux_table(rows: &[LinuxRow]) -> String {
    let mut body = format!(
        "\n## Boot: Debian's cloud kernels to their first lines, `vmm` vs QEMU (`-accel kvm`)\n\n\
         Process start to the kernel's first line (`Linux version`) and to its `RAMDISK:` line; 1 vCPU, {LINUX_MEMORY}iB,\n\
         the Linux guests' `initramfs.cpio.gz`, `{LINUX_CMDLINE}`. 6.1's payload is lz4, 6.12's zstd.\n\
         Up to {LINUX_FAST_RUNS} runs per fast row and {LINUX_SLOW_RUNS} per row that runs the kernel's own decompressor\n\
         (under PVM's instruction emulator), interleaved, {}s limit per run; a row stops at its first failure.\n\
         The last column is the vmm's default path's median to the RAMDISK line over this row's.\n\n\
         | kernel | how | runs ok | to first line median (ms) | p90 (ms) | to RAMDISK median (ms) | p90 (ms) | vmm / this (RAMDISK) |\n\
         |---|---|---|---|---|---|---|---|\n",
        LINUX_RUN_LIMIT.as_secs()
    );
    for row in rows {
        let reference = rows
            .iter()
            .find(|r| r.kernel == row.kernel && !r.samples.is_empty() && r.how.contains("(default)"))
            .map(|r| ramdisk_summary(r).median);
        if row.samples.is_empty() {
            let why = row.failure.as_deref().unwrap_or("no run");
            body.push_str(&format!("| {} | {} | 0 | failed: {why} | | | | |\n", row.kernel, row.how));
            continue;
        }
        let banner = summarize(&row.samples.iter().map(|s| s.banner).collect::<Vec<_>>());
        let ramdisk = ramdisk_summary(row);
        let vs = reference.map_or("".to_string(), |r| format!("{:.4}", ratio(r, ramdisk.median)));
        let failed = row.failure.as_deref().map_or(String::new(), |why| format!(" (then failed: {why})"));
        body.push_str(&format!(
            "| {} | {} | {}{failed} | {} | {} | {} | {} | {vs} |\n",
            row.kernel,
            row.how,
            row.samples.len(),
            ms(banner.median),
            ms(banner.p90),
            ms(ramdisk.median),
            ms(ramdisk.p90),
        ));
    }
    body
}

fn ramdisk_summary(row: &LinuxRow) -> Summary {
    summarize(&row.samples.iter().map(|s| s.ramdisk).collect::<Vec<_>>())
}

/// A line of the child's stdout (serial console) or stderr (the VMM's own messages).
enum Output {
    Stdout(String),
    Stderr(String),
}

fn forward_lines<R: Read + Send + 'static>(reader: R, tx: mpsc::Sender<Output>, wrap: fn(String) -> Output) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if tx.send(wrap(text)).is_err() {
                break;
            }
        }
    });
}

/// Boots once until the RAMDISK line; the error says why it did not get there.
fn linux_boot_once(cmd: &mut Command, limit: Duration) -> Result<LinuxSample, String> {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (tx, rx) = mpsc::channel();
    forward_lines(child.stdout.take().expect("stdout"), tx.clone(), Output::Stdout);
    forward_lines(child.stderr.take().expect("stderr"), tx, Output::Stderr);
    let result = watch_linux_boot(&rx, start, limit);
    stop(&mut child);
    result
}

fn watch_linux_boot(rx: &mpsc::Receiver<Output>, start: Instant, limit: Duration) -> Result<LinuxSample, String> {
    let mut banner = None;
    let mut last_serial = String::new();
    let mut error: Option<String> = None;
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Output::Stdout(line)) => {
                if banner.is_none() && line.contains("Linux version ") {
                    banner = Some(start.elapsed());
                }
                if line.contains("RAMDISK: [mem ") {
                    let banner = banner.ok_or("RAMDISK line before any banner")?;
                    return Ok(LinuxSample { banner, ramdisk: start.elapsed() });
                }
                if !line.trim().is_empty() {
                    last_serial = line;
                }
            }
            Ok(Output::Stderr(line)) => {
                let fatal = ["internal error", "emulation fail", "crashed", "error:", "Error"];
                if error.is_none() && fatal.iter().any(|f| line.contains(f)) {
                    error = Some(line.trim().to_string());
                }
                // QEMU prints the faulting code bytes and then waits, paused: stop there.
                if line.starts_with("Code=") {
                    let code = line
                        .split('<')
                        .nth(1)
                        .map(|c| c.replace('>', "").split_whitespace().take(5).collect::<Vec<_>>().join(" "));
                    let what = error.take().unwrap_or_else(|| "KVM internal error".into());
                    return Err(format!("{what}; instruction bytes {}", code.unwrap_or_default()));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("no RAMDISK line within {limit:?} (last serial line: {last_serial:?})"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let why = error.unwrap_or_else(|| format!("exited; last serial line {last_serial:?}"));
                return Err(format!("no RAMDISK line: {why}"));
            }
        }
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Each VMM's own memory while `source-workload` runs.
fn memory_section() -> String {
    let workload = guest("source-workload");
    let mut vmm_mem = Command::new(binary("vmm"));
    vmm_mem.args(["--kernel", workload.to_str().unwrap(), "--memory", "64M"]);
    let vm = memory_while_running(&mut vmm_mem, "workload: ready");
    let mut qemu_mem = qemu("pc", workload.to_str().unwrap(), "iterations=0", true);
    let qm = memory_while_running(&mut qemu_mem, "workload: ready");
    format!(
        "\n## Process memory while `source-workload` runs (64 MiB guest, RAM in a shared memfd for both; QEMU `-M pc`)\n\n\
         | process | own anonymous (KiB) | own file-backed (KiB) | guest RAM touched (KiB) |\n|---|---|---|---|\n\
         | vmm | {} | {} | {} |\n| QEMU | {} | {} | {} |\n\n\
         \"Guest RAM touched\" counts the memfd pages mapped in the process's own page tables (RssShmem); \
         pages the guest touches through KVM do not appear there. vmm's own anonymous memory is {:.3}x QEMU's.\n",
        vm.anon,
        vm.file,
        vm.shmem,
        qm.anon,
        qm.file,
        qm.shmem,
        vm.anon as f64 / qm.anon as f64
    )
}
