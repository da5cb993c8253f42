//! The kernel-text check: every page of `_stext.._etext` against its hash when the
//! [`Checker`](super::Checker) was made.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Finding, FindingKind, Run, MAX_FINDINGS, MAX_TEXT_BYTES, PAGE};
use crate::kallsyms::Kallsyms;
use crate::paging::{AddressSpace, VirtMem};
use crate::{Error, PhysMem};

/// Per-page hashes of the core kernel text (xxh3 of each 4 KiB page of
/// `_stext.._etext`), taken when a [`Checker`](super::Checker) is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBaseline {
    start: u64,
    hashes: Vec<u64>,
}

impl TextBaseline {
    /// The first page hashed (`_stext`, page-aligned).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// How many pages were hashed.
    pub fn pages(&self) -> usize {
        self.hashes.len()
    }

    /// Hashes `_stext.._etext` page by page.
    pub(crate) fn take<M: PhysMem + ?Sized>(kernel: &AddressSpace<'_, M>, k: &Kallsyms) -> Result<Self, Error> {
        let (start, end) = text_range(k)?;
        let mut hashes = Vec::with_capacity(((end - start) / PAGE) as usize);
        let mut buf = alloc::vec![0u8; PAGE as usize];
        let mut va = start;
        while va < end {
            kernel.read_virt(va, &mut buf)?;
            hashes.push(xxhash_rust::xxh3::xxh3_64(&buf));
            va += PAGE;
        }
        Ok(TextBaseline { start, hashes })
    }
}

/// The core kernel text, page-aligned.
fn text_range(k: &Kallsyms) -> Result<(u64, u64), Error> {
    let start = k.address("_stext")? & !(PAGE - 1);
    let end = k.address("_etext")?.checked_add(PAGE - 1).ok_or(Error::Corrupt("_etext wraps".into()))? & !(PAGE - 1);
    if end <= start || end - start > MAX_TEXT_BYTES {
        return Err(Error::TooLarge { what: "kernel text bytes", value: end.wrapping_sub(start), max: MAX_TEXT_BYTES });
    }
    Ok((start, end))
}

impl<M: PhysMem + ?Sized> Run<'_, '_, M> {
    /// Kernel text pages whose hash differs from `baseline`'s; returns the pages checked.
    pub(super) fn check_text(
        &self,
        baseline: &Result<TextBaseline, Error>,
        out: &mut Vec<Finding>,
    ) -> Result<u64, Error> {
        let base = baseline.as_ref().map_err(Clone::clone)?;
        let mut buf = alloc::vec![0u8; PAGE as usize];
        let mut changed = Vec::new();
        for (i, &want) in base.hashes.iter().enumerate() {
            let va = base.start + i as u64 * PAGE;
            self.kernel.read_virt(va, &mut buf)?;
            if xxhash_rust::xxh3::xxh3_64(&buf) != want && changed.len() < MAX_FINDINGS {
                changed.push(va);
            }
        }
        // Name each page by the text symbol it starts in, or else the first one starting
        // inside it (one pass over kallsyms).
        let mut before: Vec<Option<(u64, &str)>> = alloc::vec![None; changed.len()];
        let mut inside: Vec<Option<(u64, &str)>> = alloc::vec![None; changed.len()];
        for s in self.kallsyms.iter().filter(|s| s.kind.eq_ignore_ascii_case(&'t')) {
            for (j, &va) in changed.iter().enumerate() {
                if s.address <= va && before[j].is_none_or(|(a, _)| s.address > a) {
                    before[j] = Some((s.address, s.name));
                } else if s.address > va && s.address < va + PAGE && inside[j].is_none_or(|(a, _)| s.address < a) {
                    inside[j] = Some((s.address, s.name));
                }
            }
        }
        for (j, va) in changed.into_iter().enumerate() {
            out.push(Finding {
                kind: FindingKind::KernelTextModified,
                id: -1,
                name: before[j].or(inside[j]).map(|(_, n)| String::from(n)),
                address: va,
                detail: None,
            });
        }
        Ok(base.hashes.len() as u64)
    }
}
