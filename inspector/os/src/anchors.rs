//! Anchors: what a candidate kernel found in RAM must agree with in the vCPUs' own
//! state, which no guest user space can forge.
//!
//! A guest process can write a self-consistent VMCOREINFO, kallsyms and BTF into its
//! own pages. It cannot set a vCPU's CR3, LSTAR or GS bases. A candidate is believed
//! only when, for every vCPU the source described:
//! - `cr3`: the kernel half of the top-level page table the vCPU's CR3 roots (or,
//!   under KPTI, the kernel page of its user/kernel pair) holds exactly the entries of
//!   the candidate's `swapper_pg_dir`: a forger that reuses the kernel's tables but
//!   redirects any kernel mapping must change one of them;
//! - `lstar`: LSTAR, where `syscall` enters, is the candidate's `entry_SYSCALL_64`
//!   (skipped where the source does not report LSTAR);
//! - `gs_base`: the per-CPU base in GS_BASE (kernel mode) or KERNEL_GS_BASE (user
//!   mode) is one of the candidate's `__per_cpu_offset[]` (skipped where neither is a
//!   kernel address).
//!
//! Bounded: at most [`MAX_ANCHOR_CPUS`] vCPUs and [`MAX_PER_CPU_OFFSETS`] per-CPU
//! offsets are read; every read goes through the bounded paging code.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::kallsyms::Kallsyms;
use crate::paging::{AddressSpace, VirtMem};
use crate::{Error, PhysMem};

/// Most vCPUs whose state one discovery checks.
pub const MAX_ANCHOR_CPUS: usize = 1024;
/// Most `__per_cpu_offset` entries read.
pub const MAX_PER_CPU_OFFSETS: usize = 8192;

/// CR3's page-table root: bits 12..51 (PCID and the no-flush bit are not the address).
const CR3_ROOT_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Under KPTI the user page tables sit one page above the kernel's (an 8 KiB pair).
const KPTI_USER_BIT: u64 = 1 << 12;
/// The lowest canonical kernel address.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// A vCPU's state as the source reports it (0 where it cannot tell).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuState {
    pub cpu: u32,
    pub cr3: u64,
    pub lstar: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
}

/// One anchor checked on one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AnchorCheck {
    /// `cr3`, `lstar` or `gs_base`.
    pub anchor: String,
    pub cpu: u32,
    pub agrees: bool,
    /// What was compared.
    pub detail: String,
}

/// How a kernel view knows the kernel it describes is the one the vCPUs run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Anchoring {
    /// Every anchor checked agreed, and at least the page tables were checked.
    pub anchored: bool,
    pub checks: Vec<AnchorCheck>,
    /// Why the view is not anchored (`None` when it is).
    pub reason: Option<String>,
}

impl Anchoring {
    /// Not anchored, for `reason`.
    pub fn unanchored(reason: impl Into<String>) -> Self {
        Anchoring { anchored: false, checks: Vec::new(), reason: Some(reason.into()) }
    }
}

/// Checks a candidate kernel (its address space and symbols) against `cpus`.
pub fn check<M: PhysMem + ?Sized>(
    mem: &M,
    kernel: &AddressSpace<'_, M>,
    kallsyms: &Kallsyms,
    cpus: &[CpuState],
) -> Anchoring {
    if cpus.is_empty() {
        return Anchoring::unanchored("the source reported no vCPU state");
    }
    if cpus.len() > MAX_ANCHOR_CPUS {
        return Anchoring::unanchored(format!("{} vCPUs, more than {MAX_ANCHOR_CPUS}", cpus.len()));
    }
    let entry = kallsyms.address("entry_SYSCALL_64").ok();
    let per_cpu = per_cpu_offsets(kernel, kallsyms);
    let mut checks = Vec::new();
    for cpu in cpus {
        checks.push(check_cr3(mem, kernel.root(), cpu));
        if cpu.lstar != 0 {
            checks.push(check_lstar(entry, cpu));
        }
        if let Some(check) = check_gs(per_cpu.as_ref().map(|r| r.as_deref()), cpu) {
            checks.push(check);
        }
    }
    let disagrees = checks.iter().find(|c| !c.agrees);
    let reason = disagrees.map(|c| format!("{} of vCPU {} disagrees: {}", c.anchor, c.cpu, c.detail));
    Anchoring { anchored: reason.is_none(), checks, reason }
}

