//! Foreign attach: the RAM of an unmodified QEMU (or libvirt) VM, mirrored the same
//! way as a Specula source's, with QEMU's own QMP monitor for the rest.
//!
//! QEMU keeps guest RAM in a shared memfd when started with
//! `-object memory-backend-memfd,id=ram0,size=SIZE,share=on -machine memory-backend=ram0`
//! (libvirt: `<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`).
//! Through QMP the inspector learns the memory backends (`query-memdev`) and where
//! each sits in guest-physical space (the flat view of the system address space,
//! `info mtree -f`: pc and q35, RAM below and above the 4 GiB hole, NUMA nodes with
//! a backend each). It finds each backend's file among QEMU's fds (/proc/PID/fd)
//! and opens it **read-only** through /proc, never holding a writable fd, which
//! needs QEMU's uid or CAP_SYS_PTRACE. vCPU registers come from `info registers`,
//! pause and resume are `stop` and `cont`, and QMP's STOP, RESUME and SHUTDOWN
//! events and the monitor's end become [`SourceEvent`]s.
//!
//! Everything QEMU says is parsed with bounds: lines, counts, numbers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::importer::{map_foreign, ImportError, MappedGrant, SourceEvent};
use crate::protocol::{Grant, Range, VcpuRegs, MAX_VCPUS};
use crate::qemu_state::CpuMsrs;
use std::os::fd::AsRawFd;

/// Longest QMP line accepted (an `info mtree` reply of a big machine fits many times).
pub const MAX_QMP_LINE: u64 = 16 << 20;
/// How long QEMU may take to greet a new QMP client.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most flat-view lines and RAM ranges considered.
const MAX_FLATVIEW_LINES: usize = 100_000;
const MAX_RAM_RANGES: usize = 1024;

/// The QEMU option that makes RAM mappable, and its libvirt equivalent.
pub const SHARED_RAM_HINT: &str = "start QEMU with `-object memory-backend-memfd,id=ram0,size=SIZE,share=on \
     -machine memory-backend=ram0` (libvirt: `<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`)";

