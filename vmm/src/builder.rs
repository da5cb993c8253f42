//! Builds a VM from a [`VmConfig`] and runs it: memory, KVM VM and irqchip,
//! kernel, devices, vCPUs, then the event loop until something ends the VM.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use mirror_driver::trace::{TraceFeed, TraceLimits};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::{acpi, mptable, reset_vector};
use crate::boot;
use crate::config::VmConfig;
use crate::devices::serial::{self, SerialInput, SerialOutput, SerialPort};
use crate::devices::virtio::{MmioBus, MmioTransport, VirtioEvents};
use crate::devices::{self, PioBus, PioBusError, COM1_IRQ};
use crate::memory::GuestRam;
use crate::signals::StopSignals;
use crate::vstate::ram_slots::RamMemslots;
use crate::vstate::trace::GuestTrace;
use crate::vstate::vcpu::{self, Lifecycle, Vcpu, VmExit};
use crate::vstate::vm::Vm;

/// Failures while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("KVM")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("loading the kernel")]
    Boot(#[from] crate::boot::BootError),
    #[error("vCPU")]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("MP table")]
    Mptable(#[from] mptable::MptableError),
    #[error("ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error("reset vector")]
    ResetVector(#[from] reset_vector::ResetVectorError),
    #[error("{requested} vCPUs requested, but image {image} supports at most {max}")]
    TooManyCpusForImage { requested: u8, max: u32, image: String },
    #[error("KVM_GET_SUPPORTED_CPUID (to choose the page size of the guest's page tables) failed")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set up the serial console")]
    Serial(#[source] std::io::Error),
    #[error("cannot create the i8042 reset event")]
    ResetEvent(#[source] std::io::Error),
    #[error("cannot place a device on the port-I/O bus")]
    PioBus(#[from] PioBusError),
    #[error("cannot set up the event loop")]
    EventLoop(#[source] std::io::Error),
    #[error("cannot create the event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("mirror device")]
    Mirror(#[from] mirror_driver::exporter::ExportError),
    #[error("cannot start the API socket")]
    Api(#[source] std::io::Error),
    #[error("{0} virtio devices asked for; a VM has at most {max}", max = devices::virtio::MAX_VIRTIO_DEVICES)]
    TooManyVirtioDevices(usize),
    #[error("disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: devices::virtio::block::BlockError,
    },
    #[error("network device {index}")]
    Net {
        index: usize,
        #[source]
        source: devices::virtio::net::NetError,
    },
    #[error("cannot set up the vsock device")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    #[error("cannot set up virtio device {index}'s queues or interrupt")]
    Virtio {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The virtio devices, as the vCPUs (the bus) and the event loop (each transport) see them.
type VirtioDevices = (MmioBus, Vec<Arc<Mutex<MmioTransport>>>);

/// A built, not yet running VM.
pub struct Vmm {
    vm: Arc<Vm>,
    ram: GuestRam,
    /// Guest RAM's memslots (split where the trace's write traps make pages read-only).
    ram_slots: Arc<RamMemslots>,
    bus: Arc<PioBus>,
    /// The virtio devices' register windows, for the vCPUs.
    mmio: Arc<MmioBus>,
    /// The virtio devices, for the event loop.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// COM1, also on the bus: the event loop feeds it stdin.
    serial: Arc<SerialPort>,
    lifecycle: Arc<Lifecycle>,
    vcpus: Vec<Vcpu>,
    reset_evt: EventFd,
    serial_input: bool,
    /// What inspectors trace in the guest, when the source lets them.
    trace: Option<Arc<GuestTrace>>,
    config: VmConfig,
}

impl Vmm {
    /// Builds everything: RAM, VM, irqchip, kernel, MP table, devices, vCPUs.
    pub fn build(config: &VmConfig) -> Result<Self, BuildError> {
        let ram = GuestRam::with_backend(config.memory, config.memory_backend)?;
        let vm = Vm::new(&config.kvm_path)?;
        vm.setup_irqchip()?;
        let ram_slots = vm.register_ram(&ram)?;
        let virtio_count = config.disks.len() + config.nets.len() + usize::from(config.vsock.is_some());
        if virtio_count > devices::virtio::MAX_VIRTIO_DEVICES {
            return Err(BuildError::TooManyVirtioDevices(virtio_count));
        }
        let virtio_slots: Vec<(u64, u32)> = (0..virtio_count).map(devices::virtio::device_slot).collect();
        let rsdp = acpi::setup_acpi(ram.memory(), config.cpus, &virtio_slots)?;
        reset_vector::setup_reset_vector(ram.memory())?;
        let entry = boot::load_with(&ram, &config.boot, Some(rsdp), config.kernel_decompress)?;
        if let Some(note) = &entry.page_tables {
            prebuild_page_tables(&vm, &ram, config, note)?;
        }
        if let Some(max) = entry.smp_entry_max_cpus {
            if u32::from(config.cpus) > max {
                return Err(BuildError::TooManyCpusForImage {
                    requested: config.cpus,
                    max,
                    image: config.boot.kernel.display().to_string(),
                });
            }
        }
        mptable::setup_mptable(ram.memory(), config.cpus)?;

        let (serial, serial_irq) = serial::build(&config.serial).map_err(BuildError::Serial)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = Arc::new(SerialPort::new(serial));
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::ResetEvent)?;
        let bus = Arc::new(build_bus(config, serial.clone(), &reset_evt)?);

        if config.mirror_socket.is_some() {
            choose_dirty_ring(&vm, config)?;
        } else if config.dirty_log == crate::config::DirtyLogMode::Ring {
            log::warn!("--dirty-log ring has no effect without --mirror-socket (nothing subscribes to a dirty log)");
        }
        vcpu::install_kick_handler()?;
        let vm = Arc::new(vm);
        let ram_slots = Arc::new(RamMemslots::new(vm.clone(), &ram, &ram_slots));
        let lifecycle = Arc::new(Lifecycle::new().map_err(BuildError::EventLoop)?);
        let (mmio, virtio) = build_virtio(&vm, &ram, &ram_slots, &lifecycle, config, &virtio_slots)?;
        let trace = trace_feed(config)
            .map(|feed| Arc::new(GuestTrace::new(vm.clone(), feed, ram.shared_memory(), ram_slots.clone())));
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let mut vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&vm, &ram, &entry, config.cpus, config.host_tsc)?;
            if let Some(trace) = &trace {
                vcpu.set_trace(trace.for_vcpu(ram.shared_memory()));
            }
            vcpus.push(vcpu);
        }
        let serial_input = config.serial == SerialOutput::Tty;
        Ok(Self {
            vm,
            ram,
            ram_slots,
            bus,
            mmio: Arc::new(mmio),
            virtio,
            serial,
            lifecycle,
            vcpus,
            reset_evt,
            serial_input,
            trace,
            config: config.clone(),
        })
    }

    /// Guest RAM (for the mirror device).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM, shareable with threads that add or remove memslots while it runs.
    pub fn vm(&self) -> Arc<Vm> {
        self.vm.clone()
    }

    /// Shared VM lifecycle: request an exit from another thread with it.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        self.lifecycle.clone()
    }

    /// Runs the VM until it ends; SIGINT/SIGTERM stop it when `handle_signals` is set.
    /// `extra` subscribers join the event loop (the mirror socket, for one).
    pub fn run(mut self, handle_signals: bool, extra: Vec<Subscriber>) -> Result<VmExit, BuildError> {
        let mut manager: EventManager<Subscriber> = EventManager::new().map_err(BuildError::EventManager)?;
        if handle_signals {
            let signals = StopSignals::new(self.lifecycle.clone()).map_err(BuildError::EventLoop)?;
            manager.add_subscriber(Arc::new(Mutex::new(signals)));
        }
        manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            lifecycle: self.lifecycle.clone(),
            reset_evt: self.reset_evt.try_clone().map_err(BuildError::EventLoop)?,
        })));
        if self.serial_input {
            let input = SerialInput::new(std::io::stdin().as_raw_fd(), self.serial.clone());
            manager.add_subscriber(Arc::new(Mutex::new(input)));
        }
        if !self.virtio.is_empty() {
            let events = VirtioEvents::new(self.lifecycle.clone(), &self.virtio);
            manager.add_subscriber(Arc::new(Mutex::new(events)));
        }
        for subscriber in extra {
            manager.add_subscriber(subscriber);
        }

        let (threads, vcpu_error) = self.start_vcpus();
        let services = match vcpu_error {
            Some(e) => Err(e.into()),
            None => self.start_services(),
        };
        if services.is_ok() {
            while self.lifecycle.exit_reason().is_none() {
                if let Err(e) = manager.run() {
                    self.lifecycle
                        .request_exit(VmExit::Crash(format!("event loop failed: {}", crate::error_chain(&e))));
                }
            }
        }
        if let Ok(Some(exporter)) = &services {
            exporter.shutdown();
        }
        if !stop_vcpus(&self.lifecycle, threads) {
            // A vCPU thread left running may still reach devices that touch guest RAM:
            // the RAM stays mapped until the process exits.
            std::mem::forget(self.ram.shared_memory());
        }
        services?;
        Ok(self.lifecycle.exit_reason().expect("the loop ends only with an exit reason"))
    }

    /// Spawns a thread per vCPU; stops at the first that fails to start.
    fn start_vcpus(&mut self) -> (Vec<std::thread::JoinHandle<()>>, Option<vcpu::VcpuError>) {
        use std::os::unix::thread::JoinHandleExt;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut error = None;
        for vcpu in std::mem::take(&mut self.vcpus) {
            match vcpu.start(self.bus.clone(), self.mmio.clone(), self.lifecycle.clone()) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        self.lifecycle.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        (threads, error)
    }
}

/// The port-I/O bus: the vmm's own devices (COM1 as `serial`, an i8042 whose reset
/// fires `reset_evt`), then the embedding program's `config.extra_pio_devices`.
fn build_bus(config: &VmConfig, serial: Arc<SerialPort>, reset_evt: &EventFd) -> Result<PioBus, BuildError> {
    let mut bus = devices::legacy_bus(serial, reset_evt.try_clone().map_err(BuildError::ResetEvent)?)?;
    for (range, device) in &config.extra_pio_devices {
        bus.insert(*range, device.clone())?;
    }
    Ok(bus)
}

/// The virtio devices (`config.disks` as virtio-blk, then `config.nets` as
/// virtio-net, in order, then `config.vsock`), each in its slot of `slots` (the ACPI tables' own: window
/// base and IOAPIC line) with its irqfd and one ioeventfd per queue on QueueNotify
/// (matching the queue's index). Their writes into guest RAM are noted for the dirty
/// log, which sees only the vCPUs' own; vhost, which writes RAM from the kernel,
/// stops while the VM is paused and reports its writes to the dirty log.
fn build_virtio(
    vm: &Vm,
    ram: &GuestRam,
    ram_slots: &Arc<RamMemslots>,
    lifecycle: &Lifecycle,
    config: &VmConfig,
    slots: &[(u64, u32)],
) -> Result<VirtioDevices, BuildError> {
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    let noted = ram_slots.clone();
    let dma_log: devices::virtio::DmaLog = Arc::new(move |gpa, len| noted.note_written(gpa, len));
    let mut models: Vec<Box<dyn devices::virtio::VirtioDevice>> = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let block = devices::virtio::block::Block::open(disk, Some(dma_log.clone()))
            .map_err(|source| BuildError::Disk { index, source })?;
        let read_only = if disk.read_only { ", read-only" } else { "" };
        log::info!("disk {index}: {} ({} sectors{read_only})", disk.path.display(), block.sectors());
        models.push(Box::new(block));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let device = devices::virtio::net::Net::new(net, Some(dma_log.clone()))
            .map_err(|source| BuildError::Net { index, source })?;
        log::info!("network {index}: tap {}", net.tap);
        models.push(Box::new(device));
    }
    if let Some(vsock) = &config.vsock {
        let device = devices::virtio::vsock::Vsock::new(vsock, ram.memory()).map_err(BuildError::Vsock)?;
        lifecycle.on_pause(device.pause_hook());
        ram_slots.add_dma_harvest(device.dma_harvest());
        log::info!("vsock: guest CID {}", vsock.cid);
        models.push(Box::new(device));
    }
    debug_assert_eq!(models.len(), slots.len(), "a slot for each device");
    let mut bus = MmioBus::new();
    let mut transports = Vec::with_capacity(models.len());
    for ((index, device), &(base, irq_line)) in models.into_iter().enumerate().zip(slots) {
        let virtio_err = |source| BuildError::Virtio { index, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(virtio_err)?;
        vm.register_irqfd(&irq, irq_line)?;
        let transport =
            MmioTransport::new(device, ram.memory().clone(), irq, Some(dma_log.clone())).map_err(virtio_err)?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_mmio_ioeventfd(evt, base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), queue as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, devices::virtio::VIRTIO_MMIO_SIZE, transport.clone());
        transports.push(transport);
    }
    Ok((bus, transports))
}

/// Writes the identity page tables an image's stub would build (see
/// [`boot::page_tables`]), with 1 GiB pages where the vCPUs' CPUID offers them.
fn prebuild_page_tables(
    vm: &Vm,
    ram: &GuestRam,
    config: &VmConfig,
    note: &boot::page_tables::TableNote,
) -> Result<(), BuildError> {
    // The vCPUs get this CPUID (cpuid::normalize leaves leaf 0x80000001 as KVM offers it),
    // so the stub would have made the same choice.
    let supported = vm.kvm().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(BuildError::Cpuid)?;
    let gib_pages = supported.as_slice().iter().any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0);
    let memmap = boot::pvh_memmap(ram, &config.boot.extra_memmap);
    let gib =
        boot::page_tables::prebuild(ram.memory(), |gpa, len| ram.contains_range(gpa, len), note, &memmap, gib_pages)
            .map_err(|source| boot::BootError::PageTables { path: config.boot.kernel.clone(), source })?;
    log::debug!(
        "page tables: {gib} GiB identity-mapped by the vmm ({} pages)",
        if gib_pages { "1 GiB" } else { "2 MiB" }
    );
    Ok(())
}

