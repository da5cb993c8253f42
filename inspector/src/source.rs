//! One source interface: a Specula `vmm` behind the mirror device, or an unmodified
//! QEMU behind QMP. Attaching maps the RAM asked for read-only and yields the
//! source's events on a channel; the rest of the inspector does not care which
//! kind it has.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use mirror_driver::importer::{ImportError, Importer, MappedGrant, SourceEvent};
use mirror_driver::kernel_mirror::{KernelMirrorError, PidSource};
use mirror_driver::protocol::{Range, VcpuRegs};
use specula_qemu::{CpuMsrs, QemuError, QemuSource};

/// What the inspector attaches to.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A Specula `vmm`'s mirror socket.
    Mirror(PathBuf),
    /// An unmodified QEMU, through its QMP socket (its pid: the socket's peer unless given).
    Qemu { qmp: PathBuf, pid: Option<u32> },
    /// Any KVM VMM by pid, through the kernel mirror device at `device`.
    Pid { pid: u32, device: PathBuf },
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Mirror(path) => write!(f, "{}", path.display()),
            SourceSpec::Qemu { qmp, .. } => write!(f, "QEMU at {}", qmp.display()),
            SourceSpec::Pid { pid, .. } => write!(f, "process {pid} through the kernel mirror device"),
        }
    }
}

