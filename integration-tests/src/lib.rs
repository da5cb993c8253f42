//! Helpers for Specula's end-to-end tests: find the built binaries and guest
//! images, run processes with deadlines, and read their output as it comes.
//!
//! Tests that need something absent (/dev/kvm, a binary, the Linux image) fail
//! with a message naming it; nothing is skipped silently.
//!
//! [`linux_guest`] is the live Linux guest (QEMU, TCG, memfd RAM) with known
//! processes, a kernel module and its own ground truth, for introspection tests.

pub mod anon_source;
pub mod bench;
pub mod linux_guest;
pub mod nested;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// `target/<profile>`, from the running executable (a test's `target/<profile>/deps/NAME-HASH`,
/// or a binary of this crate in `target/<profile>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("an executable lives in a directory");
    // Tests and benches live in target/<profile>/deps, binaries (nested-run) beside it.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>/deps").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary; fails with what to run if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    assert!(
        path.is_file(),
        "binary {} is missing: build the workspace first (cargo build --workspace) — README.md's test command does",
        path.display()
    );
    path
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("integration-tests is in the workspace").to_path_buf()
}

/// A program of the pinned Python tools (`target/python-tools/bin/NAME`:
/// scripts/python-tools.sh installs them); fails with what to run if missing.
pub fn python_tool(name: &str) -> PathBuf {
    let path = workspace_root().join("target/python-tools/bin").join(name);
    assert!(path.is_file(), "{} is missing: run scripts/setup.sh (scripts/python-tools.sh)", path.display());
    path
}

/// `vol` (the pinned Volatility 3) reading `location` (a `specula://SOCKET` URL or a
/// dump file) with Specula's plugin directory, offline, JSON output, its caches and
/// Specula's symbol tables under `cache`; the plugin to run is for the caller to add.
pub fn volatility(location: &str, cache: &Path) -> Command {
    let mut cmd = Command::new(python_tool("vol"));
    cmd.env("XDG_CACHE_HOME", cache)
        .env("SPECULA_BIN", binary("specula"))
        .args(["--offline", "-q", "-r", "json", "--cache-path"])
        .arg(cache.join("volatility3"))
        .arg("-p")
        .arg(workspace_root().join("clients/python/volatility"))
        .arg("-f")
        .arg(location);
    cmd
}

/// Path of a built guest image.
pub fn guest(name: &str) -> PathBuf {
    let path = guest_images::image_path(name);
    assert!(path.is_file(), "guest image {} is missing (built by the guest-images crate)", path.display());
    path
}

/// Fails unless /dev/kvm can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (read-write), which cannot be opened: {e}");
    }
}

/// Runs `cmd` to completion with stdin closed, killing it after `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let status = wait_deadline(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {limit:?}");
    });
    Output { status, stdout: stdout.join().expect("stdout reader"), stderr: stderr.join().expect("stderr reader") }
}

