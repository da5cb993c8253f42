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

use mirror_driver::exporter::Exporter;
use mirror_driver::protocol::Message;

use crate::line_server::{self, parse_number as number, Limits};
use crate::vstate::vcpu::{Lifecycle, VmExit};

/// Longest accepted command line.
const MAX_LINE: u64 = 256;

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

fn exporter(context: &ApiContext) -> Result<&Exporter, String> {
    context.exporter.as_deref().ok_or_else(|| "no mirror socket (start the vmm with --mirror-socket)".to_string())
}

/// Runs one command.
pub fn execute(line: &str, context: &ApiContext) -> Result<String, String> {
    let mut words = line.split_whitespace();
    match words.next().unwrap_or("") {
        "discard" => {
            let gpa = number(words.next(), "GPA")?;
            let len = number(words.next(), "LEN")?;
            exporter(context)?.discard(gpa, len).map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        "revoke" => {
            let id = number(words.next(), "GRANT")?;
            let outcome = exporter(context)?.revoke(id).map_err(|e| crate::error_chain(&e))?;
            let list = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            Ok(format!("revoked={} unacknowledged={}", list(&outcome.revoked), list(&outcome.unacknowledged)))
        }
        "grants" => Ok(exporter(context)?
            .grants()
            .iter()
            .map(|r| format!("{}:{:#x}:{:#x}:{}:{}", r.grant.id, r.grant.gpa, r.grant.len, r.uid, r.state.name()))
            .collect::<Vec<_>>()
            .join(" ")),
        "inspectors" => Ok(exporter(context)?.connection_count().to_string()),
        "pause" => {
            if context.paused.swap(true, Ordering::SeqCst) {
                return Err("already paused".into());
            }
            if let Err(e) = context.lifecycle.pause() {
                context.paused.store(false, Ordering::SeqCst);
                return Err(e);
            }
            if let Some(e) = &context.exporter {
                e.broadcast(&Message::Paused);
            }
            Ok(String::new())
        }
        "resume" => {
            if !context.paused.swap(false, Ordering::SeqCst) {
                return Err("not paused".into());
            }
            context.lifecycle.resume();
            if let Some(e) = &context.exporter {
                e.broadcast(&Message::Resumed);
            }
            Ok(String::new())
        }
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
        "" => Err("empty command".into()),
        other => Err(format!("unknown command '{other}'")),
    }
}
