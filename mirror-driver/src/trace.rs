//! The trace feed: what a source's vCPU threads report while an inspector traces the
//! guest (writes to the system-call MSRs, breakpoint hits, trapped memory writes), capped in rate and bounded in
//! memory, for the exporter to send to the inspectors that subscribed.
//!
//! A vCPU thread never waits here: past the rate cap, or behind a full queue, an event
//! is counted as dropped (and the guest's write is applied all the same). The exporter
//! reports the count in a `TraceDropped` event.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use specula_common::sync::lock;

use crate::protocol::{trace_kind, BreakpointHit, MemoryWrite, Message, MsrWrite};

/// One traced event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEvent {
    /// A guest write to a traced MSR.
    MsrWrite(MsrWrite),
    /// A vCPU reached a hardware breakpoint.
    Breakpoint(BreakpointHit),
    /// A guest write to a write-trapped range.
    MemoryWrite(MemoryWrite),
}

impl TraceEvent {
    /// The kind an inspector subscribes to for this event (a bit of [`trace_kind`]).
    pub fn kind(&self) -> u32 {
        match self {
            TraceEvent::MsrWrite(_) => trace_kind::MSR_WRITES,
            TraceEvent::Breakpoint(_) => trace_kind::BREAKPOINTS,
            TraceEvent::MemoryWrite(_) => trace_kind::WRITE_TRAPS,
        }
    }

    /// The event as the mirror protocol sends it.
    pub fn to_message(self) -> Message {
        match self {
            TraceEvent::MsrWrite(write) => Message::TraceMsrWrite(write),
            TraceEvent::Breakpoint(hit) => Message::TraceBreakpointHit(hit),
            TraceEvent::MemoryWrite(write) => Message::TraceMemoryWrite(write),
        }
    }
}

/// How much a guest can make its source report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceLimits {
    /// Events reported per second, all kinds together; the rest are counted as dropped.
    pub max_per_second: u32,
    /// Events waiting for the exporter; the rest are counted as dropped.
    pub max_queued: usize,
}

impl Default for TraceLimits {
    fn default() -> Self {
        Self { max_per_second: 1000, max_queued: 4096 }
    }
}

struct FeedState {
    queue: VecDeque<TraceEvent>,
    /// Dropped since the exporter last took events.
    dropped: u64,
    window_start: Instant,
    in_window: u32,
    closed: bool,
}

/// Trace events between the vCPU threads that report them and the exporter that sends
/// them.
pub struct TraceFeed {
    limits: TraceLimits,
    state: Mutex<FeedState>,
    ready: Condvar,
}

/// The rate cap's window.
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl TraceFeed {
    pub fn new(limits: TraceLimits) -> Self {
        let state =
            FeedState { queue: VecDeque::new(), dropped: 0, window_start: Instant::now(), in_window: 0, closed: false };
        Self { limits, state: Mutex::new(state), ready: Condvar::new() }
    }

    pub fn limits(&self) -> TraceLimits {
        self.limits
    }

    /// Reports an event, from a vCPU thread: queued, or counted as dropped when over the
    /// rate cap or the queue bound. Never blocks on the exporter. Returns whether it was
    /// queued.
    pub fn report(&self, event: TraceEvent) -> bool {
        let mut state = lock(&self.state);
        let now = Instant::now();
        if now.duration_since(state.window_start) >= RATE_WINDOW {
            state.window_start = now;
            state.in_window = 0;
        }
        if state.closed || state.in_window >= self.limits.max_per_second || state.queue.len() >= self.limits.max_queued
        {
            state.dropped += 1;
            drop(state);
            self.ready.notify_one();
            return false;
        }
        state.in_window += 1;
        state.queue.push_back(event);
        drop(state);
        self.ready.notify_one();
        true
    }

    /// The queued events and the count dropped since the last call, waiting up to
    /// `timeout` for either; `None` once the feed is closed.
    pub fn take(&self, timeout: Duration) -> Option<(Vec<TraceEvent>, u64)> {
        let state = lock(&self.state);
        let (mut state, _) = self
            .ready
            .wait_timeout_while(state, timeout, |s| !s.closed && s.queue.is_empty() && s.dropped == 0)
            .unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return None;
        }
        let events = state.queue.drain(..).collect();
        Some((events, std::mem::take(&mut state.dropped)))
    }

    /// Ends the feed: [`TraceFeed::take`] returns `None`, reports are dropped.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(value: u64) -> TraceEvent {
        TraceEvent::MsrWrite(MsrWrite { msr: 0xc000_0082, value, applied: true, ..Default::default() })
    }

    #[test]
    fn events_past_the_rate_cap_are_counted_not_queued() {
        let feed = TraceFeed::new(TraceLimits { max_per_second: 3, max_queued: 100 });
        let queued = (0..10).filter(|&i| feed.report(write(i))).count();
        assert_eq!(queued, 3);
        let (events, dropped) = feed.take(Duration::ZERO).unwrap();
        assert_eq!(events, vec![write(0), write(1), write(2)], "the first ones, in order");
        assert_eq!(dropped, 7);
        assert_eq!(feed.take(Duration::ZERO).unwrap(), (vec![], 0), "a drop count is reported once");
    }

    #[test]
    fn the_queue_is_bounded_when_the_exporter_falls_behind() {
        let feed = TraceFeed::new(TraceLimits { max_per_second: u32::MAX, max_queued: 5 });
        for i in 0..1000 {
            feed.report(write(i));
        }
        let (events, dropped) = feed.take(Duration::ZERO).unwrap();
        assert_eq!((events.len(), dropped), (5, 995));
    }

    #[test]
    fn the_cap_is_per_window() {
        let feed = TraceFeed::new(TraceLimits { max_per_second: 1, max_queued: 100 });
        assert!(feed.report(write(1)));
        assert!(!feed.report(write(2)));
        std::thread::sleep(RATE_WINDOW + Duration::from_millis(20));
        assert!(feed.report(write(3)), "a new window takes events again");
    }

    #[test]
    fn a_waiting_exporter_wakes_on_a_report_and_on_close() {
        let feed = std::sync::Arc::new(TraceFeed::new(TraceLimits::default()));
        let reporter = feed.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            reporter.report(write(9));
        });
        let start = Instant::now();
        let (events, _) = feed.take(Duration::from_secs(10)).unwrap();
        assert_eq!(events, vec![write(9)]);
        assert!(start.elapsed() < Duration::from_secs(5));
        thread.join().unwrap();
        feed.close();
        assert!(feed.take(Duration::from_secs(10)).is_none());
        assert!(!feed.report(write(1)), "a closed feed takes nothing");
    }
}
