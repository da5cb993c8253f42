//! Fuzzes the vmm's virtio-blk device and the virtio-mmio transport's queue walk with
//! a hostile driver: the input is the guest's side of queue 0, the descriptor table,
//! the available ring and the request headers, as a guest could write them
//! (`vmm::devices::virtio::testing::FakeDriver` lays out the rest).
//!
//! Checks: no panic and no hang (every chain and transfer is bounded); the used ring
//! never runs ahead of what the driver made available; a device that stopped says
//! why and sets DEVICE_NEEDS_RESET; a read-only disk's image never changes.
//!
//! Input: byte 0 picks a read-only disk (odd) or not; the next 256 bytes are the 16
//! descriptors; the next 36 the available ring (flags, index, 16 heads); the rest is
//! written from the data area on (`testing::DATA`), where headers and buffers lie.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::{Block, DiskConfig};
use vmm::devices::virtio::testing::{FakeDriver, AVAIL_RING, DATA, DESC_TABLE, RAM_SIZE};

const IMAGE_SIZE: usize = 64 * 1024;
/// virtio's DEVICE_NEEDS_RESET status bit, and the MMIO status register's offset.
const NEEDS_RESET: u32 = 0x40;
const STATUS_REGISTER: u32 = 0x70;

/// The disk image, sector n filled with byte n, made once per process.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("specula-fuzz-virtio-blk-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        for n in 0..IMAGE_SIZE / 512 {
            file.write_all(&[n as u8; 512]).unwrap();
        }
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let read_only = mode & 1 == 1;
    let path = image().clone();
    let before = read_only.then(|| std::fs::read(&path).unwrap());
    let block = Block::open(&DiskConfig { path: path.clone(), read_only }, None).unwrap();
    let mut driver = FakeDriver::new(Box::new(block));

    let (descriptors, rest) = rest.split_at(rest.len().min(256));
    let (avail, buffers) = rest.split_at(rest.len().min(36));
    driver.mem.write_slice(descriptors, GuestAddress(DESC_TABLE)).unwrap();
    driver.mem.write_slice(avail, GuestAddress(AVAIL_RING)).unwrap();
    let buffers = &buffers[..buffers.len().min((RAM_SIZE - DATA) as usize)];
    driver.mem.write_slice(buffers, GuestAddress(DATA)).unwrap();
    let avail_idx: u16 = driver.mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap();

    driver.transport.process_queue(0);
    driver.transport.process_queue(0);

    let used = driver.used().len();
    assert!(used <= usize::from(avail_idx), "{used} used of {avail_idx} made available");
    let stopped = driver.read_reg(STATUS_REGISTER) & NEEDS_RESET != 0;
    assert_eq!(stopped, driver.transport.broken().is_some(), "a stopped device says why, and only then");
    drop(driver);
    if let Some(before) = before {
        assert!(std::fs::read(&path).unwrap() == before, "a read-only disk changed");
    }
});
