//! `inspector`: the daemon, or a client of a running daemon's control socket.
//!
//! ```text
//! inspector (--source-socket PATH | --qemu-qmp PATH [--qemu-pid PID] | --pid PID) (--range GPA:LEN ... | --all)
//!           [--control-socket PATH] [--api-socket PATH] [--watch GPA:LEN ...] [options]
//! inspector read|hash|scan|watch|check|grants|status|vcpus|pause|resume|write-probe|latency
//!           --control-socket PATH ARGS...
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use inspector::line;
use inspector::startup::{self, DaemonConfig, DaemonError};
use inspector::view_cache::ViewCacheMode;
use mirror_driver::protocol::Range;
use vmm::config::{parse_memory, parse_serial};
use vmm::devices::serial::SerialOutput;
use vmm::{error_chain, VmExit};

#[derive(Parser)]
#[command(
    name = "inspector",
    version,
    args_conflicts_with_subcommands = true,
    about = "Attach to a source (a Specula vmm's mirror socket, or an unmodified QEMU through its QMP \
             socket: its RAM must be a shared memfd backend, -object memory-backend-memfd,id=ram0,size=SIZE,share=on \
             -machine memory-backend=ram0, or any KVM VMM by pid through the kernel mirror device), map its RAM read-only into an agent VM, and serve analysis requests."
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    request: Option<Request>,
}

#[derive(Args)]
#[command(args_override_self = true)]
struct DaemonArgs {
    /// A Specula vmm's mirror socket.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["qemu_qmp", "pid"])]
    source_socket: Option<PathBuf>,
    /// Any KVM VMM by pid (QEMU, our vmm, ...; anonymous RAM included), through the
    /// kernel mirror device (specula_mirror.ko; mirror-driver/kmod/README.md).
    #[arg(long, value_name = "PID", conflicts_with = "qemu_qmp")]
    pid: Option<u32>,
    /// The kernel mirror device, with --pid.
    #[arg(long, value_name = "PATH", requires = "pid", default_value = mirror_driver::kernel_mirror::DEVICE)]
    mirror_device: PathBuf,
    /// An unmodified QEMU's QMP socket.
    #[arg(long, value_name = "PATH")]
    qemu_qmp: Option<PathBuf>,
    /// QEMU's pid (default: the QMP socket's peer).
    #[arg(long, value_name = "PID", requires = "qemu_qmp")]
    qemu_pid: Option<u32>,
    /// A range to map (repeatable).
    #[arg(long = "range", value_name = "GPA:LEN", value_parser = range_arg, conflicts_with = "all")]
    ranges: Vec<Range>,
    /// Map all of the source's RAM.
    #[arg(long)]
    all: bool,
    /// Serve line requests on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Serve the HTTP/JSON API (/v1, OpenAPI at /v1/openapi.json) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// May use the API's views (repeatable).
    #[arg(long = "api-read-uid", value_name = "UID")]
    api_read_uids: Vec<u32>,
    /// May also pause/resume and manage watches (repeatable; default: the inspector's own uid).
    #[arg(long = "api-control-uid", value_name = "UID")]
    api_control_uids: Vec<u32>,
    /// Keep an integrity watch on a range (repeatable); changes are reported as they happen.
    #[arg(long = "watch", value_name = "GPA:LEN", value_parser = range_arg)]
    watches: Vec<Range>,
    /// How often watches are checked.
    #[arg(long, value_name = "N", default_value_t = 250)]
    watch_interval_ms: u64,
    /// Do not subscribe to a Specula source's dirty-page feed: polled watches then re-hash
    /// every watched page each interval, as they do with QEMU sources.
    #[arg(long)]
    no_dirty_log: bool,
    /// The agent image to boot (default: the one built into this binary).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Which OS views are kept and served again while the dirty-page feed and a re-hash
    /// of what their walk read say nothing changed: `auto`, the kinds whose walk costs
    /// more than twice the feed's barrier; `always`; `off`, every request walks.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ViewCacheMode::Auto)]
    view_cache: ViewCacheMode,
    /// Most MB/s (10^6 bytes) a scan reads from the source, to bound its slowdown: the agent
    /// idles between steps to keep under it. Default: no limit.
    #[arg(long, value_name = "MBPS", value_parser = clap::value_parser!(u64).range(1..))]
    scan_rate_limit: Option<u64>,
    /// Agent VM RAM.
    #[arg(long, value_name = "SIZE", default_value = "192M", value_parser = parse_memory)]
    memory: u64,
    /// Where the agent's console goes: tty, null or file=PATH.
    #[arg(long, value_name = "MODE", default_value = "tty", value_parser = parse_serial)]
    serial: SerialOutput,
    /// Log level: error, warn, info, debug or trace (default: SPECULA_LOG, else warn).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn range_arg(text: &str) -> Result<Range, specula_common::ParseError> {
    specula_common::parse::range(text).map(|r| Range { gpa: r.gpa, len: r.len })
}

