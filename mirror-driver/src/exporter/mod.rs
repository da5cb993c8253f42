//! The source side of the mirror device: serves a Unix socket on which allowed
//! peers ask for read-only grants of guest RAM and receive O_RDONLY re-opens of
//! the RAM memfd chunks, and pushes events (revoke, discard, pause, exit).
//!
//! What it guarantees, whatever a peer does (see docs/threat-model.md):
//! - **Read-only.** A chunk is sealed with `F_SEAL_FUTURE_WRITE` before its first
//!   fd leaves (see [`crate::memfd`]): no holder, whatever its uid short of
//!   root with CAP_SYS_PTRACE, can write source RAM through a granted fd.
//! - **Revocation a holder cannot outlive.** [`Exporter::revoke`] re-homes the
//!   grant's chunk: with the vCPUs paused it copies the chunk into a fresh memfd
//!   and maps that over the old range (`MAP_FIXED`), so KVM's MMU notifiers move
//!   the source's own view and every fd handed out before is a dead snapshot.
//!   Other grants on the same chunk are revoked with it (their holders may ask
//!   again). [`Exporter::grants`] lists every fd that may still see live memory,
//!   released and disconnected ones included, until its chunk is re-homed.
//! - **Bounded peers.** [`ExportLimits`]: connections in all and per uid, the
//!   time to say Hello, idle time, grants per request and per uid, vCPU-state
//!   kicks per second; revoke acknowledgements count only for revokes sent.
//!
//! Every connection has its own thread (at most [`ExportLimits::max_connections`]).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use specula_common::sync::lock;

use crate::dirty::Backlog;
use crate::protocol::{ErrorCode, Grant, Message, Range, EVENT_ID};
use crate::wire;

mod chunk;
mod dirty_feed;
mod grants;
mod session;
mod shared;
mod source;
#[cfg(test)]
mod tests;
mod tracing;

pub use session::peer_uid;
pub use source::{BoxError, SourceVm, SourceVmError};

use session::accept_loop;
use shared::{broadcast, random_nonce, SnapshotCache};

/// An error reply to a peer's request.
fn error(code: ErrorCode, text: impl Into<String>) -> Message {
    Message::Error { code, text: text.into() }
}

/// Limits on what peers may hold and do. Every field is documented in docs/limits.md.
#[derive(Debug, Clone)]
pub struct ExportLimits {
    /// Inspectors attached at once.
    pub max_connections: usize,
    /// Inspectors attached at once with the same uid (so one uid cannot lock out the others).
    pub max_connections_per_uid: usize,
    /// Time a new connection has to say Hello.
    pub hello_timeout: Duration,
    /// A connection that holds no grant and sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Grant pieces (one fd each) one request may produce.
    pub max_grants_per_request: usize,
    /// Grant records one uid may have: active, released or disconnected (the last two
    /// because their fds may still be held), until the source revokes some.
    pub max_grants_per_uid: usize,
    /// vCPU registers are snapshot (kicking every vCPU) at most once per this interval;
    /// requests within it share the last snapshot.
    pub vcpu_state_interval: Duration,
    /// How long a revoke waits for holders to acknowledge (they lose access anyway).
    pub revoke_ack_timeout: Duration,
    /// How long one event or reply write may block before its peer is dropped.
    pub send_timeout: Duration,
    /// How often the dirty log is collected while an inspector subscribes to it.
    pub dirty_interval: Duration,
    /// Unsent bytes a peer's socket may hold before its dirty pages wait (coalesced)
    /// for it to catch up rather than the feed blocking on it.
    pub dirty_max_unsent: usize,
}

impl Default for ExportLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_connections_per_uid: 16,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_grants_per_request: 2048,
            max_grants_per_uid: 8192,
            vcpu_state_interval: Duration::from_millis(20),
            revoke_ack_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(1),
            dirty_interval: Duration::from_millis(20),
            dirty_max_unsent: 128 << 10,
        }
    }
}

/// One chunk of source RAM: `len` bytes at `gpa`, at offset 0 of `file`, mapped
/// read-write by the source at `host_addr`.
#[derive(Clone)]
pub struct ExportRegion {
    pub gpa: u64,
    pub len: u64,
    pub file: Arc<File>,
    pub host_addr: u64,
}

