//! `specula launch`: starts a source and an inspector attached to it, and supervises
//! both. The source is a Specula `vmm` running a guest image, or a Linux guest under an
//! unmodified QEMU (TCG or KVM) with memfd RAM. Ctrl-C (or SIGTERM) stops both; a crash
//! of either is reported and stops the other. The inspector's API socket and the
//! source's sockets live in one run directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What to launch (the command line's flags, or a TOML file with the same names).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// `specula` (a `vmm` guest image) or `qemu` (a Linux kernel under QEMU).
    #[serde(default = "default_source")]
    pub source: String,
    /// Guest image or Linux kernel.
    pub kernel: PathBuf,
    /// Initramfs (QEMU sources).
    pub initrd: Option<PathBuf>,
    /// Guest RAM, e.g. `512M`.
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Kernel command line (QEMU sources).
    #[serde(default)]
    pub cmdline: String,
    /// Where the sockets and logs go.
    pub dir: PathBuf,
    /// Integrity watches, `GPA:LEN`.
    #[serde(default)]
    pub watch: Vec<String>,
    /// QEMU accelerator (`tcg` or `kvm`).
    #[serde(default = "default_accel")]
    pub accel: String,
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
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| format!("bad launch file: {e}"))
    }
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

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    std::fs::File::create(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
}

fn wait_for(path: &Path, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited ({status}) before {} appeared", path.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: {} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts the source; returns it and the inspector's attach flags.
fn start_source(config: &LaunchConfig) -> Result<(Child, Vec<String>), String> {
    let dir = &config.dir;
    let mut child = match config.source.as_str() {
        "specula" => {
            let mut cmd = Command::new(sibling("vmm"));
            cmd.arg("--kernel").arg(&config.kernel);
            cmd.args(["--memory", &config.memory, "--cpus", &config.cpus.to_string()]);
            cmd.arg("--serial").arg(format!("file={}", dir.join("console.log").display()));
            cmd.arg("--mirror-socket").arg(dir.join("mirror.sock"));
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
            cmd.args(["-object", &format!("memory-backend-memfd,id=ram0,size={},share=on", config.memory)]);
            cmd.args(["-machine", "pc,memory-backend=ram0", "-no-reboot"]);
            cmd.arg("-kernel").arg(&config.kernel);
            if let Some(initrd) = &config.initrd {
                cmd.arg("-initrd").arg(initrd);
            }
            cmd.args(["-append", &format!("console=ttyS0 {}", config.cmdline)]);
            cmd.arg("-serial").arg(format!("file:{}", dir.join("console.log").display()));
            cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()));
            unblocked(cmd)
                .stdin(Stdio::null())
                .stdout(log_file(dir, "source.log")?)
                .stderr(log_file(dir, "source.log")?)
                .spawn()
        }
        other => return Err(format!("unknown source kind '{other}': specula or qemu")),
    }
    .map_err(|e| format!("cannot start the {} source: {e}", config.source))?;
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
pub fn launch(config: &LaunchConfig) -> Result<u8, String> {
    std::fs::create_dir_all(&config.dir).map_err(|e| format!("{}: {e}", config.dir.display()))?;
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
            return Err(format!("cannot start the inspector: {e}"));
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
        assert!(err.contains("memroy"), "{err}");
        assert!(LaunchConfig::from_toml("dir = \"/d\"\n").unwrap_err().contains("kernel"));
    }
}
