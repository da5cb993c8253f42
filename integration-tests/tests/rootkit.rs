//! Rootkit checks computed in the agent against live Linux guests under QEMU, with
//! no symbol files on the host: an untouched guest is clean on every check; the
//! test rootkit (guest-images/linux/rootkit/specula_rootkit.c, a kernel module
//! built against Debian's linux-headers for the guest kernel) hides a process,
//! hides itself and redirects a system call (its table entry and its direct call in
//! `x64_sys_call`, whose text page is then reported modified), its syscall entry
//! (LSTAR) and an interrupt gate (IDT vector 0x80), and each is reported by name,
//! on Linux 6.1 (Debian 12) and 6.12 (Debian 13, whose modules are laid out in
//! `mem[]`); a patched kernel text page is reported with its symbol.
//!
//! Needs qemu-system-x86_64 and target/guest-images/linux/ (scripts/build.sh).

use std::os::unix::fs::FileExt;
use std::time::Duration;

use integration_tests::linux_guest::{GuestInspector, LinuxGuest, LinuxGuestConfig, DEBIAN_12, DEBIAN_13};
use serde_json::Value;

const CONSOLE: Duration = Duration::from_secs(30);
/// kill(2): what the rootkit redirects.
const SYSCALL_KILL: i64 = 62;
/// IA32_SYSCALL_VECTOR (int 0x80): the IDT gate the rootkit hooks.
const VECTOR_INT80: i64 = 0x80;
/// How far into `x64_sys_call` the rootkit looks for the call it rewrites.
const DISPATCH_SCAN: usize = 16384;
/// `__START_KERNEL_map`: kernel image addresses are this plus their physical address less phys_base.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// The findings of one kind.
fn findings<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == kind).collect()
}

fn examined(report: &Value, check: &str) -> u64 {
    let run = report["checks"].as_array().unwrap().iter().find(|c| c["check"] == check).unwrap();
    assert!(run["error"].is_null(), "{check} could not run: {run}");
    run["examined"].as_u64().unwrap()
}

#[test]
fn an_untouched_guest_is_clean_and_a_patched_text_page_is_named() {
    let guest = LinuxGuest::start(LinuxGuestConfig::default());
    let inspector = GuestInspector::attach(&guest);
    let (report, status) = inspector.specula_json(&["checks"]);
    assert_eq!(
        (report["clean"].as_bool(), status),
        (Some(true), 0),
        "no false positive on an untouched guest: {report:#}"
    );
    let processes = guest.ground_truth().processes.len() as u64;
    assert!(examined(&report, "processes") >= processes - 2, "the pid table holds every process: {report:#}");
    assert!(examined(&report, "modules") >= 1, "dummy is loaded: {report:#}");
    assert!(examined(&report, "syscalls") > 300, "{report:#}");
    assert!(examined(&report, "interrupts") > 20, "{report:#}");
    assert!(examined(&report, "kernel_text") > 1000, "Debian's text is several MiB: {report:#}");
    // Anchored to the vCPUs' CR3s, one VMCOREINFO text believed and none contradicted.
    assert_eq!(examined(&report, "forgery"), 1, "{report:#}");
    assert!(report["checks"].as_array().unwrap().iter().all(|c| c["check"] != "msrs"), "msrs runs only when named");

    // The syscall entry register, which QMP does not show: read from a device-state
    // snapshot (the guest paused for milliseconds, then running again).
    let (msrs, status) = inspector.specula_json(&["checks", "msrs"]);
    assert_eq!((msrs["clean"].as_bool(), status), (Some(true), 0), "LSTAR is entry_SYSCALL_64: {msrs:#}");
    assert_eq!(examined(&msrs, "msrs"), 1, "the guest's one vCPU: {msrs:#}");
    assert!(guest.console("echo still-running", CONSOLE).contains("still-running"), "the guest runs on");

    // What an inline hook does: change a byte of kernel text (here kexec_load's
    // handler, which nothing calls), through the guest's RAM as a rootkit would.
    let va = guest.kallsyms_address("__x64_sys_kexec_load");
    let pa = image_pa(&inspector, va);
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&guest.ram_memfds()[0]).unwrap();
    let mut original = [0u8; 1];
    ram.read_exact_at(&mut original, pa).unwrap();
    ram.write_all_at(&[original[0] ^ 0xff], pa).unwrap();
    let (patched, status) = inspector.specula_json(&["checks", "kernel_text"]);
    ram.write_all_at(&original, pa).unwrap();
    assert_eq!(status, 3, "a finding makes the CLI exit 3");
    let text = findings(&patched, "kernel_text_modified");
    assert_eq!(text.len(), 1, "exactly the patched page: {patched:#}");
    assert_eq!(text[0]["address"].as_u64(), Some(va & !0xfff), "{patched:#}");
    assert!(text[0]["name"].as_str().is_some_and(|n| !n.is_empty()), "the page is named by a symbol: {patched:#}");
    let (restored, _) = inspector.specula_json(&["checks", "kernel_text"]);
    assert_eq!(restored["clean"], true, "restored: {restored:#}");
}