/// Turns on KVM's dirty ring for the mirror's dirty-page feed, before the vCPUs exist,
/// when `--dirty-log` asks for it (`ring`) or allows it and KVM offers it (`auto`).
fn choose_dirty_ring(vm: &Vm, config: &VmConfig) -> Result<(), BuildError> {
    use crate::config::DirtyLogMode;
    use crate::vstate::dirty_ring::DirtyRing;
    let ring = match config.dirty_log {
        DirtyLogMode::Bitmap => None,
        DirtyLogMode::Ring => Some(vm.enable_dirty_ring(config.dirty_ring_entries)?),
        DirtyLogMode::Auto if DirtyRing::offered(vm.fd()).is_none() => None,
        // Offered but refused (a size this host's KVM does not take): the bitmap serves.
        DirtyLogMode::Auto => vm
            .enable_dirty_ring(config.dirty_ring_entries)
            .map_err(|e| log::warn!("dirty log: falling back to the bitmap: {}", crate::error_chain(&e)))
            .ok(),
    };
    match ring {
        Some(ring) => log::info!("dirty log: KVM dirty ring, {} entries per vCPU", ring.entries()),
        None => log::info!("dirty log: KVM dirty bitmap (manual protection: {})", vm.manual_dirty_protect()),
    }
    Ok(())
}

