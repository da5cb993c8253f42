//! virtio-blk of our `vmm`, with Debian's own kernel and driver, in the nested test
//! bed (`integration_tests::nested`; docs/nested.md): Linux on this runner's PVM
//! stops in early boot, so a guest that drives a virtio queue needs the nest.
//!
//! The L1 carries the Debian root disk (`guest-images/linux/build-rootfs.sh`), the
//! disk initramfs that mounts it (`guest-images/linux/build.sh`) and `debugfs`, which
//! reads the image back in L1 after the vmm exits. One test per binary, and each does
//! all of its L1 work in one L1 command: an L1 that has run KVM guests may stop
//! reading its command port after a few commands, and a second L1 of a binary that
//! carries the 260 MiB disk was seen to boot and never answer (docs/nested.md).
//! The read-only disk is tests/nested_virtio_ro.rs; the network, tests/nested_virtio_net.rs.

use std::time::Duration;

use integration_tests::nested::{
    assert_vmm_ended_with, debian_root_disk, debian_session, host_program, retry_on_the_nest_symptoms, NestedL1,
    L1_ROOTFS,
};

/// Linux from its disk to the Debian shell: ~20 s of TCG time; this bounds a hang.
const SHELL_LIMIT: Duration = Duration::from_secs(300);
const END_LIMIT: Duration = Duration::from_secs(60);

/// Debian boots from virtio-blk to its shell; a file written there, synced and
/// powered off is in the image after the vmm exits (read back with debugfs in L1, not
/// by the guest); the disk's serial is its file name.
#[test]
fn nested_virtio_blk_boots_debian_from_its_disk_and_keeps_what_the_guest_wrote() {
    retry_on_the_nest_symptoms(|| {
        let l1 = &NestedL1::boot_carrying(&[], &debian_root_disk());
        let debugfs = host_program("debugfs");
        let (status, log) = debian_session(l1, "virtio-blk-rw", &format!("--disk path={L1_ROOTFS}"), "")
            .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
            .send("echo \"serial=$(cat /sys/block/vda/serial) answer=$((6 * 7))\"")
            .wait_for("serial=rootfs.img answer=42", SHELL_LIMIT)
            .send(
                "echo \"specula-proof-$((6 * 7))-$(cat /proc/sys/kernel/random/boot_id)\" > /root/proof && sync && \
                 echo synced-$((1 + 1))",
            )
            .wait_for("synced-2", SHELL_LIMIT)
            // A clean power-off: with the root file system read-only again, ext4's
            // journal is checkpointed, so debugfs (which replays no journal) sees it.
            .send("cat /root/proof; mount -o remount,ro /; poweroff -f")
            .after_exit(&format!("{} -R 'cat /root/proof' {L1_ROOTFS} </dev/null 2>/dev/null", debugfs.display()))
            .finish(l1, END_LIMIT);
        assert_vmm_ended_with(status, 0, "poweroff must end the vmm with 0", &log);
        let (console, image) = log.split_once("=== after").expect("the after-exit output");
        assert!(console.contains(", root /dev/vda rw"), "the root file system is the virtio disk, read-write:\n{log}");
        // Bash's prompt codes may lead the line: the proof starts where its text does.
        let proof_line = console
            .lines()
            .find_map(|l| l.find("specula-proof-42-").map(|at| l[at..].trim().to_string()))
            .unwrap_or_else(|| panic!("the guest printed its proof file:\n{log}"));
        assert_eq!(image.trim(), proof_line, "the image holds exactly what the guest wrote and synced:\n{log}");
    });
}
