//! The source VMM's control socket (`--api-socket`): one command per line,
//! one reply line each (`ok ...` or `error ...`), served by [`line_server`]
//! with its limits: the socket is mode 0600 from the start; only peers whose
//! uid is in the mirror allow list (`--mirror-allow-uid`, default the vmm's own
//! uid) are served; at most [`line_server::MAX_CLIENTS`] (16) at once; a client has
//! [`line_server::IDLE_TIMEOUT`] (30 s) to send each command; commands are at most
//! 256 bytes (`MAX_LINE`).
//!
//! - `discard GPA LEN`  punch a hole in guest RAM (balloon-style) and tell inspectors
//! - `revoke GRANT`     revoke a mirror grant: its chunk is re-homed so no holder sees
//!   later writes; `ok revoked=ID,... unacknowledged=CONN,...`
//! - `grants`           every grant whose fd may still see live memory:
//!   `id:gpa:len:uid:active|released|disconnected` ...
//! - `inspectors`       number of attached inspectors
//! - `pause` / `resume` hold or release every vCPU; each success sends inspectors exactly
//!   one Paused/Resumed, a failed pause leaves nothing paused
//! - `vcpus`            RIP and CR3 of every vCPU
//! - `memory`           guest RAM chunks as `gpa:len` (no host addresses: they would help an
//!   attacker of the vmm process defeat ASLR)
//! - `stop`             stop the VM (the vmm exits 0)

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mirror_driver::exporter::{ExportError, Exporter};
use mirror_driver::protocol::Message;
use specula_common::parse::{number, ParseError};

use crate::line_server::{self, Limits};
use crate::vstate::vcpu::{Lifecycle, LifecycleError, VmExit};

/// Longest accepted command line.
const MAX_LINE: u64 = 256;