/// The kernel half of the vCPU's top-level page table (its CR3 root, or the kernel
/// half of a KPTI pair) holds the same entries as the candidate's `swapper_pg_dir`:
/// every process's page tables share the kernel's (`clone_pgd_range`), so a forger
/// that changes any kernel mapping of its copy changes an entry there. Accessed bits
/// are not compared (the CPU sets them per table).
fn check_cr3<M: PhysMem + ?Sized>(mem: &M, candidate_root: u64, cpu: &CpuState) -> AnchorCheck {
    let root = cpu.cr3 & CR3_ROOT_MASK;
    let mut detail = String::new();
    for r in [root, root & !KPTI_USER_BIT] {
        match kernel_half_difference(mem, r, candidate_root) {
            Ok(None) => {
                let detail = format!("the kernel half of CR3 root {r:#x} is swapper_pg_dir's ({candidate_root:#x})");
                return AnchorCheck { anchor: "cr3".into(), cpu: cpu.cpu, agrees: true, detail };
            }
            Ok(Some((i, theirs, ours))) if detail.is_empty() => {
                detail = format!(
                    "top-level entry {i} of CR3 root {r:#x} is {theirs:#x}, the candidate's ({candidate_root:#x}) {ours:#x}"
                )
            }
            Err(e) if detail.is_empty() => detail = format!("CR3 {:#x}: its root cannot be read: {e}", cpu.cr3),
            _ => {}
        }
    }
    AnchorCheck { anchor: "cr3".into(), cpu: cpu.cpu, agrees: false, detail }
}

/// The first kernel-half entry (256..512) where the top-level tables at `a` and `b`
/// differ (Accessed bit aside): `(index, a's, b's)`; an all-empty kernel half differs.
fn kernel_half_difference<M: PhysMem + ?Sized>(mem: &M, a: u64, b: u64) -> Result<Option<(usize, u64, u64)>, Error> {
    const ACCESSED: u64 = 1 << 5;
    let (mut ta, mut tb) = ([0u8; 2048], [0u8; 2048]);
    mem.read(a + 2048, &mut ta)?;
    mem.read(b + 2048, &mut tb)?;
    let entry =
        |t: &[u8; 2048], i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().expect("8 bytes")) & !ACCESSED;
    if (0..256).all(|i| entry(&tb, i) & 1 == 0) {
        return Ok(Some((256, entry(&ta, 0), 0)));
    }
    Ok((0..256).find(|&i| entry(&ta, i) != entry(&tb, i)).map(|i| (256 + i, entry(&ta, i), entry(&tb, i))))
}

/// LSTAR is the candidate's `entry_SYSCALL_64`.
fn check_lstar(entry: Option<u64>, cpu: &CpuState) -> AnchorCheck {
    let (agrees, detail) = match entry {
        Some(e) if e == cpu.lstar => (true, format!("LSTAR {:#x} is entry_SYSCALL_64", cpu.lstar)),
        Some(e) => (false, format!("LSTAR {:#x}, entry_SYSCALL_64 {e:#x}", cpu.lstar)),
        None => (false, format!("LSTAR {:#x}, and the candidate has no entry_SYSCALL_64", cpu.lstar)),
    };
    AnchorCheck { anchor: "lstar".into(), cpu: cpu.cpu, agrees, detail }
}

/// The vCPU's per-CPU base (whichever GS base is a kernel address) is one of the
/// candidate's per-CPU offsets; `None` when neither is a kernel address or the
/// candidate has no `__per_cpu_offset` (a kernel built without SMP).
fn check_gs(per_cpu: Option<Result<&[u64], &String>>, cpu: &CpuState) -> Option<AnchorCheck> {
    let base = [cpu.gs_base, cpu.kernel_gs_base].into_iter().find(|&b| b >= KERNEL_HALF)?;
    let per_cpu = per_cpu?;
    let (agrees, detail) = match per_cpu {
        Ok(offsets) => match offsets.iter().position(|&o| o == base) {
            Some(i) => (true, format!("GS base {base:#x} is __per_cpu_offset[{i}]")),
            None => (false, format!("GS base {base:#x} is none of {} __per_cpu_offset entries", offsets.len())),
        },
        Err(why) => (false, format!("GS base {base:#x}, but {why}")),
    };
    Some(AnchorCheck { anchor: "gs_base".into(), cpu: cpu.cpu, agrees, detail })
}

