//! `specula launch` with virtio devices in the nested test bed: a Debian source booted
//! from its disk with a NIC on a tap, and an inspector attached (one test, one L1
//! command: tests/nested_virtio.rs says why).

use std::time::Duration;

use integration_tests::nested::{
    debian_root_disk, retry_on_the_nest_symptoms, NestedL1, L1_DISK_INITRAMFS, L1_MODULES, L1_ROOTFS,
};

/// `specula launch --disk ... --net ...`: the vmm boots Debian from its disk with a
/// NIC on a tap it creates, the inspector attaches, and its process list has the
/// guest's init (pid 1, `specula-init`) and the console's shell.
#[test]
fn nested_virtio_specula_launch_with_disk_and_net_lists_the_debian_guests_processes() {
    retry_on_the_nest_symptoms(|| {
        let l1 = &NestedL1::boot_carrying(&[], &debian_root_disk());
        let specula = l1.binary("specula");
        let cmdline = "console=ttyS0 quiet panic=-1 init=/sbin/specula-init ro";
        let out = l1.run(
            &format!(
                "insmod {L1_MODULES}/tun.ko || exit 1\n\
                 cd /tmp && rm -rf /tmp/pair && mkdir -p /tmp/pair\n\
                 {specula} launch --source specula --kernel {kernel} --initrd {L1_DISK_INITRAMFS} --memory 384M \
                   --cmdline '{cmdline}' --disk path={L1_ROOTFS},readonly=on --net tap=spc1 --dir /tmp/pair \
                   > launch.log 2>&1 &\n\
                 launcher=$!\n\
                 end=$(( $(date +%s) + 300 ))\n\
                 until grep -q 'specula-rootfs: Debian 12' /tmp/pair/console.log 2>/dev/null && \
                       {specula} --socket /tmp/pair/api.sock --json ps 2>/dev/null | grep -q specula-init; do\n\
                   kill -0 $launcher 2>/dev/null && [ $(date +%s) -lt $end ] || \
                     {{ echo 'launch failed:'; cat launch.log /tmp/pair/*.log; kill -INT $launcher; exit 1; }}\n\
                   usleep 500000\n\
                 done\n\
                 echo '--- ps'; {specula} --socket /tmp/pair/api.sock --json ps\n\
                 echo '--- tap'; ip link show spc1 | head -1\n\
                 kill -INT $launcher; wait $launcher; echo '--- launch exit'; echo $?",
                kernel = l1.linux_image("linux", "vmlinuz"),
            ),
            Duration::from_secs(600),
        );
        assert_eq!(out.status, 0, "{}", out.output);
        let ps = out.output.split("--- ps").nth(1).and_then(|r| r.split("--- tap").next()).unwrap_or("");
        let processes: serde_json::Value =
            serde_json::from_str(ps.trim()).unwrap_or_else(|e| panic!("ps JSON: {e}\n{}", out.output));
        let comms: Vec<(u64, String)> = processes
            .as_array()
            .expect("a process list")
            .iter()
            .map(|p| (p["pid"].as_u64().unwrap_or(0), p["comm"].as_str().unwrap_or("").to_string()))
            .collect();
        assert!(comms.contains(&(1, "specula-init".to_string())), "pid 1 is the disk's init: {comms:?}");
        assert!(comms.iter().any(|(_, c)| c == "bash"), "the console's shell: {comms:?}");
        assert!(out.output.contains("spc1:"), "the vmm made the tap: {}", out.output);
    });
}
