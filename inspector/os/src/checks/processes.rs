//! The process check: the pid table (`init_pid_ns.idr`, an xarray of `struct pid`)
//! against the task list.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;

use super::{Finding, FindingKind, Run, MAX_PID_NODES};
use crate::btf::Btf;
use crate::kallsyms::Kallsyms;
use crate::linux::MAX_TASKS;
use crate::paging::VirtMem;
use crate::structs::{F, KERNEL_MIN};
use crate::{Error, PhysMem};

/// Deepest xarray walked (64-bit indices, 6 bits per level).
const MAX_XA_DEPTH: usize = 11;

/// Pid-table layout, from BTF.
struct PidLayout {
    idr_head: u64,
    node_shift: u64,
    node_slots: u64,
    slot_count: u64,
    pid_tasks: u64,
    pid_nr: u64,
    task_pid_link: u64,
}

impl PidLayout {
    fn new(btf: &Btf, kallsyms: &Kallsyms) -> Result<Self, Error> {
        let ns = kallsyms.address("init_pid_ns")?;
        let idr_head = ns
            .wrapping_add(btf.member("pid_namespace", "idr")?.offset)
            .wrapping_add(btf.member("idr", "idr_rt")?.offset)
            .wrapping_add(btf.member("xarray", "xa_head")?.offset);
        let slots = btf.member("xa_node", "slots")?;
        let slot_count = btf.array(btf.resolve(slots.type_id)?)?.1;
        if !(2..=256).contains(&slot_count) {
            return Err(Error::BtfLookup(alloc::format!("xa_node.slots has {slot_count} entries")));
        }
        let pid_type = btf.enum_value("PIDTYPE_PID")?;
        if pid_type != 0 {
            return Err(Error::BtfLookup(alloc::format!("PIDTYPE_PID is {pid_type}, not 0")));
        }
        Ok(PidLayout {
            idr_head,
            node_shift: btf.member("xa_node", "shift")?.offset,
            node_slots: slots.offset,
            slot_count: slot_count.into(),
            pid_tasks: btf.member("pid", "tasks")?.offset,
            pid_nr: btf.member("pid", "numbers")?.offset + btf.member("upid", "nr")?.offset,
            task_pid_link: btf.member("task_struct", "pid_links")?.offset,
        })
    }
}

/// The `task_struct` members the process check reads.
struct TaskFields {
    tasks: F,
    pid: F,
    tgid: F,
    comm: F,
}

impl TaskFields {
    fn new(btf: &Btf) -> Result<Self, Error> {
        let t = |p: &str| F::new(btf, "task_struct", p);
        Ok(TaskFields { tasks: t("tasks")?, pid: t("pid")?, tgid: t("tgid")?, comm: t("comm")? })
    }
}

/// A task as the checks name it.
struct TaskId {
    pid: i32,
    tgid: i32,
    comm: Option<String>,
}

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// Task addresses on the task list.
    fn listed_tasks(&self, t: &TaskFields) -> Result<BTreeSet<u64>, Error> {
        let init = self.kallsyms.address("init_task")?;
        let off = t.tasks.off;
        let mut out = BTreeSet::new();
        self.walk_list(init.wrapping_add(off), "task", MAX_TASKS, |node| {
            out.insert(node.wrapping_sub(off));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every task the pid table reaches (pid number, task address).
    fn pid_table_tasks(&self) -> Result<Vec<(i64, u64)>, Error> {
        let l = PidLayout::new(self.btf, self.kallsyms)?;
        let mut pids = Vec::new();
        let head = self.kernel.read_u64(l.idr_head)?;
        let mut seen = BTreeSet::new();
        let mut stack = alloc::vec![(head, 0usize)];
        while let Some((entry, depth)) = stack.pop() {
            if entry == 0 || entry & 1 == 1 {
                continue; // empty, or a value entry (the pid table holds none)
            }
            if entry & 3 == 2 {
                if entry <= 4096 {
                    continue; // sibling or retry entry
                }
                let node = entry - 2;
                if node < KERNEL_MIN {
                    return Err(Error::Corrupt(alloc::format!("xarray node {node:#x} is not a kernel address")));
                }
                if depth > MAX_XA_DEPTH {
                    return Err(Error::Corrupt(alloc::format!("pid table deeper than {MAX_XA_DEPTH}")));
                }
                if !seen.insert(node) {
                    return Err(Error::ListCycle { list: "pid table node", at: node });
                }
                if seen.len() > MAX_PID_NODES {
                    return Err(Error::ListTooLong { list: "pid table node", max: MAX_PID_NODES as u64 });
                }
                let shift = self.kernel.read_uint(node.wrapping_add(l.node_shift), 1)?;
                if shift > 64 {
                    return Err(Error::Corrupt(alloc::format!("xarray node {node:#x} has shift {shift}")));
                }
                let mut slots = alloc::vec![0u8; (l.slot_count * 8) as usize];
                self.kernel.read_virt(node.wrapping_add(l.node_slots), &mut slots)?;
                for s in slots.chunks_exact(8) {
                    stack.push((u64::from_le_bytes(s.try_into().expect("8 bytes")), depth + 1));
                }
                continue;
            }
            // A `struct pid`: its PIDTYPE_PID task, if it still has one.
            if entry < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("pid table entry {entry:#x} is not a kernel address")));
            }
            let nr = i64::from(self.kernel.read_u32(entry.wrapping_add(l.pid_nr))? as i32);
            let first = self.kernel.read_u64(entry.wrapping_add(l.pid_tasks))?;
            if first == 0 {
                continue;
            }
            if first < KERNEL_MIN {
                return Err(Error::Corrupt(alloc::format!("pid {nr}'s task link {first:#x} is not a kernel address")));
            }
            pids.push((nr, first.wrapping_sub(l.task_pid_link)));
        }
        Ok(pids)
    }

    fn task_id(&self, l: &TaskFields, task: u64) -> Result<TaskId, Error> {
        Ok(TaskId {
            pid: self.field(task, l.pid)? as i32,
            tgid: self.field(task, l.tgid)? as i32,
            comm: self.read_string(task.wrapping_add(l.comm.off), l.comm.size).ok(),
        })
    }

    /// Hidden and unhashed processes; returns the number of tasks in the pid table.
    pub(super) fn check_processes(&self, out: &mut Vec<Finding>) -> Result<u64, Error> {
        let fields = TaskFields::new(self.btf)?;
        let before = self.listed_tasks(&fields)?;
        let table = self.pid_table_tasks()?;
        let after = self.listed_tasks(&fields)?;
        let mut hashed = BTreeSet::new();
        for &(nr, task) in &table {
            hashed.insert(task);
            if before.contains(&task) || after.contains(&task) {
                continue;
            }
            let t = self.task_id(&fields, task)?;
            // Threads are not on the task list (their leader is); a thread whose leader
            // is hidden shows up through the leader's own pid.
            if t.pid != t.tgid {
                continue;
            }
            if i64::from(t.pid) != nr {
                return Err(Error::Corrupt(alloc::format!("pid {nr} links to task {task:#x} with pid {}", t.pid)));
            }
            out.push(Finding { kind: FindingKind::HiddenProcess, id: nr, name: t.comm, address: task, detail: None });
        }
        for &task in before.intersection(&after) {
            if hashed.contains(&task) {
                continue;
            }
            let t = self.task_id(&fields, task)?;
            out.push(Finding {
                kind: FindingKind::UnhashedProcess,
                id: i64::from(t.pid),
                name: t.comm,
                address: task,
                detail: None,
            });
        }
        Ok(table.len() as u64)
    }
}
