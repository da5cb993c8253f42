//! virtio-vsock (virtio 1.2 §5.10) through the host kernel's vhost-vsock, as QEMU and
//! Cloud Hypervisor give it: the guest gets a context ID (CID) of its own, and host
//! programs reach it with plain `AF_VSOCK` sockets (`connect(CID, port)`), the guest
//! reaches them at CID 2.
//!
//! The kernel serves the receive and transmit queues itself: the vmm hands it the
//! guest's memory table, each ring's address and the queue's notification eventfd
//! (KVM's ioeventfd, so a guest's notification goes from KVM straight to vhost), and
//! relays vhost's "buffers used" eventfd into the MMIO transport's interrupt (a
//! virtio-mmio guest learns why it was interrupted from InterruptStatus, which
//! vhost cannot set). The event queue stays with the vmm and carries no event: the
//! vmm never migrates a guest, the one reason to send one.
//!
//! What vhost does to guest RAM the vmm answers for:
//! - **Pause.** vhost writes RAM from a kernel thread the vmm's device-work gate
//!   cannot hold, so a pause stops it (`VHOST_VSOCK_SET_RUNNING` 0) and the resume
//!   starts it again: a mirror revoke, which copies RAM under a pause, loses nothing.
//!   A stopped vhost drops the notifications it gets, so the restart notifies each
//!   queue once: what the guest posted meanwhile is served.
//! - **Dirty log.** vhost-vsock logs none of its writes into received buffers, even
//!   with `VHOST_F_LOG_ALL`, so the dirty-page feed learns of them from the rings:
//!   when the receive queue's used index moved since the last harvest, every
//!   device-writable buffer in its descriptor table and its used ring are reported
//!   written ([`written_since`]); when the transmit queue's moved, its used ring. This
//!   over-reports (buffers the guest posted but vhost did not fill), never under-
//!   reports, except for a guest that rewrites a descriptor before the harvest:
//!   it can only hide vsock data that the host sent it.
//! - **Hostile queues.** The vmm checks at DRIVER_OK that every ring lies in RAM (the
//!   transport), and vhost bounds each descriptor against the memory table. A
//!   malformed queue makes vhost signal its error eventfd; the device then stops
//!   (`DEVICE_NEEDS_RESET`), as the vmm's own devices do.
//!
//! Without /dev/vhost-vsock (the `vhost_vsock` module) `--vsock` fails at start-up
//! with that said; there is no user-space vsock backend.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vhost::vhost_kern::vsock::Vsock as VhostVsockFd;
use vhost::vsock::VhostVsock;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Permissions,
};
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, KernelEvents, QueueError, VirtioDevice};
use specula_common::sync::lock;

/// Receive, transmit and event queues; vhost serves the first two.
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// The queues vhost-vsock serves (it has no event queue).
const VHOST_QUEUES: usize = 2;
/// Sequenced-packet sockets (virtio 1.2 §5.10.3), offered where vhost has them.
const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1;
/// The device-writable flag of a split-ring descriptor.
const VRING_DESC_F_WRITE: u16 = 2;
/// The CIDs a guest cannot have: the hypervisor, local, the host, and -1 (any).
const FIRST_GUEST_CID: u64 = 3;

/// A `--vsock` the vmm serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID: 3 to 2^32 - 2, unique on the host.
    pub cid: u64,
}

