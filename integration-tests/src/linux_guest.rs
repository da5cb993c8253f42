//! A live Linux guest for introspection tests: QEMU (TCG) boots Debian's cloud
//! kernel with its RAM in memfds that another process can open and map, and an
//! initramfs (`introspect.cpio.gz`, built by `guest-images/linux/build.sh`)
//! whose `/init` starts a known workload and prints its own ground truth.
//!
//! The workload: two `specula-marker` processes (`guest-images/linux/specula-marker.c`;
//! comm `specula-workerA` as root and `specula-workerB` as uid 1000, user `specula`),
//! each holding a unique marker string in a heap page, two `sleep` processes
//! (`sleep 1000000`, `sleep 2000000`) and the `dummy` kernel module. The ground
//! truth ([`GroundTruth`]) is what the guest printed once all of it ran: `ps`,
//! `/proc/modules`, each marker's `pid`, `vaddr` and text, and `uname -r`. Then a
//! shell runs on the serial console, which [`LinuxGuest::console`] drives.
//!
//! ```no_run
//! use integration_tests::linux_guest::{LinuxGuest, LinuxGuestConfig, Machine};
//! let guest = LinuxGuest::shared(); // one per test binary, booted on first use
//! let marker = guest.ground_truth().marker("specula-workerA").unwrap();
//! let ram = guest.map_ram(); // the memfds, read-only, MAP_SHARED
//! assert!(ram[0].find(marker.text.as_bytes()).is_some());
//! let out = guest.console(&format!("cat /proc/{}/comm", marker.pid), std::time::Duration::from_secs(10));
//! // A private guest, for a test that pauses or kills it or needs another layout:
//! let numa = LinuxGuest::start(LinuxGuestConfig { memory_backends: 2, machine: Machine::Q35, ..Default::default() });
//! ```
//!
//! Boot to ground truth takes ~2.5 s of TCG on an idle machine. QEMU runs with
//! `PR_SET_PDEATHSIG` (SIGKILL), forked from a thread that lives as long as the
//! test process, so no QEMU outlives `cargo test` (the shared guest is never
//! dropped; it dies with the process). A missing `qemu-system-x86_64` or image
//! fails with what to install or build; nothing is skipped.
//!
//! RAM layout: with one backend, memfd `m0` is all of guest RAM in guest-physical
//! order with the hole below 4 GiB cut out (`pc`: below 4 GiB up to 3 GiB, `q35`:
//! up to 2 GiB; 512 MiB fits below either); with N backends each memfd is one
//! NUMA node's RAM (`memory_mib / N` each), in node order. [`LinuxGuest::map_ram`]
//! returns them in that order (by their fd numbers, which QEMU allocates in
//! creation order).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{target_profile_dir, TempDir};

const QEMU: &str = "qemu-system-x86_64";
const GROUND_TRUTH_BEGIN: &str = "=== specula ground truth begin ===";
const GROUND_TRUTH_END: &str = "=== specula ground truth end ===";
const CONSOLE_READY: &str = "=== specula console ready ===";
/// How QEMU names the memfd of a `memory-backend-memfd` (`readlink` adds ` (deleted)`).
pub const MEMFD_LINK_PREFIX: &str = "/memfd:memory-backend-memfd";

/// QEMU's machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// `pc` (i440FX): RAM below 4 GiB up to 3 GiB.
    Pc,
    /// `q35`: RAM below 4 GiB up to 2 GiB.
    Q35,
}

impl Machine {
    fn name(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        }
    }
}

/// How to start a guest; `Default` is what [`LinuxGuest::shared`] uses.
#[derive(Clone, Debug)]
pub struct LinuxGuestConfig {
    /// Guest RAM in MiB, all backends together (default 512).
    pub memory_mib: u64,
    /// Machine type (default `pc`).
    pub machine: Machine,
    /// Number of `memory-backend-memfd` objects (default 1). With more than one,
    /// each is a NUMA node (`-numa node,memdev=mN`) of `memory_mib / N` MiB; all
    /// vCPUs are on node 0.
    pub memory_backends: u32,
    /// vCPUs (default 1).
    pub cpus: u32,
    /// Appended to the kernel command line (`console=ttyS0 panic=-1 loglevel=4`);
    /// `nokaslr`, `loglevel=7`, ...
    pub extra_cmdline: String,
    /// How long to wait for the ground truth and the console (default 120 s;
    /// ~2.5 s on an idle machine, more when tests boot several guests at once).
    pub boot_timeout: Duration,
    /// Which Linux guest image: [`DEBIAN_12`] (default) or [`DEBIAN_13`].
    pub image: &'static str,
}

/// Debian 12's cloud kernel (Linux 6.1), with the test rootkit: `target/guest-images/linux`.
pub const DEBIAN_12: &str = "linux";
/// Debian 13's cloud kernel (Linux 6.12): `target/guest-images/linux-trixie`.
pub const DEBIAN_13: &str = "linux-trixie";

impl Default for LinuxGuestConfig {
    fn default() -> Self {
        Self {
            memory_mib: 512,
            machine: Machine::Pc,
            memory_backends: 1,
            cpus: 1,
            extra_cmdline: String::new(),
            boot_timeout: Duration::from_secs(120),
            image: DEBIAN_12,
        }
    }
}

/// A process as the guest's `ps -o pid,ppid,user,comm,args` listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestProcess {
    pub pid: u32,
    pub ppid: u32,
    /// User name (`root`, `specula` for uid 1000), or the uid where the guest has no name for it.
    pub user: String,
    /// The task's comm (at most 15 bytes).
    pub comm: String,
    /// The command line, arguments joined by spaces (busybox's `{comm}` prefix
    /// removed); `[comm]` for kernel threads.
    pub args: String,
}

