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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dirty::{self, Backlog};
use crate::memfd;
use crate::protocol::{
    DirtyMechanism, ErrorCode, Grant, Message, Range, VcpuRegs, ACCESS_READ_ONLY, EVENT_ID, MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
};
use crate::wire::{self, WireError};

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

/// What the exporter asks of the source VM.
pub trait SourceVm: Send + Sync {
    /// Registers of every vCPU.
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, String>;
    /// Holds every vCPU outside KVM_RUN until [`SourceVm::resume`]; holds nest.
    fn pause(&self) -> Result<(), String>;
    /// Releases one hold taken by [`SourceVm::pause`].
    fn resume(&self);
    /// Starts (`true`) or stops KVM dirty logging of guest RAM.
    fn set_dirty_logging(&self, _on: bool) -> Result<(), String> {
        Err("this source keeps no dirty log".into())
    }
    /// Pages the guest wrote since the last call (or since logging started), as runs in
    /// GPA order.
    fn take_dirty_pages(&self) -> Result<Vec<Range>, String> {
        Err("this source keeps no dirty log".into())
    }
    /// How [`SourceVm::take_dirty_pages`] learns of writes.
    fn dirty_mechanism(&self) -> DirtyMechanism {
        DirtyMechanism::Bitmap
    }
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
    #[error("cannot pause the source's vCPUs to re-home chunk {gpa:#x}: {reason}")]
    Pause { gpa: u64, reason: String },
    #[error("cannot re-home RAM chunk {gpa:#x} into a fresh memfd")]
    Rehome {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
        });
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
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.broadcast(&Message::SourceExiting);
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

impl Chunk {
    fn current_file(&self) -> Arc<File> {
        lock(&self.file).clone()
    }

    /// Zeros `len` bytes at `offset`: a hole punch where the chunk is not sealed, an
    /// in-place zeroing where it is.
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let file = self.current_file();
        match punch_hole(&file, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // SAFETY: offset + len lies within this chunk, which the source keeps mapped
                // read-write at host_addr for the VM's lifetime (a re-home replaces the
                // mapping in place, under the same `ops` lock the caller holds).
                unsafe { std::ptr::write_bytes((self.host_addr + offset) as *mut u8, 0, len as usize) };
                Ok(())
            }
            other => other,
        }
    }
}

impl Shared {
    fn live_connections(&self) -> Vec<Arc<Connection>> {
        let mut conns = lock(&self.connections);
        conns.retain(|c| c.alive.load(Ordering::SeqCst));
        conns.clone()
    }

    /// Moves `chunk` into a fresh memfd mapped at the same address, with the vCPUs held,
    /// so every fd of the old memfd becomes a snapshot nobody writes. Caller holds `ops`.
    fn rehome(&self, chunk: &Chunk) -> Result<(), ExportError> {
        let gpa = chunk.gpa;
        let io = |source| ExportError::Rehome { gpa, source };
        let fresh = memfd::create_ram_memfd(chunk.len).map_err(io)?;
        let len = chunk.len as usize;
        // SAFETY: a new shared read-write mapping of our own fresh memfd; unmapped below.
        let staging = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fresh.as_raw_fd(),
                0,
            )
        };
        if staging == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        let old = chunk.current_file();
        let moved = self.source.pause().map_err(|reason| ExportError::Pause { gpa, reason }).and_then(|()| {
            let moved = copy_and_remap(chunk, &old, staging.cast(), &fresh).map_err(io);
            self.source.resume();
            moved
        });
        // SAFETY: unmapping the staging mapping created above.
        unsafe { libc::munmap(staging, len) };
        moved?;
        *lock(&chunk.file) = Arc::new(fresh);
        Ok(())
    }

    /// The last vCPU snapshot if it is recent enough, else a new one.
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, String> {
        self.vcpu_cache.get(|| self.source.vcpu_state())
    }

    /// Marks a connection's active grants as possibly still held by a gone peer.
    fn disconnected(&self, conn: &Connection) {
        let mut grants = lock(&self.grants);
        for record in grants.values_mut().filter(|g| g.connection == conn.id && g.state == GrantState::Active) {
            record.state = GrantState::Disconnected;
        }
        forget_duplicate_exposures(&mut grants);
    }
}