impl Vmm {
    /// Starts the mirror exporter and the API socket, when configured.
    fn start_services(&self) -> Result<Option<Arc<mirror_driver::exporter::Exporter>>, BuildError> {
        let dirty_log = crate::mirror::DirtyLog::new(self.ram_slots.clone());
        let exporter = crate::mirror::start_exporter(
            &self.config,
            &self.ram,
            self.lifecycle.clone(),
            dirty_log,
            self.trace.clone(),
        )?;
        if let Some(path) = &self.config.api_socket {
            // The memfd chunks; anonymous RAM has none, so its runs.
            let memory = match self.ram.regions() {
                [] => self.ram.slots().iter().map(|r| (r.guest_addr, r.size)).collect(),
                chunks => chunks.iter().map(|r| (r.guest_addr, r.size)).collect(),
            };
            let memory = Arc::new(memory);
            let context = crate::api::ApiContext {
                lifecycle: self.lifecycle.clone(),
                exporter: exporter.clone(),
                memory,
                paused: Default::default(),
            };
            crate::api::start(path, &crate::mirror::allowed_uids(&self.config), context).map_err(BuildError::Api)?;
        }
        Ok(exporter)
    }
}

/// The feed the vCPUs report traced events to, when inspectors may trace the guest.
fn trace_feed(config: &VmConfig) -> Option<Arc<TraceFeed>> {
    if !config.mirror_allow_trace {
        return None;
    }
    if config.mirror_socket.is_none() {
        log::warn!("--mirror-allow-trace has no effect without --mirror-socket (no inspector can subscribe)");
        return None;
    }
    Some(Arc::new(TraceFeed::new(TraceLimits::default())))
}