impl GuestProcess {
    /// The uid behind `user`, as the guest's `/etc/passwd` names it (root 0, specula 1000).
    pub fn uid(&self) -> u32 {
        match self.user.as_str() {
            "root" => 0,
            "specula" => 1000,
            other => other.parse().unwrap_or_else(|_| panic!("unknown user {other}")),
        }
    }
}

/// A process in the inspector's `ps` control reply: (pid, ppid, uid, comm).
pub type ListedProcess = (u32, u32, u32, String);

/// Parses the inspector's `ps` control reply (`pid:ppid:uid:comm` words).
pub fn parse_ps_reply(reply: &str) -> Vec<ListedProcess> {
    reply
        .split_whitespace()
        .map(|p| {
            let f: Vec<&str> = p.splitn(4, ':').collect();
            let number = |i: usize| {
                f.get(i)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{p:?} is not pid:ppid:uid:comm in:\n{reply}"))
            };
            (number(0), number(1), number(2), f.get(3).unwrap_or(&"").to_string())
        })
        .collect()
}

/// A line of the guest's `/proc/modules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestModule {
    pub name: String,
    pub size: u64,
    pub refcount: u32,
    /// Modules using this one.
    pub used_by: Vec<String>,
    /// `Live`, `Loading` or `Unloading`.
    pub state: String,
    /// Load address (`None` if the guest hid it).
    pub address: Option<u64>,
}

/// A `specula-marker` process's own report of its marker string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    /// Guest-virtual address of the text in the process (a heap page it touched).
    pub vaddr: u64,
    /// `SPECULA-MARKER-<pid>-<16 hex digits>`, unique per boot.
    pub text: String,
}

/// What the guest's `/init` printed between its ground-truth lines, parsed.
/// A snapshot when the workload had started: `ps` lists itself and `cat` too,
/// and pid 1 (`/bin/sh /init`) goes on to run the console shell.
#[derive(Clone, Debug, Default)]
pub struct GroundTruth {
    pub processes: Vec<GuestProcess>,
    pub modules: Vec<GuestModule>,
    pub markers: Vec<Marker>,
    /// `uname -r`.
    pub kernel_release: String,
    /// The block as printed (line ends `\n`), for messages.
    pub raw: String,
}

impl GroundTruth {
    /// Parses the text between the begin and end lines (exclusive).
    pub fn parse(block: &str) -> Result<Self, String> {
        let mut truth = GroundTruth { raw: block.to_string(), ..Default::default() };
        let mut section = "";
        for line in block.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            if let Some(name) = line.strip_prefix("--- ").and_then(|l| l.strip_suffix(" ---")) {
                section = name;
                continue;
            }
            let bad = |what: &str| format!("ground truth: bad {what} line {line:?}");
            match section {
                "ps" if line.trim_start().starts_with("PID") => {}
                "ps" => truth.processes.push(parse_ps_line(line).ok_or_else(|| bad("ps"))?),
                "modules" => truth.modules.push(parse_module_line(line).ok_or_else(|| bad("/proc/modules"))?),
                "markers" => truth.markers.push(parse_marker_line(line).ok_or_else(|| bad("marker"))?),
                "uname" => truth.kernel_release = line.trim().to_string(),
                _ => return Err(bad("unexpected")),
            }
        }
        if truth.processes.is_empty() || truth.markers.is_empty() || truth.kernel_release.is_empty() {
            return Err(format!("ground truth incomplete (needs processes, markers, uname -r):\n{block}"));
        }
        Ok(truth)
    }

    /// Asserts that `listed` (the inspector's process view) holds every process the
    /// guest's own `ps` showed, with its parent, uid and comm.
    pub fn assert_processes_listed(&self, listed: &[ListedProcess]) {
        for p in &self.processes {
            if p.comm == "ps" || p.comm == "cat" {
                continue; // they listed the processes, then exited
            }
            let seen = listed
                .iter()
                .find(|(pid, ..)| *pid == p.pid)
                .unwrap_or_else(|| panic!("pid {} ({}) is missing: {listed:?}", p.pid, p.comm));
            assert_eq!((seen.1, seen.2), (p.ppid, p.uid()), "{p:?} vs {seen:?}");
            assert!(comm_matches(&p.comm, &seen.3), "comm: {p:?} vs {seen:?}");
        }
    }

    /// Asserts that the inspector's `lsmod` control reply (`name:base:size` words) is
    /// exactly the guest's `/proc/modules`, sizes and addresses included, and holds
    /// the `dummy` module its `/init` loads.
    pub fn assert_modules_are(&self, lsmod_reply: &str) {
        let mut lsmod: Vec<String> = lsmod_reply.split_whitespace().map(String::from).collect();
        let mut want: Vec<String> =
            self.modules.iter().map(|m| format!("{}:{:#x}:{}", m.name, m.address.unwrap_or(0), m.size)).collect();
        lsmod.sort();
        want.sort();
        assert_eq!(lsmod, want, "the module list is /proc/modules");
        assert!(want.iter().any(|m| m.starts_with("dummy:")), "{want:?}");
    }

    /// The first process whose comm is `comm`.
    pub fn process(&self, comm: &str) -> Option<&GuestProcess> {
        self.processes.iter().find(|p| p.comm == comm)
    }

    /// The process with this pid.
    pub fn process_by_pid(&self, pid: u32) -> Option<&GuestProcess> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// The module named `name`.
    pub fn module(&self, name: &str) -> Option<&GuestModule> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// The marker of the process whose comm is `comm` (`specula-workerA`, `specula-workerB`).
    pub fn marker(&self, comm: &str) -> Option<&Marker> {
        self.markers.iter().find(|m| m.comm == comm)
    }
}