/// The candidate's `__per_cpu_offset[0..nr_cpu_ids]` (bounded); `None` when it has
/// no such symbol.
fn per_cpu_offsets<M: PhysMem + ?Sized>(
    kernel: &AddressSpace<'_, M>,
    kallsyms: &Kallsyms,
) -> Option<Result<Vec<u64>, String>> {
    let array = kallsyms.address("__per_cpu_offset").ok()?;
    let read = || -> Result<Vec<u64>, Error> {
        let n = kallsyms.address("nr_cpu_ids").and_then(|a| kernel.read_u32(a)).map_or(1, |n| n as usize);
        let n = n.clamp(1, MAX_PER_CPU_OFFSETS);
        (0..n).map(|i| kernel.read_u64(array + i as u64 * 8)).collect()
    };
    Some(read().map_err(|e| format!("its __per_cpu_offset cannot be read: {e}")))
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::testguest::{Guest, ENTRY_SYSCALL, IMAGE, INIT_TASK, KV, ROOT, TASK_K, VMCOREINFO};
    use crate::vmcoreinfo::START_KERNEL_MAP;
    use crate::Linux;

    /// The synthetic kernel's boot vCPU: its CR3 and LSTAR.
    fn boot_cpu() -> CpuState {
        CpuState { cpu: 0, cr3: Guest::pa(ROOT), lstar: Guest::va(ENTRY_SYSCALL), ..Default::default() }
    }

    fn anchoring(g: &Guest, cpus: &[CpuState]) -> KernelInfoAnchors {
        let info = Linux::discover_with(&g.mem, cpus).unwrap().kernel_info().unwrap();
        (info.anchored, info.anchors, info.unanchored_reason, info.forged_vmcoreinfo)
    }
    type KernelInfoAnchors = (bool, Vec<AnchorCheck>, Option<String>, Vec<u64>);

    #[test]
    fn the_vcpus_own_page_tables_and_syscall_entry_anchor_the_kernel() {
        let g = Guest::new();
        let (anchored, checks, reason, forged) = anchoring(&g, &[boot_cpu()]);
        assert!(anchored, "{reason:?} {checks:?}");
        let names: Vec<&str> = checks.iter().map(|c| c.anchor.as_str()).collect();
        assert_eq!(names, ["cr3", "lstar"]);
        assert!(forged.is_empty());
        // PCID bits and, under KPTI, the user half of the pair still root the same kernel.
        let kpti = CpuState { cr3: Guest::pa(ROOT) | 0x1000 | 0x5, ..boot_cpu() };
        assert!(anchoring(&g, &[kpti]).0, "a KPTI user CR3 with a PCID");
    }

    #[test]
    fn hostile_vcpu_state_gives_a_bounded_clear_unanchored_view() {
        let g = Guest::new();
        let cases = [
            // CR3 at a page of kernel data (garbage as page tables).
            (CpuState { cr3: Guest::pa(0x10000), ..boot_cpu() }, "cr3 of vCPU 0 disagrees"),
            // CR3 past the end of memory.
            (CpuState { cr3: 0xf_ffff_ffff_f000, ..boot_cpu() }, "cannot be read"),
            // LSTAR outside the candidate's entry.
            (CpuState { lstar: 0xffff_ffff_dead_0000, ..boot_cpu() }, "lstar of vCPU 0 disagrees"),
        ];
        for (cpu, want) in cases {
            let (anchored, _, reason, forged) = anchoring(&g, &[cpu]);
            let reason = reason.expect("a reason");
            assert!(!anchored && reason.contains(want), "{cpu:?}: {reason}");
            assert!(forged.is_empty(), "an unanchored view accuses nothing");
        }
        let (anchored, checks, reason, _) = anchoring(&g, &[]);
        assert!(!anchored && checks.is_empty() && reason.unwrap().contains("no vCPU state"));
        let many = vec![boot_cpu(); MAX_ANCHOR_CPUS + 1];
        let (anchored, _, reason, _) = anchoring(&g, &many);
        assert!(!anchored && reason.unwrap().contains("more than"));
    }

    /// A self-consistent copy of the kernel image at a lower physical address, with
    /// its own page tables and VMCOREINFO, whose task list leaves pid 1 out: what a
    /// forger would build. Returns the guest-physical address of its VMCOREINFO.
    fn plant_forged_kernel(g: &mut Guest) -> u64 {
        let fake = 0u64;
        let image = g.mem.data[IMAGE as usize..IMAGE as usize + 0x20_0000].to_vec();
        g.mem.write(fake, &image);
        // Its tables map the kernel's virtual addresses to the copy.
        g.mem.write_u64(fake + ROOT + 511 * 8, (fake + 0x1000) | 3);
        g.mem.write_u64(fake + 0x1000 + 510 * 8, (fake + 0x2000) | 3);
        g.mem.write_u64(fake + 0x2000 + 8 * 8, fake | 0x83);
        // Its VMCOREINFO says the image is there (phys_base), the same length of text.
        let text = String::from_utf8_lossy(&image[VMCOREINFO as usize..VMCOREINFO as usize + 0x800]).into_owned();
        let real_base = IMAGE as i64 - (KV - START_KERNEL_MAP) as i64;
        let fake_base = fake as i64 - (KV - START_KERNEL_MAP) as i64;
        let forged = text.replace(&format!("NUMBER(phys_base)={real_base}"), &format!("NUMBER(phys_base)={fake_base}"));
        assert_ne!(forged, text);
        g.mem.write(fake + VMCOREINFO, forged.as_bytes());
        // Its task list skips pid 1 (TASK_A): init_task <-> kthreadd.
        for (node, next, prev) in [(INIT_TASK, TASK_K, TASK_K), (TASK_K, INIT_TASK, INIT_TASK)] {
            g.mem.write_u64(fake + node, Guest::va(next));
            g.mem.write_u64(fake + node + 8, Guest::va(prev));
        }
        fake + VMCOREINFO
    }

    #[test]
    fn a_forged_kernel_at_a_lower_address_fools_only_an_unanchored_discovery() {
        let mut g = Guest::new();
        let forged_at = plant_forged_kernel(&mut g);
        let pids = |linux: &Linux<'_, _>| linux.processes().unwrap().iter().map(|p| p.pid).collect::<Vec<_>>();
        // Without the vCPUs, the first valid copy in physical order is believed: the forgery.
        let fooled = Linux::discover(&g.mem).unwrap();
        assert_eq!(fooled.kernel_info().unwrap().vmcoreinfo_at, forged_at);
        assert!(!pids(&fooled).contains(&1), "the forgery hides pid 1");
        // With them, the real kernel is found, the hidden process listed, the forgery named.
        let anchored = Linux::discover_with(&g.mem, &[boot_cpu()]).unwrap();
        let info = anchored.kernel_info().unwrap();
        assert!(info.anchored, "{:?}", info.unanchored_reason);
        assert_eq!(info.vmcoreinfo_at, Guest::pa(VMCOREINFO));
        assert_eq!(info.forged_vmcoreinfo, [forged_at]);
        assert!(pids(&anchored).contains(&1));
    }

    #[test]
    fn the_forgery_check_names_the_copy_and_the_process_whose_memory_holds_it() {
        use crate::checks::{select, Checker, FindingKind};
        let mut g = Guest::new();
        let forged_at = plant_forged_kernel(&mut g);
        // pid 1 ("sleep") maps the forged VMCOREINFO's page at 0x401000 (its page table
        // is the one holding its command line's page).
        g.w64(0x6000 + 8, (forged_at & !0xfff) | 7);
        let linux = Linux::discover_with(&g.mem, &[boot_cpu()]).unwrap();
        let report = Checker::new(&linux).run(&linux, select::FORGERY);
        let found: Vec<_> = report.findings.iter().map(|f| (f.kind, f.id, f.name.as_deref(), f.address)).collect();
        assert_eq!(found, [(FindingKind::ForgedKernel, 1, Some("sleep"), forged_at)], "{report:#?}");
        assert_eq!((report.runs[0].examined, report.runs[0].error.as_deref()), (2, None));
        // Not anchored: the check says it cannot tell, and accuses nothing.
        let blind = Linux::discover(&g.mem).unwrap();
        let report = Checker::new(&blind).run(&blind, select::FORGERY);
        assert!(report.findings.is_empty());
        assert!(report.runs[0].error.as_deref().is_some_and(|e| e.contains("not anchored")), "{report:#?}");
    }
}