/// Failures attaching to or talking with QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot connect to QEMU's QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU's QMP socket {0} did not greet us: QEMU serves one client per QMP socket, and another holds it (add a second `-qmp unix:PATH,server=on,wait=off` for the inspector)")]
    Busy(PathBuf),
    #[error("QMP I/O failed")]
    Io(#[source] std::io::Error),
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QEMU did not answer {0} in time")]
    Timeout(String),
    #[error("QEMU's monitor is gone")]
    Gone,
    #[error("QEMU's guest RAM is not in a shared memory backend, so it cannot be mapped: {SHARED_RAM_HINT}")]
    NoSharedRam,
    #[error("memory backend {id} is private (share=off, or QEMU's anonymous default RAM): {SHARED_RAM_HINT}")]
    PrivateBackend { id: String },
    #[error(
        "memory backend {id} ({size} bytes) has no file QEMU holds open (an anonymous backend?): {SHARED_RAM_HINT}"
    )]
    NoBackendFile { id: String, size: u64 },
    #[error("cannot open QEMU's guest RAM (pid {pid}, {path}): the inspector needs QEMU's uid or CAP_SYS_PTRACE")]
    Permission {
        pid: u32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read QEMU's file descriptors (/proc/{pid}/fd)")]
    ProcFds {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("memory backends {0} have files of the same size and the same sampled contents: cannot tell them apart")]
    Ambiguous(String),
    #[error("mapping QEMU's guest RAM")]
    Map(#[source] ImportError),
    #[error("cannot parse QEMU's {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("QEMU's device-state snapshot {0}")]
    Snapshot(String),
    #[error("reading QEMU's device-state snapshot")]
    State(#[from] crate::qemu_state::StateError),
}

type Pending = Arc<Mutex<HashMap<u64, Sender<Result<Value, QemuError>>>>>;

/// A QMP session: commands with correlation ids, events to a channel.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
    events: Mutex<Option<Receiver<SourceEvent>>>,
    /// QEMU's pid, from the socket's peer credentials.
    pub peer_pid: u32,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Self, QemuError> {
        let stream =
            UnixStream::connect(path).map_err(|source| QemuError::Connect { path: path.to_path_buf(), source })?;
        let peer_pid = crate::socket::peer_cred(&stream).map_err(QemuError::Io)?.pid as u32;
        let mut reader = BufReader::new(stream.try_clone().map_err(QemuError::Io)?);
        // QEMU serves one QMP client per socket: a busy socket accepts and then says nothing.
        stream.set_read_timeout(Some(GREETING_TIMEOUT)).map_err(QemuError::Io)?;
        let greeting = read_message(&mut reader).map_err(|e| match e {
            QemuError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                QemuError::Busy(path.to_path_buf())
            }
            other => other,
        })?;
        stream.set_read_timeout(None).map_err(QemuError::Io)?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!("no QMP greeting: {}", clip(&greeting.to_string()))));
        }
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (event_tx, event_rx) = mpsc::channel();
        let reader_pending = pending.clone();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(reader, reader_pending, event_tx))
            .map_err(QemuError::Io)?;
        let qmp = Self {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU64::new(1),
            events: Mutex::new(Some(event_rx)),
            peer_pid,
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs one QMP command and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        self.round_trip(command, arguments, None)
    }

    /// Runs one QMP command with `fd` attached (SCM_RIGHTS), as `getfd` needs.
    pub fn execute_with_fd(&self, command: &str, arguments: Value, fd: std::os::fd::RawFd) -> Result<Value, QemuError> {
        self.round_trip(command, Some(arguments), Some(fd))
    }

    /// Sends one command (with `fd` attached, if any) and waits for its reply.
    fn round_trip(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<std::os::fd::RawFd>,
    ) -> Result<Value, QemuError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        lock(&self.pending).insert(id, tx);
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let line = format!("{message}\n");
        let sent = {
            let mut writer = lock(&self.writer);
            match fd {
                None => writer.write_all(line.as_bytes()).map_err(QemuError::Io),
                Some(fd) => {
                    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
                    match writer.send_with_fds(&[line.as_bytes()], &[fd]) {
                        Ok(n) if n == line.len() => Ok(()),
                        Ok(n) => Err(QemuError::Protocol(format!("{command}: only {n} of {} bytes sent", line.len()))),
                        Err(e) => Err(QemuError::Io(std::io::Error::from_raw_os_error(e.errno()))),
                    }
                }
            }
        };
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        let reply = rx.recv_timeout(QMP_TIMEOUT).map_err(|e| {
            lock(&self.pending).remove(&id);
            match e {
                mpsc::RecvTimeoutError::Timeout => QemuError::Timeout(command.to_string()),
                mpsc::RecvTimeoutError::Disconnected => QemuError::Gone,
            }
        })??;
        if let Some(error) = reply.get("error") {
            let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("?").to_string();
            return Err(QemuError::Command { command: command.to_string(), class: text("class"), desc: text("desc") });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Runs a human-monitor command and returns its text.
    pub fn hmp(&self, command_line: &str) -> Result<String, QemuError> {
        let reply = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })))?;
        reply.as_str().map(str::to_string).ok_or_else(|| QemuError::Protocol(format!("{command_line}: no text reply")))
    }

    /// The event channel (once).
    pub fn take_events(&self) -> Option<Receiver<SourceEvent>> {
        lock(&self.events).take()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // The reader thread holds a clone of the socket: shut it down so QEMU sees the
        // client leave (it serves one at a time) and the thread ends.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Reads one QMP message (one JSON object per line), at most [`MAX_QMP_LINE`] bytes.
fn read_message(reader: &mut impl BufRead) -> Result<Value, QemuError> {
    let mut line = Vec::new();
    let n = reader.take(MAX_QMP_LINE + 1).read_until(b'\n', &mut line).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionReset => QemuError::Gone,
        _ => QemuError::Io(e),
    })?;
    if n == 0 {
        return Err(QemuError::Gone);
    }
    if line.len() as u64 > MAX_QMP_LINE {
        return Err(QemuError::Protocol(format!("a message longer than {MAX_QMP_LINE} bytes")));
    }
    serde_json::from_slice(&line).map_err(|e| QemuError::Protocol(format!("bad JSON: {e}")))
}

