//! Where to break, and what to read there, for the `exec`, `exit` and `module_load`
//! trace kinds: chosen from the guest kernel's own kallsyms and BTF (no address or
//! structure offset is written down per kernel), and the events their hits make.
//!
//! - `exec`: `__x64_sys_execve` and `__x64_sys_execveat`, the system calls' entry
//!   wrappers, whose one argument is the caller's `struct pt_regs`: the filename and
//!   argv are the user pointers in its `di`/`si` (`si`/`dx` for execveat), read in the
//!   caller's own address space before the exec replaces it.
//! - `exit`: `do_exit(code)`, which every task's end goes through.
//! - `module_load`: `do_init_module(mod)`, between a module's load and its init.
//!
//! The task each hit happens in is the per-CPU current task, reached from the GS base
//! (the per-CPU area in the kernel's context) at `current_task`'s per-CPU offset
//! (6.1), or `pcpu_hot.current_task`'s (6.2 and later).

use mirror_driver::protocol::{Breakpoint, BreakpointHit, Capture, CaptureKind, Captured, CAPTURE_BASE_GS};
use serde_json::{json, Value};
use specula_os::btf::Btf;
use specula_os::wire::SymbolRecord;

use super::{EXEC, EXIT, MODULE_LOAD};
use crate::core::InspectError;

/// RDI's index in a capture's base (the general-purpose registers in `VcpuRegs::gprs`
/// order): a function's first argument.
const RDI: u32 = 5;
/// Longest filename and argument read.
const MAX_PATH: u32 = 256;
const MAX_ARG: u32 = 128;
/// `TASK_COMM_LEN`, and `MODULE_NAME_LEN` on 64-bit.
const COMM_LEN: u32 = 16;
const MODULE_NAME_LEN: u32 = 56;

/// What a planned breakpoint reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Probe {
    Execve,
    Execveat,
    Exit,
    ModuleLoad,
}

/// The breakpoints for a set of kinds, and what each one reports, by index.
pub(super) struct Plan {
    pub probes: Vec<Probe>,
    pub points: Vec<Breakpoint>,
}

/// The kernel's layout as the captures need it, from its BTF and kallsyms.
struct Layout {
    /// Per-CPU offset of the current task pointer.
    current: i64,
    pid: i64,
    tgid: i64,
    comm: i64,
    real_parent: i64,
    regs_di: i64,
    regs_si: i64,
    regs_dx: i64,
    module_name: i64,
    module_base: i64,
    /// Where a module's init text is and its size: its code until its init returns,
    /// which writes made by the init (a rootkit's) are placed in.
    module_init_base: i64,
    module_init_size: i64,
}

fn symbol(symbols: &[SymbolRecord], name: &str) -> Option<u64> {
    symbols.iter().find(|s| s.name == name).map(|s| s.address)
}

fn os(e: impl std::fmt::Display) -> InspectError {
    InspectError::Os(format!("cannot plan the trace's breakpoints: {e}"))
}

impl Layout {
    fn of(symbols: &[SymbolRecord], btf: &Btf) -> Result<Self, InspectError> {
        let offset = |s: &str, path: &str| btf.member(s, path).map(|f| f.offset as i64).map_err(os);
        let current = match symbol(symbols, "current_task") {
            Some(at) => at as i64,
            None => {
                let hot =
                    symbol(symbols, "pcpu_hot").ok_or_else(|| os("neither current_task nor pcpu_hot in kallsyms"))?;
                hot as i64 + offset("pcpu_hot", "current_task")?
            }
        };
        // The text's base: `mem[MOD_TEXT]` (MOD_TEXT is 0) since 6.4, `core_layout` before;
        // the init text: `mem[MOD_INIT_TEXT]`, or `init_layout`.
        let (module_base, module_init_base, module_init_size) = if btf.has_member("module", "mem") {
            let mem = offset("module", "mem")?;
            let entry = btf.size_of(btf.struct_id("module_memory").map_err(os)?).map_err(os)? as i64;
            let init = mem + btf.enum_value("MOD_INIT_TEXT").map_err(os)? * entry;
            let (base, size) = (offset("module_memory", "base")?, offset("module_memory", "size")?);
            (mem + base, init + base, init + size)
        } else {
            (
                offset("module", "core_layout.base")?,
                offset("module", "init_layout.base")?,
                offset("module", "init_layout.size")?,
            )
        };
        Ok(Self {
            current,
            pid: offset("task_struct", "pid")?,
            tgid: offset("task_struct", "tgid")?,
            comm: offset("task_struct", "comm")?,
            real_parent: offset("task_struct", "real_parent")?,
            regs_di: offset("pt_regs", "di")?,
            regs_si: offset("pt_regs", "si")?,
            regs_dx: offset("pt_regs", "dx")?,
            module_name: offset("module", "name")?,
            module_base,
            module_init_base,
            module_init_size,
        })
    }

