//! Each view's JSON, field by field: the HTTP API's models
//! (`inspector/api/src/os_models.rs`) are the contract.

use alloc::vec;
#[cfg(feature = "openapi")]
use alloc::{string::String, vec::Vec};

use serde_json::{json, Value};

use crate::checks::{CheckReport, CheckRun, Finding, FindingKind};
use crate::wire::{DecodedProcess, SymbolRecord};
use crate::{Error, KernelInfo, Module, PagingMode, Process, SyscallCheck, SyscallEntry, Vma};

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

fn process() -> Process {
    Process {
        task: 0xffff_8880_0100_0000,
        pid: 42,
        tgid: 42,
        ppid: 1,
        uid: 1000,
        euid: 0,
        gid: 100,
        comm: "sleep".into(),
        state: 1,
        start_time: 123_456,
        flags: 0x40_0100,
        kernel_thread: false,
        exit_state: 0,
        mm: 0xffff_8880_0200_0000,
        pgd: Some(0x1234_5000),
        arg_start: 0x7ffe_0000,
        arg_end: 0x7ffe_000b,
        cmdline: b"sleep\x003333\x00".to_vec(),
        cmdline_truncated: false,
        cmdline_error: None,
    }
}

#[test]
fn the_kernel_view_is_the_apis_kernel_view_and_more() {
    let k = KernelInfo {
        release: "6.1.0-synthetic".into(),
        uts_release: Some("6.1.0-synthetic".into()),
        kaslr_offset: 0x1e00_0000,
        phys_base: -0x100_0000,
        paging_mode: PagingMode::Level4,
        kernel_pgd: 0x260_c000,
        online_cpus: Some(2),
        nr_cpu_ids: None,
        vmcoreinfo_at: 0x1fff_f000,
        conflicting_vmcoreinfo: 0,
        anchored: true,
        anchors: vec![crate::AnchorCheck { anchor: "cr3".into(), cpu: 0, agrees: true, detail: "same page".into() }],
        unanchored_reason: None,
        forged_vmcoreinfo: vec![0x7f0_0000],
        symbols: 150_000,
        btf_types: 130_000,
    };
    let expected = json!({
        "release": "6.1.0-synthetic",
        "uts_release": "6.1.0-synthetic",
        "kaslr_offset": 0x1e00_0000u64,
        "phys_base": -0x100_0000i64,
        "paging": "4-level",
        "kernel_pgd": 0x260_c000u64,
        "online_cpus": 2,
        "nr_cpu_ids": null,
        "vmcoreinfo_at": 0x1fff_f000u64,
        "conflicting_vmcoreinfo": 0,
        "anchored": true,
        "anchors": [{"anchor": "cr3", "cpu": 0, "agrees": true, "detail": "same page"}],
        "unanchored_reason": null,
        "forged_vmcoreinfo": [0x7f0_0000u64],
        "symbols": 150_000,
        "btf_types": 130_000,
    });
    assert_eq!(to_json(&k), expected);
    assert_eq!(serde_json::from_value::<KernelInfo>(expected).unwrap(), k);
    assert_eq!(to_json(&PagingMode::Level5), json!("5-level"));
}

