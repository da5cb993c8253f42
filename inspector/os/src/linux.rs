//! Discovery of a Linux kernel in RAM and its views: kernel facts, processes,
//! modules, per-process memory.
//!
//! [`Linux::discover`] scans for VMCOREINFO, takes the first candidate whose
//! `swapper_pg_dir` translates its own virtual address to itself (so a copy
//! of the text planted elsewhere with made-up numbers is not believed), decodes
//! kallsyms (checked against VMCOREINFO's `_stext` and `swapper_pg_dir`), reads
//! and parses BTF, and computes every offset it needs from BTF once. Other
//! copies that validate but differ are counted
//! ([`KernelInfo::conflicting_vmcoreinfo`]): a guest process could fabricate
//! a self-consistent kernel (text, page tables, kallsyms, BTF) in its own
//! pages, and nothing in RAM alone tells it from the real one if it lies at a
//! lower physical address; the count makes that visible.
//!
//! Walks: the task list from `init_task.tasks` (at most [`MAX_TASKS`]), the
//! module list from `modules` (at most [`MAX_MODULES`]); a node seen twice is
//! [`Error::ListCycle`]. Command lines are read up to [`MAX_CMDLINE_BYTES`]
//! each and [`MAX_CMDLINE_TOTAL`] for a whole process list. Guest memory
//! changes while it is read (the guest runs): a walk that races with the guest
//! can fail with an error; callers retry.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;

use crate::btf::Btf;
use crate::kallsyms::{Kallsyms, KallsymsAddrs};
use crate::paging::{prefetch_walks, AddressSpace, CachedSpace, PagingMode, VirtMem};
use crate::vmcoreinfo::{self, VmcoreInfo};
use crate::{Error, PhysMem};

/// Most tasks walked (the kernel's default pid_max is 32768 on small machines).
pub const MAX_TASKS: usize = 1 << 16;
/// Most modules walked.
pub const MAX_MODULES: usize = 4096;
/// Most bytes of one command line kept (the rest is cut, [`Process::cmdline_truncated`]).
pub const MAX_CMDLINE_BYTES: u64 = 4096;
/// Most command-line bytes read for one process list.
pub const MAX_CMDLINE_TOTAL: u64 = 8 << 20;
/// `PF_KTHREAD` in `task_struct.flags` (unchanged since Linux 2.6; not in BTF, it is a #define).
pub const PF_KTHREAD: u64 = 0x0020_0000;
/// Most VMAs listed for one process (the kernel's default `vm.max_map_count` is 65530).
pub const MAX_VMAS: usize = 1 << 16;
/// Most maple-tree nodes visited for one process.
pub const MAX_MAPLE_NODES: usize = 1 << 16;
/// Deepest maple tree walked (the kernel's MAPLE_HEIGHT_MAX is 31).
pub const MAX_MAPLE_DEPTH: usize = 31;
/// `vm_flags` bits (include/linux/mm.h #defines, unchanged since Linux 2.x).
pub const VM_READ: u64 = 1;
pub const VM_WRITE: u64 = 2;
pub const VM_EXEC: u64 = 4;
pub const VM_SHARED: u64 = 8;
/// Maple-tree node pointers ("enodes", lib/maple_tree.c #defines): the node is
/// the pointer with its low 8 bits cleared, its type is bits 3..6 (the type
/// numbers themselves come from BTF's `enum maple_type`).
const MAPLE_NODE_MASK: u64 = 0xff;
const MAPLE_NODE_TYPE_SHIFT: u64 = 3;
const MAPLE_NODE_TYPE_MASK: u64 = 0xf;
/// Longest kernel string read (`comm`, module names are arrays shorter than this).
const MAX_STRING: u64 = 256;
/// Lowest kernel address (the canonical upper half).
const KERNEL_MIN: u64 = 0xffff_8000_0000_0000;

/// A member's byte offset and size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct F {
    pub(crate) off: u64,
    pub(crate) size: u64,
}

impl F {
    pub(crate) fn new(btf: &Btf, st: &str, path: &str) -> Result<F, Error> {
        let f = btf.member(st, path)?;
        if f.bitfield_size != 0 {
            return Err(Error::BtfLookup(alloc::format!("{st}.{path} is a bit-field")));
        }
        Ok(F { off: f.offset, size: btf.size_of(f.type_id)? })
    }
}

#[derive(Clone, Debug)]
enum ModuleMem {
    /// Linux ≤ 6.3: `core_layout` and `init_layout` (`struct module_layout`).
    Layout { core_base: F, core_size: F, init_size: F },
    /// Linux ≥ 6.4: `mem[MOD_MEM_NUM_TYPES]` of `struct module_memory`.
    Mem { mem: u64, stride: u64, count: u64, text: u64, base: F, size: F },
}

/// One maple node struct: where its pivots and slots are and how many.
#[derive(Clone, Copy, Debug)]
struct MapleNode {
    size: u64,
    pivot: u64,
    pivots: u64,
    slot: u64,
    slots: u64,
}

impl MapleNode {
    fn new(btf: &Btf, name: &str) -> Result<MapleNode, Error> {
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

#[derive(Clone, Debug)]
enum VmaSource {
    /// Linux ≥ 6.1: `mm->mm_mt`, a maple tree of VMA pointers.
    Maple { root: F, range: MapleNode, arange: MapleNode, leaf: u64, range_type: u64, arange_type: u64 },
    /// Older: `mm->mmap`, a list through `vm_next`.
    List { mmap: F, next: F },
}

#[derive(Clone, Debug)]
struct VmaLayout {
    source: VmaSource,
    start: F,
    end: F,
    flags: F,
    pgoff: F,
    file: F,
    mm: F,
    file_dentry: F,
    dentry_name: F,
}

impl VmaLayout {
    fn new(btf: &Btf) -> Result<VmaLayout, Error> {
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

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) tasks: F,
    pub(crate) pid: F,
    pub(crate) tgid: F,
    real_parent: F,
    cred: F,
    pub(crate) comm: F,
    state: F,
    state_name: &'static str,
    start_time: F,
    flags: F,
    exit_state: F,
    mm: F,
    uid: F,
    euid: F,
    gid: F,
    pgd: F,
    arg_start: F,
    arg_end: F,
    pub(crate) mod_list: F,
    pub(crate) mod_name: F,
    mod_state: F,
    mod_state_type: u32,
    mod_mem: ModuleMem,
}

impl Layout {
    fn new(btf: &Btf) -> Result<Layout, Error> {
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

/// Facts about the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// VMCOREINFO's `OSRELEASE` (`uname -r`).
    pub release: String,
    /// `init_uts_ns.name.release`, read through BTF (should equal `release`).
    pub uts_release: Option<String>,
    /// `KERNELOFFSET`: the KASLR slide.
    pub kaslr_offset: u64,
    /// `NUMBER(phys_base)`.
    pub phys_base: i64,
    pub paging_mode: PagingMode,
    /// Physical address of `swapper_pg_dir`.
    pub kernel_pgd: u64,
    /// `__num_online_cpus`, if kallsyms has it.
    pub online_cpus: Option<u32>,
    /// `nr_cpu_ids` (possible CPU ids), if kallsyms has it.
    pub nr_cpu_ids: Option<u32>,
    /// Where VMCOREINFO was found (guest-physical): the first valid copy in
    /// physical order.
    pub vmcoreinfo_at: u64,
    /// Other valid VMCOREINFO copies whose text differs from the one used. The
    /// kernel keeps two identical copies; a different one that also passes
    /// validation was made by someone else (a guest process can fabricate a
    /// self-consistent kernel in its own pages), so the views are suspect.
    pub conflicting_vmcoreinfo: u32,
    pub symbols: usize,
    pub btf_types: usize,
}

/// A process (thread-group leader) from the task list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// Kernel address of its `task_struct`.
    pub task: u64,
    pub pid: i32,
    pub tgid: i32,
    /// `real_parent->tgid` (0 for children of the idle task).
    pub ppid: i32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub comm: String,
    /// `__state` (6.x) or `state` (older), as stored (0 = running).
    pub state: u64,
    /// `start_time`: ns of monotonic time at fork.
    pub start_time: u64,
    pub flags: u64,
    /// `PF_KTHREAD` is set, or `mm` is NULL in a task that has not exited
    /// (an exited process, a zombie, has no mm either but is no kernel thread).
    pub kernel_thread: bool,
    /// `exit_state`: 0 while alive, EXIT_ZOMBIE (0x20) or EXIT_DEAD (0x10) after exit.
    pub exit_state: u64,
    /// Kernel address of its `mm_struct` (0 for kernel threads).
    pub mm: u64,
    /// Physical address of its page-table root (`mm->pgd`), if it has an mm.
    pub pgd: Option<u64>,
    pub arg_start: u64,
    pub arg_end: u64,
    /// The bytes between `arg_start` and `arg_end` (NUL-separated arguments),
    /// at most [`MAX_CMDLINE_BYTES`]; empty for kernel threads.
    pub cmdline: Vec<u8>,
    pub cmdline_truncated: bool,
    /// Why the command line could not be read (a page not present, ...).
    pub cmdline_error: Option<Error>,
}

impl Process {
    /// The arguments, split at NULs (lossy UTF-8).
    pub fn args(&self) -> Vec<String> {
        let trimmed = self.cmdline.strip_suffix(&[0]).unwrap_or(&self.cmdline);
        if trimmed.is_empty() {
            return Vec::new();
        }
        trimmed.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    }
}

/// A memory area of a process (`struct vm_area_struct`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// Kernel address of the `vm_area_struct`.
    pub vma: u64,
    pub start: u64,
    pub end: u64,
    pub flags: u64,
    /// Offset in the file, in pages.
    pub pgoff: u64,
    /// Kernel address of the mapped `struct file` (0 for anonymous memory).
    pub file: u64,
    /// The mapped file's name (its dentry's, without directories).
    pub file_name: Option<String>,
}

impl Vma {
    /// `rwxp`/`rwxs` as in /proc/PID/maps.
    pub fn perms(&self) -> String {
        let bit = |b: u64, c: char| if self.flags & b != 0 { c } else { '-' };
        [bit(VM_READ, 'r'), bit(VM_WRITE, 'w'), bit(VM_EXEC, 'x'), if self.flags & VM_SHARED != 0 { 's' } else { 'p' }]
            .iter()
            .collect()
    }
}

/// Most system call table entries checked.
pub const MAX_SYSCALLS: u64 = 1024;

/// A system call table entry that does not point into the core kernel's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallEntry {
    pub nr: u32,
    pub target: u64,
    /// The module whose memory it points into, if any.
    pub module: Option<String>,
}