/// How long stopping waits for the vCPU threads to leave KVM_RUN. A thread that the
/// host's KVM keeps inside the guest even through the kick signal (the nested test
/// bed's TCG does, docs/nested.md) must not keep the vmm from ending.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops every vCPU thread and joins it, so none outlives the VM; false if one had to
/// be left running (see [`stop_vcpus_within`]).
fn stop_vcpus(lifecycle: &Lifecycle, threads: Vec<std::thread::JoinHandle<()>>) -> bool {
    stop_vcpus_within(lifecycle, threads, VCPU_STOP_TIMEOUT)
}

/// [`stop_vcpus`], giving up on a thread that has not stopped after `timeout` (with an
/// error naming it): the vmm then ends without it, and the process's exit ends it.
/// Returns whether every thread stopped.
fn stop_vcpus_within(lifecycle: &Lifecycle, threads: Vec<std::thread::JoinHandle<()>>, timeout: Duration) -> bool {
    lifecycle.begin_stop();
    let deadline = Instant::now() + timeout;
    loop {
        let running: Vec<_> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() || Instant::now() >= deadline {
            break;
        }
        for handle in running {
            // One inside KVM_RUN returns EINTR; a kick that came between two runs is
            // kept in its kvm_run (immediate_exit). Unjoined, the pthread_t is live.
            let _ = handle.kill(vcpu::kick_signal());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lifecycle.forget_threads();
    let mut all_stopped = true;
    for (index, handle) in threads.into_iter().enumerate() {
        if !handle.is_finished() {
            all_stopped = false;
            log::error!(
                "vCPU {index} did not stop within {timeout:?} of the VM's end (the host's KVM kept it in \
                 KVM_RUN through every kick); the vmm ends without it"
            );
            continue;
        }
        if handle.join().is_err() {
            log::error!("vCPU {index}'s thread panicked");
        }
    }
    all_stopped
}

/// Wakes the event loop when a vCPU ends the VM, and turns an i8042 reset into an exit.
struct ExitWatcher {
    lifecycle: Arc<Lifecycle>,
    reset_evt: EventFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.lifecycle.exit_evt().as_raw_fd(), self.reset_evt.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch VM exit events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.lifecycle.request_exit(VmExit::Reset);
        } else {
            let _ = self.lifecycle.exit_evt().read();
        }
    }
}

