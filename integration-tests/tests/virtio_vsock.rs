//! virtio-vsock against the host kernel's real vhost-vsock, driven by an in-process
//! fake guest (`vmm::devices::virtio::testing::FakeDriver`): a well-formed packet gets
//! vhost's answer, and each hostile queue makes vhost report an error that stops the
//! device, which a reset brings back.
//!
//! They need /dev/vhost-vsock, which this runner's kernel does not offer and where no
//! module loads: they are ignored here and run in the nested L1, which loads
//! vhost_vsock (tests/nested_virtio_vsock.rs runs them there).

use std::os::fd::RawFd;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::testing::{ring_base, FakeDriver, DATA, RAM_SIZE, USED_RING, WRITE};
use vmm::devices::virtio::vsock::{Vsock, VsockConfig};

const RX: u16 = 0;
const TX: u16 = 1;
/// virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
/// buf_alloc, fwd_cnt.
const HEADER_LEN: u32 = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RST: u16 = 3;
/// The host's CID, as vhost-vsock names it.
const HOST_CID: u64 = 2;
/// DEVICE_NEEDS_RESET in the status register.
const NEEDS_RESET: u32 = 0x40;
/// vhost works on its own kernel thread: how long its answer may take.
const VHOST_LIMIT: Duration = Duration::from_secs(10);

/// A driver over a vsock device of CID `cid`, with one receive buffer posted.
fn driver(cid: u64) -> FakeDriver {
    let mut d = FakeDriver::over(
        |mem| Box::new(Vsock::new(&VsockConfig { cid }, mem).expect("/dev/vhost-vsock (load vhost_vsock)")),
        USED_RING,
    );
    assert_eq!(d.status() & NEEDS_RESET, 0, "the device runs: {:?}", d.transport.broken());
    d.write_desc_on(RX, 0, ring_base(RX) + DATA, 4096, WRITE, 0);
    d.make_available_on(RX, 0);
    d.notify(RX);
    d
}

/// Waits until `fd` (an eventfd) is readable; false after [`VHOST_LIMIT`].
fn signalled(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one live pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, VHOST_LIMIT.as_millis() as i32) };
    ready == 1
}

/// Posts a connection request from the guest to the host's port 9 (nobody listens)
/// on the transmit queue, and returns the op of vhost's answer in the receive buffer.
fn request_answered(d: &mut FakeDriver, cid: u64) -> Option<u16> {
    post_request(d, cid);
    answer(d, VHOST_LIMIT)
}

