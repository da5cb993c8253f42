//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): a device's register
//! window, its queues' set-up, feature negotiation and the status state machine.
//!
//! The vCPU threads read and write the registers ([`MmioBus`]); the event loop serves
//! the queues when their ioeventfds fire ([`MmioTransport::process_queue`]). Both go
//! through the transport's mutex, so a register write never races a queue walk.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DmaLog, KernelEvents, QueueError, VirtioDevice};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO layout.
const MMIO_VERSION: u32 = 2;
/// The vendor ID devices report ("SPCL").
const VENDOR_ID: u32 = 0x4c43_5053;

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Written by KVM (the ioeventfd on QueueNotify, one per queue).
    queue_evts: Vec<EventFd>,
    /// The irqfd of the device's IOAPIC line.
    irq: EventFd,
    dma_log: Option<DmaLog>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    /// Why the device stopped serving, until the driver resets it.
    broken: Option<String>,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is registered as an irqfd on the device's line by the caller.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
        dma_log: Option<DmaLog>,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(format!("queue of size {max}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts =
            (0..queues.len()).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq,
            dma_log,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            broken: None,
        })
    }

    /// The eventfds the guest's notifications of each queue arrive on.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Why the device stopped serving its queues, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// The device's features, with the transport's: VERSION_1, and EVENT_IDX (the
    /// driver then says when it wants a notification or an interrupt: under nested
    /// virtualization each one is an exit through two hypervisors).
    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // The common registers are 32 bits wide and read only as such (§4.2.2.2).
        let value = if data.len() == 4 { self.register(offset as u32) } else { 0 };
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
        data[len..].fill(0);
    }

    fn register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// A register write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // No device here has writable configuration.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio: {}-byte write to register {offset:#x} ignored", data.len());
            return;
        };
        let value = u32::from_le_bytes(bytes);
        // Queue set-up is frozen once the driver is running (§4.2.2.3).
        let may_set_up_queues = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.activated();
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.ack_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            // KVM's ioeventfds take each queue's notification (matched on its index)
            // before it can exit here; any other value names no queue.
            VIRTIO_MMIO_QUEUE_NOTIFY => log::debug!("virtio: notification of unknown queue {value} ignored"),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            reg if may_set_up_queues => self.set_up_queue(reg, value),
            reg => log::debug!("virtio: write to register {reg:#x} in status {:#x} ignored", self.status),
        }
    }

    fn ack_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0 || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn set_up_queue(&mut self, reg: u32, value: u32) {
        let Some(queue) = self.selected_queue() else { return };
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => queue.set_size(value.min(u32::from(u16::MAX)) as u16),
            VIRTIO_MMIO_QUEUE_READY => queue.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            other => log::debug!("virtio: write to unknown register {other:#x} ignored"),
        }
    }

    /// The status state machine (§3.1.1): 0 resets; FEATURES_OK only for features the
    /// device offered, VERSION_1 among them; DRIVER_OK only over queues in RAM.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        let mut status = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unoffered = self.acked_features & !self.offered_features();
            if unoffered != 0 || self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                log::warn!(
                    "virtio {}: the driver acked features {:#x}, not a subset of {:#x} with VERSION_1",
                    self.device.device_type(),
                    self.acked_features,
                    self.offered_features()
                );
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if let Err(reason) = self.check_queues() {
                self.status = status;
                self.stop(reason);
                return;
            }
            let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            for queue in &mut self.queues {
                queue.set_event_idx(event_idx);
            }
            if let Err(reason) = self.device.activate(&self.queues, &self.queue_evts, self.acked_features, &self.mem) {
                self.status = status;
                self.stop(reason);
                return;
            }
        }
        // The device keeps the bits only it sets.
        self.status = status | (self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED));
    }

    /// Every ready queue's rings must lie in guest RAM, the used ring writable: a ring
    /// in MMIO space or past RAM would have the device write where no RAM is.
    fn check_queues(&self) -> Result<(), String> {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!(
                    "queue {index}'s rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) are not all in guest RAM",
                    queue.desc_table(),
                    queue.avail_ring(),
                    queue.used_ring(),
                    queue.size()
                ));
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device.reset();
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.broken = None;
    }

    /// Stops the device: `DEVICE_NEEDS_RESET`, and a configuration interrupt so the
    /// driver learns of it.
    fn stop(&mut self, reason: String) {
        log::error!(
            "virtio {} stopped: {reason}; it serves nothing until the guest resets it",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.broken = Some(reason);
        self.interrupt(VIRTIO_MMIO_INT_CONFIG);
    }

    fn interrupt(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        if let Err(e) = self.irq.write(1) {
            log::error!("virtio {}: cannot raise its interrupt: {e}", self.device.device_type());
        }
    }

    /// How many of the first queues a kernel backend serves (the event loop leaves
    /// their notifications to it).
    pub fn kernel_served_queues(&self) -> usize {
        self.device.kernel_served_queues()
    }

    /// A kernel backend's eventfds, for the event loop.
    pub fn kernel_events(&self) -> Option<KernelEvents> {
        self.device.kernel_events()
    }

    /// The kernel backend used buffers and decided the guest hears of it: raise the
    /// interrupt with the cause only the transport can set.
    pub fn kernel_used(&mut self) {
        if self.activated() && self.broken.is_none() {
            self.interrupt(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// The kernel backend met a malformed queue: stop it and the device.
    pub fn kernel_error(&mut self) {
        if self.activated() && self.broken.is_none() {
            self.device.reset();
            self.stop("the kernel backend met a malformed queue (such as a descriptor outside guest RAM, a loop, an absurd length or an available index running ahead)".to_string());
        }
    }

    /// The device backend's fd, for the event loop.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Moves the backend's input into the queues (a tap's frames), once the driver runs.
    pub fn process_backend(&mut self) {
        if !self.activated() || self.broken.is_some() {
            return;
        }
        // A backend fills the first queue (a NIC's receive queue).
        let outcome = self.device.process_backend(&mut self.queues, &self.mem);
        self.after_work(0, outcome);
    }

    /// Serves queue `index` after its notification: nothing before the driver is
    /// running or after the device stopped. With EVENT_IDX the driver's notifications
    /// are off while the device works, and the queue is served again if more arrived
    /// meanwhile; the guest is interrupted only where it asked to be.
    pub fn process_queue(&mut self, index: usize) {
        // A kernel backend's queues are its own: the vmm writes none of their rings.
        if !self.activated() || self.broken.is_some() || index < self.device.kernel_served_queues() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else { return };
        if !queue.ready() {
            return;
        }
        let (device, mem) = (&mut self.device, &self.mem);
        let outcome = (|| {
            let event_idx = queue.event_idx_enabled();
            let mut used = false;
            loop {
                if event_idx {
                    queue.disable_notification(mem).map_err(QueueError::UsedRing)?;
                }
                let progressed = device.process_queue(index, queue, mem)?;
                used |= progressed;
                // Re-armed whatever happened; served again only if the device moved
                // and more is waiting (a receive queue holds buffers it cannot fill).
                let more = event_idx && queue.enable_notification(mem).map_err(QueueError::UsedRing)?;
                if !(more && progressed) {
                    break;
                }
            }
            Ok(used)
        })();
        self.after_work(index, outcome);
    }

    /// After the device worked on queue `index` (`outcome`: whether it used buffers):
    /// notes the used ring for the dirty log and interrupts the guest where the driver
    /// asked to hear of it; stops the device on an error.
    fn after_work(&mut self, index: usize, outcome: Result<bool, QueueError>) {
        let (mem, dma_log) = (&self.mem, &self.dma_log);
        let notify = outcome.and_then(|used| match self.queues.get_mut(index) {
            Some(queue) if used => {
                if let Some(log) = dma_log {
                    // flags, idx, the ring, avail_event.
                    log(queue.used_ring(), 4 + 8 * u64::from(queue.size()) + 2);
                }
                queue.needs_notification(mem).map_err(QueueError::UsedRing)
            }
            _ => Ok(false),
        });
        match notify {
            Ok(true) => self.interrupt(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.stop(crate::error_chain(&e)),
        }
    }
}

/// The virtio devices' register windows, as the vCPUs see them.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(u64, u64, Arc<Mutex<MmioTransport>>)>,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `transport` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, transport: Arc<Mutex<MmioTransport>>) {
        self.devices.push((base, len, transport));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.devices
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, t)| (addr - base, t))
    }

    /// A vCPU's read at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, transport)) = self.find(addr) else { return false };
        specula_common::sync::lock(transport).read(offset, data);
        true
    }

    /// A vCPU's write at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, transport)) = self.find(addr) else { return false };
        specula_common::sync::lock(transport).write(offset, data);
        true
    }
}