/// What [`Linux::syscall_table_check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallCheck {
    /// Kernel virtual and physical address of `sys_call_table`.
    pub table: u64,
    pub table_pa: u64,
    pub entries: u32,
    pub text_start: u64,
    pub text_end: u64,
    pub redirected: Vec<SyscallEntry>,
}

/// A loaded kernel module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Kernel address of its `struct module`.
    pub module: u64,
    pub name: String,
    /// `state` as stored, and its enumerator name from BTF (`MODULE_STATE_LIVE`, ...).
    pub state: i64,
    pub state_name: Option<String>,
    /// Base of its text (`core_layout.base`, or `mem[MOD_TEXT].base`).
    pub base: u64,
    /// Total size as /proc/modules shows it (`core_layout.size + init_layout.size`,
    /// or the sum of every `mem[].size`).
    pub size: u64,
}

/// A Linux kernel found in physical memory.
pub struct Linux<'a, M: PhysMem + ?Sized> {
    mem: &'a M,
    vmcoreinfo: VmcoreInfo,
    pub(crate) kernel: AddressSpace<'a, M>,
    pub(crate) kallsyms: Kallsyms,
    pub(crate) btf: Btf,
    pub(crate) layout: Layout,
    vma_layout: Result<VmaLayout, Error>,
    conflicting: u32,
    /// Hashes of the core kernel text's pages at discovery ([`Linux::text_check`]).
    pub(crate) text_baseline: Result<crate::checks::TextBaseline, Error>,
}