    /// A read of the current task's field at `offset`, behind `via` more pointers.
    fn task(&self, via: &[i64], offset: i64, kind: CaptureKind, max_len: u32) -> Capture {
        let mut derefs = vec![self.current];
        derefs.extend_from_slice(via);
        Capture { base: CAPTURE_BASE_GS, derefs, offset, kind, max_len }
    }

    /// The process id, thread id, parent's process id and command of the current task.
    fn who(&self) -> [Capture; 4] {
        [
            self.task(&[], self.tgid, CaptureKind::U32, 0),
            self.task(&[], self.pid, CaptureKind::U32, 0),
            self.task(&[self.real_parent], self.tgid, CaptureKind::U32, 0),
            self.task(&[], self.comm, CaptureKind::String, COMM_LEN),
        ]
    }
}

/// A read of the string (or string array) that the user pointer in the caller's
/// `pt_regs` field at `field` points to; `regs` is the register holding the `pt_regs`.
fn user_pointer(regs: u32, field: i64, kind: CaptureKind, max_len: u32) -> Capture {
    Capture { base: regs, derefs: vec![field], offset: 0, kind, max_len }
}

fn plain(base: u32, offset: i64, kind: CaptureKind, max_len: u32) -> Capture {
    Capture { base, derefs: Vec::new(), offset, kind, max_len }
}

/// The breakpoints the inspector-side trace `kinds` need.
pub(super) fn plan(kinds: u32, symbols: &[SymbolRecord], btf: &Btf) -> Result<Plan, InspectError> {
    let layout = Layout::of(symbols, btf)?;
    let at = |name: &str| symbol(symbols, name).ok_or_else(|| os(format_args!("no {name} in kallsyms")));
    let mut plan = Plan { probes: Vec::new(), points: Vec::new() };
    let mut add = |probe, address, captures: Vec<Capture>| {
        plan.probes.push(probe);
        plan.points.push(Breakpoint { address, captures });
    };
    let [tgid, pid, ppid, comm] = layout.who();
    if kinds & EXEC != 0 {
        for (probe, name, filename, argv) in [
            (Probe::Execve, "__x64_sys_execve", layout.regs_di, layout.regs_si),
            (Probe::Execveat, "__x64_sys_execveat", layout.regs_si, layout.regs_dx),
        ] {
            let captures = vec![
                user_pointer(RDI, filename, CaptureKind::String, MAX_PATH),
                user_pointer(RDI, argv, CaptureKind::StringArray, MAX_ARG),
                tgid.clone(),
                pid.clone(),
                ppid.clone(),
                comm.clone(),
            ];
            add(probe, at(name)?, captures);
        }
    }
    if kinds & EXIT != 0 {
        let captures = vec![plain(RDI, 0, CaptureKind::Address, 0), tgid.clone(), pid.clone(), comm.clone()];
        add(Probe::Exit, at("do_exit")?, captures);
    }
    if kinds & MODULE_LOAD != 0 {
        let captures = vec![
            plain(RDI, layout.module_name, CaptureKind::String, MODULE_NAME_LEN),
            plain(RDI, layout.module_base, CaptureKind::U64, 0),
            tgid,
            comm,
            plain(RDI, layout.module_init_base, CaptureKind::U64, 0),
            plain(RDI, layout.module_init_size, CaptureKind::U32, 0),
        ];
        add(Probe::ModuleLoad, at("do_init_module")?, captures);
    }
    Ok(plan)
}

fn number(v: Option<&Captured>) -> Value {
    match v {
        Some(Captured::Number(n)) => json!(n),
        _ => Value::Null,
    }
}

fn text(v: Option<&Captured>) -> Value {
    match v {
        Some(Captured::Bytes(b)) => json!(String::from_utf8_lossy(b)),
        _ => Value::Null,
    }
}

fn texts(v: Option<&Captured>) -> Value {
    match v {
        Some(Captured::Strings(list)) => list.iter().map(|b| String::from_utf8_lossy(b)).collect(),
        _ => Value::Null,
    }
}

