//! The checks a rootkit hunter runs, each comparing two views the kernel keeps
//! of the same thing, or a view against what it must be:
//!
//! | check | compares |
//! |---|---|
//! | hidden processes | the pid table (`init_pid_ns.idr`, an xarray of `struct pid`) against the task list: a thread-group leader with a pid but not on `init_task.tasks` was unlinked to hide it; a listed task with no pid was unhashed |
//! | hidden modules | the sysfs kobjects of `module_kset` and the module address tree `mod_tree` against the `modules` list |
//! | system calls | `sys_call_table` entries against the core kernel text (`_stext.._etext`); direct calls in `x64_sys_call` (the dispatch since 6.9 and in stable backports) against module memory |
//! | interrupts | present `idt_table` gates against the core kernel text (reserved vectors may keep their boot-time stub in `early_idt_handler_array`) |
//! | kernel text | every page of `_stext.._etext` against its hash at discovery |
//! | syscall entry (`msrs`) | each vCPU's LSTAR, supplied by the host (it is a register, not memory), against `entry_SYSCALL_64` |
//!
//! Each check is independent: one that cannot run on this kernel (a symbol or
//! type it needs is missing) says why in [`CheckRun::error`] and the others
//! still run. Every walk is bounded like the views' walks. The kernel changes
//! while it is read; the process check walks the task list before and after the
//! pid table so that a process forked or reaped meanwhile is not reported.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use crate::kallsyms::Kallsyms;
use crate::linux::{Module, F};
use crate::paging::{AddressSpace, VirtMem};
use crate::{Error, Linux, PhysMem};

/// Most xarray nodes visited in the pid table (pid_max is at most 2^22, 64 per leaf node).
pub const MAX_PID_NODES: usize = 1 << 17;
/// Most kobjects walked in `module_kset` (built-in modules with parameters have one too).
pub const MAX_MODULE_KOBJECTS: usize = 1 << 14;
/// Most nodes visited in the module address tree.
pub const MAX_MOD_TREE_NODES: usize = 1 << 16;
/// Deepest red-black tree walked (a valid tree of 2^16 nodes is at most 32 deep).
pub const MAX_RB_DEPTH: usize = 64;
/// Largest core kernel text hashed (Debian's 6.x text is about 12 MiB).
pub const MAX_TEXT_BYTES: u64 = 64 << 20;
/// Most bytes of `x64_sys_call` decoded for direct calls.
pub const MAX_DISPATCH_BYTES: u64 = 64 << 10;
/// Most findings of one kind reported (the rest are counted in [`CheckRun::examined`]).
pub const MAX_FINDINGS: usize = 256;
/// Deepest xarray walked (64-bit indices, 6 bits per level).
const MAX_XA_DEPTH: usize = 11;
const IDT_ENTRIES: u64 = 256;
const PAGE: u64 = 4096;
const KERNEL_MIN: u64 = 0xffff_8000_0000_0000;

/// What kind of tampering a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum FindingKind {
    /// In the pid table but not on the task list.
    HiddenProcess = 1,
    /// On the task list but not in the pid table.
    UnhashedProcess = 2,
    /// Has a sysfs kobject or a module-tree node but is not on the module list.
    HiddenModule = 3,
    /// A system call table entry outside the core kernel text.
    SyscallRedirected = 4,
    /// An interrupt gate outside the core kernel text.
    InterruptHooked = 5,
    /// A kernel text page whose bytes changed since discovery.
    KernelTextModified = 6,
    /// A direct call in `x64_sys_call` (the dispatch since 6.9) into module memory.
    SyscallDispatchRedirected = 7,
    /// A vCPU whose LSTAR (where `syscall` enters the kernel) is not `entry_SYSCALL_64`.
    SyscallEntryHooked = 8,
}

impl FindingKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::HiddenProcess,
            2 => Self::UnhashedProcess,
            3 => Self::HiddenModule,
            4 => Self::SyscallRedirected,
            5 => Self::InterruptHooked,
            6 => Self::KernelTextModified,
            7 => Self::SyscallDispatchRedirected,
            8 => Self::SyscallEntryHooked,
            _ => return None,
        })
    }

    /// The API's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::HiddenProcess => "hidden_process",
            Self::UnhashedProcess => "unhashed_process",
            Self::HiddenModule => "hidden_module",
            Self::SyscallRedirected => "syscall_redirected",
            Self::InterruptHooked => "interrupt_hooked",
            Self::KernelTextModified => "kernel_text_modified",
            Self::SyscallDispatchRedirected => "syscall_dispatch_redirected",
            Self::SyscallEntryHooked => "syscall_entry_hooked",
        }
    }
}

