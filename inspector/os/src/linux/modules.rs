//! The loaded modules: the `modules` list, each `struct module`'s name, state and
//! memory (`core_layout` on Linux ≤ 6.3, `mem[]` since 6.4).

use alloc::string::String;
use alloc::vec::Vec;

use super::layout::ModuleMem;
use super::Linux;
use crate::paging::VirtMem;
use crate::structs;
use crate::{Error, PhysMem};

/// Most modules walked.
pub const MAX_MODULES: usize = 4096;

/// A loaded kernel module. In JSON `state` is the enumerator's name, as the HTTP API
/// has it, and the number is `state_value`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Module {
    /// Kernel address of its `struct module`.
    pub module: u64,
    /// `name`.
    pub name: String,
    /// `state` as stored (`state_value` in JSON).
    #[cfg_attr(feature = "serde", serde(rename = "state_value"))]
    pub state: i64,
    /// The state's enumerator name from BTF (`MODULE_STATE_LIVE`, ...; `state` in JSON).
    #[cfg_attr(feature = "serde", serde(rename = "state"))]
    pub state_name: Option<String>,
    /// Base of its text (`core_layout.base`, or `mem[MOD_TEXT].base`).
    pub base: u64,
    /// Total size as /proc/modules shows it (`core_layout.size + init_layout.size`,
    /// or the sum of every `mem[].size`).
    pub size: u64,
}

impl<M: PhysMem + ?Sized> Linux<'_, M> {
    /// The kernel address of the `modules` list head. Several local symbols may be
    /// called `modules`; the list head is the one whose first node points back at it.
    pub fn modules_head(&self) -> Result<u64, Error> {
        for s in self.kallsyms.lookup_all("modules") {
            let next = self.kernel.read_u64(s.address);
            let back = next.and_then(|n| self.kernel.read_u64(n.wrapping_add(8)));
            if back.is_ok_and(|b| b == s.address) {
                return Ok(s.address);
            }
        }
        Err(Error::Corrupt("no `modules` symbol is a list head".into()))
    }

    /// Every module on the `modules` list, in list order; a walk that fails on guest
    /// memory is made again ([`super::walked_until_consistent`]).
    pub fn modules(&self) -> Result<Vec<Module>, Error> {
        super::walked_until_consistent(&self.walks_redone, || self.modules_walked_once())
    }

    fn modules_walked_once(&self) -> Result<Vec<Module>, Error> {
        let head = self.modules_head()?;
        let mut out = Vec::new();
        structs::walk_list(&self.kernel, head, "module", MAX_MODULES, |node| {
            out.push(self.module_at(node.wrapping_sub(self.layout.mod_list.off))?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The module whose `struct module` is at kernel address `module`, whether or not
    /// it is on the module list (the rootkit checks name modules found elsewhere).
    pub fn module_at(&self, module: u64) -> Result<Module, Error> {
        let l = &self.layout;
        let state = self.field(module, l.mod_state)?;
        let state = match l.mod_state.size {
            4 => i64::from(state as u32 as i32),
            _ => state as i64,
        };
        let (base, size) = match &l.mod_mem {
            ModuleMem::Layout { core_base, core_size, init_size } => (
                self.field(module, *core_base)?,
                self.field(module, *core_size)?.saturating_add(self.field(module, *init_size)?),
            ),
            ModuleMem::Mem { mem, stride, count, text, base, size } => {
                let at = |i: u64| module.wrapping_add(*mem).wrapping_add(i.wrapping_mul(*stride));
                let mut total = 0u64;
                for i in 0..*count {
                    total = total.saturating_add(self.field(at(i), *size)?);
                }
                (self.field(at(*text), *base)?, total)
            }
        };
        Ok(Module {
            module,
            name: self.read_string(module.wrapping_add(l.mod_name.off), l.mod_name.size)?,
            state,
            state_name: self.btf.enum_name(l.mod_state_type, state).ok().flatten().map(String::from),
            base,
            size,
        })
    }

    /// Whether modules use `mem[]` (Linux ≥ 6.4) rather than `core_layout`.
    pub fn modules_use_mem_array(&self) -> bool {
        matches!(self.layout.mod_mem, ModuleMem::Mem { .. })
    }
}
