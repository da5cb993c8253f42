//! virtio-blk (virtio 1.2 §5.2) over a raw image file: reads, writes, flush and the
//! disk's ID; a read-only disk offers `VIRTIO_BLK_F_RO` and fails every write.
//!
//! Every request is bounded by what the guest cannot change: its chain must end
//! within the queue and lie in RAM (checked before any byte moves), its sectors must
//! lie inside the image, and data moves through one fixed buffer, so no request
//! grows the vmm's memory. The image is locked (`flock`) as QEMU locks its images:
//! shared when read-only, exclusive when writable, so two VMs never write one disk.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{
    buffers, check_chain_terminates, note_dma, read_config_bytes, ChainError, DmaLog, QueueError, VirtioDevice,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// The one queue's size.
const QUEUE_SIZE: u16 = 256;
/// Segments per request the guest may use (the spec's `seg_max`): the queue less the
/// header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest segment (`size_max`); with `SEG_MAX` this bounds a request to 127 MiB.
const SIZE_MAX: u32 = 512 * 1024;
/// Data moves between the image and guest RAM through a buffer of this size.
const BOUNCE_SIZE: usize = 1 << 20;

/// A `--disk` the vmm serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another process (it holds a lock on it)")]
    Locked { path: PathBuf },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes: an image must hold at least one 512-byte sector")]
    TooSmall { path: PathBuf, size: u64 },
}

/// The request header every chain starts with (§5.2.6).
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain integers with no padding; every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One virtio-blk device over an image file.
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// The image's size in sectors (a trailing partial sector is not offered).
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    bounce: Vec<u8>,
    dma_log: Option<DmaLog>,
}