/// One piece of evidence of tampering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// The process's pid, the system call's number, the interrupt vector; -1 where none.
    pub id: i64,
    /// The process's `comm`, the module's name, the system call's name, the text page's symbol.
    pub name: Option<String>,
    /// The `task_struct`, the `struct module`, the handler, the text page (kernel addresses).
    pub address: u64,
    /// The module a redirected handler points into, where one does; where a hidden
    /// module was found (`sysfs kobject`, `module tree`).
    pub detail: Option<String>,
}

/// Which check ran, over how many things, and why it could not run if it could not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRun {
    /// `processes`, `modules`, `syscalls`, `interrupts` or `kernel_text`.
    pub check: String,
    /// Tasks, modules, table entries, gates or pages looked at.
    pub examined: u64,
    pub error: Option<String>,
}

/// Every check's run and every finding, in check order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub runs: Vec<CheckRun>,
    pub findings: Vec<Finding>,
}

/// Which checks [`Linux::rootkit_checks`] runs (bits of its argument).
pub mod select {
    pub const PROCESSES: u64 = 1;
    pub const MODULES: u64 = 2;
    pub const SYSCALLS: u64 = 4;
    pub const INTERRUPTS: u64 = 8;
    pub const KERNEL_TEXT: u64 = 16;
    /// Needs the vCPUs' LSTAR values from the host ([`crate::Linux::rootkit_checks_with`]).
    pub const MSRS: u64 = 32;
    pub const ALL: u64 = 63;
    /// What runs when no check is named: every check that only reads guest memory.
    /// `msrs` is asked for by name, because reading registers may pause the guest
    /// (QEMU writes them only in a device-state snapshot).
    pub const DEFAULT: u64 = ALL & !MSRS;
    /// The API's names, in bit order.
    pub const NAMES: [&str; 6] = ["processes", "modules", "syscalls", "interrupts", "kernel_text", "msrs"];
}

/// Per-page hashes of the core kernel text, taken at discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBaseline {
    start: u64,
    hashes: Vec<u64>,
}

impl TextBaseline {
    /// Hashes `_stext.._etext` page by page.
    pub(crate) fn take<M: PhysMem + ?Sized>(kernel: &AddressSpace<'_, M>, k: &Kallsyms) -> Result<Self, Error> {
        let (start, end) = text_range(k)?;
        let mut hashes = Vec::with_capacity(((end - start) / PAGE) as usize);
        let mut buf = alloc::vec![0u8; PAGE as usize];
        let mut va = start;
        while va < end {
            kernel.read_virt(va, &mut buf)?;
            hashes.push(xxhash_rust::xxh3::xxh3_64(&buf));
            va += PAGE;
        }
        Ok(TextBaseline { start, hashes })
    }
}

/// The core kernel text, page-aligned.
fn text_range(k: &Kallsyms) -> Result<(u64, u64), Error> {
    let start = k.address("_stext")? & !(PAGE - 1);
    let end = k.address("_etext")?.checked_add(PAGE - 1).ok_or(Error::Corrupt("_etext wraps".into()))? & !(PAGE - 1);
    if end <= start || end - start > MAX_TEXT_BYTES {
        return Err(Error::TooLarge { what: "kernel text bytes", value: end.wrapping_sub(start), max: MAX_TEXT_BYTES });
    }
    Ok((start, end))
}

/// Pid-table layout, from BTF.
struct PidLayout {
    idr_head: u64,
    node_shift: u64,
    node_slots: u64,
    slot_count: u64,
    pid_tasks: u64,
    pid_nr: u64,
    task_pid_link: u64,
}

impl PidLayout {
    fn new<M: PhysMem + ?Sized>(linux: &Linux<'_, M>) -> Result<Self, Error> {
        let btf = &linux.btf;
        let ns = linux.kallsyms.address("init_pid_ns")?;
        let idr_head = ns
            .wrapping_add(btf.member("pid_namespace", "idr")?.offset)
            .wrapping_add(btf.member("idr", "idr_rt")?.offset)
            .wrapping_add(btf.member("xarray", "xa_head")?.offset);
        let slots = btf.member("xa_node", "slots")?;
        let slot_count = btf.array(btf.resolve(slots.type_id)?)?.1;
        if !(2..=256).contains(&slot_count) {
            return Err(Error::BtfLookup(alloc::format!("xa_node.slots has {slot_count} entries")));
        }
        let pid_type = btf.enum_value("PIDTYPE_PID")?;
        if pid_type != 0 {
            return Err(Error::BtfLookup(alloc::format!("PIDTYPE_PID is {pid_type}, not 0")));
        }
        Ok(PidLayout {
            idr_head,
            node_shift: btf.member("xa_node", "shift")?.offset,
            node_slots: slots.offset,
            slot_count: slot_count.into(),
            pid_tasks: btf.member("pid", "tasks")?.offset,
            pid_nr: btf.member("pid", "numbers")?.offset + btf.member("upid", "nr")?.offset,
            task_pid_link: btf.member("task_struct", "pid_links")?.offset,
        })
    }
}