/// The physical address of kernel image address `va`, by the phys_base the inspector found.
fn image_pa(inspector: &GuestInspector, va: u64) -> u64 {
    let (kernel, _) = inspector.specula_json(&["kernel"]);
    (va - START_KERNEL_MAP).wrapping_add(kernel["phys_base"].as_i64().unwrap() as u64)
}

/// The kernel text pages the rootkit's rewrite of `x64_sys_call` changes: it rewrites
/// the rel32 of the first `call`/`jmp` to `handler` (read here from the guest's RAM
/// before it loads), which may straddle two pages.
fn dispatch_patch_pages(guest: &LinuxGuest, inspector: &GuestInspector, dispatch: u64, handler: u64) -> Vec<u64> {
    let ram = std::fs::File::open(&guest.ram_memfds()[0]).unwrap();
    let mut code = vec![0u8; DISPATCH_SCAN + 5];
    ram.read_exact_at(&mut code, image_pa(inspector, dispatch)).unwrap();
    let at = (0..DISPATCH_SCAN)
        .find(|&i| {
            let rel = i32::from_le_bytes(code[i + 1..i + 5].try_into().unwrap());
            matches!(code[i], 0xe8 | 0xe9) && (dispatch + i as u64 + 5).wrapping_add(rel as i64 as u64) == handler
        })
        .expect("x64_sys_call calls the handler directly");
    let (first, last) = ((dispatch + at as u64 + 1) & !0xfff, (dispatch + at as u64 + 4) & !0xfff);
    if first == last {
        vec![first]
    } else {
        vec![first, last]
    }
}

#[test]
fn the_test_rootkit_is_caught_naming_the_process_the_module_and_the_syscall() {
    rootkit_is_caught(DEBIAN_12);
}

/// Linux 6.12: modules laid out in `mem[]`, system calls dispatched by `x64_sys_call` alone.
#[test]
fn the_test_rootkit_is_caught_on_linux_6_12() {
    rootkit_is_caught(DEBIAN_13);
}

