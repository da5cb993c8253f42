//! OS views kept between requests, and served again while what their walk read is
//! unchanged.
//!
//! With each view, the agent lists what its walk read (page tables included): per
//! source page, the 64-byte lines it read and a keyed digest of their contents as it
//! read them. Pages the source's dirty-page feed reports written become *suspect* in
//! every kept view that read them. A request for a kept view with no suspect page is
//! served without the agent; one with suspects has the agent re-hash only the lines it
//! read on those pages, and walks again only when one of them changed. A hot variable
//! that shares a page with a structure a view read thus costs a re-hash of a few lines,
//! not a walk.
//!
//! Before a kept view is served, the inspector asks the source to collect its dirty log
//! at once (`DirtySync`) and waits for that barrier on the event thread, so no write
//! the source's log had seen when the request came is missed. Reports that arrive
//! while a walk runs make its pages suspect too, once it is kept.
//!
//! The barrier is not free (a dirty-log harvest in the source and a round trip), and
//! many views cost less to walk than that. The cache keeps a running mean of each kind
//! of view's walk and of the barrier, and keeps only the kinds whose walk costs more
//! than twice the barrier; the others are simply walked ([`ViewCache::worth_keeping`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use mirror_driver::protocol::Range;

/// Views kept at most (each at most one agent data area, 1 MiB).
pub const MAX_CACHED_VIEWS: usize = 32;
/// Reports remembered per walk in flight; past it every page the walk read is suspect.
const MAX_REPORTS_PER_WALK: usize = 4096;
const PAGE: u64 = 4096;

/// What identifies a view: the agent operation, its arguments and its whole input
/// (the granted ranges and any extra input such as the vCPUs' LSTAR values).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub op: u32,
    pub args: [u64; 4],
    pub input: Vec<u8>,
}

/// Which OS views the inspector keeps (`--view-cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewCacheMode {
    /// Kinds of view whose walk costs more than twice the dirty-log barrier.
    #[default]
    Auto,
    /// Every kind of view, whatever it costs (tests the mechanism; measures it).
    Always,
    /// None: every request walks again.
    Off,
}

/// Which kind of view a cost belongs to: the operation and, for the rootkit checks,
/// which check.
pub type ViewKind = (u32, u64);

/// Weight of the newest measurement in the running means.
const COST_WEIGHT: f64 = 0.25;
/// A kind of view is kept when its walk costs more than this many barriers.
const WORTH_KEEPING: f64 = 2.0;
/// Kinds of view whose walk cost is remembered.
const MAX_KINDS: usize = 64;

/// One page of what a walk read: which of its 64-byte lines, and their digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRead {
    pub gpa: u64,
    pub lines: u64,
    pub digest: u64,
}

pub use specula_api::ViewCacheStats;

/// How one view request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Hit,
    Revalidated,
    Walked,
}

struct Entry {
    reply: Vec<u8>,
    /// What the walk read, by page.
    read: BTreeMap<u64, PageRead>,
    /// Pages reported written since, to re-hash before the reply is served again.
    suspect: BTreeSet<u64>,
    /// Bumped with every report that adds a suspect.
    generation: u64,
    last_used: u64,
}

impl Entry {
    /// Marks the pages of `runs` (sorted, disjoint) this view read as suspect; a page
    /// that already was counts too, since a re-hash under way may predate this write.
    fn note_written(&mut self, runs: &[Range]) {
        let mut touched = false;
        for r in runs {
            let end = r.gpa.saturating_add(r.len);
            for (&page, _) in self.read.range(r.gpa & !(PAGE - 1)..end) {
                self.suspect.insert(page);
                touched = true;
            }
        }
        if touched {
            self.generation += 1;
        }
    }
}

/// A walk that started and has not been kept yet.
struct InFlight {
    /// Dirty runs reported since it started; `None` once there were too many to keep.
    reports: Option<Vec<Range>>,
    /// The grants or the kernel changed while it ran.
    spoiled: bool,
}

