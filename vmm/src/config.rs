//! VM configuration and the `vmm` command line, in the conventions of Cloud
//! Hypervisor and Firecracker (`--kernel`, `--memory 512M` or `size=512M`,
//! `--cpus 2` or `boot=2`, `--serial tty|file=PATH|null`).

use std::path::PathBuf;

use crate::arch::x86_64::mptable::MAX_SUPPORTED_CPUS;
use crate::boot::BootSource;
use crate::devices::serial::SerialOutput;
use crate::memory::parse_size;

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kvm_path: PathBuf,
    pub boot: BootSource,
    pub memory: u64,
    pub cpus: u8,
    pub serial: SerialOutput,
    /// Unix socket path on which to serve the mirror device (see the `mirror-driver` crate).
    pub mirror_socket: Option<PathBuf>,
    /// Peer uids allowed on the mirror and API sockets (empty: only the vmm's own uid).
    pub mirror_allow_uids: Vec<u32>,
    /// Ranges the mirror may grant (`None`: all of RAM).
    pub mirror_policy: Option<Vec<mirror_driver::protocol::Range>>,
    /// Whether a uid may be granted again a range the source revoked from it.
    pub mirror_regrant: bool,
    /// Drop to this (uid, gid) once /dev/kvm and the images are open (the jailer pattern).
    pub run_as: Option<(u32, u32)>,
    /// Unix socket path for the control API.
    pub api_socket: Option<PathBuf>,
    /// Guest TSC = host TSC (offset 0), so timestamps compare across VMs.
    pub host_tsc: bool,
    /// A doorbell device for a guest agent (library users only).
    pub doorbell: Option<std::sync::Arc<crate::devices::doorbell::Doorbell>>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// A bad command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("missing required argument --kernel")]
    MissingKernel,
    #[error("unknown argument '{0}' (see --help)")]
    UnknownArgument(String),
    #[error("argument {0} needs a value")]
    MissingValue(String),
    #[error("invalid value '{value}' for {flag}: {reason}")]
    BadValue { flag: String, value: String, reason: String },
}

/// `vmm --help` text.
pub const USAGE: &str = "\
Usage: vmm --kernel PATH [options]

Boots a guest on /dev/kvm: an ELF (PVH or 64-bit entry) or a bzImage.

