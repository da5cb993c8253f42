//! The inspector's events: integrity-watch changes, grants revoked, the source
//! paused, resumed, discarding or gone. Each has a sequence number and a
//! timestamp; a bounded backlog lets a client that reconnects with the last
//! sequence it saw miss nothing still kept, and tells it when it did miss some.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

/// Events kept for clients that reconnect.
pub const BACKLOG: usize = 4096;

pub use specula_api::Event;

/// Where events are published and replayed from.
pub struct EventBus {
    backlog: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        Self { backlog: Mutex::new(VecDeque::with_capacity(BACKLOG)), live: broadcast::channel(BACKLOG).0 }
    }

    /// Publishes an event; returns its sequence number.
    pub fn publish(&self, kind: &str, detail: serde_json::Value) -> u64 {
        let mut backlog = specula_common::sync::lock(&self.backlog);
        let seq = backlog.back().map_or(1, |e| e.seq + 1);
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = Event { seq, time_ms, kind: kind.to_string(), detail };
        if backlog.len() == BACKLOG {
            backlog.pop_front();
        }
        backlog.push_back(event.clone());
        // Sent under the backlog lock, so a subscriber never sees a gap or a repeat.
        let _ = self.live.send(event);
        seq
    }

    /// The events after `since` still in the backlog (preceded by an `events.missed` event
    /// when some were dropped), and a receiver for everything after them.
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let backlog = specula_common::sync::lock(&self.backlog);
        let receiver = self.live.subscribe();
        let mut replay = Vec::new();
        if let Some(oldest) = backlog.front() {
            if since + 1 < oldest.seq {
                replay.push(missed(since + 1, oldest.seq - 1));
            }
        }
        replay.extend(backlog.iter().filter(|e| e.seq > since).cloned());
        (replay, receiver)
    }

    /// The newest sequence number (0 before any event).
    pub fn last_seq(&self) -> u64 {
        specula_common::sync::lock(&self.backlog).back().map_or(0, |e| e.seq)
    }
}

/// The event that tells a client it missed `first..=last`.
pub fn missed(first: u64, last: u64) -> Event {
    Event {
        seq: 0,
        time_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        kind: "events.missed".into(),
        detail: serde_json::json!({ "first": first, "last": last, "count": last + 1 - first }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reconnecting_client_gets_what_it_missed_then_the_live_stream() {
        let bus = EventBus::new();
        for i in 0..5 {
            bus.publish("source.paused", json!({ "i": i }));
        }
        let (replay, mut live) = bus.subscribe(2);
        assert_eq!(replay.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        bus.publish("source.resumed", json!({}));
        let next = live.try_recv().unwrap();
        assert_eq!((next.seq, next.kind.as_str()), (6, "source.resumed"));
        assert_eq!(bus.last_seq(), 6);
    }

    #[test]
    fn a_client_behind_the_backlog_is_told_what_it_missed() {
        let bus = EventBus::new();
        for _ in 0..BACKLOG + 10 {
            bus.publish("watch.changed", json!({}));
        }
        let (replay, _) = bus.subscribe(3);
        assert_eq!(replay[0].kind, "events.missed");
        assert_eq!(replay[0].detail, json!({ "first": 4, "last": 10, "count": 7 }));
        assert_eq!(replay[1].seq, 11, "then everything still kept");
        assert_eq!(replay.len(), 1 + BACKLOG);
        let (none_missed, _) = bus.subscribe(bus.last_seq());
        assert!(none_missed.is_empty());
    }
}
