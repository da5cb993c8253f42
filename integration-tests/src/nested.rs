//! The nested test bed: a hardware-like KVM for tests on a runner whose own
//! /dev/kvm is PVM (see `docs/nested.md`).
//!
//! QEMU's TCG emulates AMD SVM with nested paging. [`NestedL1`] boots Debian's
//! cloud kernel (the one `guest-images/linux/build.sh` fetched) as an L1 guest with
//! `-cpu qemu64,+svm,+npt`, loads that kernel's own `kvm-amd`, and then runs shell
//! commands there on request. What the L1 holds comes in its initramfs, laid out
//! like cargo's target directory under `/target` (not the host's absolute path, so
//! every binary proves it finds its files relative to itself):
//! - `/target/<profile>/{vmm,inspector,specula,mirror-attack,kmirror-bench}`, stripped, with the
//!   shared libraries `ldd` names;
//! - `/target/<profile>/deps/<test>`: the workspace test binaries a test asks for
//!   ([`NestedL1::test_binary`]), to run existing tests on NPT;
//! - `/target/guest-images/`: Specula's guests and both Linux guests (`linux`,
//!   `linux-trixie`);
//! - the host's own `qemu-system-x86_64` at `/usr/bin`, with its shared libraries and
//!   the firmware `-M microvm` boots with, so an unmodified QEMU can run a KVM guest
//!   in L1 beside our vmm ([`NestedL1::qemu`]);
//! - `/l1mod/`: zram and what it needs, for tests that swap, tun and vhost-vsock
//!   ([`L1_EXTRA_MODULES`]).
//!
//! Commands travel on the L1's second serial port (a Unix socket on the host) in
//! frames: `ID SECONDS BASE64(script)` in, `=== begin ID`, base64 of the combined
//! output, `=== end ID STATUS` out. Each command runs in its own shell in the
//! background. The kernel console goes to a log file, whose tail is shown when the
//! bed fails.
//!
//! Each test boots its own L1 ([`NestedL1::boot`], about 3 s) from an initramfs
//! built once per test binary, and the L1 is killed when the test drops it. One L1
//! per test binary was the first design; measured, it did not hold: under QEMU's TCG
//! (7.2 and 10.0 alike) an L1 that has run KVM guests stops reading its command port
//! within a few commands (its vCPUs idle, its timers running, the command sent and
//! never read; docs/nested.md), while the first command of a fresh L1 was always
//! served. It fails with a message naming what is missing: QEMU, the kernel and its
//! modules, or SVM in the L1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::target_profile_dir;

/// L1's memory: room for the initramfs, a few Linux L2s and mirror sources.
/// Below QEMU's 32-bit PCI hole, deliberately: with L1 RAM above 4 GiB, Linux L2s
/// hung in early boot under TCG's nested SVM.
const L1_MEMORY_MIB: u32 = 3072;
/// L1's vCPUs: QEMU runs them on host threads (MTTCG), so two use both runner cores.
pub const L1_CPUS: u32 = 2;
/// From QEMU's start to the command server's ready line (about 3 s when idle; the
/// rest is for a loaded runner unpacking a large initramfs under TCG).
const L1_READY_LIMIT: Duration = Duration::from_secs(180);
/// The workspace binaries the bed carries.
const BINARIES: &[&str] = &["vmm", "inspector", "specula", "mirror-attack", "kmirror-bench"];
/// The project's kernel modules the bed carries, in `/target/guest-images/linux/kmod/`.
pub const KERNEL_MODULES: &[&str] = &["specula_mirror.ko", "specula_pin_baseline.ko"];
/// Modules of L1's kernel the bed carries but does not load, in [`L1_MODULES`]: swap
/// to zram (`insmod` the first three in this order), taps (`tun.ko`), and
/// /dev/vhost-vsock (the last five, in this order).
pub const L1_EXTRA_MODULES: &[&str] = &[
    "zsmalloc.ko",
    "zram.ko",
    "lzo-rle.ko",
    "tun.ko",
    "vhost_iotlb.ko",
    "vhost.ko",
    "vsock.ko",
    "vmw_vsock_virtio_transport_common.ko",
    "vhost_vsock.ko",
];
/// Where they are in L1.
pub const L1_MODULES: &str = "/l1mod";
/// /dev/vhost-vsock's modules among [`L1_EXTRA_MODULES`], in load order.
pub const VHOST_VSOCK_MODULES: &[&str] =
    &["vhost_iotlb", "vhost", "vsock", "vmw_vsock_virtio_transport_common", "vhost_vsock"];

/// L1 shell text that loads vhost-vsock ([`VHOST_VSOCK_MODULES`]) and fails the
/// command if /dev/vhost-vsock does not appear.
pub fn load_vhost_vsock() -> String {
    let insmod: String =
        VHOST_VSOCK_MODULES.iter().map(|m| format!("insmod {L1_MODULES}/{m}.ko || exit 1\n")).collect();
    format!("{insmod}[ -c /dev/vhost-vsock ] || {{ echo '=== no /dev/vhost-vsock in L1'; exit 1; }}")
}

/// The word that follows `prefix` where it first appears in `log` (a line an L1 step
/// or the guest printed, perhaps after the guest shell's prompt); fails naming it.
pub fn word_after<'a>(log: &'a str, prefix: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.split_whitespace().next().unwrap_or("")))
        .unwrap_or_else(|| panic!("no {prefix} in the log:\n{log}"))
}

