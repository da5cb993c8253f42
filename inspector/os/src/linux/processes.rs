//! The process list: every thread-group leader on `init_task.tasks`, with its
//! credentials, parent, page-table root and command line, and reads of a process's
//! own memory.

use alloc::string::String;
use alloc::vec::Vec;

use super::Linux;
use crate::paging::{prefetch_walks, AddressSpace, CachedSpace, VirtMem};
use crate::structs;
use crate::{Error, PhysMem};

/// Most tasks walked (the kernel's default pid_max is 32768 on small machines).
pub const MAX_TASKS: usize = 1 << 16;
/// Most bytes of one command line kept (the rest is cut, [`Process::cmdline_truncated`]).
pub const MAX_CMDLINE_BYTES: u64 = 4096;
/// Most command-line bytes read for one process list.
pub const MAX_CMDLINE_TOTAL: u64 = 8 << 20;
/// `PF_KTHREAD` in `task_struct.flags` (unchanged since Linux 2.6; not in BTF, it is a #define).
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// A process (thread-group leader) from the task list. Its JSON, as the HTTP API has
/// it, has `args` for `cmdline`, adds `exited`, and gives `cmdline_error` as text
/// (serialize only: the error cannot be read back; [`crate::wire::DecodedProcess`] can).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(into = "crate::json::ProcessJson"))]
pub struct Process {
    /// Kernel address of its `task_struct`.
    pub task: u64,
    /// `pid`: the thread's id (a leader's is its process id).
    pub pid: i32,
    /// `tgid`: the thread group's id.
    pub tgid: i32,
    /// `real_parent->tgid` (0 for children of the idle task).
    pub ppid: i32,
    /// `cred->uid`, `cred->euid`, `cred->gid` (0 where it has no cred).
    pub uid: u32,
    /// See [`Process::uid`].
    pub euid: u32,
    /// See [`Process::uid`].
    pub gid: u32,
    /// `comm`: the executable's name, as the kernel keeps it (at most 15 bytes).
    pub comm: String,
    /// `__state` (6.x) or `state` (older), as stored (0 = running).
    pub state: u64,
    /// `start_time`: ns of monotonic time at fork.
    pub start_time: u64,
    /// `flags` (`PF_*`).
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
    /// `mm->arg_start..mm->arg_end`: where its command line is, in its own memory.
    pub arg_start: u64,
    /// See [`Process::arg_start`].
    pub arg_end: u64,
    /// The bytes between `arg_start` and `arg_end` (NUL-separated arguments),
    /// at most [`MAX_CMDLINE_BYTES`]; empty for kernel threads.
    pub cmdline: Vec<u8>,
    /// The command line was longer than [`MAX_CMDLINE_BYTES`] and was cut.
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

impl<'a, M: PhysMem + ?Sized> Linux<'a, M> {
    /// Every process (thread-group leader) on `init_task.tasks`, in list order
    /// (the idle task itself, pid 0, is not listed). A walk that fails on guest
    /// memory is made again ([`super::walked_until_consistent`]).
    pub fn processes(&self) -> Result<Vec<Process>, Error> {
        super::walked_until_consistent(&self.walks_redone, || self.processes_walked_once())
    }

    /// One walk of the task list for [`Linux::processes`].
    ///
    /// A listing reads about ten structures per task that are rarely in cache, so it
    /// is bound by memory latency. It therefore runs in passes over all tasks (collect
    /// the list; read each task's pointers; read the fields; read command lines), and
    /// each pass asks for the lines the next pass reads ([`VirtMem::prefetch_virt`])
    /// so that their misses overlap.
    fn processes_walked_once(&self) -> Result<Vec<Process>, Error> {
        let l = &self.layout;
        let init = self.kallsyms.address("init_task")?;
        // Tens of fields per task: one page walk per page, not per field.
        let k = CachedSpace::new(&self.kernel);
        let field = |base, f| structs::field(&k, base, f);
        let pointer = |base, f, what| structs::pointer(&k, base, f, what);
        let task_fields =
            [l.real_parent, l.cred, l.mm, l.flags, l.exit_state, l.pid, l.tgid, l.comm, l.state, l.start_time];

        let mut tasks = Vec::new();
        structs::walk_list(&k, init.wrapping_add(l.tasks.off), "task", MAX_TASKS, |node| {
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
                comm: structs::read_string(&k, task.wrapping_add(l.comm.off), l.comm.size)?,
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

    /// Which task state member this kernel has (`__state` or `state`).
    pub fn task_state_member(&self) -> &'static str {
        self.layout.state_name
    }
}
