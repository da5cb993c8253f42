//! The source side of the mirror device: serves a Unix socket on which allowed
//! peers ask for read-only grants of guest RAM and receive O_RDONLY re-opens of
//! the RAM memfd chunks, and pushes events (revoke, discard, pause, exit).
//!
//! Every connection has its own thread; events are written with a send
//! timeout. Nothing here runs on, or waits for, the source's vCPU threads
//! except a vCPU-state request, which briefly kicks them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::protocol::{
    ErrorCode, Grant, Message, Range, VcpuRegs, ACCESS_READ_ONLY, MAX_FDS_PER_FRAME, MAX_RANGES, PROTOCOL_VERSION,
};
use crate::wire::{self, WireError};

/// How long an event write may block before the inspector is dropped.
const EVENT_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a revoke waits for the inspector's acknowledgement.
pub const REVOKE_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most inspectors attached at once.
pub const MAX_CONNECTIONS: usize = 64;

/// One chunk of source RAM: `len` bytes at `gpa`, at offset 0 of `file`.
#[derive(Clone)]
pub struct ExportRegion {
    pub gpa: u64,
    pub len: u64,
    pub file: Arc<File>,
}

/// What the exporter asks of the source VM.
pub trait SourceVm: Send + Sync {
    /// Registers of every vCPU.
    fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, String>;
}

/// Who may attach and what they may map.
#[derive(Debug, Clone)]
pub struct ExportPolicy {
    /// Peer uids allowed to attach.
    pub allowed_uids: Vec<u32>,
    /// Ranges grants must fall within; `None` allows all of RAM.
    pub ranges: Option<Vec<Range>>,
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
    #[error("the inspector holding grant {0} did not acknowledge its revocation in time; it was disconnected")]
    RevokeTimeout(u64),
    #[error("range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("cannot punch a hole in guest RAM")]
    Punch(#[source] std::io::Error),
}

struct Connection {
    id: u64,
    uid: u32,
    writer: Mutex<UnixStream>,
    grants: Mutex<HashMap<u64, Grant>>,
    acked_revokes: Mutex<Vec<u64>>,
    acked: Condvar,
    alive: AtomicBool,
}

impl Connection {
    fn send(&self, message: &Message, fds: &[RawFd]) -> bool {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match wire::send(&writer, message, fds) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("mirror: dropping inspector {} (uid {}): {e}", self.id, self.uid);
                self.alive.store(false, Ordering::SeqCst);
                let _ = writer.shutdown(std::net::Shutdown::Both);
                false
            }
        }
    }
}

struct Shared {
    regions: Vec<ExportRegion>,
    ram_ranges: Vec<Range>,
    ram_size: u64,
    vcpus: u32,
    policy: ExportPolicy,
    source: Arc<dyn SourceVm>,
    connections: Mutex<Vec<Arc<Connection>>>,
    next_grant: AtomicU64,
    next_connection: AtomicU64,
    stopping: AtomicBool,
}

/// The running exporter.
pub struct Exporter {
    shared: Arc<Shared>,
    path: PathBuf,
    listener_fd: RawFd,
}

