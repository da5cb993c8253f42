//! The source's virtio devices across the mirror's revokes, in the nested test bed:
//! a revoke moves every chunk of the grant into a fresh memfd mapped at the same
//! address, copying it with the VM paused. A disk read or a vhost-vsock write that
//! landed in the old chunk after its copy would be lost, and a device that kept the
//! old mapping would write where no guest reads; so the guest reads its disk with
//! O_DIRECT (the device writes straight into the reader's buffer) and receives over
//! vsock while every grant of an attached inspector is revoked, and each checksum
//! must still be L1's.
//!
//! One test, one L1 command (tests/nested_virtio.rs says why).

use std::time::Duration;

use integration_tests::nested::{
    assert_vmm_ended_with, debian_root_disk, debian_session, host_program, load_vhost_vsock,
    retry_on_the_nest_symptoms, start_inspector_and_wait, word_after, NestedL1, L1_ROOTFS,
};

const SHELL_LIMIT: Duration = Duration::from_secs(300);
const READS_LIMIT: Duration = Duration::from_secs(600);
const END_LIMIT: Duration = Duration::from_secs(60);
const CID: u32 = 43;
/// O_DIRECT passes over the disk's first 32 MiB while the grants are revoked.
const PASSES: usize = 12;
/// Not on CI (run it with `--ignored`): with the 192 revokes of a 384 MiB guest (one
/// per 2 MiB chunk, each a pause and a remap), five of twelve L1 runs met the nest's
/// failures (triple faults, an RCU stall, a crash with no reason, a stall) under
/// TCG's nested SVM, where the nest's other tests meet them a few times in a
/// hundred; see docs/nested.md. It found a lost notification after vhost's restart, since fixed
/// and tested by tests/virtio_vsock.rs.
#[test]
#[ignore = "nested_virtio_revoke: 5 of 12 L1 runs crashed or stalled under TCG's nested SVM with hundreds of remaps (docs/nested.md); run with --ignored"]
fn nested_virtio_blk_and_vsock_lose_no_write_across_the_mirrors_revokes() {
    retry_on_the_nest_symptoms(|| {
        let mut carried = debian_root_disk();
        carried.programs.push(host_program("socat"));
        let l1 = &NestedL1::boot_carrying(&[], &carried);
        let socat = host_program("socat");
        let socat = socat.display();
        let inspector = l1.binary("inspector");
        let load_vhost = load_vhost_vsock();
        let api = |command: &str| format!("echo {command} | {socat} - UNIX-CONNECT:api.sock");
        let (status, log) = debian_session(
            l1,
            "virtio-revoke",
            &format!(
                "--disk path={L1_ROOTFS},readonly=on --vsock cid={CID} --mirror-socket mirror.sock \
                 --api-socket api.sock"
            ),
            "ro",
        )
        .before(&format!(
            "{load_vhost}\n\
             dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null || exit 1\n\
             echo \"=== l1-vsock-sum=$(sha256sum /tmp/blob | cut -c1-16)\"\n\
             echo \"=== l1-disk-sum=$(dd if={L1_ROOTFS} bs=1M count=32 2>/dev/null | sha256sum | cut -c1-16)\""
        ))
        .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
        .shell(&format!(
            "{start}\n\
             grants=$({grants})\n\
             echo \"=== grants: $grants\"",
            start = start_inspector_and_wait(
                &inspector,
                "--source-socket mirror.sock --all --serial null",
                "inspector.log"
            ),
            grants = api("grants"),
        ))
        .send("echo \"vsock$((1))-sum=$(socat -u VSOCK-LISTEN:5001,reuseaddr - | sha256sum | cut -c1-16)\" &")
        .send(&format!(
            "(for i in $(seq {PASSES}); do echo \"pass$i-sum=$(dd if=/dev/vda bs=1M count=32 iflag=direct 2>/dev/null \
             | sha256sum | cut -c1-16)\"; done; echo reads-$((1 + 1))-done) &"
        ))
        .wait_for("pass1-sum=", READS_LIMIT)
        // Every grant revoked while the reads go on, with 4 MiB crossing vsock meanwhile.
        .shell(&format!(
            "{socat} -u -T 120 FILE:/tmp/blob VSOCK-CONNECT:{CID}:5001 &\n\
             sender=$!\n\
             for grant in $(echo \"$grants\" | tr ' ' '\\n' | grep -E '^[0-9]+:' | cut -d: -f1); do\n\
               echo \"=== revoke $grant: $({revoke})\"\n\
             done\n\
             wait $sender || fail 'the 4 MiB did not go through'\n\
             echo \"=== grants after: $({grants})\"\n\
             for i in 1 2 3; do echo \"=== vcpus: $({vcpus})\"; sleep 2; done",
            revoke = api("revoke $grant"),
            grants = api("grants"),
            vcpus = api("vcpus"),
        ))
        .send("echo alive-$((1 + 1))")
        .wait_for("alive-2", SHELL_LIMIT)
        .wait_for("reads-2-done", READS_LIMIT)
        .wait_for("vsock1-sum=", SHELL_LIMIT)
        .send("poweroff -f")
        .finish(l1, END_LIMIT);
        assert_vmm_ended_with(status, 0, "poweroff must end the vmm with 0", &log);
        let value = |prefix: &str| word_after(&log, prefix).to_string();
        let revokes: Vec<&str> = log.lines().filter(|l| l.starts_with("=== revoke ")).collect();
        assert!(!revokes.is_empty(), "the inspector held grants to revoke:\n{log}");
        assert!(revokes.iter().all(|l| l.contains(": ok revoked=")), "every revoke succeeded:\n{log}");
        let disk_sum = value("=== l1-disk-sum=");
        for pass in 1..=PASSES {
            assert_eq!(value(&format!("pass{pass}-sum=")), disk_sum, "O_DIRECT pass {pass} reads the image:\n{log}");
        }
        assert_eq!(value("vsock1-sum="), value("=== l1-vsock-sum="), "the 4 MiB over vsock:\n{log}");
    });
}