impl VsockConfig {
    /// Whether `cid` can name a guest.
    pub fn valid_cid(cid: u64) -> bool {
        (FIRST_GUEST_CID..u64::from(u32::MAX)).contains(&cid)
    }
}

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot open /dev/vhost-vsock: --vsock needs the host's vhost_vsock module (modprobe vhost_vsock) and read-write access to the device for the vmm's user; Specula has no user-space vsock backend")]
    Open(#[source] vhost::Error),
    #[error("cannot take ownership of the vhost-vsock device (VHOST_SET_OWNER)")]
    Owner(#[source] vhost::Error),
    #[error("cannot read vhost-vsock's features")]
    Features(#[source] vhost::Error),
    #[error("this host's vhost-vsock lacks features {0:#x} the vmm's transport needs (VERSION_1 and EVENT_IDX)")]
    MissingFeatures(u64),
    #[error("guest CID {cid} is refused: another VM on this host has it, or it is not a guest CID")]
    Cid {
        cid: u64,
        #[source]
        source: vhost::Error,
    },
    #[error("cannot create vhost-vsock's eventfds")]
    EventFd(#[source] std::io::Error),
}

/// Whether vhost runs: only while the driver has the device running and no pause
/// holds the VM.
#[derive(Default)]
struct RunState {
    activated: bool,
    paused: bool,
    running: bool,
    /// The served queues' notification eventfds, while the driver runs the device.
    kicks: Vec<EventFd>,
}

/// The vhost-vsock instance and whether it runs, shared with the VM's pause hook.
struct Vhost {
    fd: VhostVsockFd<Arc<GuestMemoryMmap>>,
    state: Mutex<RunState>,
}

impl Vhost {
    /// Sets what changed (`activated`, `paused`) and starts or stops vhost to match.
    fn update(&self, activated: Option<bool>, paused: Option<bool>) -> Result<(), vhost::Error> {
        let mut state = lock(&self.state);
        state.activated = activated.unwrap_or(state.activated);
        state.paused = paused.unwrap_or(state.paused);
        let wanted = state.activated && !state.paused;
        if wanted != state.running {
            if wanted {
                self.fd.start()?;
                // A notification that came while vhost was stopped found no backend and
                // is gone: without one, buffers the guest posted meanwhile (a transmit
                // queue's credit updates) would wait for a next notification that
                // EVENT_IDX may never send. Each queue is looked at again.
                for kick in &state.kicks {
                    kick.write(1).map_err(vhost::Error::IOError)?;
                }
            } else {
                self.fd.stop()?;
            }
            state.running = wanted;
        }
        Ok(())
    }
}

/// One ring vhost serves, as the dirty-log harvest reads it.
#[derive(Debug, Clone, Copy)]
pub struct ServedRing {
    pub desc_table: u64,
    pub used_ring: u64,
    pub size: u16,
    /// Whether vhost writes into its buffers (the receive queue).
    pub device_writes: bool,
    /// The used index at the last harvest.
    pub seen_used: u16,
}

/// The rings vhost serves while the driver runs the device (none before, or after a
/// reset).
type ServedRings = Arc<Mutex<Vec<ServedRing>>>;

/// virtio-vsock with vhost-vsock serving its data queues.
pub struct Vsock {
    cid: u64,
    vhost: Arc<Vhost>,
    /// The features vhost offers; the driver's choice among them is passed on.
    vhost_features: u64,
    /// vhost's "buffers used, interrupt the guest" and "malformed queue" eventfds.
    used_evt: EventFd,
    error_evt: EventFd,
    rings: ServedRings,
    mem: Arc<GuestMemoryMmap>,
}

impl Vsock {
    /// Opens /dev/vhost-vsock and gives it the guest's CID (the CID is the host's to
    /// hand out: a CID in use fails here, not when the guest boots).
    pub fn new(config: &VsockConfig, mem: &GuestMemoryMmap) -> Result<Self, VsockError> {
        let mem = Arc::new(mem.clone());
        let fd = VhostVsockFd::new(mem.clone()).map_err(VsockError::Open)?;
        fd.set_owner().map_err(VsockError::Owner)?;
        let vhost_features = fd.get_features().map_err(VsockError::Features)?;
        let needed = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
        if vhost_features & needed != needed {
            return Err(VsockError::MissingFeatures(needed & !vhost_features));
        }
        fd.set_guest_cid(config.cid).map_err(|source| VsockError::Cid { cid: config.cid, source })?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            cid: config.cid,
            vhost: Arc::new(Vhost { fd, state: Mutex::new(RunState::default()) }),
            vhost_features,
            used_evt: eventfd()?,
            error_evt: eventfd()?,
            rings: Arc::default(),
            mem,
        })
    }

    /// For the VM's pause: stops vhost while a pause holds the VM (`true`) and starts
    /// it again at the resume (`false`), if the driver runs the device.
    pub fn pause_hook(&self) -> crate::vstate::lifecycle::PauseHook {
        let vhost = self.vhost.clone();
        Box::new(move |paused| {
            if let Err(e) = vhost.update(None, Some(paused)) {
                log::error!("vhost-vsock: cannot {} it for the pause: {e}", if paused { "stop" } else { "restart" });
            }
        })
    }

    /// For the dirty-page feed: reports the guest ranges vhost may have written since
    /// the last call (see the module documentation).
    pub fn dma_harvest(&self) -> crate::vstate::ram_slots::DmaHarvest {
        let (rings, mem) = (self.rings.clone(), self.mem.clone());
        Box::new(move |note| written_since(&mem, &mut lock(&rings), note))
    }

    /// Hands ring `index` to vhost.
    fn serve_ring(&self, index: usize, queue: &Queue, kick: &EventFd) -> Result<(), String> {
        let fd = &self.vhost.fd;
        let failed = |what: &str, e: vhost::Error| format!("vhost-vsock refused queue {index}'s {what}: {e}");
        let ring = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: queue.desc_table(),
            used_ring_addr: queue.used_ring(),
            avail_ring_addr: queue.avail_ring(),
            log_addr: None,
        };
        fd.set_vring_num(index, queue.size()).map_err(|e| failed("size", e))?;
        fd.set_vring_base(index, 0).map_err(|e| failed("first index", e))?;
        fd.set_vring_addr(index, &ring).map_err(|e| failed("ring addresses", e))?;
        fd.set_vring_call(index, &self.used_evt).map_err(|e| failed("interrupt eventfd", e))?;
        fd.set_vring_err(index, &self.error_evt).map_err(|e| failed("error eventfd", e))?;
        fd.set_vring_kick(index, kick).map_err(|e| failed("notification eventfd", e))
    }
}

