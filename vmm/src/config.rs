//! VM configuration and the `vmm` command line, in the conventions of Cloud
//! Hypervisor and Firecracker (`--kernel`, `--memory 512M` or `size=512M`,
//! `--cpus 2` or `boot=2`, `--serial tty|file=PATH|null`).

use std::path::PathBuf;
use std::sync::Arc;

use specula_common::parse::{self, ParseError};

use crate::arch::x86_64::mptable::MAX_SUPPORTED_CPUS;
use crate::boot::{BootSource, KernelDecompress};
use crate::devices::serial::SerialOutput;
use crate::devices::{PioDevice, PortRange};
use crate::memory::MemoryBackend;

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kvm_path: PathBuf,
    pub boot: BootSource,
    /// Who decompresses a bzImage's payload: the vmm (default) or the kernel in the guest.
    pub kernel_decompress: KernelDecompress,
    pub memory: u64,
    /// What backs guest RAM: sealed memfd chunks (mirrorable through the socket) or
    /// private anonymous memory (as QEMU and Firecracker use by default).
    pub memory_backend: MemoryBackend,
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
    /// Whether inspectors may pause the source through the mirror device.
    pub mirror_allow_pause: bool,
    /// Whether inspectors may trace the guest through the mirror device (its writes to
    /// the system-call MSRs, reported and then applied).
    pub mirror_allow_trace: bool,
    /// Whether tracing inspectors may have software breakpoints patched into guest
    /// text (needs `mirror_allow_trace`).
    pub mirror_allow_trace_patches: bool,
    /// Drop to this (uid, gid) once /dev/kvm and the images are open (the jailer pattern).
    pub run_as: Option<(u32, u32)>,
    /// Unix socket path for the control API.
    pub api_socket: Option<PathBuf>,
    /// Guest TSC = host TSC (offset 0), so timestamps compare across VMs.
    pub host_tsc: bool,
    /// Port-I/O devices an embedding program adds to the vmm's own (the inspector's
    /// agent doorbell, say); a range that overlaps another device's fails the build.
    pub extra_pio_devices: Vec<(PortRange, Arc<dyn PioDevice>)>,
    /// `--log-level`, for the binary to apply.
    pub log_level: Option<String>,
    /// How the mirror's dirty-page feed learns which pages the guest wrote.
    pub dirty_log: DirtyLogMode,
    /// Entries in each vCPU's dirty ring, when the ring is used.
    pub dirty_ring_entries: u32,
    /// virtio-blk disks, in the order the guest finds them (`/dev/vda` first).
    pub disks: Vec<crate::devices::virtio::block::DiskConfig>,
    /// virtio-net devices on taps (`eth0` first), after the disks.
    pub nets: Vec<crate::devices::virtio::net::NetConfig>,
    /// A virtio-vsock device (through vhost-vsock), after the network devices.
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
}

/// How the source's dirty-page feed learns of writes (`--dirty-log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// The dirty ring where KVM offers it, else the bitmap.
    #[default]
    Auto,
    /// KVM's per-vCPU dirty ring; the vmm refuses to start without it.
    Ring,
    /// KVM's dirty bitmap (with manual protection where offered).
    Bitmap,
}

impl std::str::FromStr for DirtyLogMode {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let modes = [("auto", DirtyLogMode::Auto), ("ring", DirtyLogMode::Ring), ("bitmap", DirtyLogMode::Bitmap)];
        parse::choice(text, &modes, "auto, ring or bitmap")
    }
}

