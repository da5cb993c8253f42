//! The kernel mirror device (`specula_mirror.ko`) against real processes and a real
//! KVM: these run inside the nested L1, where the module loads next to kvm-amd, as
//! root, through `nested_kernel_mirror_tests_pass_in_l1` (tests/nested.rs), which
//! loads both modules and runs this binary with `--include-ignored`. On the runner
//! itself no module can load, so here they are ignored, with that reason shown.
//!
//! A source is a forked child with a private anonymous mapping, driven over pipes; a
//! VMM source is our own `vmm --memory-backend anon`. The identity changes a source's
//! pages go through: in-place writes, `MADV_DONTNEED`, munmap and a new mapping, a KSM
//! merge and the write that breaks it, migration to another NUMA node, a THP collapse
//! and split, and swap-out to zram and back. The harness gives the L1 two NUMA nodes
//! and a zram swap device.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::anon_source::*;
use integration_tests::{binary, guest, wait_for_path, Running, TempDir};
use mirror_driver::kernel_mirror::{self, KernelMirror, KernelMirrorError, PidSource, BASELINE_DEVICE, DEVICE};

fn device(path: &str) -> KernelMirror {
    KernelMirror::open(Path::new(path)).unwrap_or_else(|e| panic!("{}", vmm::error_chain(&e)))
}

