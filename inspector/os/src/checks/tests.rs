use alloc::vec::Vec;

use super::*;
use crate::testguest::{
    Guest, DISPATCH, ENTRY_SYSCALL, IMAGE, INIT_TASK, KV, MODULE, MODULES, MODULE_BASE, MOD_MTN, PIDS, SYSCALLS,
    TASK_A, TASK_H, XA_NODE,
};
use crate::testmem::TestMem;

/// (kind, id, name, address, detail)
type FindingRow<'a> = (FindingKind, i64, Option<&'a str>, u64, Option<&'a str>);

/// The checks `which` selects, by a checker made for the kernel in `mem` just now.
fn checks(mem: &TestMem, which: u64) -> CheckReport {
    let linux = Linux::discover(mem).unwrap();
    Checker::new(&linux).run(&linux, which)
}

fn run<'r>(report: &'r CheckReport, check: &str) -> &'r CheckRun {
    report.runs.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no {check} run: {report:#?}"))
}

#[test]
fn an_untouched_synthetic_kernel_is_clean() {
    let g = Guest::new();
    let linux = Linux::discover(&g.mem).unwrap();
    let checker = Checker::new(&linux);
    let report = checker.run(&linux, select::ALL);
    assert_eq!(report.findings, [], "{report:#?}");
    let examined: Vec<(&str, u64, Option<&str>)> =
        report.runs.iter().map(|r| (r.check.as_str(), r.examined, r.error.as_deref())).collect();
    assert_eq!(
        examined,
        [
            ("processes", 2, None),
            ("modules", 1, None),
            ("syscalls", 4, None),
            ("interrupts", 0, None),
            ("kernel_text", 1, None),
            ("msrs", 0, Some("corrupt kernel data: the host supplied no vCPU registers (LSTAR)")),
            ("forgery", 0, Some("the kernel is not anchored to the vCPUs: the source reported no vCPU state"))
        ]
    );
    // Only what was asked runs (modules quietly, to name syscall targets).
    let only = checker.run(&linux, select::SYSCALLS);
    assert_eq!(only.runs.len(), 1);
    assert_eq!(only.runs[0].check, "syscalls");
}

#[test]
fn hidden_process_module_redirected_syscall_and_patched_text_are_found() {
    let mut g = Guest::new();
    // A task in the pid table that is not on the task list.
    g.task(TASK_H, 3, "evil", INIT_TASK, 0);
    g.pid_entry(3, TASK_H);
    // The module off the module list; a syscall pointing into it; a text byte changed
    // after discovery.
    g.link(&[MODULES]);
    g.w64(SYSCALLS + 2 * 8, MODULE_BASE + 0x10);
    // `call` from the dispatch function into the module (and a `call` into text, which is fine).
    let call = |at: u64, target: u64| {
        let rel = target.wrapping_sub(KV + at + 5) as u32;
        [&[0xe8u8][..], &rel.to_le_bytes()].concat()
    };
    g.wb(DISPATCH + 8, &call(DISPATCH + 8, KV + 0x100));
    g.wb(DISPATCH + 16, &call(DISPATCH + 16, MODULE_BASE + 0x20));
    let linux_mem = g.mem.clone();
    let linux = Linux::discover(&linux_mem).unwrap();
    let checker = Checker::new(&linux);
    let before = checker.run(&linux, select::KERNEL_TEXT);
    assert_eq!(before.findings, []);
    let mut patched = linux_mem.clone();
    patched.write(IMAGE + 0x10, &[0x40]);
    // The kernel found again in the patched memory, checked against the earlier baseline.
    let after = Linux::discover(&patched).unwrap();
    let entry = [(0, KV + ENTRY_SYSCALL)];
    let report = checker.run_with(&after, select::ALL & !select::FORGERY, Some(&entry));
    let got: Vec<FindingRow> =
        report.findings.iter().map(|f| (f.kind, f.id, f.name.as_deref(), f.address, f.detail.as_deref())).collect();
    assert_eq!(
        got,
        [
            (FindingKind::HiddenProcess, 3, Some("evil"), KV + TASK_H, None),
            (FindingKind::HiddenModule, -1, Some("dummy"), KV + MODULE, Some("sysfs kobject, module tree")),
            (
                FindingKind::SyscallDispatchRedirected,
                16,
                Some("x64_sys_call"),
                MODULE_BASE + 0x20,
                Some("dummy (hidden)")
            ),
            (FindingKind::SyscallRedirected, 2, None, MODULE_BASE + 0x10, Some("dummy (hidden)")),
            (FindingKind::KernelTextModified, -1, Some("_stext"), KV, None),
        ],
        "{report:#?}"
    );
    assert!(report.runs.iter().all(|r| r.error.is_none()), "{report:#?}");
}