/// Routes replies to their waiters by id and turns events into [`SourceEvent`]s; tells
/// every waiter and the event channel when the monitor ends.
fn read_loop(mut reader: BufReader<UnixStream>, pending: Pending, events: Sender<SourceEvent>) {
    loop {
        let message = match read_message(&mut reader) {
            Ok(message) => message,
            Err(e) => {
                if !matches!(e, QemuError::Gone) {
                    log::warn!("qmp: {e}; closing");
                }
                break;
            }
        };
        if let Some(event) = message.get("event").and_then(Value::as_str) {
            let mapped = match event {
                "STOP" => Some(SourceEvent::Paused),
                "RESUME" => Some(SourceEvent::Resumed),
                "SHUTDOWN" => {
                    log::info!("qmp: guest shutdown ({})", clip(&message.to_string()));
                    None
                }
                _ => None,
            };
            if let Some(mapped) = mapped {
                let _ = events.send(mapped);
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else { continue };
        if let Some(waiter) = lock(&pending).remove(&id) {
            let _ = waiter.send(Ok(message));
        }
    }
    for (_, waiter) in lock(&pending).drain() {
        let _ = waiter.send(Err(QemuError::Gone));
    }
    let _ = events.send(SourceEvent::Gone);
}

/// A memory backend as `query-memdev` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub size: u64,
    pub share: bool,
}

/// Guest-physical RAM backed by `backend` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub len: u64,
    pub backend: String,
    pub offset: u64,
}

fn parse_error(what: &'static str, detail: impl Into<String>) -> QemuError {
    QemuError::Parse { what, detail: detail.into() }
}

/// Parses `query-memdev`.
pub fn parse_memdevs(reply: &Value) -> Result<Vec<Backend>, QemuError> {
    let list = reply.as_array().ok_or_else(|| parse_error("query-memdev", "not a list"))?;
    list.iter()
        .take(MAX_RAM_RANGES)
        .map(|b| {
            let id = b.get("id").and_then(Value::as_str).ok_or_else(|| parse_error("query-memdev", "no id"))?;
            let size = b.get("size").and_then(Value::as_u64).ok_or_else(|| parse_error("query-memdev", "no size"))?;
            let share = b.get("share").and_then(Value::as_bool).unwrap_or(false);
            Ok(Backend { id: id.to_string(), size, share })
        })
        .collect()
}

/// The RAM ranges of the system address space in `info mtree -f` output whose memory
/// region is one of `backends`, merged where contiguous in both spaces.
///
/// Lines look like `  0000000000100000-000000000fffffff (prio 0, ram): m0 @0000000000100000 KVM`.
/// Only the first flat view whose root is `system` is read: the CPU's view of memory.
pub fn parse_flatview(text: &str, backends: &[Backend]) -> Result<Vec<RamRange>, QemuError> {
    let mut ranges: Vec<RamRange> = Vec::new();
    let mut in_system = false;
    for line in text.lines().take(MAX_FLATVIEW_LINES) {
        let trimmed = line.trim();
        if trimmed.starts_with("FlatView #") {
            if in_system {
                break;
            }
            continue;
        }
        if let Some(root) = trimmed.strip_prefix("Root memory region:") {
            in_system = root.trim() == "system";
            continue;
        }
        if !in_system {
            continue;
        }
        let Some(range) = parse_flatview_line(trimmed, backends)? else { continue };
        match ranges.last_mut() {
            Some(last)
                if last.backend == range.backend
                    && last.gpa + last.len == range.gpa
                    && last.offset + last.len == range.offset =>
            {
                last.len += range.len
            }
            _ => ranges.push(range),
        }
        if ranges.len() > MAX_RAM_RANGES {
            return Err(parse_error("memory tree", format!("more than {MAX_RAM_RANGES} RAM ranges")));
        }
    }
    Ok(ranges)
}

fn parse_flatview_line(line: &str, backends: &[Backend]) -> Result<Option<RamRange>, QemuError> {
    let Some((span, rest)) = line.split_once(' ') else { return Ok(None) };
    let Some((start, end)) = span.split_once('-') else { return Ok(None) };
    let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
        return Ok(None);
    };
    let Some((attributes, target)) = rest.split_once("): ") else { return Ok(None) };
    if !(attributes.ends_with(", ram") || attributes.ends_with(", rom")) {
        return Ok(None);
    }
    let mut words = target.split_whitespace();
    let name = words.next().unwrap_or("");
    if !backends.iter().any(|b| b.id == name) {
        return Ok(None);
    }
    let offset = match words.next().and_then(|w| w.strip_prefix('@')) {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| parse_error("memory tree", clip(line)))?,
        None => 0,
    };
    let len =
        end.checked_sub(start).and_then(|l| l.checked_add(1)).ok_or_else(|| parse_error("memory tree", clip(line)))?;
    Ok(Some(RamRange { gpa: start, len, backend: name.to_string(), offset }))
}

