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
//! events and the monitor's end become [`SourceEvent`](mirror_driver::importer::SourceEvent)s.
//!
//! Everything QEMU says is parsed with bounds: lines, counts, numbers.

//!
//! Modules: [`qmp`] (the monitor session), [`layout`] (memory backends and where
//! guest RAM lies), [`hmp`] (parsers of human-monitor text: registers, memory dumps),
//! [`state`] (QEMU's device-state stream, for the MSRs QMP does not show), and the
//! attached VM, [`QemuSource`], which finds and opens the backends' files read-only.

mod error;
mod files;
pub mod hmp;
pub mod layout;
pub mod qmp;
mod source;
pub mod state;

pub use error::{QemuError, SHARED_RAM_HINT};
pub use qmp::Qmp;
pub use source::QemuSource;
pub use state::{CpuMsrs, StateError};
