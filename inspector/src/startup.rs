//! Start-up: attach to the source, build the agent VM with the grants in its mirror
//! window, start the core ([`Inspector`]), its event and watch threads, and the front
//! ends (HTTP API, line socket). The only module that knows both the core and the
//! front ends.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use guest_images::agent::E820_MIRROR;
use mirror_driver::importer::SourceEvent;
use mirror_driver::protocol::Range;
use vmm::devices::doorbell::Doorbell;
use vmm::devices::serial::SerialOutput;
use vmm::{VmConfig, VmExit, Vmm};

use crate::agent_link::{AgentError, AgentLink};
use crate::core::{say, GrantMap, Inspector, LiveGrant, Parts, MAX_WINDOW_END, PAGE, WINDOW_BASE};
use crate::source::SourceError;
pub use crate::source::SourceSpec;
use crate::view_cache::ViewCacheMode;
use crate::window::{MirrorWindow, WindowError};

/// How the daemon runs.
#[derive(Clone)]
pub struct DaemonConfig {
    pub source: SourceSpec,
    /// Ranges to ask for; `None` asks for all of the source's RAM.
    pub ranges: Option<Vec<Range>>,
    pub control_socket: Option<PathBuf>,
    /// The HTTP API socket, and who may use it.
    pub api: Option<(PathBuf, crate::api::ApiAccess)>,
    pub memory: u64,
    pub serial: SerialOutput,
    /// Ranges to keep under an integrity watch, reported on stdout as they change.
    pub watches: Vec<Range>,
    pub watch_interval: Duration,
    pub kvm_path: PathBuf,
    /// Whether to subscribe to the source's dirty-page feed (where it has one).
    pub dirty_log: bool,
    /// The agent image to boot; `None`: the one built into this binary.
    pub agent: Option<PathBuf>,
    /// Which OS views are kept and served again while what they read is unchanged
    /// (needs the dirty-page feed).
    pub view_cache: ViewCacheMode,
    /// Most bytes per second a scan may read, to bound what it costs the source (its
    /// memory bandwidth and caches); `None`: as fast as the agent goes.
    pub scan_rate_limit: Option<u64>,
}

