//! Tracing for the exporter's peers: their subscriptions, arming at the source exactly
//! what the subscribers want (nothing when none does), and the thread that sends each
//! trace event to the peers subscribed to its kind.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use specula_common::error_chain;

use super::{lock, Connection, Shared};
use crate::protocol::{trace_kind, Breakpoint, ErrorCode, Message, Range, EVENT_ID, MAX_WRITE_TRAP_BYTES};
use crate::trace::TraceFeed;

/// How long the sender waits for events before it looks at the exporter again.
const SENDER_POLL: Duration = Duration::from_millis(500);

/// Subscribes `conn` to the trace kinds `kinds` (0: none) and arms what the subscribers
/// now want. Returns the source's event rate cap, or the refusal to send.
pub(super) fn subscribe_trace(conn: &Connection, shared: &Shared, kinds: u32) -> Result<u32, (ErrorCode, String)> {
    require_consent(shared)?;
    if kinds & !trace_kind::ALL != 0 {
        return Err((ErrorCode::Malformed, format!("unknown trace kinds {:#x}", kinds & !trace_kind::ALL)));
    }
    let Some(feed) = shared.source.trace_feed() else {
        return Err((ErrorCode::NotNow, "this source cannot trace its guest".into()));
    };
    let mut armed = lock(&shared.trace_armed);
    // Only this connection's session thread changes its kinds: the bits of what it
    // holds (breakpoints, write traps), which a subscription does not name, are kept.
    let held = conn.trace_kinds.load(Ordering::SeqCst) & (trace_kind::BREAKPOINTS | trace_kind::WRITE_TRAPS);
    let previous = conn.trace_kinds.swap(kinds | held, Ordering::SeqCst);
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

/// Arms `points` as `conn`'s hardware breakpoints (none: releases them), unless
/// another live connection holds them. Returns how many are armed, or the refusal.
pub(super) fn set_breakpoints(
    conn: &Connection,
    shared: &Shared,
    software: bool,
    points: &[Breakpoint],
) -> Result<u32, (ErrorCode, String)> {
    require_consent(shared)?;
    if software && !points.is_empty() && !shared.policy.allow_trace_patches {
        let text = "this source does not let inspectors patch guest text for software breakpoints \
                    (vmm --mirror-allow-trace-patches)";
        return Err((ErrorCode::PolicyDenied, text.into()));
    }
    if shared.source.trace_feed().is_none() {
        return Err((ErrorCode::NotNow, "this source cannot trace its guest".into()));
    }
    let mut holder = lock(&shared.breakpoint_holder);
    refuse_another_holder(conn, shared, *holder, "breakpoints")?;
    if let Some(point) = points.iter().find(|p| !(p.address >= KERNEL_HALF || p.address < USER_TOP)) {
        return Err((ErrorCode::OutOfRange, format!("breakpoint address {:#x} is not canonical", point.address)));
    }
    shared
        .source
        .set_breakpoints(software, points)
        .map_err(|e| (ErrorCode::Internal, format!("cannot arm breakpoints: {}", error_chain(&e))))?;
    record_holder(conn, &mut holder, !points.is_empty(), trace_kind::BREAKPOINTS);
    log::info!("mirror: {} hardware breakpoints armed for inspector {}", points.len(), conn.id);
    Ok(points.len() as u32)
}

/// Releases the breakpoints of a connection that left.
pub(super) fn release_breakpoints(conn: &Connection, shared: &Shared) {
    release(conn, &shared.breakpoint_holder, "breakpoints", || shared.source.set_breakpoints(false, &[]));
}

/// Traps the guest's writes to `ranges` for `conn` (none: releases them), unless another
/// live connection holds the write traps. Returns the pages trapped, or the refusal.
pub(super) fn set_write_traps(
    conn: &Connection,
    shared: &Shared,
    ranges: &[Range],
) -> Result<u64, (ErrorCode, String)> {
    require_consent(shared)?;
    if shared.source.trace_feed().is_none() {
        return Err((ErrorCode::NotNow, "this source cannot trace its guest".into()));
    }
    let mut pages = 0u64;
    for r in ranges {
        let inside = r.gpa.checked_add(r.len).is_some_and(|end| {
            r.len > 0 && shared.ram_ranges.iter().any(|ram| r.gpa >= ram.gpa && end <= ram.gpa + ram.len)
        });
        if !inside {
            return Err((
                ErrorCode::OutOfRange,
                format!("write trap {:#x} (+{:#x}) is not inside guest RAM", r.gpa, r.len),
            ));
        }
        // A trap reports the bytes written: only where this peer may read them.
        let end = r.gpa + r.len;
        if shared
            .policy
            .ranges
            .as_ref()
            .is_some_and(|allowed| !allowed.iter().any(|a| r.gpa >= a.gpa && end <= a.gpa + a.len))
        {
            let text = format!("write trap {:#x} (+{:#x}) is outside the source's grant policy", r.gpa, r.len);
            return Err((ErrorCode::PolicyDenied, text));
        }
        if lock(&shared.revoked).iter().any(|(uid, g)| *uid == conn.uid && r.gpa < g.gpa + g.len && g.gpa < end) {
            let text =
                format!("write trap {:#x} (+{:#x}) overlaps a range revoked from uid {}", r.gpa, r.len, conn.uid);
            return Err((ErrorCode::PolicyDenied, text));
        }
        pages += (r.gpa + r.len).div_ceil(PAGE) - r.gpa / PAGE;
    }
    if pages * PAGE > MAX_WRITE_TRAP_BYTES {
        let text = format!("write traps over {pages} pages exceed the {MAX_WRITE_TRAP_BYTES}-byte limit");
        return Err((ErrorCode::TooLarge, text));
    }
    let mut holder = lock(&shared.write_trap_holder);
    refuse_another_holder(conn, shared, *holder, "write traps")?;
    let trapped = shared
        .source
        .set_write_traps(ranges)
        .map_err(|e| (ErrorCode::Internal, format!("cannot arm write traps: {}", error_chain(&e))))?;
    record_holder(conn, &mut holder, !ranges.is_empty(), trace_kind::WRITE_TRAPS);
    log::info!("mirror: write traps over {trapped} pages armed for inspector {}", conn.id);
    Ok(trapped)
}

/// Releases the write traps of a connection that left: its pages are writable again.
pub(super) fn release_write_traps(conn: &Connection, shared: &Shared) {
    release(conn, &shared.write_trap_holder, "write traps", || shared.source.set_write_traps(&[]).map(|_| ()));
}

/// The refusal for a source that does not let inspectors trace it.
fn require_consent(shared: &Shared) -> Result<(), (ErrorCode, String)> {
    if shared.policy.allow_trace {
        return Ok(());
    }
    let text = "this source does not let inspectors trace it (vmm --mirror-allow-trace)";
    Err((ErrorCode::PolicyDenied, text.into()))
}

/// Refuses `conn` what another live connection holds (`holder`; `what` names it).
fn refuse_another_holder(
    conn: &Connection,
    shared: &Shared,
    holder: Option<u64>,
    what: &str,
) -> Result<(), (ErrorCode, String)> {
    match holder.filter(|&h| h != conn.id) {
        Some(other) if shared.live_connections().iter().any(|c| c.id == other) => {
            Err((ErrorCode::NotNow, format!("inspector {other} holds this source's {what}")))
        }
        _ => Ok(()),
    }
}

/// Records whether `conn` now holds what `holder` guards, and so whether the events of
/// `kind` (sent to the holder only) go to it.
fn record_holder(conn: &Connection, holder: &mut Option<u64>, held: bool, kind: u32) {
    *holder = held.then_some(conn.id);
    if held {
        conn.trace_kinds.fetch_or(kind, Ordering::SeqCst);
    } else {
        conn.trace_kinds.fetch_and(!kind, Ordering::SeqCst);
    }
}

/// Disarms (`disarm`) what a connection that left held, if it held it.
fn release(
    conn: &Connection,
    holder: &std::sync::Mutex<Option<u64>>,
    what: &str,
    disarm: impl FnOnce() -> Result<(), super::SourceVmError>,
) {
    let mut holder = lock(holder);
    if *holder == Some(conn.id) {
        if let Err(e) = disarm() {
            log::warn!("mirror: cannot disarm the {what} of inspector {}: {}", conn.id, error_chain(&e));
        }
        *holder = None;
    }
}

const PAGE: u64 = 4096;

/// Canonical x86-64 addresses: below this, or at or above [`KERNEL_HALF`].
const USER_TOP: u64 = 0x0000_8000_0000_0000;
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

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

/// The union of the live connections' subscribed trace kinds (breakpoints are armed
/// by their holder, not by subscription).
fn wanted_kinds(shared: &Shared) -> u32 {
    shared.live_connections().iter().fold(0, |kinds, c| kinds | c.trace_kinds.load(Ordering::SeqCst)) & trace_kind::ALL
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
        let holder = *lock(&shared.breakpoint_holder);
        let trap_holder = *lock(&shared.write_trap_holder);
        for event in events {
            let kind = event.kind();
            let message = event.to_message();
            // Breakpoint hits and trapped writes go to the connection that set the
            // breakpoints or the traps, and to no other.
            let wants = |c: &Connection| {
                c.trace_kinds.load(Ordering::SeqCst) & kind != 0
                    && (kind != trace_kind::BREAKPOINTS || holder == Some(c.id))
                    && (kind != trace_kind::WRITE_TRAPS || trap_holder == Some(c.id))
            };
            for conn in subscribers.iter().filter(|c| wants(c)) {
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