fn errno_of(e: &KernelMirrorError) -> Option<i32> {
    match e {
        KernelMirrorError::Attach { source, .. } | KernelMirrorError::Layout { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_reads_what_the_source_writes_and_never_a_page_it_let_go_where_pinning_goes_stale() {
    let mut source = Source::spawn();
    let pidfd = source.pidfd();
    let len = (PAGES * PAGE) as u64;
    let mirror_fd = device(DEVICE).attach(source.pid as u32, pidfd.as_fd(), source.addr, len).expect("attach");
    let mirror = View::map(&mirror_fd, len as usize);
    let pinned_fd = device(BASELINE_DEVICE).attach(source.pid as u32, pidfd.as_fd(), source.addr, len).expect("pin");
    let pinned = View::map(&pinned_fd, len as usize);
    for page in 0..PAGES {
        assert_eq!((mirror.byte(page), pinned.byte(page)), (0x10 + page as u8, 0x10 + page as u8), "page {page}");
    }

    // Coherence: a write in place (same page) is seen by both.
    for round in 0..50u8 {
        source.send(FILL, 3, 0x80 + round);
        assert_eq!(mirror.byte(3), 0x80 + round, "round {round}: a stale read through the mirror");
    }
    assert_eq!(pinned.byte(3), 0x80 + 49, "an in-place write lands in the pinned page too");

    // Identity change 1: MADV_DONTNEED frees the pages; the source now reads zeros.
    let before = kernel_mirror::info(mirror_fd.as_fd()).expect("info").invalidations;
    source.send(DONTNEED, 0, 0);
    for page in 0..PAGES {
        assert_eq!(mirror.byte(page), 0, "page {page} after MADV_DONTNEED: the mirror served a page the source let go");
    }
    assert!(kernel_mirror::info(mirror_fd.as_fd()).unwrap().invalidations > before, "the notifier fired");
    assert_eq!(pinned.byte(5), 0x15, "the pinning baseline keeps serving the page the source let go (stale)");

    // Identity change 2: munmap and a new mapping at the same address.
    source.send(REMAP, 0, 0xa5);
    for page in 0..PAGES {
        assert_eq!(mirror.byte(page), 0xa5, "page {page} after munmap + mmap at the same address");
    }
    assert_eq!(pinned.byte(5), 0x15, "the baseline still shows the first mapping's page");
    source.send(FILL, 7, 0x77);
    assert_eq!(mirror.byte(7), 0x77);

    // The module cannot be unloaded while a mapping is open.
    let rmmod = Command::new("rmmod").arg("specula_mirror").output().expect("run rmmod");
    assert!(!rmmod.status.success(), "rmmod must refuse while in use");
    assert!(Path::new(DEVICE).exists());

    // Source exit: the mirror says so and no crash follows.
    drop(source);
    let info = kernel_mirror::info(mirror_fd.as_fd()).expect("info after the source exited");
    assert_eq!(info.source_alive, 0, "{info:?}");
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_mapping_cannot_be_made_writable_by_any_path() {
    let mut source = Source::spawn();
    let pidfd = source.pidfd();
    let len = PAGES * PAGE;
    let fd = device(DEVICE).attach(source.pid as u32, pidfd.as_fd(), source.addr, len as u64).expect("attach");
    for (flags, what) in [(libc::MAP_SHARED, "MAP_SHARED"), (libc::MAP_PRIVATE, "MAP_PRIVATE (copy-on-write)")] {
        // SAFETY: an mmap attempt; a success is unmapped below.
        let at = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd.as_raw_fd(), 0)
        };
        if at != libc::MAP_FAILED {
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(at, len) };
            panic!("a writable {what} mapping of the mirror was allowed");
        }
    }
    let view = View::map(&fd, len);
    assert_eq!(view.byte(2), 0x12);
    // SAFETY: mprotect on our own mapping; it must fail.
    let r = unsafe { libc::mprotect(view.base as *mut libc::c_void, len, libc::PROT_READ | libc::PROT_WRITE) };
    assert_ne!(r, 0, "mprotect(PROT_WRITE) on the mirror was allowed");
    // /proc/self/mem writes use FOLL_FORCE, the path ptrace's POKE takes too.
    let mem = std::fs::OpenOptions::new().write(true).open("/proc/self/mem").expect("open /proc/self/mem");
    let wrote = std::os::unix::fs::FileExt::write_at(&mem, &[0xee; 8], view.base as u64 + 2 * PAGE as u64);
    assert!(wrote.is_err(), "a write through /proc/self/mem into the mirror was allowed");
    // SAFETY: pwrite attempt on an O_RDONLY fd.
    let w = unsafe { libc::pwrite(fd.as_raw_fd(), [0xeeu8; 8].as_ptr().cast(), 8, 0) };
    assert!(w < 0, "write(2) on the mirror fd was allowed");
    // The source's page is as it was: ask it to rewrite its neighbour and read both.
    source.send(FILL, 3, 0x33);
    assert_eq!((view.byte(2), view.byte(3)), (0x12, 0x33), "the source's memory changed");
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_refuses_hostile_arguments_and_leaves_nothing_attached() {
    let source = Source::spawn();
    let pidfd = source.pidfd();
    let pid = source.pid as u32;
    let dev = device(DEVICE);
    let len = (PAGES * PAGE) as u64;
    let cases: [(&str, u64, u64); 6] = [
        ("an unaligned start", source.addr + 1, len),
        ("a length over the 1 TiB cap", source.addr, (1 << 40) + 4096),
        ("an unaligned length", source.addr, len - 1),
        ("a zero length", source.addr, 0),
        ("a range that wraps the address space", !4095, 2 * 4096),
        ("a range beyond user space", 1 << 62, 4096),
    ];
    for (what, start, length) in cases {
        let e = dev.attach(pid, pidfd.as_fd(), start, length).expect_err(what);
        assert_eq!(errno_of(&e), Some(libc::EINVAL), "{what}: {e:?}");
    }
    let unmapped = dev.attach(pid, pidfd.as_fd(), source.addr + len, 1 << 30);
    assert!(unmapped.is_err(), "a range the source has not mapped");
    let not_a_pidfd = File::open("/dev/null").unwrap();
    let e = dev.attach(pid, not_a_pidfd.as_fd(), source.addr, len).expect_err("a non-pidfd");
    assert_eq!(errno_of(&e), Some(libc::EBADF), "{e:?}");
    let own = kernel_mirror::pidfd_open(std::process::id()).unwrap();
    assert!(dev.attach(std::process::id(), own.as_fd(), source.addr, len).is_err(), "attaching to oneself");

    // VM layout: a non-KVM fd, and a KVM VM fd that is not the source's.
    let e = dev.vm_layout(pid, pidfd.as_fd(), not_a_pidfd.as_fd()).expect_err("a non-KVM fd as the VM");
    assert!(matches!(e, KernelMirrorError::Layout { .. }), "{e:?}");
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").expect("/dev/kvm");
    // SAFETY: KVM_CREATE_VM returns a new VM fd.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
    assert!(vm >= 0);
    // SAFETY: the fresh VM fd.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    let e = dev.vm_layout(pid, pidfd.as_fd(), vm.as_fd()).expect_err("our VM, named as the source's");
    assert_eq!(errno_of(&e), Some(libc::EINVAL), "{e:?}");
}

/// Forks a child that drops to nobody and tries one attach of `start..+len` of `pid`,
/// through `device` (an fd root opened) or by opening the device itself; returns the
/// errno it met (0: the attach was allowed; 100+: the attempt could not be made).
fn attach_as_nobody(device: Option<&KernelMirror>, pid: u32, start: u64, len: u64) -> i32 {
    // SAFETY: the child only drops privileges, makes one attempt and _exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(100);
            }
        }
        let opened;
        let code = match device {
            Some(dev) => Ok(dev),
            None => {
                opened = KernelMirror::open(Path::new(DEVICE));
                opened.as_ref().map_err(|e| match e {
                    KernelMirrorError::OpenDevice { source, .. } => source.raw_os_error().unwrap_or(101),
                    _ => 102,
                })
            }
        }
        .and_then(|dev| {
            let pidfd = kernel_mirror::pidfd_open(pid).map_err(|_| 103)?;
            dev.attach(pid, pidfd.as_fd(), start, len).map(|_| 0).map_err(|e| errno_of(&e).unwrap_or(104))
        });
        // SAFETY: ends the child.
        unsafe { libc::_exit(code.unwrap_or_else(|errno| errno)) };
    }
    let mut status = 0;
    // SAFETY: reap our child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    libc::WEXITSTATUS(status)
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_refuses_a_caller_that_may_not_ptrace_the_source() {
    let source = Source::spawn();
    let (pid, start, len) = (source.pid as u32, source.addr, (PAGES * PAGE) as u64);
    // The device node is root's 0600: nobody is refused at open already.
    let code = attach_as_nobody(None, pid, start, len);
    assert!(code == libc::EACCES || code == libc::EPERM, "nobody's attach: errno {code} (0 means it was allowed)");
    // Through an fd root opened and handed over, the ptrace check still holds.
    let code = attach_as_nobody(Some(&device(DEVICE)), pid, start, len);
    assert_eq!(code, libc::EPERM, "nobody with root's device fd: errno {code} (0 means it was allowed)");
}