#[test]
fn a_process_is_the_apis_process_view_and_more() {
    let mut p = process();
    p.cmdline_error = Some(Error::NotMapped { va: 0x7ffe_0000, level: 1 });
    let expected = json!({
        "pid": 42, "tgid": 42, "ppid": 1, "uid": 1000, "euid": 0, "gid": 100,
        "comm": "sleep",
        "args": ["sleep", "3333"],
        "state": 1,
        "start_time": 123_456,
        "kernel_thread": false,
        "exited": false,
        "pgd": 0x1234_5000u64,
        "task": 0xffff_8880_0100_0000u64,
        "cmdline_error": "virtual address 0x7ffe0000 is not mapped (level-1 entry not present)",
        "flags": 0x40_0100,
        "exit_state": 0,
        "mm": 0xffff_8880_0200_0000u64,
        "arg_start": 0x7ffe_0000u64,
        "arg_end": 0x7ffe_000bu64,
        "cmdline_truncated": false,
    });
    assert_eq!(to_json(&p), expected);
    // On the host the error is the agent's text, in the decoded process.
    let decoded = DecodedProcess { process: process(), cmdline_error: Some("not mapped".into()) };
    let json = to_json(&decoded);
    assert_eq!(json["cmdline_error"], "not mapped");
    assert_eq!(serde_json::from_value::<DecodedProcess>(json).unwrap(), decoded);
    // A zombie has exited; a command line cut short still reads back as its arguments.
    let mut zombie = process();
    (zombie.exit_state, zombie.cmdline) = (0x20, b"a\0\0bc".to_vec());
    let json = to_json(&DecodedProcess { process: zombie.clone(), cmdline_error: None });
    assert_eq!(
        (&json["exited"], &json["args"], &json["cmdline_error"]),
        (&json!(true), &json!(["a", "", "bc"]), &Value::Null)
    );
    let back = serde_json::from_value::<DecodedProcess>(json).unwrap().process;
    assert_eq!((back.args(), back.exit_state), (zombie.args(), 0x20));
}

#[test]
fn modules_vmas_and_symbols_are_the_apis_views_and_more() {
    let m = Module {
        module: 0xffff_ffff_c000_2000,
        name: "dummy".into(),
        state: 0,
        state_name: Some("MODULE_STATE_LIVE".into()),
        base: 0xffff_ffff_c000_0000,
        size: 0x4000,
    };
    let expected = json!({
        "module": 0xffff_ffff_c000_2000u64,
        "name": "dummy",
        "state_value": 0,
        "state": "MODULE_STATE_LIVE",
        "base": 0xffff_ffff_c000_0000u64,
        "size": 0x4000,
    });
    assert_eq!(to_json(&m), expected);
    assert_eq!(serde_json::from_value::<Module>(expected).unwrap(), m);

    let v = Vma {
        vma: 0xffff_8880_0300_0000,
        start: 0x40_0000,
        end: 0x40_1000,
        flags: 0x875,
        pgoff: 2,
        file: 0xffff_8880_0400_0000,
        file_name: Some("sleep".into()),
    };
    let expected = json!({
        "start": 0x40_0000, "end": 0x40_1000,
        "perms": "r-xp",
        "pgoff": 2,
        "file": "sleep",
        "vma": 0xffff_8880_0300_0000u64,
        "flags": 0x875,
        "file_address": 0xffff_8880_0400_0000u64,
    });
    assert_eq!(to_json(&v), expected);
    assert_eq!(serde_json::from_value::<Vma>(expected).unwrap(), v);

    let s = SymbolRecord { name: "_stext".into(), kind: 'T', address: 0xffff_ffff_8100_0000 };
    let expected = json!({"name": "_stext", "kind": "T", "address": 0xffff_ffff_8100_0000u64});
    assert_eq!(to_json(&s), expected);
    assert_eq!(serde_json::from_value::<SymbolRecord>(expected).unwrap(), s);
}