/// Shell lines for a guest session in L1: start `inspector ARGS` in the background,
/// its output in `log`, as `$inspector`, and wait (at most 240 s) until its agent is
/// ready; `fail` (the session's own) names the log when it dies or times out.
pub fn start_inspector_and_wait(inspector: &str, args: &str, log: &str) -> String {
    format!(
        "{inspector} {args} > {log} 2>&1 &\n\
         inspector=$!\n\
         end=$(( $(date +%s) + 240 ))\n\
         until grep -q 'inspector: agent ready' {log}; do\n\
           [ $(date +%s) -lt $end ] && kill -0 $inspector 2>/dev/null || fail \"inspector not ready: $(cat {log})\"\n\
           usleep 200000\n\
         done"
    )
}

/// Where QEMU lives in L1.
pub const L1_QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The firmware files QEMU may need in L1 (from /usr/share/qemu).
const QEMU_FIRMWARE: &[&str] = &["bios-microvm.bin", "qboot.rom", "linuxboot_dma.bin", "pvh.bin", "kvmvapic.bin"];
/// Where the bed's tree lives in L1: cargo's layout under another root.
pub const L1_TARGET: &str = "/target";

/// What one command did in L1.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// The shell's exit status (137 when the L1-side time limit killed it).
    pub status: i32,
    /// Standard output and standard error, interleaved as written.
    pub output: String,
}

/// Results the reader thread has decoded, by command id.
#[derive(Default)]
struct Replies {
    done: HashMap<u64, CommandOutput>,
    /// Set when the L1's command channel closed: no reply will come.
    closed: Option<String>,
}

/// A running L1 guest with a hardware-like /dev/kvm; QEMU is killed on drop.
pub struct NestedL1 {
    writer: Mutex<UnixStream>,
    replies: Arc<(Mutex<Replies>, Condvar)>,
    next_id: Mutex<u64>,
    console_log: PathBuf,
    profile: String,
    /// The npt parameter of L1's kvm_amd ("Y" when nested paging is on).
    pub npt: String,
    /// Killed when the bed is dropped, or when its boot fails.
    qemu: L1Qemu,
    dir: PathBuf,
}

/// What every L1 of this test binary boots: QEMU, the kernel and the initramfs.
struct Prepared {
    qemu: PathBuf,
    linux: PathBuf,
    initramfs: PathBuf,
    workdir: PathBuf,
    profile: String,
    tests: Vec<String>,
    carried: Carried,
}

/// What an L1 carries beyond the bed's own tree, for one test binary: files (a disk
/// image, say) and host programs with their shared libraries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// (host path, absolute path in L1).
    pub files: Vec<(PathBuf, String)>,
    /// Host programs, carried to the same path in L1 with the libraries `ldd` lists.
    pub programs: Vec<PathBuf>,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();