/// Parses `info registers -a` (or `info registers`): one [`VcpuRegs`] per `CPU#N` block.
pub fn parse_registers(text: &str) -> Result<Vec<VcpuRegs>, QemuError> {
    let mut vcpus: Vec<VcpuRegs> = Vec::new();
    for line in text.lines().take(MAX_VCPUS * 64) {
        let line = line.trim();
        if let Some(index) = line.strip_prefix("CPU#") {
            if vcpus.len() == MAX_VCPUS {
                return Err(parse_error("registers", format!("more than {MAX_VCPUS} vCPUs")));
            }
            let index = index.trim().parse().map_err(|_| parse_error("registers", clip(line)))?;
            vcpus.push(VcpuRegs { index, ..Default::default() });
            continue;
        }
        let Some(v) = vcpus.last_mut() else { continue };
        // Segment lines: "GS =0000 ffff888007a00000 ffffffff 00c00000".
        if let Some((name, rest)) = line.split_once('=') {
            let name = name.trim();
            if matches!(name, "FS" | "GS") {
                let base = rest.split_whitespace().nth(1).and_then(|b| u64::from_str_radix(b, 16).ok());
                let base = base.ok_or_else(|| parse_error("registers", clip(line)))?;
                if name == "FS" {
                    v.fs_base = base;
                } else {
                    v.gs_base = base;
                }
                continue;
            }
        }
        // "R8 =0000..." pads short names before the '='.
        for token in line.replace(" =", "=").split_whitespace() {
            let Some((key, value)) = token.split_once('=') else { continue };
            let Ok(value) = u64::from_str_radix(value, 16) else { continue };
            // Outside long mode QEMU prints the 32-bit names (EAX, EIP, EFL).
            let wide = match key {
                "EAX" | "EBX" | "ECX" | "EDX" | "ESI" | "EDI" | "ESP" | "EBP" | "EIP" => format!("R{}", &key[1..]),
                "EFL" => "RFL".to_string(),
                _ => key.to_string(),
            };
            let gpr = [
                "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP", "R8", "R9", "R10", "R11", "R12", "R13", "R14",
                "R15",
            ]
            .iter()
            .position(|&g| g == wide);
            match (wide.as_str(), gpr) {
                (_, Some(i)) => v.gprs[i] = value,
                ("RIP", _) => v.rip = value,
                ("RFL", _) => v.rflags = value,
                ("CR0", _) => v.cr0 = value,
                ("CR2", _) => v.cr2 = value,
                ("CR3", _) => v.cr3 = value,
                ("CR4", _) => v.cr4 = value,
                ("EFER", _) => v.efer = value,
                _ => {}
            }
        }
    }
    if vcpus.is_empty() {
        return Err(parse_error("registers", "no CPU#N block"));
    }
    Ok(vcpus)
}

