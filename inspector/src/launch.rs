//! `specula launch`: starts a source and an inspector attached to it, and supervises
//! both. The source is a Specula `vmm` running a guest image, or a Linux guest under an
//! unmodified QEMU (TCG or KVM), with memfd RAM shared over a socket or, with
//! `attach = "pid"`, private anonymous RAM reached through the kernel mirror device. Ctrl-C (or SIGTERM) stops both; a crash
//! of either is reported and stops the other. The inspector's API socket and the
//! source's sockets live in one run directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("bad launch file")]
    BadFile(#[source] toml::de::Error),
    #[error("{path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown {what} '{value}': {expected}")]
    Setting { what: &'static str, value: String, expected: &'static str },
    #[error("cannot start {what}")]
    Start {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{who} exited ({status}) while we waited for {awaited}")]
    Exited { who: String, status: ExitStatus, awaited: String },
    #[error("{who}: waited 120 s for {awaited} in vain")]
    TimedOut { who: String, awaited: String },
    #[error("{0}")]
    Missing(&'static str),
}

/// What to launch (the command line's flags, or a TOML file with the same names).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// `specula` (a `vmm` guest image) or `qemu` (a Linux kernel under QEMU).
    #[serde(default = "default_source")]
    pub source: String,
    /// Guest image or Linux kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Guest RAM, e.g. `512M`.
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Kernel command line (QEMU prefixes `console=ttyS0`; the vmm takes it as is).
    #[serde(default)]
    pub cmdline: String,
    /// Disks, `path=FILE[,readonly=on]` each, as the vmm's `--disk`: virtio-blk in
    /// either source, in order (/dev/vda first).
    #[serde(default)]
    pub disk: Vec<String>,
    /// Network devices, `tap=NAME[,mac=MAC]` each, as the vmm's `--net`: virtio-net
    /// on a tap in either source.
    #[serde(default)]
    pub net: Vec<String>,
    /// A vsock device, `cid=N`, as the vmm's `--vsock`: virtio-vsock through the
    /// host's vhost-vsock in either source.
    #[serde(default)]
    pub vsock: Option<String>,
    /// Where the sockets and logs go.
    pub dir: PathBuf,
    /// Integrity watches, `GPA:LEN`.
    #[serde(default)]
    pub watch: Vec<String>,
    /// QEMU accelerator (`tcg` or `kvm`).
    #[serde(default = "default_accel")]
    pub accel: String,
    /// How the inspector reaches the source's RAM: `socket` (the source shares it as
    /// memfd: the vmm's mirror socket, QEMU's memfd backend with QMP) or `pid` (the
    /// source keeps private anonymous RAM, as VMMs do by default, and the inspector
    /// attaches by pid through the kernel mirror device; needs KVM and
    /// `specula_mirror.ko`).
    #[serde(default = "default_attach")]
    pub attach: String,
}

fn default_attach() -> String {
    "socket".into()
}

fn default_source() -> String {
    "specula".into()
}
fn default_memory() -> String {
    "256M".into()
}
fn default_cpus() -> u32 {
    1
}
fn default_accel() -> String {
    "tcg".into()
}

impl LaunchConfig {
    /// Reads a TOML launch file.
    pub fn from_toml(text: &str) -> Result<Self, LaunchError> {
        toml::from_str(text).map_err(LaunchError::BadFile)
    }
}

/// A `--disk` value as QEMU's virtio-blk `-drive`.
fn qemu_drive(disk: &str) -> Result<String, LaunchError> {
    let disk = vmm::config::parse_disk(disk).map_err(|e| LaunchError::Setting {
        what: "disk",
        value: e.to_string(),
        expected: "path=FILE[,readonly=on]",
    })?;
    let path = disk.path.display().to_string();
    let read_only = if disk.read_only { ",readonly=on" } else { "" };
    Ok(format!("file={path},format=raw,if=virtio{read_only}"))
}

/// A `--net` value as QEMU's tap netdev and virtio-net device.
fn qemu_nic(index: usize, net: &str) -> Result<[String; 4], LaunchError> {
    let net = vmm::config::parse_net(net).map_err(|e| LaunchError::Setting {
        what: "net",
        value: e.to_string(),
        expected: "tap=NAME[,mac=MAC]",
    })?;
    let mac = net.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    Ok([
        "-netdev".into(),
        format!("tap,id=net{index},ifname={},script=no,downscript=no", net.tap),
        "-device".into(),
        format!("virtio-net,netdev=net{index},mac={mac}"),
    ])
}

/// A `--vsock` value as QEMU's vhost-vsock device (on the `pc` machine's PCI bus).
fn qemu_vsock(vsock: &str) -> Result<String, LaunchError> {
    let vsock = vmm::config::parse_vsock(vsock).map_err(|e| LaunchError::Setting {
        what: "vsock",
        value: e.to_string(),
        expected: "cid=N",
    })?;
    Ok(format!("vhost-vsock-pci,guest-cid={}", vsock.cid))
}

/// A binary next to this executable (the workspace's `target/PROFILE/`), or on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Children get the default signal mask back (the supervisor blocks SIGINT/SIGTERM).
fn unblocked(mut cmd: Command) -> Command {
    // SAFETY: sigprocmask in the forked child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, LaunchError> {
    std::fs::File::create(dir.join(name)).map_err(|source| LaunchError::File { path: dir.join(name), source })
}

/// Polls `ready` every 20 ms for up to 120 s; fails, naming `who` and what it waited
/// for (`awaited`, e.g. "PATH to appear"), if `child` exits first or time runs out.
fn wait_until(child: &mut Child, who: &str, awaited: &str, ready: impl Fn() -> bool) -> Result<(), LaunchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited { who: who.into(), status, awaited: awaited.into() });
        }
        if Instant::now() > deadline {
            return Err(LaunchError::TimedOut { who: who.into(), awaited: awaited.into() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_for(path: &Path, child: &mut Child, who: &str) -> Result<(), LaunchError> {
    wait_until(child, who, &format!("{} to appear", path.display()), || path.exists())
}

/// Waits until the source's console has printed something: its VM exists, its RAM
/// is in KVM memslots and its guest runs, so an attach by pid finds all of it.
fn wait_for_console(path: &Path, child: &mut Child, who: &str) -> Result<(), LaunchError> {
    let printed = || std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    wait_until(child, who, &format!("output in {}", path.display()), printed)
}

/// Starts the source; returns it and the inspector's attach flags.
fn start_source(config: &LaunchConfig) -> Result<(Child, Vec<String>), LaunchError> {
    let dir = &config.dir;
    let by_pid = match config.attach.as_str() {
        "socket" => false,
        "pid" => true,
        other => {
            return Err(LaunchError::Setting { what: "attach mode", value: other.into(), expected: "socket or pid" })
        }
    };
    let mut child = match config.source.as_str() {
        "specula" => {
            let mut cmd = Command::new(sibling("vmm"));
            cmd.arg("--kernel").arg(&config.kernel);
            cmd.args(["--memory", &config.memory, "--cpus", &config.cpus.to_string()]);
            cmd.arg("--serial").arg(format!("file={}", dir.join("console.log").display()));
            if let Some(initrd) = &config.initrd {
                cmd.arg("--initramfs").arg(initrd);
            }
            if !config.cmdline.is_empty() {
                cmd.arg("--cmdline").arg(&config.cmdline);
            }
            for disk in &config.disk {
                cmd.arg("--disk").arg(disk);
            }
            for net in &config.net {
                cmd.arg("--net").arg(net);
            }
            if let Some(vsock) = &config.vsock {
                cmd.arg("--vsock").arg(vsock);
            }
            if by_pid {
                cmd.args(["--memory-backend", "anon"]);
            } else {
                cmd.arg("--mirror-socket").arg(dir.join("mirror.sock"));
            }
            cmd.arg("--api-socket").arg(dir.join("source-api.sock"));
            unblocked(cmd)
                .stdin(Stdio::null())
                .stdout(log_file(dir, "source.log")?)
                .stderr(log_file(dir, "source.log")?)
                .spawn()
        }
        "qemu" => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-accel", &config.accel, "-nodefaults", "-nographic", "-display", "none"]);
            cmd.args(["-m", &config.memory, "-smp", &config.cpus.to_string()]);
            if by_pid {
                // QEMU's own default: private anonymous RAM.
                cmd.args(["-machine", "pc", "-no-reboot"]);
            } else {
                cmd.args(["-object", &format!("memory-backend-memfd,id=ram0,size={},share=on", config.memory)]);
                cmd.args(["-machine", "pc,memory-backend=ram0", "-no-reboot"]);
            }
            cmd.arg("-kernel").arg(&config.kernel);
            if let Some(initrd) = &config.initrd {
                cmd.arg("-initrd").arg(initrd);
            }
            cmd.args(["-append", &format!("console=ttyS0 {}", config.cmdline)]);
            for disk in &config.disk {
                cmd.arg("-drive").arg(qemu_drive(disk)?);
            }
            for (index, net) in config.net.iter().enumerate() {
                cmd.args(qemu_nic(index, net)?);
            }
            if let Some(vsock) = &config.vsock {
                cmd.arg("-device").arg(qemu_vsock(vsock)?);
            }
            cmd.arg("-serial").arg(format!("file:{}", dir.join("console.log").display()));
            cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()));
            unblocked(cmd)
                .stdin(Stdio::null())
                .stdout(log_file(dir, "source.log")?)
                .stderr(log_file(dir, "source.log")?)
                .spawn()
        }
        other => {
            return Err(LaunchError::Setting { what: "source kind", value: other.into(), expected: "specula or qemu" })
        }
    }
    .map_err(|source| LaunchError::Start { what: format!("the {} source", config.source), source })?;
    if by_pid {
        wait_for_console(&dir.join("console.log"), &mut child, "the source")?;
        let attach = vec!["--pid".to_string(), child.id().to_string()];
        return Ok((child, attach));
    }
    let (socket, attach) = match config.source.as_str() {
        "qemu" => (dir.join("qmp.sock"), vec!["--qemu-qmp".to_string()]),
        _ => (dir.join("mirror.sock"), vec!["--source-socket".to_string()]),
    };
    wait_for(&socket, &mut child, "the source")?;
    let mut attach = attach;
    attach.push(socket.display().to_string());
    Ok((child, attach))
}

