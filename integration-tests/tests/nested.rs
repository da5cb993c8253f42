//! The hardware path, in the nested test bed (`integration_tests::nested`): an L1
//! Linux under QEMU's emulated SVM with nested paging loads kvm-amd, and the `vmm`
//! runs there on a /dev/kvm with two-dimensional paging, where guest kernel code
//! is not emulated instruction by instruction as on this runner's own PVM.
//!
//! - Debian's 6.1 and 6.12 cloud kernels boot through the `vmm` to the initramfs
//!   shell with 1 and 2 vCPUs; the test types commands on the serial console and
//!   reads their answers; `poweroff`, `reboot` and `panic=-1` end the `vmm` with
//!   its documented status.
//! - The mirror core's own end-to-end tests run again on NPT (the `mirror` and
//!   `mirror_security` test binaries, carried into L1).
//!
//! One L1 serves every test here. They take turns ([`turn`]): L1's two vCPUs are
//! TCG threads on a two-core runner, and a Linux L2 keeps one of them busy.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use integration_tests::nested::{linux_dir, ConsoleSession, NestedL1, L1_TARGET};

/// Linux under the vmm reaches its shell in ~10-20 s of TCG time; this bounds a hang
/// on a loaded runner, it is not a timing test.
const SHELL_LIMIT: Duration = Duration::from_secs(300);
/// How long a poweroff, reboot or panic may take to end the vmm.
const END_LIMIT: Duration = Duration::from_secs(60);
/// kill(2): what the test rootkit redirects.
const SYSCALL_KILL: u32 = 62;

/// The workspace test binaries whose mirror-core tests run again in L1.
const CARRIED_TESTS: &[&str] = &["mirror", "mirror_security", "kernel_mirror"];

/// A fresh L1 for one test (docs/nested.md says why not one per binary).
fn l1() -> NestedL1 {
    NestedL1::boot(CARRIED_TESTS)
}

/// Held for a test's whole run, so that the tests of this binary use L1 one at a time.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A console session on Debian's kernel from `guest-images/<dir>` under the vmm in
/// L1, with its plain initramfs (whose /init prints a line and runs a shell).
fn linux_session(l1: &NestedL1, name: &str, dir: &str, cpus: u32, cmdline_extra: &str) -> ConsoleSession {
    let args = format!(
        "--kernel {} --initramfs {} --memory 256M --cpus {cpus} --cmdline \"console=ttyS0 quiet {cmdline_extra}\"",
        l1.linux_image(dir, "vmlinuz"),
        l1.linux_image(dir, "initramfs.cpio.gz"),
    );
    ConsoleSession::new(l1, name, &args)
}

fn kernel_version(dir: &str) -> String {
    std::fs::read_to_string(linux_dir(dir).join("kernel-version")).expect("kernel-version").trim().to_string()
}

/// Boots to the shell, checks the version and vCPU count through the console, runs a
/// command typed on the console, and powers off: the vmm must exit 0, saying so.
fn reaches_the_shell_answers_and_powers_off(dir: &str, cpus: u32) {
    let l1 = &l1();
    let version = kernel_version(dir);
    let (status, log) = linux_session(l1, &format!("{dir}-{cpus}-poweroff"), dir, cpus, "panic=-1")
        .wait_for(&format!("specula-initramfs: reached userspace on {version}"), SHELL_LIMIT)
        // Computed in the guest, so the echo of what we typed cannot satisfy the wait.
        .send("echo \"answer=$((6 * 7)) cpus=$(grep -c ^processor /proc/cpuinfo) kernel=$(uname -r)\"")
        .wait_for(&format!("answer=42 cpus={cpus} kernel={version}"), SHELL_LIMIT)
        .send("poweroff -f")
        .finish(l1, END_LIMIT);
    assert_eq!(status, 0, "poweroff must end the vmm with 0:\n{log}");
    assert!(log.contains("vmm: guest powered off"), "{log}");
}

#[test]
fn nested_l1_has_kvm_with_nested_paging_and_the_vmm_boots_hello_there() {
    let _turn = turn();
    let l1 = &l1();
    assert_eq!(l1.npt, "Y", "kvm_amd in L1 must run with nested paging");
    let out = l1.run(
        &format!("{} --kernel {} --memory 64M --cpus 2 --cmdline exit=7", l1.binary("vmm"), l1.guest("hello")),
        END_LIMIT,
    );
    assert_eq!(out.status, 7, "hello's exit status passes through the vmm:\n{}", out.output);
    assert!(out.output.contains("hello: exiting with status 7"), "{}", out.output);
}

