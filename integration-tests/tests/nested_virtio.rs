//! virtio devices of our `vmm`, with Debian's own kernel and drivers, in the nested
//! test bed (`integration_tests::nested`; docs/nested.md): Linux on this runner's PVM
//! stops in early boot, so a guest that drives a virtio queue needs the nest.
//!
//! The L1 of this test binary carries the Debian root disk
//! (`guest-images/linux/build-rootfs.sh`), the disk initramfs that mounts it
//! (`guest-images/linux/build.sh`) and `debugfs`, which reads the image back in L1
//! after the vmm exits.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use integration_tests::nested::{
    debian_root_disk, debian_session, host_program, retry_on_the_nest_symptoms, NestedL1, L1_ROOTFS,
};

/// Linux from its disk to the Debian shell: ~30 s of TCG time; this bounds a hang.
const SHELL_LIMIT: Duration = Duration::from_secs(300);
const END_LIMIT: Duration = Duration::from_secs(60);

fn l1() -> NestedL1 {
    NestedL1::boot_carrying(&[], &debian_root_disk())
}

/// The tests of this binary take turns on the runner's two cores (see tests/nested.rs).
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Both halves in one L1: a second L1 of this test binary (whose initramfs carries
/// the 260 MiB root disk) was seen to boot to its command server and never answer.
#[test]
fn nested_virtio_blk_boots_debian_keeps_its_writes_and_a_read_only_disk_refuses_them() {
    let _turn = turn();
    retry_on_the_nest_symptoms(|| {
        let l1 = &l1();
        boots_debian_and_keeps_what_the_guest_wrote(l1);
        read_only_disk_refuses_the_guests_writes(l1);
    });
}

/// Debian boots from virtio-blk to its shell; a file written there, synced and
/// powered off is in the image after the vmm exits (read back with debugfs, not by
/// the guest); the disk's serial is its file name.
fn boots_debian_and_keeps_what_the_guest_wrote(l1: &NestedL1) {
    let (status, log) = debian_session(l1, "virtio-blk-rw", &format!("--disk path={L1_ROOTFS}"), "")
        .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
        .send("echo \"serial=$(cat /sys/block/vda/serial) answer=$((6 * 7))\"")
        .wait_for("serial=rootfs.img answer=42", SHELL_LIMIT)
        .send("echo \"specula-proof-$((6 * 7))-$(cat /proc/sys/kernel/random/boot_id)\" > /root/proof && sync && echo synced-$((1 + 1))")
        .wait_for("synced-2", SHELL_LIMIT)
        // A clean power-off: with the root file system read-only again, ext4's
        // journal is checkpointed, so debugfs (which replays no journal) and the
        // read-only boot below (which cannot) see a clean file system.
        .send("cat /root/proof; mount -o remount,ro /; poweroff -f")
        .finish(l1, END_LIMIT);
    assert_eq!(status, 0, "poweroff must end the vmm with 0:\n{log}");
    assert!(log.contains(", root /dev/vda rw"), "the root file system is the virtio disk, read-write:\n{log}");
    // Bash's prompt codes may lead the line: the proof starts where its text does.
    let proof_line = log
        .lines()
        .find_map(|l| l.find("specula-proof-42-").map(|at| l[at..].trim().to_string()))
        .unwrap_or_else(|| panic!("the guest printed its proof file:\n{log}"));

    // Carried to its host path; L1's PATH is busybox's /bin alone.
    let debugfs = host_program("debugfs");
    let script = format!("{} -R 'cat /root/proof' {L1_ROOTFS} </dev/null 2>/dev/null", debugfs.display());
    let out = l1.run(&script, Duration::from_secs(60));
    assert_eq!(out.status, 0, "debugfs in L1: {}", out.output);
    assert_eq!(out.output.trim(), proof_line, "the image holds exactly what the guest wrote and synced");
}

/// What would change if the guest wrote the read-only image: its first 64 KiB (the
/// boot sector a raw write hits, the superblock, the group descriptors) and the
/// superblock's mount and write times and counts. Hashing all of it takes minutes
/// under TCG.
fn image_state(l1: &NestedL1) -> String {
    let debugfs = host_program("debugfs");
    let script = format!(
        "dd if={L1_ROOTFS} bs=4096 count=16 2>/dev/null | sha256sum; \
         {} -R stats {L1_ROOTFS} </dev/null 2>/dev/null | grep -E '^(Last mount time|Last write time|Mount count|Lifetime writes)'",
        debugfs.display()
    );
    let out = l1.run(&script, Duration::from_secs(120));
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(out.output.contains("Last write time"), "debugfs read the superblock: {}", out.output);
    out.output
}

/// A read-only disk offers VIRTIO_BLK_F_RO: Linux marks the device read-only, a
/// read-write remount, a raw write and a file's creation are refused in the guest,
/// and the image's boot sector and superblock are what they were.
fn read_only_disk_refuses_the_guests_writes(l1: &NestedL1) {
    let before = image_state(l1);
    let (status, log) = debian_session(l1, "virtio-blk-ro", &format!("--disk path={L1_ROOTFS},readonly=on"), "ro")
        .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
        .send("echo \"ro-flag=$(cat /sys/block/vda/ro)\"")
        .wait_for("ro-flag=1", SHELL_LIMIT)
        .send("mount -o remount,rw / 2>/dev/null; echo \"remount=$?\"")
        .wait_for("remount=", SHELL_LIMIT)
        .send("dd if=/dev/zero of=/dev/vda bs=512 count=1 oflag=direct 2>/dev/null; echo \"raw-write=$?\"")
        .wait_for("raw-write=", SHELL_LIMIT)
        .send("touch /root/nope 2>/dev/null; echo \"touch=$?\"; poweroff -f")
        .finish(l1, END_LIMIT);
    assert_eq!(status, 0, "poweroff must end the vmm with 0:\n{log}");
    assert!(log.contains(", root /dev/vda ro"), "the root file system is the virtio disk, read-only:\n{log}");
    for refused in ["remount=", "raw-write=", "touch="] {
        // The answer, not the typed command's echo (which has `$?` after the '=').
        let answer = log
            .lines()
            .filter_map(|l| l.find(refused).map(|at| l[at + refused.len()..].trim()))
            .find(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()))
            .unwrap_or_else(|| panic!("no answer to {refused}:\n{log}"));
        assert_ne!(answer, "0", "the guest's write must fail ({refused}{answer}):\n{log}");
    }
    assert_eq!(image_state(l1), before, "the read-only image is unchanged");
}