/// Whether `comm`, a task's comm as a view read it from the kernel (at most 15 bytes),
/// is the comm the guest's `ps` printed: the same, or for a workqueue worker
/// (`kworker/...`) `ps`'s `COMM-WORKQUEUE` or `COMM+WORKQUEUE` (the kernel's
/// `wq_worker_comm`; busybox cuts it to 15 bytes). An empty comm, a different one
/// or a mere prefix of `ps`'s never matches.
pub fn comm_matches(ps_comm: &str, comm: &str) -> bool {
    if comm.is_empty() || comm.len() > 15 {
        return false;
    }
    comm == ps_comm
        || (comm.starts_with("kworker/")
            && ps_comm.strip_prefix(comm).is_some_and(|rest| rest.starts_with('-') || rest.starts_with('+')))
}

/// A process as a view under test lists it: pid, parent, uid (where the view has
/// one) and comm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewProcess {
    pub pid: u32,
    pub ppid: u32,
    pub uid: Option<u32>,
    pub comm: String,
}

impl From<&ListedProcess> for ViewProcess {
    fn from(p: &ListedProcess) -> Self {
        ViewProcess { pid: p.0, ppid: p.1, uid: Some(p.2), comm: p.3.clone() }
    }
}

/// Asserts that a process view (`what`) taken between two snapshots of the guest's
/// own `ps` ([`LinuxGuest::ps`], `before` then `after`) lists the same processes,
/// both ways:
///
/// - every process in both snapshots (alive all along: pids are not reused within
///   seconds) is in the view, with the same parent and uid where the snapshots
///   agree on them, and its comm ([`comm_matches`]);
/// - every process in the view is in one of the snapshots with that pid, and its
///   parent, uid and comm are what that snapshot says. A process neither snapshot
///   shows was born after the first and gone before the second; in the idle guest
///   nothing is (the console runs nothing in between, and `ps`, `cat` of each
///   snapshot exit before its console command returns), so none is allowed: a
///   phantom process fails. The `ps` and `cat` of `before` are in no view for the
///   same reason, and need no exception either.
pub fn assert_processes_agree(before: &[GuestProcess], view: &[ViewProcess], after: &[GuestProcess], what: &str) {
    let pids: std::collections::BTreeSet<u32> = view.iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), view.len(), "{what} lists a pid twice: {view:?}");
    let dump = || format!("{what}: {view:?}\nguest ps before: {before:?}\nguest ps after: {after:?}");
    for b in before {
        let Some(a) = after.iter().find(|a| a.pid == b.pid) else { continue };
        let seen = view
            .iter()
            .find(|p| p.pid == b.pid)
            .unwrap_or_else(|| panic!("pid {} ({}) is missing from {}", b.pid, b.comm, dump()));
        assert!(comm_matches(&b.comm, &seen.comm) || comm_matches(&a.comm, &seen.comm), "comm: {b:?} vs {seen:?}");
        if a.ppid == b.ppid {
            assert_eq!(seen.ppid, b.ppid, "parent: {b:?} vs {seen:?}");
        }
        if let (Some(uid), true) = (seen.uid, a.user == b.user) {
            assert_eq!(uid, b.uid(), "uid: {b:?} vs {seen:?}");
        }
    }
    for seen in view {
        let shown: Vec<&GuestProcess> = before.iter().chain(after).filter(|g| g.pid == seen.pid).collect();
        assert!(
            !shown.is_empty(),
            "pid {} ({:?}) is in no `ps` of the guest: a phantom in {}",
            seen.pid,
            seen.comm,
            dump()
        );
        assert!(
            shown.iter().any(|g| comm_matches(&g.comm, &seen.comm)
                && g.ppid == seen.ppid
                && seen.uid.is_none_or(|uid| uid == g.uid())),
            "{seen:?} is not what the guest's ps says: {shown:?}"
        );
    }
}

/// Parses `ps -o pid,ppid,user,comm,args` as the guest prints it (header line first).
pub fn parse_ps_output(text: &str) -> Result<Vec<GuestProcess>, String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.trim_start().starts_with("PID"))
        .map(|l| parse_ps_line(l).ok_or_else(|| format!("bad ps line {l:?} in:\n{text}")))
        .collect()
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

fn parse_ps_line(line: &str) -> Option<GuestProcess> {
    let (pid, rest) = word(line)?;
    let (ppid, rest) = word(rest)?;
    let (user, rest) = word(rest)?;
    let (comm, rest) = word(rest)?;
    let mut args = rest.trim();
    // busybox shows `{comm} ` first when comm differs from argv[0]'s base name.
    if let Some(after) = args.strip_prefix('{').and_then(|a| a.split_once("} ")).map(|(_, a)| a) {
        args = after;
    }
    Some(GuestProcess {
        pid: pid.parse().ok()?,
        ppid: ppid.parse().ok()?,
        user: user.to_string(),
        comm: comm.to_string(),
        args: args.to_string(),
    })
}