impl Drop for NestedL1 {
    fn drop(&mut self) {
        self.qemu.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The QEMU process of one L1, killed when dropped: an L1 whose boot fails (one that
/// never becomes ready) must not go on taking the runner's CPUs from the next one.
struct L1Qemu {
    pid: u32,
    killed: std::sync::atomic::AtomicBool,
}

impl L1Qemu {
    /// Kills QEMU, once: after the first kill its owner thread may reap it and the pid
    /// be reused.
    fn kill(&self) {
        if self.killed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: kill(2) on the pid of the QEMU child this bed started and has not
        // killed yet. One that exited on its own and was reaped frees its pid, but pids
        // are handed out in order and come round again only after pid_max others.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
    }
}

impl Drop for L1Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NestedL1 {
    /// Boots a fresh L1 carrying the named workspace test binaries (for example
    /// `mirror`) in `/target/<profile>/deps/`. The initramfs is built by the first
    /// call of the test binary, which decides the test binaries for all.
    pub fn boot(tests: &[&str]) -> NestedL1 {
        Self::boot_numa(tests, 1)
    }

    /// [`NestedL1::boot`] with L1's memory and vCPUs split over `nodes` NUMA nodes
    /// (one vCPU each, at most [`L1_CPUS`]), for page migration between nodes.
    pub fn boot_numa(tests: &[&str], nodes: u32) -> NestedL1 {
        Self::boot_inner(tests, nodes, &Carried::default())
    }

    /// [`NestedL1::boot`] with `carried` in L1 as well. Like the test binaries, what
    /// an L1 carries is decided by the test binary's first call.
    pub fn boot_carrying(tests: &[&str], carried: &Carried) -> NestedL1 {
        Self::boot_inner(tests, 1, carried)
    }

    fn boot_inner(tests: &[&str], nodes: u32, carried: &Carried) -> NestedL1 {
        assert!((1..=L1_CPUS).contains(&nodes), "an L1 has 1 to {L1_CPUS} NUMA nodes");
        let prepared = PREPARED.get_or_init(|| prepare(tests, carried));
        assert_eq!(&prepared.carried, carried, "this test binary's L1 initramfs carries other files");
        assert!(
            tests.iter().all(|t| prepared.tests.iter().any(|p| p == t)),
            "this test binary's L1 initramfs carries {:?}, not all of {tests:?}",
            prepared.tests
        );
        launch(prepared, nodes)
    }
}

/// Checks what the bed needs and builds the L1 initramfs.
fn prepare(tests: &[&str], carried: &Carried) -> Prepared {
    let qemu = find_on_path("qemu-system-x86_64").unwrap_or_else(|| {
        panic!("the nested test bed needs qemu-system-x86_64 (Debian package qemu-system-x86; scripts/install-deps.sh installs it)")
    });
    let linux = linux_dir("linux");
    for needed in ["vmlinuz", "busybox", "kvm-modules/irqbypass.ko", "kvm-modules/kvm.ko", "kvm-modules/kvm-amd.ko"] {
        assert!(
            linux.join(needed).is_file(),
            "the nested test bed needs {} (Debian's cloud kernel package, its KVM modules and busybox-static, \
             fetched by guest-images/linux/build.sh): run scripts/build.sh",
            linux.join(needed).display()
        );
    }
    remove_stale_workdirs();
    let workdir = std::env::temp_dir().join(format!("specula-nested-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&workdir);
    std::fs::create_dir_all(&workdir).expect("create the nested bed's work directory");
    let profile = target_profile_dir().file_name().expect("profile dir").to_string_lossy().into_owned();
    let initramfs = build_initramfs(&workdir, &linux, &profile, tests, &qemu, carried);
    let tests = tests.iter().map(|t| t.to_string()).collect();
    Prepared { qemu, linux, initramfs, workdir, profile, tests, carried: carried.clone() }
}

/// Boots one L1 and waits for its command server.
fn launch(prepared: &Prepared, nodes: u32) -> NestedL1 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Prepared { qemu, linux, initramfs, workdir, profile, .. } = prepared;
    let dir = workdir.join(format!("l1-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("create the L1's directory");
    let socket = dir.join("commands.sock");
    let console_log = dir.join("console.log");

    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "qemu64,+svm,+npt", "-nodefaults", "-no-user-config", "-display", "none"])
        // One socket per vCPU, QEMU's default for `-smp N`, so one per NUMA node too:
        // cores of one socket on two nodes make Linux warn at boot (topology_sane),
        // which the tests take as a kernel complaint.
        .args(["-smp", &format!("{L1_CPUS},sockets={L1_CPUS},cores=1")])
        .args(["-m", &L1_MEMORY_MIB.to_string(), "-no-reboot"])
        .arg("-kernel")
        .arg(linux.join("vmlinuz"))
        .arg("-initrd")
        .arg(initramfs)
        // An L1 CPU that TCG keeps inside an L2 (docs/nested.md, "A triple fault the
        // nest makes") never schedules again, or never takes its timer again: L1
        // panics after a minute of either (a soft lockup, an RCU stall), so the test
        // ends at once with the panic line instead of at its time limit.
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 softlockup_panic=1 watchdog_thresh=30 \
             rcupdate.rcu_cpu_stall_timeout=60 sysctl.kernel.panic_on_rcu_stall=1",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if nodes > 1 {
        let per_node = L1_MEMORY_MIB / nodes;
        for node in 0..nodes {
            cmd.arg("-object").arg(format!("memory-backend-ram,id=node{node},size={per_node}M"));
            cmd.arg("-numa").arg(format!("node,nodeid={node},cpus={node},memdev=node{node}"));
        }
    }
    if debug_enabled() {
        // For a person looking at a stuck L1: `info registers -a`, `info lapic`.
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", dir.join("monitor.sock").display()));
    }
    let (pid, qemu_exit) = spawn_owned(cmd);
    let qemu = L1Qemu { pid, killed: Default::default() };

    let stream = connect(&socket, &qemu_exit, &console_log);
    let reader = BufReader::new(stream.try_clone().expect("clone the command socket"));
    let replies = Arc::new((Mutex::new(Replies::default()), Condvar::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let replies = replies.clone();
        std::thread::spawn(move || read_frames(reader, replies, ready_tx));
    }
    let npt = match ready_rx.recv_timeout(L1_READY_LIMIT) {
        Ok(line) => line,
        Err(_) => panic!(
            "{NEST_L1_NOT_READY} {L1_READY_LIMIT:?}{}; its console ends with:\n{}",
            qemu_exit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .map(|e| format!(" (QEMU exited: {e})"))
                .unwrap_or_default(),
            tail(&console_log)
        ),
    };
    let npt = match npt.strip_prefix("nested-bed: ready npt=") {
        Some(npt) => npt.trim().to_string(),
        None => panic!("{npt}\nL1 console:\n{}", tail(&console_log)),
    };
    NestedL1 {
        writer: Mutex::new(stream),
        replies,
        next_id: Mutex::new(0),
        console_log,
        profile: profile.clone(),
        npt,
        qemu,
        dir,
    }
}

impl NestedL1 {
    /// Runs `script` with `sh` in L1 as root, killed there after `limit`; returns its
    /// status and output. Fails if L1 is gone or gives no answer in time.
    pub fn run(&self, script: &str, limit: Duration) -> CommandOutput {
        self.try_run(script, limit).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`NestedL1::run`], but an L1 that is gone or gives no answer in time is an
    /// `Err` saying so (with its console's tail), for a caller that goes on with a
    /// fresh L1 (docs/nested.md: an L1 whose CPU stays in an L2 cannot answer).
    pub fn try_run(&self, script: &str, limit: Duration) -> Result<CommandOutput, String> {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(script);
        let seconds = limit.as_secs().max(1);
        {
            let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            writeln!(writer, "{id} {seconds} {encoded}").map_err(|e| format!("cannot send a command to L1: {e}"))?;
        }
        // The L1 side kills the command at `limit`; the reply may then take a while
        // to cross a busy serial line.
        let deadline = Instant::now() + limit + Duration::from_secs(60);
        let (lock, cvar) = &*self.replies;
        let mut replies = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(out) = replies.done.remove(&id) {
                return Ok(out);
            }
            if let Some(why) = &replies.closed {
                return Err(format!(
                    "the nested L1 is gone ({why}) while running:\n{script}\nL1 console:\n{}",
                    tail(&self.console_log)
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no answer from the nested L1 within {limit:?} for:\n{script}\nL1 console:\n{}",
                    tail(&self.console_log)
                ));
            }
            replies = cvar.wait_timeout(replies, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The path of QEMU in L1: the host's own `qemu-system-x86_64`, for unmodified-VMM
    /// sources and QEMU `-M microvm` beside our vmm.
    pub fn qemu(&self) -> &'static str {
        L1_QEMU
    }

    /// Path in L1 of a workspace binary (`vmm`, `inspector`, ...).
    pub fn binary(&self, name: &str) -> String {
        format!("{L1_TARGET}/{}/{name}", self.profile)
    }

    /// Path in L1 of a workspace test binary carried with [`NestedL1::boot`].
    pub fn test_binary(&self, name: &str) -> String {
        format!("{L1_TARGET}/{}/deps/{name}", self.profile)
    }

    /// Path in L1 of a file of a Linux guest (`dir`: `linux` or `linux-trixie`).
    pub fn linux_image(&self, dir: &str, name: &str) -> String {
        format!("{L1_TARGET}/guest-images/{dir}/{name}")
    }

    /// Path in L1 of one of Specula's guest images (`hello`, `source-workload`, ...).
    pub fn guest(&self, name: &str) -> String {
        format!("{L1_TARGET}/guest-images/{name}.elf")
    }
}

/// `target/guest-images/<dir>`, built by scripts/build.sh.
pub fn linux_dir(dir: &str) -> PathBuf {
    target_profile_dir().parent().expect("target dir").join("guest-images").join(dir)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|p| p.is_file()))
        .unwrap_or(None)
}

/// Spawns `cmd` from a thread that lives as long as the test process and reaps the
/// child, so that `PR_SET_PDEATHSIG` (which follows the spawning thread) kills QEMU
/// only when the test binary exits. The returned slot says how QEMU ended, if it did.
fn spawn_owned(mut cmd: Command) -> (u32, Arc<Mutex<Option<String>>>) {
    use std::os::unix::process::CommandExt;
    let exit = Arc::new(Mutex::new(None));
    let (tx, rx) = std::sync::mpsc::channel::<Result<u32, String>>();
    let slot = exit.clone();
    std::thread::spawn(move || {
        // SAFETY: pre_exec runs in the forked child before exec; prctl is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child: Child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = tx.send(Err(format!("cannot start qemu-system-x86_64: {e}")));
                return;
            }
        };
        let _ = tx.send(Ok(child.id()));
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{status}: {}", stderr.trim()));
    });
    match rx.recv().map_err(|e| e.to_string()) {
        Ok(Ok(pid)) => (pid, exit),
        Ok(Err(e)) | Err(e) => panic!("{e}"),
    }
}

/// Connects to QEMU's command socket (it appears once QEMU has parsed its options).
fn connect(socket: &Path, qemu_exit: &Mutex<Option<String>>, console_log: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return stream;
        }
        if let Some(exit) = qemu_exit.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
            panic!(
                "QEMU ended before the nested L1 started ({exit}); if it names `svm`, this QEMU's TCG \
                 CPU model lacks SVM. L1 console:\n{}",
                tail(console_log)
            );
        }
        assert!(Instant::now() < deadline, "QEMU's command socket {} never appeared", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads frames from L1: `=== begin ID`, base64 lines, `=== end ID STATUS`. Lines
/// outside a frame are the server's own (its ready line, or why it could not start).
fn read_frames(
    reader: BufReader<UnixStream>,
    replies: Arc<(Mutex<Replies>, Condvar)>,
    ready: std::sync::mpsc::Sender<String>,
) {
    let mut open: HashMap<u64, String> = HashMap::new();
    let mut current: Option<u64> = None;
    let debug = debug_enabled();
    for line in reader.split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
        if debug && !line.is_empty() {
            eprintln!("nested-bed <- {}", &line[..line.len().min(120)]);
        }
        if let Some(id) = line.strip_prefix("=== begin ").and_then(|s| s.trim().parse().ok()) {
            open.insert(id, String::new());
            current = Some(id);
        } else if let Some(rest) = line.strip_prefix("=== end ") {
            let mut fields = rest.split_whitespace();
            let (Some(Ok(id)), Some(Ok(status))) =
                (fields.next().map(str::parse::<u64>), fields.next().map(str::parse::<i32>))
            else {
                continue;
            };
            let encoded = open.remove(&id).unwrap_or_default();
            let output = match base64::engine::general_purpose::STANDARD.decode(encoded.as_bytes()) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => format!("(the nested bed could not decode this command's output: {e})"),
            };
            current = None;
            let (lock, cvar) = &*replies;
            lock.lock().unwrap_or_else(|p| p.into_inner()).done.insert(id, CommandOutput { status, output });
            cvar.notify_all();
        } else if let Some(id) = current {
            open.entry(id).or_default().push_str(line.trim());
        } else if line.starts_with("nested-bed:") {
            let _ = ready.send(line);
        }
    }
    let (lock, cvar) = &*replies;
    lock.lock().unwrap_or_else(|p| p.into_inner()).closed = Some("its command channel closed".into());
    cvar.notify_all();
}