/// Why a command failed; the client reads the message with its causes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A missing or malformed argument.
    #[error(transparent)]
    Argument(#[from] ParseError),
    #[error("no mirror socket (start the vmm with --mirror-socket)")]
    NoMirror,
    /// The exporter refused a discard or a revoke.
    #[error(transparent)]
    Mirror(#[from] ExportError),
    #[error("already paused")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
    /// A pause or a register snapshot that not every vCPU answered.
    #[error(transparent)]
    Vcpus(#[from] LifecycleError),
    #[error("empty command")]
    EmptyCommand,
    #[error("unknown command '{0}'")]
    UnknownCommand(String),
}

/// State the API commands act on.
#[derive(Clone)]
pub struct ApiContext {
    pub lifecycle: Arc<Lifecycle>,
    pub exporter: Option<Arc<Exporter>>,
    /// (gpa, len) of every RAM chunk.
    pub memory: Arc<Vec<(u64, u64)>>,
    /// Whether this API holds the VM paused (one hold at most).
    pub paused: Arc<AtomicBool>,
}

/// Binds `path` (mode 0600) and serves the peers whose uid is in `allowed_uids`, on a thread each.
pub fn start(path: &Path, allowed_uids: &[u32], context: ApiContext) -> std::io::Result<()> {
    let handler = Arc::new(move |line: &str| execute(line, &context));
    line_server::serve(path, "api", allowed_uids, Limits::new(MAX_LINE), handler)
}

/// The mirror exporter, if the vmm serves one.
fn exporter(context: &ApiContext) -> Result<&Exporter, ApiError> {
    context.exporter.as_deref().ok_or(ApiError::NoMirror)
}

/// Runs one command.
pub fn execute(line: &str, context: &ApiContext) -> Result<String, ApiError> {
    let mut words = line.split_whitespace();
    match words.next().unwrap_or("") {
        "discard" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            exporter(context)?.discard(gpa, len)?;
            Ok(String::new())
        }
        "revoke" => revoke(number(words.next(), "GRANT")?, context),
        "grants" => Ok(exporter(context)?
            .grants()
            .iter()
            .map(|r| format!("{}:{:#x}:{:#x}:{}:{}", r.grant.id, r.grant.gpa, r.grant.len, r.uid, r.state.name()))
            .collect::<Vec<_>>()
            .join(" ")),
        "inspectors" => Ok(exporter(context)?.connection_count().to_string()),
        "pause" => pause(context),
        "resume" => resume(context),
        "vcpus" => Ok(context
            .lifecycle
            .snapshot_vcpus()?
            .iter()
            .map(|s| format!("{}:rip={:#x}:cr3={:#x}", s.index, s.regs.rip, s.sregs.cr3))
            .collect::<Vec<_>>()
            .join(" ")),
        "memory" => {
            Ok(context.memory.iter().map(|(gpa, len)| format!("{gpa:#x}:{len:#x}")).collect::<Vec<_>>().join(" "))
        }
        "stop" => {
            context.lifecycle.request_exit(VmExit::Stopped("api stop"));
            Ok(String::new())
        }
        "" => Err(ApiError::EmptyCommand),
        other => Err(ApiError::UnknownCommand(other.to_string())),
    }
}

/// `revoke GRANT`: `revoked=ID,... unacknowledged=CONN,...`.
fn revoke(grant: u64, context: &ApiContext) -> Result<String, ApiError> {
    let outcome = exporter(context)?.revoke(grant)?;
    let list = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    Ok(format!("revoked={} unacknowledged={}", list(&outcome.revoked), list(&outcome.unacknowledged)))
}

/// `pause`: takes this API's one hold on the vCPUs and tells the inspectors.
fn pause(context: &ApiContext) -> Result<String, ApiError> {
    if context.paused.swap(true, Ordering::SeqCst) {
        return Err(ApiError::AlreadyPaused);
    }
    if let Err(e) = context.lifecycle.pause() {
        context.paused.store(false, Ordering::SeqCst);
        return Err(e.into());
    }
    if let Some(e) = &context.exporter {
        e.broadcast(&Message::Paused);
    }
    Ok(String::new())
}

/// `resume`: releases this API's hold and tells the inspectors.
fn resume(context: &ApiContext) -> Result<String, ApiError> {
    if !context.paused.swap(false, Ordering::SeqCst) {
        return Err(ApiError::NotPaused);
    }
    context.lifecycle.resume();
    if let Some(e) = &context.exporter {
        e.broadcast(&Message::Resumed);
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ApiContext {
        ApiContext {
            lifecycle: Arc::new(Lifecycle::new().unwrap()),
            exporter: None,
            memory: Arc::new(vec![(0, 0x10_0000)]),
            paused: Default::default(),
        }
    }

    /// The reply text of a failed command, as the client reads it.
    fn refusal(line: &str, context: &ApiContext) -> String {
        crate::error_chain(&execute(line, context).unwrap_err())
    }

    #[test]
    fn bad_commands_and_arguments_are_named() {
        let context = context();
        assert!(matches!(execute("", &context), Err(ApiError::EmptyCommand)));
        assert_eq!(refusal("bogus 1", &context), "unknown command 'bogus'");
        assert_eq!(refusal("discard", &context), "missing GPA");
        assert_eq!(refusal("discard 0x1000 zz", &context), "bad LEN 'zz'");
        assert_eq!(refusal("revoke 3", &context), "no mirror socket (start the vmm with --mirror-socket)");
        assert_eq!(execute("memory", &context).unwrap(), "0x0:0x100000");
    }

    #[test]
    fn one_pause_hold_at_a_time() {
        let context = context();
        assert!(matches!(execute("resume", &context), Err(ApiError::NotPaused)));
        assert_eq!(execute("pause", &context).unwrap(), "", "no vCPU thread runs: paused at once");
        assert!(context.lifecycle.is_paused());
        assert_eq!(refusal("pause", &context), "already paused");
        assert_eq!(execute("resume", &context).unwrap(), "");
        assert!(!context.lifecycle.is_paused());
    }
}
