//! One inspector's session: admission (peer uid, connection limits), Hello, and the
//! requests of an open session.

use std::collections::HashSet;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use specula_common::error_chain;

use super::dirty_feed::{subscribe_dirty, sync_dirty};
use super::grants::grant;
use super::shared::{broadcast, forget_duplicate_exposures};
use super::tracing::{
    rearm_trace, release_breakpoints, release_write_traps, set_breakpoints, set_write_traps, subscribe_trace,
};
use super::{error, lock, Connection, GrantState, Shared};
use crate::protocol::{ErrorCode, Message, EVENT_ID, PROTOCOL_VERSION};
use crate::wire::{self, WireError};

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    crate::socket::peer_cred(stream).map(|cred| cred.uid)
}

/// Pause before accepting again after accept(2) fails (out of fds, say), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn refuse(stream: &UnixStream, text: String) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = wire::send(stream, EVENT_ID, &Message::Error { code: ErrorCode::PeerRefused, text }, &[]);
}

pub(super) fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
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
        trace_kinds: AtomicU32::new(0),
    });
    conns.push(conn.clone());
    Some(conn)
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
    release_breakpoints(&conn, &shared);
    release_write_traps(&conn, &shared);
    if conn.trace_kinds.swap(0, Ordering::SeqCst) != 0 {
        // What only this peer traced is disarmed: tracing nobody reads costs nothing.
        rearm_trace(&shared);
    }
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
                Err(e) => error(ErrorCode::Internal, format!("cannot read vCPU state: {}", error_chain(&e))),
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
                        conn.send(id, &error(ErrorCode::Internal, format!("cannot pause: {}", error_chain(&e))), &[]);
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
                Err(e) => error(ErrorCode::NotNow, format!("no dirty-page feed: {}", error_chain(&e))),
            };
            conn.send(id, &reply, &[]);
        }
        Message::DirtySync { token } => {
            let reply = match sync_dirty(conn, shared, token) {
                Ok(()) => Message::DirtySynced { token },
                Err(e) => error(ErrorCode::NotNow, format!("no dirty sync: {}", error_chain(&e))),
            };
            conn.send(id, &reply, &[]);
        }
        Message::TraceSubscribe { kinds } => {
            let reply = match subscribe_trace(conn, shared, kinds) {
                Ok(max_per_second) => Message::TraceSubscribed { kinds, max_per_second },
                Err((code, text)) => error(code, text),
            };
            conn.send(id, &reply, &[]);
        }
        Message::TraceBreakpoints { software, points } => {
            let reply = match set_breakpoints(conn, shared, software, &points) {
                Ok(count) => Message::TraceBreakpointsSet { count },
                Err((code, text)) => error(code, text),
            };
            conn.send(id, &reply, &[]);
        }
        Message::TraceWriteTraps { ranges } => {
            let reply = match set_write_traps(conn, shared, &ranges) {
                Ok(pages) => Message::TraceWriteTrapsSet { pages },
                Err((code, text)) => error(code, text),
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