fn rootkit_is_caught(image: &'static str) {
    let guest = LinuxGuest::start(LinuxGuestConfig { image, ..LinuxGuestConfig::default() });
    let victim = guest.ground_truth().process("specula-workerB").expect("the workload's marker B").pid;
    // Attach first: the kernel-text baseline is taken before the rootkit loads.
    let inspector = GuestInspector::attach(&guest);
    let (before, _) = inspector.specula_json(&["checks"]);
    assert_eq!(before["clean"], true, "{before:#}");

    let table = guest.kallsyms_address("sys_call_table");
    // Debian's 6.1 has the BHI backport (6.12 has it upstream): system calls go
    // through x64_sys_call's direct calls.
    let (dispatch, kill) = (guest.kallsyms_address("x64_sys_call"), guest.kallsyms_address("__x64_sys_kill"));
    let patched_pages = dispatch_patch_pages(&guest, &inspector, dispatch, kill);
    let (status, out) = guest.console_status(
        &format!(
            "insmod /lib/specula_rootkit.ko hide_pid={victim} sys_call_table={table:#x} syscall_nr={SYSCALL_KILL} \
             x64_sys_call={dispatch:#x} handler={kill:#x} hook_lstar=1 hook_idt=1"
        ),
        CONSOLE,
    );
    assert_eq!(status, 0, "insmod: {out}");
    // Where the hooked gate points now: the module's trampoline (its parameters stay in sysfs).
    let idt_hook = guest.console("cat /sys/module/specula_rootkit/parameters/idt_hook", CONSOLE);
    let idt_hook: u64 = idt_hook.trim().parse().unwrap_or_else(|e| panic!("idt_hook {idt_hook:?}: {e}"));
    // The rootkit works against the guest's own tools and the naive views.
    let modules = guest.console("cat /proc/modules", CONSOLE);
    assert!(!modules.contains("specula_rootkit") && modules.contains("dummy"), "{modules}");
    let ps = inspector.ask("ps");
    assert!(!ps.split_whitespace().any(|p| p.starts_with(&format!("{victim}:"))), "pid {victim} is unlisted: {ps}");
    let lsmod = inspector.ask("lsmod");
    assert!(!lsmod.contains("specula_rootkit"), "{lsmod}");

    let (report, status) = inspector.specula_json(&["checks"]);
    assert_eq!(status, 3, "{report:#}");
    let hidden = findings(&report, "hidden_process");
    assert_eq!(hidden.len(), 1, "{report:#}");
    assert_eq!((hidden[0]["id"].as_u64(), hidden[0]["name"].as_str()), (Some(victim.into()), Some("specula-workerB")));
    let module = findings(&report, "hidden_module");
    assert_eq!(module.len(), 1, "{report:#}");
    assert_eq!(module[0]["name"], "specula_rootkit", "{report:#}");
    assert_eq!(module[0]["detail"], "sysfs kobject, module tree", "found both ways: {report:#}");
    let syscall = findings(&report, "syscall_redirected");
    assert_eq!(syscall.len(), 1, "{report:#}");
    assert_eq!(syscall[0]["id"].as_i64(), Some(SYSCALL_KILL), "{report:#}");
    assert_eq!(syscall[0]["name"], "kill", "named from the kernel's syscall metadata: {report:#}");
    assert_eq!(syscall[0]["detail"], "specula_rootkit (hidden)", "{report:#}");
    let dispatch_hook = findings(&report, "syscall_dispatch_redirected");
    assert_eq!(dispatch_hook.len(), 1, "the rewritten call in x64_sys_call: {report:#}");
    assert_eq!(dispatch_hook[0]["detail"], "specula_rootkit (hidden)", "{report:#}");
    // That rewrite is a change to the kernel's text: exactly the page(s) of the call's rel32.
    let mut text: Vec<u64> =
        findings(&report, "kernel_text_modified").iter().map(|f| f["address"].as_u64().unwrap()).collect();
    text.sort_unstable();
    assert_eq!(text, patched_pages, "the patched call in x64_sys_call ({dispatch:#x}): {report:#}");
    // The int 0x80 gate enters through the module.
    let gates = findings(&report, "interrupt_hooked");
    assert_eq!(gates.len(), 1, "{report:#}");
    assert_eq!(
        (gates[0]["id"].as_i64(), gates[0]["address"].as_u64(), gates[0]["detail"].as_str()),
        (Some(VECTOR_INT80), Some(idt_hook), Some("specula_rootkit (hidden)")),
        "{report:#}"
    );
    // kill(2) now runs through the hook, and still works.
    let (status, out) = guest.console_status(&format!("kill -0 {victim} && echo alive"), CONSOLE);
    assert!(status == 0 && out.contains("alive"), "kill through the hook: {out}");
    assert!(findings(&report, "unhashed_process").is_empty(), "{report:#}");
    // Every system call now enters through the module (the console above still works).
    let (entry, status) = inspector.specula_json(&["checks", "msrs"]);
    assert_eq!(status, 3, "{entry:#}");
    let hooked = findings(&entry, "syscall_entry_hooked");
    assert_eq!(hooked.len(), 1, "the one vCPU: {entry:#}");
    assert_eq!(hooked[0]["id"].as_i64(), Some(0), "{entry:#}");
    assert_eq!(hooked[0]["detail"], "specula_rootkit (hidden)", "LSTAR points into the hidden module: {entry:#}");
    // The same through the control socket.
    let line = inspector.ask("checks processes modules syscalls interrupts");
    for want in [
        format!("hidden_process:{victim}:specula-workerB:"),
        "hidden_module:-1:specula_rootkit:".into(),
        format!("syscall_redirected:{SYSCALL_KILL}:kill:"),
        format!("interrupt_hooked:{VECTOR_INT80}:"),
    ] {
        assert!(line.contains(&want), "{want} in {line}");
    }
}