/// Failures of a source operation.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("mirror device")]
    Mirror(#[from] ImportError),
    #[error("QEMU")]
    Qemu(#[from] QemuError),
    #[error("kernel mirror device")]
    KernelMirror(#[from] KernelMirrorError),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// What the inspector asks of a source once attached.
pub trait Source: Send + Sync {
    /// `specula` or `qemu`.
    fn kind(&self) -> &'static str;
    /// Registers of every vCPU.
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceError>;
    /// Stops (`true`) or resumes the source's vCPUs, where the source lets an inspector.
    fn set_paused(&self, paused: bool) -> Result<(), SourceError>;
    /// Tells the source a revoked grant is unmapped (mirror sources revoke; others never do).
    fn acknowledge_revoke(&self, grant_id: u64, nonce: u64) -> Result<(), SourceError>;
    /// Subscribes to the pages the source writes in our grants ([`SourceEvent::Dirty`]);
    /// returns how often and how the source collects them. Sources without a dirty log
    /// refuse.
    fn subscribe_dirty(&self) -> Result<mirror_driver::importer::DirtyFeed, SourceError> {
        Err(SourceError::Unsupported("this source keeps no dirty log (QEMU's is not reachable over QMP)"))
    }
    /// Collects the source's dirty log now: every page it logged arrives as a `Dirty`
    /// event, then [`SourceEvent::DirtySynced`] with `token`. Only subscribed sources.
    fn dirty_sync(&self, _token: u64) -> Result<(), SourceError> {
        Err(SourceError::Unsupported("this source keeps no dirty log"))
    }
    /// Subscribes to the source's trace events of `kinds` (bits of
    /// `mirror_driver::protocol::trace_kind`; 0 stops them), delivered as events
    /// ([`SourceEvent::MsrWrite`]); returns the source's cap on events per second. Only
    /// a Specula `vmm` started with `--mirror-allow-trace` traces.
    fn subscribe_trace(&self, _kinds: u32) -> Result<u32, SourceError> {
        Err(SourceError::Unsupported(
            "this source cannot be traced (only a Specula vmm, started with --mirror-allow-trace, exits to its VMM on the guest's MSR writes)",
        ))
    }
    /// Arms exactly these breakpoints in the source's guest, in the debug registers or
    /// (`software`) as `int3`s (none: disarms),
    /// their hits delivered as [`SourceEvent::BreakpointHit`]. Only a Specula `vmm`
    /// started with `--mirror-allow-trace`.
    fn set_breakpoints(
        &self,
        _software: bool,
        _points: &[mirror_driver::protocol::Breakpoint],
    ) -> Result<u32, SourceError> {
        Err(SourceError::Unsupported(
            "this source cannot be traced (only a Specula vmm, started with --mirror-allow-trace, arms hardware breakpoints for an inspector)",
        ))
    }
    /// Traps the guest's writes to exactly these guest-physical ranges (none: disarms),
    /// each delivered as [`SourceEvent::MemoryWrite`]; returns the pages trapped. Only a
    /// Specula `vmm` started with `--mirror-allow-trace`.
    fn set_write_traps(&self, _ranges: &[mirror_driver::protocol::Range]) -> Result<u64, SourceError> {
        Err(SourceError::Unsupported(
            "this source cannot be traced (only a Specula vmm, started with --mirror-allow-trace, traps the guest's writes for an inspector)",
        ))
    }
    /// Whether mapped grants keep the source's last contents once it is gone (memfd
    /// pages outlive their VMM; a process's anonymous memory does not).
    fn contents_outlive_the_source(&self) -> bool {
        true
    }
    /// Whether the source's memory is gone now, so that the agent's mappings of it
    /// fault (asked when the agent's vCPU meets such a fault, before any exit event may
    /// have come). Never, where the contents outlive the source.
    fn memory_gone(&self) -> bool {
        false
    }
    /// The system-call MSRs (LSTAR) of every vCPU, where the source can tell them.
    fn cpu_msrs(&self) -> Result<Vec<CpuMsrs>, SourceError> {
        Err(SourceError::Unsupported("this source does not report vCPU MSRs"))
    }
}

/// A source attached, its RAM mapped, its events on their way.
pub struct Attached {
    pub source: Box<dyn Source>,
    pub mapped: Vec<MappedGrant>,
    /// The source's highest RAM address (the mirror window's length).
    pub window_len: u64,
    pub events: Receiver<SourceEvent>,
}

/// Attaches to `spec` and maps `ranges` (all of the source's RAM when `None`);
/// `check` vets the memory map and the ranges before anything is mapped.
pub fn attach<E>(
    spec: &SourceSpec,
    ranges: Option<&[Range]>,
    check: impl Fn(u64, &[Range]) -> Result<(), E>,
) -> Result<Attached, E>
where
    E: From<SourceError>,
{
    match spec {
        SourceSpec::Mirror(path) => {
            let importer = Importer::connect(path).map_err(SourceError::from)?;
            let map = importer.memory_map().map_err(SourceError::from)?;
            let (window_len, ranges) = plan(&map, ranges);
            check(window_len, &ranges)?;
            let mapped = importer.grant(&ranges).map_err(SourceError::from)?;
            let (tx, events) = mpsc::channel();
            let importer = importer
                .start_events(move |_, event| {
                    let _ = tx.send(event);
                })
                .map_err(SourceError::from)?;
            Ok(Attached { source: Box::new(MirrorSource(importer)), mapped, window_len, events })
        }
        SourceSpec::Qemu { qmp, pid } => {
            let qemu = QemuSource::attach(qmp, *pid).map_err(SourceError::from)?;
            let (window_len, ranges) = plan(&qemu.memory_map(), ranges);
            check(window_len, &ranges)?;
            let mapped = qemu.map(&ranges).map_err(SourceError::from)?;
            let events = qemu.take_events().expect("a fresh QEMU source has its event channel");
            Ok(Attached { source: Box::new(qemu), mapped, window_len, events })
        }
        SourceSpec::Pid { pid, device } => {
            let source = PidSource::attach(*pid, device).map_err(SourceError::from)?;
            let (window_len, ranges) = plan(&source.memory_map(), ranges);
            check(window_len, &ranges)?;
            let mapped = source.map(&ranges).map_err(SourceError::from)?;
            let events = source.watch_exit().map_err(SourceError::from)?;
            Ok(Attached { source: Box::new(source), mapped, window_len, events })
        }
    }
}

/// The window length a memory map needs, and the ranges to map.
fn plan(map: &[Range], ranges: Option<&[Range]>) -> (u64, Vec<Range>) {
    let window_len = map.iter().map(|r| r.gpa + r.len).max().unwrap_or(0);
    (window_len, ranges.map(<[Range]>::to_vec).unwrap_or_else(|| map.to_vec()))
}

/// A Specula `vmm` source.
struct MirrorSource(Arc<Importer>);

impl Source for MirrorSource {
    fn kind(&self) -> &'static str {
        "specula"
    }

    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceError> {
        Ok(self.0.vcpu_state()?)
    }

    fn set_paused(&self, paused: bool) -> Result<(), SourceError> {
        Ok(self.0.set_paused(paused)?)
    }

    fn acknowledge_revoke(&self, grant_id: u64, nonce: u64) -> Result<(), SourceError> {
        Ok(self.0.ack_revoke(grant_id, nonce)?)
    }

    fn subscribe_dirty(&self) -> Result<mirror_driver::importer::DirtyFeed, SourceError> {
        Ok(self.0.subscribe_dirty()?)
    }

    fn dirty_sync(&self, token: u64) -> Result<(), SourceError> {
        Ok(self.0.dirty_sync(token)?)
    }

    fn subscribe_trace(&self, kinds: u32) -> Result<u32, SourceError> {
        Ok(self.0.subscribe_trace(kinds)?)
    }

    fn set_breakpoints(
        &self,
        software: bool,
        points: &[mirror_driver::protocol::Breakpoint],
    ) -> Result<u32, SourceError> {
        Ok(self.0.set_breakpoints(software, points)?)
    }

    fn set_write_traps(&self, ranges: &[mirror_driver::protocol::Range]) -> Result<u64, SourceError> {
        Ok(self.0.set_write_traps(ranges)?)
    }

    fn cpu_msrs(&self) -> Result<Vec<CpuMsrs>, SourceError> {
        Ok(self
            .0
            .vcpu_state()?
            .into_iter()
            .map(|v| CpuMsrs {
                cpu: v.index,
                efer: v.efer,
                star: v.star,
                lstar: v.lstar,
                cstar: v.cstar,
                fmask: v.fmask,
                kernel_gs_base: v.kernel_gs_base,
            })
            .collect())
    }
}

impl Source for QemuSource {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceError> {
        Ok(QemuSource::vcpu_state(self)?)
    }

    fn set_paused(&self, paused: bool) -> Result<(), SourceError> {
        if paused {
            self.pause()?;
        } else {
            self.resume()?;
        }
        Ok(())
    }

    fn acknowledge_revoke(&self, _grant_id: u64, _nonce: u64) -> Result<(), SourceError> {
        Ok(())
    }

    fn cpu_msrs(&self) -> Result<Vec<CpuMsrs>, SourceError> {
        Ok(QemuSource::cpu_msrs(self)?)
    }
}

/// Any KVM VMM by pid: memory only. Registers, pausing and MSRs need the VMM's
/// cooperation (a mirror socket or QMP), which a pid alone does not give.
impl Source for PidSource {
    fn kind(&self) -> &'static str {
        "kernel-mirror"
    }

    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceError> {
        Err(SourceError::Unsupported(
            "a source attached by pid gives memory only: its vCPU registers are the VMM's (use its mirror socket or QMP)",
        ))
    }

    fn set_paused(&self, _paused: bool) -> Result<(), SourceError> {
        Err(SourceError::Unsupported("a source attached by pid cannot be paused by the inspector"))
    }

    fn acknowledge_revoke(&self, _grant_id: u64, _nonce: u64) -> Result<(), SourceError> {
        Ok(())
    }

    /// The device zaps the mapping when the source's memory goes, and a later fault
    /// is SIGBUS for a process and EFAULT for the agent's vCPU.
    fn contents_outlive_the_source(&self) -> bool {
        false
    }

    fn memory_gone(&self) -> bool {
        PidSource::memory_gone(self)
    }
}