#[test]
fn nested_linux_6_1_with_2_vcpus_reaches_its_shell_answers_a_console_command_and_powers_off_with_0() {
    let _turn = turn();
    reaches_the_shell_answers_and_powers_off("linux", 2);
}

#[test]
fn nested_linux_6_12_with_2_vcpus_reaches_its_shell_answers_a_console_command_and_powers_off_with_0() {
    let _turn = turn();
    reaches_the_shell_answers_and_powers_off("linux-trixie", 2);
}

#[test]
fn nested_linux_6_1_with_1_vcpu_reboots_and_the_vmm_ends_as_a_reset() {
    let _turn = turn();
    let l1 = &l1();
    let (status, log) = linux_session(l1, "linux-1-reboot", "linux", 1, "")
        .wait_for("specula-initramfs: reached userspace", SHELL_LIMIT)
        .send("echo cpus=$(grep -c ^processor /proc/cpuinfo); reboot -f")
        .wait_for("cpus=1", SHELL_LIMIT)
        .finish(l1, END_LIMIT);
    assert_eq!(status, 0, "a guest reset ends the vmm with 0:\n{log}");
    assert!(log.contains("vmm: guest reset the machine"), "{log}");
}

#[test]
fn nested_linux_6_12_with_1_vcpu_and_panic_minus_1_ends_the_vmm_when_init_dies() {
    let _turn = turn();
    let l1 = &l1();
    // The shell is init (exec'd by /init): its exit panics the kernel, which with
    // panic=-1 reboots at once.
    let (status, log) = linux_session(l1, "linux-trixie-1-panic", "linux-trixie", 1, "panic=-1")
        .wait_for("specula-initramfs: reached userspace", SHELL_LIMIT)
        .send("exit")
        .finish(l1, END_LIMIT);
    assert!(log.contains("Attempted to kill init"), "{log}");
    assert_eq!(status, 0, "panic=-1 resets the machine, and a reset ends the vmm with 0:\n{log}");
    assert!(log.contains("vmm: guest reset the machine"), "{log}");
}

/// Runs the named tests of a carried test binary in L1 (one at a time: they start
/// vmm and inspector processes of their own) and fails with their output.
fn run_carried_tests(binary: &str, tests: &[&str]) {
    let l1 = &l1();
    let filters: Vec<String> = tests.iter().map(|t| format!("'{t}'")).collect();
    let out = l1.run(
        &format!(
            "cd /tmp && SPECULA_GUEST_IMAGES_DIR={L1_TARGET}/guest-images {} --exact --test-threads=1 {} 2>&1",
            l1.test_binary(binary),
            filters.join(" ")
        ),
        Duration::from_secs(900),
    );
    assert_eq!(out.status, 0, "{binary}'s tests failed on NPT in L1:\n{}", out.output);
    let passed = format!("test result: ok. {} passed", tests.len());
    assert!(out.output.contains(&passed), "expected {passed}:\n{}", out.output);
}

#[test]
fn nested_mirror_core_tests_pass_on_npt() {
    let _turn = turn();
    run_carried_tests(
        "mirror",
        &[
            "the_agent_sees_source_writes_across_many_updates_without_stale_reads",
            "a_hole_punched_by_the_source_reads_as_zeros_then_new_writes_show",
            "a_revoked_grant_is_unmapped_before_the_source_hears_back",
            "a_write_by_the_agent_into_the_window_changes_nothing_in_the_source",
            "a_page_written_once_is_reported_once_and_then_no_more_by_the_bitmap_and_by_the_ring",
            "a_dirty_ring_that_fills_stops_nothing_and_loses_no_page",
        ],
    );
}

#[test]
fn nested_mirror_security_tests_pass_on_npt() {
    let _turn = turn();
    run_carried_tests(
        "mirror_security",
        &[
            "holders_of_the_source_uid_or_another_cannot_write_source_ram_by_any_path",
            "a_holder_that_ignores_a_revoke_sees_no_byte_the_source_writes_afterwards",
        ],
    );
}