/// Puts the module's `require_cap_sys_ptrace` back to N when dropped.
struct CapPolicy;

const CAP_POLICY: &str = "/sys/module/specula_mirror/parameters/require_cap_sys_ptrace";

impl CapPolicy {
    fn require(on: bool) -> CapPolicy {
        write_sys(CAP_POLICY, if on { "Y" } else { "N" });
        CapPolicy
    }
}

impl Drop for CapPolicy {
    fn drop(&mut self) {
        let _ = std::fs::write(CAP_POLICY, "N");
    }
}

/// The stricter policy: with `require_cap_sys_ptrace=Y` a caller the ptrace check
/// allows (nobody, attaching to nobody's source) is refused for lacking
/// CAP_SYS_PTRACE, and root, which has it, is not; with N the same caller attaches.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_require_cap_sys_ptrace_refuses_a_caller_ptrace_would_allow() {
    const NOBODY: u32 = 65534;
    let source = Source::spawn_as(NOBODY);
    let (pid, start, len) = (source.pid as u32, source.addr, (PAGES * PAGE) as u64);
    let dev = device(DEVICE);
    let _policy = CapPolicy::require(false);
    assert_eq!(attach_as_nobody(Some(&dev), pid, start, len), 0, "by default ptrace's rule decides: nobody may");
    let _policy = CapPolicy::require(true);
    let code = attach_as_nobody(Some(&dev), pid, start, len);
    assert_eq!(code, libc::EPERM, "with the policy on, nobody lacks CAP_SYS_PTRACE: errno {code} (0: allowed)");
    let pidfd = source.pidfd();
    dev.attach(pid, pidfd.as_fd(), start, len).expect("root has CAP_SYS_PTRACE: allowed with the policy on");
}

/// Our own vmm running `source-workload` in 128 MiB of private anonymous RAM.
/// `inspector --pid PID --all`, its control socket at `control`, once its agent is ready.
fn inspector_by_pid(pid: u32, control: &Path) -> Running {
    let mut inspector = Running::spawn(Command::new(binary("inspector")).args([
        "--pid",
        &pid.to_string(),
        "--all",
        "--serial",
        "null",
        "--control-socket",
        control.to_str().unwrap(),
    ]));
    inspector.expect_line("inspector: agent ready", Duration::from_secs(120));
    wait_for_path(control, Duration::from_secs(10));
    inspector
}