/// The last 60 lines of a log file, after the line where L1's kernel panicked, if it
/// did (a panic's backtrace alone can fill the 60 lines).
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(60)..].join("\n");
    match lines.iter().find(|l| l.contains("Kernel panic - not syncing")) {
        Some(panic) if !last.contains(panic) => format!("{panic}\n[...]\n{last}"),
        _ => last,
    }
}

/// L1's /init: mounts, loads KVM, checks SVM and NPT, then serves commands on ttyS1.
const L1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=2g tmp /tmp; mkdir -p /run; mount -t tmpfs run /run; mkdir -p /run/c
stty -F /dev/ttyS1 raw -echo
say() { echo "nested-bed: $*" > /dev/ttyS1; echo "nested-bed: $*"; }
grep -qw svm /proc/cpuinfo || { say "the L1 CPU has no svm flag: this QEMU's TCG CPU model (qemu64,+svm,+npt) lacks SVM"; poweroff -f; }
for m in irqbypass kvm kvm-amd; do insmod /kvm/$m.ko || { say "insmod $m.ko failed: $(dmesg | tail -3)"; poweroff -f; }; done
[ -c /dev/kvm ] || { say "kvm-amd loaded but L1 has no /dev/kvm: $(dmesg | grep -i -e svm -e kvm | tail -3)"; poweroff -f; }
# serve.sh says it is ready once it holds ttyS1 open: input that arrives while no
# one has the tty open is discarded.
export NPT="$(cat /sys/module/kvm_amd/parameters/npt)"
exec /bin/sh /serve.sh < /dev/ttyS1 > /dev/ttyS1 2>&1
"#;

