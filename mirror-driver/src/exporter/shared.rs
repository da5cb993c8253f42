//! State shared by the exporter's threads: live connections, the vCPU snapshot cache,
//! broadcasts, revoke nonces and the grant table's upkeep.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{lock, Connection, GrantRecord, GrantState, Shared, SourceVmError};
use crate::protocol::{Message, VcpuRegs, EVENT_ID};

impl Shared {
    pub(super) fn live_connections(&self) -> Vec<Arc<Connection>> {
        let mut conns = lock(&self.connections);
        conns.retain(|c| c.alive.load(Ordering::SeqCst));
        conns.clone()
    }

    /// The last vCPU snapshot if it is recent enough, else a new one.
    pub(super) fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, SourceVmError> {
        self.vcpu_cache.get(|| self.source.vcpu_state())
    }

    /// Marks a connection's active grants as possibly still held by a gone peer.
    pub(super) fn disconnected(&self, conn: &Connection) {
        let mut grants = lock(&self.grants);
        for record in grants.values_mut().filter(|g| g.connection == conn.id && g.state == GrantState::Active) {
            record.state = GrantState::Disconnected;
        }
        forget_duplicate_exposures(&mut grants);
    }
}

/// vCPU snapshots kick every vCPU out of the guest: however many peers ask, at most one
/// is taken per interval, and the others share it.
pub(super) struct SnapshotCache {
    interval: Duration,
    last: Mutex<Option<(Instant, Vec<VcpuRegs>)>>,
}

impl SnapshotCache {
    pub(super) fn new(interval: Duration) -> Self {
        Self { interval, last: Mutex::new(None) }
    }

    /// The last snapshot if younger than the interval, else `take()`'s. Concurrent callers
    /// wait for one `take` rather than each kicking the vCPUs.
    pub(super) fn get(
        &self,
        take: impl FnOnce() -> Result<Vec<VcpuRegs>, SourceVmError>,
    ) -> Result<Vec<VcpuRegs>, SourceVmError> {
        let mut last = lock(&self.last);
        if let Some((taken, regs)) = last.as_ref() {
            if taken.elapsed() < self.interval {
                return Ok(regs.clone());
            }
        }
        let regs = take()?;
        *last = Some((Instant::now(), regs.clone()));
        Ok(regs)
    }
}

/// Sends `event` to every live peer at once (see [`super::Exporter::broadcast`]).
pub(super) fn broadcast(shared: &Shared, event: &Message) {
    let connections = shared.live_connections();
    std::thread::scope(|scope| {
        for conn in &connections {
            scope.spawn(move || conn.send(EVENT_ID, event, &[]));
        }
    });
}

/// A nonce a peer cannot guess (getrandom), so it cannot acknowledge ahead of time.
pub(super) fn random_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom fills at most `bytes.len()` bytes of a live buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // The kernel's CSPRNG does not fail for 8 bytes once booted; never hand out 0s.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return now.as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(bytes)
}

/// A uid that holds (or may hold) several fds of one chunk sees the same memory through
/// each: keep one record per (uid, chunk) among the released and disconnected ones, so
/// a peer that loops on grant and release cannot grow the table.
pub(super) fn forget_duplicate_exposures(grants: &mut BTreeMap<u64, GrantRecord>) {
    let mut seen = HashSet::new();
    let active: HashSet<(u32, usize)> =
        grants.values().filter(|g| g.state == GrantState::Active).map(|g| (g.uid, g.chunk)).collect();
    grants.retain(|_, g| {
        g.state == GrantState::Active || (!active.contains(&(g.uid, g.chunk)) && seen.insert((g.uid, g.chunk)))
    });
}