fn parse_module_line(line: &str) -> Option<GuestModule> {
    let mut fields = line.split_whitespace();
    let name = fields.next()?.to_string();
    let size = fields.next()?.parse().ok()?;
    let refcount = fields.next()?.parse().ok()?;
    let used_by = fields.next()?.split(',').filter(|m| !m.is_empty() && *m != "-").map(String::from).collect();
    let state = fields.next()?.to_string();
    let address =
        fields.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()).filter(|&a| a != 0);
    Some(GuestModule { name, size, refcount, used_by, state, address })
}

fn parse_marker_line(line: &str) -> Option<Marker> {
    let mut rest = line.strip_prefix("marker ")?;
    let (mut pid, mut comm, mut uid, mut vaddr, mut text) = (None, None, None, None, None);
    while let Some((field, after)) = word(rest) {
        rest = after;
        let (key, value) = field.split_once('=')?;
        match key {
            "pid" => pid = value.parse().ok(),
            "comm" => comm = Some(value.to_string()),
            "uid" => uid = value.parse().ok(),
            "vaddr" => vaddr = u64::from_str_radix(value.trim_start_matches("0x"), 16).ok(),
            "text" => text = Some(value.to_string()),
            _ => {}
        }
    }
    Some(Marker { pid: pid?, comm: comm?, uid: uid?, vaddr: vaddr?, text: text? })
}

/// Everything QEMU wrote to its stdout (the guest's ttyS0), as it arrives.
struct SerialLog {
    state: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

impl SerialLog {
    fn len(&self) -> usize {
        self.state.lock().unwrap().0.len()
    }

    /// Waits until `found` returns `Some` on the log from byte `from` on (line
    /// ends `\n`, `\r` removed); `Err` with the log's tail on timeout or EOF.
    fn wait<T>(&self, from: usize, limit: Duration, mut found: impl FnMut(&str) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + limit;
        let mut state = self.state.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&state.0[from.min(state.0.len())..]).replace('\r', "");
            if let Some(value) = found(&text) {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.1 || left.is_zero() {
                let why = if state.1 { "QEMU exited" } else { "timed out" };
                let all = String::from_utf8_lossy(&state.0).replace('\r', "");
                let tail: String =
                    all.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                return Err(format!("{why} after {limit:?}; last console lines:\n{tail}"));
            }
            state = self.grew.wait_timeout(state, left).unwrap().0;
        }
    }
}

/// A running QEMU guest booted from `introspect.cpio.gz`. Dropping it kills QEMU.
pub struct LinuxGuest {
    child: Child,
    stdin: Mutex<ChildStdin>,
    serial: Arc<SerialLog>,
    next_command: AtomicU64,
    qmp: PathBuf,
    ground_truth: GroundTruth,
    boot_time: Duration,
    config: LinuxGuestConfig,
    dir: TempDir,
}