/// Failures of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("attaching to the source")]
    Source(#[from] SourceError),
    #[error("the source's RAM ends at {0:#x}, beyond the {MAX_WINDOW_END:#x} the mirror window can map")]
    SourceTooLarge(u64),
    #[error("range {gpa:#x}+{len:#x} is not 4 KiB-aligned; memslots map whole pages")]
    Unaligned { gpa: u64, len: u64 },
    #[error("building the agent VM")]
    Build(#[from] vmm::BuildError),
    #[error("KVM cannot isolate the mirror window")]
    Kvm(#[from] vmm::vstate::vm::VmError),
    #[error("placing the grants in the mirror window")]
    Window(#[from] WindowError),
    #[error("the agent")]
    Agent(#[from] AgentError),
    #[error("cannot serve the control socket")]
    Control(#[source] std::io::Error),
    #[error("cannot put the built-in agent image in a sealed memfd")]
    EmbeddedAgent(#[source] std::io::Error),
}

/// Attaches, builds and runs the agent VM until it stops; returns how it ended.
pub fn run(config: &DaemonConfig) -> Result<VmExit, DaemonError> {
    let started = Instant::now();
    let attached = crate::source::attach(&config.source, config.ranges.as_deref(), check_plan)?;
    let mapped_after = started.elapsed();
    let window_len = attached.window_len;

    let doorbell = Arc::new(Doorbell::new());
    // The embedded agent lives in a sealed memfd while the VM is built from it.
    let embedded;
    let agent = match &config.agent {
        Some(path) => path.clone(),
        None => {
            embedded = embedded_agent().map_err(DaemonError::EmbeddedAgent)?;
            PathBuf::from(format!("/proc/self/fd/{}", embedded.as_raw_fd()))
        }
    };
    let mut vm_config = VmConfig::with_kernel(agent);
    vm_config.kvm_path = config.kvm_path.clone();
    vm_config.boot.extra_memmap = vec![(WINDOW_BASE, window_len, E820_MIRROR)];
    vm_config.memory = config.memory;
    vm_config.serial = config.serial.clone();
    vm_config.host_tsc = true;
    vm_config.extra_pio_devices.push((vmm::devices::doorbell::PORTS, doorbell.clone()));
    let vmm = Vmm::build(&vm_config)?;
    let vm = vmm.vm();
    // The mirror's isolation rests on read-only memslots: without them, refuse to run.
    vm.require(kvm_ioctls::Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM")?;
    let mut mapped = attached.mapped;
    let building = started.elapsed() - mapped_after;
    let placing = Instant::now();
    let window = MirrorWindow::place(&vm, WINDOW_BASE, &mut mapped)?;
    let placed_in = placing.elapsed();
    let bytes: u64 = mapped.iter().map(|m| m.grant.len).sum();
    let grants: GrantMap = mapped.into_iter().map(|m| (m.grant.id, LiveGrant { mapped: m })).collect();
    let count = grants.len();
    let link = AgentLink::new(vmm.ram().shared_memory(), doorbell, WINDOW_BASE, window_len)?;
    say(format_args!(
        "attached to {}: {count} grants in {} memslots, {} MiB mirrored read-only at window {WINDOW_BASE:#x}; \
         grants mapped after {:.1} ms, agent VM built in {:.1} ms, grants placed in memslots in {:.1} ms; \
         memslots ready after {:.1} ms",
        config.source,
        window.regions().len(),
        bytes >> 20,
        mapped_after.as_secs_f64() * 1e3,
        building.as_secs_f64() * 1e3,
        placed_in.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    ));

    let dirty_feed = if config.dirty_log {
        match attached.source.subscribe_dirty() {
            Ok(feed) => {
                say(format_args!(
                    "dirty-page feed on: the source reports written pages every {} us ({})",
                    feed.interval.as_micros(),
                    feed.mechanism.name()
                ));
                Some(feed.mechanism)
            }
            Err(e) => {
                say(format_args!("no dirty-page feed ({}); watches re-hash", vmm::error_chain(&e)));
                None
            }
        }
    } else {
        None
    };
    let inspector = Arc::new(Inspector::new(Parts {
        link,
        vm,
        grants,
        source: attached.source,
        window_len,
        window,
        dirty_feed,
        scan_rate_limit: config.scan_rate_limit,
        view_cache: config.view_cache,
    }));
    let weak = Arc::downgrade(&inspector);
    vmm.lifecycle().on_memory_fault(Arc::new(move |_| {
        weak.upgrade().is_some_and(|inspector| inspector.recover_from_lost_source_memory())
    }));
    start_events(&inspector, attached.events).map_err(DaemonError::Control)?;
    start_trace_resolver(&inspector).map_err(DaemonError::Control)?;

    if let Some(path) = &config.control_socket {
        crate::line::serve(path, inspector.clone()).map_err(DaemonError::Control)?;
    }
    if let Some((path, access)) = &config.api {
        crate::api::serve(path, inspector.clone(), access.clone()).map_err(DaemonError::Control)?;
    }
    start_watches(&inspector, config);
    let exit = vmm.run(true, Vec::new())?;
    Ok(exit)
}

/// The agent image built into this binary ([`guest_images::INSPECTOR_AGENT_ELF`]), in
/// a memfd sealed against every change, for the loader to open by path.
fn embedded_agent() -> std::io::Result<std::fs::File> {
    use std::io::Write;
    // SAFETY: memfd_create with a literal name; the fd is owned by the File at once.
    let fd = unsafe { libc::memfd_create(c"inspector-agent".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(guest_images::INSPECTOR_AGENT_ELF)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Refuses a source the mirror window cannot hold, and ranges memslots cannot map.
fn check_plan(window_len: u64, ranges: &[Range]) -> Result<(), DaemonError> {
    if WINDOW_BASE + window_len > MAX_WINDOW_END {
        return Err(DaemonError::SourceTooLarge(window_len));
    }
    match ranges.iter().find(|r| !r.gpa.is_multiple_of(PAGE) || !r.len.is_multiple_of(PAGE)) {
        Some(r) => Err(DaemonError::Unaligned { gpa: r.gpa, len: r.len }),
        None => Ok(()),
    }
}

/// Hands the source's events to the inspector on a thread of their own, until the
/// source is gone or the inspector is.
fn start_events(inspector: &Arc<Inspector>, events: Receiver<SourceEvent>) -> std::io::Result<()> {
    let weak: Weak<Inspector> = Arc::downgrade(inspector);
    std::thread::Builder::new().name("source-events".into()).spawn(move || {
        for event in events {
            let gone = event == SourceEvent::Gone;
            match weak.upgrade() {
                Some(inspector) => inspector.on_event(event),
                None => return,
            }
            if gone {
                return;
            }
        }
    })?;
    Ok(())
}

/// Publishes the source's traced events, resolved through the agent, on a thread of
/// their own (the source-event thread never waits on the agent), until the inspector
/// is gone.
fn start_trace_resolver(inspector: &Arc<Inspector>) -> std::io::Result<()> {
    let weak: Weak<Inspector> = Arc::downgrade(inspector);
    std::thread::Builder::new().name("trace-resolver".into()).spawn(move || {
        while let Some(inspector) = weak.upgrade() {
            inspector.publish_trace_events(Duration::from_millis(500));
        }
    })?;
    Ok(())
}

/// Waits for the agent, sets the configured watches, and reports changes as they happen.
fn start_watches(inspector: &Arc<Inspector>, config: &DaemonConfig) {
    let weak = Arc::downgrade(inspector);
    let watches = config.watches.clone();
    let interval = config.watch_interval;
    let _ = std::thread::Builder::new().name("integrity-watch".into()).spawn(move || {
        let Some(inspector) = weak.upgrade() else { return };
        if !inspector.wait_agent_ready(Duration::from_secs(60)) {
            say(format_args!("the agent did not become ready"));
            return;
        }
        say(format_args!("agent ready"));
        for w in &watches {
            match inspector.watch(w.gpa, w.len, true) {
                Ok(id) => say(format_args!("integrity watch {id} on {:#x}+{:#x}: baseline taken", w.gpa, w.len)),
                Err(e) => say(format_args!("cannot watch {:#x}+{:#x}: {e}", w.gpa, w.len)),
            }
        }
        drop(inspector);
        // Polls every watch made polled, from the command line or through the API.
        loop {
            std::thread::sleep(interval);
            let Some(inspector) = weak.upgrade() else { return };
            inspector.poll_watches();
        }
    });
}