#[cfg(test)]
mod stop_tests {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A pause or a trace disarm that races the VM's end kicks the vCPU threads. Once
    /// they are joined, their pthread_t may name freed memory, and `pthread_kill` on it
    /// crashed the vmm (SIGSEGV as a traced guest powered off): stopping unregisters
    /// them before the join.
    #[test]
    fn no_vcpu_thread_is_kicked_once_the_vcpus_are_stopped() {
        vcpu::install_kick_handler().unwrap();
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let running = Arc::new(AtomicBool::new(true));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (lifecycle, running) = (lifecycle.clone(), running.clone());
                std::thread::spawn(move || {
                    while !lifecycle.stopping() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    running.store(false, Ordering::SeqCst);
                })
            })
            .collect();
        lifecycle.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        assert_eq!(lifecycle.kick_vcpus(), 2, "both threads are registered while they run");
        assert!(stop_vcpus(&lifecycle, threads), "both stopped");
        assert!(!running.load(Ordering::SeqCst));
        assert_eq!(lifecycle.kick_vcpus(), 0, "a kick after the join must signal no joined thread");
    }

    /// A vCPU thread that never stops (one the host's KVM keeps inside the guest) does
    /// not keep the vmm from ending: stopping gives up on it after its timeout.
    #[test]
    fn a_vcpu_that_never_stops_does_not_hold_the_vmm_past_the_stop_timeout() {
        vcpu::install_kick_handler().unwrap();
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stopping = {
            let lifecycle = lifecycle.clone();
            std::thread::spawn(move || {
                while !lifecycle.stopping() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        // Deaf to the stop and to the kicks until the test lets it go (or 5 s pass, so
        // that a stop that waits for it fails the test instead of hanging it).
        let deaf = std::thread::spawn(move || {
            let _ = stuck.recv_timeout(Duration::from_secs(5));
        });
        let threads = vec![stopping, deaf];
        lifecycle.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        let started = Instant::now();
        let all_stopped = stop_vcpus_within(&lifecycle, threads, Duration::from_millis(300));
        let took = started.elapsed();
        assert!(!all_stopped, "the deaf thread is reported as left running");
        assert!(took >= Duration::from_millis(300), "it waited for the deaf thread: {took:?}");
        assert!(took < Duration::from_secs(5), "and gave up on it: {took:?}");
        assert_eq!(lifecycle.kick_vcpus(), 0, "no thread stays registered for kicks");
        release.send(()).unwrap();
    }
}