/// Posts the request of [`request_answered`] and notifies the transmit queue.
fn post_request(d: &mut FakeDriver, cid: u64) {
    let header = ring_base(TX) + DATA;
    let mut raw = [0u8; HEADER_LEN as usize];
    raw[0..8].copy_from_slice(&cid.to_le_bytes());
    raw[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    raw[16..20].copy_from_slice(&1234u32.to_le_bytes());
    raw[20..24].copy_from_slice(&9u32.to_le_bytes());
    raw[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    raw[30..32].copy_from_slice(&OP_REQUEST.to_le_bytes());
    raw[36..40].copy_from_slice(&65536u32.to_le_bytes());
    d.mem.write_slice(&raw, GuestAddress(header)).unwrap();
    d.write_desc_on(TX, 0, header, HEADER_LEN, 0, 0);
    d.make_available_on(TX, 0);
    d.notify(TX);
}

/// The op of vhost's answer in the receive buffer, if one comes within `limit`.
fn answer(d: &mut FakeDriver, limit: Duration) -> Option<u16> {
    let used = d.transport.kernel_events().expect("vhost's eventfds").used;
    let deadline = std::time::Instant::now() + limit;
    while d.used_on(RX).is_empty() && std::time::Instant::now() < deadline {
        signalled(used);
    }
    let answer = ring_base(RX) + DATA;
    (!d.used_on(RX).is_empty()).then(|| d.mem.read_obj::<u16>(GuestAddress(answer + 30)).unwrap())
}

/// Posts `desc` (address, length, flags, next) as the transmit queue's only chain,
/// and expects vhost to report the queue malformed and the device to stop.
fn hostile_transmit_stops_the_device(cid: u64, what: &str, corrupt: impl FnOnce(&mut FakeDriver)) {
    let mut d = driver(cid);
    corrupt(&mut d);
    d.notify(TX);
    let error = d.transport.kernel_events().expect("vhost's eventfds").error;
    assert!(signalled(error), "{what}: vhost reports the malformed queue on the error eventfd");
    // What the event loop does with the signal (VirtioEvents relays it).
    d.transport.kernel_error();
    assert_ne!(d.status() & NEEDS_RESET, 0, "{what}: the device asks for a reset");
    assert!(d.transport.broken().is_some_and(|why| why.contains("malformed queue")), "{what}");
    assert!(d.interrupts() > 0, "{what}: the driver is told (configuration interrupt)");
    // The driver resets it, and it serves again.
    d.reset_and_set_up();
    d.write_desc_on(RX, 0, ring_base(RX) + DATA, 4096, WRITE, 0);
    d.make_available_on(RX, 0);
    d.notify(RX);
    assert_eq!(request_answered(&mut d, cid), Some(OP_RST), "{what}: after the reset the device serves again");
}

/// The control the hostile cases need: a well-formed request to a port where no one
/// listens gets vhost's reset packet in the receive buffer, and an interrupt.
#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_request_to_a_closed_host_port_is_answered_with_a_reset_by_vhost() {
    let mut d = driver(101);
    assert_eq!(request_answered(&mut d, 101), Some(OP_RST));
    assert_eq!(d.status() & NEEDS_RESET, 0);
}

/// A pause stops vhost (the mirror copies RAM meanwhile): a request the guest posted
/// and notified then is not served until the resume, and is served at the resume,
/// though vhost dropped the notification that came while it was stopped.
#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_serves_at_the_resume_what_the_guest_posted_during_a_pause() {
    let mut pause = None;
    let mut d = FakeDriver::over(
        |mem| {
            let device = Vsock::new(&VsockConfig { cid: 107 }, mem).expect("/dev/vhost-vsock (load vhost_vsock)");
            pause = Some(device.pause_hook());
            Box::new(device)
        },
        USED_RING,
    );
    let pause = pause.expect("the device's pause hook");
    d.write_desc_on(RX, 0, ring_base(RX) + DATA, 4096, WRITE, 0);
    d.make_available_on(RX, 0);
    d.notify(RX);
    pause(true);
    post_request(&mut d, 107);
    assert_eq!(answer(&mut d, Duration::from_secs(2)), None, "vhost wrote guest RAM during the pause");
    pause(false);
    assert_eq!(
        answer(&mut d, VHOST_LIMIT),
        Some(OP_RST),
        "the request posted during the pause is served at the resume"
    );
}

#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_stops_on_a_descriptor_outside_ram() {
    hostile_transmit_stops_the_device(102, "outside RAM", |d| {
        d.write_desc_on(TX, 0, RAM_SIZE + 0x10_0000, HEADER_LEN, 0, 0);
        d.make_available_on(TX, 0);
    });
}

#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_stops_on_a_descriptor_loop() {
    hostile_transmit_stops_the_device(103, "loop", |d| {
        d.write_desc_on(TX, 0, ring_base(TX) + DATA, HEADER_LEN, 1, 1);
        d.write_desc_on(TX, 1, ring_base(TX) + DATA, HEADER_LEN, 1, 0);
        d.make_available_on(TX, 0);
    });
}

#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_stops_on_an_absurd_length() {
    hostile_transmit_stops_the_device(104, "absurd length", |d| {
        d.write_desc_on(TX, 0, ring_base(TX) + DATA, u32::MAX, 0, 0);
        d.make_available_on(TX, 0);
    });
}

#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_stops_on_an_available_index_running_ahead() {
    hostile_transmit_stops_the_device(105, "available index ahead", |d| {
        d.mem.write_obj(1000u16, GuestAddress(ring_base(TX) + vmm::devices::virtio::testing::AVAIL_RING + 2)).unwrap();
    });
}

/// A receive queue whose used ring lies in MMIO space never reaches vhost: the
/// transport refuses DRIVER_OK.
#[test]
#[ignore = "virtio_vsock: needs /dev/vhost-vsock; runs in the nested L1 (nested_virtio_vsock)"]
fn virtio_vsock_will_not_start_with_its_used_ring_in_mmio_space() {
    let d = FakeDriver::over(
        |mem| Box::new(Vsock::new(&VsockConfig { cid: 106 }, mem).expect("/dev/vhost-vsock (load vhost_vsock)")),
        0xd000_0000,
    );
    assert_ne!(d.status() & NEEDS_RESET, 0);
    assert!(d.transport.broken().is_some_and(|why| why.contains("not all in guest RAM")), "{:?}", d.transport.broken());
}