impl VmConfig {
    /// A VM that boots `kernel` with the defaults of the command line: 512 MiB, one vCPU,
    /// no serial console, no mirror or API socket (library users set what they need).
    pub fn with_kernel(kernel: PathBuf) -> Self {
        VmConfig {
            kvm_path: PathBuf::from("/dev/kvm"),
            boot: BootSource { kernel, initramfs: None, cmdline: String::new(), extra_memmap: Vec::new() },
            kernel_decompress: KernelDecompress::default(),
            memory: DEFAULT_MEMORY,
            memory_backend: MemoryBackend::default(),
            cpus: 1,
            serial: SerialOutput::Null,
            mirror_socket: None,
            mirror_allow_uids: Vec::new(),
            mirror_policy: None,
            mirror_regrant: false,
            mirror_allow_pause: false,
            mirror_allow_trace: false,
            mirror_allow_trace_patches: false,
            run_as: None,
            api_socket: None,
            host_tsc: false,
            extra_pio_devices: Vec::new(),
            log_level: None,
            dirty_log: DirtyLogMode::default(),
            dirty_ring_entries: crate::vstate::dirty_ring::DEFAULT_ENTRIES,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<VmConfig>),
    /// `--help`: the text to print.
    Help(String),
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
    #[error("invalid value '{value}' for {flag}")]
    Parse {
        flag: String,
        value: String,
        #[source]
        source: ParseError,
    },
    /// Anything else the command-line parser refused, in its words.
    #[error("{0}")]
    Cli(String),
}

/// Text after the options in `vmm --help`.
const AFTER_HELP: &str = "\
Exit status: the byte the guest writes to the debug-exit port (0x501); 0 after an
i8042 reset, SIGINT or SIGTERM; 1 for a configuration or start-up error; 3 if the
guest crashes (triple fault, emulation failure).";

/// The `vmm` command line.
#[derive(clap::Parser, Debug)]
#[command(name = "vmm", version, args_override_self = true, about = "Boots a guest on /dev/kvm: an ELF (PVH or 64-bit entry) or a bzImage.", after_help = AFTER_HELP)]
struct Args {
    /// Kernel or guest image (ELF vmlinux, bzImage, target/guest-images/*.elf).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs to load at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,
    /// Who decompresses a bzImage: vmm (decompress it here and enter the uncompressed
    /// kernel; gzip, xz, zstd, lz4) or guest (run the kernel's own decompressor).
    #[arg(long, value_name = "WHO", default_value = "vmm", value_parser = parse_kernel_decompress)]
    kernel_decompress: KernelDecompress,
    /// Guest RAM, e.g. 512M, 2G or size=512M.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    memory: u64,
    /// What backs guest RAM: memfd (sealed memfd chunks, which the mirror socket shares)
    /// or anon (private anonymous memory, as QEMU and Firecracker use by default;
    /// reachable only through the kernel mirror device, `inspector --pid`).
    #[arg(long, value_name = "KIND", default_value = "memfd", value_parser = parse_memory_backend)]
    memory_backend: MemoryBackend,
    /// Number of vCPUs, or boot=N.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    cpus: u8,
    /// COM1: tty (stdout/stdin), file=PATH, or null.
    #[arg(long, value_name = "MODE", default_value = "tty", value_parser = parse_serial)]
    serial: SerialOutput,
    /// Serve the mirror device on this Unix socket.
    #[arg(long, value_name = "PATH")]
    mirror_socket: Option<PathBuf>,
    /// Allow this uid to attach to the mirror socket and to use the API socket (repeatable;
    /// default: the vmm's own uid).
    #[arg(long = "mirror-allow-uid", value_name = "UID")]
    mirror_allow_uids: Vec<u32>,
    /// Only grant within these ranges (repeatable; default: all RAM).
    #[arg(long = "mirror-policy", value_name = "GPA:LEN", value_parser = parse_policy)]
    mirror_policy: Vec<mirror_driver::protocol::Range>,
    /// Let a uid be granted again a range revoked from it (default: refused).
    #[arg(long = "mirror-allow-regrant")]
    mirror_regrant: bool,
    /// Let inspectors pause and resume the source (each holds at most one pause, released
    /// when it resumes or hangs up).
    #[arg(long = "mirror-allow-pause")]
    mirror_allow_pause: bool,
    /// Let inspectors trace the guest: its writes to LSTAR, CSTAR, SYSENTER_EIP, EFER and
    /// DEBUGCTL exit to the vmm while an inspector subscribes, are reported, then applied,
    /// and up to four hardware breakpoints report what their captures read (at most 1000
    /// events a second; the rest are counted as dropped).
    #[arg(long = "mirror-allow-trace")]
    mirror_allow_trace: bool,
    /// Also let tracing inspectors set software breakpoints, where the debug registers
    /// do not work: the vmm writes a 2-byte `out` over a no-op in guest text (and puts
    /// the no-op back when they are removed). The guest can see it.
    #[arg(long = "mirror-allow-trace-patches", requires = "mirror_allow_trace")]
    mirror_allow_trace_patches: bool,
    /// Drop to this uid and gid once /dev/kvm and the images are open.
    #[arg(long, value_name = "UID:GID", value_parser = parse_run_as_arg)]
    run_as: Option<(u32, u32)>,
    /// Control socket: discard, revoke, grants, pause, resume, vcpus, memory, stop.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Guest TSC reads the host TSC (offset 0): timestamps compare across VMs.
    #[arg(long)]
    host_tsc: bool,
    /// KVM device node.
    #[arg(long = "kvm-device", value_name = "PATH", default_value = "/dev/kvm")]
    kvm_path: PathBuf,
    /// Log level: error, warn, info, debug or trace (default: SPECULA_LOG, else warn).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// How the mirror's dirty-page feed learns of writes: auto (KVM's dirty ring where
    /// offered, else its bitmap), ring, or bitmap.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = parse_dirty_log)]
    dirty_log: DirtyLogMode,
    /// Entries in each vCPU's dirty ring (a power of two, 1024 to 65536; 16 bytes each).
    #[arg(long, value_name = "N", default_value_t = crate::vstate::dirty_ring::DEFAULT_ENTRIES, value_parser = parse_dirty_ring_entries)]
    dirty_ring_entries: u32,
    /// A virtio-blk disk over a raw image: `path=FILE[,readonly=on]`. Repeatable; the
    /// guest sees them as /dev/vda, /dev/vdb, ... in this order.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]", value_parser = parse_disk)]
    disks: Vec<crate::devices::virtio::block::DiskConfig>,
    /// A virtio-net device on a tap: `tap=NAME[,mac=52:54:00:12:34:56]`. Repeatable.
    /// The tap must exist and be the vmm user's, or the vmm must run as root (the
    /// kernel then creates it for the vmm's lifetime). Without mac=, one derived
    /// from the tap's name.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<crate::devices::virtio::net::NetConfig>,
    /// A virtio-vsock device with guest context ID N (3 to 4294967294, unique on the
    /// host), served by the host kernel's vhost-vsock (/dev/vhost-vsock): host
    /// programs connect to (N, port) with AF_VSOCK sockets.
    #[arg(long = "vsock", value_name = "cid=N", value_parser = parse_vsock)]
    vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
}

/// Parses `--vsock cid=N`.
pub fn parse_vsock(value: &str) -> Result<crate::devices::virtio::vsock::VsockConfig, ConfigError> {
    use crate::devices::virtio::vsock::VsockConfig;
    let mut cid = None;
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("cid", text)) => match text.parse::<u64>() {
                Ok(n) if VsockConfig::valid_cid(n) => cid = Some(n),
                _ => {
                    return Err(bad(
                        "--vsock",
                        value,
                        format!("'{text}' is not a guest CID (3 to 4294967294; 0 to 2 and -1 are reserved)"),
                    ))
                }
            },
            _ => return Err(bad("--vsock", value, format!("unknown option '{part}' (expected cid=N)"))),
        }
    }
    Ok(VsockConfig { cid: cid.ok_or_else(|| bad("--vsock", value, "no cid=N"))? })
}