/// The command server: one background shell per command, replies framed under a lock.
const L1_SERVE: &str = r#"echo "nested-bed: ready npt=$NPT"
while read -r id seconds script; do
    case "$id" in *[!0-9]*|'') continue ;; esac
    (
        echo "$script" | base64 -d > /run/c/$id.sh
        timeout -s KILL "$seconds" sh /run/c/$id.sh > /run/c/$id.out 2>&1 < /dev/null
        status=$?
        # One reply at a time on the line (busybox-static has no flock; mkdir is atomic).
        until mkdir /run/c/.lock 2>/dev/null; do usleep 2000; done
        echo "=== begin $id"
        base64 /run/c/$id.out
        echo "=== end $id $status"
        rmdir /run/c/.lock
        rm -f /run/c/$id.sh /run/c/$id.out
    ) &
done
"#;

/// What the vmm prints when TCG's emulated SVM shuts an L2 down (docs/nested.md, "A
/// triple fault the nest makes"): RIP is the reset vector because KVM re-INITs a vCPU
/// after a SHUTDOWN intercept, so where the guest was is lost.
pub const NEST_TRIPLE_FAULT: &str = "shut down (triple fault) near RIP 0xfff0";

/// What L1's kernel says when its own memory is found corrupted in a VMM's vCPU
/// thread (docs/nested.md, "A triple fault the nest makes": no L2 and no user process
/// can write L1's kernel stacks).
pub const NEST_L1_CORRUPTED: &str = "Kernel panic - not syncing: corrupted stack end detected inside scheduler";

/// What L1's kernel says when one of its CPUs has not scheduled for a minute, which a
/// CPU that TCG keeps inside an L2 never does (docs/nested.md, "A triple fault the nest
/// makes": L1 boots with `softlockup_panic=1`).
pub const NEST_L1_SOFT_LOCKUP: &str = "Kernel panic - not syncing: softlockup: hung tasks";

/// What L1's kernel says when one of its CPUs has taken no timer for a minute, which a
/// CPU that TCG keeps inside an L2 does not (L1 boots with `panic_on_rcu_stall`).
pub const NEST_L1_RCU_STALL: &str = "Kernel panic - not syncing: RCU Stall";

/// What the source vmm answers when a vCPU does not leave KVM_RUN even for a signal
/// (docs/nested.md, "A triple fault the nest makes": L1's CPU stuck in its L2), as a
/// failed `poke` reports it (`Workload::poke`).
pub const NEST_STUCK_VCPU: &str = "not every vCPU answered the snapshot request";

/// What the bed says when L1 answers nothing, not even the `timeout` it runs each
/// command under, and prints no panic either: a CI run met an L1 that went silent in
/// the hello test, whose L2 does nothing but exit. No user process in L1 can keep
/// L1's own command runner from answering, so this is L1 itself held by TCG
/// (docs/nested.md, "A triple fault the nest makes").
pub const NEST_L1_SILENT: &str = "no answer from the nested L1 within";

/// Runs a nested test, and again (at most [`NEST_ATTEMPTS`] runs in all) while it fails
/// with [`NEST_TRIPLE_FAULT`], [`NEST_STUCK_VCPU`], [`NEST_L1_CORRUPTED`],
/// [`NEST_L1_SOFT_LOCKUP`], [`NEST_L1_RCU_STALL`], [`NEST_L1_SILENT`],
/// [`NEST_L1_NOT_READY`] or [`NEST_AGENT_CRASH`] in its message: an L2 that TCG's nested SVM shuts down, or
/// never leaves, or an L1 whose kernel memory it corrupts or whose CPU it keeps, at
/// random, about once in a few dozen L2 runs, in guests that
/// never fault on this runner's KVM or in 150 runs in a row under tracing. With 15
/// nested tests a CI run meets one now and then, and twice in one test was seen once
/// (docs/nested.md). Each retry is announced on stderr; any other failure, or the last
/// run's, fails the test.
pub fn retry_on_the_nest_symptoms(test: impl Fn()) {
    for attempt in 1.. {
        let Err(failure) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&test)) else { return };
        let text = failure
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| failure.downcast_ref::<&str>().copied())
            .unwrap_or("");
        let symptoms = [
            NEST_TRIPLE_FAULT,
            NEST_STUCK_VCPU,
            NEST_L1_CORRUPTED,
            NEST_L1_SOFT_LOCKUP,
            NEST_L1_RCU_STALL,
            NEST_L1_SILENT,
            NEST_L1_NOT_READY,
            NEST_AGENT_CRASH,
        ];
        match symptoms.into_iter().find(|s| text.contains(s)) {
            Some(what) if attempt < NEST_ATTEMPTS => {
                eprintln!("nested: the nest failed ({what}; TCG's nested SVM); running the test again");
            }
            _ => std::panic::resume_unwind(failure),
        }
    }
}