/// The kernel mirror device, loaded next to kvm-amd in L1: its tests
/// (tests/kernel_mirror.rs, ignored on the runner, where no module loads) run there as
/// root against forked sources and a `vmm --memory-backend anon`, beside the pinning
/// baseline. Transparent huge pages are off in L1: KVM before Linux 6.13 refuses to
/// map a THP's tail pages through a PFN mapping (`kvm_try_get_pfn` cannot take a
/// reference on a tail page), so the agent's first read of a THP-backed source faults
/// (mirror-driver/kmod/README.md, "Limits").
#[test]
fn nested_kernel_mirror_tests_pass_in_l1() {
    let _turn = turn();
    let l1 = &l1();
    let kmod = l1.linux_image("linux", "kmod");
    let out = l1.run(
        &format!(
            "echo never > /sys/kernel/mm/transparent_hugepage/enabled && \
             insmod {kmod}/specula_mirror.ko && insmod {kmod}/specula_pin_baseline.ko && cd /tmp && \
             SPECULA_GUEST_IMAGES_DIR={L1_TARGET}/guest-images {} --include-ignored --test-threads=1 2>&1; \
             status=$?; dmesg | grep -i -e specula -e 'BUG' -e 'WARNING' | tail -20; exit $status",
            l1.test_binary("kernel_mirror")
        ),
        Duration::from_secs(900),
    );
    assert_eq!(out.status, 0, "the kernel mirror tests failed in L1:\n{}", out.output);
    assert!(out.output.contains("test result: ok. 6 passed"), "{}", out.output);
    assert!(!out.output.contains("BUG") && !out.output.contains("WARNING"), "the kernel complained:\n{}", out.output);
}

