//! A QMP session: commands with correlation ids (one may carry an fd), human-monitor
//! commands, and QEMU's events as [`SourceEvent`]s. Every line QEMU sends is bounded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirror_driver::importer::SourceEvent;
use serde_json::{json, Value};
use specula_common::sync::lock;

use crate::error::{clip, QemuError};

/// Longest QMP line accepted (an `info mtree` reply of a big machine fits many times).
pub const MAX_QMP_LINE: u64 = 16 << 20;
/// How long QEMU may take to greet a new QMP client.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP command may take.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(30);
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
        let peer_pid = mirror_driver::socket::peer_cred(&stream).map_err(QemuError::Io)?.pid as u32;
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

#[cfg(test)]
mod tests {
    use super::*;

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