/// What the bed says of an L1 that never became ready: a run met an L1 whose
/// console stayed empty (its kernel boots with `quiet`) for the whole limit while its
/// QEMU kept both of the runner's CPUs, with no L2 ever started; the next L1, the
/// same initramfs, booted in the usual 25 s. A broken initramfs fails every attempt,
/// with the console's end in the message.
pub const NEST_L1_NOT_READY: &str = "the nested L1 did not become ready within";

/// What an inspector prints when its agent VM (an L2) crashed: the third symptom of
/// docs/nested.md, "agents shut down on their first OS command"; the inspector exits,
/// and its requests get no reply. The tests put the inspector's log in such failures.
pub const NEST_AGENT_CRASH: &str = "inspector: agent crashed: vCPU";

/// Runs of one nested test, at most, while the nest's own symptoms fail it. Four: a
/// CI run met three in a row in the 6.12 trace test (an L2 triple fault, an L1 RCU
/// stall, an agent's triple fault), each a known symptom (docs/nested.md).
pub const NEST_ATTEMPTS: u32 = 4;

/// Lays out L1's root and packs it as an uncompressed newc cpio (QEMU loads it into
/// RAM as is; the kernel's unpacking is then a copy, not a TCG-emulated inflate).
fn build_initramfs(
    workdir: &Path,
    linux: &Path,
    profile: &str,
    tests: &[&str],
    qemu: &Path,
    carried: &Carried,
) -> PathBuf {
    let root = workdir.join("root");
    let bin_dir = root.join(format!("target/{profile}"));
    for dir in ["bin", "dev", "proc", "sys", "tmp", "kvm"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::create_dir_all(bin_dir.join("deps")).unwrap();
    copy(&linux.join("busybox"), &root.join("bin/busybox"));
    for m in ["irqbypass", "kvm", "kvm-amd"] {
        copy(&linux.join(format!("kvm-modules/{m}.ko")), &root.join(format!("kvm/{m}.ko")));
    }
    for m in L1_EXTRA_MODULES {
        let from = linux.join("l1-modules").join(m);
        assert!(from.is_file(), "{} is missing: run scripts/build.sh (guest-images/linux/build.sh)", from.display());
        copy(&from, &root.join(L1_MODULES.trim_start_matches('/')).join(m));
    }
    write_executable(&root.join("init"), L1_INIT);
    write_executable(&root.join("serve.sh"), L1_SERVE);

    let mut executables: Vec<(PathBuf, PathBuf)> =
        BINARIES.iter().map(|name| (crate::binary(name), bin_dir.join(name))).collect();
    for test in tests {
        executables.push((newest_test_binary(test), bin_dir.join("deps").join(test)));
    }
    for (from, to) in &executables {
        strip_into(from, to);
        copy_libraries(from, &root);
    }
    let images = target_profile_dir().parent().expect("target dir").join("guest-images");
    let images_root = root.join("target/guest-images");
    for name in guest_images::IMAGES {
        copy(&images.join(format!("{name}.elf")), &images_root.join(format!("{name}.elf")));
    }
    for dir in ["linux", "linux-trixie"] {
        for file in ["vmlinuz", "initramfs.cpio.gz", "introspect.cpio.gz", "kernel-version"] {
            let from = images.join(dir).join(file);
            assert!(from.is_file(), "{} is missing: run scripts/build.sh", from.display());
            copy(&from, &images_root.join(dir).join(file));
        }
    }
    // The kernel mirror device and its pinning baseline, built for L1's kernel.
    for module in KERNEL_MODULES {
        let from = images.join("linux/kmod").join(module);
        assert!(from.is_file(), "{} is missing: run scripts/build.sh (mirror-driver/kmod)", from.display());
        copy(&from, &images_root.join("linux/kmod").join(module));
    }

    // QEMU as an L1 program: its binary, libraries and the firmware of `-M microvm`
    // (qboot) and of `-kernel` boots on other machine types.
    copy(qemu, &root.join(L1_QEMU.trim_start_matches('/')));
    copy_libraries(qemu, &root);
    let firmware = Path::new("/usr/share/qemu");
    for file in QEMU_FIRMWARE {
        let from = firmware.join(file);
        assert!(from.is_file(), "{} is missing (Debian package qemu-system-data)", from.display());
        copy(&from, &root.join("usr/share/qemu").join(file));
    }

    for (from, to) in &carried.files {
        assert!(from.is_file(), "{} is missing: run scripts/build.sh", from.display());
        copy(from, &root.join(to.trim_start_matches('/')));
    }
    for program in &carried.programs {
        copy(program, &root.join(program.strip_prefix("/").unwrap_or(program)));
        copy_libraries(program, &root);
    }

    let archive = workdir.join("l1.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet > '{}'", root.display(), archive.display()))
        .status()
        .expect("run cpio (Debian package cpio; scripts/install-deps.sh installs it)");
    assert!(status.success(), "packing the nested L1's initramfs with cpio failed");
    let _ = std::fs::remove_dir_all(&root);
    archive
}

/// The newest `target/<profile>/deps/NAME-HASH` executable built from `tests/NAME.rs`.
fn newest_test_binary(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let deps = target_profile_dir().join("deps");
    let prefix = format!("{name}-");
    std::fs::read_dir(&deps)
        .expect("read target deps")
        .flatten()
        .filter(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix(&prefix)
                .is_some_and(|hash| hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()))
                && e.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                && built_from_tests_dir(&e.path(), name)
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("test binary {name} is not built in {}: run cargo test --no-run", deps.display()))
}