/// A task as the checks name it.
struct TaskId {
    pid: i32,
    tgid: i32,
    comm: Option<String>,
}

impl<'a, M: PhysMem + ?Sized> Linux<'a, M> {
    /// Runs the checks `which` selects (bits of [`select`]).
    pub fn rootkit_checks(&self, which: u64) -> CheckReport {
        self.rootkit_checks_with(which, None)
    }

    /// [`Linux::rootkit_checks`], with each vCPU's `(index, LSTAR)` for the `msrs` check
    /// (read by the host from the vCPUs; without them that check reports why it could
    /// not run).
    pub fn rootkit_checks_with(&self, which: u64, lstars: Option<&[(u32, u64)]>) -> CheckReport {
        const ATTRIBUTED: u64 = select::SYSCALLS | select::INTERRUPTS | select::MSRS;
        let mut report = CheckReport::default();
        let mut hidden_modules = Vec::new();
        // The module list names redirected handlers: walked once for all checks.
        let listed_modules = if which & ATTRIBUTED != 0 { self.modules().unwrap_or_default() } else { Vec::new() };
        for (bit, name) in select::NAMES.iter().enumerate() {
            // Module names are needed to attribute redirected handlers, so the module
            // check runs (quietly) whenever those do.
            let wanted = which & (1 << bit) != 0;
            let needed_by_others = bit == 1 && which & ATTRIBUTED != 0;
            if !(wanted || needed_by_others) {
                continue;
            }
            let mut found = Vec::new();
            let outcome = match bit {
                0 => self.check_processes(&mut found),
                1 => self.check_modules(&mut found).inspect(|_| hidden_modules = found.clone()),
                2 => self.check_syscalls(&listed_modules, &hidden_modules, &mut found),
                3 => self.check_interrupts(&listed_modules, &hidden_modules, &mut found),
                4 => self.check_text(&mut found),
                _ => self.check_syscall_entry(lstars, &listed_modules, &hidden_modules, &mut found),
            };
            if !wanted {
                continue;
            }
            let (examined, error) = match outcome {
                Ok(n) => (n, None),
                Err(e) => (0, Some(alloc::format!("{e}"))),
            };
            found.truncate(MAX_FINDINGS);
            report.findings.extend(found);
            report.runs.push(CheckRun { check: String::from(*name), examined, error });
        }
        report
    }

