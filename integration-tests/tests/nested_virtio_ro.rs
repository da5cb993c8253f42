//! A read-only virtio-blk disk of our `vmm`, with Debian's own driver, in the nested
//! test bed (see tests/nested_virtio.rs for why each virtio test has a binary and an
//! L1 command of its own).

use std::time::Duration;

use integration_tests::nested::{
    assert_vmm_ended_with, debian_root_disk, debian_session, host_program, retry_on_the_nest_symptoms, NestedL1,
    L1_ROOTFS,
};

const SHELL_LIMIT: Duration = Duration::from_secs(300);
const END_LIMIT: Duration = Duration::from_secs(60);

/// What would change if the guest wrote the read-only image: its first 64 KiB (the
/// boot sector a raw write hits, the superblock, the group descriptors) and the
/// superblock's mount and write times and counts (hashing all 260 MiB takes minutes
/// under TCG).
fn image_state_script() -> String {
    format!(
        "dd if={L1_ROOTFS} bs=4096 count=16 2>/dev/null | sha256sum; \
         {} -R stats {L1_ROOTFS} </dev/null 2>/dev/null | grep -E '^(Last mount time|Last write time|Mount count|Lifetime writes)'",
        host_program("debugfs").display()
    )
}

/// A read-only disk offers VIRTIO_BLK_F_RO: Linux marks the device read-only, and a
/// read-write remount, a raw write to the device and a new file are refused in the
/// guest; the image's boot sector and superblock are what they were.
#[test]
fn nested_virtio_blk_read_only_disk_refuses_the_guests_writes() {
    retry_on_the_nest_symptoms(|| {
        let l1 = &NestedL1::boot_carrying(&[], &debian_root_disk());
        let (status, log) = debian_session(l1, "virtio-blk-ro", &format!("--disk path={L1_ROOTFS},readonly=on"), "ro")
            .before(&format!("echo '=== before'; {}; echo '=== before end'", image_state_script()))
            .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
            .send("echo \"ro-flag=$(cat /sys/block/vda/ro)\"")
            .wait_for("ro-flag=1", SHELL_LIMIT)
            .send("mount -o remount,rw / 2>/dev/null; echo \"remount=$?\"")
            .send("dd if=/dev/zero of=/dev/vda bs=512 count=1 oflag=direct 2>/dev/null; echo \"raw-write=$?\"")
            .send("touch /root/nope 2>/dev/null; echo \"touch=$?\"; poweroff -f")
            .after_exit(&image_state_script())
            .finish(l1, END_LIMIT);
        assert_vmm_ended_with(status, 0, "poweroff must end the vmm with 0", &log);
        let before = log
            .split_once("=== before\n")
            .and_then(|(_, rest)| rest.split_once("=== before end"))
            .map(|(state, _)| state.trim().to_string())
            .unwrap_or_else(|| panic!("no image state before the boot:\n{log}"));
        let (console, after) = log.split_once("=== after").expect("the after-exit output");
        assert!(before.contains("Last write time"), "debugfs read the superblock: {before}");
        assert!(console.contains(", root /dev/vda ro"), "the root file system is the virtio disk, read-only:\n{log}");
        for refused in ["remount=", "raw-write=", "touch="] {
            // The answer, not the typed command's echo (which has `$?` after the '=').
            let answer = console
                .lines()
                .filter_map(|l| l.find(refused).map(|at| l[at + refused.len()..].trim()))
                .find(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .unwrap_or_else(|| panic!("no answer to {refused}:\n{log}"));
            assert_ne!(answer, "0", "the guest's write must fail ({refused}{answer}):\n{log}");
        }
        assert_eq!(after.trim(), before, "the read-only image is unchanged");
    });
}
