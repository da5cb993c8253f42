//! The views over the synthetic kernel of [`crate::testguest`], and over hostile
//! variants of it.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::*;
use crate::testguest::*;
use crate::testmem::TestMem;

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

/// Guest memory whose 8-byte word at `at` reads as `torn` for as long as `torn_reads`
/// lasts, and as it is in `mem` after: a guest that changed a list under a walk (a
/// pointer into a task it had just freed, that a walk a moment later no longer meets).
struct TornWord<'m> {
    mem: &'m TestMem,
    at: u64,
    torn: u64,
    torn_reads: core::cell::Cell<u32>,
    reads: core::cell::Cell<u32>,
}

impl<'m> TornWord<'m> {
    fn new(mem: &'m TestMem, at: u64, torn: u64) -> Self {
        TornWord { mem, at, torn, torn_reads: Default::default(), reads: Default::default() }
    }
}

impl PhysMem for TornWord<'_> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.mem.read(pa, buf)?;
        let Some(offset) = self.at.checked_sub(pa).map(|o| o as usize).filter(|&o| o + 8 <= buf.len()) else {
            return Ok(());
        };
        self.reads.set(self.reads.get() + 1);
        if self.torn_reads.get() > 0 {
            self.torn_reads.set(self.torn_reads.get() - 1);
            buf[offset..offset + 8].copy_from_slice(&self.torn.to_le_bytes());
        }
        Ok(())
    }

    fn ram_ranges(&self) -> Vec<core::ops::Range<u64>> {
        self.mem.ram_ranges()
    }
}

#[test]
fn a_task_list_torn_under_one_walk_is_walked_again_and_listed_whole() {
    let g = Guest::new();
    let whole = Linux::discover(&g.mem).unwrap().processes().unwrap();
    // Task A's `tasks.next` read once as a pointer outside every mapping (the task it
    // named was freed), then as it is: the listing is the whole one.
    let mem = TornWord::new(&g.mem, Guest::pa(TASK_A), 0xffff_9000_0000_0000);
    let linux = Linux::discover(&mem).unwrap();
    mem.reads.set(0);
    assert_eq!(linux.processes(), Ok(whole.clone()));
    let per_walk = mem.reads.get();
    mem.reads.set(0);
    mem.torn_reads.set(1);
    assert_eq!(linux.processes(), Ok(whole));
    assert_eq!(mem.reads.get(), 1 + per_walk, "a walk that failed at the torn word, then a whole walk");
    assert_eq!(linux.walks_redone(), 1);
    // Torn on every read: the error, after MAX_WALKS walks and no more.
    mem.reads.set(0);
    mem.torn_reads.set(u32::MAX);
    assert!(matches!(linux.processes(), Err(Error::NotMapped { va: 0xffff_9000_0000_0000, .. })));
    assert_eq!(mem.reads.get() as usize, MAX_WALKS);
    // The module list the same way (its head's `next`).
    let mem = TornWord::new(&g.mem, Guest::pa(MODULES), 0xffff_9000_0000_0000);
    let linux = Linux::discover(&mem).unwrap();
    let modules = linux.modules().unwrap();
    mem.torn_reads.set(1);
    assert_eq!(linux.modules(), Ok(modules));
}

#[test]
fn an_error_about_the_kernel_itself_is_not_walked_again() {
    let mut walks = 0;
    let redone = AtomicU64::new(0);
    let result: Result<(), Error> = walked_until_consistent(&redone, || {
        walks += 1;
        Err(Error::SymbolNotFound("init_task".into()))
    });
    assert_eq!((result, walks, redone.load(Ordering::Relaxed)), (Err(Error::SymbolNotFound("init_task".into())), 1, 0));
    let mut walks = 0;
    let result: Result<(), Error> = walked_until_consistent(&redone, || {
        walks += 1;
        Err(Error::Corrupt("torn".into()))
    });
    let redone = redone.load(Ordering::Relaxed);
    assert_eq!((result, walks, redone), (Err(Error::Corrupt("torn".into())), MAX_WALKS, MAX_WALKS as u64 - 1));
}
