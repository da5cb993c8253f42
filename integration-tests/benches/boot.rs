//! Boot benchmark: `vmm` versus QEMU (`-accel kvm`), side by side in one run,
//! booting the same `hello` image (QEMU through its PVH note):
//! process start to the first serial byte, to the guest's first line, and to
//! guest exit; plus each VMM's own memory beside guest RAM while a guest runs.
//! Writes median, p90 and the ratio to QEMU into BENCHMARKS.md.
//!
//!   cargo build --release --workspace && cargo bench -p integration-tests --bench boot

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bench::{ms, summarize, write_section};
use integration_tests::{binary, guest, require_kvm, Running};

const RUNS: usize = 15;
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

fn qemu(image: &str, cmdline: &str, memory_backend: bool) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "kvm", "-M", "pc", "-m", "64M", "-smp", "1", "-nographic", "-nodefaults", "-display", "none"]);
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
    let image = guest("hello");
    let image = image.to_str().unwrap();
    let mut vmm_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    for run in 0..RUNS {
        // Interleave so that drift on a noisy host affects both alike.
        vmm_samples.push(boot_once(&mut vmm_hello()));
        qemu_samples.push(boot_once(&mut qemu(image, "exit=0", false)));
        eprintln!("run {}/{RUNS} done", run + 1);
    }
    let pick =
        |samples: &[BootSample], f: fn(&BootSample) -> Duration| summarize(&samples.iter().map(f).collect::<Vec<_>>());
    let metrics: [(&str, Metric); 3] = [
        ("start to first serial byte", |s| s.first_byte),
        ("start to guest's first line", |s| s.first_guest_line),
        ("start to guest exit", |s| s.exit),
    ];
    let mut body = String::new();
    body.push_str(&format!(
        "## Boot: `vmm` vs QEMU (`-accel kvm`), `hello` image, 1 vCPU, 64 MiB\n\n\
         {RUNS} interleaved runs each, measured {} on this host (PVM: no VMX/SVM, guest CPL0 emulated).\n\
         QEMU boots the same ELF through its PVH note after SeaBIOS, whose real-mode code PVM also emulates;\n\
         its first serial byte is SeaBIOS output.\n\n\
         | metric | vmm median (ms) | vmm p90 (ms) | QEMU median (ms) | QEMU p90 (ms) | vmm / QEMU (median) |\n|---|---|---|---|---|---|\n",
        "2026-11"
    ));
    for (name, f) in metrics {
        let (v, q) = (pick(&vmm_samples, f), pick(&qemu_samples, f));
        body.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {:.4} |\n",
            ms(v.median),
            ms(v.p90),
            ms(q.median),
            ms(q.p90),
            v.median.as_secs_f64() / q.median.as_secs_f64()
        ));
    }

    let workload = guest("source-workload");
    let mut vmm_mem = Command::new(binary("vmm"));
    vmm_mem.args(["--kernel", workload.to_str().unwrap(), "--memory", "64M"]);
    let vm = memory_while_running(&mut vmm_mem, "workload: ready");
    let mut qemu_mem = qemu(workload.to_str().unwrap(), "iterations=0", true);
    let qm = memory_while_running(&mut qemu_mem, "workload: ready");
    body.push_str(&format!(
        "\n## Process memory while `source-workload` runs (64 MiB guest, RAM in a shared memfd for both)\n\n\
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
    ));
    let path = write_section("boot", &body).expect("write BENCHMARKS.md");
    println!("{body}\nwritten to {}", path.display());
}