fn drain<R: Read + Send + 'static>(mut reader: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` up to `limit`; `None` if it is still running.
pub fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running process whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    /// Spawns `cmd` with piped stdin/stdout; stderr is inherited.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for a line containing `needle`; panics with everything seen if it does not come.
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        self.wait_line(needle, limit).unwrap_or_else(|why| panic!("{why}"))
    }

    /// Waits for a line containing `needle`; `Err` says it did not come, with everything seen.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "no line containing {needle:?} within {limit:?}; output so far:\n{}",
                        self.seen.join("\n")
                    ))
                }
            }
        }
    }

    /// Writes to the process's stdin.
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0, "kill");
    }

    /// Waits for exit up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        match wait_deadline(&mut self.child, limit) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                panic!("process did not exit within {limit:?}; output so far:\n{}", self.seen.join("\n"));
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("specula-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends one line to a line-protocol Unix socket (vmm API, inspector control) and returns the reply.
pub fn unix_request(path: &Path, line: &str) -> String {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    // A server that refuses the peer replies and closes without reading, so sending can
    // fail (EPIPE) while the refusal waits to be read.
    let sent = writeln!(stream, "{line}");
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    if reply.is_empty() {
        sent.expect("send request");
        read.expect("read reply");
    }
    reply.trim_end().to_string()
}

/// Sends one request to a line-protocol socket from another process running as
/// `uid` (gid `uid` too, no supplementary groups): the `inspector` binary's client
/// mode, `inspector WORD --control-socket PATH ARGS...`. It prints the text after
/// `ok` and exits 0, or prints the error on stderr and exits 1. The socket file
/// must let that uid connect; switching uid needs root.
pub fn line_request_as(uid: u32, path: &Path, words: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let (word, args) = words.split_first().expect("a request word");
    let mut cmd = Command::new(binary("inspector"));
    cmd.arg(word).arg("--control-socket").arg(path).args(args).uid(uid).gid(uid);
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Fails unless the test runs as root (it starts processes as other uids).
pub fn require_root() {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(uid, 0, "this test needs root: it runs clients as other uids");
}

/// Waits until `path` exists (a socket a child process creates).
pub fn wait_for_path(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A source `vmm` running `source-workload`, serving the mirror device and its API socket.
pub struct SourceVm {
    pub vm: Running,
    pub mirror: PathBuf,
    pub api: PathBuf,
}

impl SourceVm {
    /// Starts it with the sockets in `dir` and `args` (memory, vCPUs, serial, policy...);
    /// returns once both sockets exist.
    pub fn spawn(dir: &TempDir, args: &[&str]) -> Self {
        require_kvm();
        let mirror = dir.join("mirror.sock");
        let api = dir.join("api.sock");
        let image = guest("source-workload");
        let mut cmd = Command::new(binary("vmm"));
        cmd.args(["--kernel", image.to_str().unwrap()]);
        cmd.args(["--mirror-socket", mirror.to_str().unwrap(), "--api-socket", api.to_str().unwrap()]);
        cmd.args(args);
        let vm = Running::spawn(&mut cmd);
        let limit = Duration::from_secs(60);
        wait_for_path(&mirror, limit);
        wait_for_path(&api, limit);
        Self { vm, mirror, api }
    }
}

/// An inspector attached to every chunk of the source at `mirror`, serving its HTTP API
/// at `api`, with `extra` flags; returns once its agent is ready.
pub fn spawn_api_inspector(mirror: &Path, api: &Path, extra: &[&str]) -> Running {
    let mut cmd = Command::new(binary("inspector"));
    cmd.args(["--source-socket", mirror.to_str().unwrap(), "--all", "--serial", "null"]);
    cmd.args(["--api-socket", api.to_str().unwrap()]).args(extra);
    let mut inspector = Running::spawn(&mut cmd);
    inspector.expect_line("inspector: agent ready", Duration::from_secs(60));
    inspector
}

/// A source `vmm` running `source-workload`, ready (its `workload: ready` line seen),
/// with its API and the workload's `poke` command at hand.
pub struct Workload {
    pub vm: Running,
    pub mirror: PathBuf,
    pub api: PathBuf,
    pokes: u32,
}

impl Workload {
    /// Starts it with the sockets in `dir` and `args` (memory, vCPUs, policy...).
    pub fn start(dir: &TempDir, args: &[&str]) -> Self {
        let SourceVm { mut vm, mirror, api } = SourceVm::spawn(dir, args);
        vm.expect_line("workload: ready", Duration::from_secs(60));
        Self { vm, mirror, api, pokes: 0 }
    }

    /// One request on the source's API socket.
    pub fn api(&self, line: &str) -> String {
        unix_request(&self.api, line)
    }

    /// Has the source guest write `bytes` at `gpa`, and waits until it says it did.
    pub fn poke(&mut self, gpa: u64, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.vm.send(&format!("poke {gpa:#x} {hex}\n"));
        self.pokes += 1;
        let ack = format!("ack poke seq={}", self.pokes);
        if let Err(why) = self.vm.wait_line(&ack, Duration::from_secs(60)) {
            // Where the guest's vCPUs are, twice, tells a guest that stopped reading its
            // console from a vCPU that never leaves KVM_RUN (docs/nested.md).
            let first = self.api("vcpus");
            std::thread::sleep(Duration::from_secs(1));
            let second = self.api("vcpus");
            panic!("the source guest did not acknowledge {ack:?}; its vCPUs: {first}; 1 s later: {second}\n{why}");
        }
    }
}