/// Why the inspector (daemon or client) stopped with an error.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("cannot reach the inspector at {socket}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The running inspector refused the request; its reply says why.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(&'static str),
    /// The request's words are not a request the control socket serves.
    #[error("bad request {0}")]
    BadRequest(String),
    /// Asked for a request's help: printed, and not an error.
    #[error("{0}")]
    Help(String),
    #[error("--log-level")]
    LogLevel(#[from] vmm::logger::LoggerError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// A request to a running inspector: the words of any request its control socket
/// serves (`inspector status --control-socket PATH`, `inspector trace-start exec
/// --control-socket PATH`, ...), checked here with the socket's own parser before they
/// are sent, so the binary never lags behind the requests the inspector knows.
#[derive(Subcommand)]
enum Request {
    #[command(external_subcommand)]
    Words(Vec<String>),
}

/// Where the requests are listed in `--help`.
fn requests_help() -> String {
    let api = <specula_api::Request as clap::Subcommand>::augment_subcommands(clap::Command::new("requests"));
    let mut names: Vec<String> = line::LINE_ONLY_REQUESTS.iter().map(|n| n.to_string()).collect();
    names.extend(api.get_subcommands().map(|c| c.get_name().to_string()));
    format!(
        "Requests to a running inspector: inspector REQUEST [ARGS...] --control-socket PATH, one of: {}.\n\
         Exit status: 0 on success; 1 on a bad argument, a refused attach or an error reply.",
        names.join(", ")
    )
}

/// clap's help for a request with a clap syntax (`inspector trace-start --help`).
fn request_help(words: &[&str]) -> String {
    let requests = <specula_api::Request as clap::Subcommand>::augment_subcommands(
        clap::Command::new("inspector").override_usage("inspector REQUEST [ARGS...] --control-socket PATH"),
    );
    match requests.try_get_matches_from(std::iter::once("inspector").chain(words.iter().copied())) {
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.render().to_string(),
        _ => format!("{}: see `inspector --help` and the line socket's requests in inspector/src/line.rs\n", words[0]),
    }
}

impl Request {
    /// The control socket and the request line: `--control-socket PATH` (or `=PATH`)
    /// may stand anywhere among the words.
    fn line(&self) -> Result<(PathBuf, String), MainError> {
        let Request::Words(words) = self;
        let mut socket = None;
        let mut rest = Vec::with_capacity(words.len());
        let mut words = words.iter();
        while let Some(word) = words.next() {
            if word == "--control-socket" {
                socket = Some(words.next().ok_or(MainError::Usage("--control-socket needs a PATH"))?.into());
            } else if let Some(path) = word.strip_prefix("--control-socket=") {
                socket = Some(path.into());
            } else if word.is_empty() || word.contains(char::is_whitespace) {
                return Err(MainError::BadRequest(format!("request word {word:?} is empty or holds white space")));
            } else {
                rest.push(word.as_str());
            }
        }
        if rest.iter().any(|w| matches!(*w, "--help" | "-h")) {
            return Err(MainError::Help(request_help(&rest)));
        }
        let socket =
            socket.ok_or(MainError::Usage("a request needs --control-socket PATH (the running inspector's)"))?;
        let line = rest.join(" ");
        line::parse(&line).map_err(|e| MainError::BadRequest(format!("{line:?}: {e}")))?;
        Ok((socket, line))
    }
}

fn main() -> ExitCode {
    if let Err(e) = vmm::signals::block_stop_signals().map_err(|e| e.to_string()).and_then(|()| {
        // Grants and the agent's memory live in this process: no same-uid process may
        // read or write it through /proc/PID/mem or re-open its fds.
        vmm::jail::forbid_tracing().map_err(|e| error_chain(&e))
    }) {
        eprintln!("inspector: error: {e}");
        return ExitCode::from(1);
    }
    let command = Cli::command().after_help(requests_help());
    let cli = match command.try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprintln!("inspector: error: {}", line::first_line(&e));
            return ExitCode::from(1);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    vmm::logger::init();
    vmm::raise_fd_limit();
    let result = match &cli.request {
        Some(request) => client(request),
        None => daemon_main(cli.daemon),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("inspector: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn client(request: &Request) -> Result<ExitCode, MainError> {
    let (socket, line) = match request.line() {
        Err(MainError::Help(text)) => {
            print!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        other => other?,
    };
    let reply =
        line::request(&socket, &line).map_err(|source| MainError::Unreachable { socket: socket.clone(), source })?;
    match reply.strip_prefix("ok") {
        Some(rest) => {
            println!("{}", rest.trim_start());
            Ok(ExitCode::SUCCESS)
        }
        None if reply.trim().is_empty() => Err(MainError::Refused(format!(
            "the inspector at {} closed the connection with no reply (did it exit? its log says why)",
            socket.display()
        ))),
        None => Err(MainError::Refused(reply.strip_prefix("error ").unwrap_or(&reply).to_string())),
    }
}

fn daemon_main(args: DaemonArgs) -> Result<ExitCode, MainError> {
    if let Some(level) = &args.log_level {
        vmm::logger::set_level(level)?;
    }
    let source = match (args.source_socket, args.qemu_qmp, args.pid) {
        (Some(path), None, None) => startup::SourceSpec::Mirror(path),
        (None, Some(qmp), None) => startup::SourceSpec::Qemu { qmp, pid: args.qemu_pid },
        (None, None, Some(pid)) => startup::SourceSpec::Pid { pid, device: args.mirror_device },
        _ => return Err(MainError::Usage("missing --source-socket PATH, --qemu-qmp PATH or --pid PID (see --help)")),
    };
    if args.all != args.ranges.is_empty() {
        return Err(MainError::Usage("give either --all or one or more --range GPA:LEN"));
    }
    let config = DaemonConfig {
        source,
        ranges: (!args.all).then_some(args.ranges),
        control_socket: args.control_socket,
        api: args.api_socket.map(|path| {
            // SAFETY: getuid cannot fail.
            let own = unsafe { libc::getuid() };
            let control_uids = if args.api_control_uids.is_empty() { vec![own] } else { args.api_control_uids };
            (path, inspector::api::ApiAccess { read_uids: args.api_read_uids, control_uids })
        }),
        memory: args.memory,
        serial: args.serial,
        watches: args.watches,
        watch_interval: Duration::from_millis(args.watch_interval_ms.max(1)),
        kvm_path: PathBuf::from("/dev/kvm"),
        dirty_log: !args.no_dirty_log,
        view_cache: args.view_cache,
        agent: args.agent,
        scan_rate_limit: args.scan_rate_limit.map(|mbps| mbps * 1_000_000),
    };
    let exit = startup::run(&config)?;
    if let VmExit::Crash(what) = &exit {
        eprintln!("inspector: agent crashed: {what}");
    }
    Ok(ExitCode::from(exit.exit_code() as u8))
}
