//! Tracing for the exporter's peers: their subscriptions, arming at the source exactly
//! what the subscribers want (nothing when none does), and the thread that sends each
//! trace event to the peers subscribed to its kind.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use specula_common::error_chain;

use super::{lock, Connection, Shared};
use crate::protocol::{trace_kind, ErrorCode, Message, EVENT_ID};
use crate::trace::TraceFeed;

/// How long the sender waits for events before it looks at the exporter again.
const SENDER_POLL: Duration = Duration::from_millis(500);

/// Subscribes `conn` to the trace kinds `kinds` (0: none) and arms what the subscribers
/// now want. Returns the source's event rate cap, or the refusal to send.
pub(super) fn subscribe_trace(conn: &Connection, shared: &Shared, kinds: u32) -> Result<u32, (ErrorCode, String)> {
    if !shared.policy.allow_trace {
        let text = "this source does not let inspectors trace it (vmm --mirror-allow-trace)";
        return Err((ErrorCode::PolicyDenied, text.into()));
    }
    if kinds & !trace_kind::ALL != 0 {
        return Err((ErrorCode::Malformed, format!("unknown trace kinds {:#x}", kinds & !trace_kind::ALL)));
    }
    let Some(feed) = shared.source.trace_feed() else {
        return Err((ErrorCode::NotNow, "this source cannot trace its guest".into()));
    };
    let mut armed = lock(&shared.trace_armed);
    let previous = conn.trace_kinds.swap(kinds, Ordering::SeqCst);
    let wanted = wanted_kinds(shared);
    if wanted != *armed {
        if let Err(e) = shared.source.arm_trace(wanted) {
            conn.trace_kinds.store(previous, Ordering::SeqCst);
            return Err((ErrorCode::Internal, format!("cannot trace: {}", error_chain(&e))));
        }
        log::info!("mirror: trace kinds {wanted:#x} armed (were {:#x})", *armed);
        *armed = wanted;
    }
    Ok(feed.limits().max_per_second)
}

/// Arms what the live subscribers want, after one left.
pub(super) fn rearm_trace(shared: &Shared) {
    let mut armed = lock(&shared.trace_armed);
    let wanted = wanted_kinds(shared);
    if wanted == *armed {
        return;
    }
    match shared.source.arm_trace(wanted) {
        Ok(()) => {
            log::info!("mirror: trace kinds {wanted:#x} armed (were {:#x})", *armed);
            *armed = wanted;
        }
        Err(e) => log::warn!("mirror: cannot re-arm tracing for kinds {wanted:#x}: {}", error_chain(&e)),
    }
}

/// The union of the live connections' trace kinds.
fn wanted_kinds(shared: &Shared) -> u32 {
    shared.live_connections().iter().fold(0, |kinds, c| kinds | c.trace_kinds.load(Ordering::SeqCst))
}

/// Starts the thread that sends trace events, where the source has a trace feed; it
/// ends when the feed is closed (at shutdown).
pub(super) fn start_sender(shared: &Arc<Shared>) -> std::io::Result<()> {
    let Some(feed) = shared.source.trace_feed() else { return Ok(()) };
    let shared = shared.clone();
    std::thread::Builder::new().name("mirror-trace".into()).spawn(move || send_events(&shared, &feed)).map(|_| ())
}

/// Sends each event to the peers subscribed to its kind, and each drop count to every
/// subscriber. A peer that cannot take an event within the send timeout is dropped,
/// and the feed's queue bound keeps what waits meanwhile bounded.
fn send_events(shared: &Shared, feed: &TraceFeed) {
    while let Some((events, dropped)) = feed.take(SENDER_POLL) {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        if events.is_empty() && dropped == 0 {
            continue;
        }
        let subscribers: Vec<Arc<Connection>> =
            shared.live_connections().into_iter().filter(|c| c.trace_kinds.load(Ordering::SeqCst) != 0).collect();
        for event in events {
            let message = event.to_message();
            for conn in subscribers.iter().filter(|c| c.trace_kinds.load(Ordering::SeqCst) & event.kind() != 0) {
                conn.send(EVENT_ID, &message, &[]);
            }
        }
        if dropped > 0 {
            log::info!("mirror: {dropped} trace events dropped (rate cap or queue bound)");
            for conn in &subscribers {
                conn.send(EVENT_ID, &Message::TraceDropped { count: dropped }, &[]);
            }
        }
    }
}