/// Who may attach and what they may map.
#[derive(Debug, Clone)]
pub struct ExportPolicy {
    /// Peer uids allowed to attach.
    pub allowed_uids: Vec<u32>,
    /// Ranges grants must fall within; `None` allows all of RAM.
    pub ranges: Option<Vec<Range>>,
    /// Whether a uid may be granted again a range revoked from it.
    pub regrant_after_revoke: bool,
    /// Whether inspectors may pause the source (each holds at most one pause, released
    /// when it resumes or disconnects).
    pub allow_pause: bool,
    /// Whether inspectors may trace the guest (MSR writes exit to the source, which
    /// reports them); what is armed is what the subscribers want, nothing when none.
    pub allow_trace: bool,
    /// Whether a tracing inspector may have software breakpoints written into guest
    /// text (a 2-byte `out` over a no-op): the one way an inspector makes the source
    /// write guest memory, allowed apart.
    pub allow_trace_patches: bool,
}

/// Failures of the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot create the mirror socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no grant {0}")]
    UnknownGrant(u64),
    #[error("range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("cannot punch a hole in guest RAM")]
    Punch(#[source] std::io::Error),
    #[error("cannot pause the source's vCPUs to re-home chunk {gpa:#x}")]
    Pause {
        gpa: u64,
        #[source]
        source: SourceVmError,
    },
    #[error("cannot re-home RAM chunk {gpa:#x} into a fresh memfd")]
    Rehome {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    /// The exporter was shut down: the source's RAM may be unmapped, so nothing
    /// revokes or discards it any more.
    #[error("the source VM is stopping: its RAM is no longer revoked or discarded")]
    Stopping,
}

/// Where a grant record stands. Only a re-home of its chunk (a revoke) ends a record:
/// a holder that released its grant or hung up may still keep the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantState {
    /// Held by a connected inspector.
    Active,
    /// Released by its holder, which may still keep the fd.
    Released,
    /// Its holder's connection is gone; the process may still keep the fd.
    Disconnected,
}

impl GrantState {
    /// Short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::Released => "released",
            GrantState::Disconnected => "disconnected",
        }
    }
}

/// A grant as the source records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    pub grant: Grant,
    /// Index of the chunk whose fd was handed out.
    pub chunk: usize,
    pub uid: u32,
    pub connection: u64,
    pub state: GrantState,
}

/// What a revoke did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// Every grant that lost access (the asked one and the others on its chunk).
    pub revoked: Vec<u64>,
    /// Holders' connections that did not acknowledge in time and were disconnected
    /// (their fds are dead snapshots all the same).
    pub unacknowledged: Vec<u64>,
}

struct Chunk {
    gpa: u64,
    len: u64,
    host_addr: u64,
    /// The chunk's current memfd; replaced when the chunk is re-homed.
    file: Mutex<Arc<File>>,
}

struct Connection {
    id: u64,
    uid: u32,
    writer: Mutex<UnixStream>,
    /// Revokes sent to this peer and not yet acknowledged, as (grant id, nonce).
    pending_revokes: Mutex<HashSet<(u64, u64)>>,
    acked: Condvar,
    alive: AtomicBool,
    /// Whether this peer holds a pause of the source.
    pause_held: AtomicBool,
    /// Written pages not yet sent, while this peer subscribes to the dirty log.
    dirty: Mutex<Option<Backlog>>,
    /// The trace kinds this peer subscribes to (bits of `protocol::trace_kind`).
    trace_kinds: AtomicU32,
}

impl Connection {
    /// Writes one frame; a peer that cannot take it within the send timeout is dropped.
    fn send(&self, id: u32, message: &Message, fds: &[RawFd]) -> bool {
        let writer = lock(&self.writer);
        match wire::send(&writer, id, message, fds) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("mirror: dropping inspector {} (uid {}): {e}", self.id, self.uid);
                self.close(&writer);
                false
            }
        }
    }

    fn close(&self, writer: &UnixStream) {
        self.alive.store(false, Ordering::SeqCst);
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }

    fn disconnect(&self) {
        self.close(&lock(&self.writer));
    }
}

