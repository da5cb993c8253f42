//! `inspector`: the daemon, or a client of a running daemon's control socket.
//!
//! ```text
//! inspector (--source-socket PATH | --qemu-qmp PATH [--qemu-pid PID]) (--range GPA:LEN ... | --all)
//!           [--control-socket PATH] [--watch GPA:LEN ...] [--watch-interval-ms N] [--memory SIZE]
//!           [--serial MODE]
//! inspector read|hash|scan|watch|check|grants|status|vcpus|pause|resume|write-probe|latency
//!           --control-socket PATH ARGS...
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use inspector::control;
use inspector::daemon::{self, DaemonConfig};
use vmm::config::{parse_memory, parse_range, parse_serial};
use vmm::devices::serial::SerialOutput;
use vmm::{error_chain, VmExit};

const USAGE: &str = "\
Usage:
  inspector --source-socket PATH (--range GPA:LEN ... | --all) [options]
  inspector --qemu-qmp PATH [--qemu-pid PID] (--range GPA:LEN ... | --all) [options]
      Attach to a source vmm's mirror socket, or to an unmodified QEMU through its
      QMP socket (its RAM must be a shared memfd backend: -object
      memory-backend-memfd,id=ram0,size=SIZE,share=on -machine memory-backend=ram0),
      map the ranges read-only into an agent VM, and serve analysis requests.
      --control-socket PATH     serve line requests on this Unix socket
      --api-socket PATH         serve the HTTP/JSON API (/v1, OpenAPI at /v1/openapi.json)
      --api-read-uid UID        may use the API's views (repeatable)
      --api-control-uid UID     may also pause/resume and manage watches (repeatable;
                                default: the inspector's own uid)
      --watch GPA:LEN           keep an integrity watch on a range (repeatable);
                                changes are reported on stdout as they happen
      --watch-interval-ms N     how often watches are checked (default 250)
      --memory SIZE             agent VM RAM (default 128M)
      --serial tty|null|file=P  where the agent's console goes (default tty)
  inspector REQUEST --control-socket PATH [ARGS...]
      Send one request to a running inspector and print the reply. Requests:
      read GPA LEN | hash GPA LEN | scan GPA LEN HEXPATTERN | watch GPA LEN |
      check ID | grants | status | vcpus | pause | resume | write-probe GPA BYTE |
      latency GPA COUNT MS   (pause and resume: QEMU sources)
Exit status: 0 on success; 1 on a bad argument, a refused attach or an error reply.
";

const REQUESTS: &[&str] = &[
    "read",
    "hash",
    "scan",
    "watch",
    "check",
    "grants",
    "status",
    "vcpus",
    "pause",
    "resume",
    "write-probe",
    "latency",
];

fn main() -> ExitCode {
    if let Err(e) = vmm::signals::block_stop_signals().map_err(|e| e.to_string()).and_then(|()| {
        // Grants and the agent's memory live in this process: no same-uid process may
        // read or write it through /proc/PID/mem or re-open its fds.
        vmm::jail::forbid_tracing().map_err(|e| error_chain(&e))
    }) {
        eprintln!("inspector: error: {e}");
        return ExitCode::from(1);
    }
    vmm::logger::init();
    vmm::raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(request) if REQUESTS.contains(&request) => client(request, &args[1..]),
        _ => daemon_main(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("inspector: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn client(request: &str, args: &[String]) -> Result<ExitCode, String> {
    let mut socket = None;
    let mut words = vec![request.to_string()];
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--control-socket" {
            socket = Some(PathBuf::from(it.next().ok_or("--control-socket needs a value")?));
        } else {
            words.push(arg.clone());
        }
    }
    let socket = socket.ok_or("missing --control-socket PATH")?;
    let reply = control::request(&socket, &words.join(" "))
        .map_err(|e| format!("cannot reach the inspector at {}: {e}", socket.display()))?;
    match reply.strip_prefix("ok") {
        Some(rest) => {
            println!("{}", rest.trim_start());
            Ok(ExitCode::SUCCESS)
        }
        None => Err(reply.strip_prefix("error ").unwrap_or(&reply).to_string()),
    }
}

fn daemon_main(args: &[String]) -> Result<ExitCode, String> {
    let mut source_socket = None;
    let mut qemu_qmp = None;
    let mut api_socket = None;
    let mut api_read_uids = Vec::new();
    let mut api_control_uids = Vec::new();
    let mut qemu_pid = None;
    let mut ranges: Vec<mirror_driver::protocol::Range> = Vec::new();
    let mut all = false;
    let mut control_socket = None;
    let mut watches = Vec::new();
    let mut watch_interval = Duration::from_millis(250);
    let mut memory = daemon::DEFAULT_MEMORY;
    let mut serial = SerialOutput::Tty;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--source-socket" => source_socket = Some(PathBuf::from(value()?)),
            "--qemu-qmp" => qemu_qmp = Some(PathBuf::from(value()?)),
            "--api-socket" => api_socket = Some(PathBuf::from(value()?)),
            "--api-read-uid" | "--api-control-uid" => {
                let v = value()?;
                let uid: u32 = v.parse().map_err(|_| format!("invalid {arg} '{v}': expected a numeric uid"))?;
                if arg == "--api-read-uid" {
                    api_read_uids.push(uid)
                } else {
                    api_control_uids.push(uid)
                }
            }
            "--qemu-pid" => {
                let v = value()?;
                qemu_pid = Some(v.parse().map_err(|_| format!("invalid --qemu-pid '{v}'"))?);
            }
            "--range" => {
                let v = value()?;
                ranges.push(parse_range(&v).ok_or_else(|| format!("invalid --range '{v}': expected GPA:LEN"))?);
            }
            "--all" => all = true,
            "--control-socket" => control_socket = Some(PathBuf::from(value()?)),
            "--watch" => {
                let v = value()?;
                watches.push(parse_range(&v).ok_or_else(|| format!("invalid --watch '{v}': expected GPA:LEN"))?);
            }
            "--watch-interval-ms" => {
                let v = value()?;
                let ms: u64 = v.parse().map_err(|_| format!("invalid --watch-interval-ms '{v}'"))?;
                watch_interval = Duration::from_millis(ms.max(1));
            }
            "--memory" => memory = parse_memory(&value()?).map_err(|e| e.to_string())?,
            "--serial" => serial = parse_serial(&value()?).map_err(|e| e.to_string())?,
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let source = match (source_socket, qemu_qmp) {
        (Some(path), None) => daemon::SourceSpec::Mirror(path),
        (None, Some(qmp)) => daemon::SourceSpec::Qemu { qmp, pid: qemu_pid },
        (Some(_), Some(_)) => return Err("give --source-socket or --qemu-qmp, not both".into()),
        (None, None) => return Err("missing --source-socket PATH or --qemu-qmp PATH (see --help)".into()),
    };
    if all != ranges.is_empty() {
        return Err("give either --all or one or more --range GPA:LEN".into());
    }
    let config = DaemonConfig {
        source,
        ranges: (!all).then_some(ranges),
        control_socket,
        api: api_socket.map(|path| {
            // SAFETY: getuid cannot fail.
            let own = unsafe { libc::getuid() };
            let control_uids = if api_control_uids.is_empty() { vec![own] } else { api_control_uids };
            (path, inspector::api::ApiAccess { read_uids: api_read_uids, control_uids })
        }),
        memory,
        serial,
        watches,
        watch_interval,
        kvm_path: PathBuf::from("/dev/kvm"),
    };
    match daemon::run(&config) {
        Ok(exit) => {
            if let VmExit::Crash(what) = &exit {
                eprintln!("inspector: agent crashed: {what}");
            }
            Ok(ExitCode::from(exit.exit_code() as u8))
        }
        Err(e) => Err(error_chain(&e)),
    }
}
