//! A synthetic Linux 6.1 kernel in 4 MiB of test memory, for the views' and the
//! rootkit checks' tests: page tables, VMCOREINFO, kallsyms, a BTF blob that
//! describes every structure the views read, three tasks, a process with a
//! command line and two memory areas (in a maple tree), one module, and what the
//! checks read (a pid table, module kobjects, the module tree, an IDT and a system
//! call table).

use alloc::string::String;
use alloc::vec::Vec;

use crate::btf::build::Builder;
use crate::kallsyms::tests::build as build_kallsyms;
use crate::linux::PF_KTHREAD;
use crate::testmem::TestMem;
use crate::vmcoreinfo::START_KERNEL_MAP;

/// Kernel image: virtual KV, physical IMAGE (one 2 MiB page).
pub(crate) const KV: u64 = 0xffff_ffff_8100_0000;
pub(crate) const IMAGE: u64 = 0x20_0000;
pub(crate) const PHYS_BASE: i64 = IMAGE as i64 - (KV - START_KERNEL_MAP) as i64;
// Offsets in the image.
pub(crate) const ROOT: u64 = 0;
pub(crate) const USER_PGD: u64 = 0x3000;
pub(crate) const USER_PAGE: u64 = 0x7000;
pub(crate) const VMCOREINFO: u64 = 0x8000;
pub(crate) const KSYMS: u64 = 0x9000;
pub(crate) const BTF: u64 = 0x10000;
pub(crate) const INIT_TASK: u64 = 0x20000;
pub(crate) const TASK_A: u64 = 0x21000;
pub(crate) const TASK_K: u64 = 0x22000;
pub(crate) const CRED: u64 = 0x28000;
pub(crate) const MM: u64 = 0x29000;
pub(crate) const MODULES: u64 = 0x2a000;
pub(crate) const MODULE: u64 = 0x2b000;
pub(crate) const UTS: u64 = 0x2c000;
pub(crate) const CPUS: u64 = 0x2d000;
pub(crate) const MAPLE: u64 = 0x2e000;
pub(crate) const VMAS: u64 = 0x2f000;
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
pub(crate) const ARGS_VA: u64 = 0x40_0000;

pub(crate) fn btf_blob() -> Vec<u8> {
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
    let anon = b.strukt("", 24, &[("pgd", void_ptr, 0, 0), ("arg_start", ulong, 64, 0), ("arg_end", ulong, 128, 0)]);
    let tree = b.strukt("maple_tree", 16, &[("ma_flags", uint, 0, 0), ("ma_root", void_ptr, 64, 0)]);
    let mm = b.strukt("mm_struct", 40, &[("", anon, 0, 0), ("mm_mt", tree, 192, 0)]);
    let (d, l, r, a) = (b.s("maple_dense"), b.s("maple_leaf_64"), b.s("maple_range_64"), b.s("maple_arange_64"));
    b.raw("maple_type", 6, 4, false, 4, &[d, 0, l, 1, r, 2, a, 3]);
    let piv15 = b.raw("", 3, 0, false, 0, &[ulong, int, 15]);
    let piv9 = b.raw("", 3, 0, false, 0, &[ulong, int, 9]);
    let slot16 = b.raw("", 3, 0, false, 0, &[void_ptr, int, 16]);
    let slot10 = b.raw("", 3, 0, false, 0, &[void_ptr, int, 10]);
    b.strukt("maple_range_64", 256, &[("parent", void_ptr, 0, 0), ("pivot", piv15, 64, 0), ("slot", slot16, 1024, 0)]);
    b.strukt("maple_arange_64", 256, &[("parent", void_ptr, 0, 0), ("pivot", piv9, 64, 0), ("slot", slot10, 640, 0)]);
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

    /// Sets IDT gate `vector` to an interrupt gate (type 0xe, DPL 0, kernel code
    /// segment) at the virtual address `target`, present or not.
    pub(crate) fn idt_gate(&mut self, vector: u64, target: u64, present: bool) {
        let bits: u16 = 0x0e00 | if present { 0x8000 } else { 0 };
        let gate = [
            &(target as u16).to_le_bytes()[..],
            &0x10u16.to_le_bytes(),
            &bits.to_le_bytes(),
            &((target >> 16) as u16).to_le_bytes(),
            &((target >> 32) as u32).to_le_bytes(),
            &[0; 4],
        ]
        .concat();
        self.wb(IDT + vector * 16, &gate);
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