struct Shared {
    chunks: Vec<Chunk>,
    ram_ranges: Vec<Range>,
    ram_size: u64,
    vcpus: u32,
    policy: ExportPolicy,
    limits: ExportLimits,
    source: Arc<dyn SourceVm>,
    connections: Mutex<Vec<Arc<Connection>>>,
    /// Every grant whose fd may still see live memory, by id.
    grants: Mutex<BTreeMap<u64, GrantRecord>>,
    /// Ranges revoked from each uid (refused to it again unless the policy allows).
    revoked: Mutex<Vec<(u32, Range)>>,
    /// Serializes what hands out fds, re-homes chunks or punches holes.
    ops: Mutex<()>,
    /// The last vCPU snapshot, shared by requests within the snapshot interval.
    vcpu_cache: SnapshotCache,
    next_grant: AtomicU64,
    next_connection: AtomicU64,
    stopping: AtomicBool,
    /// Whether KVM logs dirty pages now (while any peer subscribes), and whether the
    /// collector thread runs.
    dirty_logging: Mutex<DirtyFeedState>,
    /// Serializes dirty-log collections (the collector's and those a `DirtySync` asks
    /// for), so each written page is handed out once and in order.
    collecting: Mutex<()>,
    /// The trace kinds armed at the source (the union of the subscribers'); held while
    /// they change, so arming follows the subscriptions in order.
    trace_armed: Mutex<u32>,
    /// The connection whose breakpoints (hardware or software) are armed, if one's are.
    breakpoint_holder: Mutex<Option<u64>>,
    /// The connection whose write traps are armed, if one's are.
    write_trap_holder: Mutex<Option<u64>>,
}

#[derive(Default)]
struct DirtyFeedState {
    logging: bool,
    collector: bool,
}

/// The running exporter.
pub struct Exporter {
    shared: Arc<Shared>,
    path: PathBuf,
    listener_fd: RawFd,
}

impl Exporter {
    /// Binds `path` and starts accepting inspectors. The socket is mode 0600 from its
    /// creation when only the source's own uid may attach, 0666 when other uids may
    /// (SO_PEERCRED is checked against the allow list either way).
    pub fn start(
        path: &Path,
        regions: Vec<ExportRegion>,
        vcpus: u32,
        policy: ExportPolicy,
        limits: ExportLimits,
        source: Arc<dyn SourceVm>,
    ) -> Result<Self, ExportError> {
        // SAFETY: getuid cannot fail.
        let own_uid = unsafe { libc::getuid() };
        let mode = if policy.allowed_uids.iter().all(|&uid| uid == own_uid) { 0o600 } else { 0o666 };
        let listener =
            bind_private(path, mode).map_err(|source| ExportError::Bind { path: path.to_path_buf(), source })?;
        let ram_size = regions.iter().map(|r| r.len).sum();
        let ram_ranges = merge_regions(&regions);
        let chunks = regions
            .into_iter()
            .map(|r| Chunk { gpa: r.gpa, len: r.len, host_addr: r.host_addr, file: Mutex::new(r.file) })
            .collect();
        let shared = Arc::new(Shared {
            chunks,
            ram_ranges,
            ram_size,
            vcpus,
            policy,
            source,
            connections: Mutex::new(Vec::new()),
            grants: Mutex::new(BTreeMap::new()),
            revoked: Mutex::new(Vec::new()),
            ops: Mutex::new(()),
            vcpu_cache: SnapshotCache::new(limits.vcpu_state_interval),
            limits,
            next_grant: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            dirty_logging: Mutex::new(DirtyFeedState::default()),
            collecting: Mutex::new(()),
            trace_armed: Mutex::new(0),
            breakpoint_holder: Mutex::new(None),
            write_trap_holder: Mutex::new(None),
        });
        if shared.policy.allow_trace {
            tracing::start_sender(&shared).map_err(|source| ExportError::Bind { path: path.to_path_buf(), source })?;
        }
        let listener_fd = listener.as_raw_fd();
        let accept_shared = shared.clone();
        std::thread::Builder::new()
            .name("mirror-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|source| ExportError::Bind { path: path.to_path_buf(), source })?;
        Ok(Self { shared, path: path.to_path_buf(), listener_fd })
    }

    /// Inspectors attached now.
    pub fn connection_count(&self) -> usize {
        self.shared.live_connections().len()
    }

    /// Every grant whose fd may still see live source memory, by id.
    pub fn grants(&self) -> Vec<GrantRecord> {
        lock(&self.shared.grants).values().copied().collect()
    }

    /// Revokes a grant so that its holder, whatever it does, sees no later write of the
    /// source: re-homes the grant's chunk (every grant on it loses access), then tells
    /// the holders and waits for their acknowledgements.
    pub fn revoke(&self, grant_id: u64) -> Result<RevokeOutcome, ExportError> {
        let shared = &self.shared;
        let affected = {
            let _ops = lock(&shared.ops);
            if shared.stopping.load(Ordering::SeqCst) {
                return Err(ExportError::Stopping);
            }
            let record = *lock(&shared.grants).get(&grant_id).ok_or(ExportError::UnknownGrant(grant_id))?;
            shared.rehome(&shared.chunks[record.chunk])?;
            let mut grants = lock(&shared.grants);
            let affected: Vec<GrantRecord> = grants.values().filter(|g| g.chunk == record.chunk).copied().collect();
            grants.retain(|_, g| g.chunk != record.chunk);
            if !shared.policy.regrant_after_revoke {
                let range = Range { gpa: record.grant.gpa, len: record.grant.len };
                lock(&shared.revoked).push((record.uid, range));
            }
            affected
        };
        Ok(self.notify_revoked(&affected))
    }

    /// Sends a Revoke for every affected active grant and waits (bounded) for the acks.
    fn notify_revoked(&self, affected: &[GrantRecord]) -> RevokeOutcome {
        let connections = self.shared.live_connections();
        let mut waiting = Vec::new();
        for conn in &connections {
            let ids: Vec<u64> = affected
                .iter()
                .filter(|g| g.connection == conn.id && g.state == GrantState::Active)
                .map(|g| g.grant.id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let revokes: Vec<(u64, u64)> = ids.iter().map(|&id| (id, random_nonce())).collect();
            lock(&conn.pending_revokes).extend(revokes.iter().copied());
            let sent =
                revokes.iter().all(|&(grant_id, nonce)| conn.send(EVENT_ID, &Message::Revoke { grant_id, nonce }, &[]));
            if sent {
                waiting.push((conn.clone(), revokes));
            }
        }
        let deadline = Instant::now() + self.shared.limits.revoke_ack_timeout;
        let mut unacknowledged = Vec::new();
        for (conn, ids) in waiting {
            let pending = lock(&conn.pending_revokes);
            let left = deadline.saturating_duration_since(Instant::now());
            let (mut pending, timeout) = conn
                .acked
                .wait_timeout_while(pending, left, |p| ids.iter().any(|id| p.contains(id)))
                .unwrap_or_else(|p| p.into_inner());
            if timeout.timed_out() {
                ids.iter().for_each(|id| {
                    pending.remove(id);
                });
                drop(pending);
                log::warn!("mirror: inspector {} did not acknowledge a revoke; disconnected", conn.id);
                conn.disconnect();
                unacknowledged.push(conn.id);
            }
        }
        RevokeOutcome { revoked: affected.iter().map(|g| g.grant.id).collect(), unacknowledged }
    }

    /// Discards guest RAM (a balloon): the range reads as zeros afterwards, in the source
    /// and in every inspector. Chunks never granted get their pages freed (a hole punch);
    /// granted chunks are sealed against hole punching, so they are zeroed in place.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), ExportError> {
        let end = gpa.checked_add(len).ok_or(ExportError::NotRam { gpa, len })?;
        if len == 0 || !self.shared.ram_ranges.iter().any(|r| gpa >= r.gpa && end <= r.gpa + r.len) {
            return Err(ExportError::NotRam { gpa, len });
        }
        let _ops = lock(&self.shared.ops);
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(ExportError::Stopping);
        }
        for chunk in &self.shared.chunks {
            let lo = gpa.max(chunk.gpa);
            let hi = end.min(chunk.gpa + chunk.len);
            if lo < hi {
                chunk.discard(lo - chunk.gpa, hi - lo).map_err(ExportError::Punch)?;
            }
        }
        self.broadcast(&Message::Discard { gpa, len });
        Ok(())
    }