/// Parses `--net tap=NAME[,mac=MAC]`.
pub fn parse_net(value: &str) -> Result<crate::devices::virtio::net::NetConfig, ConfigError> {
    use crate::devices::virtio::net::{default_mac, parse_mac, NetConfig};
    let (mut tap, mut mac) = (None, None);
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 && !name.contains(['/', ' ']) => {
                tap = Some(name.to_string())
            }
            Some(("tap", name)) => {
                return Err(bad(
                    "--net",
                    value,
                    format!("'{name}' is not an interface name (1 to 15 characters, no '/')"),
                ))
            }
            Some(("mac", text)) => {
                mac = Some(parse_mac(text).ok_or_else(|| {
                    bad("--net", value, format!("'{text}' is not a unicast MAC address like 52:54:00:12:34:56"))
                })?)
            }
            _ => return Err(bad("--net", value, format!("unknown option '{part}' (expected tap=NAME, mac=MAC)"))),
        }
    }
    let tap = tap.ok_or_else(|| bad("--net", value, "no tap=NAME"))?;
    Ok(NetConfig { mac: mac.unwrap_or_else(|| default_mac(&tap)), tap })
}

/// Parses `--disk path=FILE[,readonly=on|off]` (a bare `FILE` is taken as the path).
pub fn parse_disk(value: &str) -> Result<crate::devices::virtio::block::DiskConfig, ConfigError> {
    let mut path = None;
    let mut read_only = false;
    for (i, part) in value.split(',').enumerate() {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("readonly" | "ro", v)) => {
                read_only = match v {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(bad("--disk", value, format!("readonly takes on or off, not '{v}'"))),
                }
            }
            None if i == 0 && !part.is_empty() => path = Some(PathBuf::from(part)),
            _ => {
                return Err(bad(
                    "--disk",
                    value,
                    format!("unknown or empty option '{part}' (expected path=FILE, readonly=on|off)"),
                ))
            }
        }
    }
    let path = path.ok_or_else(|| bad("--disk", value, "no path=FILE"))?;
    Ok(crate::devices::virtio::block::DiskConfig { path, read_only })
}