/// [`anonymous_ram_vmm`] once its workload has hashed its text: the source and the
/// SHA-256 (hex) the guest printed.
fn anonymous_ram_vmm_with_text() -> (Running, String) {
    let mut source = anonymous_ram_vmm();
    let line = source.expect_line("workload: text sha256 ", Duration::from_secs(60));
    let sha = line.rsplit(' ').next().unwrap().to_string();
    (source, sha)
}

fn anonymous_ram_vmm() -> Running {
    Running::spawn(Command::new(binary("vmm")).args([
        "--kernel",
        guest("source-workload").to_str().unwrap(),
        "--memory",
        "128M",
        "--memory-backend",
        "anon",
    ]))
}

/// A source that exits while the agent scans its RAM: the device zaps the agent's
/// mapping under the scan, and the agent's next touch of it faults in the kernel
/// (EFAULT from KVM_RUN, not a page). The scan in flight fails by name, the inspector
/// says the source is gone, and its agent lives on to answer the next request.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_source_exiting_mid_scan_fails_the_scan_not_the_inspector() {
    let dir = TempDir::new("kernel-mirror-scan");
    let (mut source, _) = anonymous_ram_vmm_with_text();
    let control = dir.join("control.sock");
    let mut inspector = inspector_by_pid(source.child.id(), &control);
    // Whole-RAM scans back to back, so the exit lands inside one of them.
    let scanning = {
        let control = control.clone();
        std::thread::spawn(move || {
            let mut replies = Vec::new();
            loop {
                let reply = integration_tests::unix_request(&control, "scan 0 0x8000000 5350454355cafe");
                let done = !reply.starts_with("ok ");
                replies.push(reply);
                if done || replies.len() == 1000 {
                    return replies;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    source.signal(libc::SIGKILL);
    let _ = source.child.wait();
    let replies = scanning.join().unwrap();
    let last = replies.last().unwrap();
    assert!(
        last.starts_with("error ") && last.contains("the source exited and its memory went with it"),
        "after {} scans: {last}",
        replies.len()
    );
    // The agent met the gone memory inside the scan (EFAULT), not between two scans.
    inspector.expect_line("the agent reads zero pages there now", Duration::from_secs(30));
    inspector.expect_line("inspector: source gone", Duration::from_secs(30));
    let status = integration_tests::unix_request(&control, "status");
    assert!(status.contains("source=gone ") && status.contains(" grants=0 "), "the agent answers: {status}");
    let read = integration_tests::unix_request(&control, "read 0x100000 16");
    assert!(read.starts_with("error ") && read.contains("not granted"), "{read}");
}

/// The agent's write into its read-only window, for a source by pid: the memslot is
/// read-only, so the write exits to the inspector's VMM and lands nowhere. The agent
/// reads back the source's byte, and the source process's own memory (read through
/// /proc/PID/mem, as root) still holds it.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_agent_write_into_its_window_changes_nothing_in_the_source() {
    use guest_images::workload::TEXT_GPA;
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("kernel-mirror-write");
    let (source, _) = anonymous_ram_vmm_with_text();
    let pid = source.child.id();
    let slot = PidSource::attach(pid, Path::new(DEVICE))
        .unwrap()
        .memslots()
        .iter()
        .copied()
        .find(|s| s.guest_phys_addr <= TEXT_GPA && TEXT_GPA < s.guest_phys_addr + s.memory_size)
        .expect("a memslot holds the workload's text");
    let source_byte = || {
        let mut byte = [0u8];
        let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
        mem.read_exact_at(&mut byte, slot.userspace_addr + (TEXT_GPA - slot.guest_phys_addr)).unwrap();
        byte[0]
    };
    let before = source_byte();
    let control = dir.join("control.sock");
    let _inspector = inspector_by_pid(pid, &control);
    let written = before ^ 0xff;
    let reply = integration_tests::unix_request(&control, &format!("write-probe {TEXT_GPA:#x} {written:#x}"));
    assert_eq!(reply, format!("ok read-back={before:#04x}"), "the agent's write did not land in its window");
    assert_eq!(source_byte(), before, "nor in the source");
    let read = integration_tests::unix_request(&control, &format!("read {TEXT_GPA:#x} 1"));
    assert_eq!(read, format!("ok {before:02x}"), "and the window still shows the source's byte");
}

/// VM layout's caller-given capacity is bounded: over the device's cap of 4096 it is
/// refused before anything is read (EINVAL), short of the VM's memslots it reports the
/// count with ENOSPC (and writes no more than asked), and enough gets every slot: here
/// the one RAM slot of our vmm's 128 MiB anonymous guest.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_vm_layout_bounds_the_capacity_it_is_given() {
    let (source, _) = anonymous_ram_vmm_with_text();
    let pid = source.child.id();
    let dev = device(DEVICE);
    let pidfd = kernel_mirror::pidfd_open(pid).unwrap();
    let vm_fds = kernel_mirror::kvm_vm_fds(pid).unwrap();
    assert_eq!(vm_fds.len(), 1, "the vmm holds one KVM VM fd: {vm_fds:?}");
    let vm = kernel_mirror::pidfd_getfd(pid, pidfd.as_fd(), vm_fds[0]).unwrap();

    let e = dev.vm_layout_into(pid, pidfd.as_fd(), vm.as_fd(), 4097).expect_err("a capacity over 4096");
    assert_eq!(errno_of(&e), Some(libc::EINVAL), "{e:?}");
    let slots = dev.vm_layout_into(pid, pidfd.as_fd(), vm.as_fd(), 4096).expect("the full capacity");
    assert_eq!(slots.len(), 1, "{slots:#x?}");
    assert_eq!((slots[0].guest_phys_addr, slots[0].memory_size), (0, 128 << 20), "{slots:#x?}");
    let e = dev.vm_layout_into(pid, pidfd.as_fd(), vm.as_fd(), 0).expect_err("no room");
    assert!(matches!(e, KernelMirrorError::TooManyMemslots { count: 1, .. }), "{e:?}");
    assert_eq!(dev.vm_layout(pid, pidfd.as_fd(), vm.as_fd()).unwrap(), slots, "the inspector's own call agrees");
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_lets_the_inspector_attach_by_pid_to_a_vmm_with_anonymous_ram() {
    use guest_images::workload::{TEXT_GPA, TEXT_LEN};
    let dir = TempDir::new("kernel-mirror");
    let (mut source, expected) = anonymous_ram_vmm_with_text();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", source.child.id())).unwrap();
    assert!(!maps.contains("memfd:"), "the source's RAM must be anonymous, not memfd:\n{maps}");

    let control = dir.join("control.sock");
    let mut inspector = inspector_by_pid(source.child.id(), &control);
    let reply = integration_tests::unix_request(&control, &format!("hash {TEXT_GPA:#x} {TEXT_LEN:#x}"));
    assert!(reply.ends_with(&format!("sha256={expected}")), "the agent hashed {reply}; the guest says {expected}");
    let status = integration_tests::unix_request(&control, "status");
    assert!(status.contains("kernel-mirror"), "{status}");
    // The source exits: the inspector hears of it through the pidfd and says so.
    source.signal(libc::SIGKILL);
    let _ = source.child.wait();
    inspector.expect_line("inspector: source gone", Duration::from_secs(30));
    let status = integration_tests::unix_request(&control, "status");
    assert!(status.contains("source=gone "), "{status}");
    // Its memory is gone with it: its grants are released, reads there are refused
    // by name (not an agent fault on memory that no longer exists), and the agent lives on.
    let read = integration_tests::unix_request(&control, &format!("read {TEXT_GPA:#x} 16"));
    assert!(read.starts_with("error ") && read.contains("not granted"), "after the source exited: {read}");
    let status = integration_tests::unix_request(&control, "status");
    assert!(status.contains("source=gone ") && status.contains(" grants=0 "), "{status}");
}

/// Sets L1's THP mode for a test, and puts `never` back (what the nested runner set).
struct ThpMode;

impl ThpMode {
    const PATH: &'static str = "/sys/kernel/mm/transparent_hugepage/enabled";

    fn always() -> ThpMode {
        std::fs::write(Self::PATH, "always").expect("set THP to always");
        ThpMode
    }
}

impl Drop for ThpMode {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, "never");
    }
}

#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_refuses_by_name_a_thp_backed_source_that_this_kvm_cannot_map() {
    let _thp = ThpMode::always();
    let mut source = anonymous_ram_vmm();
    source.expect_line("workload: ready", Duration::from_secs(60));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", source.child.id())).unwrap();
    let huge: u64 = smaps
        .lines()
        .filter_map(|l| l.strip_prefix("AnonHugePages:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap())
        .sum();
    assert!(huge > 0, "with THP always, the source's RAM should hold huge pages; smaps says none");
    let out = integration_tests::run_with_timeout(
        Command::new(binary("inspector")).args(["--pid", &source.child.id().to_string(), "--all", "--serial", "null"]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the inspector attached to a THP-backed source its KVM cannot map: {stderr}");
    assert!(stderr.contains("transparent huge pages") && stderr.contains("split_huge_pages"), "{stderr}");
}

/// Polls `done` every 50 ms for up to `limit`; false if it never held.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

fn write_sys(path: &str, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("write {value} to {path}: {e}"));
}

fn read_sys(path: &str) -> u64 {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().parse().unwrap()
}

/// Attaches the mirror to all of `source` and maps it.
fn mirror_of(source: &Source) -> (OwnedFd, View) {
    let len = source.pages * PAGE;
    let fd = device(DEVICE).attach(source.pid as u32, source.pidfd().as_fd(), source.addr, len as u64).expect("attach");
    let view = View::map(&fd, len);
    (fd, view)
}

/// KSM merges the source's identical pages into one shared page (every merged page
/// changes identity), then a write breaks the share (a fresh copy): the mirror reads
/// the merged contents and then the write, never a page the source let go.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_follows_a_ksm_merge_and_the_write_that_breaks_it() {
    let mut source = Source::spawn_pages(PAGES, false);
    for page in 0..PAGES {
        source.send(FILL, page as u32, 0x42);
    }
    let (fd, mirror) = mirror_of(&source);
    assert!((0..PAGES).all(|p| mirror.byte(p) == 0x42));
    let before = kernel_mirror::info(fd.as_fd()).expect("info").invalidations;
    write_sys("/sys/kernel/mm/ksm/sleep_millisecs", "0");
    write_sys("/sys/kernel/mm/ksm/pages_to_scan", "10000");
    write_sys("/sys/kernel/mm/ksm/run", "1");
    source.send(MERGEABLE, 0, 0);
    let merging = format!("/proc/{}/ksm_merging_pages", source.pid);
    let merged = eventually(Duration::from_secs(120), || read_sys(&merging) >= PAGES as u64 - 1);
    write_sys("/sys/kernel/mm/ksm/run", "0");
    assert!(merged, "KSM merged {} of the source's {PAGES} identical pages", read_sys(&merging));
    assert!(kernel_mirror::info(fd.as_fd()).unwrap().invalidations > before, "the merge went unnoticed");
    for page in 0..PAGES {
        assert_eq!(mirror.byte(page), 0x42, "page {page}, merged");
    }
    // Copy-on-write breaks the share of the pages written: each gets a new page.
    for page in [0, 5, PAGES - 1] {
        source.send(FILL, page as u32, 0x50 + page as u8);
    }
    for page in 0..PAGES {
        let want = if [0, 5, PAGES - 1].contains(&page) { 0x50 + page as u8 } else { 0x42 };
        assert_eq!(mirror.byte(page), want, "page {page} after the write that broke the share");
    }
}

/// `move_pages` migrates the source's pages to the other NUMA node of a 2-node L1:
/// each page's contents are copied to a new page and the old one is freed.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_follows_pages_migrated_to_another_numa_node() {
    let mut source = Source::spawn();
    let (fd, mirror) = mirror_of(&source);
    // Every page mapped through the mirror before it moves.
    assert!((0..PAGES).all(|p| mirror.byte(p) == 0x10 + p as u8));
    let pages: Vec<*mut libc::c_void> = (0..PAGES).map(|p| (source.addr as usize + p * PAGE) as *mut _).collect();
    let nodes = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("node")).count());
    assert!(nodes.unwrap_or(0) >= 2, "this test needs a NUMA L1 with 2 nodes (NestedL1::boot_numa)");
    let from = pages_nodes(source.pid, &pages, None);
    let targets: Vec<i32> = from.iter().map(|&n| if n == 0 { 1 } else { 0 }).collect();
    let before = kernel_mirror::info(fd.as_fd()).expect("info").invalidations;
    assert_eq!(pages_nodes(source.pid, &pages, Some(&targets)), targets, "every page moved (from nodes {from:?})");
    assert!(kernel_mirror::info(fd.as_fd()).unwrap().invalidations > before, "the migration went unnoticed");
    for page in 0..PAGES {
        assert_eq!(mirror.byte(page), 0x10 + page as u8, "page {page} after migration");
    }
    source.send(FILL, 9, 0x99);
    assert_eq!(mirror.byte(9), 0x99, "a write after migration, read through the mirror");
}

