//! The grant table: which source ranges are mapped into the agent VM's window, and
//! the requests that read them (reads, hashes, scans, probes).

use std::collections::BTreeMap;
use std::sync::{RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use guest_images::agent::{self as abi, MAX_PATTERN};
use mirror_driver::importer::MappedGrant;
use specula_api::{Digests, GrantInfo, Reply, Request};

use super::replies as agent_replies;
use super::{InspectError, Inspector, MAX_HASH_LEN, MAX_LATENCY_MS, MAX_MAPPED_READ, MAX_READ, PAGE, SCAN_STEP};

/// Fails unless every byte of `[gpa, gpa + len)` lies in a live grant.
pub(super) fn covered(grants: &GrantMap, gpa: u64, len: u64) -> Result<(), InspectError> {
    let end = gpa.checked_add(len).filter(|_| len > 0).ok_or_else(|| InspectError::BadRequest("empty range".into()))?;
    let mut spans: Vec<(u64, u64)> =
        grants.values().map(|g| (g.mapped.grant.gpa, g.mapped.grant.gpa + g.mapped.grant.len)).collect();
    spans.sort_unstable();
    let mut reached = gpa;
    for (lo, hi) in spans {
        if lo > reached {
            break;
        }
        reached = reached.max(hi);
        if reached >= end {
            return Ok(());
        }
    }
    Err(InspectError::NotGranted { gpa, len })
}

/// A grant mapped in the window; dropping it leaves zero pages in its place.
pub struct LiveGrant {
    pub mapped: MappedGrant,
}

/// Live grants by id. Requests hold a read guard from their `check_granted` until the
/// agent is done, so a revoke (which takes the write guard to replace the grant's pages
/// with zeros) never pulls memory from under a running command.
pub type GrantMap = BTreeMap<u64, LiveGrant>;

impl Inspector {
    /// Serves the requests on granted memory.
    pub(super) fn handle_memory(&self, request: Request) -> Result<Reply, InspectError> {
        Ok(match request {
            Request::Grants => Reply::Grants(self.grants()),
            Request::Read { gpa, len } => Reply::Bytes(self.read(gpa, len)?),
            Request::AuditRead { gpa, len } => Reply::Bytes(self.audit_read(gpa, len)?),
            Request::Hash { gpa, len } => {
                let (xxh64, sha256) = self.hash(gpa, len)?;
                Reply::Digests(Digests { xxh64: format!("{xxh64:016x}"), sha256: specula_common::hex::encode(&sha256) })
            }
            Request::Scan { gpa, len, pattern } => {
                let (total, hits) = self.scan(gpa, len, &pattern)?;
                Reply::Hits { total, hits }
            }
            Request::WriteProbe { gpa, byte } => Reply::ReadBack(self.write_probe(gpa, byte)?),
            Request::Latency { gpa, count, ms } => Reply::Samples(self.latency(gpa, count, ms)?),
            other => return Err(InspectError::misrouted(&other)),
        })
    }

    /// Live grants.
    pub fn grants(&self) -> Vec<GrantInfo> {
        self.read_grants()
            .values()
            .map(|g| GrantInfo { id: g.mapped.grant.id, gpa: g.mapped.grant.gpa, len: g.mapped.grant.len })
            .collect()
    }

    pub(super) fn read_grants(&self) -> RwLockReadGuard<'_, GrantMap> {
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write_grants(&self) -> RwLockWriteGuard<'_, GrantMap> {
        self.grants.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that every byte of the range is covered by a live grant; the guard it
    /// returns keeps it so until dropped.
    pub(super) fn check_granted(&self, gpa: u64, len: u64) -> Result<RwLockReadGuard<'_, GrantMap>, InspectError> {
        let grants = self.read_grants();
        covered(&grants, gpa, len)?;
        Ok(grants)
    }

    /// Fails unless every byte of the range is granted now.
    pub fn check_range(&self, gpa: u64, len: u64) -> Result<(), InspectError> {
        covered(&self.read_grants(), gpa, len)
    }

    /// The bytes of a granted range, read by the agent.
    pub fn read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len > MAX_READ {
            return Err(InspectError::BadRequest(format!("reads are limited to {MAX_READ} bytes")));
        }
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_READ, [gpa, len, 0, 0], &[])?;
        Ok(done.data(0, len)?)
    }

    /// The window's bytes as the agent reads them, whether granted now or revoked since:
    /// an audit of what a compromised agent could see (a revoked grant reads as zeros).
    /// The range must lie inside one memslot of the window.
    pub fn audit_read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len == 0 || len > MAX_READ {
            return Err(InspectError::BadRequest(format!("audit reads are 1 to {MAX_READ} bytes")));
        }
        if !self.window.contains(gpa, len) {
            return Err(InspectError::BadRequest(format!("{gpa:#x}+{len:#x} is not inside one memslot of the window")));
        }
        // The read guard keeps revokes out while the agent reads.
        let _grants = self.read_grants();
        let done = self.link.call(abi::OP_READ, [gpa, len, 0, 0], &[])?;
        Ok(done.data(0, len)?)
    }

    /// Copies a granted range straight from this process's read-only mappings of the
    /// grants (bulk transfer: no agent round trip, no copy through its data slot). The
    /// grant table stays locked while copying, so a revoke cannot unmap under it.
    pub fn read_mapped(&self, gpa: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        if len > MAX_MAPPED_READ {
            return Err(InspectError::BadRequest(format!("mapped reads are limited to {MAX_MAPPED_READ} bytes")));
        }
        let grants = self.check_granted(gpa, len)?;
        let mut out = vec![0u8; len as usize];
        let end = gpa + len;
        for g in grants.values() {
            let (lo, hi) = (gpa.max(g.mapped.grant.gpa), end.min(g.mapped.grant.gpa + g.mapped.grant.len));
            if lo >= hi {
                continue;
            }
            let src = g.mapped.host_addr() + (lo - g.mapped.grant.gpa);
            // SAFETY: lo..hi lies inside this grant, whose PROT_READ mapping lives while the
            // grant table is locked; the source may change the bytes under us (a snapshot of
            // racing bytes is what a reader of a running VM gets), and `out` is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src as *const u8,
                    out.as_mut_ptr().add((lo - gpa) as usize),
                    (hi - lo) as usize,
                )
            };
        }
        Ok(out)
    }

    /// xxh64 and SHA-256 of a granted range, computed by the agent.
    pub fn hash(&self, gpa: u64, len: u64) -> Result<(u64, [u8; 32]), InspectError> {
        if len > MAX_HASH_LEN {
            return Err(InspectError::BadRequest(format!("hashes cover at most {} MiB", MAX_HASH_LEN >> 20)));
        }
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_HASH, [gpa, len, 0, 0], &[])?;
        let digest = done.data(0, 32)?.try_into().expect("32 bytes");
        Ok((done.result[0], digest))
    }

    /// Every GPA in the range where `pattern` occurs: (total, the first ones stored, at
    /// most [`abi::MAX_SCAN_HITS`]). Runs in steps of [`SCAN_STEP`] bytes.
    pub fn scan(&self, gpa: u64, len: u64, pattern: &[u8]) -> Result<(u64, Vec<u64>), InspectError> {
        if pattern.is_empty() || pattern.len() > MAX_PATTERN {
            return Err(InspectError::BadRequest(format!("patterns are 1 to {MAX_PATTERN} bytes")));
        }
        covered(&self.read_grants(), gpa, len)?;
        let end = gpa + len;
        let (mut total, mut hits) = (0u64, Vec::new());
        let mut step_start = gpa;
        // Under a rate limit, steps of a tenth of a second's budget, each followed by the
        // agent idling until the average is back under the limit.
        let step = self.scan_rate_limit.map_or(SCAN_STEP, |rate| (rate / 10).clamp(PAGE, SCAN_STEP));
        let started = Instant::now();
        while step_start < end {
            if let Some(rate) = self.scan_rate_limit {
                let due = Duration::from_secs_f64((step_start - gpa) as f64 / rate as f64);
                std::thread::sleep(due.saturating_sub(started.elapsed()));
            }
            // Each step reads pattern.len() - 1 bytes past its share, so no match that
            // straddles two shares is lost.
            let starts_end = (step_start + step).min(end);
            let step_len = (starts_end + pattern.len() as u64 - 1).min(end) - step_start;
            let (step_total, step_hits) = self.scan_step(step_start, step_len, pattern)?;
            total += step_total;
            let room = abi::MAX_SCAN_HITS - hits.len();
            hits.extend(step_hits.into_iter().take(room));
            step_start = starts_end;
        }
        Ok((total, hits))
    }

    /// One scan command over `[gpa, gpa + len)`. A match that starts at or after the step's
    /// share of the range (`len - pattern.len() + 1` bytes) would not fit: no match is
    /// counted by two steps.
    fn scan_step(&self, gpa: u64, len: u64, pattern: &[u8]) -> Result<(u64, Vec<u64>), InspectError> {
        let _granted = self.check_granted(gpa, len)?;
        let done = self.link.call(abi::OP_SCAN, [gpa, len, pattern.len() as u64, 0], pattern)?;
        agent_replies::scan_matches(&done, gpa, len, pattern.len() as u64)
    }

    /// Has the agent try to write `byte` into the window at `gpa`; returns what it reads back.
    pub fn write_probe(&self, gpa: u64, byte: u8) -> Result<u8, InspectError> {
        let _granted = self.check_granted(gpa, 1)?;
        let done = self.link.call(abi::OP_WRITE_PROBE, [gpa, u64::from(byte), 0, 0], &[])?;
        Ok(done.result[0] as u8)
    }

    /// Coherence latency samples in TSC cycles: the agent spins on the (sequence, TSC)
    /// pair the source publishes at `gpa` and records how long each new stamp took to show.
    /// A sample is negative where the agent's TSC read lags the source's by more than that.
    pub fn latency(&self, gpa: u64, count: u64, timeout_ms: u64) -> Result<Vec<i64>, InspectError> {
        if count == 0 || count > abi::MAX_LATENCY_SAMPLES {
            return Err(InspectError::BadRequest(format!("1 to {} samples", abi::MAX_LATENCY_SAMPLES)));
        }
        if timeout_ms > MAX_LATENCY_MS {
            return Err(InspectError::BadRequest(format!("at most {MAX_LATENCY_MS} ms")));
        }
        let _granted = self.check_granted(gpa, 16)?;
        // The agent's deadline in TSC cycles, assuming at most 10 GHz so it is never too short.
        let timeout_cycles = timeout_ms.saturating_mul(10_000_000);
        let done = self.link.call(abi::OP_LATENCY, [gpa, count, timeout_cycles, 0], &[])?;
        Ok(done.u64s(0, done.result[0], count)?.into_iter().map(|c| c as i64).collect())
    }
}