fn parse_dirty_log(value: &str) -> Result<DirtyLogMode, ConfigError> {
    value.parse().map_err(|source| parse_error("--dirty-log", value, source))
}

fn parse_dirty_ring_entries(value: &str) -> Result<u32, ConfigError> {
    use crate::vstate::dirty_ring::{MAX_ENTRIES, MIN_ENTRIES};
    match value.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (MIN_ENTRIES..=MAX_ENTRIES).contains(&n) => Ok(n),
        _ => Err(bad(
            "--dirty-ring-entries",
            value,
            format!("expected a power of two from {MIN_ENTRIES} to {MAX_ENTRIES}"),
        )),
    }
}

fn parse_memory_backend(value: &str) -> Result<MemoryBackend, ConfigError> {
    match value {
        "memfd" => Ok(MemoryBackend::Memfd),
        "anon" => Ok(MemoryBackend::Anonymous),
        _ => Err(bad("--memory-backend", value, "expected memfd or anon")),
    }
}

fn parse_kernel_decompress(value: &str) -> Result<KernelDecompress, ConfigError> {
    value.parse().map_err(|source| parse_error("--kernel-decompress", value, source))
}

fn parse_policy(value: &str) -> Result<mirror_driver::protocol::Range, ConfigError> {
    let range = parse::range(value).map_err(|source| parse_error("--mirror-policy", value, source))?;
    Ok(mirror_driver::protocol::Range { gpa: range.gpa, len: range.len })
}

fn parse_run_as_arg(value: &str) -> Result<(u32, u32), ConfigError> {
    parse_run_as(value).ok_or_else(|| bad("--run-as", value, "expected UID:GID, e.g. 65534:65534"))
}

fn bad(flag: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadValue { flag: flag.into(), value: value.into(), reason: reason.into() }
}

fn parse_error(flag: &str, value: &str, source: ParseError) -> ConfigError {
    ConfigError::Parse { flag: flag.into(), value: value.into(), source }
}