    /// Task addresses on the task list.
    fn listed_tasks(&self) -> Result<BTreeSet<u64>, Error> {
        let init = self.kallsyms.address("init_task")?;
        let off = self.layout.tasks.off;
        let mut out = BTreeSet::new();
        self.walk_list(init.wrapping_add(off), "task", crate::linux::MAX_TASKS, |node| {
            out.insert(node.wrapping_sub(off));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every task the pid table reaches (pid number, task address).
    fn pid_table_tasks(&self) -> Result<Vec<(i64, u64)>, Error> {
        let l = PidLayout::new(self)?;
        let mut pids = Vec::new();
        let head = self.kernel.read_u64(l.idr_head)?;
        let mut seen = BTreeSet::new();
        let mut stack = alloc::vec![(head, 0usize)];
        while let Some((entry, depth)) = stack.pop() {
            if entry == 0 || entry & 1 == 1 {
                continue; // empty, or a value entry (the pid table holds none)
            }
            if entry & 3 == 2 {
                if entry <= 4096 {
                    continue; // sibling or retry entry
                }
                let node = entry - 2;
                if node < KERNEL_MIN {
                    return Err(Error::Corrupt(alloc::format!("xarray node {node:#x} is not a kernel address")));
                }
                if depth > MAX_XA_DEPTH {
                    return Err(Error::Corrupt(alloc::format!("pid table deeper than {MAX_XA_DEPTH}")));
                }
                if !seen.insert(node) {
                    return Err(Error::ListCycle { list: "pid table node", at: node });
                }
                if seen.len() > MAX_PID_NODES {
                    return Err(Error::ListTooLong { list: "pid table node", max: MAX_PID_NODES as u64 });
                }
                let shift = self.kernel.read_uint(node.wrapping_add(l.node_shift), 1)?;
                if shift > 64 {
                    return Err(Error::Corrupt(alloc::format!("xarray node {node:#x} has shift {shift}")));
                }
                let mut slots = alloc::vec![0u8; (l.slot_count * 8) as usize];
                self.kernel.read_virt(node.wrapping_add(l.node_slots), &mut slots)?;
                for s in slots.chunks_exact(8) {
                    stack.push((u64::from_le_bytes(s.try_into().expect("8 bytes")), depth + 1));
                }
                continue;
            }
            // A `struct pid`: its PIDTYPE_PID task, if it still has one.
            if entry < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("pid table entry {entry:#x} is not a kernel address")));
            }
            let nr = i64::from(self.kernel.read_u32(entry.wrapping_add(l.pid_nr))? as i32);
            let first = self.kernel.read_u64(entry.wrapping_add(l.pid_tasks))?;
            if first == 0 {
                continue;
            }
            if first < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("pid {nr}'s task link {first:#x} is not a kernel address")));
            }
            pids.push((nr, first.wrapping_sub(l.task_pid_link)));
        }
        Ok(pids)
    }

    fn task_id(&self, task: u64) -> Result<TaskId, Error> {
        let l = &self.layout;
        Ok(TaskId {
            pid: self.field(task, l.pid)? as i32,
            tgid: self.field(task, l.tgid)? as i32,
            comm: self.read_string(task.wrapping_add(l.comm.off), l.comm.size).ok(),
        })
    }

    /// Hidden and unhashed processes; returns the number of tasks in the pid table.
    fn check_processes(&self, out: &mut Vec<Finding>) -> Result<u64, Error> {
        let before = self.listed_tasks()?;
        let table = self.pid_table_tasks()?;
        let after = self.listed_tasks()?;
        let mut hashed = BTreeSet::new();
        for &(nr, task) in &table {
            hashed.insert(task);
            if before.contains(&task) || after.contains(&task) {
                continue;
            }
            let t = self.task_id(task)?;
            // Threads are not on the task list (their leader is); a thread whose leader
            // is hidden shows up through the leader's own pid.
            if t.pid != t.tgid {
                continue;
            }
            if i64::from(t.pid) != nr {
                return Err(Error::Corrupt(alloc::format!("pid {nr} links to task {task:#x} with pid {}", t.pid)));
            }
            out.push(Finding { kind: FindingKind::HiddenProcess, id: nr, name: t.comm, address: task, detail: None });
        }
        for &task in before.intersection(&after) {
            if hashed.contains(&task) {
                continue;
            }
            let t = self.task_id(task)?;
            out.push(Finding {
                kind: FindingKind::UnhashedProcess,
                id: i64::from(t.pid),
                name: t.comm,
                address: task,
                detail: None,
            });
        }
        Ok(table.len() as u64)
    }

    /// Modules with a sysfs kobject or a module-tree node that are not on the module
    /// list; returns how many modules the list has. A kernel without `mod_tree`
    /// (CONFIG_MODULES_TREE_LOOKUP off) is checked through its kobjects alone.
    fn check_modules(&self, out: &mut Vec<Finding>) -> Result<u64, Error> {
        let head = self.modules_head()?;
        let off = self.layout.mod_list.off;
        let mut listed = BTreeSet::new();
        self.walk_list(head, "module", crate::linux::MAX_MODULES, |node| {
            listed.insert(node.wrapping_sub(off));
            Ok(())
        })?;
        let mut elsewhere: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
        for m in self.module_kobjects()? {
            elsewhere.entry(m).or_default().push("sysfs kobject");
        }
        if self.kallsyms.lookup("mod_tree").is_ok() {
            for m in self.mod_tree_modules()? {
                elsewhere.entry(m).or_default().push("module tree");
            }
        }
        for (module, sources) in elsewhere {
            if listed.contains(&module) {
                continue;
            }
            let m = self.module_at(module)?;
            out.push(Finding {
                kind: FindingKind::HiddenModule,
                id: -1,
                name: Some(m.name),
                address: module,
                detail: Some(sources.join(", ")),
            });
        }
        Ok(listed.len() as u64)
    }

    /// The `struct module` of every loadable module with a kobject in `module_kset`.
    fn module_kobjects(&self) -> Result<Vec<u64>, Error> {
        let btf = &self.btf;
        let kset = self.kernel.read_u64(self.kallsyms.address("module_kset")?)?;
        if kset < KERNEL_MIN {
            return Err(Error::Corrupt(alloc::format!("module_kset {kset:#x} is not a kernel address")));
        }
        let head = kset.wrapping_add(btf.member("kset", "list")?.offset);
        let entry = btf.member("kobject", "entry")?.offset;
        let kobj = btf.member("module_kobject", "kobj")?.offset;
        let module = F::new(btf, "module_kobject", "mod")?;
        let back = btf.member("module", "mkobj")?.offset;
        let mut out = Vec::new();
        self.walk_list(head, "module kobject", MAX_MODULE_KOBJECTS, |node| {
            let mk = node.wrapping_sub(entry).wrapping_sub(kobj);
            let m = self.pointer(mk, module, "module_kobject.mod")?;
            // Built-in modules' kobjects have no module; a loadable one's module
            // embeds the very kobject (anything else is not what it claims to be).
            if m != 0 && m.wrapping_add(back) == mk {
                out.push(m);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The `struct module` of every module in the module address tree (`mod_tree`,
    /// a latched red-black tree of each module's memory areas; copy 0 is walked).
    fn mod_tree_modules(&self) -> Result<BTreeSet<u64>, Error> {
        let btf = &self.btf;
        let root_ty = btf.resolve(self.btf_var_type("mod_tree")?)?;
        let root = self.kallsyms.address("mod_tree")?.wrapping_add(btf.member_of(root_ty, "root.tree")?.offset);
        let right = btf.member("rb_node", "rb_right")?.offset;
        let left = btf.member("rb_node", "rb_left")?.offset;
        let to_mtn = btf.member("mod_tree_node", "node")?.offset + btf.member("latch_tree_node", "node")?.offset;
        let module = F::new(btf, "mod_tree_node", "mod")?;
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut stack = alloc::vec![(self.kernel.read_u64(root)?, 0usize)];
        while let Some((node, depth)) = stack.pop() {
            if node == 0 {
                continue;
            }
            if node < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("module tree node {node:#x} is not a kernel address")));
            }
            if depth > MAX_RB_DEPTH {
                return Err(Error::Corrupt(alloc::format!("module tree deeper than {MAX_RB_DEPTH}")));
            }
            if !seen.insert(node) {
                return Err(Error::ListCycle { list: "module tree", at: node });
            }
            if seen.len() > MAX_MOD_TREE_NODES {
                return Err(Error::ListTooLong { list: "module tree", max: MAX_MOD_TREE_NODES as u64 });
            }
            let m = self.pointer(node.wrapping_sub(to_mtn), module, "mod_tree_node.mod")?;
            if m != 0 {
                out.insert(m);
            }
            stack.push((self.kernel.read_u64(node.wrapping_add(left))?, depth + 1));
            stack.push((self.kernel.read_u64(node.wrapping_add(right))?, depth + 1));
        }
        Ok(out)
    }

    /// The BTF type of the global variable `name`, or the struct it is known to be.
    fn btf_var_type(&self, name: &str) -> Result<u32, Error> {
        // BTF has VAR records only for per-CPU variables; `mod_tree` is a
        // `struct mod_tree_root` (kernel/module/internal.h since 5.19).
        match name {
            "mod_tree" => self.btf.struct_id("mod_tree_root"),
            _ => Err(Error::BtfLookup(alloc::format!("no type known for {name}"))),
        }
    }

    /// The module (listed or hidden) whose memory holds `va`.
    fn module_holding(&self, listed: &[Module], hidden: &[Finding], va: u64) -> Option<String> {
        let inside = |m: &Module| va >= m.base && va - m.base < m.size;
        if let Some(m) = listed.iter().find(|m| inside(m)) {
            return Some(m.name.clone());
        }
        hidden
            .iter()
            .filter_map(|f| self.module_at(f.address).ok())
            .find(inside)
            .map(|m| alloc::format!("{} (hidden)", m.name))
    }

    /// System call table entries outside the core kernel text, and calls from the
    /// dispatch function into modules; returns the entries checked.
    fn check_syscalls(&self, listed: &[Module], hidden: &[Finding], out: &mut Vec<Finding>) -> Result<u64, Error> {
        let c = self.syscall_table_check_in(listed)?;
        self.check_dispatch(listed, hidden, out)?;
        let names = self.syscall_names(u64::from(c.entries));
        for e in &c.redirected {
            out.push(Finding {
                kind: FindingKind::SyscallRedirected,
                id: i64::from(e.nr),
                name: names.get(e.nr as usize).cloned().flatten(),
                address: e.target,
                detail: self.module_holding(listed, hidden, e.target),
            });
        }
        Ok(c.entries.into())
    }

    /// `x64_sys_call` is a switch of direct calls to the `__x64_sys_*` handlers. Every
    /// `call rel32`/`jmp rel32` encoding in its body whose target lies in a module (listed
    /// or hidden) is reported: a hook placed there redirects a system call without
    /// touching the table. A byte pattern that only looks like a call but lands in a
    /// module is vanishingly unlikely (modules occupy a few MiB of the 4 GiB a rel32
    /// reaches). A kernel without `x64_sys_call` is not an error.
    fn check_dispatch(&self, listed: &[Module], hidden: &[Finding], out: &mut Vec<Finding>) -> Result<(), Error> {
        let Ok(start) = self.kallsyms.address("x64_sys_call") else { return Ok(()) };
        let end = self.kallsyms.next_address(start).unwrap_or(start);
        let len = (end - start).min(MAX_DISPATCH_BYTES);
        let mut code = alloc::vec![0u8; len as usize];
        self.kernel.read_virt(start, &mut code)?;
        for i in 0..code.len().saturating_sub(4) {
            if code[i] != 0xe8 && code[i] != 0xe9 {
                continue;
            }
            let rel = i32::from_le_bytes(code[i + 1..i + 5].try_into().expect("4 bytes"));
            let target = start.wrapping_add(i as u64 + 5).wrapping_add(rel as i64 as u64);
            if let Some(module) = self.module_holding(listed, hidden, target) {
                out.push(Finding {
                    kind: FindingKind::SyscallDispatchRedirected,
                    id: i as i64,
                    name: Some(String::from("x64_sys_call")),
                    address: target,
                    detail: Some(module),
                });
            }
        }
        Ok(())
    }

    /// System call names by number from the tracing metadata (`syscalls_metadata`,
    /// CONFIG_FTRACE_SYSCALLS), where the kernel has it; `None` for each unknown one.
    fn syscall_names(&self, entries: u64) -> Vec<Option<String>> {
        let mut out = alloc::vec![None; entries as usize];
        let Ok(name) = F::new(&self.btf, "syscall_metadata", "name") else { return out };
        let Ok(table) = self.kallsyms.address("syscalls_metadata").and_then(|a| self.kernel.read_u64(a)) else {
            return out;
        };
        if table < KERNEL_MIN {
            return out;
        }
        for (nr, slot) in out.iter_mut().enumerate() {
            let meta = self.kernel.read_u64(table.wrapping_add(8 * nr as u64)).unwrap_or(0);
            if meta < KERNEL_MIN {
                continue;
            }
            let Ok(at) = self.pointer(meta, name, "syscall_metadata.name") else { continue };
            if at != 0 {
                *slot = self.read_string(at, 64).ok().map(|n| n.strip_prefix("sys_").map(String::from).unwrap_or(n));
            }
        }
        out
    }

    /// Present interrupt gates outside the core kernel text; returns the gates checked.
    fn check_interrupts(&self, listed: &[Module], hidden: &[Finding], out: &mut Vec<Finding>) -> Result<u64, Error> {
        let table = self.kallsyms.address("idt_table")?;
        let (text_start, text_end) = (self.kallsyms.address("_stext")?, self.kallsyms.address("_etext")?);
        let mut raw = alloc::vec![0u8; (IDT_ENTRIES * 16) as usize];
        self.kernel.read_virt(table, &mut raw)?;
        // Vectors the kernel never installs a handler for (reserved exceptions) keep
        // the one set up at boot: entry `vector` of `early_idt_handler_array`
        // (32 stubs of equal size, in init text). Only that exact address is accepted.
        let early = self.kallsyms.address("early_idt_handler_array").ok().and_then(|base| {
            let end = self.kallsyms.next_address(base)?;
            let stride = (end - base) / 32;
            (stride > 0).then_some((base, stride))
        });
        let mut present = 0;
        for (vector, gate) in raw.chunks_exact(16).enumerate() {
            // struct gate_struct: offset_low u16, segment u16, bits u16 (P is bit 15),
            // offset_middle u16, offset_high u32, reserved u32.
            let word = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
            if word(4) & 0x8000 == 0 {
                continue;
            }
            present += 1;
            let high = u64::from(u32::from_le_bytes(gate[8..12].try_into().expect("4 bytes")));
            let target = word(0) | word(6) << 16 | high << 32;
            let boot_stub = early.is_some_and(|(base, stride)| vector < 32 && target == base + vector as u64 * stride);
            if (text_start..text_end).contains(&target) || boot_stub {
                continue;
            }
            out.push(Finding {
                kind: FindingKind::InterruptHooked,
                id: vector as i64,
                name: None,
                address: target,
                detail: self.module_holding(listed, hidden, target),
            });
        }
        Ok(present)
    }

    /// vCPUs whose LSTAR is not `entry_SYSCALL_64` (a hook there sees every system
    /// call before the table does); returns the vCPUs checked. A zero LSTAR (a vCPU
    /// the kernel has not brought up) is not checked.
    fn check_syscall_entry(
        &self,
        lstars: Option<&[(u32, u64)]>,
        listed: &[Module],
        hidden: &[Finding],
        out: &mut Vec<Finding>,
    ) -> Result<u64, Error> {
        let lstars = lstars.ok_or(Error::Corrupt(String::from("the host supplied no vCPU registers (LSTAR)")))?;
        let entry = self.kallsyms.address("entry_SYSCALL_64")?;
        let core_text = self.kallsyms.address("_stext")?..self.kallsyms.address("_etext")?;
        let mut checked = 0;
        for &(cpu, lstar) in lstars.iter().filter(|(_, lstar)| *lstar != 0) {
            checked += 1;
            if lstar == entry {
                continue;
            }
            // Named by the core kernel symbol it lands in, if it lands in core text.
            let core = core_text.contains(&lstar);
            let inside = self.kallsyms.iter().filter(|s| core && s.address <= lstar).max_by_key(|s| s.address);
            out.push(Finding {
                kind: FindingKind::SyscallEntryHooked,
                id: i64::from(cpu),
                name: inside.map(|s| alloc::format!("{}+{:#x}", s.name, lstar - s.address)),
                address: lstar,
                detail: self.module_holding(listed, hidden, lstar),
            });
        }
        Ok(checked)
    }

    /// Kernel text pages whose hash differs from discovery's; returns the pages checked.
    fn check_text(&self, out: &mut Vec<Finding>) -> Result<u64, Error> {
        let base = self.text_baseline.as_ref().map_err(Clone::clone)?;
        let mut buf = alloc::vec![0u8; PAGE as usize];
        let mut changed = Vec::new();
        for (i, &want) in base.hashes.iter().enumerate() {
            let va = base.start + i as u64 * PAGE;
            self.kernel.read_virt(va, &mut buf)?;
            if xxhash_rust::xxh3::xxh3_64(&buf) != want && changed.len() < MAX_FINDINGS {
                changed.push(va);
            }
        }
        // Name each page by the text symbol it starts in, or else the first one starting
        // inside it (one pass over kallsyms).
        let mut before: Vec<Option<(u64, &str)>> = alloc::vec![None; changed.len()];
        let mut inside: Vec<Option<(u64, &str)>> = alloc::vec![None; changed.len()];
        for s in self.kallsyms.iter().filter(|s| s.kind.eq_ignore_ascii_case(&'t')) {
            for (j, &va) in changed.iter().enumerate() {
                if s.address <= va && before[j].is_none_or(|(a, _)| s.address > a) {
                    before[j] = Some((s.address, s.name));
                } else if s.address > va && s.address < va + PAGE && inside[j].is_none_or(|(a, _)| s.address < a) {
                    inside[j] = Some((s.address, s.name));
                }
            }
        }
        for (j, va) in changed.into_iter().enumerate() {
            out.push(Finding {
                kind: FindingKind::KernelTextModified,
                id: -1,
                name: before[j].or(inside[j]).map(|(_, n)| String::from(n)),
                address: va,
                detail: None,
            });
        }
        Ok(base.hashes.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::tests::{
        Guest, DISPATCH, IMAGE, KV, MODULE, MODULES, MODULE_BASE, MOD_MTN, PIDS, SYSCALLS, TASK_A, TASK_H, XA_NODE,
    };

    /// (kind, id, name, address, detail)
    type FindingRow<'a> = (FindingKind, i64, Option<&'a str>, u64, Option<&'a str>);

    fn run<'r>(report: &'r CheckReport, check: &str) -> &'r CheckRun {
        report.runs.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no {check} run: {report:#?}"))
    }

    #[test]
    fn an_untouched_synthetic_kernel_is_clean() {
        let g = Guest::new();
        let linux = Linux::discover(&g.mem).unwrap();
        let report = linux.rootkit_checks(select::ALL);
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
                ("msrs", 0, Some("corrupt kernel data: the host supplied no vCPU registers (LSTAR)"))
            ]
        );
        // Only what was asked runs (modules quietly, to name syscall targets).
        let only = linux.rootkit_checks(select::SYSCALLS);
        assert_eq!(only.runs.len(), 1);
        assert_eq!(only.runs[0].check, "syscalls");
    }

    #[test]
    fn hidden_process_module_redirected_syscall_and_patched_text_are_found() {
        let mut g = Guest::new();
        // A task in the pid table that is not on the task list.
        g.task(TASK_H, 3, "evil", crate::linux::tests::INIT_TASK, 0);
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
        let before = linux.rootkit_checks(select::KERNEL_TEXT);
        assert_eq!(before.findings, []);
        let mut patched = linux_mem.clone();
        patched.write(IMAGE + 0x10, &[0x40]);
        let baseline = linux.text_baseline.clone();
        let mut after = Linux::discover(&patched).unwrap();
        after.text_baseline = baseline;
        let entry = [(0, KV + crate::linux::tests::ENTRY_SYSCALL)];
        let report = after.rootkit_checks_with(select::ALL, Some(&entry));
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
        use crate::linux::tests::ENTRY_SYSCALL;
        let g = Guest::new();
        let linux = Linux::discover(&g.mem).unwrap();
        let entry = KV + ENTRY_SYSCALL;
        // Clean: every vCPU enters at entry_SYSCALL_64; a vCPU not brought up (0) is skipped.
        let clean = linux.rootkit_checks_with(select::MSRS, Some(&[(0, entry), (1, entry), (2, 0)]));
        assert_eq!(clean.findings, [], "{clean:#?}");
        assert_eq!((clean.runs[0].check.as_str(), clean.runs[0].examined, &clean.runs[0].error), ("msrs", 2, &None));
        // One vCPU sent into a module, another a few bytes into the real entry (past its
        // first instructions): both found, named by module or by symbol.
        let hooked =
            linux.rootkit_checks_with(select::MSRS, Some(&[(0, entry + 0x10), (1, MODULE_BASE + 0x30), (2, entry)]));
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
        let missing = linux.rootkit_checks_with(select::MSRS, None);
        assert!(missing.runs[0].error.as_deref().is_some_and(|e| e.contains("no vCPU registers")), "{missing:#?}");
    }

    #[test]
    fn an_unhashed_task_is_found() {
        let mut g = Guest::new();
        g.w64(XA_NODE + 8 + 8, 0); // pid 1 gone from the table, TASK_A still listed
        let linux = Linux::discover(&g.mem).unwrap();
        let report = linux.rootkit_checks(select::PROCESSES);
        assert_eq!(report.findings.len(), 1, "{report:#?}");
        assert_eq!((report.findings[0].kind, report.findings[0].id), (FindingKind::UnhashedProcess, 1));
    }

    #[test]
    fn hostile_tables_and_trees_are_bounded_errors() {
        // The pid table's node holds itself: a cycle, not a hang.
        let mut g = Guest::new();
        g.w64(XA_NODE + 8 + 5 * 8, (KV + XA_NODE) | 2);
        let linux = Linux::discover(&g.mem).unwrap();
        let r = linux.rootkit_checks(select::PROCESSES);
        assert!(run(&r, "processes").error.as_deref().is_some_and(|e| e.contains("cycles")), "{r:#?}");
        // A struct pid pointing at user memory.
        let mut g = Guest::new();
        g.w64(PIDS + 0x40, 0x1000);
        let r = Linux::discover(&g.mem).unwrap().rootkit_checks(select::PROCESSES);
        assert!(run(&r, "processes").error.as_deref().is_some_and(|e| e.contains("not a kernel address")), "{r:#?}");
        // The module tree's node is its own left child.
        let mut g = Guest::new();
        g.w64(MOD_MTN + 8 + 16, KV + MOD_MTN + 8);
        let r = Linux::discover(&g.mem).unwrap().rootkit_checks(select::MODULES);
        assert!(run(&r, "modules").error.as_deref().is_some_and(|e| e.contains("module tree")), "{r:#?}");
        // The kset list loops without its head; a module kobject claiming another module.
        let mut g = Guest::new();
        g.w64(MODULE + 120, KV + MODULE + 120);
        let r = Linux::discover(&g.mem).unwrap().rootkit_checks(select::MODULES);
        assert!(run(&r, "modules").error.is_some(), "{r:#?}");
        let mut g = Guest::new();
        g.w64(MODULE + 112 + 64, KV + TASK_A);
        g.link(&[MODULES]);
        g.w64(MOD_MTN, 0);
        let r = Linux::discover(&g.mem).unwrap().rootkit_checks(select::MODULES);
        assert_eq!(r.findings, [], "a kobject whose module does not embed it is not believed: {r:#?}");
    }
}
