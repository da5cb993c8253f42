//! Boots Debian's cloud kernel (built by guest-images/linux/build.sh) with the
//! `vmm` and checks its early lines on COM1: the banner, our command line
//! echoed, the e820 map we gave it, and the RAMDISK line where we loaded the
//! initramfs, and that Linux found both vCPUs. On PVM hosts (this project's CI) guest kernel code runs under
//! KVM's instruction emulator, so reaching these lines takes one to three
//! minutes and Linux later stops at FPU init; on hosts with VMX/SVM the test
//! also waits for the initramfs to report that it reached userspace.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::{binary, require_kvm, target_profile_dir, Running};

/// PVM emulates ~3.6 M guest-kernel instructions per second; the lines come after ~2 minutes.
const EARLY_BOOT_LIMIT: Duration = Duration::from_secs(540);
const MEMORY_MIB: u64 = 512;

fn linux_image(name: &str) -> PathBuf {
    let path = target_profile_dir().parent().expect("target dir").join("guest-images/linux").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the Linux guest with guest-images/linux/build.sh (README.md's test command does)",
        path.display()
    );
    path
}

fn host_has_hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    !pvm && cpuinfo.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
}

#[test]
fn linux_prints_its_early_boot_lines_on_com1() {
    require_kvm();
    let kernel = linux_image("vmlinuz");
    let initramfs = linux_image("initramfs.cpio.gz");
    let initramfs_size = std::fs::metadata(&initramfs).unwrap().len();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 specula.test=early-boot";
    let memory = format!("{MEMORY_MIB}M");
    let mut vm = Running::spawn(Command::new(binary("vmm")).args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--memory",
        &memory,
        "--cpus",
        "2",
        "--cmdline",
        cmdline,
    ]));

    let banner = vm.expect_line("Linux version ", EARLY_BOOT_LIMIT);
    let version = std::fs::read_to_string(linux_image("kernel-version")).unwrap();
    assert!(banner.contains(version.trim()), "banner names the kernel we built: {banner}");
    vm.expect_line(&format!("Command line: {cmdline}"), EARLY_BOOT_LIMIT);
    vm.expect_line("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable", EARLY_BOOT_LIMIT);
    vm.expect_line("BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved", EARLY_BOOT_LIMIT);
    let ram_end = (MEMORY_MIB << 20) - 1;
    vm.expect_line(&format!("BIOS-e820: [mem 0x0000000000100000-{ram_end:#018x}] usable"), EARLY_BOOT_LIMIT);

    // The vmm loads the initramfs page-aligned at the top of low RAM.
    let start = ((MEMORY_MIB << 20) - initramfs_size) & !0xfff;
    let end = start + ((initramfs_size + 0xfff) & !0xfff) - 1;
    vm.expect_line(&format!("RAMDISK: [mem {start:#010x}-{end:#010x}]"), EARLY_BOOT_LIMIT);
    // Debian's cloud kernel has no MP-table parser: it finds the vCPUs in our ACPI MADT.
    vm.expect_line("ACPI: Using ACPI (MADT) for SMP configuration information", EARLY_BOOT_LIMIT);
    vm.expect_line("smpboot: Allowing 2 CPUs, 0 hotplug CPUs", EARLY_BOOT_LIMIT);

    if host_has_hardware_virtualization() {
        vm.expect_line("specula-initramfs: reached userspace", EARLY_BOOT_LIMIT);
    }
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait(Duration::from_secs(30)).code(), Some(0), "SIGTERM stops the Linux VM cleanly");
}