#[test]
fn a_vcpu_whose_syscall_entry_is_not_entry_syscall_64_is_found() {
    let g = Guest::new();
    let linux = Linux::discover(&g.mem).unwrap();
    let checker = Checker::new(&linux);
    let entry = KV + ENTRY_SYSCALL;
    // Clean: every vCPU enters at entry_SYSCALL_64; a vCPU not brought up (0) is skipped.
    let clean = checker.run_with(&linux, select::MSRS, Some(&[(0, entry), (1, entry), (2, 0)]));
    assert_eq!(clean.findings, [], "{clean:#?}");
    assert_eq!((clean.runs[0].check.as_str(), clean.runs[0].examined, &clean.runs[0].error), ("msrs", 2, &None));
    // One vCPU sent into a module, another a few bytes into the real entry (past its
    // first instructions): both found, named by module or by symbol.
    let hooked =
        checker.run_with(&linux, select::MSRS, Some(&[(0, entry + 0x10), (1, MODULE_BASE + 0x30), (2, entry)]));
    let got: Vec<FindingRow> =
        hooked.findings.iter().map(|f| (f.kind, f.id, f.name.as_deref(), f.address, f.detail.as_deref())).collect();
    assert_eq!(
        got,
        [
            (FindingKind::SyscallEntryHooked, 0, Some("entry_SYSCALL_64+0x10"), entry + 0x10, None),
            (FindingKind::SyscallEntryHooked, 1, None, MODULE_BASE + 0x30, Some("dummy")),
        ],
        "{hooked:#?}"
    );
    // Without the registers the check says why it did not run.
    let missing = checker.run_with(&linux, select::MSRS, None);
    assert!(missing.runs[0].error.as_deref().is_some_and(|e| e.contains("no vCPU registers")), "{missing:#?}");
}

#[test]
fn an_interrupt_gate_outside_kernel_text_is_found() {
    let mut g = Guest::new();
    // Gates into text are fine; not-present gates are not looked at, wherever they point.
    g.idt_gate(0, KV + 0x100, true);
    g.idt_gate(14, KV + 0xff8, true);
    g.idt_gate(0x81, MODULE_BASE + 0x40, false);
    let clean = checks(&g.mem, select::INTERRUPTS);
    assert_eq!(clean.findings, [], "{clean:#?}");
    assert_eq!((run(&clean, "interrupts").examined, &run(&clean, "interrupts").error), (2, &None));
    // A gate into the module (a listed one, then the same module hidden), and one just
    // past the end of text into kernel data.
    g.idt_gate(0x80, MODULE_BASE + 0x40, true);
    g.idt_gate(0xf0, KV + 0x1000, true);
    let hooked = checks(&g.mem, select::INTERRUPTS);
    let got: Vec<FindingRow> =
        hooked.findings.iter().map(|f| (f.kind, f.id, f.name.as_deref(), f.address, f.detail.as_deref())).collect();
    assert_eq!(
        got,
        [
            (FindingKind::InterruptHooked, 0x80, None, MODULE_BASE + 0x40, Some("dummy")),
            (FindingKind::InterruptHooked, 0xf0, None, KV + 0x1000, None),
        ],
        "{hooked:#?}"
    );
    assert_eq!(run(&hooked, "interrupts").examined, 4, "{hooked:#?}");
    // The module off its list: still named, through the module tree.
    g.link(&[MODULES]);
    let hidden = checks(&g.mem, select::INTERRUPTS);
    let got: Vec<(i64, u64, Option<&str>)> =
        hidden.findings.iter().map(|f| (f.id, f.address, f.detail.as_deref())).collect();
    assert_eq!(got, [(0x80, MODULE_BASE + 0x40, Some("dummy (hidden)")), (0xf0, KV + 0x1000, None)], "{hidden:#?}");
}

#[test]
fn an_unhashed_task_is_found() {
    let mut g = Guest::new();
    g.w64(XA_NODE + 8 + 8, 0); // pid 1 gone from the table, TASK_A still listed
    let linux = Linux::discover(&g.mem).unwrap();
    let checker = Checker::new(&linux);
    let report = checker.run(&linux, select::PROCESSES);
    assert_eq!(report.findings.len(), 1, "{report:#?}");
    assert_eq!((report.findings[0].kind, report.findings[0].id), (FindingKind::UnhashedProcess, 1));
}

#[test]
fn hostile_tables_and_trees_are_bounded_errors() {
    // The pid table's node holds itself: a cycle, not a hang.
    let mut g = Guest::new();
    g.w64(XA_NODE + 8 + 5 * 8, (KV + XA_NODE) | 2);
    let linux = Linux::discover(&g.mem).unwrap();
    let checker = Checker::new(&linux);
    let r = checker.run(&linux, select::PROCESSES);
    assert!(run(&r, "processes").error.as_deref().is_some_and(|e| e.contains("cycles")), "{r:#?}");
    // A struct pid pointing at user memory.
    let mut g = Guest::new();
    g.w64(PIDS + 0x40, 0x1000);
    let r = checks(&g.mem, select::PROCESSES);
    assert!(run(&r, "processes").error.as_deref().is_some_and(|e| e.contains("not a kernel address")), "{r:#?}");
    // The module tree's node is its own left child.
    let mut g = Guest::new();
    g.w64(MOD_MTN + 8 + 16, KV + MOD_MTN + 8);
    let r = checks(&g.mem, select::MODULES);
    assert!(run(&r, "modules").error.as_deref().is_some_and(|e| e.contains("module tree")), "{r:#?}");
    // The kset list loops without its head; a module kobject claiming another module.
    let mut g = Guest::new();
    g.w64(MODULE + 120, KV + MODULE + 120);
    let r = checks(&g.mem, select::MODULES);
    assert!(run(&r, "modules").error.is_some(), "{r:#?}");
    let mut g = Guest::new();
    g.w64(MODULE + 112 + 64, KV + TASK_A);
    g.link(&[MODULES]);
    g.w64(MOD_MTN, 0);
    let r = checks(&g.mem, select::MODULES);
    assert_eq!(r.findings, [], "a kobject whose module does not embed it is not believed: {r:#?}");
}
