//! The dirty-page feed: KVM's dirty log, collected every interval (or at once on a
//! subscriber's `DirtySync`) and clipped to each subscriber's active grants.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use specula_common::error_chain;

use super::{lock, Connection, GrantState, Shared, SourceVmError};
use crate::dirty::{self, Backlog};
use crate::protocol::{Message, Range, EVENT_ID};

/// Why a subscription or a `DirtySync` failed (sent to the peer as a `NotNow` error).
#[derive(Debug, thiserror::Error)]
pub(super) enum DirtyFeedError {
    /// The source could not start KVM's dirty log.
    #[error(transparent)]
    StartLogging(SourceVmError),
    /// The collector thread could not be started.
    #[error("cannot start the dirty-log collector thread")]
    Collector(#[source] std::io::Error),
    /// The source could not read its dirty log.
    #[error(transparent)]
    Collect(SourceVmError),
    /// A `DirtySync` from a peer that does not subscribe.
    #[error("this connection does not subscribe to the dirty-page feed")]
    NotSubscribed,
    /// The `DirtySynced` barrier event could not be written (the peer is dropped).
    #[error("the barrier could not be sent")]
    BarrierNotSent,
}

/// Subscribes `conn` to the dirty-page feed: KVM logging starts with the first
/// subscriber, and the collector thread with the first subscription ever.
pub(super) fn subscribe_dirty(conn: &Connection, shared: &Arc<Shared>) -> Result<(), DirtyFeedError> {
    let mut state = lock(&shared.dirty_logging);
    if !state.logging {
        shared.source.set_dirty_logging(true).map_err(DirtyFeedError::StartLogging)?;
        state.logging = true;
    }
    lock(&conn.dirty).get_or_insert_with(Backlog::default);
    if !state.collector {
        let weak = Arc::downgrade(shared);
        std::thread::Builder::new()
            .name("mirror-dirty".into())
            .spawn(move || collect_dirty(weak))
            .map_err(DirtyFeedError::Collector)?;
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
                        log::warn!("mirror: {}", error_chain(&e))
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
        if let Err(e) = collect_now(&shared, &subscribers, None) {
            log::warn!("mirror: {}", error_chain(&e));
        }
        drop(shared);
        std::thread::sleep(interval);
    }
}

/// Takes KVM's dirty log once and feeds it to `subscribers`; `flush` (one of them) gets
/// its whole backlog sent even when its socket is backed up (it asked, and reads).
fn collect_now(
    shared: &Shared,
    subscribers: &[Arc<Connection>],
    flush: Option<&Connection>,
) -> Result<(), DirtyFeedError> {
    let _collecting = lock(&shared.collecting);
    let written = shared.source.take_dirty_pages().map_err(DirtyFeedError::Collect)?;
    for conn in subscribers {
        feed(shared, conn, &written, flush.is_some_and(|f| f.id == conn.id));
    }
    Ok(())
}

/// Answers a subscriber's `DirtySync`: a collection now, its backlog sent, then the
/// barrier event, so that it has heard of every write logged before it asked.
pub(super) fn sync_dirty(conn: &Connection, shared: &Shared, token: u64) -> Result<(), DirtyFeedError> {
    if lock(&conn.dirty).is_none() {
        return Err(DirtyFeedError::NotSubscribed);
    }
    let subscribers: Vec<Arc<Connection>> =
        shared.live_connections().into_iter().filter(|c| lock(&c.dirty).is_some()).collect();
    collect_now(shared, &subscribers, Some(conn))?;
    if conn.send(EVENT_ID, &Message::DirtySynced { token }, &[]) {
        Ok(())
    } else {
        Err(DirtyFeedError::BarrierNotSent)
    }
}

/// Adds the written pages inside `conn`'s active grants to its backlog and sends the
/// backlog if its socket has room, or if `flush`.
fn feed(shared: &Shared, conn: &Connection, written: &[Range], flush: bool) {
    let mut allowed: Vec<Range> = lock(&shared.grants)
        .values()
        .filter(|g| g.connection == conn.id && g.state == GrantState::Active)
        .map(|g| Range { gpa: g.grant.gpa, len: g.grant.len })
        .collect();
    allowed.sort_unstable_by_key(|r| r.gpa);
    let mut slot = lock(&conn.dirty);
    let Some(backlog) = slot.as_mut() else { return };
    backlog.add(&dirty::clip(written, &allowed));
    if backlog.is_empty() || (!flush && unsent_bytes(conn) > shared.limits.dirty_max_unsent) {
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
