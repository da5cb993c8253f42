//! virtio devices over MMIO, the way Firecracker and Cloud Hypervisor give a minimal
//! VM its disks: each device is a 4 KiB register window ([`mmio::MmioTransport`]) in
//! the MMIO gap with one IOAPIC line, announced to the guest in the DSDT (`LNRO0005`,
//! which Linux's `virtio_mmio` driver matches; Debian's kernels do not take
//! `virtio_mmio.device=` on the command line). The guest's queue notifications arrive
//! on ioeventfds and the device's interrupts leave on an irqfd, so a request costs
//! the vCPU one exit and no register emulation.
//!
//! Queues are rust-vmm's [`virtio_queue::Queue`]; everything in them is the guest's
//! and is treated as hostile input. A request the device cannot make sense of (a
//! descriptor loop, an address outside RAM, an available index running ahead of the
//! queue, rings outside RAM) stops that device: it sets `DEVICE_NEEDS_RESET`, tells
//! the guest through a configuration interrupt and serves nothing until the guest
//! resets it. The vmm and the other devices go on.

pub mod block;
pub mod mmio;
pub mod net;
#[doc(hidden)]
pub mod testing;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioBus, MmioTransport};

/// Guest-physical base of the first virtio device's register window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Each device's register window (a page, so ioeventfds and ACPI name it exactly).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first device's IOAPIC line (0-4 are the PIT, the keyboard, the cascade and COM1).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The most virtio devices a VM gets: the IOAPIC lines 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Where device `index`'s registers are and which line it interrupts on.
pub fn device_slot(index: usize) -> (u64, u32) {
    (VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE, VIRTIO_FIRST_IRQ + index as u32)
}

/// Records the guest pages a device writes from the host (its DMA): KVM's dirty log
/// sees only the vCPUs' writes, and the mirror's dirty-page feed must see these too.
pub type DmaLog = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// What a virtio device gives its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Each queue's largest size; their count is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (`VIRTIO_F_VERSION_1` is the transport's).
    fn features(&self) -> u64;
    /// Reads the device's configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves the requests waiting on queue `index`; `Ok(true)` when it used buffers
    /// (the guest is then interrupted). An error stops the device.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError>;
    /// A file descriptor of the device's backend (a tap) whose readiness the event
    /// loop reports through [`VirtioDevice::process_backend`].
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The backend has input: move it into `queues`; `Ok(true)` when it used buffers.
    fn process_backend(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        Ok(false)
    }
    /// The driver reset the device: forget what it negotiated.
    fn reset(&mut self) {}
    /// The driver set DRIVER_OK over `queues` (their rings checked to lie in RAM) with
    /// `acked_features`: a kernel backend takes the rings and each queue's
    /// notification eventfd here. An error stops the device.
    fn activate(
        &mut self,
        _queues: &[Queue],
        _queue_evts: &[EventFd],
        _acked_features: u64,
        _mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        Ok(())
    }
    /// How many of the first queues a kernel backend (vhost) serves itself: the event
    /// loop neither reads their notifications nor walks them.
    fn kernel_served_queues(&self) -> usize {
        0
    }
    /// A kernel backend's eventfds, which the event loop relays to the transport.
    fn kernel_events(&self) -> Option<KernelEvents> {
        None
    }
}

/// The eventfds a kernel backend signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEvents {
    /// It used buffers and wants the guest interrupted (it applied EVENT_IDX itself).
    pub used: std::os::fd::RawFd,
    /// It met a malformed queue.
    pub error: std::os::fd::RawFd,
}

/// Why a device stopped serving its queues: the guest's queue was not something a
/// device can follow. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the available ring cannot be read, or its index ran more than a queue's worth ahead")]
    AvailRing(#[source] virtio_queue::Error),
    #[error("descriptor chain at head {head}: {reason}")]
    Chain { head: u16, reason: ChainError },
    #[error("the used ring cannot be written")]
    UsedRing(#[source] virtio_queue::Error),
}

/// What was wrong with one descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("it never ends: a descriptor loop, a next index past the table, a descriptor outside RAM, a bad indirect table or over 4 GiB of buffers")]
    Unterminated,
    #[error("a buffer lies outside guest RAM or its lengths overflow: {0}")]
    Buffers(String),
    #[error("its request header is missing or short ({0} bytes)")]
    ShortHeader(usize),
    #[error("it has no device-writable byte for the status")]
    NoStatus,
}

