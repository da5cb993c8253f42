//! virtio-vsock of our `vmm` with Debian's own driver, in the nested test bed: L1
//! loads vhost-vsock, the vmm gives the guest a CID through it, and `socat` (L1's,
//! carried from this host, and the root disk's) talks AF_VSOCK on both sides.
//!
//! One test, one L1 command (tests/nested_virtio.rs says why): before the vmm starts,
//! the same command runs tests/virtio_vsock.rs (hostile queues against L1's real
//! vhost-vsock, from an in-process fake guest), which need /dev/vhost-vsock.

use std::time::Duration;

use integration_tests::nested::{
    assert_vmm_ended_with, debian_root_disk, debian_session, host_program, load_vhost_vsock,
    retry_on_the_nest_symptoms, word_after, NestedL1, L1_ROOTFS,
};

const SHELL_LIMIT: Duration = Duration::from_secs(300);
const TRANSFER_LIMIT: Duration = Duration::from_secs(300);
const END_LIMIT: Duration = Duration::from_secs(60);
/// The guest's context ID.
const CID: u32 = 42;
/// The tests of tests/virtio_vsock.rs.
const CARRIED_TESTS: usize = 7;
/// L1 connects to the guest's CID and gets the reply to its request; the guest
/// connects to the host (CID 2) and gets L1's; 4 MiB from L1 arrive in the guest with
/// L1's SHA-256. All of it after a pause and a resume of the VM through the vmm's API,
/// which stop vhost and start it again.
#[test]
fn nested_virtio_vsock_carries_requests_and_replies_both_ways_and_4_mib_intact() {
    retry_on_the_nest_symptoms(|| {
        let mut carried = debian_root_disk();
        carried.programs.push(host_program("socat"));
        let l1 = &NestedL1::boot_carrying(&["virtio_vsock"], &carried);
        let socat = host_program("socat");
        let socat = socat.display();
        let load_vhost = load_vhost_vsock();
        let tests = l1.test_binary("virtio_vsock");
        let (status, log) = debian_session(
            l1,
            "virtio-vsock",
            &format!("--disk path={L1_ROOTFS},readonly=on --vsock cid={CID} --api-socket api.sock"),
            "ro",
        )
        .before(&format!(
            "{load_vhost}\n\
             (cd /tmp && {tests} --include-ignored --test-threads=1 2>&1) || {{ echo '=== the virtio_vsock tests failed'; exit 1; }}\n\
             dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null || exit 1\n\
             echo \"=== l1-sum=$(sha256sum /tmp/blob | cut -d' ' -f1)\"\n\
             {socat} VSOCK-LISTEN:6000,reuseaddr SYSTEM:'read r; echo reply-from-l1-$r' &"
        ))
        .wait_for("specula-rootfs: Debian 12.", SHELL_LIMIT)
        // The guest's servers: a request/reply one, and a sink that hashes what comes.
        // socat splits SYSTEM's command at a colon: the replies join with a dash.
        .send("socat VSOCK-LISTEN:5000,reuseaddr SYSTEM:'read r; echo reply-from-guest-$r' &")
        .send("echo \"vsock$((1))-sum=$(socat -u VSOCK-LISTEN:5001,reuseaddr - | sha256sum | cut -c1-64)\" &")
        // Needles the typed lines themselves do not contain (the console echoes them).
        .send("sleep 2; echo servers-$((1 + 1))-up")
        .wait_for("servers-2-up", SHELL_LIMIT)
        .shell(&format!(
            "for command in pause resume; do\n\
               echo \"=== $command: $(echo $command | {socat} - UNIX-CONNECT:api.sock)\"; sleep 1\n\
             done\n\
             echo \"=== l1 got: $(echo request-$$ | {socat} -T 60 - VSOCK-CONNECT:{CID}:5000)\" \
             \"(sent request-$$)\"\n\
             {socat} -u -T 60 FILE:/tmp/blob VSOCK-CONNECT:{CID}:5001 || fail 'the 4 MiB did not go through'"
        ))
        .wait_for("vsock1-sum=", TRANSFER_LIMIT)
        .send("echo \"guest got $(echo hello-l1 | socat -T 60 - VSOCK-CONNECT:2:6000)\"")
        .wait_for("guest got reply-from-l1-hello-l1", SHELL_LIMIT)
        .send("poweroff -f")
        .finish(l1, END_LIMIT);
        assert_vmm_ended_with(status, 0, "poweroff must end the vmm with 0", &log);
        assert!(
            log.contains(&format!("test result: ok. {CARRIED_TESTS} passed")),
            "tests/virtio_vsock.rs passed in L1:\n{log}"
        );
        assert!(log.contains("=== pause: ok") && log.contains("=== resume: ok"), "the VM paused and resumed:\n{log}");
        let line =
            log.lines().find(|l| l.starts_with("=== l1 got: ")).unwrap_or_else(|| panic!("L1's request:\n{log}"));
        let sent = line.rsplit_once("(sent ").and_then(|(_, s)| s.strip_suffix(')')).expect("the request sent");
        assert!(
            line.starts_with(&format!("=== l1 got: reply-from-guest-{sent} ")),
            "L1's request to CID {CID} is answered by the guest:\n{log}"
        );
        let l1_sum = word_after(&log, "=== l1-sum=");
        assert!(log.contains(&format!("vsock1-sum={l1_sum}")), "the guest's SHA-256 of the 4 MiB is L1's:\n{log}");
        assert!(log.contains("guest got reply-from-l1-hello-l1"), "the guest reaches the host at CID 2:\n{log}");
    });
}
