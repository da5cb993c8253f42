//! Boots Debian's cloud kernels (built by guest-images/linux/build.sh: Debian 12's
//! Linux 6.1, lz4, in `guest-images/linux`; Debian 13's Linux 6.12, zstd, in
//! `guest-images/linux-trixie`) with the `vmm` and checks their early lines on COM1:
//! the banner naming the version we built, our command line echoed, the e820 map we
//! gave it, the RAMDISK line where we loaded the initramfs, and that Linux found both
//! vCPUs in our MADT.
//!
//! By default the `vmm` decompresses the bzImage's payload itself and enters the
//! uncompressed kernel. On PVM hosts (this project's CI) guest kernel code runs under
//! KVM's instruction emulator: the kernel's own decompressor would take ~50 s there
//! (6.1) or die at once on BMI2's `shlx` (6.12's zstd), while the lines below then
//! come within seconds; Linux later stops at FPU init (`xrstor`, which the emulator
//! lacks). On hosts with VMX/SVM the tests also wait for the initramfs to report that
//! it reached userspace.
//!
//! What remains on PVM (measured ~30 s to the RAMDISK line for 6.1 and ~55 s for 6.12,
//! against minutes or a crash before) is the kernel's own early work under the emulator,
//! mostly before its first line reaches the console (RIP samples sit in its generic
//! `sort()` and the compare/swap callbacks); QEMU entering the same vmlinux through PVH
//! takes as long.
//!
//! The in-guest decompressor path (`--kernel-decompress guest`) is covered by
//! `the_guest_decompressor_path_runs_the_kernels_own_decompressor`, which needs
//! seconds: on PVM, 6.12's decompressor stops at once on `shlx`, and the test checks
//! that the vCPU died there, inside the compressed kernel's own buffer; on hosts with
//! VMX/SVM it boots to the same early lines. A full boot of 6.1 through its own
//! decompressor on PVM (about 50 s of decompression, then the same early boot; over
//! 2 minutes while other tests share the CPUs) is left to the boot benchmark
//! (`cargo bench -p integration-tests --bench boot`), as too slow for CI.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::linux_guest::{DEBIAN_12, DEBIAN_13};
use integration_tests::{binary, require_kvm, run_with_timeout, target_profile_dir, Running};

/// Generous: the lines come within seconds when the vmm decompresses, and after about a
/// minute when the guest does (PVM emulates ~3.6 M guest-kernel instructions per
/// second). Not a timing test: this only bounds a hang.
const EARLY_BOOT_LIMIT: Duration = Duration::from_secs(540);
const MEMORY_MIB: u64 = 512;

fn linux_image(dir: &str, name: &str) -> PathBuf {
    let path = target_profile_dir().parent().expect("target dir").join("guest-images").join(dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the Linux guests with scripts/build.sh (guest-images/linux/build.sh; \
         README.md's test command does)",
        path.display()
    );
    path
}

fn host_has_hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    !pvm && cpuinfo.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
}

/// Boots the kernel in `guest-images/<dir>` (`decompress`: the `--kernel-decompress`
/// value) and checks its early-boot lines; returns how long the RAMDISK line took.
fn boot_and_check_early_lines(dir: &str, decompress: &str) -> Duration {
    require_kvm();
    let kernel = linux_image(dir, "vmlinuz");
    let initramfs = linux_image(dir, "initramfs.cpio.gz");
    let initramfs_size = std::fs::metadata(&initramfs).unwrap().len();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 specula.test=early-boot";
    let memory = format!("{MEMORY_MIB}M");
    let start = Instant::now();
    let mut vm = Running::spawn(Command::new(binary("vmm")).args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--kernel-decompress",
        decompress,
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
    let version = std::fs::read_to_string(linux_image(dir, "kernel-version")).unwrap();
    assert!(banner.contains(version.trim()), "banner names the kernel we built ({}): {banner}", version.trim());
    vm.expect_line(&format!("Command line: {cmdline}"), EARLY_BOOT_LIMIT);
    vm.expect_line("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable", EARLY_BOOT_LIMIT);
    vm.expect_line("BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved", EARLY_BOOT_LIMIT);
    let ram_end = (MEMORY_MIB << 20) - 1;
    vm.expect_line(&format!("BIOS-e820: [mem 0x0000000000100000-{ram_end:#018x}] usable"), EARLY_BOOT_LIMIT);

    // The vmm loads the initramfs page-aligned at the top of low RAM.
    let start_gpa = ((MEMORY_MIB << 20) - initramfs_size) & !0xfff;
    let end_gpa = start_gpa + ((initramfs_size + 0xfff) & !0xfff) - 1;
    vm.expect_line(&format!("RAMDISK: [mem {start_gpa:#010x}-{end_gpa:#010x}]"), EARLY_BOOT_LIMIT);
    let to_ramdisk = start.elapsed();
    // Debian's cloud kernel has no MP-table parser: it finds the vCPUs in our ACPI MADT.
    vm.expect_line("ACPI: Using ACPI (MADT) for SMP configuration information", EARLY_BOOT_LIMIT);
    // 6.1: "smpboot: Allowing 2 CPUs, 0 hotplug CPUs"; 6.12: "CPU topo: Allowing 2 present
    // CPUs plus 0 hotplug CPUs".
    let cpus = vm.expect_line("Allowing 2 ", EARLY_BOOT_LIMIT);
    assert!(cpus.contains(" 0 hotplug CPUs"), "both vCPUs, no hotplug ones: {cpus}");

    if host_has_hardware_virtualization() {
        vm.expect_line("specula-initramfs: reached userspace", EARLY_BOOT_LIMIT);
    }
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait(Duration::from_secs(30)).code(), Some(0), "SIGTERM stops the Linux VM cleanly");
    eprintln!("{dir} (--kernel-decompress {decompress}): RAMDISK line after {to_ramdisk:.2?}");
    to_ramdisk
}

#[test]
fn debian_6_1_prints_its_early_boot_lines_on_com1() {
    boot_and_check_early_lines(DEBIAN_12, "vmm");
}

#[test]
fn debian_6_12_prints_its_early_boot_lines_on_com1() {
    boot_and_check_early_lines(DEBIAN_13, "vmm");
}

#[test]
fn the_guest_decompressor_path_runs_the_kernels_own_decompressor() {
    if host_has_hardware_virtualization() {
        boot_and_check_early_lines(DEBIAN_13, "guest");
        return;
    }
    require_kvm();
    let kernel = linux_image(DEBIAN_13, "vmlinuz");
    let out = run_with_timeout(
        Command::new(binary("vmm")).args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--kernel-decompress",
            "guest",
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0",
        ]),
        EARLY_BOOT_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "the guest crashes in its decompressor: {stderr}");
    assert!(stderr.contains("instruction emulation failed"), "{stderr}");
    // The decompressor runs from the buffer the setup header asks for: [pref_address,
    // pref_address + init_size).
    let image = std::fs::read(&kernel).unwrap();
    let le = |at: usize, n: usize| image[at..at + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    let (pref_address, init_size) = (le(0x258, 8), le(0x260, 4));
    let rip = stderr.split("at RIP ").nth(1).and_then(|r| r.split_whitespace().next()).expect("RIP in the error");
    let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16).expect("hex RIP");
    assert!(
        (pref_address..pref_address + init_size).contains(&rip),
        "RIP {rip:#x} is in the compressed kernel's buffer {pref_address:#x}+{init_size:#x}: {stderr}"
    );
}