/// A buffer of a chain that cannot be read or written (outside RAM, or shorter than
/// what was asked of it).
pub(crate) fn buffers(e: impl std::fmt::Display) -> ChainError {
    ChainError::Buffers(e.to_string())
}

/// Notes the chain's device-writable buffers as written for the dirty log. Only for
/// a chain whose buffers are known to lie in RAM (a `Writer` was made over it): the
/// log then stays bounded by RAM's pages whatever the guest posts.
pub(crate) fn note_dma(log: Option<&DmaLog>, chain: &DescriptorChain<&GuestMemoryMmap>) {
    if let Some(log) = log {
        for desc in chain.clone().writable() {
            log(desc.addr().0, u64::from(desc.len()));
        }
    }
}

/// Reads `data.len()` bytes of a device's configuration space `config` at `offset`;
/// bytes past its end read 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(tail) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let len = tail.len().min(data.len());
        data[..len].copy_from_slice(&tail[..len]);
    }
}

/// Rejects a chain whose walk ends on a descriptor that still points on. The queue's
/// iterator stops quietly where it cannot go on (after a queue's worth of descriptors,
/// at an index past the table, at a descriptor it cannot read), so a loop or a broken
/// link would otherwise pass as a shorter chain.
pub fn check_chain_terminates(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<(), ChainError> {
    let mut last_has_next = false;
    for desc in chain.clone() {
        last_has_next = desc.has_next() && !desc.refers_to_indirect_table();
    }
    if last_has_next {
        Err(ChainError::Unterminated)
    } else {
        Ok(())
    }
}

/// [`VirtioEvents::serve`]'s queue index for a device's backend.
const BACKEND: usize = usize::MAX;

/// One device as the event loop watches it.
struct WatchedDevice {
    transport: Arc<std::sync::Mutex<MmioTransport>>,
    /// Each queue the vmm serves, with its notification fd.
    queues: Vec<(usize, std::os::fd::RawFd)>,
    backend: Option<std::os::fd::RawFd>,
    kernel: Option<KernelEvents>,
}

/// The event loop's side of every virtio device: each queue's notification, a
/// backend's input, a kernel backend's signals, and the VM's resume (work that
/// waited out a pause).
pub struct VirtioEvents {
    lifecycle: Arc<crate::vstate::lifecycle::Lifecycle>,
    devices: Vec<WatchedDevice>,
    /// Queues notified while the VM was paused, served at the resume.
    deferred: Vec<(usize, usize)>,
}

impl VirtioEvents {
    pub fn new(
        lifecycle: Arc<crate::vstate::lifecycle::Lifecycle>,
        transports: &[Arc<std::sync::Mutex<MmioTransport>>],
    ) -> Self {
        use std::os::fd::AsRawFd;
        let devices = transports
            .iter()
            .map(|t| {
                let transport = specula_common::sync::lock(t);
                let queues = transport
                    .queue_evts()
                    .iter()
                    .enumerate()
                    .skip(transport.kernel_served_queues())
                    .map(|(queue, evt)| (queue, evt.as_raw_fd()))
                    .collect();
                WatchedDevice {
                    transport: t.clone(),
                    queues,
                    backend: transport.backend_fd(),
                    kernel: transport.kernel_events(),
                }
            })
            .collect();
        Self { lifecycle, devices, deferred: Vec::new() }
    }

    /// Serves queue `queue` of device `device` (its backend: [`BACKEND`]), or defers
    /// it while the VM is paused (a paused VM's RAM is not written: the mirror
    /// re-homes chunks then).
    fn serve(&mut self, device: usize, queue: usize) {
        match self.lifecycle.device_work() {
            Some(_leave) if queue == BACKEND => {
                specula_common::sync::lock(&self.devices[device].transport).process_backend()
            }
            Some(_leave) => specula_common::sync::lock(&self.devices[device].transport).process_queue(queue),
            None if !self.deferred.contains(&(device, queue)) => self.deferred.push((device, queue)),
            None => {}
        }
    }

    /// Serves what was notified while the VM was paused.
    fn serve_deferred(&mut self) {
        for (device, queue) in std::mem::take(&mut self.deferred) {
            self.serve(device, queue);
        }
    }

    /// Relays a kernel backend's signal on `fd`, if it is one; true when it was.
    fn relay_kernel_event(&self, fd: std::os::fd::RawFd) -> bool {
        for watched in &self.devices {
            let Some(kernel) = watched.kernel else { continue };
            if fd == kernel.used || fd == kernel.error {
                drain_eventfd(fd);
                let mut transport = specula_common::sync::lock(&watched.transport);
                if fd == kernel.used {
                    transport.kernel_used();
                } else {
                    transport.kernel_error();
                }
                return true;
            }
        }
        false
    }
}

/// Empties an eventfd's count (it is non-blocking: an empty one reads nothing).
fn drain_eventfd(fd: std::os::fd::RawFd) {
    let mut count = [0u8; 8];
    // SAFETY: an 8-byte read into a live buffer of 8 bytes; `fd` is an eventfd the
    // device owns for the event loop's lifetime.
    let _ = unsafe { libc::read(fd, count.as_mut_ptr().cast(), count.len()) };
}

impl event_manager::MutEventSubscriber for VirtioEvents {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::EventSet;
        let queues = self.devices.iter().flat_map(|d| d.queues.iter().map(|&(_, fd)| fd));
        let kernel = self.devices.iter().filter_map(|d| d.kernel).flat_map(|k| [k.used, k.error]);
        for fd in queues.chain(kernel).chain(std::iter::once(self.lifecycle.resume_evt().as_raw_fd())) {
            if let Err(e) = ops.add(event_manager::Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch a virtio notification: {e:?}");
            }
        }
        // Edge-triggered: a backend read only while the guest has buffers would
        // otherwise wake the loop without end.
        for fd in self.devices.iter().filter_map(|d| d.backend) {
            if let Err(e) = ops.add(event_manager::Events::new_raw(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)) {
                log::error!("cannot watch a virtio backend: {e:?}");
            }
        }
    }

    fn process(&mut self, events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.lifecycle.resume_evt().as_raw_fd() {
            let _ = self.lifecycle.resume_evt().read();
            self.serve_deferred();
            return;
        }
        if self.relay_kernel_event(fd) {
            return;
        }
        if let Some(device) = self.devices.iter().position(|d| d.backend == Some(fd)) {
            self.serve(device, BACKEND);
            return;
        }
        let found = self
            .devices
            .iter()
            .enumerate()
            .find_map(|(d, w)| w.queues.iter().find(|&&(_, f)| f == fd).map(|&(q, _)| (d, q)));
        if let Some((device, queue)) = found {
            // Drain the notification first: one arriving during the walk fires again.
            drain_eventfd(fd);
            self.serve(device, queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{FakeDriver, DATA, NEXT, USED_RING, WRITE};
    use super::*;
    use crate::vstate::lifecycle::Lifecycle;
    use vm_memory::{Bytes, GuestAddress};

    /// A device notified while the VM is paused touches no guest RAM until the resume
    /// (the mirror re-homes RAM chunks under a pause), and then serves the request.
    #[test]
    fn virtio_devices_write_no_ram_while_the_vm_is_paused() {
        let image = std::env::temp_dir().join(format!("specula-virtio-pause-{}", std::process::id()));
        std::fs::write(&image, [7u8; 4096]).unwrap();
        let disk = block::DiskConfig { path: image.clone(), read_only: false };
        let mut d = FakeDriver::new(Box::new(block::Block::open(&disk, None).unwrap()));
        std::fs::remove_file(&image).unwrap();
        // A read of sector 0 into DATA + 0x100.
        d.mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
        d.write_desc(0, DATA, 16, NEXT, 1);
        d.write_desc(1, DATA + 0x100, 512, NEXT | WRITE, 2);
        d.write_desc(2, DATA + 0x300, 1, WRITE, 0);
        d.make_available(0);
        let FakeDriver { mem, transport, .. } = d;
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let mut events = VirtioEvents::new(lifecycle.clone(), &[Arc::new(std::sync::Mutex::new(transport))]);
        let used = || mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).unwrap();

        lifecycle.pause().unwrap();
        events.serve(0, 0);
        assert_eq!(
            (used(), mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap()),
            (0, 0),
            "paused: nothing written"
        );
        lifecycle.resume();
        assert_eq!(lifecycle.resume_evt().read().unwrap(), 1, "the resume wakes the devices");
        events.serve_deferred();
        assert_eq!((used(), mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap()), (1, 7), "served at the resume");
    }
}
