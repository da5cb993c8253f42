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
//! changes while it is read (the guest runs and is never paused): a walk can
//! follow a pointer out of a task the guest freed a moment before. A walk that
//! fails on guest memory is therefore walked again, up to [`MAX_WALKS`] times
//! ([`walked_until_consistent`]); a structure that is broken on every walk is
//! reported as the error of the last one.
//!
//! The views are split by concern: [`processes`](Linux::processes) and process
//! memory, [`vmas`](Linux::vmas), [`modules`](Linux::modules) and the
//! [system call table](Linux::syscall_table_check); the offsets they read are
//! computed once, at discovery, from BTF.

mod layout;
mod modules;
mod processes;
mod syscalls;
#[cfg(test)]
mod tests;
mod vmas;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::anchors::{self, AnchorCheck, Anchoring, CpuState};
use crate::btf::Btf;
use crate::kallsyms::{Kallsyms, KallsymsAddrs};
use crate::paging::{AddressSpace, PagingMode, VirtMem};
use crate::structs::{self, F};
use crate::vmcoreinfo::{self, VmcoreInfo};
use crate::{Error, PhysMem};

use layout::{Layout, VmaLayout};
pub use modules::{Module, MAX_MODULES};
pub use processes::{Process, MAX_CMDLINE_BYTES, MAX_CMDLINE_TOTAL, MAX_TASKS, PF_KTHREAD};
pub use syscalls::{SyscallCheck, SyscallEntry, MAX_SYSCALLS};
pub use vmas::{Vma, MAX_MAPLE_DEPTH, MAX_MAPLE_NODES, MAX_VMAS, VM_EXEC, VM_READ, VM_SHARED, VM_WRITE};

/// Walks of one view made at most before the error of the last is reported: a list
/// the guest changed under one walk is read whole by the next (the guest unlinks an
/// entry before it frees it), while one that is broken for good costs at most this
/// many walks.
pub const MAX_WALKS: usize = 3;

/// Runs `walk` until it succeeds, fails for a reason a change of guest memory under
/// it cannot explain, or has run [`MAX_WALKS`] times; counts each walk made again in
/// `redone`.
pub fn walked_until_consistent<T>(redone: &AtomicU64, mut walk: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    let mut result = walk();
    for _ in 1..MAX_WALKS {
        match &result {
            Err(e) if e.may_come_from_a_change_under_the_walk() => {
                redone.fetch_add(1, Ordering::Relaxed);
                result = walk();
            }
            _ => break,
        }
    }
    result
}

/// Facts about the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KernelInfo {
    /// VMCOREINFO's `OSRELEASE` (`uname -r`).
    pub release: String,
    /// `init_uts_ns.name.release`, read through BTF (should equal `release`).
    pub uts_release: Option<String>,
    /// `KERNELOFFSET`: the KASLR slide.
    pub kaslr_offset: u64,
    /// `NUMBER(phys_base)`.
    pub phys_base: i64,
    /// 4- or 5-level paging (`paging` in JSON, as the HTTP API names it).
    #[cfg_attr(feature = "serde", serde(rename = "paging"))]
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
    /// Whether the vCPUs' own state (CR3, LSTAR, GS bases) agrees with this kernel:
    /// only then is it known to be the kernel they run, not one a guest process wrote.
    pub anchored: bool,
    /// The anchors checked, per vCPU.
    pub anchors: Vec<AnchorCheck>,
    /// Why the view is not anchored (`None` when it is).
    pub unanchored_reason: Option<String>,
    /// Guest-physical addresses of valid VMCOREINFO copies whose kernel the vCPUs
    /// contradict: forged kernel structures (empty unless the view is anchored).
    pub forged_vmcoreinfo: Vec<u64>,
    /// Kernel symbols decoded from kallsyms.
    pub symbols: usize,
    /// Types in the kernel's BTF.
    pub btf_types: usize,
}

/// A Linux kernel found in physical memory: where it is, its symbols and types,
/// and the offsets of everything the views read. The views read guest memory anew
/// on every call; nothing here goes stale but the offsets, which a kernel never
/// changes while it runs.
pub struct Linux<'a, M: PhysMem + ?Sized> {
    mem: &'a M,
    vmcoreinfo: VmcoreInfo,
    kernel: AddressSpace<'a, M>,
    kallsyms: Kallsyms,
    btf: Btf,
    layout: Layout,
    /// Kept as a result: a kernel whose VMA structures BTF does not describe still
    /// has every other view.
    vma_layout: Result<VmaLayout, Error>,
    conflicting: u32,
    /// How the candidate was judged against the vCPUs' state.
    anchoring: Anchoring,
    /// Where the valid VMCOREINFO copies that the vCPUs contradict were found.
    forged: Vec<u64>,
    /// Walks made again since discovery because one failed on guest memory.
    walks_redone: AtomicU64,
}

/// Most valid VMCOREINFO copies judged in one discovery (the kernel keeps two).
pub const MAX_CANDIDATES: usize = 16;

impl<'a, M: PhysMem + ?Sized> Linux<'a, M> {
    /// Finds the kernel with no vCPU state to anchor it: the first valid VMCOREINFO
    /// in physical order is believed, and the view says it is not anchored.
    pub fn discover(mem: &'a M) -> Result<Self, Error> {
        Self::discover_with(mem, &[])
    }