/// The guest's RAM as vhost's memory table takes it: regions that follow each other
/// in both guest-physical and host-virtual addresses (the vmm's RAM chunks, mapped
/// into one reservation per run) are one entry, since vhost takes 64 at most by
/// default (its `max_mem_regions`).
fn memory_table(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    let regions = mem.iter().map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64));
    coalesce(regions)
        .into_iter()
        .map(|(guest_phys_addr, memory_size, userspace_addr)| VhostUserMemoryRegionInfo {
            guest_phys_addr,
            memory_size,
            userspace_addr,
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect()
}

/// Merges `(guest address, size, host address)` regions, in guest-physical order,
/// where one continues the previous in both address spaces.
fn coalesce(regions: impl Iterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut merged: Vec<(u64, u64, u64)> = Vec::new();
    for (gpa, size, hva) in regions {
        match merged.last_mut() {
            Some((last_gpa, last_size, last_hva)) if *last_gpa + *last_size == gpa && *last_hva + *last_size == hva => {
                *last_size += size
            }
            _ => merged.push((gpa, size, hva)),
        }
    }
    merged
}

/// Reports (`note(gpa, len)`) what vhost may have written in `rings` since the last
/// call: a ring whose used index moved has its used ring written, and, if vhost fills
/// its buffers, every device-writable descriptor's buffer that lies in RAM. A
/// descriptor outside RAM is skipped (vhost cannot have written it), so the report is
/// bounded by RAM whatever the guest put in its table.
pub fn written_since(mem: &GuestMemoryMmap, rings: &mut [ServedRing], note: &mut dyn FnMut(u64, u64)) {
    for ring in rings {
        let Ok(used) = mem.read_obj::<u16>(GuestAddress(ring.used_ring + 2)) else { continue };
        if used == ring.seen_used {
            continue;
        }
        ring.seen_used = used;
        // flags, idx, the ring, avail_event.
        note(ring.used_ring, 4 + 8 * u64::from(ring.size) + 2);
        if !ring.device_writes {
            continue;
        }
        for index in 0..u64::from(ring.size) {
            let mut desc = [0u8; 16];
            if mem.read_slice(&mut desc, GuestAddress(ring.desc_table + 16 * index)).is_err() {
                break;
            }
            let addr = u64::from_le_bytes(desc[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(desc[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes([desc[12], desc[13]]);
            if flags & VRING_DESC_F_WRITE != 0
                && len > 0
                && GuestMemory::check_range(mem, GuestAddress(addr), len as usize, Permissions::Write)
            {
                note(addr, u64::from(len));
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        self.vhost_features & (1 << VIRTIO_VSOCK_F_SEQPACKET)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    /// The event queue, the one the vmm serves: it holds the driver's buffers for
    /// events, and the vmm sends none.
    fn process_queue(&mut self, _index: usize, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        Ok(false)
    }

    fn kernel_served_queues(&self) -> usize {
        VHOST_QUEUES
    }

    fn kernel_events(&self) -> Option<KernelEvents> {
        Some(KernelEvents { used: self.used_evt.as_raw_fd(), error: self.error_evt.as_raw_fd() })
    }

    fn activate(
        &mut self,
        queues: &[Queue],
        queue_evts: &[EventFd],
        acked_features: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        let fd = &self.vhost.fd;
        fd.set_features(acked_features & self.vhost_features)
            .map_err(|e| format!("vhost-vsock refused features {acked_features:#x}: {e}"))?;
        fd.set_mem_table(&memory_table(mem)).map_err(|e| format!("vhost-vsock refused the memory table: {e}"))?;
        let mut served = Vec::with_capacity(VHOST_QUEUES);
        for index in [RX, TX] {
            let queue = &queues[index];
            if !queue.ready() {
                return Err(format!("the driver did not set up queue {index}"));
            }
            self.serve_ring(index, queue, &queue_evts[index])?;
            served.push(ServedRing {
                desc_table: queue.desc_table(),
                used_ring: queue.used_ring(),
                size: queue.size(),
                device_writes: index == RX,
                seen_used: 0,
            });
        }
        *lock(&self.rings) = served;
        let kicks = queue_evts[..VHOST_QUEUES].iter().map(EventFd::try_clone).collect::<std::io::Result<Vec<_>>>();
        lock(&self.vhost.state).kicks =
            kicks.map_err(|e| format!("cannot keep the queues' notification eventfds: {e}"))?;
        self.vhost.update(Some(true), None).map_err(|e| format!("vhost-vsock does not start: {e}"))
    }

    fn reset(&mut self) {
        if let Err(e) = self.vhost.update(Some(false), None) {
            log::error!("vhost-vsock: cannot stop it at the driver's reset: {e}");
        }
        lock(&self.vhost.state).kicks.clear();
        // The last harvest before the rings go: what vhost wrote stays reported.
        lock(&self.rings).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 0x10_0000;
    const DESC: u64 = 0x1000;
    const USED: u64 = 0x3000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn write_desc(mem: &GuestMemoryMmap, index: u64, addr: u64, len: u32, flags: u16) {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(DESC + 16 * index)).unwrap();
    }

    fn harvest(mem: &GuestMemoryMmap, rings: &mut [ServedRing]) -> Vec<(u64, u64)> {
        let mut noted = Vec::new();
        written_since(mem, rings, &mut |gpa, len| noted.push((gpa, len)));
        noted
    }

    /// vhost's writes reach the dirty log once per movement of the used index: the
    /// used ring and the receive buffers, and only buffers in RAM (a hostile
    /// descriptor past RAM or of 4 GiB adds nothing).
    #[test]
    fn virtio_vsock_reports_vhost_writes_once_per_used_index_move_and_only_in_ram() {
        let mem = memory();
        write_desc(&mem, 0, 0x8000, 4096, VRING_DESC_F_WRITE);
        write_desc(&mem, 1, 0x9000, 64, 0); // driver-readable: vhost does not write it
        write_desc(&mem, 2, RAM - 16, 4096, VRING_DESC_F_WRITE); // runs out of RAM
        write_desc(&mem, 3, 0x4000, u32::MAX, VRING_DESC_F_WRITE);
        let ring = ServedRing { desc_table: DESC, used_ring: USED, size: 4, device_writes: true, seen_used: 0 };
        let mut rings = [ring];
        assert!(harvest(&mem, &mut rings).is_empty(), "nothing used yet: nothing written");
        mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
        assert_eq!(harvest(&mem, &mut rings), [(USED, 4 + 8 * 4 + 2), (0x8000, 4096)]);
        assert!(harvest(&mem, &mut rings).is_empty(), "reported once");

        let mut tx = [ServedRing { device_writes: false, ..ring }];
        mem.write_obj(2u16, GuestAddress(USED + 2)).unwrap();
        assert_eq!(harvest(&mem, &mut tx), [(USED, 4 + 8 * 4 + 2)], "transmit: only the used ring");
    }

    /// A ring whose tables lie past RAM reports nothing and does not fail.
    #[test]
    fn virtio_vsock_harvest_of_rings_outside_ram_reports_nothing() {
        let mem = memory();
        let mut rings =
            [ServedRing { desc_table: RAM + 0x1000, used_ring: RAM, size: 256, device_writes: true, seen_used: 0 }];
        assert!(harvest(&mem, &mut rings).is_empty());
    }

    /// The vmm's RAM is many chunks; vhost takes 64 regions by default, so chunks that
    /// continue each other in both address spaces are one region, and a gap in either
    /// starts another.
    #[test]
    fn virtio_vsock_memory_table_merges_chunks_that_continue_each_other() {
        let chunks = (0..200u64).map(|i| (i << 21, 1 << 21, 0x7f00_0000_0000 + (i << 21)));
        assert_eq!(coalesce(chunks), [(0, 200 << 21, 0x7f00_0000_0000)]);
        let gaps = [(0, 0x1000, 0x10000), (0x1000, 0x1000, 0x20000), (0x3000, 0x1000, 0x21000)];
        assert_eq!(coalesce(gaps.into_iter()), gaps, "a host gap, then a guest gap");
        let ram =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1_0000_0000), 0x1000)]).unwrap();
        let table = memory_table(&ram);
        assert_eq!(
            table.iter().map(|r| (r.guest_phys_addr, r.memory_size)).collect::<Vec<_>>(),
            [(0, 0x1000), (0x1_0000_0000, 0x1000)]
        );
    }

    /// The vmm's own RAM, memfd chunks or anonymous, gives vhost one region per run.
    #[test]
    fn virtio_vsock_memory_table_of_the_vmms_ram_is_one_region_per_run() {
        for backend in [crate::memory::MemoryBackend::default(), crate::memory::MemoryBackend::Anonymous] {
            let ram = crate::memory::GuestRam::with_backend(384 << 20, backend).unwrap();
            let table = memory_table(ram.memory());
            let runs: Vec<_> = ram.slots().iter().map(|r| (r.guest_addr, r.size, r.host_addr)).collect();
            let regions: Vec<_> = table.iter().map(|r| (r.guest_phys_addr, r.memory_size, r.userspace_addr)).collect();
            assert_eq!(regions, runs, "{backend:?}: {} regions in RAM", ram.memory().num_regions());
        }
    }

    #[test]
    fn virtio_vsock_cids_exclude_the_reserved_ones() {
        assert!(
            !VsockConfig::valid_cid(0) && !VsockConfig::valid_cid(2) && !VsockConfig::valid_cid(u64::from(u32::MAX))
        );
        assert!(VsockConfig::valid_cid(3) && VsockConfig::valid_cid(u64::from(u32::MAX) - 1));
    }

    /// Without the vhost_vsock module the device is refused with the reason, at
    /// start-up; with it, a device opens and takes its CID.
    #[test]
    fn virtio_vsock_without_vhost_says_what_is_missing() {
        let result = Vsock::new(&VsockConfig { cid: 1234 }, &memory());
        if std::path::Path::new("/dev/vhost-vsock").exists() {
            let device = result.expect("this host has /dev/vhost-vsock");
            let mut cid = [0u8; 8];
            device.read_config(0, &mut cid);
            assert_eq!(u64::from_le_bytes(cid), 1234);
        } else {
            let message = crate::error_chain(&result.err().expect("no /dev/vhost-vsock here"));
            assert!(message.contains("/dev/vhost-vsock") && message.contains("vhost_vsock"), "{message}");
        }
    }
}