    /// Sends an event to every inspector at once; a peer that cannot take it within the
    /// send timeout is dropped, so the whole broadcast takes at most about that long.
    pub fn broadcast(&self, event: &Message) {
        broadcast(&self.shared, event);
    }

    /// Tells every inspector the source is exiting and stops accepting.
    ///
    /// On return no revoke or discard is in flight and none starts again
    /// ([`ExportError::Stopping`]), so the source may unmap its RAM.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Waits out a revoke or discard that took `ops` before `stopping` was set: both
        // write the source's mapping, which the caller is about to unmap.
        drop(lock(&self.shared.ops));
        self.broadcast(&Message::SourceExiting);
        if let Some(feed) = self.shared.source.trace_feed() {
            feed.close();
        }
        // SAFETY: shutting down our own listening socket wakes the accept thread.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates the listening socket with `mode` from the moment it exists (less the umask,
/// which is then lifted to exactly `mode`: never wider).
fn bind_private(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let listener = crate::socket::bind_private(path, mode)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

fn merge_regions(regions: &[ExportRegion]) -> Vec<Range> {
    let mut merged: Vec<Range> = Vec::new();
    for r in regions {
        match merged.last_mut() {
            Some(last) if last.gpa + last.len == r.gpa => last.len += r.len,
            _ => merged.push(Range { gpa: r.gpa, len: r.len }),
        }
    }
    merged
}