impl LinuxGuest {
    /// The guest shared by every test of this test binary, booted on first use
    /// with the default config. Tests must not pause, kill or reconfigure it (use
    /// [`LinuxGuest::start`]); console commands they run are serialized but share
    /// one shell, so leave its state as found. Killed when the test process exits.
    pub fn shared() -> &'static LinuxGuest {
        static SHARED: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            std::panic::catch_unwind(|| LinuxGuest::start(LinuxGuestConfig::default())).map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into())
            })
        });
        match started {
            Ok(guest) => guest,
            Err(why) => panic!("the shared Linux guest did not start: {why}"),
        }
    }

    /// Starts a private guest and returns once it printed its ground truth and
    /// its console shell is up. Panics naming what is missing (QEMU, an image) or
    /// with the console's last lines if the boot fails.
    pub fn start(config: LinuxGuestConfig) -> LinuxGuest {
        assert!(config.memory_backends >= 1 && config.cpus >= 1, "need at least one memory backend and vCPU");
        assert!(
            config.memory_mib.is_multiple_of(u64::from(config.memory_backends)),
            "memory_mib {} does not split evenly over {} backends",
            config.memory_mib,
            config.memory_backends
        );
        let qemu = find_qemu();
        let kernel = image_file(config.image, "vmlinuz");
        let initrd = image_file(config.image, "introspect.cpio.gz");
        remove_stale_dirs();
        let dir = TempDir::new("linux-guest");
        let qmp = dir.join("qmp.sock");
        let stderr = std::fs::File::create(dir.join("qemu.stderr")).expect("create qemu.stderr");

        let mut cmd = Command::new(&qemu);
        cmd.args(["-accel", "tcg", "-nodefaults", "-nographic", "-display", "none", "-no-reboot"]);
        cmd.args(["-smp", &config.cpus.to_string(), "-m", &format!("{}M", config.memory_mib)]);
        let per_node = config.memory_mib / u64::from(config.memory_backends);
        for n in 0..config.memory_backends {
            cmd.args(["-object", &format!("memory-backend-memfd,id=m{n},size={per_node}M,share=on")]);
        }
        if config.memory_backends == 1 {
            cmd.args(["-machine", &format!("{},memory-backend=m0", config.machine.name())]);
        } else {
            cmd.args(["-machine", config.machine.name()]);
            for n in 0..config.memory_backends {
                let cpus = if n == 0 { format!(",cpus=0-{}", config.cpus - 1) } else { String::new() };
                cmd.args(["-numa", &format!("node,nodeid={n},memdev=m{n}{cpus}")]);
            }
        }
        let cmdline = format!("console=ttyS0 panic=-1 loglevel=4 {}", config.extra_cmdline);
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd).args(["-append", cmdline.trim()]);
        cmd.args(["-serial", "stdio"]);
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.arg("-pidfile").arg(dir.join("qemu.pid"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the test process exited before QEMU started"));
                }
                Ok(())
            });
        }

        let started = Instant::now();
        let mut child =
            spawn_from_lasting_thread(cmd).unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu.display()));
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let serial = Arc::new(SerialLog { state: Mutex::new((Vec::new(), false)), grew: Condvar::new() });
        let log = Arc::clone(&serial);
        std::thread::spawn(move || read_serial(stdout, &log));

        let mut guest = LinuxGuest {
            child,
            stdin: Mutex::new(stdin),
            serial,
            next_command: AtomicU64::new(1),
            qmp,
            ground_truth: GroundTruth::default(),
            boot_time: Duration::ZERO,
            config: config.clone(),
            dir,
        };
        let block = guest.serial.wait(0, config.boot_timeout, |text| {
            let begin = text.find(&format!("{GROUND_TRUTH_BEGIN}\n"))? + GROUND_TRUTH_BEGIN.len() + 1;
            let end = text[begin..].find(&format!("{GROUND_TRUTH_END}\n"))? + begin;
            Some(text[begin..end].to_string())
        });
        let block = block.unwrap_or_else(|why| guest.fail(&format!("no ground truth from the guest: {why}")));
        guest.boot_time = started.elapsed();
        guest.ground_truth = GroundTruth::parse(&block).unwrap_or_else(|why| guest.fail(&why));
        if let Err(why) = guest.serial.wait(0, config.boot_timeout, |text| text.contains(CONSOLE_READY).then_some(())) {
            guest.fail(&format!("the console shell did not start: {why}"));
        }
        guest
    }

    fn fail(&self, why: &str) -> ! {
        let stderr = std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default();
        panic!("Linux guest (QEMU pid {}, {:?}): {why}\nQEMU stderr:\n{stderr}", self.pid(), self.config)
    }

    /// The address of kernel symbol `name`, from the guest's own /proc/kallsyms.
    pub fn kallsyms_address(&self, name: &str) -> u64 {
        let line = self.console(&format!("grep ' {name}$' /proc/kallsyms"), Duration::from_secs(30));
        let addr = line.split_whitespace().next().unwrap_or_else(|| panic!("{name} not in /proc/kallsyms: {line}"));
        u64::from_str_radix(addr, 16).unwrap_or_else(|e| panic!("{name}: {addr:?}: {e}"))
    }

    /// The guest's own `ps` now (`ps -o pid,ppid,user,comm,args`, as in the ground
    /// truth), through the console; it lists its own `ps` and `cat`.
    pub fn ps(&self) -> Vec<GuestProcess> {
        let out = self.console("ps -o pid,ppid,user,comm,args | cat", Duration::from_secs(60));
        parse_ps_output(&out).unwrap_or_else(|why| self.fail(&why))
    }

    /// The guest-physical address of kernel image address `va` (a symbol of the
    /// kernel's text or data), from the guest alone: `/proc/kallsyms`' `_text` and
    /// `/proc/iomem`'s `Kernel code`, which starts at `_text`'s physical address.
    pub fn kernel_image_pa(&self, va: u64) -> u64 {
        let line = self.console("grep 'Kernel code' /proc/iomem", Duration::from_secs(30));
        let start = line.split('-').next().map(str::trim).unwrap_or("");
        let code = u64::from_str_radix(start, 16).unwrap_or_else(|e| panic!("/proc/iomem {line:?}: {e}"));
        assert_ne!(code, 0, "/proc/iomem hides addresses: {line:?}");
        let text = self.kallsyms_address("_text");
        assert!(va >= text, "{va:#x} is below _text ({text:#x})");
        code + (va - text)
    }

    /// Every name `/proc/kallsyms` gives each of `addresses` (aliases share one), by
    /// an `awk` in the guest, in batches small enough for the console's line editing.
    pub fn kallsyms_names(
        &self,
        addresses: &std::collections::BTreeSet<u64>,
    ) -> std::collections::BTreeMap<u64, Vec<String>> {
        let mut names: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        let all: Vec<u64> = addresses.iter().copied().collect();
        for batch in all.chunks(100) {
            let wanted: String = batch.iter().map(|a| format!("{a:016x}\n")).collect();
            let out = self.console(
                &format!(
                    "cat >/tmp/specula-want <<'EOF'\n{wanted}EOF\n\
                     awk 'NR == FNR {{ want[$1] = 1; next }} ($1 in want) {{ print $1, $3 }}' \
                     /tmp/specula-want /proc/kallsyms; rm -f /tmp/specula-want"
                ),
                Duration::from_secs(120),
            );
            for line in out.lines() {
                let Some((addr, name)) = line.trim().split_once(' ') else { continue };
                let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
                names.entry(addr).or_default().push(name.to_string());
            }
        }
        names
    }

    /// QEMU's process id (its memfds are under `/proc/PID/fd`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's QMP socket (`server=on,wait=off`; one client at a time). See [`LinuxGuest::qmp`].
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp
    }

    /// What the guest printed about itself once its workload ran.
    pub fn ground_truth(&self) -> &GroundTruth {
        &self.ground_truth
    }

    /// From starting QEMU until the guest had printed its ground truth.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    pub fn config(&self) -> &LinuxGuestConfig {
        &self.config
    }

    /// Runs `command` (shell syntax, may span lines) in the guest's console shell,
    /// with stdin from /dev/null and stderr into the output, and returns its
    /// output (line ends `\n`; a last line without one stays so). Panics if it
    /// does not finish within `limit`. Commands are serialized.
    pub fn console(&self, command: &str, limit: Duration) -> String {
        self.console_status(command, limit).1
    }

    /// [`LinuxGuest::console`], also returning the command's exit status.
    pub fn console_status(&self, command: &str, limit: Duration) -> (i32, String) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let tag = format!("{}x{}", self.pid(), self.next_command.fetch_add(1, Ordering::SeqCst));
        let from = self.serial.len();
        // The delimiters are printed by printf from separate words, so the
        // terminal's echo of this line never contains them.
        let line = format!(
            "printf '%s-%s\\n' SPECULA-BEGIN {tag}; {{ {command}\n}} </dev/null 2>&1; s=$?; \
             printf '\\n%s-%s %s\\n' SPECULA-END {tag} \"$s\"\n"
        );
        if let Err(e) = stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()) {
            self.fail(&format!("cannot write to the console: {e}"));
        }
        let begin = format!("SPECULA-BEGIN-{tag}\n");
        let end = format!("\nSPECULA-END-{tag} ");
        let reply = self.serial.wait(from, limit, |text| {
            let start = text.find(&begin)? + begin.len();
            let stop = text[start..].find(&end)? + start;
            let status_line = &text[stop + end.len()..];
            let status = status_line[..status_line.find('\n')?].trim().parse().ok()?;
            Some((status, text[start..stop].to_string()))
        });
        reply.unwrap_or_else(|why| self.fail(&format!("console command {command:?} did not finish: {why}")))
    }

    /// Everything the guest wrote on its serial console so far (`\r` removed).
    pub fn console_log(&self) -> String {
        String::from_utf8_lossy(&self.serial.state.lock().unwrap().0).replace('\r', "")
    }

    /// Sends one QMP command (a JSON object such as `{"execute":"stop"}`) after the
    /// capabilities handshake and returns QEMU's reply line (`{"return": ...}` or
    /// `{"error": ...}`), skipping events.
    pub fn qmp(&self, command: &str) -> String {
        let stream = UnixStream::connect(&self.qmp).unwrap_or_else(|e| self.fail(&format!("QMP connect: {e}")));
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        let reply = |reader: &mut BufReader<UnixStream>, what: &str| loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                other => self.fail(&format!("QMP: no reply to {what}: {other:?}")),
            }
            if line.contains("\"return\"") || line.contains("\"error\"") || line.contains("\"QMP\"") {
                return line.trim_end().to_string();
            }
        };
        reply(&mut reader, "connect");
        writeln!(writer, "{{\"execute\":\"qmp_capabilities\"}}").expect("QMP write");
        reply(&mut reader, "qmp_capabilities");
        writeln!(writer, "{command}").expect("QMP write");
        reply(&mut reader, command)
    }

    /// QEMU's guest-RAM memfds, as `/proc/PID/fd/N` paths, in fd order (backend
    /// `m0` first). Opening them needs the right to ptrace QEMU (root, or its uid).
    pub fn ram_memfds(&self) -> Vec<PathBuf> {
        let fds = Path::new("/proc").join(self.pid().to_string()).join("fd");
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(&fds)
            .unwrap_or_else(|e| self.fail(&format!("cannot list {}: {e}", fds.display())))
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                let fd = entry.file_name().to_str()?.parse().ok()?;
                target.to_str()?.starts_with(MEMFD_LINK_PREFIX).then(|| (fd, entry.path()))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, path)| path).collect()
    }

    /// Maps every RAM memfd read-only (`O_RDONLY`, `PROT_READ`, `MAP_SHARED`): a
    /// live view of guest RAM. See the module docs for the layout.
    pub fn map_ram(&self) -> Vec<RamMapping> {
        let fds = self.ram_memfds();
        assert_eq!(fds.len(), self.config.memory_backends as usize, "QEMU's memfds: {fds:?}");
        fds.iter().map(|path| RamMapping::open(path)).collect()
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_serial(mut stdout: impl Read, log: &SerialLog) {
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        let mut state = log.state.lock().unwrap();
        if n == 0 {
            state.1 = true;
        } else {
            state.0.extend_from_slice(&buf[..n]);
        }
        log.grew.notify_all();
        if n == 0 {
            return;
        }
    }
}

