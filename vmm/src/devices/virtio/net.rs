//! virtio-net (virtio 1.2 §5.1) over a tap device: one receive and one transmit
//! queue, a MAC address and a link that is up; no offloads, so every frame crosses
//! as it is, with the 12-byte `virtio_net_hdr_v1` in front on the guest's side.
//!
//! The tap is the user's (`--net tap=NAME`): an existing persistent tap the vmm's
//! user may open, or, when the vmm runs as root, one the kernel creates for it and
//! removes when the vmm exits. Frames are bounded (a transmit chain larger than
//! [`MAX_FRAME`] is dropped and counted); a received frame waits in one buffer while
//! the guest has no receive buffer posted, and the tap is read no further meanwhile,
//! so a flood from the host side cannot grow the vmm's memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    buffers, check_chain_terminates, note_dma, read_config_bytes, ChainError, DmaLog, QueueError, VirtioDevice,
};

/// Receive and transmit queues.
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// The header in front of every frame (virtio_net_hdr_v1: VERSION_1 always has it).
const HEADER_LEN: usize = 12;
/// The largest frame: a 64 KiB IP packet with its Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 65_536 + 14 + 4;
/// The longest interface name a tap may have (IFNAMSIZ, with its NUL).
const IFNAMSIZ: usize = 16;

/// A `--net` the vmm serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap device's name.
    pub tap: String,
    pub mac: [u8; 6],
}

/// Why a network device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to tap device {name} (it must exist and be the vmm user's, or the vmm must run as root to create it)")]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF takes it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);