/// vCPU snapshots kick every vCPU out of the guest: however many peers ask, at most one
/// is taken per interval, and the others share it.
struct SnapshotCache {
    interval: Duration,
    last: Mutex<Option<(Instant, Vec<VcpuRegs>)>>,
}

impl SnapshotCache {
    fn new(interval: Duration) -> Self {
        Self { interval, last: Mutex::new(None) }
    }

    /// The last snapshot if younger than the interval, else `take()`'s. Concurrent callers
    /// wait for one `take` rather than each kicking the vCPUs.
    fn get(&self, take: impl FnOnce() -> Result<Vec<VcpuRegs>, String>) -> Result<Vec<VcpuRegs>, String> {
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

/// Sends `event` to every live peer at once (see [`Exporter::broadcast`]).
fn broadcast(shared: &Shared, event: &Message) {
    let connections = shared.live_connections();
    std::thread::scope(|scope| {
        for conn in &connections {
            scope.spawn(move || conn.send(EVENT_ID, event, &[]));
        }
    });
}

/// Subscribes `conn` to the dirty-page feed: KVM logging starts with the first
/// subscriber, and the collector thread with the first subscription ever.
fn subscribe_dirty(conn: &Connection, shared: &Arc<Shared>) -> Result<(), String> {
    let mut state = lock(&shared.dirty_logging);
    if !state.logging {
        shared.source.set_dirty_logging(true)?;
        state.logging = true;
    }
    lock(&conn.dirty).get_or_insert_with(Backlog::default);
    if !state.collector {
        let weak = Arc::downgrade(shared);
        std::thread::Builder::new()
            .name("mirror-dirty".into())
            .spawn(move || collect_dirty(weak))
            .map_err(|e| format!("cannot start the collector: {e}"))?;
        state.collector = true;
    }
    Ok(())
}

/// Every dirty interval: takes KVM's dirty log, hands each subscriber the written pages
/// inside its own active grants, and stops logging when no subscriber is left. A peer
/// whose socket is backed up keeps a coalesced backlog instead of blocking the others.
fn collect_dirty(weak: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let interval = shared.limits.dirty_interval;
        let subscribers: Vec<Arc<Connection>> = {
            // Under the lock subscriptions take, so logging is never turned off under a
            // subscriber that arrived in between.
            let mut state = lock(&shared.dirty_logging);
            let subscribers: Vec<Arc<Connection>> =
                shared.live_connections().into_iter().filter(|c| lock(&c.dirty).is_some()).collect();
            let wanted = !subscribers.is_empty();
            if state.logging != wanted {
                match shared.source.set_dirty_logging(wanted) {
                    Ok(()) => state.logging = wanted,
                    Err(e) => {
                        log::warn!("mirror: cannot turn dirty logging {}: {e}", if wanted { "on" } else { "off" })
                    }
                }
            }
            if !state.logging {
                drop(state);
                drop(shared);
                std::thread::sleep(interval);
                continue;
            }
            subscribers
        };
        match shared.source.take_dirty_pages() {
            Ok(written) => {
                for conn in &subscribers {
                    feed(&shared, conn, &written);
                }
            }
            Err(e) => log::warn!("mirror: cannot read the dirty log: {e}"),
        }
        drop(shared);
        std::thread::sleep(interval);
    }
}

/// Adds the written pages inside `conn`'s active grants to its backlog and sends the
/// backlog if its socket has room.
fn feed(shared: &Shared, conn: &Connection, written: &[Range]) {
    let mut allowed: Vec<Range> = lock(&shared.grants)
        .values()
        .filter(|g| g.connection == conn.id && g.state == GrantState::Active)
        .map(|g| Range { gpa: g.grant.gpa, len: g.grant.len })
        .collect();
    allowed.sort_unstable_by_key(|r| r.gpa);
    let mut slot = lock(&conn.dirty);
    let Some(backlog) = slot.as_mut() else { return };
    backlog.add(&dirty::clip(written, &allowed));
    if backlog.is_empty() || unsent_bytes(conn) > shared.limits.dirty_max_unsent {
        return;
    }
    let (coalesced, frames) = backlog.take();
    drop(slot);
    for ranges in frames {
        if !conn.send(EVENT_ID, &Message::DirtyPages { coalesced, ranges }, &[]) {
            return;
        }
    }
}

/// Bytes written to `conn`'s socket that its peer has not read yet (SIOCOUTQ).
fn unsent_bytes(conn: &Connection) -> usize {
    let writer = lock(&conn.writer);
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int for a socket we own.
    let ok = unsafe { libc::ioctl(writer.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } == 0;
    if ok {
        queued.max(0) as usize
    } else {
        usize::MAX
    }
}

/// A nonce a peer cannot guess (getrandom), so it cannot acknowledge ahead of time.
fn random_nonce() -> u64 {
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
fn forget_duplicate_exposures(grants: &mut BTreeMap<u64, GrantRecord>) {
    let mut seen = HashSet::new();
    let active: HashSet<(u32, usize)> =
        grants.values().filter(|g| g.state == GrantState::Active).map(|g| (g.uid, g.chunk)).collect();
    grants.retain(|_, g| {
        g.state == GrantState::Active || (!active.contains(&(g.uid, g.chunk)) && seen.insert((g.uid, g.chunk)))
    });
}

/// Copies the chunk's data (holes stay holes) into `staging` and maps `fresh` over the
/// source's range. The vCPUs are held, so no guest write is lost between the two.
fn copy_and_remap(chunk: &Chunk, old: &File, staging: *mut u8, fresh: &File) -> std::io::Result<()> {
    for (offset, len) in data_segments(old, chunk.len)? {
        // SAFETY: both ranges lie inside live `chunk.len`-byte mappings (the source's RAM
        // mapping and the staging mapping), which do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (chunk.host_addr + offset) as *const u8,
                staging.add(offset as usize),
                len as usize,
            )
        };
    }
    // SAFETY: replaces exactly the source's own read-write mapping of this chunk, in place,
    // with the same length and protection; KVM's MMU notifiers drop stale translations.
    let mapped = unsafe {
        libc::mmap(
            chunk.host_addr as *mut libc::c_void,
            chunk.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fresh.as_raw_fd(),
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The (offset, len) ranges of `file` that hold data, by SEEK_DATA/SEEK_HOLE.
fn data_segments(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut segments = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        // SAFETY: lseek on a valid fd; it does not touch memory.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole > data {
            segments.push((data, hole - data));
        }
        offset = hole.max(data + 1);
    }
    Ok(segments)
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

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file we own; the range was checked against its size.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    crate::socket::peer_cred(stream).map(|cred| cred.uid)
}

const PAGE: u64 = 4096;

/// Pause before accepting again after accept(2) fails (out of fds, say), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn refuse(stream: &UnixStream, text: String) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = wire::send(stream, EVENT_ID, &Message::Error { code: ErrorCode::PeerRefused, text }, &[]);
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                log::warn!("mirror: accept failed: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        if let Some(conn) = admit(&stream, &shared) {
            let conn_shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mirror-peer{}", conn.id))
                .spawn(move || serve(stream, conn, conn_shared));
            if let Err(e) = spawned {
                log::error!("mirror: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Checks the peer's uid and the connection limits; registers the connection.
fn admit(stream: &UnixStream, shared: &Shared) -> Option<Arc<Connection>> {
    let uid = match peer_uid(stream) {
        Ok(uid) => uid,
        Err(e) => {
            log::warn!("mirror: cannot read peer credentials: {e}");
            return None;
        }
    };
    if !shared.policy.allowed_uids.contains(&uid) {
        refuse(stream, format!("uid {uid} is not allowed to attach"));
        log::warn!("mirror: refused a peer with uid {uid}");
        return None;
    }
    let limits = &shared.limits;
    let mut conns = lock(&shared.connections);
    conns.retain(|c| c.alive.load(Ordering::SeqCst));
    if conns.len() >= limits.max_connections {
        drop(conns);
        refuse(stream, format!("already {} inspectors attached", limits.max_connections));
        return None;
    }
    if conns.iter().filter(|c| c.uid == uid).count() >= limits.max_connections_per_uid {
        drop(conns);
        refuse(stream, format!("uid {uid} already has {} connections", limits.max_connections_per_uid));
        return None;
    }
    let writer = stream.try_clone().ok()?;
    let _ = writer.set_write_timeout(Some(limits.send_timeout));
    let conn = Arc::new(Connection {
        id: shared.next_connection.fetch_add(1, Ordering::SeqCst),
        uid,
        writer: Mutex::new(writer),
        pending_revokes: Mutex::new(HashSet::new()),
        acked: Condvar::new(),
        alive: AtomicBool::new(true),
        pause_held: AtomicBool::new(false),
        dirty: Mutex::new(None),
    });
    conns.push(conn.clone());
    Some(conn)
}

fn error(code: ErrorCode, text: impl Into<String>) -> Message {
    Message::Error { code, text: text.into() }
}

/// Serves one inspector until it leaves, idles out, or breaks the protocol's framing.
fn serve(stream: UnixStream, conn: Arc<Connection>, shared: Arc<Shared>) {
    let mut greeted = false;
    let _ = stream.set_read_timeout(Some(shared.limits.hello_timeout));
    while conn.alive.load(Ordering::SeqCst) {
        let (id, message) = match wire::recv(&stream) {
            Ok(frame) => (frame.id, frame.message), // fds from a peer are never wanted: dropped
            Err(WireError::Idle) => {
                if greeted && holds_active_grants(&shared, &conn) {
                    continue;
                }
                let why = if greeted { "idle with no grant" } else { "no Hello in time" };
                log::info!("mirror: closing inspector {} (uid {}): {why}", conn.id, conn.uid);
                conn.send(EVENT_ID, &error(ErrorCode::NotNow, format!("{why}; closing")), &[]);
                break;
            }
            Err(WireError::BadMessage { kind, id, source }) => {
                conn.send(id, &error(source.code(), format!("message kind {kind}: {source}")), &[]);
                continue;
            }
            Err(WireError::BadHeader(e)) => {
                conn.send(EVENT_ID, &error(e.code(), format!("{e}; closing")), &[]);
                break;
            }
            Err(_) => break,
        };
        if !greeted {
            greeted = hello(&conn, &shared, id, message);
            if greeted {
                let _ = stream.set_read_timeout(Some(shared.limits.idle_timeout));
            }
            continue;
        }
        handle(&conn, &shared, id, message);
    }
    conn.disconnect();
    shared.disconnected(&conn);
    if conn.pause_held.swap(false, Ordering::SeqCst) {
        // A peer that paused the source and left does not leave it paused.
        shared.source.resume();
        broadcast(&shared, &Message::Resumed);
    }
}

/// Answers the first message; true once the session is open.
fn hello(conn: &Connection, shared: &Shared, id: u32, message: Message) -> bool {
    match message {
        Message::Hello { version } if version == PROTOCOL_VERSION => {
            let ack = Message::HelloAck { version: PROTOCOL_VERSION, ram_size: shared.ram_size, vcpus: shared.vcpus };
            conn.send(id, &ack, &[]);
            true
        }
        Message::Hello { version } => {
            let text = format!("protocol version {version} is not supported; this source speaks {PROTOCOL_VERSION}");
            conn.send(id, &error(ErrorCode::BadVersion, text), &[]);
            false
        }
        _ => {
            conn.send(id, &error(ErrorCode::NotNow, "say Hello first"), &[]);
            false
        }
    }
}

fn holds_active_grants(shared: &Shared, conn: &Connection) -> bool {
    lock(&shared.grants).values().any(|g| g.connection == conn.id && g.state == GrantState::Active)
}

/// Answers one request of an open session.
fn handle(conn: &Connection, shared: &Arc<Shared>, id: u32, message: Message) {
    match message {
        Message::GetMemoryMap => {
            conn.send(id, &Message::MemoryMap { regions: shared.ram_ranges.clone() }, &[]);
        }
        Message::GrantRequest { access, ranges } => grant(conn, shared, id, access, &ranges),
        Message::Release { grant_id } => {
            let mut grants = lock(&shared.grants);
            let reply = match grants.get_mut(&grant_id) {
                Some(g) if g.connection == conn.id && g.state == GrantState::Active => {
                    g.state = GrantState::Released;
                    forget_duplicate_exposures(&mut grants);
                    Message::Released { grant_id }
                }
                _ => error(ErrorCode::UnknownGrant, format!("no grant {grant_id} on this connection")),
            };
            drop(grants);
            conn.send(id, &reply, &[]);
        }
        Message::GetVcpuState => {
            let reply = match shared.vcpu_state() {
                Ok(vcpus) => Message::VcpuState { vcpus },
                Err(e) => error(ErrorCode::Internal, format!("cannot read vCPU state: {e}")),
            };
            conn.send(id, &reply, &[]);
        }
        Message::PauseRequest | Message::ResumeRequest if !shared.policy.allow_pause => {
            let text = "this source does not let inspectors pause it (vmm --mirror-allow-pause)";
            conn.send(id, &error(ErrorCode::PolicyDenied, text), &[]);
        }
        Message::PauseRequest => {
            if conn.pause_held.swap(true, Ordering::SeqCst) {
                conn.send(id, &Message::Paused, &[]);
            } else {
                match shared.source.pause() {
                    Ok(()) => {
                        conn.send(id, &Message::Paused, &[]);
                        broadcast(shared, &Message::Paused);
                    }
                    Err(e) => {
                        conn.pause_held.store(false, Ordering::SeqCst);
                        conn.send(id, &error(ErrorCode::Internal, format!("cannot pause: {e}")), &[]);
                    }
                }
            }
        }
        Message::ResumeRequest => {
            if conn.pause_held.swap(false, Ordering::SeqCst) {
                shared.source.resume();
                broadcast(shared, &Message::Resumed);
            }
            conn.send(id, &Message::Resumed, &[]);
        }
        Message::RevokeAck { grant_id, nonce } => {
            // Only an acknowledgement of a revoke we sent, with its nonce, counts; others
            // are dropped.
            if lock(&conn.pending_revokes).remove(&(grant_id, nonce)) {
                conn.acked.notify_all();
            }
        }
        Message::DirtySubscribe => {
            let reply = match subscribe_dirty(conn, shared) {
                Ok(()) => Message::DirtySubscribed {
                    interval_us: u32::try_from(shared.limits.dirty_interval.as_micros()).unwrap_or(u32::MAX),
                    mechanism: shared.source.dirty_mechanism(),
                },
                Err(e) => error(ErrorCode::NotNow, format!("no dirty-page feed: {e}")),
            };
            conn.send(id, &reply, &[]);
        }
        Message::Hello { .. } => {
            conn.send(id, &error(ErrorCode::NotNow, "already greeted"), &[]);
        }
        other => {
            conn.send(id, &error(ErrorCode::UnknownMessage, format!("unexpected message {other:?}")), &[]);
        }
    }
}

/// Why a grant request is refused: an error reply.
fn check_grant_request(conn: &Connection, shared: &Shared, access: u32, ranges: &[Range]) -> Result<(), Message> {
    if access != ACCESS_READ_ONLY {
        return Err(error(ErrorCode::BadAccess, format!("access {access} refused: grants are read-only")));
    }
    if ranges.is_empty() {
        return Err(error(ErrorCode::Malformed, "a grant request needs at least one range"));
    }
    let revoked = lock(&shared.revoked);
    for r in ranges {
        let Some(end) = r.gpa.checked_add(r.len).filter(|_| r.len > 0) else {
            return Err(error(ErrorCode::OutOfRange, format!("range {:#x}+{:#x} is empty or overflows", r.gpa, r.len)));
        };
        if !r.gpa.is_multiple_of(PAGE) || !r.len.is_multiple_of(PAGE) {
            let text = format!("range {:#x}+{:#x} is not 4 KiB-aligned; grants are whole pages", r.gpa, r.len);
            return Err(error(ErrorCode::OutOfRange, text));
        }
        if !shared.ram_ranges.iter().any(|ram| r.gpa >= ram.gpa && end <= ram.gpa + ram.len) {
            let text = format!("range {:#x}+{:#x} is not within the source's RAM", r.gpa, r.len);
            return Err(error(ErrorCode::OutOfRange, text));
        }
        if let Some(allowed) = &shared.policy.ranges {
            if !allowed.iter().any(|a| r.gpa >= a.gpa && end <= a.gpa + a.len) {
                let text = format!("range {:#x}+{:#x} is outside the source's grant policy", r.gpa, r.len);
                return Err(error(ErrorCode::PolicyDenied, text));
            }
            // An fd exposes its whole chunk: every chunk the range touches must be allowed.
            let chunks = shared.chunks.iter().filter(|c| c.gpa < end && r.gpa < c.gpa + c.len);
            for c in chunks {
                if !allowed.iter().any(|a| c.gpa >= a.gpa && c.gpa + c.len <= a.gpa + a.len) {
                    let text = format!(
                        "range {:#x}+{:#x} lies in RAM chunk {:#x}+{:#x}, which the grant policy does not cover whole \
                         (an fd exposes its whole chunk)",
                        r.gpa, r.len, c.gpa, c.len
                    );
                    return Err(error(ErrorCode::PolicyDenied, text));
                }
            }
        }
        if let Some((_, gone)) =
            revoked.iter().find(|(uid, g)| *uid == conn.uid && r.gpa < g.gpa + g.len && g.gpa < end)
        {
            let text = format!(
                "range {:#x}+{:#x} overlaps {:#x}+{:#x}, revoked from uid {}; the source's policy does not grant it again",
                r.gpa, r.len, gone.gpa, gone.len, conn.uid
            );
            return Err(error(ErrorCode::PolicyDenied, text));
        }
    }
    Ok(())
}

/// The (chunk index, gpa, len) pieces a request asks for: one per chunk overlapped.
fn pieces(shared: &Shared, ranges: &[Range]) -> Vec<(usize, u64, u64)> {
    let mut pieces = Vec::new();
    for r in ranges {
        for (index, chunk) in shared.chunks.iter().enumerate() {
            let lo = r.gpa.max(chunk.gpa);
            let hi = (r.gpa + r.len).min(chunk.gpa + chunk.len);
            if lo < hi {
                pieces.push((index, lo, hi - lo));
            }
        }
    }
    pieces
}

/// Checks a grant request and answers it with O_RDONLY re-opens of the overlapped
/// chunks, sealed against future writes first; at most one frame's fds are open at once.
fn grant(conn: &Connection, shared: &Shared, id: u32, access: u32, ranges: &[Range]) {
    if let Err(reply) = check_grant_request(conn, shared, access, ranges) {
        conn.send(id, &reply, &[]);
        return;
    }
    let pieces = pieces(shared, ranges);
    let limits = &shared.limits;
    if pieces.len() > limits.max_grants_per_request {
        let text =
            format!("{} pieces exceed the {} one request may ask for", pieces.len(), limits.max_grants_per_request);
        conn.send(id, &error(ErrorCode::TooLarge, text), &[]);
        return;
    }
    // Held while fds are made and recorded, so a revoke sees every grant it must cut.
    let _ops = lock(&shared.ops);
    let held = lock(&shared.grants).values().filter(|g| g.uid == conn.uid).count();
    if held + pieces.len() > limits.max_grants_per_uid {
        let text = format!(
            "uid {} has {held} grants that may still be held; {} more would exceed {} (the source must revoke some)",
            conn.uid,
            pieces.len(),
            limits.max_grants_per_uid
        );
        conn.send(id, &error(ErrorCode::TooLarge, text), &[]);
        return;
    }
    let batches: Vec<_> = pieces.chunks(MAX_FDS_PER_FRAME).collect();
    for (n, batch) in batches.iter().enumerate() {
        let mut grants = Vec::with_capacity(batch.len());
        let mut files = Vec::with_capacity(batch.len());
        for (i, &(chunk_index, gpa, len)) in batch.iter().enumerate() {
            let chunk = &shared.chunks[chunk_index];
            match open_grant_fd(chunk) {
                Ok(file) => files.push(file),
                Err(e) => {
                    let text = format!("cannot hand out chunk {:#x} read-only: {e}", chunk.gpa);
                    conn.send(id, &error(ErrorCode::Internal, text), &[]);
                    return;
                }
            }
            let grant_id = shared.next_grant.fetch_add(1, Ordering::SeqCst);
            grants.push(Grant { id: grant_id, gpa, len, fd_index: i as u32, offset: gpa - chunk.gpa });
        }
        let mut records = lock(&shared.grants);
        for (g, &(chunk, ..)) in grants.iter().zip(batch.iter()) {
            let record =
                GrantRecord { grant: *g, chunk, uid: conn.uid, connection: conn.id, state: GrantState::Active };
            records.insert(g.id, record);
        }
        drop(records);
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        if !conn.send(id, &Message::GrantReply { more: n + 1 < batches.len(), grants }, &fds) {
            return;
        }
    }
}

/// Seals the chunk against future writes, then opens a new O_RDONLY file description of
/// it (through /proc, so it is not the source's read-write description).
fn open_grant_fd(chunk: &Chunk) -> std::io::Result<File> {
    let file = chunk.current_file();
    memfd::seal_future_writes(&file)?;
    std::fs::OpenOptions::new().read(true).open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, uid: u32, chunk: usize, state: GrantState) -> (u64, GrantRecord) {
        let grant = Grant { id, gpa: chunk as u64 * 4096, len: 4096, fd_index: 0, offset: 0 };
        (id, GrantRecord { grant, chunk, uid, connection: 1, state })
    }

    #[test]
    fn released_exposures_collapse_to_one_per_uid_and_chunk() {
        let mut grants: BTreeMap<u64, GrantRecord> = [
            record(1, 7, 0, GrantState::Released),
            record(2, 7, 0, GrantState::Released),
            record(3, 7, 0, GrantState::Disconnected),
            record(4, 8, 0, GrantState::Released),
            record(5, 7, 1, GrantState::Active),
            record(6, 7, 1, GrantState::Released),
        ]
        .into_iter()
        .collect();
        forget_duplicate_exposures(&mut grants);
        let left: Vec<u64> = grants.keys().copied().collect();
        // One record for uid 7 on chunk 0, uid 8's own, and the active grant covering chunk 1.
        assert_eq!(left, vec![1, 4, 5]);
    }

    #[test]
    fn vcpu_snapshots_are_taken_at_most_once_per_interval() {
        let cache = SnapshotCache::new(Duration::from_millis(200));
        let taken = std::sync::atomic::AtomicU32::new(0);
        let take = || {
            let n = taken.fetch_add(1, Ordering::SeqCst);
            Ok(vec![VcpuRegs { index: n, ..Default::default() }])
        };
        let started = Instant::now();
        for _ in 0..1000 {
            assert_eq!(cache.get(take).unwrap()[0].index, 0, "later requests share the first snapshot");
        }
        if started.elapsed() < Duration::from_millis(200) {
            assert_eq!(taken.load(Ordering::SeqCst), 1, "1000 requests, one kick");
        }
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(cache.get(take).unwrap()[0].index, 1, "a stale snapshot is retaken");
        assert!(cache.get(|| Err("x".into())).is_ok(), "and then shared again");
    }

    #[test]
    fn data_segments_skip_holes() {
        use std::os::unix::fs::FileExt;
        let file = memfd::create_ram_memfd(1 << 20).unwrap();
        file.write_at(b"a", 8192).unwrap();
        file.write_at(b"b", 65536 + 10).unwrap();
        let segments = data_segments(&file, 1 << 20).unwrap();
        assert_eq!(segments, vec![(8192, 4096), (65536, 4096)]);
        let empty = memfd::create_ram_memfd(1 << 20).unwrap();
        assert!(data_segments(&empty, 1 << 20).unwrap().is_empty());
    }
}