/// Parses `--memory` values: `512M` or `size=512M`.
pub fn parse_memory(value: &str) -> Result<u64, ConfigError> {
    let size_text = value.strip_prefix("size=").unwrap_or(value);
    // One whole message: the inspector's clap shows only an error's top message.
    let size = parse::size(size_text).map_err(|_| bad("--memory", value, "expected a size such as 512M or 2G"))?;
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
///
/// Kept for callers that take `None` for a bad range (the fuzz targets):
/// [`specula_common::parse::range`] says why.
pub fn parse_range(text: &str) -> Option<mirror_driver::protocol::Range> {
    parse::range(text).ok().map(|range| mirror_driver::protocol::Range { gpa: range.gpa, len: range.len })
}

/// Parses `UID:GID` (numeric).
pub fn parse_run_as(text: &str) -> Option<(u32, u32)> {
    let (uid, gid) = text.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// clap's message in one line, without its `error: ` prefix and usage hints.
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or("");
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// What a command line that clap did not turn into [`Args`] asks for: help, the
/// version, or nothing (a [`ConfigError`] that names what was wrong).
fn cli_outcome(e: &clap::Error) -> Result<Command, ConfigError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let invalid_arg = || e.get(ContextKind::InvalidArg).map(|v| v.to_string()).unwrap_or_default();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            Ok(Command::Help(e.render().to_string()))
        }
        ErrorKind::DisplayVersion => Ok(Command::Version),
        ErrorKind::MissingRequiredArgument => match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::Strings(missing)) if missing.iter().any(|arg| arg.starts_with("--kernel")) => {
                Err(ConfigError::MissingKernel)
            }
            _ => Err(ConfigError::Cli(first_line(e))),
        },
        ErrorKind::UnknownArgument => Err(ConfigError::UnknownArgument(invalid_arg())),
        // An option given last, without its value: clap reports an empty value.
        ErrorKind::InvalidValue if matches!(e.get(ContextKind::InvalidValue), Some(ContextValue::String(value)) if value.is_empty()) => {
            Err(ConfigError::MissingValue(invalid_arg().split_whitespace().next().unwrap_or("").to_string()))
        }
        // A value our own parsers refused: their message names the flag and the value.
        ErrorKind::ValueValidation => {
            let inner = std::error::Error::source(e).map(crate::error_chain);
            Err(ConfigError::Cli(inner.unwrap_or_else(|| first_line(e))))
        }
        _ => Err(ConfigError::Cli(first_line(e))),
    }
}