Options:
  --kernel PATH            kernel or guest image (ELF vmlinux, bzImage, target/guest-images/*.elf)
  --initramfs PATH         initramfs to load at the top of low RAM
  --cmdline STRING         kernel command line
  --memory SIZE            guest RAM, e.g. 512M, 2G or size=512M (default 512M)
  --cpus N                 number of vCPUs, or boot=N (default 1)
  --serial MODE            COM1: tty (stdout/stdin, default), file=PATH, or null
  --mirror-socket PATH     serve the mirror device on this Unix socket
  --mirror-allow-uid UID   allow this uid to attach to the mirror socket and to use the
                           API socket (repeatable; default: the vmm's own uid)
  --mirror-policy GPA:LEN  only grant within these ranges (repeatable; default: all RAM)
  --mirror-allow-regrant   let a uid be granted again a range revoked from it (default: refused)
  --run-as UID:GID         drop to this uid and gid once /dev/kvm and the images are open
  --api-socket PATH        control socket: discard, revoke, grants, pause, resume, vcpus,
                           memory, stop
  --host-tsc               guest TSC reads the host TSC (offset 0): timestamps compare across VMs
  --kvm-device PATH        KVM device node (default /dev/kvm)
  -h, --help               print this help
  -V, --version            print the version

Exit status: the byte the guest writes to the debug-exit port (0x501); 0 after an
i8042 reset, SIGINT or SIGTERM; 1 for a configuration or start-up error; 3 if the
guest crashes (triple fault, emulation failure).
";

fn bad(flag: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadValue { flag: flag.into(), value: value.into(), reason: reason.into() }
}

/// Parses `--memory` values: `512M` or `size=512M`.
pub fn parse_memory(value: &str) -> Result<u64, ConfigError> {
    let size_text = value.strip_prefix("size=").unwrap_or(value);
    let size = parse_size(size_text).ok_or_else(|| bad("--memory", value, "expected a size such as 512M or 2G"))?;
    if size < crate::memory::MIN_MEMORY {
        return Err(bad("--memory", value, format!("at least {} MiB is needed", crate::memory::MIN_MEMORY >> 20)));
    }
    if !size.is_multiple_of(4096) {
        return Err(bad("--memory", value, "must be a multiple of 4 KiB"));
    }
    if size > crate::memory::MAX_MEMORY {
        return Err(bad("--memory", value, "larger than the 1 TiB limit"));
    }
    Ok(size)
}

/// Parses `--cpus` values: `2` or `boot=2`.
pub fn parse_cpus(value: &str) -> Result<u8, ConfigError> {
    let text = value.strip_prefix("boot=").unwrap_or(value);
    let cpus: u32 = text.parse().map_err(|_| bad("--cpus", value, "expected a number of vCPUs"))?;
    if cpus == 0 || cpus > u32::from(MAX_SUPPORTED_CPUS) {
        return Err(bad("--cpus", value, format!("must be between 1 and {MAX_SUPPORTED_CPUS}")));
    }
    Ok(cpus as u8)
}

/// Parses `--serial` values.
pub fn parse_serial(value: &str) -> Result<SerialOutput, ConfigError> {
    match value {
        "tty" => Ok(SerialOutput::Tty),
        "null" => Ok(SerialOutput::Null),
        _ => match value.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialOutput::File(PathBuf::from(path))),
            _ => Err(bad("--serial", value, "expected tty, null or file=PATH")),
        },
    }
}

/// Parses `GPA:LEN` (hex or decimal GPA; LEN with an optional K/M/G suffix).
pub fn parse_range(text: &str) -> Option<mirror_driver::protocol::Range> {
    let (gpa, len) = text.split_once(':')?;
    let gpa = match gpa.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => gpa.parse().ok()?,
    };
    let len = match len.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => parse_size(len)?,
    };
    (len > 0 && gpa.checked_add(len).is_some()).then_some(mirror_driver::protocol::Range { gpa, len })
}

/// Parses `UID:GID` (numeric).
pub fn parse_run_as(text: &str) -> Option<(u32, u32)> {
    let (uid, gid) = text.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// Parses the `vmm` command line (without the program name).
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut kernel = None;
    let mut initramfs = None;
    let mut cmdline = String::new();
    let mut memory = DEFAULT_MEMORY;
    let mut cpus = 1;
    let mut serial = SerialOutput::Tty;
    let mut kvm_path = PathBuf::from("/dev/kvm");
    let mut mirror_socket = None;
    let mut mirror_allow_uids = Vec::new();
    let mut mirror_policy: Option<Vec<mirror_driver::protocol::Range>> = None;
    let mut api_socket = None;
    let mut host_tsc = false;
    let mut mirror_regrant = false;
    let mut run_as = None;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| args.next()).ok_or_else(|| ConfigError::MissingValue(flag.clone()));
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initramfs" => initramfs = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = value()?,
            "--memory" => memory = parse_memory(&value()?)?,
            "--cpus" => cpus = parse_cpus(&value()?)?,
            "--serial" => serial = parse_serial(&value()?)?,
            "--kvm-device" => kvm_path = PathBuf::from(value()?),
            "--mirror-socket" => mirror_socket = Some(PathBuf::from(value()?)),
            "--mirror-allow-uid" => {
                let v = value()?;
                mirror_allow_uids.push(v.parse().map_err(|_| bad("--mirror-allow-uid", &v, "expected a numeric uid"))?);
            }
            "--mirror-policy" => {
                let v = value()?;
                let range = parse_range(&v)
                    .ok_or_else(|| bad("--mirror-policy", &v, "expected GPA:LEN, e.g. 0x1000000:64M"))?;
                mirror_policy.get_or_insert_with(Vec::new).push(range);
            }
            "--api-socket" => api_socket = Some(PathBuf::from(value()?)),
            "--host-tsc" => host_tsc = true,
            "--mirror-allow-regrant" => mirror_regrant = true,
            "--run-as" => {
                let v = value()?;
                run_as =
                    Some(parse_run_as(&v).ok_or_else(|| bad("--run-as", &v, "expected UID:GID, e.g. 65534:65534"))?);
            }
            _ => return Err(ConfigError::UnknownArgument(arg)),
        }
    }
    let kernel = kernel.ok_or(ConfigError::MissingKernel)?;
    Ok(Command::Run(Box::new(VmConfig {
        kvm_path,
        boot: BootSource { kernel, initramfs, cmdline, extra_memmap: Vec::new() },
        memory,
        cpus,
        serial,
        mirror_socket,
        mirror_allow_uids,
        mirror_policy,
        mirror_regrant,
        run_as,
        api_socket,
        host_tsc,
        doorbell: None,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run(list: &[&str]) -> VmConfig {
        match parse_args(args(list)).unwrap() {
            Command::Run(cfg) => *cfg,
            _ => panic!("expected a run command"),
        }
    }

    #[test]
    fn both_flag_styles_parse() {
        let cfg = run(&["--kernel", "k", "--memory", "size=1G", "--cpus", "boot=4", "--serial", "file=/tmp/x"]);
        assert_eq!(cfg.memory, 1 << 30);
        assert_eq!(cfg.cpus, 4);
        assert_eq!(cfg.serial, SerialOutput::File("/tmp/x".into()));
        let cfg = run(&["--kernel=k", "--memory=64M", "--cpus=2", "--cmdline", "a b=c"]);
        assert_eq!((cfg.memory, cfg.cpus, cfg.boot.cmdline.as_str()), (64 << 20, 2, "a b=c"));
    }

    #[test]
    fn bad_arguments_name_what_was_wrong() {
        assert_eq!(parse_args(args(&[])).unwrap_err(), ConfigError::MissingKernel);
        assert_eq!(parse_args(args(&["--bogus"])).unwrap_err(), ConfigError::UnknownArgument("--bogus".into()));
        assert_eq!(parse_args(args(&["--kernel"])).unwrap_err(), ConfigError::MissingValue("--kernel".into()));
        let err = parse_args(args(&["--kernel", "k", "--memory", "lots"])).unwrap_err().to_string();
        assert!(err.contains("--memory") && err.contains("lots"), "{err}");
        let err = parse_args(args(&["--kernel", "k", "--cpus", "0"])).unwrap_err().to_string();
        assert!(err.contains("between 1 and"), "{err}");
        assert!(parse_args(args(&["--kernel", "k", "--memory", "1M"])).is_err());
        assert!(parse_args(args(&["--kernel", "k", "--serial", "pty"])).is_err());
        let err = parse_args(args(&["--kernel", "k", "--run-as", "nobody"])).unwrap_err().to_string();
        assert!(err.contains("--run-as") && err.contains("UID:GID"), "{err}");
    }

    #[test]
    fn run_as_takes_numeric_ids() {
        assert_eq!(run(&["--kernel", "k", "--run-as", "65534:65533"]).run_as, Some((65534, 65533)));
        assert_eq!(run(&["--kernel", "k"]).run_as, None);
        assert_eq!(parse_run_as("1:x"), None);
    }
}