#[test]
fn checks_are_the_apis_check_views_and_more() {
    let c = SyscallCheck {
        table: 0xffff_ffff_8200_0000,
        table_pa: 0x200_0000,
        entries: 2,
        text_start: 0xffff_ffff_8100_0000,
        text_end: 0xffff_ffff_8180_0000,
        redirected: vec![SyscallEntry { nr: 1, target: 0xffff_ffff_c000_0010, module: Some("dummy".into()) }],
    };
    let expected = json!({
        "table": 0xffff_ffff_8200_0000u64,
        "table_pa": 0x200_0000,
        "entries": 2,
        "text_start": 0xffff_ffff_8100_0000u64,
        "text_end": 0xffff_ffff_8180_0000u64,
        "redirected": [{"nr": 1, "target": 0xffff_ffff_c000_0010u64, "module": "dummy"}],
    });
    assert_eq!(to_json(&c), expected);
    assert_eq!(serde_json::from_value::<SyscallCheck>(expected).unwrap(), c);

    let report = CheckReport {
        runs: vec![
            CheckRun { check: "processes".into(), examined: 80, error: None },
            CheckRun { check: "msrs".into(), examined: 0, error: Some("no registers".into()) },
        ],
        findings: vec![
            Finding { kind: FindingKind::HiddenProcess, id: 77, name: Some("evil".into()), address: 1, detail: None },
            Finding { kind: FindingKind::KernelTextModified, id: -1, name: None, address: 2, detail: None },
        ],
    };
    let expected = json!({
        "clean": false,
        "checks": [
            {"check": "processes", "examined": 80, "error": null},
            {"check": "msrs", "examined": 0, "error": "no registers"},
        ],
        "findings": [
            {"kind": "hidden_process", "id": 77, "name": "evil", "address": 1, "detail": null},
            {"kind": "kernel_text_modified", "id": null, "name": null, "address": 2, "detail": null},
        ],
    });
    assert_eq!(to_json(&report), expected);
    assert_eq!(serde_json::from_value::<CheckReport>(expected).unwrap(), report);
    assert_eq!(to_json(&CheckReport::default())["clean"], true);
    // Every kind is named in JSON as the API names it.
    for kind in (1..=8).map(|v| FindingKind::from_u8(v).unwrap()) {
        assert_eq!(to_json(&kind), json!(kind.name()));
        assert_eq!(serde_json::from_value::<FindingKind>(json!(kind.name())).unwrap(), kind);
    }
}

/// The property names of the schema `T` has in OpenAPI, sorted.
#[cfg(feature = "openapi")]
fn schema_fields<T: utoipa::ToSchema>() -> Vec<String> {
    let schema = serde_json::to_value(T::schema()).unwrap();
    let mut names: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
    names.sort();
    names
}

/// The field names of `v` in JSON, sorted.
#[cfg(feature = "openapi")]
fn json_fields<T: serde::Serialize>(v: &T) -> Vec<String> {
    let mut names: Vec<String> = to_json(v).as_object().unwrap().keys().cloned().collect();
    names.sort();
    names
}

#[cfg(feature = "openapi")]
#[test]
fn schemas_name_what_the_json_has() {
    use utoipa::{PartialSchema, ToSchema};
    assert_eq!((Process::name(), DecodedProcess::name()), ("Process".into(), "Process".into()));
    assert_eq!((Vma::name(), CheckReport::name()), ("Vma".into(), "CheckReport".into()));
    assert_eq!(schema_fields::<Process>(), json_fields(&process()));
    assert_eq!(schema_fields::<DecodedProcess>(), json_fields(&process()));
    let module = Module { module: 1, name: "m".into(), state: 0, state_name: None, base: 2, size: 3 };
    assert_eq!(schema_fields::<Module>(), json_fields(&module));
    let vma = Vma { vma: 1, start: 2, end: 3, flags: 4, pgoff: 5, file: 6, file_name: None };
    assert_eq!(schema_fields::<Vma>(), json_fields(&vma));
    assert_eq!(schema_fields::<CheckReport>(), json_fields(&CheckReport::default()));
    let finding = Finding { kind: FindingKind::HiddenModule, id: -1, name: None, address: 0, detail: None };
    assert_eq!(schema_fields::<Finding>(), json_fields(&finding));
    let s = SymbolRecord { name: "x".into(), kind: 't', address: 0 };
    assert_eq!(schema_fields::<SymbolRecord>(), json_fields(&s));
    assert_eq!(serde_json::to_value(PagingMode::schema()).unwrap()["enum"], json!(["4-level", "5-level"]));
}