/// Parses `xp /Ngx ADDR` output (`0000000000001000: 0x0123456789abcdef 0x...`) into bytes.
pub fn parse_xp(text: &str, max_words: usize) -> Result<Vec<u8>, QemuError> {
    let mut bytes = Vec::new();
    for line in text.lines() {
        let Some((_, words)) = line.split_once(':') else { continue };
        for word in words.split_whitespace() {
            if bytes.len() >= max_words * 8 {
                return Ok(bytes);
            }
            let hex = word.strip_prefix("0x").ok_or_else(|| parse_error("memory dump", clip(line)))?;
            let value = u64::from_str_radix(hex, 16).map_err(|_| parse_error("memory dump", clip(line)))?;
            bytes.extend_from_slice(&value.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// An attached QEMU VM: its monitor, and its RAM files open read-only.
pub struct QemuSource {
    qmp: Qmp,
    pub pid: u32,
    pub ranges: Vec<RamRange>,
    files: HashMap<String, OwnedFd>,
    /// Held while a device-state snapshot runs (QEMU runs one migration at a time).
    snapshot: Mutex<()>,
}

impl QemuSource {
    /// Attaches through the QMP socket at `qmp_path`; `pid` defaults to the socket's peer.
    pub fn attach(qmp_path: &Path, pid: Option<u32>) -> Result<Self, QemuError> {
        let qmp = Qmp::connect(qmp_path)?;
        let pid = pid.unwrap_or(qmp.peer_pid);
        let backends = parse_memdevs(&qmp.execute("query-memdev", None)?)?;
        let ranges = parse_flatview(&qmp.hmp("info mtree -f")?, &backends)?;
        if ranges.is_empty() {
            return Err(QemuError::NoSharedRam);
        }
        let used: Vec<&Backend> = backends.iter().filter(|b| ranges.iter().any(|r| r.backend == b.id)).collect();
        if let Some(private) = used.iter().find(|b| !b.share) {
            return Err(QemuError::PrivateBackend { id: private.id.clone() });
        }
        let files = open_backend_files(&qmp, pid, &used, &ranges)?;
        Ok(Self { qmp, pid, ranges, files, snapshot: Mutex::new(()) })
    }

    /// Guest-physical RAM, as ranges.
    pub fn memory_map(&self) -> Vec<Range> {
        self.ranges.iter().map(|r| Range { gpa: r.gpa, len: r.len }).collect()
    }

    /// Maps the parts of guest RAM within `wanted` (page-aligned) read-only, one piece per
    /// RAM range overlapped; ids count from 1.
    pub fn map(&self, wanted: &[Range]) -> Result<Vec<MappedGrant>, QemuError> {
        let mut mapped = Vec::new();
        for w in wanted {
            for r in &self.ranges {
                let lo = w.gpa.max(r.gpa);
                let hi = w.gpa.saturating_add(w.len).min(r.gpa + r.len);
                if lo >= hi {
                    continue;
                }
                let fd = self.files[&r.backend].try_clone().map_err(QemuError::Io)?;
                let grant = Grant {
                    id: mapped.len() as u64 + 1,
                    gpa: lo,
                    len: hi - lo,
                    fd_index: 0,
                    offset: r.offset + (lo - r.gpa),
                };
                mapped.push(map_foreign(grant, fd).map_err(QemuError::Map)?);
            }
        }
        Ok(mapped)
    }

    /// Registers of every vCPU (`info registers -a`).
    pub fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, QemuError> {
        parse_registers(&self.qmp.hmp("info registers -a")?)
    }

    /// Stops the guest's vCPUs (`stop`).
    pub fn pause(&self) -> Result<(), QemuError> {
        self.qmp.execute("stop", None).map(|_| ())
    }

    /// Lets them run again (`cont`).
    pub fn resume(&self) -> Result<(), QemuError> {
        self.qmp.execute("cont", None).map(|_| ())
    }

    /// QEMU's events, as source events (once).
    pub fn take_events(&self) -> Option<Receiver<SourceEvent>> {
        self.qmp.take_events()
    }

    /// The system-call MSRs of every vCPU (LSTAR and the rest), which QMP does not
    /// show: QEMU writes a device-state snapshot (a migration to a pipe, with
    /// `x-ignore-shared` so that no shared RAM is in it) and [`crate::qemu_state`]
    /// reads them out of it. QEMU pauses the guest for the snapshot's last
    /// milliseconds (its `downtime`); a guest that was running is resumed at once, and
    /// one that was paused stays paused. One snapshot at a time.
    pub fn cpu_msrs(&self) -> Result<Vec<CpuMsrs>, QemuError> {
        let _one = lock(&self.snapshot);
        let running = self.qmp.execute("query-status", None)?.get("running").and_then(Value::as_bool) == Some(true);
        let ignore_shared = |state: bool| {
            let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": state }] });
            self.qmp.execute("migrate-set-capabilities", Some(caps)).map(|_| ())
        };
        let was_set = self
            .qmp
            .execute("query-migrate-capabilities", None)?
            .as_array()
            .and_then(|caps| caps.iter().find(|c| c["capability"] == "x-ignore-shared"))
            .and_then(|c| c["state"].as_bool())
            .ok_or_else(|| {
                QemuError::Snapshot("needs the x-ignore-shared migration capability (QEMU 4.0 or later)".into())
            })?;
        ignore_shared(true)?;
        let outcome = self.snapshot(running);
        if !was_set {
            let _ = ignore_shared(false);
        }
        crate::qemu_state::cpu_msrs(&outcome?).map_err(QemuError::from)
    }

    /// Writes the device state to a pipe and reads it back; resumes the guest afterwards
    /// if `resume`, whether or not the snapshot worked.
    fn snapshot(&self, resume: bool) -> Result<Vec<u8>, QemuError> {
        let (read_end, write_end) = std::io::pipe().map_err(QemuError::Io)?;
        self.qmp.execute_with_fd("getfd", json!({ "fdname": SNAPSHOT_FD }), write_end.as_raw_fd())?;
        drop(write_end);
        let reader = std::thread::Builder::new()
            .name("qemu-snapshot".into())
            .spawn(move || read_bounded(read_end))
            .map_err(QemuError::Io)?;
        let migrated = self
            .qmp
            .execute("migrate", Some(json!({ "uri": format!("fd:{SNAPSHOT_FD}") })))
            .and_then(|_| self.wait_for_migration());
        if migrated.is_err() {
            // A migration that never started leaves the fd with QEMU; one that did closed it.
            let _ = self.qmp.execute("migrate_cancel", None);
            let _ = self.qmp.execute("closefd", Some(json!({ "fdname": SNAPSHOT_FD })));
        }
        let resumed = if resume { self.qmp.execute("cont", None).map(|_| ()) } else { Ok(()) };
        let bytes = reader.join().map_err(|_| QemuError::Snapshot("reader panicked".into()))?;
        migrated?;
        resumed?;
        bytes
    }

    /// Polls `query-migrate` until the snapshot completed (or failed).
    fn wait_for_migration(&self) -> Result<(), QemuError> {
        let deadline = std::time::Instant::now() + QMP_TIMEOUT;
        loop {
            let info = self.qmp.execute("query-migrate", None)?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(QemuError::Snapshot(format!("{status}: {}", clip(why))));
                }
                _ if std::time::Instant::now() > deadline => {
                    return Err(QemuError::Snapshot(format!("did not finish within {QMP_TIMEOUT:?}")))
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// The name QEMU gives the snapshot pipe's fd while it holds it.
const SNAPSHOT_FD: &str = "specula-snapshot";

/// Reads a snapshot to its end, keeping at most [`crate::qemu_state::MAX_STREAM`] + 1
/// bytes (the rest is drained, so QEMU never blocks on a full pipe).
fn read_bounded(mut pipe: std::io::PipeReader) -> Result<Vec<u8>, QemuError> {
    let limit = crate::qemu_state::MAX_STREAM + 1;
    let mut kept = Vec::new();
    (&mut pipe).take(limit as u64).read_to_end(&mut kept).map_err(QemuError::Io)?;
    std::io::copy(&mut pipe, &mut std::io::sink()).map_err(QemuError::Io)?;
    Ok(kept)
}

/// Candidate RAM files among QEMU's fds: regular files (memfds, /dev/shm or hugetlbfs
/// files), as (fd number, size). Sizes come from stat through the magic link, without
/// opening anything.
fn candidate_files(pid: u32) -> Result<Vec<(u32, u64)>, QemuError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => QemuError::Permission { pid, path: dir.clone(), source },
        _ => QemuError::ProcFds { pid, source },
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten().take(1 << 16) {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        match std::fs::metadata(entry.path()) {
            Ok(meta) if meta.is_file() => found.push((fd, meta.len())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(QemuError::Permission { pid, path: entry.path().display().to_string(), source: e })
            }
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Opens QEMU's fd `fd` read-only through /proc.
fn open_read_only(pid: u32, fd: u32) -> Result<OwnedFd, QemuError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    std::fs::OpenOptions::new().read(true).open(&path).map(OwnedFd::from).map_err(|source| QemuError::Permission {
        pid,
        path,
        source,
    })
}

/// Finds and opens each backend's file: by size, and where sizes collide by comparing
/// sampled guest memory (`xp`) with each candidate.
fn open_backend_files(
    qmp: &Qmp,
    pid: u32,
    backends: &[&Backend],
    ranges: &[RamRange],
) -> Result<HashMap<String, OwnedFd>, QemuError> {
    let candidates = candidate_files(pid)?;
    let mut files = HashMap::new();
    let mut taken = Vec::new();
    for backend in backends {
        let same_size: Vec<u32> =
            candidates.iter().filter(|(fd, size)| *size == backend.size && !taken.contains(fd)).map(|c| c.0).collect();
        let fd = match same_size.as_slice() {
            [] => return Err(QemuError::NoBackendFile { id: backend.id.clone(), size: backend.size }),
            [only] => *only,
            several => pick_by_contents(qmp, pid, backend, ranges, several)?,
        };
        taken.push(fd);
        files.insert(backend.id.clone(), open_read_only(pid, fd)?);
    }
    Ok(files)
}

/// Samples pages of `backend` through the monitor and keeps the one candidate file that
/// holds the same bytes at the same offsets.
fn pick_by_contents(
    qmp: &Qmp,
    pid: u32,
    backend: &Backend,
    ranges: &[RamRange],
    fds: &[u32],
) -> Result<u32, QemuError> {
    use std::os::unix::fs::FileExt;
    let mut alive: Vec<u32> = fds.to_vec();
    let mine: Vec<&RamRange> = ranges.iter().filter(|r| r.backend == backend.id).collect();
    for sample in 0..64u64 {
        let Some(r) = mine.get(sample as usize % mine.len().max(1)) else { break };
        let pages = r.len / 4096;
        if pages == 0 {
            continue;
        }
        let page = (sample * 0x9e37_79b9) % pages;
        let gpa = r.gpa + page * 4096;
        let bytes = parse_xp(&qmp.hmp(&format!("xp /64gx {gpa:#x}"))?, 64)?;
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        alive.retain(|&fd| {
            let Ok(file) = open_read_only(pid, fd).map(std::fs::File::from) else { return false };
            let mut here = vec![0u8; bytes.len()];
            file.read_exact_at(&mut here, r.offset + page * 4096).is_ok() && here == bytes
        });
        if alive.len() <= 1 {
            break;
        }
    }
    match alive.as_slice() {
        [one] => Ok(*one),
        [] => Err(QemuError::NoBackendFile { id: backend.id.clone(), size: backend.size }),
        _ => Err(QemuError::Ambiguous(backend.id.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTREE_PC: &str = "FlatView #0
 AS \"cpu-smm-0\", root: memory
 Root memory region: memory
  0000000000000000-00000000000bffff (prio 0, ram): m0

FlatView #1
 AS \"memory\", root: system
 AS \"cpu-memory-0\", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): m0
  00000000000c0000-00000000000cafff (prio 0, rom): m0 @00000000000c0000
  00000000000cb000-00000000000cdfff (prio 0, ram): m0 @00000000000cb000
  0000000000100000-00000000bfffffff (prio 0, ram): m0 @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000febc0000-00000000febdffff (prio 1, i/o): e1000-mmio
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): m0 @00000000c0000000

FlatView #2
 AS \"I/O\", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
";

    fn m0(size: u64) -> Vec<Backend> {
        vec![Backend { id: "m0".into(), size, share: true }]
    }

    #[test]
    fn the_system_flat_view_gives_ram_below_and_above_the_hole() {
        let ranges = parse_flatview(MTREE_PC, &m0(4 << 30)).unwrap();
        assert_eq!(
            ranges,
            vec![
                RamRange { gpa: 0, len: 0xce000, backend: "m0".into(), offset: 0 },
                RamRange { gpa: 0x100000, len: 0xbff0_0000, backend: "m0".into(), offset: 0x100000 },
                RamRange { gpa: 1 << 32, len: 1 << 30, backend: "m0".into(), offset: 0xc000_0000 },
            ]
        );
    }

    #[test]
    fn memory_regions_that_are_no_backend_are_ignored() {
        assert!(parse_flatview(MTREE_PC, &[Backend { id: "other".into(), size: 1, share: true }]).unwrap().is_empty());
        assert!(parse_flatview("garbage\n\u{1F600}\n-\n(prio", &m0(1)).unwrap().is_empty());
    }

    #[test]
    fn hostile_flat_views_fail_cleanly() {
        let huge = "Root memory region: system\n".to_string()
            + &(0..2000)
                .map(|i| format!("  {:016x}-{:016x} (prio 0, ram): m0 @{:016x}\n", i * 0x2000, i * 0x2000, i * 0x5000))
                .collect::<String>();
        assert!(matches!(parse_flatview(&huge, &m0(1)), Err(QemuError::Parse { .. })), "too many ranges");
        let inverted = "Root memory region: system\n  0000000000002000-0000000000001000 (prio 0, ram): m0\n";
        assert!(parse_flatview(inverted, &m0(1)).is_err());
        let wrap = "Root memory region: system\n  0000000000000000-ffffffffffffffff (prio 0, ram): m0\n";
        assert!(parse_flatview(wrap, &m0(1)).is_err());
    }

    const REGS: &str = "CPU#0
RAX=0000000000000000 RBX=0000000000000001 RCX=0000000000000002 RDX=0000000000000003
RSI=0000000000000004 RDI=0000000000000005 RBP=0000000000000006 RSP=ffffc90000013e98
R8 =0000000000000008 R9 =0000000000000009 R10=000000000000000a R11=000000000000000b
R12=000000000000000c R13=000000000000000d R14=000000000000000e R15=000000000000000f
RIP=ffffffff81c0f0ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 ffffffff 00c00000
CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
FS =0000 00007f0000001000 ffffffff 00c00000
GS =0000 ffff88800f600000 ffffffff 00c00000
CR0=80050033 CR2=00007ffd5e1f0f28 CR3=000000000a4a2000 CR4=00350ef0
EFER=0000000000000d01
CPU#1
RIP=ffffffff81c0f0ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=0000000000000000 CR3=0000000002a0c000 CR4=00350ef0
";

    #[test]
    fn registers_parse_per_cpu() {
        let vcpus = parse_registers(REGS).unwrap();
        assert_eq!(vcpus.len(), 2);
        let v = &vcpus[0];
        assert_eq!((v.index, v.rip, v.rflags), (0, 0xffff_ffff_81c0_f0ae, 0x246));
        assert_eq!(v.gprs[6], 0xffff_c900_0001_3e98, "RSP");
        assert_eq!(v.gprs[15], 0xf, "R15");
        assert_eq!((v.gprs[8], v.gprs[9], v.gprs[10]), (8, 9, 0xa), "R8-R10, whose names QEMU pads");
        assert_eq!((v.cr0, v.cr3, v.cr4, v.efer), (0x8005_0033, 0xa4a_2000, 0x35_0ef0, 0xd01));
        assert_eq!((v.fs_base, v.gs_base), (0x7f00_0000_1000, 0xffff_8880_0f60_0000));
        assert_eq!((vcpus[1].index, vcpus[1].cr3), (1, 0x2a0_c000));
        let real_mode =
            parse_registers("CPU#0\nEAX=00000000 EBX=00000001\nEIP=0000fff0 EFL=00000002 [-------] CPL=0\n").unwrap();
        assert_eq!((real_mode[0].rip, real_mode[0].rflags, real_mode[0].gprs[1]), (0xfff0, 2, 1));
        assert!(parse_registers("nothing here").is_err());
        assert!(parse_registers("CPU#x\n").is_err());
    }

    #[test]
    fn memory_dumps_parse_to_bytes() {
        let text = "0000000000001000: 0x0807060504030201 0x100f0e0d0c0b0a09\n0000000000001010: 0x0000000000000011\n";
        let bytes = parse_xp(text, 64).unwrap();
        assert_eq!(&bytes[..9], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(bytes.len(), 24);
        assert_eq!(parse_xp(text, 1).unwrap().len(), 8, "bounded");
        assert!(parse_xp("0: zz", 1).is_err());
    }

    #[test]
    fn memdevs_parse_and_refuse_garbage() {
        let reply =
            json!([{"id": "m0", "size": 268435456u64, "share": true}, {"id": "m1", "size": 4096, "share": false}]);
        let backends = parse_memdevs(&reply).unwrap();
        assert_eq!(backends[1], Backend { id: "m1".into(), size: 4096, share: false });
        assert!(parse_memdevs(&json!({"id": 1})).is_err());
        assert!(parse_memdevs(&json!([{"size": 1}])).is_err());
    }

    #[test]
    fn qmp_lines_are_bounded() {
        let long = vec![b'x'; (MAX_QMP_LINE + 10) as usize];
        let mut reader = std::io::Cursor::new(long);
        assert!(matches!(read_message(&mut reader), Err(QemuError::Protocol(_))));
        let mut reader = std::io::Cursor::new(b"{\"a\": 1}\n".to_vec());
        assert_eq!(read_message(&mut reader).unwrap(), json!({"a": 1}));
        let mut empty = std::io::Cursor::new(Vec::new());
        assert!(matches!(read_message(&mut empty), Err(QemuError::Gone)));
    }
}