/// Blocks SIGINT and SIGTERM and returns a flag a waiting thread sets when one comes.
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    if vmm::signals::block_stop_signals().is_ok() {
        let set_flag = flag.clone();
        let _ = std::thread::Builder::new().name("launch-signals".into()).spawn(move || {
            // SAFETY: sigset_t is plain data; sigwait on the signals blocked above.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigaddset(&mut set, libc::SIGTERM);
                let mut signal = 0;
                libc::sigwait(&set, &mut signal);
            }
            set_flag.store(true, Ordering::SeqCst);
        });
    }
    flag
}

fn stop(child: &mut Child) -> Option<ExitStatus> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Launches and supervises; returns the process exit code.
pub fn launch(config: &LaunchConfig) -> Result<u8, LaunchError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| LaunchError::File { path: config.dir.clone(), source })?;
    let stop_requested = stop_flag();
    let (mut source, attach) = start_source(config)?;
    let api = config.dir.join("api.sock");
    let mut cmd = Command::new(sibling("inspector"));
    cmd.args(&attach).args(["--all", "--serial", "null"]);
    cmd.arg("--api-socket").arg(&api).arg("--control-socket").arg(config.dir.join("control.sock"));
    for w in &config.watch {
        cmd.args(["--watch", w]);
    }
    let inspector = unblocked(cmd)
        .stdin(Stdio::null())
        .stdout(log_file(&config.dir, "inspector.log")?)
        .stderr(log_file(&config.dir, "inspector.log")?)
        .spawn();
    let mut inspector = match inspector {
        Ok(child) => child,
        Err(e) => {
            stop(&mut source);
            return Err(LaunchError::Start { what: "the inspector".into(), source: e });
        }
    };
    if let Err(e) = wait_for(&api, &mut inspector, "the inspector") {
        stop(&mut source);
        return Err(e);
    }
    println!("specula: {} source pid {} and inspector pid {} running", config.source, source.id(), inspector.id());
    follow_events(&api);
    println!(
        "specula: API at {} (specula --socket {} status); logs in {}",
        api.display(),
        api.display(),
        config.dir.display()
    );
    let mut source_done = false;
    loop {
        if stop_requested.load(Ordering::SeqCst) {
            println!("specula: stopping both");
            let i = stop(&mut inspector);
            let s = if source_done { None } else { stop(&mut source) };
            println!("specula: inspector {}, source {}", describe(i), describe(s));
            return Ok(0);
        }
        if !source_done {
            if let Ok(Some(status)) = source.try_wait() {
                source_done = true;
                // The inspector keeps serving the last contents.
                println!("specula: the source exited ({status}); the inspector keeps serving its last contents");
            }
        }
        if let Ok(Some(status)) = inspector.try_wait() {
            println!("specula: the inspector exited unexpectedly ({status}); stopping the source");
            if !source_done {
                stop(&mut source);
            }
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints the inspector's events (integrity changes, revokes, the source's state) as
/// they happen, from its API's event stream, on a thread of its own.
fn follow_events(api: &Path) {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(api) else { return };
    if write!(stream, "GET /v1/events HTTP/1.1\r\nhost: specula\r\n\r\n").is_err() {
        return;
    }
    let _ = std::thread::Builder::new().name("launch-events".into()).spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let Some(data) = line.strip_prefix("data:") else { continue };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "specula: event #{} {} {}",
                event["seq"],
                event["kind"].as_str().unwrap_or(""),
                event["detail"]
            );
            let _ = out.flush();
        }
    });
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map_or("already gone".into(), |s| format!("stopped ({s})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_files_use_the_flag_names_and_refuse_unknown_keys() {
        let config = LaunchConfig::from_toml(
            "source = \"qemu\"\nkernel = \"/k\"\ninitrd = \"/i\"\nmemory = \"512M\"\ndir = \"/run/x\"\nwatch = [\"0x1000:4K\"]\n",
        )
        .unwrap();
        assert_eq!((config.source.as_str(), config.cpus, config.accel.as_str()), ("qemu", 1, "tcg"));
        assert_eq!(config.watch, vec!["0x1000:4K".to_string()]);
        let err = LaunchConfig::from_toml("kernel = \"/k\"\ndir = \"/d\"\nmemroy = \"1G\"\n").unwrap_err();
        assert!(specula_common::error_chain(&err).contains("memroy"), "{err}");
        assert!(specula_common::error_chain(&LaunchConfig::from_toml("dir = \"/d\"\n").unwrap_err()).contains("kernel"));
    }

    #[test]
    fn launch_passes_virtio_disks_and_nets_to_qemu_in_its_own_syntax() {
        let config = LaunchConfig::from_toml(
            "kernel = \"/k\"\ndir = \"/d\"\ndisk = [\"path=/r.img,readonly=on\"]\nnet = [\"tap=t0,mac=52:54:00:00:00:09\"]\n",
        )
        .unwrap();
        assert_eq!(qemu_drive(&config.disk[0]).unwrap(), "file=/r.img,format=raw,if=virtio,readonly=on");
        assert_eq!(
            qemu_nic(0, &config.net[0]).unwrap().join(" "),
            "-netdev tap,id=net0,ifname=t0,script=no,downscript=no -device virtio-net,netdev=net0,mac=52:54:00:00:00:09"
        );
        // A comma cannot reach QEMU's option syntax: --disk's own parser splits on it.
        let err = qemu_drive("path=/a,b.img").unwrap_err().to_string();
        assert!(err.contains("unknown or empty option 'b.img'"), "{err}");
        assert!(qemu_nic(0, "mac=52:54:00:00:00:09").is_err());
    }

    #[test]
    fn launch_passes_a_virtio_vsock_to_qemu_as_vhost_vsock_and_names_a_bad_cid() {
        let config = LaunchConfig::from_toml("kernel = \"/k\"\ndir = \"/d\"\nvsock = \"cid=7\"\n").unwrap();
        assert_eq!(qemu_vsock(config.vsock.as_deref().unwrap()).unwrap(), "vhost-vsock-pci,guest-cid=7");
        let err = specula_common::error_chain(&qemu_vsock("cid=2").unwrap_err());
        assert!(err.contains("'2' is not a guest CID") && err.contains("cid=N"), "{err}");
    }
}
