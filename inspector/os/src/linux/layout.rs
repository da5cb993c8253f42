//! Where the views' fields are: every member offset the views read, computed from
//! BTF once at discovery, for whichever layout this kernel has (`__state` or
//! `state`; `core_layout` or `mem[]`; a maple tree or a VMA list).

use crate::btf::Btf;
use crate::structs::F;
use crate::Error;

/// Where a module's memory is described, which changed in Linux 6.4.
#[derive(Clone, Debug)]
pub(super) enum ModuleMem {
    /// Linux ≤ 6.3: `core_layout` and `init_layout` (`struct module_layout`).
    Layout { core_base: F, core_size: F, init_size: F },
    /// Linux ≥ 6.4: `mem[MOD_MEM_NUM_TYPES]` of `struct module_memory`.
    Mem { mem: u64, stride: u64, count: u64, text: u64, base: F, size: F },
}

/// One maple node struct: where its pivots and slots are and how many.
#[derive(Clone, Copy, Debug)]
pub(super) struct MapleNode {
    pub(super) size: u64,
    pub(super) pivot: u64,
    pub(super) pivots: u64,
    pub(super) slot: u64,
    pub(super) slots: u64,
}

impl MapleNode {
    pub(super) fn new(btf: &Btf, name: &str) -> Result<MapleNode, Error> {
        let id = btf.struct_id(name)?;
        let pivot = btf.member_of(id, "pivot")?;
        let slot = btf.member_of(id, "slot")?;
        let pivots = btf.array(btf.resolve(pivot.type_id)?)?.1;
        let slots = btf.array(btf.resolve(slot.type_id)?)?.1;
        let size = btf.size_of(id)?;
        if size > 1024 || pivots > 64 || slots > 64 || pivots >= slots {
            return Err(Error::BtfLookup(alloc::format!("{name}: {pivots} pivots, {slots} slots, {size} bytes")));
        }
        Ok(MapleNode { size, pivot: pivot.offset, pivots: pivots.into(), slot: slot.offset, slots: slots.into() })
    }
}

/// Where a process's VMAs hang, which changed in Linux 6.1.
#[derive(Clone, Debug)]
pub(super) enum VmaSource {
    /// Linux ≥ 6.1: `mm->mm_mt`, a maple tree of VMA pointers.
    Maple { root: F, range: MapleNode, arange: MapleNode, leaf: u64, range_type: u64, arange_type: u64 },
    /// Older: `mm->mmap`, a list through `vm_next`.
    List { mmap: F, next: F },
}

/// The members the memory-area view reads.
#[derive(Clone, Debug)]
pub(super) struct VmaLayout {
    pub(super) source: VmaSource,
    pub(super) start: F,
    pub(super) end: F,
    pub(super) flags: F,
    pub(super) pgoff: F,
    pub(super) file: F,
    pub(super) mm: F,
    pub(super) file_dentry: F,
    pub(super) dentry_name: F,
}

impl VmaLayout {
    pub(super) fn new(btf: &Btf) -> Result<VmaLayout, Error> {
        let v = |p: &str| F::new(btf, "vm_area_struct", p);
        let source = if btf.has_member("mm_struct", "mm_mt") {
            let ty = |n: &str| btf.enum_value(n).map(|v| v as u64);
            VmaSource::Maple {
                root: F::new(btf, "mm_struct", "mm_mt.ma_root")?,
                range: MapleNode::new(btf, "maple_range_64")?,
                arange: MapleNode::new(btf, "maple_arange_64")?,
                leaf: ty("maple_leaf_64")?,
                range_type: ty("maple_range_64")?,
                arange_type: ty("maple_arange_64")?,
            }
        } else {
            VmaSource::List { mmap: F::new(btf, "mm_struct", "mmap")?, next: v("vm_next")? }
        };
        Ok(VmaLayout {
            source,
            start: v("vm_start")?,
            end: v("vm_end")?,
            flags: v("vm_flags")?,
            pgoff: v("vm_pgoff")?,
            file: v("vm_file")?,
            mm: v("vm_mm")?,
            file_dentry: F::new(btf, "file", "f_path.dentry")?,
            dentry_name: F::new(btf, "dentry", "d_name.name")?,
        })
    }
}

/// The members the process and module views read.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub(super) tasks: F,
    pub(super) pid: F,
    pub(super) tgid: F,
    pub(super) real_parent: F,
    pub(super) cred: F,
    pub(super) comm: F,
    pub(super) state: F,
    pub(super) state_name: &'static str,
    pub(super) start_time: F,
    pub(super) flags: F,
    pub(super) exit_state: F,
    pub(super) mm: F,
    pub(super) uid: F,
    pub(super) euid: F,
    pub(super) gid: F,
    pub(super) pgd: F,
    pub(super) arg_start: F,
    pub(super) arg_end: F,
    pub(super) mod_list: F,
    pub(super) mod_name: F,
    pub(super) mod_state: F,
    pub(super) mod_state_type: u32,
    pub(super) mod_mem: ModuleMem,
}

impl Layout {
    pub(super) fn new(btf: &Btf) -> Result<Layout, Error> {
        let t = |p: &str| F::new(btf, "task_struct", p);
        let (state, state_name) = match t("__state") {
            Ok(f) => (f, "__state"),
            Err(_) => (t("state")?, "state"),
        };
        let m = |p: &str| F::new(btf, "module", p);
        let mod_mem = if btf.has_member("module", "core_layout") {
            ModuleMem::Layout {
                core_base: m("core_layout.base")?,
                core_size: m("core_layout.size")?,
                init_size: m("init_layout.size")?,
            }
        } else {
            let mem = btf.member("module", "mem")?;
            let arr = btf.resolve(mem.type_id)?;
            let (elem, count) = btf.array(arr)?;
            let stride = btf.size_of(elem)?;
            let text = btf.enum_value("MOD_TEXT")?;
            if text < 0 || text as u64 >= u64::from(count) {
                return Err(Error::BtfLookup(alloc::format!("MOD_TEXT = {text} outside module.mem[{count}]")));
            }
            let base = btf.member_of(elem, "base")?;
            let size = btf.member_of(elem, "size")?;
            ModuleMem::Mem {
                mem: mem.offset,
                stride,
                count: count.into(),
                text: text as u64,
                base: F { off: base.offset, size: btf.size_of(base.type_id)? },
                size: F { off: size.offset, size: btf.size_of(size.type_id)? },
            }
        };
        let mod_state_field = btf.member("module", "state")?;
        Ok(Layout {
            tasks: t("tasks")?,
            pid: t("pid")?,
            tgid: t("tgid")?,
            real_parent: t("real_parent")?,
            cred: t("cred")?,
            comm: t("comm")?,
            state,
            state_name,
            start_time: t("start_time")?,
            flags: t("flags")?,
            exit_state: t("exit_state")?,
            mm: t("mm")?,
            uid: F::new(btf, "cred", "uid.val")?,
            euid: F::new(btf, "cred", "euid.val")?,
            gid: F::new(btf, "cred", "gid.val")?,
            pgd: F::new(btf, "mm_struct", "pgd")?,
            arg_start: F::new(btf, "mm_struct", "arg_start")?,
            arg_end: F::new(btf, "mm_struct", "arg_end")?,
            mod_list: m("list")?,
            mod_name: m("name")?,
            mod_state: m("state")?,
            mod_state_type: mod_state_field.type_id,
            mod_mem,
        })
    }
}