impl<'a, M: PhysMem + ?Sized> Linux<'a, M> {
    /// Finds the kernel in `mem`: VMCOREINFO, page tables, kallsyms, BTF, layouts.
    pub fn discover(mem: &'a M) -> Result<Self, Error> {
        let (candidates, hits, mut last) = vmcoreinfo::scan(mem);
        let mut chosen: Option<(VmcoreInfo, AddressSpace<'a, M>)> = None;
        let mut conflicting = 0u32;
        for info in candidates {
            match Self::check_candidate(mem, &info) {
                Ok(kernel) => match &chosen {
                    None => chosen = Some((info, kernel)),
                    Some((first, _)) => {
                        if first.lines().ne(info.lines()) {
                            conflicting += 1;
                        }
                    }
                },
                Err(e) => last = Some(alloc::format!("text at {:#x}: {e}", info.found_at)),
            }
        }
        let (vmcoreinfo, kernel) = chosen.ok_or(Error::VmcoreinfoNotFound { candidates: hits, last })?;
        let kallsyms = Self::read_kallsyms(&kernel, &vmcoreinfo)?;
        let btf = Self::read_btf(&kernel, &kallsyms)?;
        let layout = Layout::new(&btf)?;
        let vma_layout = VmaLayout::new(&btf);
        let text_baseline = crate::checks::TextBaseline::take(&kernel, &kallsyms);
        Ok(Linux { mem, vmcoreinfo, kernel, kallsyms, btf, layout, vma_layout, conflicting, text_baseline })
    }

    fn check_candidate(mem: &'a M, info: &VmcoreInfo) -> Result<AddressSpace<'a, M>, Error> {
        let mode = if info.l5_enabled() { PagingMode::Level5 } else { PagingMode::Level4 };
        let root = info.kernel_pgd_phys()?;
        if root & 0xfff != 0 {
            return Err(Error::Vmcoreinfo(alloc::format!("swapper_pg_dir at {root:#x} is not page-aligned")));
        }
        let kernel = AddressSpace::new(mem, root, mode);
        let pgd_va = info.symbol("swapper_pg_dir")?;
        let t = kernel.translate(pgd_va)?;
        if t.pa != root {
            return Err(Error::Vmcoreinfo(alloc::format!(
                "swapper_pg_dir {pgd_va:#x} translates to {:#x} through itself, not {root:#x}",
                t.pa
            )));
        }
        Ok(kernel)
    }

    fn read_kallsyms(kernel: &AddressSpace<'a, M>, info: &VmcoreInfo) -> Result<Kallsyms, Error> {
        let sym = |n: &str| {
            info.symbol(n).map_err(|_| {
                Error::Vmcoreinfo(alloc::format!(
                    "no SYMBOL({n}): kallsyms tables are named in VMCOREINFO since Linux 6.0"
                ))
            })
        };
        let at = KallsymsAddrs {
            names: sym("kallsyms_names")?,
            num_syms: sym("kallsyms_num_syms")?,
            token_table: sym("kallsyms_token_table")?,
            token_index: sym("kallsyms_token_index")?,
            offsets: sym("kallsyms_offsets")?,
            relative_base: sym("kallsyms_relative_base")?,
        };
        let k = Kallsyms::read(kernel, &at)?;
        // `_stext` always; `init_top_pgt` (x86-64's swapper_pg_dir, a macro for it) when named.
        for (name, required) in [("_stext", true), ("init_top_pgt", false)] {
            let want = match info.symbol(name) {
                Ok(want) => want,
                Err(e) if required => return Err(e),
                Err(_) => continue,
            };
            {
                let got = k.address(name)?;
                if got != want {
                    return Err(Error::Kallsyms(alloc::format!(
                        "{name} decodes to {got:#x}, VMCOREINFO says {want:#x}"
                    )));
                }
            }
        }
        Ok(k)
    }

    fn read_btf(kernel: &AddressSpace<'a, M>, k: &Kallsyms) -> Result<Btf, Error> {
        let start = k.address("__start_BTF")?;
        let stop = k.address("__stop_BTF")?;
        let len = stop
            .checked_sub(start)
            .ok_or_else(|| Error::Btf(alloc::format!("__stop_BTF {stop:#x} < __start_BTF {start:#x}")))?;
        if len > crate::btf::MAX_BTF_BYTES as u64 {
            return Err(Error::TooLarge { what: "BTF blob bytes", value: len, max: crate::btf::MAX_BTF_BYTES as u64 });
        }
        let mut data = alloc::vec![0u8; len as usize];
        kernel.read_virt(start, &mut data)?;
        Btf::parse(data)
    }

    pub fn vmcoreinfo(&self) -> &VmcoreInfo {
        &self.vmcoreinfo
    }

    pub fn kallsyms(&self) -> &Kallsyms {
        &self.kallsyms
    }

    pub fn btf(&self) -> &Btf {
        &self.btf
    }

    /// The kernel's address space (rooted at `swapper_pg_dir`).
    pub fn kernel(&self) -> &AddressSpace<'a, M> {
        &self.kernel
    }

    /// Kernel release, KASLR, paging mode, CPUs.
    pub fn kernel_info(&self) -> Result<KernelInfo, Error> {
        let v = &self.vmcoreinfo;
        let read_sym = |name: &str| self.kallsyms.address(name).and_then(|a| self.kernel.read_u32(a)).ok();
        let uts_release = self
            .kallsyms
            .address("init_uts_ns")
            .and_then(|a| Ok(a.wrapping_add(self.btf.member("uts_namespace", "name.release")?.offset)))
            .and_then(|a| self.read_string(a, 65))
            .ok();
        Ok(KernelInfo {
            release: v.release()?.into(),
            uts_release,
            kaslr_offset: v.kernel_offset()?,
            phys_base: v.phys_base()?,
            paging_mode: self.kernel.mode(),
            kernel_pgd: self.kernel.root(),
            online_cpus: read_sym("__num_online_cpus"),
            nr_cpu_ids: read_sym("nr_cpu_ids"),
            vmcoreinfo_at: v.found_at,
            conflicting_vmcoreinfo: self.conflicting,
            symbols: self.kallsyms.len(),
            btf_types: self.btf.len(),
        })
    }

    pub(crate) fn field(&self, base: u64, f: F) -> Result<u64, Error> {
        field_in(&self.kernel, base, f)
    }

    pub(crate) fn pointer(&self, base: u64, f: F, what: &str) -> Result<u64, Error> {
        pointer_in(&self.kernel, base, f, what)
    }

    /// A NUL-terminated string of at most `max` bytes (≤ 256) at kernel `va`.
    pub fn read_string(&self, va: u64, max: u64) -> Result<String, Error> {
        read_string_in(&self.kernel, va, max)
    }

    /// Calls `f` with each node of the circular list at `head` (not the head itself).
    pub(crate) fn walk_list(
        &self,
        head: u64,
        list: &'static str,
        max: usize,
        f: impl FnMut(u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        walk_list_in(&self.kernel, head, list, max, f)
    }

    /// Every process (thread-group leader) on `init_task.tasks`, in list order
    /// (the idle task itself, pid 0, is not listed).
    ///
    /// A listing reads about ten structures per task that are rarely in cache, so it
    /// is bound by memory latency. It therefore runs in passes over all tasks (collect
    /// the list; read each task's pointers; read the fields; read command lines), and
    /// each pass asks for the lines the next pass reads ([`VirtMem::prefetch_virt`])
    /// so that their misses overlap.
    pub fn processes(&self) -> Result<Vec<Process>, Error> {
        let l = &self.layout;
        let init = self.kallsyms.address("init_task")?;
        // Tens of fields per task: one page walk per page, not per field.
        let k = CachedSpace::new(&self.kernel);
        let field = |base, f| field_in(&k, base, f);
        let pointer = |base, f, what| pointer_in(&k, base, f, what);
        let task_fields =
            [l.real_parent, l.cred, l.mm, l.flags, l.exit_state, l.pid, l.tgid, l.comm, l.state, l.start_time];

        let mut tasks = Vec::new();
        walk_list_in(&k, init.wrapping_add(l.tasks.off), "task", MAX_TASKS, |node| {
            let task = node.wrapping_sub(l.tasks.off);
            for f in task_fields {
                k.prefetch_virt(task.wrapping_add(f.off));
            }
            tasks.push(task);
            Ok(())
        })?;

        let mut links = Vec::with_capacity(tasks.len());
        for &task in &tasks {
            let parent = pointer(task, l.real_parent, "real_parent")?;
            let cred = pointer(task, l.cred, "cred")?;
            let mm = pointer(task, l.mm, "mm")?;
            for (base, f) in [(parent, l.tgid), (cred, l.uid), (cred, l.gid), (mm, l.pgd), (mm, l.arg_start)] {
                if base != 0 {
                    k.prefetch_virt(base.wrapping_add(f.off));
                }
            }
            links.push((parent, cred, mm));
        }

        let mut out = Vec::with_capacity(tasks.len());
        for (&task, &(parent, cred, mm)) in tasks.iter().zip(&links) {
            let flags = field(task, l.flags)?;
            let exit_state = field(task, l.exit_state)?;
            let mut p = Process {
                task,
                pid: field(task, l.pid)? as i32,
                tgid: field(task, l.tgid)? as i32,
                ppid: if parent == 0 { 0 } else { field(parent, l.tgid)? as i32 },
                uid: if cred == 0 { 0 } else { field(cred, l.uid)? as u32 },
                euid: if cred == 0 { 0 } else { field(cred, l.euid)? as u32 },
                gid: if cred == 0 { 0 } else { field(cred, l.gid)? as u32 },
                comm: read_string_in(&k, task.wrapping_add(l.comm.off), l.comm.size)?,
                state: field(task, l.state)?,
                start_time: field(task, l.start_time)?,
                flags,
                kernel_thread: flags & PF_KTHREAD != 0 || (mm == 0 && exit_state == 0),
                exit_state,
                mm,
                pgd: None,
                arg_start: 0,
                arg_end: 0,
                cmdline: Vec::new(),
                cmdline_truncated: false,
                cmdline_error: None,
            };
            if mm != 0 {
                let pgd_va = pointer(mm, l.pgd, "mm->pgd")?;
                p.pgd = Some(self.kernel.translate(pgd_va)?.pa);
                p.arg_start = field(mm, l.arg_start)?;
                p.arg_end = field(mm, l.arg_end)?;
            }
            out.push(p);
        }

        let cmdlines: Vec<(u64, u64)> =
            out.iter().filter_map(|p| p.pgd.filter(|_| !p.kernel_thread).map(|pgd| (pgd, p.arg_start))).collect();
        prefetch_walks(self.mem, self.kernel.mode(), &cmdlines);
        let mut budget = MAX_CMDLINE_TOTAL;
        for p in out.iter_mut().filter(|p| p.pgd.is_some() && !p.kernel_thread) {
            self.read_cmdline(p, &mut budget);
        }
        Ok(out)
    }

    fn read_cmdline(&self, p: &mut Process, budget: &mut u64) {
        let Some(len) = p.arg_end.checked_sub(p.arg_start) else {
            p.cmdline_error =
                Some(Error::Corrupt(alloc::format!("arg_end {:#x} < arg_start {:#x}", p.arg_end, p.arg_start)));
            return;
        };
        let keep = len.min(MAX_CMDLINE_BYTES);
        if keep > *budget {
            p.cmdline_error = Some(Error::TooLarge {
                what: "command-line bytes of all processes",
                value: MAX_CMDLINE_TOTAL + keep,
                max: MAX_CMDLINE_TOTAL,
            });
            return;
        }
        *budget -= keep;
        p.cmdline_truncated = keep < len;
        let mut buf = alloc::vec![0u8; keep as usize];
        match self.process_space(p).and_then(|s| s.read_virt(p.arg_start, &mut buf)) {
            Ok(()) => p.cmdline = buf,
            Err(e) => p.cmdline_error = Some(e),
        }
    }

    /// The address space of a process (its `mm->pgd`); an error for kernel threads.
    pub fn process_space(&self, p: &Process) -> Result<AddressSpace<'a, M>, Error> {
        let pgd = p.pgd.ok_or_else(|| Error::Corrupt(alloc::format!("pid {} has no mm (a kernel thread)", p.pid)))?;
        Ok(AddressSpace::new(self.mem, pgd, self.kernel.mode()))
    }

    /// Reads `buf.len()` bytes at virtual `va` in process `p`.
    pub fn read_process(&self, p: &Process, va: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.process_space(p)?.read_virt(va, buf)
    }

    /// The memory areas of process `p`, sorted by address (empty for kernel
    /// threads). From the maple tree `mm->mm_mt` (Linux ≥ 6.1) or the
    /// `mm->mmap` list (older), whichever BTF shows. At most [`MAX_VMAS`].
    pub fn vmas(&self, p: &Process) -> Result<Vec<Vma>, Error> {
        let vl = self.vma_layout.as_ref().map_err(Clone::clone)?;
        if p.mm == 0 {
            return Ok(Vec::new());
        }
        let mut ptrs = Vec::new();
        match &vl.source {
            VmaSource::List { mmap, next } => {
                let mut seen = BTreeSet::new();
                let mut vma = self.pointer(p.mm, *mmap, "mm->mmap")?;
                while vma != 0 {
                    if !seen.insert(vma) {
                        return Err(Error::ListCycle { list: "vma", at: vma });
                    }
                    if seen.len() > MAX_VMAS {
                        return Err(Error::ListTooLong { list: "vma", max: MAX_VMAS as u64 });
                    }
                    ptrs.push(vma);
                    vma = self.pointer(vma, *next, "vm_next")?;
                }
            }
            VmaSource::Maple { root, .. } => {
                let root = self.field(p.mm, *root)?;
                self.maple_entries(vl, root, &mut ptrs)?;
            }
        }
        let mut out = Vec::with_capacity(ptrs.len());
        for vma in ptrs {
            if vma < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("VMA pointer {vma:#x} is not a kernel address")));
            }
            let owner = self.field(vma, vl.mm)?;
            if owner != p.mm {
                return Err(Error::Corrupt(alloc::format!("VMA {vma:#x} belongs to mm {owner:#x}, not {:#x}", p.mm)));
            }
            let file = self.pointer(vma, vl.file, "vm_file")?;
            let file_name = if file == 0 {
                None
            } else {
                let dentry = self.pointer(file, vl.file_dentry, "f_path.dentry")?;
                let name = if dentry == 0 { 0 } else { self.pointer(dentry, vl.dentry_name, "d_name.name")? };
                if name == 0 {
                    None
                } else {
                    Some(self.read_string(name, MAX_STRING)?)
                }
            };
            let v = Vma {
                vma,
                start: self.field(vma, vl.start)?,
                end: self.field(vma, vl.end)?,
                flags: self.field(vma, vl.flags)?,
                pgoff: self.field(vma, vl.pgoff)?,
                file,
                file_name,
            };
            if v.start >= v.end {
                return Err(Error::Corrupt(alloc::format!("VMA {vma:#x} spans {:#x}..{:#x}", v.start, v.end)));
            }
            out.push(v);
        }
        out.sort_by_key(|v| v.start);
        Ok(out)
    }

    /// Collects the entries (VMA pointers) of the maple tree whose root is `root`.
    fn maple_entries(&self, vl: &VmaLayout, root: u64, out: &mut Vec<u64>) -> Result<(), Error> {
        let VmaSource::Maple { range, arange, leaf, range_type, arange_type, .. } = &vl.source else {
            return Ok(());
        };
        if root == 0 {
            return Ok(());
        }
        // The root is a node when tagged as an internal entry (xa_is_node).
        if !(root & 3 == 2 && root > 4096) {
            out.push(root); // a tree of one entry keeps it in the root
            return Ok(());
        }
        let mut seen = BTreeSet::new();
        // (encoded node, the largest index it covers, depth)
        let mut stack = alloc::vec![(root, u64::MAX, 0usize)];
        let mut buf = [0u8; 1024];
        while let Some((enode, max, depth)) = stack.pop() {
            if depth > MAX_MAPLE_DEPTH {
                return Err(Error::Corrupt(alloc::format!("maple tree deeper than {MAX_MAPLE_DEPTH}")));
            }
            let node = enode & !MAPLE_NODE_MASK;
            if node < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("maple node {node:#x} is not a kernel address")));
            }
            if !seen.insert(node) {
                return Err(Error::ListCycle { list: "maple node", at: node });
            }
            if seen.len() > MAX_MAPLE_NODES {
                return Err(Error::ListTooLong { list: "maple node", max: MAX_MAPLE_NODES as u64 });
            }
            let ty = (enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK;
            let shape = if ty == *arange_type {
                arange
            } else if ty == *range_type || ty == *leaf {
                range
            } else {
                return Err(Error::Corrupt(alloc::format!("maple node {node:#x} has type {ty}")));
            };
            let raw = &mut buf[..shape.size as usize];
            self.kernel.read_virt(node, raw)?;
            let word = |off: u64| {
                let o = off as usize;
                raw.get(o..o + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            };
            for i in 0..shape.slots {
                let slot = word(shape.slot + 8 * i);
                let piv = if i < shape.pivots { Some(word(shape.pivot + 8 * i)) } else { None };
                if i > 0 && piv == Some(0) {
                    break; // the rest of the node is unused
                }
                if slot != 0 {
                    if ty == *leaf {
                        if out.len() == MAX_VMAS {
                            return Err(Error::ListTooLong { list: "vma", max: MAX_VMAS as u64 });
                        }
                        out.push(slot);
                    } else {
                        // Child enodes are `node | type << 3 | 4` (no root tag).
                        stack.push((slot, piv.unwrap_or(max), depth + 1));
                    }
                }
                if piv.is_some_and(|p| p >= max) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The `modules` list head. Several local symbols may be called `modules`;
    /// the list head is the one whose first node points back at it.
    pub(crate) fn modules_head(&self) -> Result<u64, Error> {
        for s in self.kallsyms.lookup_all("modules") {
            let next = self.kernel.read_u64(s.address);
            let back = next.and_then(|n| self.kernel.read_u64(n.wrapping_add(8)));
            if back.is_ok_and(|b| b == s.address) {
                return Ok(s.address);
            }
        }
        Err(Error::Corrupt("no `modules` symbol is a list head".into()))
    }

    /// Every module on the `modules` list, in list order.
    pub fn modules(&self) -> Result<Vec<Module>, Error> {
        let head = self.modules_head()?;
        let mut out = Vec::new();
        self.walk_list(head, "module", MAX_MODULES, |node| {
            out.push(self.module_at(node.wrapping_sub(self.layout.mod_list.off))?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The module whose `struct module` is at kernel address `module`.
    pub(crate) fn module_at(&self, module: u64) -> Result<Module, Error> {
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

    /// Which task state member this kernel has (`__state` or `state`).
    pub fn task_state_member(&self) -> &'static str {
        self.layout.state_name
    }

    /// Checks the system call table: every entry must point into the core kernel's text
    /// (`_stext.._etext`); an entry that points elsewhere (into a module, or anywhere) is
    /// how a rootkit redirects a system call. Entries are counted up to the next symbol
    /// after `sys_call_table` (at most [`MAX_SYSCALLS`]).
    pub fn syscall_table_check(&self) -> Result<SyscallCheck, Error> {
        self.syscall_table_check_in(&self.modules().unwrap_or_default())
    }

    /// [`Linux::syscall_table_check`], naming targets by `modules` (the module list,
    /// already walked by the caller).
    pub(crate) fn syscall_table_check_in(&self, modules: &[Module]) -> Result<SyscallCheck, Error> {
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

    /// Whether modules use `mem[]` (Linux ≥ 6.4) rather than `core_layout`.
    pub fn modules_use_mem_array(&self) -> bool {
        matches!(self.layout.mod_mem, ModuleMem::Mem { .. })
    }
}

/// Field `f` of the structure at kernel `base`, read through `kernel`.
pub(crate) fn field_in(kernel: &impl VirtMem, base: u64, f: F) -> Result<u64, Error> {
    kernel.read_uint(base.wrapping_add(f.off), f.size)
}

/// Pointer field `f` at kernel `base`: null, or a kernel address (`what` names it in errors).
pub(crate) fn pointer_in(kernel: &impl VirtMem, base: u64, f: F, what: &str) -> Result<u64, Error> {
    let p = field_in(kernel, base, f)?;
    if p != 0 && p < KERNEL_MIN {
        return Err(Error::Corrupt(alloc::format!("{what} {p:#x} (at {base:#x}) is not a kernel address")));
    }
    Ok(p)
}

/// A NUL-terminated string of at most `max` bytes (≤ 256) at kernel `va`.
pub(crate) fn read_string_in(kernel: &impl VirtMem, va: u64, max: u64) -> Result<String, Error> {
    let max = max.min(MAX_STRING) as usize;
    let mut buf = [0u8; MAX_STRING as usize];
    // Page by page, stopping at the terminator: the next page may be unmapped.
    let mut done = 0;
    while done < max {
        let at = va.wrapping_add(done as u64);
        let n = ((0x1000 - (at & 0xfff)) as usize).min(max - done);
        kernel.read_virt(at, &mut buf[done..done + n])?;
        if let Some(i) = buf[done..done + n].iter().position(|&b| b == 0) {
            return Ok(String::from_utf8_lossy(&buf[..done + i]).into_owned());
        }
        done += n;
    }
    Ok(String::from_utf8_lossy(&buf[..max]).into_owned())
}

/// Calls `f` with each node of the circular list at `head` (not the head itself),
/// read through `kernel`; a cycle, a link out of the kernel or more than `max` nodes
/// end the walk with an error.
pub(crate) fn walk_list_in(
    kernel: &impl VirtMem,
    head: u64,
    list: &'static str,
    max: usize,
    mut f: impl FnMut(u64) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    let mut node = kernel.read_u64(head)?;
    while node != head {
        if node < KERNEL_MIN {
            return Err(Error::Corrupt(alloc::format!("{list} list link {node:#x} is not a kernel address")));
        }
        if !seen.insert(node) {
            return Err(Error::ListCycle { list, at: node });
        }
        if seen.len() > max {
            return Err(Error::ListTooLong { list, max: max as u64 });
        }
        f(node)?;
        node = kernel.read_u64(node)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::btf::build::Builder;
    use crate::kallsyms::tests::build as build_kallsyms;
    use crate::testmem::TestMem;
    use crate::vmcoreinfo::START_KERNEL_MAP;
    use alloc::string::ToString;

    /// Kernel image: virtual KV, physical IMAGE (one 2 MiB page).
    pub(crate) const KV: u64 = 0xffff_ffff_8100_0000;
    pub(crate) const IMAGE: u64 = 0x20_0000;
    const PHYS_BASE: i64 = IMAGE as i64 - (KV - START_KERNEL_MAP) as i64;
    // Offsets in the image.
    const ROOT: u64 = 0;
    const USER_PGD: u64 = 0x3000;
    const USER_PAGE: u64 = 0x7000;
    const VMCOREINFO: u64 = 0x8000;
    const KSYMS: u64 = 0x9000;
    const BTF: u64 = 0x10000;
    pub(crate) const INIT_TASK: u64 = 0x20000;
    pub(crate) const TASK_A: u64 = 0x21000;
    pub(crate) const TASK_K: u64 = 0x22000;
    const CRED: u64 = 0x28000;
    const MM: u64 = 0x29000;
    pub(crate) const MODULES: u64 = 0x2a000;
    pub(crate) const MODULE: u64 = 0x2b000;
    const UTS: u64 = 0x2c000;
    const CPUS: u64 = 0x2d000;
    const MAPLE: u64 = 0x2e000;
    const VMAS: u64 = 0x2f000;
    // For the rootkit checks (crate::checks::tests).
    pub(crate) const PID_NS: u64 = 0x30000;
    pub(crate) const XA_NODE: u64 = 0x31000;
    pub(crate) const PIDS: u64 = 0x32000;
    pub(crate) const KSET: u64 = 0x33000;
    pub(crate) const KSET_PTR: u64 = 0x33800;
    pub(crate) const MOD_TREE: u64 = 0x34000;
    pub(crate) const IDT: u64 = 0x35000;
    pub(crate) const SYSCALLS: u64 = 0x36000;
    pub(crate) const TASK_H: u64 = 0x23000;
    /// `x64_sys_call`, in the text page (bytes of the unused upper PML4 half).
    pub(crate) const DISPATCH: u64 = 0x800;
    /// Where the synthetic kernel's `entry_SYSCALL_64` is (inside its text).
    pub(crate) const ENTRY_SYSCALL: u64 = 0x200;
    /// Where the module's `mod_tree_node` is (its rb node is 8 bytes in).
    pub(crate) const MOD_MTN: u64 = MODULE + 0x100;
    /// The module's text base.
    pub(crate) const MODULE_BASE: u64 = 0xffff_ffff_c000_0000;
    /// User virtual address of the command line.
    const ARGS_VA: u64 = 0x40_0000;

    fn btf_blob() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        let ulong = b.int("long unsigned int", 8);
        let chr = b.int("char", 1);
        let lh = b.next_id;
        let lh_ptr = lh + 1;
        b.strukt("list_head", 16, &[("next", lh_ptr, 0, 0), ("prev", lh_ptr, 64, 0)]);
        b.ptr(lh);
        let void_ptr = b.ptr(0);
        let comm = b.raw("", 3, 0, false, 0, &[chr, int, 16]);
        let name56 = b.raw("", 3, 0, false, 0, &[chr, int, 56]);
        let name65 = b.raw("", 3, 0, false, 0, &[chr, int, 65]);
        let kuid = b.strukt("", 4, &[("val", uint, 0, 0)]);
        let kuid_t = b.raw("kuid_t", 8, 0, false, kuid, &[]);
        let cred = b.strukt("cred", 16, &[("uid", kuid_t, 32, 0), ("euid", kuid_t, 64, 0), ("gid", kuid_t, 96, 0)]);
        let cred_ptr = b.ptr(cred);
        let const_cred_ptr = b.raw("", 10, 0, false, cred_ptr, &[]);
        let anon =
            b.strukt("", 24, &[("pgd", void_ptr, 0, 0), ("arg_start", ulong, 64, 0), ("arg_end", ulong, 128, 0)]);
        let tree = b.strukt("maple_tree", 16, &[("ma_flags", uint, 0, 0), ("ma_root", void_ptr, 64, 0)]);
        let mm = b.strukt("mm_struct", 40, &[("", anon, 0, 0), ("mm_mt", tree, 192, 0)]);
        let (d, l, r, a) = (b.s("maple_dense"), b.s("maple_leaf_64"), b.s("maple_range_64"), b.s("maple_arange_64"));
        b.raw("maple_type", 6, 4, false, 4, &[d, 0, l, 1, r, 2, a, 3]);
        let piv15 = b.raw("", 3, 0, false, 0, &[ulong, int, 15]);
        let piv9 = b.raw("", 3, 0, false, 0, &[ulong, int, 9]);
        let slot16 = b.raw("", 3, 0, false, 0, &[void_ptr, int, 16]);
        let slot10 = b.raw("", 3, 0, false, 0, &[void_ptr, int, 10]);
        b.strukt(
            "maple_range_64",
            256,
            &[("parent", void_ptr, 0, 0), ("pivot", piv15, 64, 0), ("slot", slot16, 1024, 0)],
        );
        b.strukt(
            "maple_arange_64",
            256,
            &[("parent", void_ptr, 0, 0), ("pivot", piv9, 64, 0), ("slot", slot10, 640, 0)],
        );
        let qstr = b.strukt("qstr", 16, &[("hash_len", ulong, 0, 0), ("name", void_ptr, 64, 0)]);
        b.strukt("dentry", 16, &[("d_name", qstr, 0, 0)]);
        let path = b.strukt("path", 16, &[("mnt", void_ptr, 0, 0), ("dentry", void_ptr, 64, 0)]);
        let file = b.strukt("file", 16, &[("f_path", path, 0, 0)]);
        let file_ptr = b.ptr(file);
        b.strukt(
            "vm_area_struct",
            48,
            &[
                ("vm_start", ulong, 0, 0),
                ("vm_end", ulong, 64, 0),
                ("vm_mm", void_ptr, 128, 0),
                ("vm_flags", ulong, 192, 0),
                ("vm_pgoff", ulong, 256, 0),
                ("vm_file", file_ptr, 320, 0),
            ],
        );
        let mm_ptr = b.ptr(mm);
        let hnode = b.strukt("hlist_node", 16, &[("next", void_ptr, 0, 0), ("pprev", void_ptr, 64, 0)]);
        let hnodes = b.raw("", 3, 0, false, 0, &[hnode, int, 4]);
        let task = b.next_id;
        let task_ptr = task + 1;
        b.strukt(
            "task_struct",
            160,
            &[
                ("tasks", lh, 0, 0),
                ("pid", int, 128, 0),
                ("tgid", int, 160, 0),
                ("real_parent", task_ptr, 192, 0),
                ("cred", const_cred_ptr, 256, 0),
                ("comm", comm, 320, 0),
                ("__state", uint, 448, 0),
                ("start_time", ulong, 512, 0),
                ("flags", uint, 576, 0),
                ("mm", mm_ptr, 640, 0),
                ("exit_state", int, 704, 0),
                ("pid_links", hnodes, 768, 0),
            ],
        );
        b.ptr(task);
        let (live, coming) = (b.s("MODULE_STATE_LIVE"), b.s("MODULE_STATE_COMING"));
        let state = b.raw("module_state", 6, 2, false, 4, &[live, 0, coming, 1]);
        let layout = b.strukt("module_layout", 16, &[("base", void_ptr, 0, 0), ("size", uint, 64, 0)]);
        let kobject = b.strukt("kobject", 64, &[("name", void_ptr, 0, 0), ("entry", lh, 64, 0)]);
        let mkobj = b.strukt("module_kobject", 72, &[("kobj", kobject, 0, 0), ("mod", void_ptr, 512, 0)]);
        b.strukt(
            "module",
            200,
            &[
                ("list", lh, 0, 0),
                ("state", state, 128, 0),
                ("name", name56, 192, 0),
                ("core_layout", layout, 640, 0),
                ("init_layout", layout, 768, 0),
                ("mkobj", mkobj, 896, 0),
            ],
        );
        // The pid table and module sources of the rootkit checks.
        let uchar = b.int("unsigned char", 1);
        let slots = b.raw("", 3, 0, false, 0, &[void_ptr, int, 64]);
        b.strukt("xa_node", 520, &[("shift", uchar, 0, 0), ("slots", slots, 64, 0)]);
        let xarray = b.strukt("xarray", 16, &[("xa_lock", int, 0, 0), ("xa_head", void_ptr, 64, 0)]);
        let idr = b.strukt("idr", 24, &[("idr_rt", xarray, 0, 0), ("idr_base", uint, 128, 0)]);
        b.strukt("pid_namespace", 24, &[("idr", idr, 0, 0)]);
        let (pt_pid, pt_tgid) = (b.s("PIDTYPE_PID"), b.s("PIDTYPE_TGID"));
        b.raw("pid_type", 6, 2, false, 4, &[pt_pid, 0, pt_tgid, 1]);
        let hhead = b.strukt("hlist_head", 8, &[("first", void_ptr, 0, 0)]);
        let hheads = b.raw("", 3, 0, false, 0, &[hhead, int, 4]);
        let upid = b.strukt("upid", 16, &[("nr", int, 0, 0), ("ns", void_ptr, 64, 0)]);
        let upids = b.raw("", 3, 0, false, 0, &[upid, int, 1]);
        b.strukt("pid", 48, &[("tasks", hheads, 0, 0), ("numbers", upids, 256, 0)]);
        b.strukt("kset", 16, &[("list", lh, 0, 0)]);
        let rb = b.strukt(
            "rb_node",
            24,
            &[("__rb_parent_color", ulong, 0, 0), ("rb_right", void_ptr, 64, 0), ("rb_left", void_ptr, 128, 0)],
        );
        let rb_root = b.strukt("rb_root", 8, &[("rb_node", void_ptr, 0, 0)]);
        let roots = b.raw("", 3, 0, false, 0, &[rb_root, int, 2]);
        let latch_root = b.strukt("latch_tree_root", 24, &[("seq", ulong, 0, 0), ("tree", roots, 64, 0)]);
        b.strukt("mod_tree_root", 40, &[("root", latch_root, 0, 0), ("addr_min", ulong, 192, 0)]);
        let rbs = b.raw("", 3, 0, false, 0, &[rb, int, 2]);
        let latch_node = b.strukt("latch_tree_node", 48, &[("node", rbs, 0, 0)]);
        b.strukt("mod_tree_node", 56, &[("mod", void_ptr, 0, 0), ("node", latch_node, 64, 0)]);
        let uts = b.strukt("new_utsname", 130, &[("sysname", name65, 0, 0), ("release", name65, 520, 0)]);
        b.strukt("uts_namespace", 130, &[("name", uts, 0, 0)]);
        b.blob()
    }

    pub(crate) struct Guest {
        pub(crate) mem: TestMem,
    }

    impl Guest {
        pub(crate) fn pa(off: u64) -> u64 {
            IMAGE + off
        }
        pub(crate) fn va(off: u64) -> u64 {
            KV + off
        }
        pub(crate) fn w64(&mut self, off: u64, v: u64) {
            self.mem.write_u64(Self::pa(off), v);
        }
        pub(crate) fn w32(&mut self, off: u64, v: u32) {
            self.mem.write_u32(Self::pa(off), v);
        }
        pub(crate) fn wb(&mut self, off: u64, b: &[u8]) {
            self.mem.write(Self::pa(off), b);
        }

        pub(crate) fn new() -> Guest {
            let mut g = Guest { mem: TestMem::new(0, 0x40_0000) };
            // Kernel page tables: PML4[511] -> PDPT[510] -> PD[8] = the 2 MiB image page.
            g.w64(ROOT + 511 * 8, Self::pa(0x1000) | 3);
            g.w64(0x1000 + 510 * 8, Self::pa(0x2000) | 3);
            g.w64(0x2000 + 8 * 8, IMAGE | 0x83);
            // The process's tables: the kernel half shared, ARGS_VA -> USER_PAGE.
            g.w64(USER_PGD + 511 * 8, Self::pa(0x1000) | 3);
            g.w64(USER_PGD, Self::pa(0x4000) | 7);
            g.w64(0x4000, Self::pa(0x5000) | 7);
            g.w64(0x5000 + 2 * 8, Self::pa(0x6000) | 7);
            g.w64(0x6000, Self::pa(USER_PAGE) | 7);
            g.wb(USER_PAGE, b"sleep\x003333\x00");
            let text = alloc::format!(
                "OSRELEASE=6.1.0-synthetic\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)={:x}\nSYMBOL(_stext)={:x}\n\
                 SYMBOL(init_top_pgt)={:x}\nSYMBOL(kallsyms_names)={:x}\nSYMBOL(kallsyms_num_syms)={:x}\n\
                 SYMBOL(kallsyms_token_table)={:x}\nSYMBOL(kallsyms_token_index)={:x}\n\
                 SYMBOL(kallsyms_offsets)={:x}\nSYMBOL(kallsyms_relative_base)={:x}\nNUMBER(phys_base)={}\n\
                 NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET=0\n",
                Self::va(ROOT),
                KV,
                Self::va(ROOT),
                Self::va(KSYMS + 0x1000),
                Self::va(KSYMS),
                Self::va(KSYMS + 0x2000),
                Self::va(KSYMS + 0x3000),
                Self::va(KSYMS + 0x100),
                Self::va(KSYMS + 8),
                PHYS_BASE
            );
            g.wb(VMCOREINFO, text.as_bytes());
            let btf = btf_blob();
            g.wb(BTF, &btf);
            // kallsyms, absolute per-CPU style: offset = -(addr - KV + 1).
            let syms: Vec<(String, u64)> = [
                ("T_stext", 0),
                ("Tentry_SYSCALL_64", ENTRY_SYSCALL),
                ("Dinit_top_pgt", ROOT),
                ("Dinit_task", INIT_TASK),
                ("dmodules", MODULES),
                ("R__start_BTF", BTF),
                ("R__stop_BTF", BTF + btf.len() as u64),
                ("Dinit_uts_ns", UTS),
                ("D__num_online_cpus", CPUS),
                ("Dnr_cpu_ids", CPUS + 4),
                ("T_etext", 0x1000),
                ("Dinit_pid_ns", PID_NS),
                ("Dmodule_kset", KSET_PTR),
                ("dmod_tree", MOD_TREE),
                ("Didt_table", IDT),
                ("Rsys_call_table", SYSCALLS),
                ("Rafter_sys_call_table", SYSCALLS + 0x20),
                ("Tx64_sys_call", DISPATCH),
                ("Tafter_x64_sys_call", DISPATCH + 0x40),
            ]
            .iter()
            .map(|(n, o)| (String::from(*n), *o))
            .collect();
            let pairs: Vec<(&str, i32)> = syms.iter().map(|(n, o)| (n.as_str(), -(*o as i32) - 1)).collect();
            let (names, table, index, offsets) = build_kallsyms(&pairs);
            g.w32(KSYMS, pairs.len() as u32);
            g.w64(KSYMS + 8, KV);
            g.wb(KSYMS + 0x100, &offsets);
            g.wb(KSYMS + 0x1000, &names);
            g.wb(KSYMS + 0x2000, &table);
            g.wb(KSYMS + 0x3000, &index);
            g.wb(UTS + 65, b"6.1.0-synthetic\0");
            g.w32(CPUS, 2);
            g.w32(CPUS + 4, 4);
            // Tasks: init_task -> A (pid 1, user) -> K (pid 2, kthread) -> init_task.
            g.link(&[INIT_TASK, TASK_A, TASK_K]);
            g.task(INIT_TASK, 0, "swapper/0", INIT_TASK, 0);
            g.task(TASK_A, 1, "sleep", INIT_TASK, MM);
            g.task(TASK_K, 2, "kthreadd", INIT_TASK, 0);
            g.w32(TASK_K + 72, PF_KTHREAD as u32);
            g.w32(CRED + 4, 1000);
            g.w32(CRED + 8, 1001);
            g.w32(CRED + 12, 100);
            g.w64(MM, Self::va(USER_PGD));
            g.w64(MM + 8, ARGS_VA);
            g.w64(MM + 16, ARGS_VA + 11);
            g.maple();
            // Modules: the list head -> one module "dummy".
            g.link(&[MODULES, MODULE]);
            g.wb(MODULE + 24, b"dummy\0");
            g.w64(MODULE + 80, 0xffff_ffff_c000_0000);
            g.w32(MODULE + 88, 0x3000);
            g.w32(MODULE + 104, 0x1000);
            g.checks();
            g
        }

        /// What the rootkit checks read: a pid table of one xa_node holding pids 1
        /// and 2 (TASK_A, TASK_K), the module's kobject in `module_kset`, its node
        /// in `mod_tree`, an empty IDT and a 4-entry system call table into text.
        fn checks(&mut self) {
            self.w64(PID_NS + 8, Self::va(XA_NODE) | 2);
            for (i, task) in [(1u64, TASK_A), (2, TASK_K)] {
                self.pid_entry(i, task);
            }
            self.w64(KSET_PTR, Self::va(KSET));
            self.link(&[KSET, MODULE + 120]);
            self.w64(MODULE + 112 + 64, Self::va(MODULE));
            self.w64(MOD_TREE + 8, Self::va(MOD_MTN + 8));
            self.w64(MOD_MTN, Self::va(MODULE));
            for nr in 0..4 {
                self.w64(SYSCALLS + nr * 8, Self::va(0x100));
            }
        }

        /// Puts a `struct pid` for `task` (pid `nr`) in slot `nr` of the pid table.
        pub(crate) fn pid_entry(&mut self, nr: u64, task: u64) {
            let pid = PIDS + nr * 0x40;
            self.w64(XA_NODE + 8 + nr * 8, Self::va(pid));
            self.w64(pid, Self::va(task + 96));
            self.w32(pid + 32, nr as u32);
        }

        /// A two-level maple tree: an arange_64 root over two leaves, holding
        /// VMA1 (0x400000..0x401000 r-xp, file "sleep") and VMA2 (0x7ff000..0x800000 rw-p).
        fn maple(&mut self) {
            let (leaf_a, leaf_b) = (MAPLE + 0x100, MAPLE + 0x200);
            let enode = |off: u64, ty: u64| Self::va(off) | ty << 3 | 4;
            self.w64(MM + 32, enode(MAPLE, 3) | 2); // the root, tagged
                                                    // arange_64 root: pivots at 8, slots at 80.
            self.w64(MAPLE + 8, 0x7f_efff);
            self.w64(MAPLE + 16, u64::MAX);
            self.w64(MAPLE + 80, enode(leaf_a, 1));
            self.w64(MAPLE + 88, enode(leaf_b, 1));
            // leaf A: gap, VMA1, gap up to its max.
            for (i, p) in [0x3f_ffff, 0x40_0fff, 0x7f_efff].iter().enumerate() {
                self.w64(leaf_a + 8 + 8 * i as u64, *p);
            }
            self.w64(leaf_a + 128 + 8, Self::va(VMAS));
            // leaf B: VMA2, gap to the end.
            self.w64(leaf_b + 8, 0x7f_ffff);
            self.w64(leaf_b + 16, u64::MAX);
            self.w64(leaf_b + 128, Self::va(VMAS + 0x40));
            for (vma, start, end, flags, file) in
                [(VMAS, 0x40_0000, 0x40_1000, 5, VMAS + 0x100), (VMAS + 0x40, 0x7f_f000, 0x80_0000, 3, 0)]
            {
                self.w64(vma, start);
                self.w64(vma + 8, end);
                self.w64(vma + 16, Self::va(MM));
                self.w64(vma + 24, flags);
                self.w64(vma + 40, if file == 0 { 0 } else { Self::va(file) });
            }
            self.w64(VMAS + 0x108, Self::va(VMAS + 0x200)); // file -> dentry
            self.w64(VMAS + 0x208, Self::va(VMAS + 0x300)); // dentry -> name
            self.wb(VMAS + 0x300, b"sleep\0");
        }

        /// Circular list through the nodes at these offsets (each list_head at offset 0).
        pub(crate) fn link(&mut self, nodes: &[u64]) {
            for (i, &n) in nodes.iter().enumerate() {
                let next = nodes[(i + 1) % nodes.len()];
                let prev = nodes[(i + nodes.len() - 1) % nodes.len()];
                self.w64(n, Self::va(next));
                self.w64(n + 8, Self::va(prev));
            }
        }

        pub(crate) fn task(&mut self, t: u64, pid: u32, comm: &str, parent: u64, mm: u64) {
            self.w32(t + 16, pid);
            self.w32(t + 20, pid);
            self.w64(t + 24, Self::va(parent));
            self.w64(t + 32, Self::va(CRED));
            self.wb(t + 40, comm.as_bytes());
            self.w64(t + 64, u64::from(pid) * 1000);
            self.w64(t + 80, if mm == 0 { 0 } else { Self::va(mm) });
        }
    }

    #[test]
    fn a_synthetic_kernel_is_discovered_with_its_views() {
        let g = Guest::new();
        let linux = Linux::discover(&g.mem).unwrap();
        let info = linux.kernel_info().unwrap();
        assert_eq!(info.release, "6.1.0-synthetic");
        assert_eq!(info.uts_release.as_deref(), Some("6.1.0-synthetic"));
        assert_eq!((info.kernel_pgd, info.phys_base), (IMAGE, PHYS_BASE));
        assert_eq!((info.online_cpus, info.nr_cpu_ids), (Some(2), Some(4)));
        let procs = linux.processes().unwrap();
        assert_eq!(procs.len(), 2);
        let a = &procs[0];
        assert_eq!((a.pid, a.ppid, a.uid, a.euid, a.gid, a.comm.as_str()), (1, 0, 1000, 1001, 100, "sleep"));
        assert_eq!(a.args(), ["sleep", "3333"]);
        assert_eq!(a.pgd, Some(IMAGE + USER_PGD));
        assert!(!a.kernel_thread && procs[1].kernel_thread && procs[1].pgd.is_none());
        let mut buf = [0u8; 5];
        linux.read_process(a, ARGS_VA, &mut buf).unwrap();
        assert_eq!(&buf, b"sleep");
        assert!(linux.read_process(&procs[1], ARGS_VA, &mut buf).is_err());
        let mods = linux.modules().unwrap();
        assert_eq!(mods.len(), 1);
        assert_eq!((mods[0].name.as_str(), mods[0].base, mods[0].size), ("dummy", 0xffff_ffff_c000_0000, 0x4000));
        assert_eq!(mods[0].state_name.as_deref(), Some("MODULE_STATE_LIVE"));
        // A zombie: no mm any more, exit_state EXIT_ZOMBIE; still not a kernel thread.
        let mut g = g;
        g.w64(TASK_A + 80, 0);
        g.w32(TASK_A + 88, 0x20);
        let a = Linux::discover(&g.mem).unwrap().processes().unwrap().remove(0);
        assert!(!a.kernel_thread && a.exit_state == 0x20 && a.pgd.is_none() && a.cmdline.is_empty());
    }

    #[test]
    fn memory_areas_come_from_the_maple_tree() {
        let mut g = Guest::new();
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        let vmas = linux.vmas(&a).unwrap();
        let got: Vec<_> = vmas.iter().map(|v| (v.start, v.end, v.perms(), v.file_name.clone())).collect();
        assert_eq!(
            got,
            [
                (0x40_0000, 0x40_1000, String::from("r-xp"), Some(String::from("sleep"))),
                (0x7f_f000, 0x80_0000, String::from("rw-p"), None)
            ]
        );
        // The root's second child pointing back at the root: a cycle.
        g.w64(MAPLE + 88, Guest::va(MAPLE) | 3 << 3 | 4);
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        assert!(matches!(linux.vmas(&a), Err(Error::ListCycle { list: "maple node", .. })));
        // A node of an unknown type, and a VMA of another mm.
        let mut g = Guest::new();
        g.w64(MAPLE + 80, Guest::va(MAPLE + 0x100) | 9 << 3 | 4);
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        assert!(linux.vmas(&a).unwrap_err().to_string().contains("type 9"));
        let mut g = Guest::new();
        g.w64(VMAS + 16, Guest::va(0x1234));
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        assert!(linux.vmas(&a).unwrap_err().to_string().contains("belongs to mm"));
        // A tree of one entry kept in the root.
        let mut g = Guest::new();
        g.w64(MM + 32, Guest::va(VMAS));
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        assert_eq!(linux.vmas(&a).unwrap().len(), 1);
    }

    #[test]
    fn a_second_valid_vmcoreinfo_that_differs_is_counted() {
        let mut g = Guest::new();
        assert_eq!(Linux::discover(&g.mem).unwrap().kernel_info().unwrap().conflicting_vmcoreinfo, 0);
        // An identical copy (the kernel keeps two) is no conflict.
        let mut text = alloc::vec![0u8; 0x1000];
        g.mem.read(Guest::pa(VMCOREINFO), &mut text).unwrap();
        g.wb(0x30000, &text);
        assert_eq!(Linux::discover(&g.mem).unwrap().kernel_info().unwrap().conflicting_vmcoreinfo, 0);
        // One with another release, later in RAM: counted, and the first one is used.
        let forged = String::from_utf8_lossy(&text).replace("6.1.0-synthetic", "6.6.6-forged");
        g.wb(0x31000, forged.as_bytes());
        let info = Linux::discover(&g.mem).unwrap().kernel_info().unwrap();
        assert_eq!((info.conflicting_vmcoreinfo, info.release.as_str()), (1, "6.1.0-synthetic"));
    }

    #[test]
    fn a_cyclic_task_list_is_an_error() {
        let mut g = Guest::new();
        g.w64(TASK_K, Guest::va(TASK_A)); // K -> A again, never back to init_task
        let linux = Linux::discover(&g.mem).unwrap();
        assert_eq!(linux.processes(), Err(Error::ListCycle { list: "task", at: Guest::va(TASK_A) }));
        // A task pointing at itself.
        g.w64(TASK_A, Guest::va(TASK_A));
        let linux = Linux::discover(&g.mem).unwrap();
        assert!(matches!(linux.processes(), Err(Error::ListCycle { .. })));
        // A link into user space, and one outside RAM.
        g.w64(TASK_A, 0x1000);
        assert!(matches!(Linux::discover(&g.mem).unwrap().processes(), Err(Error::Corrupt(_))));
        g.w64(TASK_A, 0xffff_9000_0000_0000);
        assert!(matches!(Linux::discover(&g.mem).unwrap().processes(), Err(Error::NotMapped { .. })));
    }

    #[test]
    fn hostile_task_contents_are_bounded() {
        let mut g = Guest::new();
        // An absurd command line: cut at MAX_CMDLINE_BYTES, which is one mapped page here.
        g.w64(MM + 16, ARGS_VA + (1 << 40));
        let linux = Linux::discover(&g.mem).unwrap();
        let a = linux.processes().unwrap().remove(0);
        assert!(a.cmdline_truncated && a.cmdline.len() as u64 == MAX_CMDLINE_BYTES && a.cmdline_error.is_none());
        // arg_end below arg_start.
        g.w64(MM + 16, ARGS_VA - 1);
        let a = Linux::discover(&g.mem).unwrap().processes().unwrap().remove(0);
        assert!(a.cmdline.is_empty() && a.cmdline_error.is_some());
        // A user page table that points at itself everywhere: the read ends.
        g.w64(MM + 16, ARGS_VA + 11);
        for i in 0..511 {
            g.w64(USER_PGD + i * 8, Guest::pa(USER_PGD) | 7);
        }
        let a = Linux::discover(&g.mem).unwrap().processes().unwrap().remove(0);
        assert!(a.cmdline_error.is_some() || !a.cmdline.is_empty());
        // comm without a terminator: cut at its array length.
        g.wb(TASK_A + 40, b"0123456789abcdefXYZ");
        let a = Linux::discover(&g.mem).unwrap().processes().unwrap().remove(0);
        assert_eq!(a.comm, "0123456789abcdef");
        // A cred pointer into user space.
        g.w64(TASK_A + 32, 0x1234);
        let e = Linux::discover(&g.mem).unwrap().processes().unwrap_err();
        assert!(e.to_string().contains("cred 0x1234"), "{e}");
    }

    #[test]
    fn a_cyclic_module_list_and_bad_tables_are_errors() {
        let mut g = Guest::new();
        g.w64(MODULE, Guest::va(MODULE));
        g.w64(MODULES + 8, Guest::va(MODULE)); // still a list head by next->prev
        g.w64(MODULE + 8, Guest::va(MODULES));
        let linux = Linux::discover(&g.mem).unwrap();
        assert!(matches!(linux.modules(), Err(Error::ListCycle { list: "module", .. })));

        // VMCOREINFO whose swapper_pg_dir does not map itself is not believed.
        let mut g = Guest::new();
        g.w64(ROOT + 511 * 8, 0);
        let e = Linux::discover(&g.mem).err().unwrap();
        assert!(matches!(e, Error::VmcoreinfoNotFound { candidates: 1, .. }), "{e}");
        // Garbage kallsyms: an absurd count, then names that run into the token table.
        let mut g = Guest::new();
        g.w32(KSYMS, u32::MAX);
        assert!(matches!(Linux::discover(&g.mem).err().unwrap(), Error::TooLarge { .. }));
        let mut g = Guest::new();
        g.w32(KSYMS, 5000);
        assert!(Linux::discover(&g.mem).is_err());
        // A BTF blob cut short by a lying __stop_BTF... is a BTF error, not a panic.
        let mut g = Guest::new();
        g.wb(BTF + 24, &[0xff; 64]);
        assert!(matches!(Linux::discover(&g.mem).err().unwrap(), Error::Btf(_)));
        // No memory at all.
        let empty = TestMem::new(0, 0x1000);
        assert!(matches!(Linux::discover(&empty).err().unwrap(), Error::VmcoreinfoNotFound { candidates: 0, .. }));
    }
}
