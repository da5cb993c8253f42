//! The system call checks: `sys_call_table` entries against the core kernel text,
//! direct calls in `x64_sys_call` against module memory, and each vCPU's LSTAR
//! against `entry_SYSCALL_64`.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Finding, FindingKind, Run, MAX_DISPATCH_BYTES};
use crate::linux::Module;
use crate::paging::VirtMem;
use crate::structs::{F, KERNEL_MIN};
use crate::{Error, PhysMem};

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// System call table entries outside the core kernel text, and calls from the
    /// dispatch function into modules; returns the entries checked.
    pub(super) fn check_syscalls(
        &self,
        listed: &[Module],
        hidden: &[Finding],
        out: &mut Vec<Finding>,
    ) -> Result<u64, Error> {
        let c = self.linux.syscall_table_check_with(listed)?;
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
        let Ok(name) = F::new(self.btf, "syscall_metadata", "name") else { return out };
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

    /// vCPUs whose LSTAR is not `entry_SYSCALL_64` (a hook there sees every system
    /// call before the table does); returns the vCPUs checked. A zero LSTAR (a vCPU
    /// the kernel has not brought up) is not checked.
    pub(super) fn check_syscall_entry(
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
}