/// An open tap device (frames without packet information, non-blocking).
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or, as root, creates) tap `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        // SAFETY: open(2) of a constant path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(NetError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req =
            IfReq { name: [0; IFNAMSIZ], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
        let attach_err = |source| NetError::Attach { name: name.to_string(), source };
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(attach_err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF on a tun fd with a live, correctly laid out ifreq.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF(), &mut req) } < 0 {
            return Err(attach_err(std::io::Error::last_os_error()));
        }
        Ok(Self { file, name: name.to_string() })
    }
}

/// One virtio-net device over a tap.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    /// A frame read from the tap (its length, in `rx_frame`) that no receive buffer
    /// has taken yet.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    /// Transmit's own buffer: a frame waiting in `rx_frame` must survive a transmit.
    tx_frame: Vec<u8>,
    dma_log: Option<DmaLog>,
    /// Frames dropped: too large to send, or larger than the guest's receive buffer.
    dropped: u64,
}

impl Net {
    pub fn new(config: &NetConfig, dma_log: Option<DmaLog>) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        let (rx_frame, tx_frame) = (vec![0; MAX_FRAME], vec![0; MAX_FRAME]);
        Ok(Self { tap, mac: config.mac, pending: None, rx_frame, tx_frame, dma_log, dropped: 0 })
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used_any = false;
        while let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() {
            let head = chain.head_index();
            let chain_err = |reason| QueueError::Chain { head, reason };
            check_chain_terminates(&chain).map_err(chain_err)?;
            let mut reader = chain.reader(mem).map_err(|e| chain_err(buffers(e)))?;
            let len = reader.available_bytes();
            if len < HEADER_LEN {
                return Err(chain_err(ChainError::ShortHeader(len)));
            }
            if len - HEADER_LEN > MAX_FRAME {
                self.dropped += 1;
            } else {
                let mut header = [0u8; HEADER_LEN];
                let frame = &mut self.tx_frame[..len - HEADER_LEN];
                reader
                    .read_exact(&mut header)
                    .and_then(|()| reader.read_exact(frame))
                    .map_err(|e| chain_err(buffers(e)))?;
                // A full tap queue drops the frame, as a NIC does; the guest's TCP resends.
                if (&self.tap.file).write(frame).is_err() {
                    self.dropped += 1;
                }
            }
            queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Moves frames from the tap into the guest's receive buffers until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used_any = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match (&self.tap.file).read(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("tap {}: read failed: {e}", self.tap.name);
                        break;
                    }
                },
            };
            let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() else {
                // No buffer: keep the frame, read no more until the guest posts some.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            let chain_err = |reason| QueueError::Chain { head, reason };
            check_chain_terminates(&chain).map_err(chain_err)?;
            let mut writer = chain.clone().writer(mem).map_err(|e| chain_err(buffers(e)))?;
            let written = if writer.available_bytes() < HEADER_LEN + len {
                self.dropped += 1;
                0
            } else {
                note_dma(self.dma_log.as_ref(), &chain);
                // virtio_net_hdr_v1: no checksum or GSO; num_buffers = 1.
                let mut header = [0u8; HEADER_LEN];
                header[10] = 1;
                writer
                    .write_all(&header)
                    .and_then(|()| writer.write_all(&self.rx_frame[..len]))
                    .map_err(|e| chain_err(buffers(e)))?;
                (HEADER_LEN + len) as u32
            };
            queue.add_used(mem, head, written).map_err(QueueError::UsedRing)?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (u16).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.file.as_raw_fd())
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        match queues.get_mut(RX) {
            Some(rx) if rx.ready() => self.receive(rx, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

/// Parses a MAC address, `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A locally administered unicast MAC derived from the tap's name, for a `--net`
/// without `mac=`: stable across runs, different per tap.
pub fn default_mac(tap: &str) -> [u8; 6] {
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = hash.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{ring_base, FakeDriver, DATA, WRITE};
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];

    /// A virtio-net device on a fresh tap of this host with 10.213.`test`.1/24 on
    /// its side, up (the tap goes when the device is dropped).
    fn device_on_a_host_tap(test: u32) -> (FakeDriver, String) {
        let tap = format!("spcvn{}-{test}", std::process::id() % 100_000);
        let net = Net::new(&NetConfig { tap: tap.clone(), mac: GUEST_MAC }, None).unwrap_or_else(|e| {
            panic!(
                "this test needs /dev/net/tun and root (CAP_NET_ADMIN) to create tap {tap}: {}",
                crate::error_chain(&e)
            )
        });
        // No IPv6 chatter (router solicitations) in the guest's receive queue.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
        let address = format!("10.213.{test}.1/24");
        for args in [vec!["addr", "add", &address, "dev", &tap], vec!["link", "set", &tap, "up"]] {
            let status = std::process::Command::new("ip").args(&args).status().expect("ip (Debian package iproute2)");
            assert!(status.success(), "ip {args:?}");
        }
        (FakeDriver::new(Box::new(net)), tap)
    }

    /// An Ethernet ARP request: who has `target`? tell `sender` (the guest).
    fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&sender);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    /// Posts `count` receive buffers of `len` bytes each on queue 0.
    fn post_receive_buffers(d: &mut FakeDriver, count: u16, len: u32) {
        for i in 0..count {
            d.write_desc_on(RX as u16, i, DATA + u64::from(i) * 2048, len, WRITE, 0);
            d.post_on(RX as u16, i);
        }
    }

    /// Sends `frame` (after a zeroed header) on the transmit queue.
    fn transmit(d: &mut FakeDriver, frame: &[u8]) {
        let at = ring_base(TX as u16) + DATA;
        d.mem.write_slice(&[0u8; HEADER_LEN], GuestAddress(at)).unwrap();
        d.mem.write_slice(frame, GuestAddress(at + HEADER_LEN as u64)).unwrap();
        d.write_desc_on(TX as u16, 0, at, (HEADER_LEN + frame.len()) as u32, 0, 0);
        d.post_on(TX as u16, 0);
    }

    /// The host kernel's ARP reply to the guest, once it is in a receive buffer.
    fn wait_for_arp_reply(d: &mut FakeDriver) -> Option<(u32, Vec<u8>)> {
        for _ in 0..200 {
            d.transport.process_backend();
            for (head, len) in d.used_on(RX as u16) {
                let mut buf = vec![0u8; len as usize];
                d.mem.read_slice(&mut buf, GuestAddress(DATA + u64::from(head) * 2048)).unwrap();
                let frame = &buf[HEADER_LEN.min(buf.len())..];
                if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                    return Some((len, buf));
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    /// The guest's ARP request leaves through the tap and the host kernel's reply
    /// comes back into a receive buffer, with its header: both directions of the
    /// device against a real network stack.
    #[test]
    fn virtio_net_carries_an_arp_exchange_with_the_host_through_a_real_tap() {
        let (mut d, tap) = device_on_a_host_tap(7);
        post_receive_buffers(&mut d, 8, 2048);
        transmit(&mut d, &arp_request([10, 213, 7, 2], [10, 213, 7, 1]));
        assert_eq!(d.used_on(TX as u16), [(0, 0)], "the frame was sent and its buffer given back");
        let (len, buf) = wait_for_arp_reply(&mut d).unwrap_or_else(|| panic!("no ARP reply from the host on {tap}"));
        assert_eq!(buf[10], 1, "num_buffers");
        let frame = &buf[HEADER_LEN..];
        // Ethernet (14 bytes), then ARP: sender MAC and IP at 22 and 28, target's at 32 and 38.
        assert_eq!(
            (&frame[..6], &frame[32..38], &frame[38..42]),
            (&GUEST_MAC[..], &GUEST_MAC[..], &[10, 213, 7, 2][..]),
            "to the guest"
        );
        assert_eq!(&frame[28..32], &[10, 213, 7, 1], "10.213.7.1 is at the tap");
        assert!(len as usize >= HEADER_LEN + 42);
        assert!(d.interrupts() > 0);
        assert_eq!(d.transport.broken(), None);
    }

    /// A received frame that waits for a receive buffer is delivered as it came, even
    /// when the guest transmits meanwhile (the two directions have their own buffers).
    #[test]
    fn virtio_net_a_frame_waiting_for_a_buffer_survives_a_transmit() {
        let (mut d, tap) = device_on_a_host_tap(9);
        transmit(&mut d, &arp_request([10, 213, 9, 2], [10, 213, 9, 1]));
        // No receive buffer yet: the host's reply is read and waits in the device.
        std::thread::sleep(std::time::Duration::from_millis(200));
        d.transport.process_backend();
        // A frame nobody answers (no host has 10.213.9.9), sent while the reply waits.
        transmit(&mut d, &arp_request([10, 213, 9, 2], [10, 213, 9, 9]));
        post_receive_buffers(&mut d, 1, 2048);
        let (_, buf) = wait_for_arp_reply(&mut d).unwrap_or_else(|| {
            let used = d.used_on(RX as u16);
            panic!("the waiting frame is not the host's ARP reply on {tap}: used {used:?}")
        });
        assert_eq!(&buf[HEADER_LEN + 28..HEADER_LEN + 32], &[10, 213, 9, 1], "from the tap's side");
    }

    /// A frame larger than the guest's receive buffer is dropped and counted, the
    /// buffer given back empty; a transmit chain shorter than its header stops the
    /// device.
    #[test]
    fn virtio_net_drops_what_does_not_fit_and_stops_on_a_headerless_frame() {
        let (mut d, tap) = device_on_a_host_tap(8);
        post_receive_buffers(&mut d, 2, 40);
        transmit(&mut d, &arp_request([10, 213, 8, 2], [10, 213, 8, 1]));
        let mut given_back = Vec::new();
        for _ in 0..200 {
            d.transport.process_backend();
            given_back = d.used_on(RX as u16);
            if !given_back.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(given_back.first().map(|u| u.1), Some(0), "the reply did not fit a 40-byte buffer ({tap})");

        let at = ring_base(TX as u16) + DATA;
        d.write_desc_on(TX as u16, 0, at, (HEADER_LEN - 1) as u32, 0, 0);
        d.post_on(TX as u16, 0);
        let reason = d.transport.broken().map(str::to_owned);
        assert!(reason.as_deref().is_some_and(|r| r.contains("header")), "{reason:?}");
    }

    #[test]
    fn virtio_net_macs_parse_and_multicast_or_malformed_ones_are_refused() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        for bad in
            ["52:54:00:12:34", "52:54:00:12:34:56:78", "01:00:5e:00:00:01", "5:54:00:12:34:56", "zz:54:00:12:34:56"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(default_mac("tap0"), default_mac("tap0"));
        assert_ne!(default_mac("tap0"), default_mac("tap1"));
        assert_eq!(default_mac("tap0")[0] & 3, 2, "locally administered, unicast");
    }
}