/// What the cache holds for a request.
pub enum Lookup {
    Miss,
    /// Served as is.
    Hit(Vec<u8>),
    /// Served once the agent confirms these pages' lines are unchanged
    /// ([`ViewCache::confirmed`]), else walked again ([`ViewCache::refuted`]).
    Suspect {
        reply: Vec<u8>,
        pages: Vec<PageRead>,
        generation: u64,
    },
}

#[derive(Default)]
struct State {
    entries: HashMap<ViewKey, Entry>,
    in_flight: HashMap<u64, InFlight>,
    next_walk: u64,
    next_token: u64,
    /// The newest `DirtySynced` token the event thread has handled.
    synced: u64,
    clock: u64,
    stats: ViewCacheStats,
    /// Running mean of each kind of view's walk, in microseconds.
    walk_cost: HashMap<ViewKind, f64>,
    /// Running mean of a barrier, in microseconds.
    sync_cost: Option<f64>,
}

fn mean_with(old: Option<f64>, sample: Duration) -> f64 {
    let us = sample.as_secs_f64() * 1e6;
    old.map_or(us, |m| m + COST_WEIGHT * (us - m))
}

/// The cache; shared by the request threads and the source's event thread.
#[derive(Default)]
pub struct ViewCache {
    state: Mutex<State>,
    synced: Condvar,
}

/// A walk's ticket: hand it back to [`ViewCache::keep`] with the walk's result.
#[must_use]
pub struct Walk(u64);