/// Whether cargo built `binary` from `tests/NAME.rs`, by its dep-info file: a bench of
/// the same name (`benches/NAME.rs`, built by `cargo build --all-targets`) lands in
/// the same directory under the same name pattern.
fn built_from_tests_dir(binary: &Path, name: &str) -> bool {
    let deps = std::fs::read_to_string(binary.with_extension("d")).unwrap_or_default();
    deps.contains(&format!("/tests/{name}.rs"))
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} into the nested L1: {e}", from.display()));
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Copies a binary without its debug sections (debug builds are ~100 MB each).
fn strip_into(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).unwrap();
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status()
        .expect("run strip (binutils, installed with gcc)");
    assert!(status.success(), "strip {} failed", from.display());
}

/// Copies the shared libraries `ldd` lists for `binary` to the same paths under `root`.
fn copy_libraries(binary: &Path, root: &Path) {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if word.starts_with('/') && Path::new(word).is_file() {
            let dest = root.join(word.trim_start_matches('/'));
            if !dest.exists() {
                copy(Path::new(word), &dest);
            }
        }
    }
}

/// One `vmm` run in L1 driven through its serial console, as a single L1 command.
///
/// The steps run inside L1, not from the host: while KVM runs an L2 guest, TCG's
/// nested SVM can hold back L1's serial interrupts, so a second command sent to L1
/// mid-run may sit unread until the L2 ends (measured: a command sent while a Linux
/// L2 idled at its shell got no answer for minutes). A session sends one command
/// and gets its answer once the `vmm` is gone.
///
/// The console's input is a FIFO the script holds open read-write on fd 3, so the
/// vmm never sees end-of-file and nothing but the vmm has to end for `wait` to
/// return (a `tail -f | vmm` pipeline would make `wait` outlive the vmm: ash waits
/// for the whole pipeline, and `tail -f` never ends). Output goes to a log the
/// script greps.
pub struct ConsoleSession {
    script: String,
    /// Shell text run in L1 once the vmm has exited (its output follows `=== after`).
    after: String,
}

impl ConsoleSession {
    /// Starts `vmm ARGS` (shell text) in `/run/l2/NAME`.
    pub fn new(l1: &NestedL1, name: &str, args: &str) -> Self {
        let dir = format!("/run/l2/{name}");
        let vmm = l1.binary("vmm");
        // With SPECULA_NESTED_DEBUG, the L2's console also goes to L1's console log.
        let echo_console = if debug_enabled() { "tail -f out > /dev/console 2>&1 &\nechoer=$!\n" } else { "" };
        let script = format!(
            "rm -rf {dir} && mkdir -p {dir} && cd {dir} && mkfifo input && exec 3<>input\n\
             {vmm} {args} < input > out 2>&1 &\n\
             vmm=$!\n\
             {echo_console}\
             threads() {{ [ -n \"$1\" ] && [ -d /proc/$1/task ] || return 0; echo \"=== $2 threads (state, wchan, kernel stack)\"; \
               for t in /proc/$1/task/*; do echo \"$(cat $t/comm) $(sed -n 's/^State:[[:space:]]*//p' $t/status) \
                 wchan=$(cat $t/wchan)\"; head -n 6 $t/stack 2>/dev/null | sed 's/^/    /'; done; }}\n\
             fail() {{ echo \"=== $*\"; threads \"$vmm\" vmm; threads \"$inspector\" inspector; kill -9 $vmm 2>/dev/null; cat out; echo '=== L1 kernel log'; dmesg | tail -n 15; \
               for f in *.log *.err *.out; do [ -f \"$f\" ] && echo \"=== $f ($(wc -l < \"$f\") lines), its end\" && tail -n 8 \"$f\"; done; exit 1; }}\n\
             waitfor() {{\n\
               end=$(( $(date +%s) + $2 ))\n\
               while ! grep -qF -- \"$1\" out; do\n\
                 kill -0 $vmm 2>/dev/null || fail \"the vmm exited before the console showed: $1\"\n\
                 [ $(date +%s) -lt $end ] || fail \"timed out after $2 s waiting for: $1\"\n\
                 usleep 200000\n\
               done\n\
             }}\n"
        );
        Self { script, after: String::new() }
    }

    /// Runs `text` in L1 before the vmm starts, in the same L1 command: an L1 that
    /// has run KVM guests may stop reading its command port after a few commands
    /// (docs/nested.md), so a test does its checks in its session's command.
    pub fn before(mut self, text: &str) -> Self {
        self.script = format!("{text}\n{}", self.script);
        self
    }

    /// Runs `text` in L1 after the vmm exited, in the same L1 command; its output
    /// ends the log [`ConsoleSession::finish`] returns, after a `=== after` line.
    pub fn after_exit(mut self, text: &str) -> Self {
        self.after.push_str(text);
        self.after.push('\n');
        self
    }

    /// Waits (in L1) until the console shows `needle`, for at most `limit`.
    pub fn wait_for(mut self, needle: &str, limit: Duration) -> Self {
        self.script.push_str(&format!("waitfor {} {}\n", shell_quote(needle), limit.as_secs()));
        self
    }

    /// Types `line` on the console.
    pub fn send(mut self, line: &str) -> Self {
        self.script.push_str(&format!("echo {} >&3\n", shell_quote(line)));
        self
    }

    /// Runs more shell text in L1 at this point (`cd` is the session's directory).
    pub fn shell(mut self, text: &str) -> Self {
        self.script.push_str(text);
        self.script.push('\n');
        self
    }

