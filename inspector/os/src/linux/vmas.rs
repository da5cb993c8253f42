//! A process's memory areas (`struct vm_area_struct`): from the maple tree
//! `mm->mm_mt` (Linux ≥ 6.1) or the `mm->mmap` list (older).

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;

use super::layout::{VmaLayout, VmaSource};
use super::{Linux, Process};
use crate::paging::VirtMem;
use crate::structs::{KERNEL_MIN, MAX_STRING};
use crate::{Error, PhysMem};

/// Most VMAs listed for one process (the kernel's default `vm.max_map_count` is 65530).
pub const MAX_VMAS: usize = 1 << 16;
/// Most maple-tree nodes visited for one process.
pub const MAX_MAPLE_NODES: usize = 1 << 16;
/// Deepest maple tree walked (the kernel's MAPLE_HEIGHT_MAX is 31).
pub const MAX_MAPLE_DEPTH: usize = 31;
/// `vm_flags` bits (include/linux/mm.h #defines, unchanged since Linux 2.x).
pub const VM_READ: u64 = 1;
/// Writable (see [`VM_READ`]).
pub const VM_WRITE: u64 = 2;
/// Executable (see [`VM_READ`]).
pub const VM_EXEC: u64 = 4;
/// Shared rather than private (see [`VM_READ`]).
pub const VM_SHARED: u64 = 8;
/// Maple-tree node pointers ("enodes", lib/maple_tree.c #defines): the node is
/// the pointer with its low 8 bits cleared, its type is bits 3..6 (the type
/// numbers themselves come from BTF's `enum maple_type`).
const MAPLE_NODE_MASK: u64 = 0xff;
const MAPLE_NODE_TYPE_SHIFT: u64 = 3;
const MAPLE_NODE_TYPE_MASK: u64 = 0xf;

/// A memory area of a process (`struct vm_area_struct`). Its JSON, as the HTTP API
/// has it, adds `perms`, names the file `file` and its address `file_address`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "crate::json::VmaJson", from = "crate::json::VmaJson")
)]
pub struct Vma {
    /// Kernel address of the `vm_area_struct`.
    pub vma: u64,
    /// First address (`vm_start`).
    pub start: u64,
    /// First address past the end (`vm_end`).
    pub end: u64,
    /// `vm_flags` ([`VM_READ`], ...).
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

impl<M: PhysMem + ?Sized> Linux<'_, M> {
    /// The memory areas of process `p`, sorted by address (empty for kernel
    /// threads). From the maple tree `mm->mm_mt` (Linux ≥ 6.1) or the
    /// `mm->mmap` list (older), whichever BTF shows. At most [`MAX_VMAS`]. A walk
    /// that fails on guest memory is made again ([`super::walked_until_consistent`]).
    pub fn vmas(&self, p: &Process) -> Result<Vec<Vma>, Error> {
        super::walked_until_consistent(&self.walks_redone, || self.vmas_walked_once(p))
    }

    fn vmas_walked_once(&self, p: &Process) -> Result<Vec<Vma>, Error> {
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
}