/// The node of each of `pid`'s `pages` (`to`: None), or moves them to the nodes in
/// `to` first; returns what the node query says afterwards.
fn pages_nodes(pid: libc::pid_t, pages: &[*mut libc::c_void], to: Option<&[i32]>) -> Vec<i32> {
    if let Some(to) = to {
        let mut status = vec![-1i32; pages.len()];
        // SAFETY: moves `pid`'s own pages (we are root); status is filled per page.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                pid,
                pages.len(),
                pages.as_ptr(),
                to.as_ptr(),
                status.as_mut_ptr(),
                MPOL_MF_MOVE,
            )
        };
        // A positive count is the pages that could not be moved.
        assert!(r >= 0, "move_pages: {}", std::io::Error::last_os_error());
    }
    let mut status = vec![-1i32; pages.len()];
    // SAFETY: move_pages with no target nodes only reports each page's node.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid,
            pages.len(),
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    assert_eq!(r, 0, "move_pages (query): {}", std::io::Error::last_os_error());
    status
}

/// The pinning baseline (memflow's approach: pin at attach, `remap_pfn_range`) holds a
/// reference on every page it maps, so while it is attached the kernel cannot migrate
/// them, collapse them into a huge page or merge them (KSM): its reader never goes stale there because
/// the kernel's memory management stops (the benchmark's `blocked`). The kernel mirror
/// lets both happen and follows them (the two tests above and below); once the pin is
/// dropped, the same migration and collapse go through.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_pinning_baseline_blocks_migration_and_thp_collapse_where_the_mirror_follows() {
    let source = Source::spawn();
    let len = PAGES * PAGE;
    let pin = |source: &Source, len: usize| {
        let fd = device(BASELINE_DEVICE).attach(source.pid as u32, source.pidfd().as_fd(), source.addr, len as u64);
        let fd = fd.expect("pin");
        let view = View::map(&fd, len);
        (fd, view)
    };
    let pinned = pin(&source, len);
    assert!((0..PAGES).all(|p| pinned.1.byte(p) == 0x10 + p as u8));
    let pages: Vec<*mut libc::c_void> = (0..PAGES).map(|p| (source.addr as usize + p * PAGE) as *mut _).collect();
    let from = pages_nodes(source.pid, &pages, None);
    let to: Vec<i32> = from.iter().map(|&n| i32::from(n == 0)).collect();
    assert_eq!(pages_nodes(source.pid, &pages, Some(&to)), from, "pinned pages stay where they were");
    drop(pinned);
    assert_eq!(pages_nodes(source.pid, &pages, Some(&to)), to, "unpinned, the same pages move");

    let mut source = Source::spawn_pages(HUGE_PAGES, true);
    source.send(FILL_ALL, 0, 0x01);
    let pinned = pin(&source, HUGE_PAGES * PAGE);
    assert_eq!(pinned.1.byte(3), 0x04);
    source.send_nowait(COLLAPSE, 0, 0);
    assert!(!source.ack() && source.huge_kb() == 0, "MADV_COLLAPSE fails while the baseline pins the pages");
    drop(pinned);
    source.send(COLLAPSE, 0, 0);
    assert_eq!(source.huge_kb(), 2048, "unpinned, the same range collapses");

    // KSM skips a page with references beyond its mappings: none of the identical
    // pinned pages merges while KSM runs flat out.
    let mut source = Source::spawn_pages(PAGES, false);
    for page in 0..PAGES {
        source.send(FILL, page as u32, 0x42);
    }
    let pinned = pin(&source, len);
    write_sys("/sys/kernel/mm/ksm/sleep_millisecs", "0");
    write_sys("/sys/kernel/mm/ksm/pages_to_scan", "10000");
    write_sys("/sys/kernel/mm/ksm/run", "1");
    source.send(MERGEABLE, 0, 0);
    let merging = format!("/proc/{}/ksm_merging_pages", source.pid);
    let merged_while_pinned = eventually(Duration::from_secs(10), || read_sys(&merging) > 0);
    drop(pinned);
    let merged = eventually(Duration::from_secs(120), || read_sys(&merging) >= PAGES as u64 - 1);
    write_sys("/sys/kernel/mm/ksm/run", "0");
    assert!(!merged_while_pinned, "KSM merged {} pinned pages", read_sys(&merging));
    assert!(merged, "unpinned, KSM merged only {} of {PAGES}", read_sys(&merging));
}

