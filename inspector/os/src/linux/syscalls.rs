//! The system call table check: every `sys_call_table` entry must point into the
//! core kernel's text.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Linux, Module};
use crate::paging::VirtMem;
use crate::{Error, PhysMem};

/// Most system call table entries checked.
pub const MAX_SYSCALLS: u64 = 1024;

/// A system call table entry that does not point into the core kernel's text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyscallEntry {
    /// The system call's number (its index in the table).
    pub nr: u32,
    /// Where the entry points.
    pub target: u64,
    /// The module whose memory it points into, if any.
    pub module: Option<String>,
}

/// What [`Linux::syscall_table_check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyscallCheck {
    /// Kernel virtual and physical address of `sys_call_table`.
    pub table: u64,
    /// See [`SyscallCheck::table`].
    pub table_pa: u64,
    /// Entries checked.
    pub entries: u32,
    /// The core kernel text (`_stext.._etext`), where every entry must point.
    pub text_start: u64,
    /// See [`SyscallCheck::text_start`].
    pub text_end: u64,
    /// Entries that do not point into the core kernel's text.
    pub redirected: Vec<SyscallEntry>,
}

impl<M: PhysMem + ?Sized> Linux<'_, M> {
    /// Checks the system call table: every entry must point into the core kernel's text
    /// (`_stext.._etext`); an entry that points elsewhere (into a module, or anywhere) is
    /// how a rootkit redirects a system call. Entries are counted up to the next symbol
    /// after `sys_call_table` (at most [`MAX_SYSCALLS`]).
    pub fn syscall_table_check(&self) -> Result<SyscallCheck, Error> {
        self.syscall_table_check_with(&self.modules().unwrap_or_default())
    }

    /// [`Linux::syscall_table_check`], naming targets by `modules` (the module list,
    /// already walked by the caller, so that a caller that needs it too walks it once).
    pub fn syscall_table_check_with(&self, modules: &[Module]) -> Result<SyscallCheck, Error> {
        let syms = &self.kallsyms;
        let table = syms.address("sys_call_table")?;
        let (text_start, text_end) = (syms.address("_stext")?, syms.address("_etext")?);
        let next = syms.next_address(table).unwrap_or(table + 8 * MAX_SYSCALLS);
        let mut entries = ((next - table) / 8).min(MAX_SYSCALLS);
        let table_pa = self.kernel.translate(table)?.pa;
        let targets: Vec<u64> =
            (0..entries).map(|nr| self.kernel.read_u64(table + nr * 8)).collect::<Result<_, _>>()?;
        // Alignment padding before the next symbol reads as zero entries at the end.
        while entries > 0 && targets[entries as usize - 1] == 0 {
            entries -= 1;
        }
        let mut redirected = Vec::new();
        for nr in 0..entries {
            let target = targets[nr as usize];
            if (text_start..text_end).contains(&target) {
                continue;
            }
            let module = modules.iter().find(|m| target >= m.base && target - m.base < m.size).map(|m| m.name.clone());
            redirected.push(SyscallEntry { nr: nr as u32, target, module });
        }
        Ok(SyscallCheck { table, table_pa, entries: entries as u32, text_start, text_end, redirected })
    }
}
