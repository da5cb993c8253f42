//! Linux OS awareness from a guest's RAM alone: no symbol files, no
//! per-version tables. `no_std` + `alloc`, one no_std dependency (xxhash-rust), so the same code
//! can run in a freestanding agent over mirrored guest RAM.
//!
//! What is found where:
//!
//! | what | where it comes from |
//! |---|---|
//! | kernel release, KASLR slide, phys_base, paging mode | the VMCOREINFO text, found by scanning RAM for `OSRELEASE=` ([`vmcoreinfo`]) |
//! | the kernel's page-table root | `SYMBOL(swapper_pg_dir)` − `__START_KERNEL_map` + `phys_base`; believed only if it maps its own address back to itself ([`Linux::discover`]) |
//! | every kernel symbol | kallsyms, decoded from the tables VMCOREINFO points at (Linux ≥ 6.0) ([`kallsyms`]) |
//! | every struct layout | the kernel's BTF, between `__start_BTF` and `__stop_BTF` ([`btf`]) |
//! | processes | `init_task.tasks`, then each task's `cred`, `real_parent`, `mm` (page-table root, `arg_start..arg_end` read through the process's own page tables) ([`Linux::processes`]) |
//! | memory areas (VMAs) | the maple tree `mm->mm_mt` (≥ 6.1) or the `mm->mmap` list (older), whichever BTF has ([`Linux::vmas`]) |
//! | modules | the `modules` list; `core_layout` (≤ 6.3) or `mem[MOD_TEXT]` (≥ 6.4), whichever BTF has ([`Linux::modules`]) |
//! | CPUs | `__num_online_cpus` and `nr_cpu_ids` ([`Linux::kernel_info`]) |
//! | rootkit checks | the pid table against the task list, module kobjects and `mod_tree` against the module list, `sys_call_table` and `idt_table` against kernel text, kernel text against its hashes when the [`Checker`] was made ([`checks`]) |
//!
//! ```no_run
//! use specula_os::{Linux, SliceMem};
//! # let ram: &[u8] = &[];
//! // Guest RAM mapped here, at guest-physical 0 (implement `PhysMem` for other layouts).
//! let mem = SliceMem::new(vec![(0, ram)]);
//! let linux = Linux::discover(&mem)?;
//! println!("Linux {}", linux.kernel_info()?.release);
//! for p in linux.processes()? {
//!     println!("{} {} uid={} {:?}", p.pid, p.comm, p.uid, p.args());
//! }
//! for m in linux.modules()? {
//!     println!("{} {:#x} {}", m.name, m.base, m.size);
//! }
//! # Ok::<(), specula_os::Error>(())
//! ```
//!
//! Guest memory is untrusted data: every read is checked, every walk is
//! bounded (page walks by their 4 or 5 levels, lists by a visited set and a
//! cap, type chains by a depth), every allocation is capped by a documented
//! constant, and what does not fit is an [`Error`] saying what failed. The
//! `fuzz_*` functions ([`fuzz`]) are entry points for libFuzzer targets.
//!
//! Features (all off by default; the agent builds without any): `serde` derives
//! `Serialize`/`Deserialize` for the views in the JSON shapes of the inspector's
//! HTTP API (no_std + alloc); `openapi` adds `utoipa::ToSchema` for them (and turns
//! on `std`, which utoipa needs).
// `std` (which `openapi` turns on) is for the OpenAPI schemas alone: utoipa's derives
// expect the standard prelude. Everything else is written against `core` and `alloc`,
// and the agent builds the crate without it.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;
// The tests print and panic through std, with the crate still no_std.
#[cfg(all(test, not(feature = "std")))]
extern crate std;

pub mod anchors;
pub mod btf;
pub mod checks;
mod error;
pub mod fuzz;
#[cfg(feature = "serde")]
mod json;
pub mod kallsyms;
pub mod linux;
pub mod paging;
mod structs;
#[cfg(test)]
pub(crate) mod testguest;
#[cfg(test)]
pub(crate) mod testmem;
pub mod vmcoreinfo;
pub mod wire;

use alloc::vec::Vec;
use core::ops::Range;

pub use anchors::{AnchorCheck, Anchoring, CpuState};
pub use btf::Btf;
pub use checks::{CheckReport, CheckRun, Checker, Finding, FindingKind};
pub use error::Error;
pub use kallsyms::Kallsyms;
pub use linux::{KernelInfo, Linux, Module, Process, SyscallCheck, SyscallEntry, Vma};
pub use paging::{AddressSpace, CachedSpace, PagingMode, Translation, VirtMem};
pub use vmcoreinfo::VmcoreInfo;

/// Guest-physical memory.
pub trait PhysMem {
    /// Reads `buf.len()` bytes at guest-physical `pa`; an error (such as
    /// [`Error::PhysRead`]) if any byte is outside RAM.
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// Where RAM is (and so where scans look), in ascending order.
    fn ram_ranges(&self) -> Vec<Range<u64>>;

    /// A hint that the cache line at guest-physical `pa` will be read soon; it never
    /// fails and changes nothing. Views issue these for many structures before they
    /// read any, so that the reads' cache and TLB misses overlap instead of queueing
    /// (a process listing is bound by memory latency, not by instructions). The
    /// default does nothing; implementations with RAM mapped in place prefetch.
    fn prefetch(&self, _pa: u64) {}
}

/// Physical memory made of byte slices, each at a guest-physical address:
/// a `PhysMem` for RAM already mapped into this address space.
pub struct SliceMem<'a> {
    segments: Vec<(u64, &'a [u8])>,
}

impl<'a> SliceMem<'a> {
    /// `segments`: `(guest-physical start, bytes)`, in any order, not overlapping.
    pub fn new(mut segments: Vec<(u64, &'a [u8])>) -> Self {
        segments.sort_by_key(|s| s.0);
        SliceMem { segments }
    }
}

impl PhysMem for SliceMem<'_> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let err = Error::PhysRead { pa, len: buf.len() as u64 };
        let seg = self.segments.iter().find(|(start, data)| pa >= *start && pa - start < data.len() as u64);
        let (start, data) = seg.ok_or(err.clone())?;
        let off = (pa - start) as usize;
        let src = data.get(off..off.checked_add(buf.len()).ok_or(err.clone())?).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn ram_ranges(&self) -> Vec<Range<u64>> {
        self.segments.iter().map(|(s, d)| *s..s + d.len() as u64).collect()
    }
}