/// `MADV_COLLAPSE` copies 512 small pages into one transparent huge page and frees
/// them; a `MADV_DONTNEED` of one page then splits its mapping. The mirror follows
/// both, through writes that land in the new pages.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_follows_a_thp_collapse_and_split() {
    let mut source = Source::spawn_pages(HUGE_PAGES, true);
    source.send(FILL_ALL, 0, 0x01);
    let (fd, mirror) = mirror_of(&source);
    let want = |page: usize| 0x01u8.wrapping_add(page as u8);
    assert!((0..HUGE_PAGES).all(|p| mirror.byte(p) == want(p)), "the small pages, through the mirror");
    assert_eq!(source.huge_kb(), 0, "small pages before the collapse");
    let before = kernel_mirror::info(fd.as_fd()).expect("info").invalidations;
    source.send(COLLAPSE, 0, 0);
    assert_eq!(source.huge_kb(), 2048, "MADV_COLLAPSE made one huge page");
    assert!(kernel_mirror::info(fd.as_fd()).unwrap().invalidations > before, "the collapse went unnoticed");
    for page in (0..HUGE_PAGES).step_by(37) {
        assert_eq!(mirror.byte(page), want(page), "page {page} of the huge page");
    }
    source.send(FILL, 100, 0xc1);
    assert_eq!(mirror.byte(100), 0xc1, "a write into the huge page, read through the mirror");

    // Split: dropping one page of the huge page splits its mapping.
    source.send(DONTNEED_PAGE, 7, 0);
    assert_eq!(source.huge_kb(), 0, "the huge page's mapping was split");
    assert_eq!(mirror.byte(7), 0, "the dropped page reads as zeros");
    source.send(FILL, 200, 0xc2);
    assert_eq!((mirror.byte(200), mirror.byte(100), mirror.byte(300)), (0xc2, 0xc1, want(300)), "after the split");
}