/// Spawns `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked exits, and test threads end before the
/// shared guest should.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("linux-guest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, tx)).expect("spawner thread is gone");
    rx.recv().expect("spawner thread is gone")
}

fn find_qemu() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(QEMU)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{QEMU} is missing (not in PATH): install the Debian package qemu-system-x86 \
             (scripts/install-deps.sh, or apt-get install qemu-system-x86)"
        )
    })
}

/// The version of the `qemu-system-x86_64` on PATH (the one the fixtures start and the
/// nested bench carries into L1), as it reports it: `7.2.22` of `QEMU emulator version
/// 7.2.22 (Debian ...)`.
pub fn qemu_version() -> String {
    let qemu = find_qemu();
    let out = Command::new(&qemu).arg("--version").output().unwrap_or_else(|e| panic!("{}: {e}", qemu.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().and_then(|l| l.strip_prefix("QEMU emulator version "));
    let version = version.and_then(|v| v.split_whitespace().next());
    version.unwrap_or_else(|| panic!("{} --version: {text:?}", qemu.display())).to_string()
}

/// `target/guest-images/linux/NAME` (Debian 12's guest), which must exist.
pub fn linux_image(name: &str) -> PathBuf {
    image_file(DEBIAN_12, name)
}

/// `target/guest-images/IMAGE/NAME`, which must exist.
pub fn image_file(image: &str, name: &str) -> PathBuf {
    let path = target_profile_dir().parent().expect("target dir").join("guest-images").join(image).join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the Linux guests with scripts/build.sh (it runs guest-images/linux/build.sh)",
        path.display()
    );
    path
}

/// Removes the directories of guests whose test process is gone (the shared
/// guest's is never dropped), killing a QEMU still running from one (there
/// should be none: PR_SET_PDEATHSIG).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix("specula-linux-guest-")) else { continue };
        let Some(owner) = owner.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new("/proc").join(owner.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        if let Some(qemu) =
            std::fs::read_to_string(dir.join("qemu.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(dir.to_str().unwrap_or("\0"));
            if ours {
                // SAFETY: kill(2) of a QEMU whose command line names our own directory.
                unsafe { libc::kill(qemu, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A read-only `MAP_SHARED` mapping of one guest-RAM memfd.
pub struct RamMapping {
    file: std::fs::File,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives as long as the struct.
unsafe impl Send for RamMapping {}
// SAFETY: as above; shared references only read it.
unsafe impl Sync for RamMapping {}

impl RamMapping {
    /// Opens `path` (a `/proc/PID/fd/N` of a memfd) `O_RDONLY` and maps all of it.
    pub fn open(path: &Path) -> RamMapping {
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
        let len = file.metadata().expect("fstat").len() as usize;
        assert!(len > 0, "{} is empty", path.display());
        // SAFETY: a fresh read-only shared mapping of a file we hold open.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {}: {}", path.display(), std::io::Error::last_os_error());
        RamMapping { file, ptr: ptr as *const u8, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping. Guest writes show through it as they happen; reading a
    /// page the guest never touched allocates it in the memfd (see [`RamMapping::find`]).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for our lifetime; the contents may change under us,
        // which for plain bytes is only a matter of what we read.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Offset of the first occurrence of `needle`, scanning only the memfd's
    /// data extents (SEEK_DATA/SEEK_HOLE), so holes are neither read nor allocated.
    pub fn find(&self, needle: &[u8]) -> Option<usize> {
        self.find_all(needle).into_iter().next()
    }

    /// Offsets of every occurrence of `needle`, in order (within data extents).
    pub fn find_all(&self, needle: &[u8]) -> Vec<usize> {
        let mut hits = Vec::new();
        let fd = self.file.as_raw_fd();
        let mut pos: i64 = 0;
        while (pos as usize) < self.len {
            // SAFETY: lseek on our fd.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { self.len } else { (hole as usize).min(self.len) };
            // Extend by the needle's length so a match across an extent's end is found.
            let window_end = (end + needle.len()).min(self.len);
            let window = &self.as_slice()[data as usize..window_end];
            let mut at = 0;
            while let Some(i) = memmem(&window[at..], needle) {
                if data as usize + at + i < end {
                    hits.push(data as usize + at + i);
                }
                at += i + 1;
            }
            pos = end as i64;
        }
        hits
    }
}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn memmem(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    // SAFETY: both ranges are valid for their lengths.
    let hit = unsafe { libc::memmem(haystack.as_ptr().cast(), haystack.len(), needle.as_ptr().cast(), needle.len()) };
    (!hit.is_null()).then(|| hit as usize - haystack.as_ptr() as usize)
}

/// An `inspector` attached to a guest's QEMU through QMP (`--qemu-qmp`, all of RAM),
/// serving its control socket and its API. QEMU serves one QMP client at a time: tests
/// that share a guest attach in turn.
pub struct GuestInspector {
    pub proc: crate::Running,
    pub control: PathBuf,
    pub api: PathBuf,
    _dir: TempDir,
}

impl GuestInspector {
    pub fn attach(guest: &LinuxGuest) -> Self {
        let dir = TempDir::new("guest-inspector");
        let (control, api) = (dir.join("control.sock"), dir.join("api.sock"));
        let mut proc = crate::Running::spawn(Command::new(crate::binary("inspector")).args([
            "--qemu-qmp",
            guest.qmp_socket().to_str().unwrap(),
            "--all",
            "--serial",
            "null",
            "--control-socket",
            control.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
        ]));
        proc.expect_line("inspector: agent ready", Duration::from_secs(120));
        Self { proc, control, api, _dir: dir }
    }

    /// One control request; the reply after `ok` (a failed request panics).
    pub fn ask(&self, line: &str) -> String {
        let reply = crate::unix_request(&self.control, line);
        assert!(reply.starts_with("ok"), "{line}: {reply}");
        reply.trim_start_matches("ok").trim_start().to_string()
    }

    /// `specula --json ARGS` against this inspector's API: the JSON it printed and its
    /// exit status (3 where rootkit checks or YARA found something). Panics, naming the
    /// command, when the output is not JSON.
    pub fn specula_json(&self, args: &[&str]) -> (serde_json::Value, i32) {
        let out = crate::run_with_timeout(
            Command::new(crate::binary("specula")).args(["--socket", self.api.to_str().unwrap(), "--json"]).args(args),
            Duration::from_secs(120),
        );
        let json = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("specula {args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (json, out.status.code().unwrap_or(-1))
    }
}

/// A QEMU process with a QMP socket and no guest code running (`-S`), killed on drop
/// (and with the test process: `PR_SET_PDEATHSIG`), for tests and benchmarks of layouts,
/// refusals and control. `args` gives the machine and memory.
pub struct StoppedQemu {
    pub child: Child,
    pub qmp: PathBuf,
}

impl StoppedQemu {
    pub fn start(dir: &TempDir, args: &[&str]) -> Self {
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new(find_qemu());
        cmd.args(["-accel", "tcg", "-S", "-nodefaults", "-nographic", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: prctl in the child before exec: QEMU dies with the process that started it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
        crate::wait_for_path(&qmp, Duration::from_secs(60));
        Self { child, qmp }
    }

    /// `-m SIZE` in one memfd backend shared with other processes, on `machine`.
    pub fn memfd_ram(size: &str, machine: &str) -> Vec<String> {
        vec![
            "-m".into(),
            size.into(),
            "-object".into(),
            format!("memory-backend-memfd,id=m0,size={size},share=on"),
            "-machine".into(),
            format!("{machine},memory-backend=m0"),
        ]
    }
}

impl Drop for StoppedQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ground_truth() {
        let block = "--- ps ---\nPID   PPID  USER     COMMAND          COMMAND\n\
                         1     0 root     init             {init} /bin/sh /init\n\
                         2     0 root     kthreadd         [kthreadd]\n\
                        81     1 specula  specula-workerB  {specula-workerB} specula-marker --name specula-workerB --tag b\n\
                     --- modules ---\ndummy 16384 0 - Live 0xffffffffc0601000\nfoo 100 2 dummy,bar, Live 0x0000000000000000 (O)\n\
                     --- markers ---\nmarker pid=81 comm=specula-workerB uid=1000 vaddr=0x3fb356d0 text=SPECULA-MARKER-81-37187c922de05fe8\n\
                     marker pid=80 comm=specula-workerA uid=0 vaddr=0x10 text=SPECULA-MARKER-80-0\n\
                     --- uname ---\n6.1.0-57-cloud-amd64\n";
        let truth = GroundTruth::parse(block).unwrap();
        assert_eq!(truth.processes.len(), 3);
        assert_eq!(truth.process_by_pid(1).unwrap().args, "/bin/sh /init");
        assert_eq!(truth.process("kthreadd").unwrap().args, "[kthreadd]");
        let worker = truth.process("specula-workerB").unwrap();
        assert_eq!((worker.ppid, worker.user.as_str()), (1, "specula"));
        assert_eq!(worker.args, "specula-marker --name specula-workerB --tag b");
        assert_eq!(truth.module("dummy").unwrap().address, Some(0xffff_ffff_c060_1000));
        let foo = truth.module("foo").unwrap();
        assert_eq!((foo.refcount, foo.used_by.clone(), foo.address), (2, vec!["dummy".into(), "bar".into()], None));
        let marker = truth.marker("specula-workerB").unwrap();
        assert_eq!((marker.pid, marker.uid, marker.vaddr), (81, 1000, 0x3fb3_56d0));
        assert_eq!(marker.text, "SPECULA-MARKER-81-37187c922de05fe8");
        assert_eq!(truth.kernel_release, "6.1.0-57-cloud-amd64");
        assert!(GroundTruth::parse("--- ps ---\nnonsense\n").is_err());
    }

    #[test]
    fn a_comm_is_the_whole_comm() {
        assert!(comm_matches("sleep", "sleep"));
        assert!(comm_matches("kworker/0:1-eve", "kworker/0:1"), "ps adds the workqueue");
        assert!(comm_matches("kworker/u2:0+flush", "kworker/u2:0"));
        assert!(!comm_matches("sleep", ""), "empty");
        assert!(!comm_matches("specula-workerA", "specula-"), "a prefix");
        assert!(!comm_matches("sleep", "sh"));
        assert!(!comm_matches("kworker/0:1-eve", "kworker/0:"), "a worker's prefix");
    }

    #[test]
    fn process_views_are_compared_both_ways() {
        let ps = |text: &str| parse_ps_output(text).unwrap();
        let before = ps("PID PPID USER COMM ARGS\n1 0 root init /init\n2 0 root kthreadd [kthreadd]\n\
                         90 1 root sh sh\n95 90 root ps ps -o x\n96 90 root cat cat\n");
        let after = ps("PID PPID USER COMM ARGS\n1 0 root init /init\n2 0 root kthreadd [kthreadd]\n\
                        90 1 root sh sh\n97 2 root kworker/0:2-eve [kworker/0:2-events]\n\
                        98 90 root ps ps -o x\n99 90 root cat cat\n");
        let view = |extra: &[(u32, u32, u32, &str)]| -> Vec<ViewProcess> {
            [(1, 0, 0, "init"), (2, 0, 0, "kthreadd"), (90, 1, 0, "sh")]
                .iter()
                .chain(extra)
                .map(|&(pid, ppid, uid, comm)| ViewProcess { pid, ppid, uid: Some(uid), comm: comm.into() })
                .collect()
        };
        let agrees = |v: Vec<ViewProcess>| {
            std::panic::catch_unwind(|| assert_processes_agree(&before, &v, &after, "view")).is_ok()
        };
        assert!(agrees(view(&[])));
        assert!(agrees(view(&[(97, 2, 0, "kworker/0:2")])), "born in between");
        assert!(!agrees(view(&[(4242, 1, 0, "phantom")])), "a phantom");
        assert!(!agrees(view(&[(97, 2, 0, "")])), "an empty comm");
        assert!(!agrees(view(&[(97, 1, 0, "kworker/0:2")])), "a wrong parent");
        assert!(!agrees(view(&[(97, 2, 1000, "kworker/0:2")])), "a wrong uid");
        let mut missing = view(&[]);
        missing.retain(|p| p.pid != 90);
        assert!(!agrees(missing), "a process the guest shows throughout");
    }
}