impl ViewCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        specula_common::sync::lock(&self.state)
    }

    /// A fresh token for a dirty-log barrier.
    pub fn next_token(&self) -> u64 {
        let mut s = self.lock();
        s.next_token += 1;
        s.next_token
    }

    /// The event thread handled the barrier `token` (tokens are handed out in order, and
    /// the source answers them in order).
    pub fn note_synced(&self, token: u64) {
        let mut s = self.lock();
        s.synced = s.synced.max(token);
        self.synced.notify_all();
    }

    /// Waits until the event thread has handled barrier `token`; false after `timeout`.
    pub fn wait_synced(&self, token: u64, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) =
            self.synced.wait_timeout_while(s, timeout, |s| s.synced < token).unwrap_or_else(|p| p.into_inner());
        s.synced >= token
    }

    /// What is kept for `key`.
    pub fn get(&self, key: &ViewKey) -> Lookup {
        let mut s = self.lock();
        s.clock += 1;
        let now = s.clock;
        let Some(e) = s.entries.get_mut(key) else { return Lookup::Miss };
        e.last_used = now;
        if e.suspect.is_empty() {
            return Lookup::Hit(e.reply.clone());
        }
        let pages = e.suspect.iter().filter_map(|p| e.read.get(p).copied()).collect();
        Lookup::Suspect { reply: e.reply.clone(), pages, generation: e.generation }
    }

    /// The agent found the suspect pages of `key` (as of `generation`) unchanged.
    pub fn confirmed(&self, key: &ViewKey, generation: u64) {
        let mut s = self.lock();
        if let Some(e) = s.entries.get_mut(key) {
            // Pages reported after the lookup stay suspect: they were not re-hashed.
            if e.generation == generation {
                e.suspect.clear();
            }
        }
    }

    /// A line the view of `key` read has changed: it goes, to be walked again.
    pub fn refuted(&self, key: &ViewKey) {
        let mut s = self.lock();
        if s.entries.remove(key).is_some() {
            s.stats.invalidated += 1;
        }
    }

    /// Starts a walk: reports from now on make the pages it reads suspect.
    pub fn start_walk(&self) -> Walk {
        let mut s = self.lock();
        s.next_walk += 1;
        let id = s.next_walk;
        s.in_flight.insert(id, InFlight { reports: Some(Vec::new()), spoiled: false });
        Walk(id)
    }

    /// Ends `walk`: keeps `reply` under `key` when the agent said what it read (`read`,
    /// sorted by page) and nothing spoiled the walk; pages reported written while it
    /// ran start out suspect.
    pub fn keep(&self, walk: Walk, key: ViewKey, reply: &[u8], read: Option<Vec<PageRead>>) {
        let mut s = self.lock();
        let Some(flight) = s.in_flight.remove(&walk.0) else { return };
        let Some(read) = read.filter(|_| !flight.spoiled) else {
            s.stats.not_kept += 1;
            return;
        };
        let read: BTreeMap<u64, PageRead> = read.into_iter().map(|p| (p.gpa, p)).collect();
        let mut entry = Entry { reply: reply.to_vec(), suspect: BTreeSet::new(), read, generation: 0, last_used: 0 };
        match flight.reports {
            Some(mut reports) => {
                mirror_driver::dirty::normalize(&mut reports);
                entry.note_written(&reports);
            }
            None => entry.suspect = entry.read.keys().copied().collect(),
        }
        if s.entries.len() >= MAX_CACHED_VIEWS && !s.entries.contains_key(&key) {
            let oldest = s.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                s.entries.remove(&k);
            }
        }
        s.clock += 1;
        entry.last_used = s.clock;
        s.entries.insert(key, entry);
    }

    /// Ends `walk` without a reply to keep (the agent failed it).
    pub fn abandon(&self, walk: Walk) {
        self.lock().in_flight.remove(&walk.0);
    }

    /// The source wrote `runs` (normalized: sorted, disjoint): the pages of them that
    /// kept views and walks in flight read become suspect.
    pub fn written(&self, runs: &[Range]) {
        let mut s = self.lock();
        for e in s.entries.values_mut() {
            e.note_written(runs);
        }
        for walk in s.in_flight.values_mut() {
            if let Some(reports) = &mut walk.reports {
                if reports.len() + runs.len() > MAX_REPORTS_PER_WALK {
                    walk.reports = None;
                } else {
                    reports.extend_from_slice(runs);
                }
            }
        }
    }

    /// Forgets every view and spoils the walks in flight (the grants changed, the kernel
    /// was found again, or the source is gone).
    pub fn clear(&self) {
        let mut s = self.lock();
        let dropped = s.entries.len() as u64;
        s.entries.clear();
        s.stats.invalidated += dropped;
        for walk in s.in_flight.values_mut() {
            walk.spoiled = true;
        }
    }

    /// Counts a view request served as `how`, in `elapsed`.
    pub fn record(&self, how: Served, elapsed: Duration) {
        let mut s = self.lock();
        let stats = &mut s.stats;
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let (count, total) = match how {
            Served::Hit => (&mut stats.hits, &mut stats.hit_us),
            Served::Revalidated => (&mut stats.revalidated, &mut stats.revalidated_us),
            Served::Walked => (&mut stats.walks, &mut stats.walk_us),
        };
        *count += 1;
        *total = total.saturating_add(us);
    }

    /// Whether views of `kind` are worth keeping: their walk costs more than twice a
    /// barrier, or either is not measured yet (keeping one measures both).
    pub fn worth_keeping(&self, kind: ViewKind) -> bool {
        let s = self.lock();
        match (s.walk_cost.get(&kind), s.sync_cost) {
            (Some(&walk), Some(sync)) => walk > WORTH_KEEPING * sync,
            _ => true,
        }
    }

    /// A walk of `kind` took `took` (the agent's command alone).
    pub fn note_walk(&self, kind: ViewKind, took: Duration) {
        let mut s = self.lock();
        if s.walk_cost.len() >= MAX_KINDS && !s.walk_cost.contains_key(&kind) {
            return;
        }
        let mean = mean_with(s.walk_cost.get(&kind).copied(), took);
        s.walk_cost.insert(kind, mean);
    }

    /// A barrier took `took`.
    pub fn note_sync(&self, took: Duration) {
        let mut s = self.lock();
        s.sync_cost = Some(mean_with(s.sync_cost, took));
        s.stats.syncs += 1;
        s.stats.sync_us = s.stats.sync_us.saturating_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// How the cache has fared so far.
    pub fn stats(&self) -> ViewCacheStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(op: u32) -> ViewKey {
        ViewKey { op, args: [0; 4], input: vec![1, 2, 3] }
    }

    fn run(gpa: u64, len: u64) -> Range {
        Range { gpa, len }
    }

    fn read(pages: &[u64]) -> Option<Vec<PageRead>> {
        Some(pages.iter().map(|&gpa| PageRead { gpa, lines: 1, digest: gpa ^ 0x5a }).collect())
    }

    fn kept(cache: &ViewCache, op: u32, pages: &[u64]) {
        let walk = cache.start_walk();
        cache.keep(walk, key(op), b"procs", read(pages));
    }

    fn suspects(lookup: Lookup) -> Vec<u64> {
        match lookup {
            Lookup::Suspect { pages, .. } => pages.iter().map(|p| p.gpa).collect(),
            Lookup::Hit(_) => Vec::new(),
            Lookup::Miss => panic!("nothing kept"),
        }
    }

    #[test]
    fn a_kept_view_is_a_hit_until_a_page_it_read_is_written_then_those_pages_are_suspect() {
        let cache = ViewCache::default();
        kept(&cache, 10, &[0x1000, 0x2000, 0x8000]);
        assert!(matches!(cache.get(&key(10)), Lookup::Hit(r) if r == b"procs"));
        // Pages it did not read: still a hit.
        cache.written(&[run(0x3000, 0x1000), run(0x9000, 0x1000)]);
        assert!(matches!(cache.get(&key(10)), Lookup::Hit(_)));
        // Pages it read: suspect, each with its digest to re-hash.
        cache.written(&[run(0x1800, 0x1000), run(0x8000, 0x1000)]);
        match cache.get(&key(10)) {
            Lookup::Suspect { reply, pages, .. } => {
                assert_eq!(reply, b"procs");
                assert_eq!(pages, read(&[0x1000, 0x2000, 0x8000]).unwrap());
            }
            _ => panic!("the written pages are not suspect"),
        }
        assert_eq!(cache.stats().invalidated, 0);
    }

    #[test]
    fn a_confirmed_view_is_a_hit_again_and_a_refuted_one_is_walked_again() {
        let cache = ViewCache::default();
        kept(&cache, 10, &[0x1000]);
        cache.written(&[run(0x1000, 0x1000)]);
        let Lookup::Suspect { generation, .. } = cache.get(&key(10)) else { panic!("not suspect") };
        cache.confirmed(&key(10), generation);
        assert!(matches!(cache.get(&key(10)), Lookup::Hit(_)));
        cache.written(&[run(0x1000, 0x1000)]);
        assert!(matches!(cache.get(&key(10)), Lookup::Suspect { .. }));
        cache.refuted(&key(10));
        assert!(matches!(cache.get(&key(10)), Lookup::Miss));
        assert_eq!(cache.stats().invalidated, 1);
    }

    #[test]
    fn a_page_written_again_while_it_is_re_hashed_stays_suspect() {
        let cache = ViewCache::default();
        kept(&cache, 10, &[0x1000]);
        cache.written(&[run(0x1000, 0x1000)]);
        let Lookup::Suspect { generation, .. } = cache.get(&key(10)) else { panic!("not suspect") };
        // Reported after the agent was asked: its answer may predate the write.
        cache.written(&[run(0x1000, 0x1000)]);
        cache.confirmed(&key(10), generation);
        assert_eq!(suspects(cache.get(&key(10))), vec![0x1000]);
    }

    #[test]
    fn writes_reported_during_the_walk_make_its_pages_suspect_once_kept() {
        let cache = ViewCache::default();
        let walk = cache.start_walk();
        cache.written(&[run(0x2000, 0x1000), run(0x5000, 0x1000)]);
        cache.keep(walk, key(10), b"procs", read(&[0x1000, 0x2000]));
        assert_eq!(suspects(cache.get(&key(10))), vec![0x2000]);
    }

    #[test]
    fn a_failed_walk_leaves_nothing_in_flight() {
        let cache = ViewCache::default();
        for _ in 0..10 {
            let walk = cache.start_walk();
            cache.abandon(walk);
        }
        assert!(cache.lock().in_flight.is_empty());
        cache.written(&[run(0x1000, 0x1000)]);
        assert!(cache.lock().in_flight.is_empty());
    }

    #[test]
    fn a_walk_without_a_read_set_or_spoiled_by_a_clear_is_not_kept() {
        let cache = ViewCache::default();
        let walk = cache.start_walk();
        cache.keep(walk, key(10), b"x", None);
        assert!(matches!(cache.get(&key(10)), Lookup::Miss));
        let walk = cache.start_walk();
        cache.clear();
        cache.keep(walk, key(10), b"x", read(&[]));
        assert!(matches!(cache.get(&key(10)), Lookup::Miss));
        assert_eq!(cache.stats().not_kept, 2);
        kept(&cache, 10, &[0x1000]);
        cache.clear();
        assert!(matches!(cache.get(&key(10)), Lookup::Miss));
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_views_and_drops_the_least_used() {
        let cache = ViewCache::default();
        for op in 0..MAX_CACHED_VIEWS as u32 {
            kept(&cache, op, &[]);
        }
        assert!(matches!(cache.get(&key(0)), Lookup::Hit(_)));
        kept(&cache, 1000, &[]);
        assert!(matches!(cache.get(&key(0)), Lookup::Hit(_)), "the view used last stays");
        assert!(matches!(cache.get(&key(1)), Lookup::Miss), "the least recently used goes");
        assert!(matches!(cache.get(&key(1000)), Lookup::Hit(_)));
    }

    #[test]
    fn each_way_of_serving_is_counted_with_its_time() {
        let cache = ViewCache::default();
        cache.record(Served::Hit, Duration::from_micros(5));
        cache.record(Served::Hit, Duration::from_micros(7));
        cache.record(Served::Revalidated, Duration::from_micros(100));
        cache.record(Served::Walked, Duration::from_millis(3));
        let s = cache.stats();
        assert_eq!((s.hits, s.hit_us, s.revalidated, s.revalidated_us, s.walks, s.walk_us), (2, 12, 1, 100, 1, 3000));
    }

    #[test]
    fn only_views_whose_walk_costs_more_than_two_barriers_are_kept() {
        let cache = ViewCache::default();
        let (cheap, dear) = ((11, 0), (15, 16));
        assert!(cache.worth_keeping(cheap), "unmeasured: kept, which measures it");
        cache.note_sync(Duration::from_micros(1000));
        cache.note_walk(cheap, Duration::from_micros(700));
        cache.note_walk(dear, Duration::from_micros(50_000));
        assert!(!cache.worth_keeping(cheap));
        assert!(cache.worth_keeping(dear));
        // Running means: a walk that grows dear becomes worth keeping.
        for _ in 0..20 {
            cache.note_walk(cheap, Duration::from_micros(9000));
        }
        assert!(cache.worth_keeping(cheap));
        let s = cache.stats();
        assert_eq!((s.syncs, s.sync_us), (1, 1000));
    }

    #[test]
    fn a_barrier_is_waited_for_and_times_out_when_it_never_comes() {
        let cache = std::sync::Arc::new(ViewCache::default());
        let token = cache.next_token();
        assert!(!cache.wait_synced(token, Duration::from_millis(20)));
        let events = cache.clone();
        let t = std::thread::spawn(move || events.note_synced(token));
        assert!(cache.wait_synced(token, Duration::from_secs(5)));
        t.join().unwrap();
    }
}