impl Block {
    /// Opens and locks the image `config` names.
    pub fn open(config: &DiskConfig, dma_log: Option<DmaLog>) -> Result<Self, BlockError> {
        let path = config.path.clone();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&path)
            .map_err(|source| BlockError::Open { path: path.clone(), source })?;
        let lock = if config.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked { path });
        }
        let size = image_size(&file).map_err(|source| BlockError::Size { path: path.clone(), source })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall { path, size });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk {}: its last {} bytes are not a whole sector and are not offered",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self {
            file,
            id: disk_id(&path),
            path,
            read_only: config.read_only,
            sectors: size / SECTOR_SIZE,
            bounce: vec![0; BOUNCE_SIZE],
            dma_log,
        })
    }

    /// The image's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one request; returns the bytes it wrote into the chain (the status byte
    /// included), or why the chain itself is unusable.
    fn serve(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<u32, ChainError> {
        check_chain_terminates(&chain)?;
        let mut reader = chain.clone().reader(mem).map_err(buffers)?;
        let mut writer = chain.clone().writer(mem).map_err(buffers)?;
        note_dma(self.dma_log.as_ref(), &chain);
        let header_len = std::mem::size_of::<RequestHeader>();
        if reader.available_bytes() < header_len {
            return Err(ChainError::ShortHeader(reader.available_bytes()));
        }
        let header: RequestHeader = reader.read_obj().map_err(buffers)?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err(ChainError::NoStatus);
        }
        let mut status_writer = writer.split_at(writable - 1).map_err(buffers)?;
        let (status, written) = self.execute(&header, &mut reader, &mut writer);
        status_writer.write_all(&[status as u8]).map_err(buffers)?;
        Ok(written as u32 + 1)
    }

    /// Carries out a parsed request: its status and the data bytes it wrote.
    fn execute(
        &mut self,
        header: &RequestHeader,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u32, usize) {
        match header.request_type {
            VIRTIO_BLK_T_IN => match self.io_range(header.sector, writer.available_bytes()) {
                Some(offset) => self.read_into(offset, writer),
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT if self.read_only => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => match self.io_range(header.sector, reader.available_bytes()) {
                Some(offset) => (self.write_from(offset, reader), 0),
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::error!("disk {}: flush failed: {e}", self.path.display());
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let len = writer.available_bytes().min(self.id.len());
                match writer.write_all(&self.id[..len]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if it is whole
    /// sectors inside the image.
    fn io_range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let end_sector = sector.checked_add(len / SECTOR_SIZE)?;
        // `then`, not `then_some`: the offset of a sector past the image may not fit
        // a u64 (the fuzzer's first find: a guest could panic the vmm with it).
        (len.is_multiple_of(SECTOR_SIZE) && end_sector <= self.sectors).then(|| sector * SECTOR_SIZE)
    }

    fn read_into(&mut self, mut offset: u64, writer: &mut virtio_queue::Writer<'_>) -> (u32, usize) {
        let mut done = 0;
        while writer.available_bytes() > 0 {
            let len = writer.available_bytes().min(self.bounce.len());
            let buf = &mut self.bounce[..len];
            if let Err(e) = self.file.read_exact_at(buf, offset) {
                log::error!("disk {}: read of {len} bytes at {offset:#x} failed: {e}", self.path.display());
                return (VIRTIO_BLK_S_IOERR, done);
            }
            if writer.write_all(buf).is_err() {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            offset += len as u64;
            done += len;
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write_from(&mut self, mut offset: u64, reader: &mut virtio_queue::Reader<'_>) -> u32 {
        while reader.available_bytes() > 0 {
            let len = reader.available_bytes().min(self.bounce.len());
            let buf = &mut self.bounce[..len];
            if reader.read_exact(buf).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            if let Err(e) = self.file.write_all_at(buf, offset) {
                log::error!("disk {}: write of {len} bytes at {offset:#x} failed: {e}", self.path.display());
                return VIRTIO_BLK_S_IOERR;
            }
            offset += len as u64;
        }
        VIRTIO_BLK_S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64), size_max (u32), seg_max (u32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used_any = false;
        while let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() {
            let head = chain.head_index();
            let written = self.serve(chain, mem).map_err(|reason| QueueError::Chain { head, reason })?;
            queue.add_used(mem, head, written).map_err(QueueError::UsedRing)?;
            used_any = true;
        }
        Ok(used_any)
    }
}

/// An image's size: a regular file's length, or a block device's (seek to the end).
fn image_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut file = file;
    file.seek(std::io::SeekFrom::End(0))
}

/// The disk's ID (`GET_ID`, the guest's `/sys/block/vdX/serial`): its file name, cut
/// to the 20 bytes the protocol has.
fn disk_id(path: &Path) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let len = name.len().min(id.len());
    id[..len].copy_from_slice(&name.as_bytes()[..len]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{FakeDriver, DATA, NEXT, USED_RING, WRITE};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    /// An image of `sectors` sectors, sector `n` filled with byte `n`, in a memfd
    /// opened through its /proc path (as a disk file is).
    fn image(sectors: u64) -> (File, PathBuf) {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { File::from_raw_fd(libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC)) };
        for n in 0..sectors {
            fd.write_all_at(&[n as u8; 512], n * SECTOR_SIZE).unwrap();
        }
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        (fd, path)
    }

    fn driver(path: &Path, read_only: bool) -> FakeDriver {
        let block = Block::open(&DiskConfig { path: path.to_owned(), read_only }, None).unwrap();
        FakeDriver::new(Box::new(block))
    }

    /// Lays out a request at descriptor 0: header, `data_len` bytes of data (device-
    /// writable for reads), one status byte. Returns the status byte's address.
    fn request(d: &FakeDriver, kind: u32, sector: u64, data_len: u32, device_writes_data: bool) -> u64 {
        let header = RequestHeader { request_type: kind, reserved: 0, sector };
        d.mem.write_obj(header, GuestAddress(DATA)).unwrap();
        let data = DATA + 0x100;
        let status = data + u64::from(data_len);
        d.write_desc(0, DATA, 16, NEXT, 1);
        d.write_desc(1, data, data_len, NEXT | if device_writes_data { WRITE } else { 0 }, 2);
        d.write_desc(2, status, 1, WRITE, 0);
        d.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        status
    }

    fn status(d: &FakeDriver, at: u64) -> u32 {
        u32::from(d.mem.read_obj::<u8>(GuestAddress(at)).unwrap())
    }

    #[test]
    fn virtio_blk_reads_writes_flushes_and_names_itself() {
        let (file, path) = image(8);
        let mut d = driver(&path, false);
        assert_eq!(d.read_reg(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!((d.read_reg(VIRTIO_MMIO_VERSION), d.read_reg(VIRTIO_MMIO_DEVICE_ID)), (2, VIRTIO_ID_BLOCK));
        let mut capacity = [0u8; 8];
        d.transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 8);

        // Write 1 KiB at sector 2, then read sectors 1-3 back.
        let at = request(&d, VIRTIO_BLK_T_OUT, 2, 1024, false);
        d.mem.write_slice(&[0xab; 1024], GuestAddress(DATA + 0x100)).unwrap();
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_OK);
        let mut on_disk = [0u8; 1024];
        file.read_exact_at(&mut on_disk, 2 * SECTOR_SIZE).unwrap();
        assert_eq!(on_disk, [0xab; 1024], "the guest's write is in the image");

        let at = request(&d, VIRTIO_BLK_T_IN, 1, 1536, true);
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_OK);
        let mut read = vec![0u8; 1536];
        d.mem.read_slice(&mut read, GuestAddress(DATA + 0x100)).unwrap();
        assert_eq!((&read[..512], &read[512..]), (&[1u8; 512][..], &[0xab; 1024][..]));

        let at = request(&d, VIRTIO_BLK_T_FLUSH, 0, 0, false);
        d.write_desc(0, DATA, 16, NEXT, 2);
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_OK);

        let at = request(&d, VIRTIO_BLK_T_GET_ID, 0, 20, true);
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(DATA + 0x100)).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(&id[..name.len()], name.as_bytes());

        // Used lengths: status only, data + status, status, id + status.
        let lens: Vec<u32> = d.used().iter().map(|u| u.1).collect();
        assert_eq!(lens, [1, 1537, 1, 21]);
        assert!(d.interrupts() >= 1, "each used batch interrupts");
        assert_eq!(d.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
    }

    /// With EVENT_IDX (which the transport offers and this driver takes) the guest is
    /// interrupted only when the used ring reaches the index it asked for.
    #[test]
    fn virtio_blk_interrupts_only_where_the_driver_asked_with_event_idx() {
        use crate::devices::virtio::testing::{AVAIL_RING, QUEUE_SIZE};
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        d.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_ne!(d.read_reg(VIRTIO_MMIO_DEVICE_FEATURES) & (1 << 29), 0, "EVENT_IDX offered");
        let used_event = GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE));
        d.mem.write_obj(5u16, used_event).unwrap();
        d.interrupts();
        for served in 1..=6u16 {
            request(&d, VIRTIO_BLK_T_FLUSH, 0, 0, false);
            d.write_desc(0, DATA, 16, NEXT, 2);
            d.post(0);
            // used_event 5: the interrupt comes with the sixth used entry (index 5).
            assert_eq!((d.used().len(), d.interrupts() > 0), (usize::from(served), served == 6), "request {served}");
        }
    }

    #[test]
    fn virtio_blk_refuses_transfers_past_the_end_or_of_partial_sectors() {
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        for (sector, len) in [(3, 1024), (4, 512), (u64::MAX, 512), (1 << 60, 0), (0, 100)] {
            let at = request(&d, VIRTIO_BLK_T_IN, sector, len, true);
            d.post(0);
            assert_eq!(status(&d, at), VIRTIO_BLK_S_IOERR, "sector {sector}, {len} bytes");
        }
        let at = request(&d, 0x77, 0, 512, true);
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(d.transport.broken(), None, "a bad request is the guest's error, not a broken queue");
    }

    #[test]
    fn virtio_blk_read_only_disk_offers_ro_and_fails_every_write() {
        let (file, path) = image(4);
        let mut d = driver(&path, true);
        d.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_ne!(d.read_reg(VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO), 0);
        let at = request(&d, VIRTIO_BLK_T_OUT, 0, 512, false);
        d.mem.write_slice(&[0xee; 512], GuestAddress(DATA + 0x100)).unwrap();
        d.post(0);
        assert_eq!(status(&d, at), VIRTIO_BLK_S_IOERR);
        let mut on_disk = [0u8; 512];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, [0u8; 512], "the image is unchanged");
    }

    #[test]
    fn virtio_blk_disks_are_locked_against_a_second_writer() {
        let (_file, path) = image(1);
        let _first = Block::open(&DiskConfig { path: path.clone(), read_only: false }, None).unwrap();
        let err = Block::open(&DiskConfig { path: path.clone(), read_only: true }, None).err().unwrap();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        let (_empty, empty_path) = image(0);
        let err = Block::open(&DiskConfig { path: empty_path, read_only: true }, None).err().unwrap();
        assert!(err.to_string().contains("at least one 512-byte sector"), "{err}");
    }

    /// The device stopped, said why, and a later good request is not served.
    fn assert_stopped(d: &mut FakeDriver, why: &str) {
        let reason = d.transport.broken().map(str::to_owned);
        assert!(reason.as_deref().is_some_and(|r| r.contains(why)), "stopped for '{why}': {reason:?}");
        assert_ne!(d.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_ne!(d.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0, "the driver is told");
        let used = d.used().len();
        let at = request(d, VIRTIO_BLK_T_IN, 0, 512, true);
        d.post(0);
        assert_eq!((d.used().len(), status(d, at)), (used, 0xff), "a stopped device serves nothing");
    }

    #[test]
    fn virtio_blk_stops_on_a_descriptor_loop() {
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        request(&d, VIRTIO_BLK_T_IN, 0, 512, true);
        d.write_desc(2, DATA + 0x300, 1, WRITE | NEXT, 1); // status -> data -> status ...
        d.post(0);
        assert_stopped(&mut d, "never ends");
        // A reset brings it back.
        d.write_reg(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(d.transport.broken(), None);
    }

    #[test]
    fn virtio_blk_stops_on_buffers_outside_ram() {
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        request(&d, VIRTIO_BLK_T_IN, 0, 512, true);
        d.write_desc(1, crate::devices::virtio::VIRTIO_MMIO_BASE, 512, NEXT | WRITE, 2);
        d.post(0);
        assert_stopped(&mut d, "outside guest RAM");
    }

    #[test]
    fn virtio_blk_stops_on_absurd_lengths() {
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        request(&d, VIRTIO_BLK_T_IN, 0, 512, true);
        d.write_desc(1, DATA + 0x100, 0x8000_0000, NEXT | WRITE, 2);
        d.post(0);
        assert_stopped(&mut d, "outside guest RAM");
    }

    #[test]
    fn virtio_blk_stops_on_an_available_index_running_ahead() {
        let (_file, path) = image(4);
        let mut d = driver(&path, false);
        d.set_avail_idx(1000);
        d.transport.process_queue(0);
        assert_stopped(&mut d, "available ring");
    }

    #[test]
    fn virtio_blk_will_not_start_with_its_used_ring_in_mmio_space() {
        let (_file, path) = image(4);
        let block = Block::open(&DiskConfig { path, read_only: false }, None).unwrap();
        let mut d = FakeDriver::with_used_ring(Box::new(block), crate::devices::virtio::VIRTIO_MMIO_BASE);
        assert_stopped(&mut d, "not all in guest RAM");
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).unwrap(), 0);
    }
}
