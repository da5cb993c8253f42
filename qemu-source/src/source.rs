//! An attached QEMU VM: its monitor, its RAM files open read-only, and the device-state
//! snapshot that gives the MSRs.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::Duration;

use mirror_driver::importer::{map_foreign, MappedGrant, SourceEvent};
use mirror_driver::protocol::{Grant, Range, VcpuRegs};
use serde_json::{json, Value};
use specula_common::sync::lock;

use crate::error::{clip, QemuError};
use crate::files::open_backend_files;
use crate::hmp::parse_registers;
use crate::layout::{parse_flatview, parse_memdevs, Backend, RamRange};
use crate::qmp::{Qmp, QMP_TIMEOUT};
use crate::state::CpuMsrs;

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
    /// `x-ignore-shared` so that no shared RAM is in it) and [`crate::state`]
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
            .ok_or(QemuError::NoIgnoreShared)?;
        ignore_shared(true)?;
        let outcome = self.snapshot(running);
        if !was_set {
            let _ = ignore_shared(false);
        }
        crate::state::cpu_msrs(&outcome?).map_err(QemuError::from)
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
        let bytes = reader.join().map_err(|_| QemuError::SnapshotReader)?;
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
                    return Err(QemuError::SnapshotFailed { status: status.to_string(), reason: clip(why) });
                }
                _ if std::time::Instant::now() > deadline => return Err(QemuError::SnapshotTimeout(QMP_TIMEOUT)),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// The name QEMU gives the snapshot pipe's fd while it holds it.
const SNAPSHOT_FD: &str = "specula-snapshot";

/// Reads a snapshot to its end, keeping at most [`crate::state::MAX_STREAM`] + 1
/// bytes (the rest is drained, so QEMU never blocks on a full pipe).
fn read_bounded(mut pipe: std::io::PipeReader) -> Result<Vec<u8>, QemuError> {
    let limit = crate::state::MAX_STREAM + 1;
    let mut kept = Vec::new();
    (&mut pipe).take(limit as u64).read_to_end(&mut kept).map_err(QemuError::Io)?;
    std::io::copy(&mut pipe, &mut std::io::sink()).map_err(QemuError::Io)?;
    Ok(kept)
}
