//! The driver's side of a virtio-mmio device, in process: guest RAM of its own, the
//! registers written as Linux's `virtio_mmio` writes them, and split-queue rings laid
//! out at fixed addresses. The unit tests and the fuzz targets drive devices with it,
//! hostile queues included.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, VirtioDevice};

/// Where the driver puts queue 0's rings and its buffers; queue `q`'s lie
/// [`QUEUE_STRIDE`] × `q` further on ([`ring_base`]).
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
pub const DATA: u64 = 0x4000;
/// The fake guest's RAM.
pub const RAM_SIZE: u64 = 0x10_0000;
/// How far apart the queues' rings and buffers are.
pub const QUEUE_STRIDE: u64 = 0x1_0000;
/// The queue size the driver sets.
pub const QUEUE_SIZE: u16 = 16;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// A device with a driver that set it up.
pub struct FakeDriver {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    /// The device's interrupt line, as the irqfd would see it.
    pub irq: EventFd,
    avail_idx: Vec<u16>,
}

/// Where queue `queue`'s area starts (its rings at the constants' offsets from it).
pub fn ring_base(queue: u16) -> u64 {
    QUEUE_STRIDE * u64::from(queue)
}

impl FakeDriver {
    /// `device` with every queue set up over the fixed rings and the driver running.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_used_ring(device, USED_RING)
    }

    /// As [`FakeDriver::new`], with queue 0's used ring at `used_ring`.
    pub fn with_used_ring(device: Box<dyn VirtioDevice>, used_ring: u64) -> Self {
        Self::over(|_| device, used_ring)
    }

    /// As [`FakeDriver::with_used_ring`], for a device made over the fake guest's RAM
    /// (a kernel backend's, which is given the guest's memory when it is made).
    pub fn over(make: impl FnOnce(&GuestMemoryMmap) -> Box<dyn VirtioDevice>, used_ring: u64) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).expect("fake guest RAM");
        let device = make(&mem);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let transport =
            MmioTransport::new(device, mem.clone(), irq.try_clone().expect("eventfd"), None).expect("transport");
        let mut driver = Self { mem, transport, irq, avail_idx: Vec::new() };
        driver.set_up(used_ring);
        driver
    }

    /// Resets the device (status 0) and sets it up again as at probe, rings emptied.
    pub fn reset_and_set_up(&mut self) {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        let zeros = vec![0u8; (QUEUE_STRIDE * self.avail_idx.len() as u64) as usize];
        self.mem.write_slice(&zeros, GuestAddress(0)).expect("fake RAM");
        self.avail_idx.clear();
        self.set_up(USED_RING);
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.read_reg(VIRTIO_MMIO_STATUS)
    }

    /// What Linux's driver does at probe: acknowledge, take every offered feature,
    /// set up each queue the device has, go. Queue 0's used ring is at `used_ring`.
    fn set_up(&mut self, used_ring: u64) {
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for sel in 0..2 {
            self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let offered = self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, offered);
        }
        let features_ok = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, features_ok);
        for queue in 0u16.. {
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, u32::from(queue));
            if self.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX) == 0 {
                break;
            }
            let base = ring_base(queue);
            let used = if queue == 0 { used_ring } else { base + USED_RING };
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (low, high, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, base + DESC_TABLE),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, base + AVAIL_RING),
                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used),
            ] {
                self.write_reg(low, addr as u32);
                self.write_reg(high, (addr >> 32) as u32);
            }
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
            self.avail_idx.push(0);
        }
        self.write_reg(VIRTIO_MMIO_STATUS, features_ok | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    pub fn read_reg(&self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write_reg(&mut self, offset: u32, value: u32) {
        self.transport.write(u64::from(offset), &value.to_le_bytes());
    }

    /// Writes descriptor `index` of queue 0's table.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_on(0, index, addr, len, flags, next)
    }

    /// Writes descriptor `index` of queue `queue`'s table.
    pub fn write_desc_on(&self, queue: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = ring_base(queue) + DESC_TABLE + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).expect("descriptor in fake RAM");
    }

    /// Makes the chain at `head` available and notifies queue 0.
    pub fn post(&mut self, head: u16) {
        self.post_on(0, head);
    }

    /// Makes the chain at `head` of queue `queue` available and notifies the queue.
    pub fn post_on(&mut self, queue: u16, head: u16) {
        self.make_available_on(queue, head);
        self.transport.process_queue(usize::from(queue));
    }

    /// Makes the chain at `head` available, without a notification.
    pub fn make_available(&mut self, head: u16) {
        self.make_available_on(0, head);
    }

    /// Notifies queue `queue` as KVM does on the guest's QueueNotify write: through the
    /// queue's eventfd (which a kernel backend polls).
    pub fn notify(&self, queue: u16) {
        self.transport.queue_evts()[usize::from(queue)].write(1).expect("queue eventfd");
    }

    /// Makes the chain at `head` of queue `queue` available, without a notification.
    pub fn make_available_on(&mut self, queue: u16, head: u16) {
        let idx = &mut self.avail_idx[usize::from(queue)];
        let slot = ring_base(queue) + AVAIL_RING + 4 + 2 * u64::from(*idx % QUEUE_SIZE);
        *idx = idx.wrapping_add(1);
        let idx = *idx;
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail ring in fake RAM");
        self.mem.write_obj(idx, GuestAddress(ring_base(queue) + AVAIL_RING + 2)).expect("avail ring in fake RAM");
    }

    /// Writes queue 0's available ring index as it is, whatever it claims.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL_RING + 2)).expect("avail ring in fake RAM");
    }

    /// Queue 0's used ring entries so far: (head, bytes written).
    pub fn used(&self) -> Vec<(u32, u32)> {
        self.used_on(0)
    }

    /// Queue `queue`'s used ring entries so far (queue 0's ring at the fixed place).
    pub fn used_on(&self, queue: u16) -> Vec<(u32, u32)> {
        let ring = ring_base(queue) + USED_RING;
        let idx: u16 = self.mem.read_obj(GuestAddress(ring + 2)).expect("used ring");
        (0..idx)
            .map(|i| {
                let at = ring + 4 + 8 * u64::from(i % QUEUE_SIZE);
                (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
            })
            .collect()
    }

    /// Interrupts raised since the last call.
    pub fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}
