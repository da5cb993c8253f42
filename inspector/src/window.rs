//! The mirror window: where the source's granted RAM appears in the agent VM.
//!
//! KVM pays an SRCU synchronisation for every memslot it adds or removes, so a memslot
//! per grant made attach cost grow with the source's size. Instead, each run of grants
//! that sit side by side in guest-physical space is moved back to back into one address
//! range reserved in this process, and one read-only memslot covers the whole run: attach
//! costs one `mremap` per grant and one memslot per run. A revoked grant's pages are
//! replaced in place by private zero pages ([`MappedGrant::relocate`]), so the memslot
//! stays and reads there give nothing of the source, never stale bytes or another grant's.

use mirror_driver::importer::{ImportError, MappedGrant};
use vmm::memory::reserve_address_space;
use vmm::vstate::vm::{Vm, VmError};

/// One memslot of the window: a run of adjacent grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRegion {
    /// Source GPA of the run's first byte.
    pub gpa: u64,
    pub len: u64,
    /// This process's address of the run's first byte.
    pub host_addr: u64,
    pub slot: u32,
}

/// Failures while placing grants in the window.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("cannot reserve {len:#x} bytes of address space for the window run at {gpa:#x}")]
    Reserve {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move grant {grant} into the window")]
    Relocate {
        grant: u64,
        #[source]
        source: ImportError,
    },
    #[error("grants {first} and {second} overlap at {gpa:#x}")]
    Overlap { first: u64, second: u64, gpa: u64 },
    #[error("cannot add the memslot for the window run {gpa:#x}+{len:#x}")]
    Memslot {
        gpa: u64,
        len: u64,
        #[source]
        source: VmError,
    },
}

/// The runs of the window, each one memslot.
#[derive(Debug, Default)]
pub struct MirrorWindow {
    regions: Vec<WindowRegion>,
}

/// Runs of adjacent grants, as (first index, one past the last) into `grants` sorted by GPA.
fn runs(grants: &[MappedGrant]) -> Result<Vec<(usize, usize)>, WindowError> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, pair) in grants.windows(2).enumerate() {
        let (a, b) = (&pair[0].grant, &pair[1].grant);
        if a.gpa + a.len > b.gpa {
            return Err(WindowError::Overlap { first: a.id, second: b.id, gpa: b.gpa });
        }
        if a.gpa + a.len < b.gpa {
            runs.push((runs.last().map_or(0, |r| r.1), i + 1));
        }
    }
    if !grants.is_empty() {
        runs.push((runs.last().map_or(0, |r| r.1), grants.len()));
    }
    Ok(runs)
}

impl MirrorWindow {
    /// Moves `grants` into one reservation per run of adjacent grants and registers each
    /// run as a read-only memslot at `window_base + gpa` of `vm`. Sorts `grants` by GPA.
    /// On failure the memslots added so far are removed; the grants, whether moved or not,
    /// are the caller's to drop (a moved one leaves zero pages behind).
    pub fn place(vm: &Vm, window_base: u64, grants: &mut [MappedGrant]) -> Result<Self, WindowError> {
        grants.sort_by_key(|g| g.grant.gpa);
        let mut window = Self::default();
        for (first, end) in runs(grants)? {
            let run = &mut grants[first..end];
            match Self::place_run(vm, window_base, run) {
                Ok(region) => window.regions.push(region),
                Err(e) => {
                    window.remove_all(vm, window_base);
                    return Err(e);
                }
            }
        }
        Ok(window)
    }

    fn place_run(vm: &Vm, window_base: u64, run: &mut [MappedGrant]) -> Result<WindowRegion, WindowError> {
        let gpa = run[0].grant.gpa;
        let len = run.iter().map(MappedGrant::map_len).sum::<u64>();
        // Never unmapped: a dropped grant leaves zero pages here (see [`MirrorWindow`]).
        let host_addr = reserve_address_space(len).map_err(|source| WindowError::Reserve { gpa, len, source })?;
        for g in run.iter_mut() {
            let at = host_addr + (g.grant.gpa - gpa);
            // SAFETY: `at..at + map_len` lies inside the reservation just made, which is never
            // unmapped (the grant leaves zero pages there when dropped).
            unsafe { g.relocate(at) }.map_err(|source| WindowError::Relocate { grant: g.grant.id, source })?;
        }
        // SAFETY: the reservation lives for the rest of the process (never unmapped), its
        // contents replaced in place only.
        let slot = unsafe { vm.add_memslot(window_base + gpa, len, host_addr, true) }
            .map_err(|source| WindowError::Memslot { gpa, len, source })?;
        Ok(WindowRegion { gpa, len, host_addr, slot })
    }

    fn remove_all(&mut self, vm: &Vm, window_base: u64) {
        for r in self.regions.drain(..) {
            let _ = vm.remove_memslot(r.slot, window_base + r.gpa);
        }
    }

    /// Puts private zero pages over every run, in place: what a vCPU of the agent VM
    /// can fault in when the source's own memory is gone (KVM_RUN fails with EFAULT on a
    /// kernel mirror mapping whose source exited). The memslots stay; the grants' own
    /// drop later does the same again. Returns whether every run was replaced.
    pub fn replace_with_zero_pages(&self) -> bool {
        self.regions.iter().all(|r| {
            // SAFETY: each run lies in the address range this window reserved and never
            // unmaps (see `place`); the source's pages there are gone already.
            unsafe { mirror_driver::importer::put_zero_pages(r.host_addr as *mut libc::c_void, r.len as usize) }.is_ok()
        })
    }

    /// The runs, each one memslot.
    pub fn regions(&self) -> &[WindowRegion] {
        &self.regions
    }

    /// Whether `[gpa, gpa + len)` lies inside one memslot of the window (granted now or
    /// revoked since).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| self.regions.iter().any(|r| gpa >= r.gpa && end <= r.gpa + r.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_driver::importer::map_grant;
    use mirror_driver::protocol::Grant;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn grant(id: u64, gpa: u64, len: u64) -> MappedGrant {
        let file = mirror_driver::memfd::create_ram_memfd(len).unwrap();
        mirror_driver::memfd::seal_future_writes(&file).unwrap();
        let fd: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap().into();
        map_grant(Grant { id, gpa, len, fd_index: 0, offset: 0 }, fd).unwrap()
    }

    #[test]
    fn adjacent_grants_make_one_run_and_gaps_split_runs() {
        let mut grants = vec![grant(3, 0x30_0000, 0x10_0000), grant(1, 0, 0x20_0000), grant(2, 0x20_0000, 0x1000)];
        grants.sort_by_key(|g| g.grant.gpa);
        assert_eq!(runs(&grants).unwrap(), vec![(0, 2), (2, 3)]);
        let mut overlapping = vec![grant(1, 0, 0x2000), grant(2, 0x1000, 0x1000)];
        overlapping.sort_by_key(|g| g.grant.gpa);
        assert!(matches!(runs(&overlapping), Err(WindowError::Overlap { first: 1, second: 2, gpa: 0x1000 })));
        assert!(runs(&[]).unwrap().is_empty());
    }
}
