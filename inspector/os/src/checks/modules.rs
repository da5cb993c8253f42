//! The module check: the sysfs kobjects of `module_kset` and the module address tree
//! `mod_tree` against the `modules` list.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use super::{Finding, FindingKind, Run, MAX_MODULE_KOBJECTS, MAX_MOD_TREE_NODES, MAX_RB_DEPTH};
use crate::linux::MAX_MODULES;
use crate::paging::VirtMem;
use crate::structs::{F, KERNEL_MIN};
use crate::{Error, PhysMem};

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// Modules with a sysfs kobject or a module-tree node that are not on the module
    /// list; returns how many modules the list has. A kernel without `mod_tree`
    /// (CONFIG_MODULES_TREE_LOOKUP off) is checked through its kobjects alone.
    pub(super) fn check_modules(&self, out: &mut Vec<Finding>) -> Result<u64, Error> {
        let head = self.linux.modules_head()?;
        let off = F::new(self.btf, "module", "list")?.off;
        let mut listed = BTreeSet::new();
        self.walk_list(head, "module", MAX_MODULES, |node| {
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
            let m = self.linux.module_at(module)?;
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
        let btf = self.btf;
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
        let btf = self.btf;
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
}