/// `MADV_PAGEOUT` sends the source's pages to swap (zram in the L1); the mirror faults
/// them back in when read, and sees the source's writes to the pages it swapped in.
#[test]
#[ignore = "kernel_mirror: needs specula_mirror.ko loaded; runs in the nested L1 (nested_kernel_mirror_tests_pass_in_l1)"]
fn kernel_mirror_reads_pages_through_swap_out_and_back() {
    let swaps = std::fs::read_to_string("/proc/swaps").expect("/proc/swaps");
    assert!(swaps.lines().count() > 1, "this test needs swap on (the nested harness sets up zram): {swaps}");
    let mut source = Source::spawn();
    let (fd, mirror) = mirror_of(&source);
    // Every page mapped through the mirror before it goes out.
    assert!((0..PAGES).all(|p| mirror.byte(p) == 0x10 + p as u8));
    let before = kernel_mirror::info(fd.as_fd()).expect("info").invalidations;
    source.send(PAGEOUT, 0, 0);
    assert_eq!(source.status_kb("VmSwap"), (PAGES * PAGE / 1024) as u64, "every page went to swap");
    assert!(kernel_mirror::info(fd.as_fd()).unwrap().invalidations > before, "the page-out went unnoticed");
    // Pages the source writes come back in new pages; the others are read from swap
    // by the mirror's own fault.
    source.send(FILL, 3, 0x33);
    source.send(FILL, 11, 0xbb);
    for page in 0..PAGES {
        let want = match page {
            3 => 0x33,
            11 => 0xbb,
            p => 0x10 + p as u8,
        };
        assert_eq!(mirror.byte(page), want, "page {page} after swap-out and back");
    }
}