/// Parses the `vmm` command line (without the program name).
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    use clap::Parser;
    let args = match Args::try_parse_from(std::iter::once("vmm".to_string()).chain(args)) {
        Ok(args) => args,
        Err(e) => return cli_outcome(&e),
    };
    if let Some(level) = &args.log_level {
        crate::logger::parse_level(level).map_err(|e| bad("--log-level", level, e.to_string()))?;
    }
    if args.memory_backend == MemoryBackend::Anonymous {
        if let Some(socket) = &args.mirror_socket {
            return Err(bad(
                "--mirror-socket",
                &socket.display().to_string(),
                "the mirror socket shares memfd RAM; with --memory-backend anon, inspect through the kernel mirror device (inspector --pid)",
            ));
        }
    }
    Ok(Command::Run(Box::new(VmConfig {
        kvm_path: args.kvm_path,
        boot: BootSource {
            kernel: args.kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline,
            extra_memmap: Vec::new(),
        },
        kernel_decompress: args.kernel_decompress,
        memory: args.memory,
        memory_backend: args.memory_backend,
        cpus: args.cpus,
        serial: args.serial,
        mirror_socket: args.mirror_socket,
        mirror_allow_uids: args.mirror_allow_uids,
        mirror_policy: (!args.mirror_policy.is_empty()).then_some(args.mirror_policy),
        mirror_regrant: args.mirror_regrant,
        mirror_allow_pause: args.mirror_allow_pause,
        mirror_allow_trace: args.mirror_allow_trace,
        mirror_allow_trace_patches: args.mirror_allow_trace_patches,
        run_as: args.run_as,
        api_socket: args.api_socket,
        host_tsc: args.host_tsc,
        extra_pio_devices: Vec::new(),
        log_level: args.log_level,
        dirty_log: args.dirty_log,
        dirty_ring_entries: args.dirty_ring_entries,
        disks: args.disks,
        nets: args.nets,
        vsock: args.vsock,
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
        assert_eq!(run(&["--kernel", "k", "--memory", "64M", "--memory", "1G"]).memory, 1 << 30, "the last one wins");
        assert_eq!((cfg.memory, cfg.cpus, cfg.boot.cmdline.as_str()), (64 << 20, 2, "a b=c"));
    }

    #[test]
    fn virtio_disks_parse_in_order_and_bad_options_are_named() {
        let config =
            run(&["--kernel", "k", "--disk", "path=/a.img", "--disk", "path=/b.img,readonly=on", "--disk", "/c.img"]);
        let disks: Vec<_> = config.disks.iter().map(|d| (d.path.to_str().unwrap(), d.read_only)).collect();
        assert_eq!(disks, [("/a.img", false), ("/b.img", true), ("/c.img", false)]);
        for (value, named) in [
            ("readonly=on", "no path=FILE"),
            ("path=/a,readonly=maybe", "readonly takes on or off"),
            ("path=/a,cache=none", "unknown or empty option 'cache=none'"),
            ("path=", "unknown or empty option 'path='"),
        ] {
            let err = parse_args(args(&["--kernel", "k", "--disk", value])).unwrap_err().to_string();
            assert!(err.contains("--disk") && err.contains(named), "{value}: {err}");
        }
    }

    #[test]
    fn virtio_nets_parse_and_bad_options_are_named() {
        let config = run(&["--kernel", "k", "--net", "tap=tap0,mac=52:54:00:00:00:01", "--net", "tap=tap1"]);
        assert_eq!(config.nets[0].tap, "tap0");
        assert_eq!(config.nets[0].mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(config.nets[1].mac, crate::devices::virtio::net::default_mac("tap1"));
        for (value, named) in [
            ("mac=52:54:00:00:00:01", "no tap=NAME"),
            ("tap=a/b", "not an interface name"),
            ("tap=0123456789abcdef", "not an interface name"),
            ("tap=t,mac=01:00:5e:00:00:01", "not a unicast MAC"),
            ("tap=t,queues=4", "unknown option 'queues=4'"),
        ] {
            let err = parse_args(args(&["--kernel", "k", "--net", value])).unwrap_err().to_string();
            assert!(err.contains("--net") && err.contains(named), "{value}: {err}");
        }
    }

    #[test]
    fn virtio_vsock_parses_and_bad_cids_are_named() {
        assert_eq!(run(&["--kernel", "k", "--vsock", "cid=42"]).vsock.map(|v| v.cid), Some(42));
        assert_eq!(run(&["--kernel", "k"]).vsock, None);
        for (value, named) in [
            ("cid=2", "'2' is not a guest CID"),
            ("cid=4294967295", "'4294967295' is not a guest CID"),
            ("cid=x", "'x' is not a guest CID"),
            ("port=5", "unknown option 'port=5'"),
            ("", "unknown option ''"),
        ] {
            let err = parse_args(args(&["--kernel", "k", "--vsock", value])).unwrap_err().to_string();
            assert!(err.contains("--vsock") && err.contains(named), "{value}: {err}");
        }
    }

    #[test]
    fn bad_arguments_name_what_was_wrong() {
        assert_eq!(parse_args(args(&[])).unwrap_err(), ConfigError::MissingKernel);
        assert_eq!(parse_args(args(&["--bogus"])).unwrap_err(), ConfigError::UnknownArgument("--bogus".into()));
        assert_eq!(parse_args(args(&["--kernel"])).unwrap_err(), ConfigError::MissingValue("--kernel".into()));
        let err = parse_args(args(&["--kernel", "k", "--log-level", "loud"])).unwrap_err().to_string();
        assert!(err.contains("--log-level") && err.contains("not a log level"), "{err}");
        let err = parse_args(args(&["--kernel", "k", "--memory", "lots"])).unwrap_err().to_string();
        assert!(err.contains("--memory") && err.contains("lots"), "{err}");
        let err = parse_args(args(&["--kernel", "k", "--cpus", "0"])).unwrap_err().to_string();
        assert!(err.contains("between 1 and"), "{err}");
        assert!(parse_args(args(&["--kernel", "k", "--memory", "1M"])).is_err());
        assert!(parse_args(args(&["--kernel", "k", "--serial", "pty"])).is_err());
        let err = parse_args(args(&["--kernel", "k", "--run-as", "nobody"])).unwrap_err().to_string();
        assert!(err.contains("--run-as") && err.contains("UID:GID"), "{err}");
        let err = parse_args(args(&["--kernel", "k", "--mirror-policy", "0x1000:0"])).unwrap_err().to_string();
        assert!(err.contains("--mirror-policy") && err.contains("length is 0"), "{err}");
    }

    #[test]
    fn the_memory_backend_parses_and_anonymous_ram_cannot_be_served_on_a_mirror_socket() {
        assert_eq!(run(&["--kernel", "k"]).memory_backend, MemoryBackend::Memfd);
        assert_eq!(run(&["--kernel", "k", "--memory-backend", "anon"]).memory_backend, MemoryBackend::Anonymous);
        let err = parse_args(args(&["--kernel", "k", "--memory-backend", "hugetlb"])).unwrap_err().to_string();
        assert!(err.contains("--memory-backend") && err.contains("memfd or anon"), "{err}");
        let err = parse_args(args(&["--kernel", "k", "--memory-backend", "anon", "--mirror-socket", "/tmp/m.sock"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--mirror-socket") && err.contains("inspector --pid"), "{err}");
    }

    #[test]
    fn dirty_log_mode_and_ring_size_parse_and_bad_values_are_named() {
        let cfg = run(&["--kernel", "k"]);
        assert_eq!((cfg.dirty_log, cfg.dirty_ring_entries), (DirtyLogMode::Auto, 16384));
        let cfg = run(&["--kernel", "k", "--dirty-log", "ring", "--dirty-ring-entries", "1024"]);
        assert_eq!((cfg.dirty_log, cfg.dirty_ring_entries), (DirtyLogMode::Ring, 1024));
        assert_eq!(run(&["--kernel", "k", "--dirty-log=bitmap"]).dirty_log, DirtyLogMode::Bitmap);
        for (flag, value) in
            [("--dirty-log", "rings"), ("--dirty-ring-entries", "1000"), ("--dirty-ring-entries", "512")]
        {
            let error = parse_args(args(&["--kernel", "k", flag, value])).unwrap_err().to_string();
            assert!(error.contains(flag) && error.contains(value), "{error}");
        }
    }

    #[test]
    fn kernel_decompress_defaults_to_the_vmm() {
        assert_eq!(run(&["--kernel", "k"]).kernel_decompress, KernelDecompress::Vmm);
        assert_eq!(run(&["--kernel", "k", "--kernel-decompress", "guest"]).kernel_decompress, KernelDecompress::Guest);
        assert_eq!(run(&["--kernel", "k", "--kernel-decompress=vmm"]).kernel_decompress, KernelDecompress::Vmm);
        let err = parse_args(args(&["--kernel", "k", "--kernel-decompress", "cpu"])).unwrap_err().to_string();
        assert!(err.contains("--kernel-decompress") && err.contains("vmm or guest"), "{err}");
    }

    #[test]
    fn run_as_takes_numeric_ids() {
        assert_eq!(run(&["--kernel", "k", "--run-as", "65534:65533"]).run_as, Some((65534, 65533)));
        assert_eq!(run(&["--kernel", "k"]).run_as, None);
        assert_eq!(parse_run_as("1:x"), None);
    }
}
