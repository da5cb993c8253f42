//! Rootkit checks computed in the agent against live Linux guests under QEMU, with
//! no symbol files on the host: an untouched guest is clean on every check; the
//! test rootkit (guest-images/linux/rootkit/specula_rootkit.c, a kernel module
//! built against Debian's linux-headers for the guest kernel) hides a process,
//! hides itself and redirects a system call (its table entry and its direct call in
//! `x64_sys_call`) and its syscall entry (LSTAR), and each is reported by name; a
//! patched kernel text page is reported with its symbol.
//!
//! Needs qemu-system-x86_64 and target/guest-images/linux/ (scripts/build.sh).

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use integration_tests::linux_guest::{GuestInspector, LinuxGuest, LinuxGuestConfig};
use integration_tests::{binary, run_with_timeout};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);
const CONSOLE: Duration = Duration::from_secs(30);
/// kill(2): what the rootkit redirects.
const SYSCALL_KILL: i64 = 62;

/// `specula --json ARGS` against the inspector's API; returns its JSON and exit status.
fn specula(inspector: &GuestInspector, args: &[&str]) -> (Value, i32) {
    let out = run_with_timeout(
        Command::new(binary("specula")).args(["--socket", inspector.api.to_str().unwrap(), "--json"]).args(args),
        LIMIT,
    );
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("specula {args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (json, out.status.code().unwrap_or(-1))
}

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
    let (report, status) = specula(&inspector, &["checks"]);
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
    assert!(report["checks"].as_array().unwrap().iter().all(|c| c["check"] != "msrs"), "msrs runs only when named");

    // The syscall entry register, which QMP does not show: read from a device-state
    // snapshot (the guest paused for milliseconds, then running again).
    let (msrs, status) = specula(&inspector, &["checks", "msrs"]);
    assert_eq!((msrs["clean"].as_bool(), status), (Some(true), 0), "LSTAR is entry_SYSCALL_64: {msrs:#}");
    assert_eq!(examined(&msrs, "msrs"), 1, "the guest's one vCPU: {msrs:#}");
    assert!(guest.console("echo still-running", CONSOLE).contains("still-running"), "the guest runs on");

    // What an inline hook does: change a byte of kernel text (here kexec_load's
    // handler, which nothing calls), through the guest's RAM as a rootkit would.
    let (kernel, _) = specula(&inspector, &["kernel"]);
    let va = guest.kallsyms_address("__x64_sys_kexec_load");
    let start_kernel_map = 0xffff_ffff_8000_0000u64;
    let pa = (va - start_kernel_map).wrapping_add(kernel["phys_base"].as_i64().unwrap() as u64);
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&guest.ram_memfds()[0]).unwrap();
    let mut original = [0u8; 1];
    ram.read_exact_at(&mut original, pa).unwrap();
    ram.write_all_at(&[original[0] ^ 0xff], pa).unwrap();
    let (patched, status) = specula(&inspector, &["checks", "kernel_text"]);
    ram.write_all_at(&original, pa).unwrap();
    assert_eq!(status, 3, "a finding makes the CLI exit 3");
    let text = findings(&patched, "kernel_text_modified");
    assert_eq!(text.len(), 1, "exactly the patched page: {patched:#}");
    assert_eq!(text[0]["address"].as_u64(), Some(va & !0xfff), "{patched:#}");
    assert!(text[0]["name"].as_str().is_some_and(|n| !n.is_empty()), "the page is named by a symbol: {patched:#}");
    let (restored, _) = specula(&inspector, &["checks", "kernel_text"]);
    assert_eq!(restored["clean"], true, "restored: {restored:#}");
}

#[test]
fn the_test_rootkit_is_caught_naming_the_process_the_module_and_the_syscall() {
    let guest = LinuxGuest::start(LinuxGuestConfig::default());
    let victim = guest.ground_truth().process("specula-workerB").expect("the workload's marker B").pid;
    // Attach first: the kernel-text baseline is taken before the rootkit loads.
    let inspector = GuestInspector::attach(&guest);
    let (before, _) = specula(&inspector, &["checks"]);
    assert_eq!(before["clean"], true, "{before:#}");

    let table = guest.kallsyms_address("sys_call_table");
    // Debian's 6.1 has the BHI backport: system calls go through x64_sys_call's direct calls.
    let (dispatch, kill) = (guest.kallsyms_address("x64_sys_call"), guest.kallsyms_address("__x64_sys_kill"));
    let (status, out) = guest.console_status(
        &format!(
            "insmod /lib/specula_rootkit.ko hide_pid={victim} sys_call_table={table:#x} syscall_nr={SYSCALL_KILL} \
             x64_sys_call={dispatch:#x} handler={kill:#x} hook_lstar=1"
        ),
        CONSOLE,
    );
    assert_eq!(status, 0, "insmod: {out}");
    // The rootkit works against the guest's own tools and the naive views.
    let modules = guest.console("cat /proc/modules", CONSOLE);
    assert!(!modules.contains("specula_rootkit") && modules.contains("dummy"), "{modules}");
    let ps = inspector.ask("ps");
    assert!(!ps.split_whitespace().any(|p| p.starts_with(&format!("{victim}:"))), "pid {victim} is unlisted: {ps}");
    let lsmod = inspector.ask("lsmod");
    assert!(!lsmod.contains("specula_rootkit"), "{lsmod}");

    let (report, status) = specula(&inspector, &["checks"]);
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
    // kill(2) now runs through the hook, and still works.
    let (status, out) = guest.console_status(&format!("kill -0 {victim} && echo alive"), CONSOLE);
    assert!(status == 0 && out.contains("alive"), "kill through the hook: {out}");
    assert!(findings(&report, "unhashed_process").is_empty(), "{report:#}");
    // Every system call now enters through the module (the console above still works).
    let (entry, status) = specula(&inspector, &["checks", "msrs"]);
    assert_eq!(status, 3, "{entry:#}");
    let hooked = findings(&entry, "syscall_entry_hooked");
    assert_eq!(hooked.len(), 1, "the one vCPU: {entry:#}");
    assert_eq!(hooked[0]["id"].as_i64(), Some(0), "{entry:#}");
    assert_eq!(hooked[0]["detail"], "specula_rootkit (hidden)", "LSTAR points into the hidden module: {entry:#}");
    assert!(findings(&report, "interrupt_hooked").is_empty(), "{report:#}");
    // The same through the control socket.
    let line = inspector.ask("checks processes modules syscalls");
    for want in [
        format!("hidden_process:{victim}:specula-workerB:"),
        "hidden_module:-1:specula_rootkit:".into(),
        format!("syscall_redirected:{SYSCALL_KILL}:kill:"),
    ] {
        assert!(line.contains(&want), "{want} in {line}");
    }
}
