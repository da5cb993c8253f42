//! The `vmm` binary on /dev/kvm: Specula's guests boot on 1 and several vCPUs,
//! their exit status becomes the vmm's, serial output is captured, bad input
//! fails clearly, and SIGTERM stops a running VM cleanly.

use std::process::{Command, Output};
use std::time::Duration;

use guest_images::{sha256, workload};
use integration_tests::{binary, guest, require_kvm, run_with_timeout, Running};

const LIMIT: Duration = Duration::from_secs(60);

fn vmm(args: &[&str]) -> Output {
    require_kvm();
    run_with_timeout(Command::new(binary("vmm")).args(args), LIMIT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn hello(extra: &[&str]) -> Output {
    let image = guest("hello");
    let mut args = vec!["--kernel", image.to_str().unwrap(), "--memory", "64M"];
    args.extend_from_slice(extra);
    vmm(&args)
}

#[test]
fn guest_exit_status_becomes_the_vmm_exit_code() {
    for status in [0, 42, 255] {
        let cmdline = format!("exit={status}");
        let out = hello(&["--cmdline", &cmdline]);
        assert_eq!(out.status.code(), Some(status), "stderr: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains(&format!("hello: exiting with status {status}")));
    }
}

#[test]
fn hello_sees_every_vcpu_in_ring_3() {
    for cpus in ["1", "2", "4"] {
        let out = hello(&["--cpus", cpus, "--cmdline", "exit=0"]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let expected = format!("{cpus} of {cpus} vCPUs in ring 3");
        assert!(text(&out.stdout).contains(&expected), "want {expected:?} in {}", text(&out.stdout));
    }
}

#[test]
fn guest_sees_the_command_line_and_ram_split_around_the_mmio_gap() {
    let out = hello(&["--memory", "5G", "--cmdline", "exit=3 marker=xyzzy"]);
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("hello: cmdline \"exit=3 marker=xyzzy\""), "{stdout}");
    // 5 GiB less the 385 KiB EBDA/BIOS hole below 1 MiB, in whole MiB.
    assert!(stdout.contains("5119 MiB RAM"), "{stdout}");
}

#[test]
fn serial_output_goes_to_a_file_when_asked() {
    let dir = std::env::temp_dir().join(format!("specula-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("com1.log");
    let serial = format!("file={}", file.display());
    let out = hello(&["--serial", &serial, "--cmdline", "exit=5"]);
    assert_eq!(out.status.code(), Some(5));
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(logged.contains("Hello from Specula guest"), "{logged}");
    assert!(!text(&out.stdout).contains("Hello"), "nothing on stdout when serial goes to a file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn i8042_reset_ends_the_vm_with_status_zero() {
    let out = hello(&["--cmdline", "exit=9 action=reset"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("reset"), "{}", text(&out.stderr));
}

#[test]
fn guest_crash_is_reported_with_its_own_exit_code() {
    let out = hello(&["--cmdline", "action=fault"]);
    assert_eq!(out.status.code(), Some(vmm::CRASH_EXIT_CODE));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("guest crashed") && stderr.contains("triple fault"), "{stderr}");
}

fn workload(cpus: &str) -> Output {
    let image = guest("source-workload");
    vmm(&["--kernel", image.to_str().unwrap(), "--memory", "64M", "--cpus", cpus, "--cmdline", "iterations=20000000"])
}

#[test]
fn source_workload_runs_and_verifies_its_text_on_one_vcpu() {
    let out = workload("1");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut expected_text = vec![0u8; workload::TEXT_LEN];
    workload::fill_text(&mut expected_text);
    let digest = sha256::hex(&sha256::digest(&expected_text));
    let digest = std::str::from_utf8(&digest).unwrap();
    assert!(stdout.contains(&format!("text sha256 {digest}")), "guest and host agree on the text digest: {stdout}");
    assert!(stdout.contains("done after 20000000 iterations, text digest ok"), "{stdout}");
}

#[test]
fn source_workload_uses_every_vcpu() {
    let out = workload("3");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for cpu in 1..3 {
        let line =
            stdout.lines().find(|l| l.contains(&format!("cpu{cpu} counted"))).unwrap_or_else(|| panic!("{stdout}"));
        let count: u64 = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count > 0, "vCPU {cpu} did work: {line}");
    }
}

#[test]
fn serial_input_drives_the_workload() {
    require_kvm();
    let image = guest("source-workload");
    let mut vm =
        Running::spawn(Command::new(binary("vmm")).args(["--kernel", image.to_str().unwrap(), "--memory", "64M"]));
    vm.expect_line("workload: ready", LIMIT);
    vm.send("text-modify 100\n");
    vm.expect_line("ack text-modify", LIMIT);
    vm.send("no-such-command\n");
    vm.expect_line("error no-such-command: unknown command", LIMIT);
    vm.send("exit 0\n");
    vm.expect_line("text digest MODIFIED", LIMIT);
    // The workload exits 1 when its text no longer matches, whatever status it was told.
    assert_eq!(vm.wait(LIMIT).code(), Some(1));
}

#[test]
fn the_vmm_builds_a_specula_guests_page_tables_and_they_map_all_of_its_ram() {
    require_kvm();
    let image = guest("source-workload");
    // 6 GiB: 3 GiB below the MMIO gap and 3 GiB from 4 GiB, so RAM ends at 7 GiB.
    let mut vm =
        Running::spawn(Command::new(binary("vmm")).args(["--kernel", image.to_str().unwrap(), "--memory", "6G"]));
    let ready = vm.expect_line("workload: ready", LIMIT);
    assert!(ready.ends_with("tables=loader"), "the boot stub was told the tables are built: {ready}");
    // The last MiB of RAM, in the highest GiB the tables map: a missing or wrong entry
    // there is a page fault in the guest, which has no handler for it.
    let top = (7u64 << 30) - (1 << 20);
    vm.send(&format!("fill {top:#x} 0x100000 5\n"));
    vm.expect_line("workload: filled", LIMIT);
    vm.expect_line("ack fill", LIMIT);
    vm.send("exit 0\n");
    assert_eq!(vm.wait(LIMIT).code(), Some(0));
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    require_kvm();
    let image = guest("source-workload");
    let mut vm = Running::spawn(Command::new(binary("vmm")).args([
        "--kernel",
        image.to_str().unwrap(),
        "--memory",
        "64M",
        "--cpus",
        "2",
    ]));
    vm.expect_line("workload: ready", LIMIT);
    let threads = std::fs::read_dir(format!("/proc/{}/task", vm.child.id())).unwrap().count();
    assert!(threads >= 3, "main thread plus two vCPU threads, saw {threads}");
    vm.signal(libc::SIGTERM);
    let status = vm.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "a requested stop exits 0, not by the signal");
}

fn assert_clear_error(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("vmm: error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "want {needle:?} in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one clear message: {stderr}");
}

fn scratch(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("specula-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn missing_kernel_file_is_a_clear_error() {
    let out = vmm(&["--kernel", "/nonexistent/kernel.elf"]);
    assert_clear_error(&out, &["cannot open kernel image /nonexistent/kernel.elf", "No such file"]);
}

#[test]
fn truncated_kernel_is_a_clear_error() {
    let image = std::fs::read(guest("hello")).unwrap();
    let path = scratch("truncated.elf", &image[..6000]);
    let out = vmm(&["--kernel", path.to_str().unwrap(), "--memory", "64M"]);
    assert_clear_error(&out, &["truncated or corrupt", "truncated.elf"]);
}

#[test]
fn corrupt_and_empty_kernels_are_clear_errors() {
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let path = scratch("garbage.bin", &garbage);
    assert_clear_error(&vmm(&["--kernel", path.to_str().unwrap()]), &["neither an ELF nor a bzImage"]);
    let mut bad_elf = std::fs::read(guest("hello")).unwrap();
    bad_elf[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes()); // e_phoff far past the end
    let path = scratch("bad-phoff.elf", &bad_elf);
    assert_clear_error(&vmm(&["--kernel", path.to_str().unwrap()]), &["truncated or corrupt"]);
    let path = scratch("empty.elf", b"");
    assert_clear_error(&vmm(&["--kernel", path.to_str().unwrap()]), &["is empty"]);
}

#[test]
fn too_little_memory_is_a_clear_error() {
    let image = guest("hello");
    let out = vmm(&["--kernel", image.to_str().unwrap(), "--memory", "2M"]);
    assert_clear_error(&out, &["does not fit in 2 MiB", "--memory"]);
}

#[test]
fn bad_arguments_are_clear_errors() {
    assert_clear_error(&vmm(&["--kernel"]), &["--kernel needs a value"]);
    assert_clear_error(&vmm(&["--frobnicate"]), &["unknown argument '--frobnicate'"]);
    assert_clear_error(&vmm(&["--kernel", "k", "--cpus", "many"]), &["invalid value 'many' for --cpus"]);
    assert_clear_error(&vmm(&[]), &["missing required argument --kernel"]);
    let image = guest("hello");
    assert_clear_error(&vmm(&["--kernel", image.to_str().unwrap(), "--cpus", "33"]), &["supports at most 32"]);
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    let image = guest("hello");
    let out = vmm(&["--kernel", image.to_str().unwrap(), "--kvm-device", "/nonexistent/kvm"]);
    assert_clear_error(&out, &["cannot open /nonexistent/kvm", "is KVM available"]);
}