    /// Finds the kernel the vCPUs in `cpus` run: every valid VMCOREINFO candidate
    /// (at most [`MAX_CANDIDATES`], in physical order) is checked against their state
    /// ([`anchors::check`]) and the first that agrees is believed. Valid candidates
    /// that say something else and do not agree are reported as forged
    /// ([`KernelInfo::forged_vmcoreinfo`]). When none agrees, or there is no vCPU
    /// state, the first valid candidate is used and the view says it is not anchored,
    /// and why.
    pub fn discover_with(mem: &'a M, cpus: &[CpuState]) -> Result<Self, Error> {
        let (candidates, hits, mut last) = vmcoreinfo::scan(mem);
        let mut valid: Vec<(VmcoreInfo, AddressSpace<'a, M>)> = Vec::new();
        for info in candidates {
            match Self::check_candidate(mem, &info) {
                Ok(kernel) if valid.len() < MAX_CANDIDATES => valid.push((info, kernel)),
                Ok(_) => last = Some(alloc::format!("more than {MAX_CANDIDATES} valid VMCOREINFO copies")),
                Err(e) => last = Some(alloc::format!("text at {:#x}: {e}", info.found_at)),
            }
        }
        if valid.is_empty() {
            return Err(Error::VmcoreinfoNotFound { candidates: hits, last });
        }
        // Each distinct text is judged once (the kernel keeps two identical copies).
        let mut judged: Vec<(usize, Result<Kallsyms, Error>, Anchoring)> = Vec::new();
        for (i, (info, kernel)) in valid.iter().enumerate() {
            if valid[..i].iter().any(|(seen, _)| seen.lines().eq(info.lines())) {
                continue;
            }
            let kallsyms = Self::read_kallsyms(kernel, info);
            let anchoring = match (&kallsyms, cpus.is_empty()) {
                (_, true) => Anchoring::unanchored("the source reported no vCPU state"),
                (Ok(k), false) => anchors::check(mem, kernel, k, cpus),
                (Err(e), false) => Anchoring::unanchored(alloc::format!("its kallsyms do not decode: {e}")),
            };
            judged.push((i, kallsyms, anchoring));
        }
        // The first that agrees; else the first whose kallsyms decode (a forged copy at a
        // lower address, which decodes nothing, must not make discovery fail).
        let pick = judged
            .iter()
            .position(|(_, k, a)| k.is_ok() && a.anchored)
            .or_else(|| judged.iter().position(|(_, k, _)| k.is_ok()))
            .unwrap_or(0);
        let (chosen_index, kallsyms, mut anchoring) = judged.remove(pick);
        if !anchoring.anchored && !cpus.is_empty() && !judged.is_empty() {
            anchoring.reason =
                anchoring.reason.map(|r| alloc::format!("no candidate agrees with the vCPUs; the first: {r}"));
        }
        let forged: Vec<u64> = if anchoring.anchored {
            judged.iter().filter(|(_, _, a)| !a.anchored).map(|(i, _, _)| valid[*i].0.found_at).collect()
        } else {
            Vec::new()
        };
        let (vmcoreinfo, kernel) = valid.swap_remove(chosen_index);
        let conflicting = valid.iter().filter(|(info, _)| info.lines().ne(vmcoreinfo.lines())).count() as u32;
        let kallsyms = kallsyms?;
        let btf = Self::read_btf(&kernel, &kallsyms)?;
        let layout = Layout::new(&btf)?;
        let vma_layout = VmaLayout::new(&btf);
        Ok(Linux {
            mem,
            vmcoreinfo,
            kernel,
            kallsyms,
            btf,
            layout,
            vma_layout,
            conflicting,
            anchoring,
            forged,
            walks_redone: AtomicU64::new(0),
        })
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

    /// The VMCOREINFO text the kernel was found by.
    pub fn vmcoreinfo(&self) -> &VmcoreInfo {
        &self.vmcoreinfo
    }

    /// Every kernel symbol, decoded from kallsyms.
    pub fn kallsyms(&self) -> &Kallsyms {
        &self.kallsyms
    }

    /// The kernel's types.
    pub fn btf(&self) -> &Btf {
        &self.btf
    }

    /// Walks made again since discovery because one failed on guest memory (the
    /// guest changed a list under it; [`walked_until_consistent`]).
    pub fn walks_redone(&self) -> u64 {
        self.walks_redone.load(Ordering::Relaxed)
    }

    /// The kernel's address space (rooted at `swapper_pg_dir`).
    pub fn kernel(&self) -> &AddressSpace<'a, M> {
        &self.kernel
    }

    /// How discovery judged this kernel against the vCPUs' state.
    pub fn anchoring(&self) -> &Anchoring {
        &self.anchoring
    }

    /// Where the valid VMCOREINFO copies the vCPUs contradict were found.
    pub fn forged_vmcoreinfo(&self) -> &[u64] {
        &self.forged
    }

    /// The physical memory the kernel was found in.
    pub fn mem(&self) -> &'a M {
        self.mem
    }

    /// Kernel release, KASLR, paging mode, CPUs, and how it is anchored.
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
            anchored: self.anchoring.anchored,
            anchors: self.anchoring.checks.clone(),
            unanchored_reason: self.anchoring.reason.clone(),
            forged_vmcoreinfo: self.forged.clone(),
            symbols: self.kallsyms.len(),
            btf_types: self.btf.len(),
        })
    }

    fn field(&self, base: u64, f: F) -> Result<u64, Error> {
        structs::field(&self.kernel, base, f)
    }

    fn pointer(&self, base: u64, f: F, what: &str) -> Result<u64, Error> {
        structs::pointer(&self.kernel, base, f, what)
    }

    /// A NUL-terminated string of at most `max` bytes (≤ 256) at kernel `va`.
    pub fn read_string(&self, va: u64, max: u64) -> Result<String, Error> {
        structs::read_string(&self.kernel, va, max)
    }
}
