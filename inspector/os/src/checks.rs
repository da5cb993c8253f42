//! The checks a rootkit hunter runs, each comparing two views the kernel keeps
//! of the same thing, or a view against what it must be:
//!
//! | check | compares |
//! |---|---|
//! | hidden processes | the pid table (`init_pid_ns.idr`, an xarray of `struct pid`) against the task list: a thread-group leader with a pid but not on `init_task.tasks` was unlinked to hide it; a listed task with no pid was unhashed |
//! | hidden modules | the sysfs kobjects of `module_kset` and the module address tree `mod_tree` against the `modules` list |
//! | system calls | `sys_call_table` entries against the core kernel text (`_stext.._etext`); direct calls in `x64_sys_call` (the dispatch since 6.9 and in stable backports) against module memory |
//! | interrupts | present `idt_table` gates against the core kernel text (reserved vectors may keep their boot-time stub in `early_idt_handler_array`) |
//! | kernel text | every page of `_stext.._etext` against its hash when the [`Checker`] was made (right after discovery) |
//! | syscall entry (`msrs`) | each vCPU's LSTAR, supplied by the host (it is a register, not memory), against `entry_SYSCALL_64` |
//! | forgery | the valid VMCOREINFO copies found at discovery against the vCPUs' state ([`crate::anchors`]): each one they contradict, and the process whose memory holds it |
//!
//! Each check is independent: one that cannot run on this kernel (a symbol or
//! type it needs is missing) says why in [`CheckRun::error`] and the others
//! still run. Every walk is bounded like the views' walks. The kernel changes
//! while it is read; the process check walks the task list before and after the
//! pid table so that a process forked or reaped meanwhile is not reported.
//!
//! The kernel-text check compares against hashes taken earlier, so the checks run
//! through a [`Checker`], which holds them: make one right after
//! [`Linux::discover`] (that is when the text is believed to be the kernel's own)
//! and run it as often as wanted. The checks read the kernel through the views'
//! public API ([`Linux`]) and the struct-reading helpers the views use too.

mod forgery;
mod interrupts;
mod modules;
mod processes;
mod syscalls;
#[cfg(test)]
mod tests;
mod text;

use alloc::string::String;
use alloc::vec::Vec;

use crate::btf::Btf;
use crate::kallsyms::Kallsyms;
use crate::linux::{Linux, Module};
use crate::paging::AddressSpace;
use crate::structs::{self, F};
use crate::{Error, PhysMem};

pub use text::TextBaseline;

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
const PAGE: u64 = 4096;

/// What kind of tampering a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// A valid VMCOREINFO copy whose kernel the vCPUs' state contradicts: forged kernel
    /// structures (address: its guest-physical address; id: the process whose memory
    /// holds it, where one does).
    ForgedKernel = 9,
}

impl FindingKind {
    /// The kind whose number (its `repr(u8)`, as the agent sends it) is `v`.
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
            9 => Self::ForgedKernel,
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
            Self::ForgedKernel => "forged_kernel",
        }
    }
}

/// One piece of evidence of tampering.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Finding {
    /// What kind of tampering (its [`FindingKind::name`] in JSON).
    pub kind: FindingKind,
    /// The process's pid, the system call's number, the interrupt vector, the offset in
    /// `x64_sys_call`, the vCPU; -1 where none (`null` in JSON).
    #[cfg_attr(feature = "serde", serde(with = "crate::json::finding_id", default = "crate::json::finding_id::none"))]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckRun {
    /// `processes`, `modules`, `syscalls`, `interrupts`, `kernel_text`, `msrs` or `forgery`.
    pub check: String,
    /// Tasks, modules, table entries, gates or pages looked at.
    pub examined: u64,
    /// Why the check could not run on this kernel, if it could not.
    pub error: Option<String>,
}

/// Every check's run and every finding, in check order. Its JSON, as the HTTP API has
/// it, names the runs `checks` and adds `clean`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "crate::json::CheckReportJson", from = "crate::json::CheckReportJson")
)]
pub struct CheckReport {
    /// Each check that was asked for, in [`select::NAMES`] order.
    pub runs: Vec<CheckRun>,
    /// What they found, in the same order.
    pub findings: Vec<Finding>,
}

