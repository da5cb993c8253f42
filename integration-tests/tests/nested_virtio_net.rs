//! virtio-net of our `vmm` with Debian's own driver, in the nested test bed: L1 loads
//! `tun`, the vmm (root in L1) creates the tap, L1 puts an address on its side, and
//! Debian booted from its (read-only) root disk takes the other.
//!
//! One test, one L1 command (tests/nested_virtio.rs says why); `specula launch` with
//! a disk and a network device is tests/nested_virtio_launch.rs.

use std::time::Duration;

use integration_tests::nested::{
    assert_vmm_ended_with, debian_root_disk, debian_session, retry_on_the_nest_symptoms, word_after, NestedL1,
    L1_MODULES, L1_ROOTFS,
};

const SHELL_LIMIT: Duration = Duration::from_secs(300);
/// A 16 MiB transfer through TCG's nested SVM: a bound on a hang, not a timing.
const TRANSFER_LIMIT: Duration = Duration::from_secs(400);
const END_LIMIT: Duration = Duration::from_secs(60);
/// The tap, and the addresses on its two sides.
const TAP: &str = "spc0";
const L1_ADDRESS: &str = "172.30.0.1";
const GUEST_ADDRESS: &str = "172.30.0.2";
const GUEST_MAC: &str = "52:54:00:5e:c0:01";

/// The guest answers L1's pings over the tap, with full-sized frames, and receives a
/// 16 MiB file from L1 whose SHA-256 in the guest matches L1's; the guest's NIC has
/// the MAC the vmm was given.
#[test]
fn nested_virtio_net_answers_pings_from_l1_and_carries_16_mib_with_a_matching_checksum() {
    retry_on_the_nest_symptoms(|| {
        let l1 = &NestedL1::boot_carrying(&[], &debian_root_disk());
        let (status, log) = debian_session(
            l1,
            "virtio-net",
            &format!("--disk path={L1_ROOTFS},readonly=on --net tap={TAP},mac={GUEST_MAC}"),
            "ro",
        )
        .before(&format!(
            "insmod {L1_MODULES}/tun.ko || exit 1\n\
             dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null || exit 1\n\
             echo \"=== l1-sum=$(sha256sum /tmp/blob | cut -d' ' -f1)\""
        ))
        .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
        .shell(&format!("ip addr add {L1_ADDRESS}/24 dev {TAP} && ip link set {TAP} up || fail 'the tap is not there'"))
        .send(&format!(
            "ip addr add {GUEST_ADDRESS}/24 dev eth0 && ip link set eth0 up && \
             echo \"mac=$(cat /sys/class/net/eth0/address) up=$(cat /sys/class/net/eth0/operstate)\""
        ))
        .wait_for(&format!("mac={GUEST_MAC} up=up"), SHELL_LIMIT)
        .shell(&format!(
            "ping -c 3 -s 1400 -W 10 {GUEST_ADDRESS} > ping.out 2>&1; echo \"=== ping: $(tail -2 ping.out | head -1)\"\n\
             (nc -l -p 5000 < /tmp/blob &)\n\
             usleep 500000"
        ))
        .send(&format!("echo \"guest-sum=$(sha256sum < /dev/tcp/{L1_ADDRESS}/5000 | cut -d' ' -f1)\""))
        .wait_for("guest-sum=", TRANSFER_LIMIT)
        .shell(&format!("waitfor \"guest-sum=$(sha256sum /tmp/blob | cut -d' ' -f1)\" {}", TRANSFER_LIMIT.as_secs()))
        .send("poweroff -f")
        .finish(l1, END_LIMIT);
        assert_vmm_ended_with(status, 0, "poweroff must end the vmm with 0", &log);
        let l1_sum = word_after(&log, "=== l1-sum=");
        assert!(
            log.contains("=== ping: 3 packets transmitted, 3 packets received, 0% packet loss"),
            "L1's 1400-byte pings are all answered:\n{log}"
        );
        assert!(log.contains(&format!("guest-sum={l1_sum}")), "the guest's SHA-256 of the 16 MiB is L1's:\n{log}");
    });
}