impl Exporter {
    /// Binds `path` (mode 0600) and starts accepting inspectors.
    pub fn start(
        path: &Path,
        regions: Vec<ExportRegion>,
        vcpus: u32,
        policy: ExportPolicy,
        source: Arc<dyn SourceVm>,
    ) -> Result<Self, ExportError> {
        let listener = bind_private(path).map_err(|source| ExportError::Bind { path: path.to_path_buf(), source })?;
        let ram_size = regions.iter().map(|r| r.len).sum();
        let ram_ranges = merge_regions(&regions);
        let shared = Arc::new(Shared {
            regions,
            ram_ranges,
            ram_size,
            vcpus,
            policy,
            source,
            connections: Mutex::new(Vec::new()),
            next_grant: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
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
        self.live_connections().len()
    }

    /// Grants held now, as (grant, peer uid).
    pub fn grants(&self) -> Vec<(Grant, u32)> {
        let mut all = Vec::new();
        for c in self.live_connections() {
            all.extend(c.grants.lock().unwrap_or_else(|p| p.into_inner()).values().map(|g| (*g, c.uid)));
        }
        all.sort_by_key(|(g, _)| g.id);
        all
    }

    fn live_connections(&self) -> Vec<Arc<Connection>> {
        let mut conns = self.shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| c.alive.load(Ordering::SeqCst));
        conns.clone()
    }

    /// Revokes a grant: tells its holder, waits until it has unmapped it, forgets it.
    pub fn revoke(&self, grant_id: u64) -> Result<(), ExportError> {
        let holder = self
            .live_connections()
            .into_iter()
            .find(|c| c.grants.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&grant_id))
            .ok_or(ExportError::UnknownGrant(grant_id))?;
        if !holder.send(&Message::Revoke { grant_id }, &[]) {
            return Ok(()); // The holder is gone, and its mappings with it.
        }
        let acked = holder.acked_revokes.lock().unwrap_or_else(|p| p.into_inner());
        let (mut acked, timeout) = holder
            .acked
            .wait_timeout_while(acked, REVOKE_ACK_TIMEOUT, |a| !a.contains(&grant_id))
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            holder.alive.store(false, Ordering::SeqCst);
            let _ = holder.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
            return Err(ExportError::RevokeTimeout(grant_id));
        }
        acked.retain(|&id| id != grant_id);
        holder.grants.lock().unwrap_or_else(|p| p.into_inner()).remove(&grant_id);
        Ok(())
    }

    /// Punches a hole in guest RAM (a balloon or discard) and tells every inspector.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), ExportError> {
        let end = gpa.checked_add(len).ok_or(ExportError::NotRam { gpa, len })?;
        if len == 0 || !self.shared.ram_ranges.iter().any(|r| gpa >= r.gpa && end <= r.gpa + r.len) {
            return Err(ExportError::NotRam { gpa, len });
        }
        for region in &self.shared.regions {
            let lo = gpa.max(region.gpa);
            let hi = end.min(region.gpa + region.len);
            if lo < hi {
                punch_hole(&region.file, lo - region.gpa, hi - lo).map_err(ExportError::Punch)?;
            }
        }
        self.broadcast(&Message::Discard { gpa, len });
        Ok(())
    }

    /// Sends an event to every inspector.
    pub fn broadcast(&self, event: &Message) {
        for c in self.live_connections() {
            c.send(event, &[]);
        }
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

/// Creates the listening socket with mode 0600 before it accepts anyone.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: listen on the bound socket.
    if unsafe { libc::listen(fd, 16) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixListener::from(owned))
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
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(cred.uid)
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let uid = match peer_uid(&stream) {
            Ok(uid) => uid,
            Err(e) => {
                log::warn!("mirror: cannot read peer credentials: {e}");
                continue;
            }
        };
        if !shared.policy.allowed_uids.contains(&uid) {
            let _ = wire::send(
                &stream,
                &Message::Error { code: ErrorCode::PeerRefused, text: format!("uid {uid} is not allowed to attach") },
                &[],
            );
            log::warn!("mirror: refused a peer with uid {uid}");
            continue;
        }
        let mut conns = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| c.alive.load(Ordering::SeqCst));
        if conns.len() >= MAX_CONNECTIONS {
            drop(conns);
            let text = format!("already {MAX_CONNECTIONS} inspectors attached");
            let _ = wire::send(&stream, &Message::Error { code: ErrorCode::PeerRefused, text }, &[]);
            continue;
        }
        let Ok(writer) = stream.try_clone() else { continue };
        let _ = writer.set_write_timeout(Some(EVENT_SEND_TIMEOUT));
        let conn = Arc::new(Connection {
            id: shared.next_connection.fetch_add(1, Ordering::SeqCst),
            uid,
            writer: Mutex::new(writer),
            grants: Mutex::new(HashMap::new()),
            acked_revokes: Mutex::new(Vec::new()),
            acked: Condvar::new(),
            alive: AtomicBool::new(true),
        });
        conns.push(conn.clone());
        drop(conns);
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mirror-peer{}", conn.id))
            .spawn(move || serve(stream, conn, conn_shared));
        if let Err(e) = spawned {
            log::error!("mirror: cannot start a connection thread: {e}");
        }
    }
}

fn error(code: ErrorCode, text: impl Into<String>) -> Message {
    Message::Error { code, text: text.into() }
}