/// Sections of a reply made of `--- NAME` lines, by name.
fn sections(text: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(next) = line.strip_prefix("--- ") {
            name = next.trim().to_string();
            out.insert(name.clone(), String::new());
        } else if let Some(body) = out.get_mut(&name) {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// Debian 12's Linux as a *source* under our own vmm (2 vCPUs, mirror socket), with
/// the introspection initramfs: the inspector attaches in L1, and its kernel, process,
/// module and memory views match what the guest printed about itself; the default
/// rootkit checks and the LSTAR check (fed by the vmm's own KVM_GET_MSRS) are clean;
/// then the test rootkit loads and each of its attacks is reported.
#[test]
fn nested_a_linux_source_under_our_vmm_is_inspected_live_against_its_own_ground_truth() {
    use integration_tests::linux_guest::{parse_ps_reply, GroundTruth};
    let _turn = turn();
    let l1 = &l1();
    let run_dir = "/run/l2/linux-source";
    let args = format!(
        "--kernel {} --initramfs {} --memory 512M --cpus 2 --mirror-socket {run_dir}/mirror.sock \
         --cmdline \"console=ttyS0 quiet\"",
        l1.linux_image("linux", "vmlinuz"),
        l1.linux_image("linux", "introspect.cpio.gz"),
    );
    let inspector = l1.binary("inspector");
    let ask =
        |request: &str| format!("echo '--- {request}'; {inspector} {request} --control-socket {run_dir}/control.sock");
    // The marker's address is printed by the guest: the session reads it from the
    // console in L1 and asks for it there.
    let (status, out) = ConsoleSession::new(l1, "linux-source", &args)
        .wait_for("=== specula ground truth end ===", SHELL_LIMIT)
        .shell(&format!(
            "{inspector} --source-socket {run_dir}/mirror.sock --all --serial null --control-socket {run_dir}/control.sock > inspector.log 2>&1 &\n\
             inspector=$!\n\
             end=$(( $(date +%s) + 240 ))\n\
             until grep -q 'inspector: agent ready' inspector.log; do\n\
               [ $(date +%s) -lt $end ] && kill -0 $inspector 2>/dev/null || fail \"inspector not ready: $(cat inspector.log)\"\n\
               usleep 200000\n\
             done\n\
             {}\n{}\n{}\n{}\n{}\n\
             marker=$(grep '^marker .*comm=specula-workerA' out | head -1 | tr -d '\\r')\n\
             field() {{ echo \" $marker \" | sed -n \"s/.* $1=\\([^ ]*\\) .*/\\1/p\"; }}\n\
             text=$(field text)\n\
             echo '--- vread'; {inspector} vread $(field pid) $(field vaddr) ${{#text}} --control-socket {run_dir}/control.sock\n\
             victim=$(grep '^marker .*comm=specula-workerB' out | head -1 | tr -d '\\r' | sed -n 's/.* pid=\\([0-9]*\\) .*/\\1/p')\n\
             echo '--- victim'; echo $victim",
            ask("kernel"),
            ask("ps"),
            ask("lsmod"),
            ask("checks"),
            ask("checks msrs"),
        ))
        // The test rootkit, loaded in the guest with its own kallsyms (the $(...) run in
        // the guest's shell): hides workerB and itself, redirects kill(2) in the table
        // and in x64_sys_call, and hooks LSTAR. The inspector attached before it loaded.
        .shell(&format!(
            "echo \"insmod /lib/specula_rootkit.ko hide_pid=$victim syscall_nr={SYSCALL_KILL}\"' \
             sys_call_table=0x$(grep \" sys_call_table$\" /proc/kallsyms | cut -d\" \" -f1) \
             x64_sys_call=0x$(grep \" x64_sys_call$\" /proc/kallsyms | cut -d\" \" -f1) \
             handler=0x$(grep \" __x64_sys_kill$\" /proc/kallsyms | cut -d\" \" -f1) hook_lstar=1 \
             && echo rootkit-loaded-$((40 + 2))' >&3"
        ))
        .wait_for("rootkit-loaded-42", SHELL_LIMIT)
        .shell(&format!(
            "echo '--- rootkit checks'; {inspector} checks --control-socket {run_dir}/control.sock\n\
             echo '--- rootkit msrs'; {inspector} checks msrs --control-socket {run_dir}/control.sock\n\
             kill $inspector\n\
             echo '=== end of views'"
        ))
        .send("poweroff -f")
        .finish(l1, END_LIMIT);
    assert_eq!(status, 0, "{out}");
    let (views_text, log) = out.split_once("=== end of views").expect("the views");
    let block = log
        .split_once("=== specula ground truth begin ===")
        .and_then(|(_, rest)| rest.split_once("=== specula ground truth end ==="))
        .map(|(block, _)| block.trim_matches(['\r', '\n']))
        .unwrap_or_else(|| panic!("no ground truth block:\n{log}"));
    let truth = GroundTruth::parse(&block.replace('\r', "")).unwrap_or_else(|e| panic!("{e}"));
    let marker = truth.marker("specula-workerA").expect("the ground truth names its markers").clone();
    let out = views_text.to_string();
    let views = sections(&out);
    let view = |name: &str| views.get(name).unwrap_or_else(|| panic!("no {name} reply:\n{out}")).trim().to_string();

    let kernel = view("kernel");
    assert!(kernel.starts_with(&format!("release={} ", truth.kernel_release)), "{kernel}");
    let ps = parse_ps_reply(&view("ps"));
    truth.assert_processes_listed(&ps);
    assert!(ps.iter().any(|p| p.3 == "specula-workerB" && p.2 == 1000), "{ps:?}");
    truth.assert_modules_are(&view("lsmod"));
    let hex: String = marker.text.bytes().map(|b| format!("{b:02x}")).collect();
    assert_eq!(view("vread"), hex, "the marker, read through pid {}'s page tables at {:#x}", marker.pid, marker.vaddr);
    let checks = view("checks");
    assert!(checks.ends_with("findings="), "the default checks find nothing on a clean guest: {checks}");
    let msrs = view("checks msrs");
    assert!(msrs.starts_with("msrs=") && !msrs.contains("error") && msrs.ends_with("findings="), "{msrs}");

    // Under attack: every hiding place and hook is named, as on QEMU guests.
    let victim: u32 = view("victim").parse().unwrap_or_else(|_| panic!("the victim's pid:\n{out}"));
    assert_eq!(Some(victim), truth.marker("specula-workerB").map(|m| m.pid));
    let attacked = view("rootkit checks");
    for want in [
        format!("hidden_process:{victim}:specula-workerB:"),
        "hidden_module:-1:specula_rootkit:".into(),
        format!("syscall_redirected:{SYSCALL_KILL}:kill:"),
        "syscall_dispatch_redirected:".into(),
    ] {
        assert!(attacked.contains(&want), "{want} in {attacked}");
    }
    let entry = view("rootkit msrs");
    assert!(entry.contains("syscall_entry_hooked:0:"), "LSTAR of vCPU 0, from the vmm's KVM_GET_MSRS: {entry}");
}