/// The event a hit of `probe` makes: its kind and detail (fields the hit could not
/// read are null).
pub(super) fn event(probe: Probe, hit: &BreakpointHit) -> (&'static str, Value) {
    let v = |i: usize| hit.values.get(i);
    match probe {
        Probe::Execve | Probe::Execveat => (
            "trace.exec",
            json!({
                "vcpu": hit.vcpu,
                "pid": number(v(2)),
                "tid": number(v(3)),
                "ppid": number(v(4)),
                "comm": text(v(5)),
                "filename": text(v(0)),
                "argv": texts(v(1)),
                "syscall": if probe == Probe::Execve { "execve" } else { "execveat" },
            }),
        ),
        Probe::Exit => {
            let code = match v(0) {
                Some(Captured::Number(n)) => Some(*n as i64),
                _ => None,
            };
            // do_exit's code: the exit status in bits 8-15, or the killing signal in 0-6.
            let status = code.filter(|c| c & 0x7f == 0).map(|c| (c >> 8) & 0xff);
            let signal = code.map(|c| c & 0x7f).filter(|&s| s != 0);
            (
                "trace.exit",
                json!({
                    "vcpu": hit.vcpu,
                    "pid": number(v(1)),
                    "tid": number(v(2)),
                    "comm": text(v(3)),
                    "code": code,
                    "status": status,
                    "signal": signal,
                }),
            )
        }
        Probe::ModuleLoad => {
            let address = |v: Option<&Captured>| match v {
                Some(Captured::Number(n)) => json!(format!("{n:#x}")),
                _ => Value::Null,
            };
            (
                "trace.module_load",
                json!({
                    "vcpu": hit.vcpu,
                    "name": text(v(0)),
                    "base": address(v(1)),
                    "loader_pid": number(v(2)),
                    "loader_comm": text(v(3)),
                    "init_text": { "base": address(v(4)), "size": number(v(5)) },
                }),
            )
        }
    }
}

/// A module's init text as its load reported it: `(name, base, size)`, for placing
/// what its init does (the code is freed once the init returns, so the agent, asked
/// later, finds no module there).
pub(super) fn init_text(probe: Probe, hit: &BreakpointHit) -> Option<(String, u64, u64)> {
    if probe != Probe::ModuleLoad {
        return None;
    }
    match (hit.values.first(), hit.values.get(4), hit.values.get(5)) {
        (Some(Captured::Bytes(name)), Some(&Captured::Number(base)), Some(&Captured::Number(size)))
            if base != 0 && size != 0 =>
        {
            Some((String::from_utf8_lossy(name).into_owned(), base, size))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(values: Vec<Captured>) -> BreakpointHit {
        BreakpointHit { vcpu: 1, index: 0, rip: 0, cr3: 0, values }
    }

    #[test]
    fn an_exec_hit_is_the_program_its_arguments_and_who_ran_it() {
        let values = vec![
            Captured::Bytes(b"/bin/echo".to_vec()),
            Captured::Strings(vec![b"echo".to_vec(), b"hi".to_vec()]),
            Captured::Number(140),
            Captured::Number(140),
            Captured::Number(1),
            Captured::Bytes(b"sh".to_vec()),
        ];
        let (kind, detail) = event(Probe::Execve, &hit(values));
        assert_eq!(kind, "trace.exec");
        assert_eq!(
            detail,
            json!({ "vcpu": 1, "pid": 140, "tid": 140, "ppid": 1, "comm": "sh", "filename": "/bin/echo",
                    "argv": ["echo", "hi"], "syscall": "execve" })
        );
        // What the hit could not read is null, not made up.
        let (_, detail) = event(Probe::Execveat, &hit(vec![Captured::Missing]));
        assert_eq!((detail["filename"].clone(), detail["argv"].clone()), (Value::Null, Value::Null));
        assert_eq!(detail["syscall"], "execveat");
    }

    #[test]
    fn an_exit_code_is_a_status_or_a_signal() {
        let exit = |code: u64| event(Probe::Exit, &hit(vec![Captured::Number(code)])).1;
        assert_eq!((exit(3 << 8)["status"].clone(), exit(3 << 8)["signal"].clone()), (json!(3), Value::Null));
        assert_eq!((exit(9)["status"].clone(), exit(9)["signal"].clone()), (Value::Null, json!(9)));
    }

    #[test]
    fn a_module_load_names_the_module_its_base_and_its_init_text() {
        let values = vec![
            Captured::Bytes(b"specula_rootkit".to_vec()),
            Captured::Number(0xffff_ffff_c000_0000),
            Captured::Number(700),
            Captured::Bytes(b"insmod".to_vec()),
            Captured::Number(0xffff_ffff_c020_d000),
            Captured::Number(0x1000),
        ];
        let (kind, detail) = event(Probe::ModuleLoad, &hit(values.clone()));
        assert_eq!(
            (kind, detail["name"].clone(), detail["base"].clone()),
            ("trace.module_load", json!("specula_rootkit"), json!("0xffffffffc0000000"))
        );
        assert_eq!(detail["init_text"], json!({ "base": "0xffffffffc020d000", "size": 0x1000 }));
        assert_eq!(
            init_text(Probe::ModuleLoad, &hit(values.clone())),
            Some(("specula_rootkit".into(), 0xffff_ffff_c020_d000, 0x1000))
        );
        assert_eq!(init_text(Probe::Exit, &hit(values.clone())), None);
        let mut no_init = values;
        no_init[5] = Captured::Number(0);
        assert_eq!(init_text(Probe::ModuleLoad, &hit(no_init)), None, "a module with no init text");
    }
}