    /// Waits for the vmm to exit (killing it after `limit`); returns its exit status
    /// and the console log, with the output of any [`ConsoleSession::shell`] steps
    /// first. Fails with the log if a step failed.
    pub fn finish(mut self, l1: &NestedL1, limit: Duration) -> (i32, String) {
        self.script.push_str(&format!(
            "( sleep {secs}; kill -9 $vmm 2>/dev/null ) &\n\
             watchdog=$!\n\
             wait $vmm; status=$?\n\
             kill $watchdog $echoer 2>/dev/null; exec 3>&-\n\
             echo \"=== vmm exit $status\"\n\
             cat out\n\
             [ $status -lt 128 ] || {{ echo '=== L1 kernel log (the vmm was killed)'; dmesg | tail -n 20; }}\n\
             echo '=== after'\n\
             {after}",
            secs = limit.as_secs(),
            after = self.after,
        ));
        let out = l1.run(&self.script, Duration::from_secs(1200));
        assert_eq!(out.status, 0, "the console session failed in L1:\n{}", out.output);
        let (before, after) = out.output.split_once("=== vmm exit ").expect("the session's end line");
        let (status, log) = after.split_once('\n').unwrap_or((after, ""));
        (status.trim().parse().expect("vmm exit status"), format!("{before}{log}"))
    }
}

/// Asserts that a [`ConsoleSession`]'s vmm ended with `expected`, leading the failure
/// with how it ended and its last log lines: CI shows a failure's first and last lines,
/// and a long session's middle (the guest's console, the tools' output) is cut.
#[track_caller]
pub fn assert_vmm_ended_with(status: i32, expected: i32, what: &str, log: &str) {
    if status == expected {
        return;
    }
    let how = match status {
        3 => "the guest crashed".to_string(),
        137 => "killed by SIGKILL (the session's watchdog, or L1's OOM killer)".to_string(),
        s if s > 128 => format!("killed by signal {}", s - 128),
        s => format!("exit status {s}"),
    };
    let vmm_lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.starts_with("vmm:")
                || l.contains("segfault")
                || l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.contains("panicked")
        })
        .collect();
    let last = &vmm_lines[vmm_lines.len().saturating_sub(8)..];
    panic!(
        "{what}: the vmm ended with {status} ({how}), not {expected}; its last log lines:\n{}\n--- the whole session:\n{log}",
        last.join("\n")
    );
}

/// Where an L1 carrying [`debian_root_disk`] has the Debian root disk
/// (`guest-images/linux/build-rootfs.sh`) and the initramfs that mounts it.
pub const L1_ROOTFS: &str = "/target/guest-images/debian/rootfs.img";
pub const L1_DISK_INITRAMFS: &str = "/target/guest-images/linux/disk-initramfs.cpio.gz";

/// What an L1 carries to boot Debian from a virtio disk under the vmm: the root
/// disk, the disk initramfs of Debian 12's kernel, and `debugfs` (which reads the
/// image back in L1).
pub fn debian_root_disk() -> Carried {
    let images = linux_dir("linux");
    let rootfs = images.parent().expect("guest-images").join("debian/rootfs.img");
    Carried {
        files: vec![
            (rootfs, L1_ROOTFS.to_string()),
            (images.join("disk-initramfs.cpio.gz"), L1_DISK_INITRAMFS.to_string()),
        ],
        programs: vec![host_program("debugfs")],
    }
}

/// A program of this host, by name, for an L1 to carry (at the same path).
pub fn host_program(name: &str) -> PathBuf {
    // On PATH, or in the sbin directories a user's PATH may lack (debugfs lives there).
    find_on_path(name)
        .or_else(|| ["/usr/sbin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("{name} is missing here (scripts/install-deps.sh installs the packages the tests use)")
        })
}

/// A console session in `l1` (which carries [`debian_root_disk`]) booting Debian 12's
/// kernel from the root disk: `vmm_args` are more vmm options (the `--disk` among
/// them), `cmdline` more kernel parameters. Its console shows
/// "specula-rootfs: Debian 12." once the shell is up.
pub fn debian_session(l1: &NestedL1, name: &str, vmm_args: &str, cmdline: &str) -> ConsoleSession {
    let args = format!(
        "--kernel {} --initramfs {L1_DISK_INITRAMFS} --memory 384M {vmm_args} \
         --cmdline \"console=ttyS0 quiet panic=-1 init=/sbin/specula-init {cmdline}\"",
        l1.linux_image("linux", "vmlinuz"),
    );
    ConsoleSession::new(l1, name, &args)
}

/// Removes the work directories (each ~100 MB: L1's initramfs) of test processes that
/// are gone: the bed lives in a static, whose destructor never runs.
fn remove_stale_workdirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("specula-nested-")) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether SPECULA_NESTED_DEBUG is set: the bed then echoes what L1 sends, and console
/// sessions copy the L2's console into L1's console log (docs/nested.md).
fn debug_enabled() -> bool {
    std::env::var_os("SPECULA_NESTED_DEBUG").is_some()
}

/// `text` as one single-quoted shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tail_tests {
    use super::tail;

    #[test]
    fn a_panic_line_older_than_the_tail_is_still_reported() {
        let dir = crate::TempDir::new("nested-tail");
        let log = dir.join("console.log");
        let mut text =
            String::from("boot\nKernel panic - not syncing: corrupted stack end detected inside scheduler\n");
        text.extend((0..100).map(|i| format!("trace line {i}\n")));
        std::fs::write(&log, &text).unwrap();
        let shown = tail(&log);
        assert!(shown.starts_with("Kernel panic - not syncing: corrupted stack end"), "{shown}");
        assert!(shown.ends_with("trace line 99") && !shown.contains("trace line 39\n"), "{shown}");
        std::fs::write(&log, "quiet\n").unwrap();
        assert_eq!(tail(&log), "quiet");
    }
}