/// Serves one inspector until it leaves or breaks the protocol's framing.
fn serve(stream: UnixStream, conn: Arc<Connection>, shared: Arc<Shared>) {
    let mut greeted = false;
    while conn.alive.load(Ordering::SeqCst) {
        let message = match wire::recv(&stream) {
            Ok((message, _fds)) => message,
            Err(WireError::BadMessage { kind, source }) => {
                conn.send(&error(source.code(), format!("message kind {kind}: {source}")), &[]);
                continue;
            }
            Err(WireError::BadHeader(e)) => {
                conn.send(&error(e.code(), format!("{e}; closing")), &[]);
                break;
            }
            Err(_) => break,
        };
        if !greeted {
            match message {
                Message::Hello { version } if version == PROTOCOL_VERSION => {
                    greeted = true;
                    conn.send(
                        &Message::HelloAck {
                            version: PROTOCOL_VERSION,
                            ram_size: shared.ram_size,
                            vcpus: shared.vcpus,
                        },
                        &[],
                    );
                }
                Message::Hello { version } => {
                    let text =
                        format!("protocol version {version} is not supported; this source speaks {PROTOCOL_VERSION}");
                    conn.send(&error(ErrorCode::BadVersion, text), &[]);
                }
                _ => {
                    conn.send(&error(ErrorCode::NotNow, "say Hello first"), &[]);
                }
            }
            continue;
        }
        match message {
            Message::GetMemoryMap => {
                conn.send(&Message::MemoryMap { regions: shared.ram_ranges.clone() }, &[]);
            }
            Message::GrantRequest { access, ranges } => grant(&conn, &shared, access, &ranges),
            Message::Release { grant_id } => {
                let removed = conn.grants.lock().unwrap_or_else(|p| p.into_inner()).remove(&grant_id);
                let reply = match removed {
                    Some(_) => Message::Released { grant_id },
                    None => error(ErrorCode::UnknownGrant, format!("no grant {grant_id} on this connection")),
                };
                conn.send(&reply, &[]);
            }
            Message::GetVcpuState => {
                let reply = match shared.source.vcpu_state() {
                    Ok(vcpus) => Message::VcpuState { vcpus },
                    Err(e) => error(ErrorCode::Internal, format!("cannot read vCPU state: {e}")),
                };
                conn.send(&reply, &[]);
            }
            Message::RevokeAck { grant_id } => {
                conn.acked_revokes.lock().unwrap_or_else(|p| p.into_inner()).push(grant_id);
                conn.acked.notify_all();
            }
            Message::Hello { .. } => {
                conn.send(&error(ErrorCode::NotNow, "already greeted"), &[]);
            }
            other => {
                conn.send(&error(ErrorCode::UnknownMessage, format!("unexpected message {other:?}")), &[]);
            }
        }
    }
    conn.alive.store(false, Ordering::SeqCst);
    // The writer half lives on in the connection list; shut the socket so the peer sees EOF.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Checks a grant request and answers it with O_RDONLY re-opens of the overlapped chunks.
fn grant(conn: &Connection, shared: &Shared, access: u32, ranges: &[Range]) {
    if access != ACCESS_READ_ONLY {
        conn.send(&error(ErrorCode::BadAccess, format!("access {access} refused: grants are read-only")), &[]);
        return;
    }
    if ranges.is_empty() {
        conn.send(&error(ErrorCode::Malformed, "a grant request needs at least one range"), &[]);
        return;
    }
    for r in ranges {
        let Some(end) = r.gpa.checked_add(r.len).filter(|_| r.len > 0) else {
            conn.send(
                &error(ErrorCode::OutOfRange, format!("range {:#x}+{:#x} is empty or overflows", r.gpa, r.len)),
                &[],
            );
            return;
        };
        if !shared.ram_ranges.iter().any(|ram| r.gpa >= ram.gpa && end <= ram.gpa + ram.len) {
            let text = format!("range {:#x}+{:#x} is not within the source's RAM", r.gpa, r.len);
            conn.send(&error(ErrorCode::OutOfRange, text), &[]);
            return;
        }
        if let Some(allowed) = &shared.policy.ranges {
            if !allowed.iter().any(|a| r.gpa >= a.gpa && end <= a.gpa + a.len) {
                let text = format!("range {:#x}+{:#x} is outside the source's grant policy", r.gpa, r.len);
                conn.send(&error(ErrorCode::PolicyDenied, text), &[]);
                return;
            }
        }
    }
    // One piece per chunk overlapped, each with its own O_RDONLY fd.
    let mut pieces = Vec::new();
    for r in ranges {
        for region in &shared.regions {
            let lo = r.gpa.max(region.gpa);
            let hi = (r.gpa + r.len).min(region.gpa + region.len);
            if lo < hi {
                pieces.push((region, lo, hi - lo));
            }
        }
    }
    if pieces.len() > MAX_RANGES * 16 {
        conn.send(&error(ErrorCode::TooLarge, format!("{} pieces is too many for one request", pieces.len())), &[]);
        return;
    }
    let mut opened = Vec::with_capacity(pieces.len());
    for (region, gpa, len) in &pieces {
        match reopen_read_only(&region.file) {
            Ok(fd) => opened.push((fd, *gpa, *len, gpa - region.gpa)),
            Err(e) => {
                conn.send(&error(ErrorCode::Internal, format!("cannot re-open guest RAM read-only: {e}")), &[]);
                return;
            }
        }
    }
    let batches: Vec<_> = opened.chunks(MAX_FDS_PER_FRAME).collect();
    for (n, batch) in batches.iter().enumerate() {
        let mut grants = Vec::with_capacity(batch.len());
        let mut fds = Vec::with_capacity(batch.len());
        for (i, (fd, gpa, len, offset)) in batch.iter().enumerate() {
            let id = shared.next_grant.fetch_add(1, Ordering::SeqCst);
            grants.push(Grant { id, gpa: *gpa, len: *len, fd_index: i as u32, offset: *offset });
            fds.push(fd.as_raw_fd());
        }
        conn.grants.lock().unwrap_or_else(|p| p.into_inner()).extend(grants.iter().map(|g| (g.id, *g)));
        if !conn.send(&Message::GrantReply { more: n + 1 < batches.len(), grants }, &fds) {
            return;
        }
    }
}

/// A new O_RDONLY file description of `file` (through /proc, so it is not the same
/// description as the source's read-write one).
fn reopen_read_only(file: &File) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}
