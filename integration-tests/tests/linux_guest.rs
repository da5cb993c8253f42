//! The live Linux guest fixture (`integration_tests::linux_guest`) checked
//! against reality: its ground truth lists the workload it started, the guest's
//! own /proc agrees over the serial console, and its RAM is a memfd that a root
//! process opens read-only, maps and finds the markers in, live.
//!
//! Needs qemu-system-x86_64 (scripts/install-deps.sh) and
//! target/guest-images/linux/{vmlinuz,introspect.cpio.gz} (guest-images/linux/build.sh).

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use integration_tests::linux_guest::{linux_image, LinuxGuest, LinuxGuestConfig, Machine, MEMFD_LINK_PREFIX};

const CONSOLE: Duration = Duration::from_secs(30);

#[test]
fn ground_truth_lists_the_workload() {
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    eprintln!("shared guest: ground truth after {:?}", guest.boot_time());

    let release = std::fs::read_to_string(linux_image("kernel-version")).unwrap();
    assert_eq!(truth.kernel_release, release.trim());

    for (comm, tag, uid, user) in
        [("specula-workerA", "alpha", 0, "root"), ("specula-workerB", "bravo", 1000, "specula")]
    {
        let process = truth.process(comm).unwrap_or_else(|| panic!("no {comm} in:\n{}", truth.raw));
        assert_eq!(
            process.args,
            format!("specula-marker --name {comm} --tag {tag}{}", if uid != 0 { " --uid 1000" } else { "" })
        );
        assert_eq!((process.ppid, process.user.as_str()), (1, user));
        let marker = truth.marker(comm).unwrap_or_else(|| panic!("no marker for {comm} in:\n{}", truth.raw));
        assert_eq!((marker.pid, marker.uid), (process.pid, uid));
        assert_eq!(marker.text, format!("SPECULA-MARKER-{}-{}", marker.pid, &marker.text[marker.text.len() - 16..]));
        assert!(marker.vaddr > 0 && marker.vaddr < 0x8000_0000_0000, "user-space address: {marker:?}");
    }
    for args in ["sleep 1000000", "sleep 2000000"] {
        assert!(truth.processes.iter().any(|p| p.comm == "sleep" && p.args == args), "no `{args}` in:\n{}", truth.raw);
    }
    assert!(truth.process("kthreadd").is_some_and(|p| p.pid == 2 && p.args == "[kthreadd]"));
    let dummy = truth.module("dummy").unwrap_or_else(|| panic!("no dummy module in:\n{}", truth.raw));
    assert_eq!((dummy.state.as_str(), dummy.refcount), ("Live", 0));
    assert!(dummy.size > 0 && dummy.address.is_some_and(|a| a >= 0xffff_ffff_c000_0000), "{dummy:?}");
}

#[test]
fn the_console_agrees_with_the_ground_truth() {
    let guest = LinuxGuest::shared();
    let truth = guest.ground_truth();
    for marker in &truth.markers {
        let cmdline = guest.console(&format!("cat /proc/{}/cmdline", marker.pid), CONSOLE);
        let args = cmdline.trim_end_matches('\0').replace('\0', " ");
        assert_eq!(args, truth.process_by_pid(marker.pid).unwrap().args);
        assert_eq!(guest.console(&format!("cat /proc/{}/comm", marker.pid), CONSOLE), format!("{}\n", marker.comm));
    }
    assert_eq!(guest.console("uname -r", CONSOLE).trim(), truth.kernel_release);
    assert_eq!(guest.console("grep '^dummy ' /proc/modules | cut -d' ' -f1,2", CONSOLE).trim(), "dummy 16384");
    // Exit status, stderr folded into the output, multi-line commands, and output without a final newline.
    assert_eq!(guest.console_status("echo out; echo err >&2; false", CONSOLE), (1, "out\nerr\n".to_string()));
    assert_eq!(guest.console("for i in 1 2; do\n  printf $i\ndone", CONSOLE), "12");
}

#[test]
fn guest_ram_is_a_memfd_a_root_process_maps_read_only() {
    let guest = LinuxGuest::shared();
    let fds = guest.ram_memfds();
    assert_eq!(fds.len(), 1, "one memory backend");
    let link = std::fs::read_link(&fds[0]).unwrap();
    assert_eq!(link.to_str().unwrap(), format!("{MEMFD_LINK_PREFIX} (deleted)"));

    let ram = &guest.map_ram()[0];
    assert_eq!(ram.len(), 512 << 20, "the memfd is all of guest RAM");
    // The fd is O_RDONLY: a writable shared mapping of it is refused.
    let file = std::fs::File::open(&fds[0]).unwrap();
    // SAFETY: mmap that must fail; unmapped if it does not.
    let writable =
        unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    assert_eq!(writable, libc::MAP_FAILED, "a PROT_WRITE mapping of an O_RDONLY fd");

    for marker in &guest.ground_truth().markers {
        let hits = ram.find_all(marker.text.as_bytes());
        // The text is also in the console's buffers and /tmp/marker-*; its heap copy is at
        // the same offset within a page as the process's vaddr (memfd offset = GPA here).
        assert!(
            hits.iter().any(|&at| at as u64 & 0xfff == marker.vaddr & 0xfff),
            "{} not found at page offset {:#x} of guest RAM; hits at {hits:x?}",
            marker.text,
            marker.vaddr & 0xfff
        );
    }
}

#[test]
fn the_mapping_is_live() {
    let guest = LinuxGuest::shared();
    let ram = &guest.map_ram()[0];
    let mut random = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut random).unwrap();
    let nonce = format!("{:016x}", u64::from_ne_bytes(random));
    let text = format!("SPECULA-LIVE-{nonce}");
    assert_eq!(ram.find(text.as_bytes()), None);
    // printf joins the words in the guest, so the text itself is only in the file's page cache
    // (and printf's buffer), never in the console's input.
    guest.console(&format!("printf '%s-%s' SPECULA-LIVE {nonce} > /tmp/live"), CONSOLE);
    assert!(ram.find(text.as_bytes()).is_some(), "a write after mapping shows through the mapping");
    guest.console("rm /tmp/live", CONSOLE);
}

#[test]
fn a_private_numa_q35_guest_has_two_memfds_and_dies_on_drop() {
    let config = LinuxGuestConfig { memory_backends: 2, machine: Machine::Q35, ..Default::default() };
    let guest = LinuxGuest::start(config);
    eprintln!("private 2-node q35 guest: ground truth after {:?}", guest.boot_time());
    let pid = guest.pid();
    let ram = guest.map_ram();
    assert_eq!(ram.iter().map(|m| m.len()).collect::<Vec<_>>(), [256 << 20, 256 << 20]);
    assert_eq!(guest.console("ls /sys/devices/system/node | grep node", CONSOLE), "node0\nnode1\n");
    let memdevs = guest.qmp(r#"{"execute":"query-memdev"}"#);
    assert!(memdevs.contains("\"id\": \"m0\"") && memdevs.contains("\"id\": \"m1\""), "{memdevs}");
    assert!(guest.qmp(r#"{"execute":"query-status"}"#).contains("\"running\""));
    for marker in &guest.ground_truth().markers {
        assert!(ram.iter().any(|m| m.find(marker.text.as_bytes()).is_some()), "{} not in guest RAM", marker.text);
    }
    drop(ram);
    drop(guest);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} outlived its LinuxGuest");
}