/// Which checks [`Checker::run`] runs (bits of its argument).
pub mod select {
    /// Hidden and unhashed processes.
    pub const PROCESSES: u64 = 1;
    /// Hidden modules.
    pub const MODULES: u64 = 2;
    /// The system call table and the dispatch function.
    pub const SYSCALLS: u64 = 4;
    /// The interrupt gates.
    pub const INTERRUPTS: u64 = 8;
    /// The kernel text against its hashes.
    pub const KERNEL_TEXT: u64 = 16;
    /// Needs the vCPUs' LSTAR values from the host ([`crate::checks::Checker::run_with`]).
    pub const MSRS: u64 = 32;
    /// Valid kernel structures the vCPUs contradict (needs an anchored discovery).
    pub const FORGERY: u64 = 64;
    /// Every check.
    pub const ALL: u64 = 127;
    /// What runs when no check is named: every check that only reads guest memory.
    /// `msrs` is asked for by name, because reading registers may pause the guest
    /// (QEMU writes them only in a device-state snapshot).
    pub const DEFAULT: u64 = ALL & !MSRS;
    /// The API's names, in bit order.
    pub const NAMES: [&str; 7] = ["processes", "modules", "syscalls", "interrupts", "kernel_text", "msrs", "forgery"];
}

/// Runs the rootkit checks against one kernel, holding what they compare with: the
/// hashes of the kernel's text when the checker was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checker {
    /// Why the text could not be hashed, if it could not: the kernel-text check then
    /// reports that error and the other checks still run.
    text: Result<TextBaseline, Error>,
}

impl Checker {
    /// A checker for `linux`, its kernel-text baseline hashed now (every page of
    /// `_stext.._etext`, at most [`MAX_TEXT_BYTES`]).
    pub fn new<M: PhysMem + ?Sized>(linux: &Linux<'_, M>) -> Self {
        Checker { text: TextBaseline::take(linux.kernel(), linux.kallsyms()) }
    }

    /// The kernel-text hashes the checker compares with, or why there are none.
    pub fn text_baseline(&self) -> Result<&TextBaseline, &Error> {
        self.text.as_ref()
    }

    /// Runs the checks `which` selects (bits of [`select`]) on `linux`, the kernel the
    /// checker was made for (or the same kernel found again).
    pub fn run<M: PhysMem + ?Sized>(&self, linux: &Linux<'_, M>, which: u64) -> CheckReport {
        self.run_with(linux, which, None)
    }

    /// [`Checker::run`], with each vCPU's `(index, LSTAR)` for the `msrs` check (read by
    /// the host from the vCPUs; without them that check reports why it could not run).
    pub fn run_with<M: PhysMem + ?Sized>(
        &self,
        linux: &Linux<'_, M>,
        which: u64,
        lstars: Option<&[(u32, u64)]>,
    ) -> CheckReport {
        const ATTRIBUTED: u64 = select::SYSCALLS | select::INTERRUPTS | select::MSRS;
        let run = Run { linux, kernel: linux.kernel(), kallsyms: linux.kallsyms(), btf: linux.btf() };
        let mut report = CheckReport::default();
        let mut hidden_modules = Vec::new();
        // The module list names redirected handlers: walked once for all checks.
        let listed_modules = if which & ATTRIBUTED != 0 { linux.modules().unwrap_or_default() } else { Vec::new() };
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
                0 => run.check_processes(&mut found),
                1 => run.check_modules(&mut found).inspect(|_| hidden_modules = found.clone()),
                2 => run.check_syscalls(&listed_modules, &hidden_modules, &mut found),
                3 => run.check_interrupts(&listed_modules, &hidden_modules, &mut found),
                4 => run.check_text(&self.text, &mut found),
                5 => run.check_syscall_entry(lstars, &listed_modules, &hidden_modules, &mut found),
                _ => run.check_forgery(&mut found),
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
}

/// One run of the checks: the kernel they read, through its public views and the
/// shared struct readers.
struct Run<'r, 'a, M: PhysMem + ?Sized> {
    linux: &'r Linux<'a, M>,
    kernel: &'r AddressSpace<'a, M>,
    kallsyms: &'r Kallsyms,
    btf: &'r Btf,
}

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    fn field(&self, base: u64, f: F) -> Result<u64, Error> {
        structs::field(self.kernel, base, f)
    }

    fn pointer(&self, base: u64, f: F, what: &str) -> Result<u64, Error> {
        structs::pointer(self.kernel, base, f, what)
    }

    fn read_string(&self, va: u64, max: u64) -> Result<String, Error> {
        structs::read_string(self.kernel, va, max)
    }

    fn walk_list(
        &self,
        head: u64,
        list: &'static str,
        max: usize,
        f: impl FnMut(u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        structs::walk_list(self.kernel, head, list, max, f)
    }

    /// The module (listed or hidden) whose memory holds `va`.
    fn module_holding(&self, listed: &[Module], hidden: &[Finding], va: u64) -> Option<String> {
        let inside = |m: &Module| va >= m.base && va - m.base < m.size;
        if let Some(m) = listed.iter().find(|m| inside(m)) {
            return Some(m.name.clone());
        }
        hidden
            .iter()
            .filter_map(|f| self.linux.module_at(f.address).ok())
            .find(inside)
            .map(|m| alloc::format!("{} (hidden)", m.name))
    }
}
