//! Reading kernel structures through a [`VirtMem`]: member offsets from BTF, and
//! fields, pointers, strings and circular lists read with every value checked and
//! every walk bounded.
//!
//! The one module that both the views ([`crate::linux`]) and the rootkit checks
//! ([`crate::checks`]) build on, so that neither reaches into the other's
//! internals: the checks use the views only through their public API.

use alloc::collections::BTreeSet;
use alloc::string::String;

use crate::btf::Btf;
use crate::paging::VirtMem;
use crate::Error;

/// Lowest kernel address (the canonical upper half): a pointer below it, other than
/// NULL, is not a kernel pointer, whatever a structure claims.
pub(crate) const KERNEL_MIN: u64 = 0xffff_8000_0000_0000;
/// Longest kernel string read (`comm`, module names are arrays shorter than this).
pub(crate) const MAX_STRING: u64 = 256;

/// A member's byte offset and size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct F {
    pub(crate) off: u64,
    pub(crate) size: u64,
}

impl F {
    /// Member `path` (dotted, through anonymous and named sub-structs) of struct `st`.
    /// A bit-field is refused: it cannot be read as whole bytes.
    pub(crate) fn new(btf: &Btf, st: &str, path: &str) -> Result<F, Error> {
        let f = btf.member(st, path)?;
        if f.bitfield_size != 0 {
            return Err(Error::BtfLookup(alloc::format!("{st}.{path} is a bit-field")));
        }
        Ok(F { off: f.offset, size: btf.size_of(f.type_id)? })
    }
}

/// Field `f` of the structure at kernel `base`, read through `kernel`.
pub(crate) fn field(kernel: &impl VirtMem, base: u64, f: F) -> Result<u64, Error> {
    kernel.read_uint(base.wrapping_add(f.off), f.size)
}

/// Pointer field `f` at kernel `base`: null, or a kernel address (`what` names it in errors).
pub(crate) fn pointer(kernel: &impl VirtMem, base: u64, f: F, what: &str) -> Result<u64, Error> {
    let p = field(kernel, base, f)?;
    if p != 0 && p < KERNEL_MIN {
        return Err(Error::Corrupt(alloc::format!("{what} {p:#x} (at {base:#x}) is not a kernel address")));
    }
    Ok(p)
}

/// A NUL-terminated string of at most `max` bytes (≤ [`MAX_STRING`]) at kernel `va`;
/// one without its terminator is cut at `max` (lossy UTF-8 either way).
pub(crate) fn read_string(kernel: &impl VirtMem, va: u64, max: u64) -> Result<String, Error> {
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
/// read through `kernel`; a cycle ([`Error::ListCycle`]), a link out of the kernel or
/// more than `max` nodes ([`Error::ListTooLong`]) end the walk with an error.
pub(crate) fn walk_list(
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
