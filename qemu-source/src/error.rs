//! What fails attaching to or talking with QEMU, and small helpers for the messages.

use std::path::PathBuf;
use std::time::Duration;

use mirror_driver::importer::ImportError;

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
    #[error("QEMU's device-state snapshot needs the x-ignore-shared migration capability (QEMU 4.0 or later)")]
    NoIgnoreShared,
    #[error("QEMU's device-state snapshot {status}: {reason}")]
    SnapshotFailed { status: String, reason: String },
    #[error("QEMU's device-state snapshot did not finish within {0:?}")]
    SnapshotTimeout(Duration),
    #[error("QEMU's device-state snapshot reader panicked")]
    SnapshotReader,
    #[error("reading QEMU's device-state snapshot")]
    State(#[from] crate::state::StateError),
}

/// At most 200 characters of `text`, for error messages.
pub(crate) fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

pub(crate) fn parse_error(what: &'static str, detail: impl Into<String>) -> QemuError {
    QemuError::Parse { what, detail: detail.into() }
}
