//! Integrity watches: ranges the agent hashes page by page, polled by the inspector
//! (findings and events) or checked on request. With the source's dirty-page feed, a
//! polled watch re-hashes only the pages written.

use std::collections::{BTreeSet, VecDeque};

use guest_images::agent::{self as abi, MAX_WATCHES};
use mirror_driver::protocol::Range;
use specula_api::{FindingInfo, Reply, Request, WatchInfo};

use super::grants::covered;
use super::replies as agent_replies;
use super::{say, InspectError, Inspector, PAGE};

/// How a polled watch learns what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Every check re-hashes every watched page.
    Hash,
    /// The source's dirty-page feed says which pages were written; only those are
    /// re-hashed, and a page written and restored between two checks is still reported.
    DirtyLog,
}

impl WatchMode {
    /// The API's name for it.
    pub fn name(self) -> &'static str {
        match self {
            WatchMode::Hash => "hash",
            WatchMode::DirtyLog => "dirty-log",
        }
    }
}

/// Findings kept per watch (the oldest go first).
pub const MAX_FINDINGS: usize = 256;

pub(super) struct WatchState {
    pub(super) range: Range,
    pub(super) polled: bool,
    pub(super) deleted: bool,
    pub(super) findings: VecDeque<FindingInfo>,
    pub(super) mode: WatchMode,
    /// Pages the dirty-log feed reported written since the last poll.
    pub(super) written: BTreeSet<u64>,
    /// Pages that may have been written (a coalesced report, or the first report after the
    /// watch was set, which may predate it): re-hashed, reported only if changed.
    pub(super) maybe_written: BTreeSet<u64>,
    /// Whether a dirty report arrived since the watch was set.
    pub(super) primed: bool,
}

impl WatchState {
    pub(super) fn new(range: Range, polled: bool, mode: WatchMode) -> Self {
        Self {
            range,
            polled,
            deleted: false,
            findings: VecDeque::new(),
            mode,
            written: BTreeSet::new(),
            maybe_written: BTreeSet::new(),
            primed: false,
        }
    }

    /// The watched pages that `range` touches.
    fn pages_in(&self, range: Range) -> std::iter::StepBy<std::ops::Range<u64>> {
        let lo = range.gpa.max(self.range.gpa) & !(PAGE - 1);
        let hi = range.gpa.saturating_add(range.len).min(self.range.gpa + self.range.len);
        (lo..hi).step_by(PAGE as usize)
    }

    /// Records the pages of a range the source's VMM wrote itself (not in the dirty log).
    pub(super) fn note_host_write(&mut self, range: Range) {
        let pages = self.pages_in(range);
        self.written.extend(pages);
    }

    /// Records the pages of `runs` inside this watch.
    pub(super) fn note_written(&mut self, coalesced: bool, runs: &[Range]) {
        let exact = !coalesced && self.primed;
        self.primed = true;
        for &r in runs {
            let pages = self.pages_in(r);
            if exact {
                self.written.extend(pages);
            } else {
                self.maybe_written.extend(pages);
            }
        }
    }
}

impl Inspector {
    /// Serves the requests on watches.
    pub(super) fn handle_watch(&self, request: Request) -> Result<Reply, InspectError> {
        Ok(match request {
            Request::Watch { gpa, len, polled } => {
                let id = self.watch(gpa, len, polled)?;
                let mode = if polled { self.polled_watch_mode() } else { WatchMode::Hash };
                Reply::Watch(WatchInfo { id, gpa, len, mode: mode.name().into(), polled, findings: 0 })
            }
            Request::Watches => Reply::Watches(self.watches()),
            Request::DeleteWatch { id } => {
                self.delete_watch(id)?;
                Reply::Done
            }
            Request::Findings { id } => Reply::Findings(self.findings(id)?),
            Request::Check { id } => Reply::Changed(self.check(id)?),
            other => return Err(InspectError::misrouted(&other)),
        })
    }

    /// Starts an integrity watch over a granted, page-aligned range; returns its id. A
    /// `polled` watch is checked by the inspector every watch interval, its changes kept
    /// as findings and published as events; the others are checked on request.
    pub fn watch(&self, gpa: u64, len: u64, polled: bool) -> Result<usize, InspectError> {
        if !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 || len > abi::MAX_WATCH_LEN {
            return Err(InspectError::BadRequest(format!(
                "watched ranges are whole pages, at most {} MiB",
                abi::MAX_WATCH_LEN >> 20
            )));
        }
        let _granted = self.check_granted(gpa, len)?;
        let mut watches = self.lock_watches();
        // A deleted watch's agent slot is reused.
        let id = match watches.iter().position(|w| w.deleted) {
            Some(free) => free,
            None if watches.len() < MAX_WATCHES => watches.len(),
            None => return Err(InspectError::BadRequest(format!("at most {MAX_WATCHES} watches"))),
        };
        self.link.call(abi::OP_WATCH_SET, [id as u64, gpa, len, 0], &[])?;
        let mode = if polled { self.polled_watch_mode() } else { WatchMode::Hash };
        let state = WatchState::new(Range { gpa, len }, polled, mode);
        if id == watches.len() {
            watches.push(state);
        } else {
            watches[id] = state;
        }
        Ok(id)
    }

    pub(super) fn lock_watches(&self) -> std::sync::MutexGuard<'_, Vec<WatchState>> {
        specula_common::sync::lock(&self.watches)
    }

    /// Stops watch `id`; its agent slot may be reused.
    pub fn delete_watch(&self, id: usize) -> Result<(), InspectError> {
        match self.lock_watches().get_mut(id) {
            Some(w) if !w.deleted => {
                w.deleted = true;
                Ok(())
            }
            _ => Err(InspectError::NotFound(format!("no watch {id}"))),
        }
    }

    /// Every live watch.
    pub fn watches(&self) -> Vec<WatchInfo> {
        let watches = self.lock_watches();
        watches
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.deleted)
            .map(|(id, w)| WatchInfo {
                id,
                gpa: w.range.gpa,
                len: w.range.len,
                mode: w.mode.name().into(),
                polled: w.polled,
                findings: w.findings.len(),
            })
            .collect()
    }

    /// The mode a new polled watch runs in.
    pub fn polled_watch_mode(&self) -> WatchMode {
        if self.dirty_feed.is_some() {
            WatchMode::DirtyLog
        } else {
            WatchMode::Hash
        }
    }

    /// Re-hashes only `pages` (sorted) of watch `id` in the agent; returns those that changed.
    fn check_pages(&self, id: usize, range: Range, pages: &[u64]) -> Result<Vec<u64>, InspectError> {
        let _granted = self.check_granted(range.gpa, range.len)?;
        let mut changed = Vec::new();
        for batch in pages.chunks(abi::MAX_CHECK_PAGES) {
            let input: Vec<u8> = batch.iter().flat_map(|p| p.to_le_bytes()).collect();
            let done = self.link.call(abi::OP_WATCH_CHECK_PAGES, [id as u64, batch.len() as u64, 0, 0], &input)?;
            changed.extend(agent_replies::changed_of_asked(&done, batch)?);
        }
        Ok(changed)
    }

    /// What a dirty-log watch has to report since the last poll: (changed or restored
    /// pages, the restored ones); nothing is asked of the agent when nothing was written.
    fn poll_dirty_watch(&self, id: usize, range: Range) -> Result<(Vec<u64>, Vec<u64>), InspectError> {
        let (written, maybe) = {
            let mut watches = self.lock_watches();
            let Some(w) = watches.get_mut(id) else { return Ok((Vec::new(), Vec::new())) };
            (std::mem::take(&mut w.written), std::mem::take(&mut w.maybe_written))
        };
        if written.is_empty() && maybe.is_empty() {
            // Nothing written; a revoked range fails here as it would when hashed.
            covered(&self.read_grants(), range.gpa, range.len)?;
            return Ok((Vec::new(), Vec::new()));
        }
        let pages: Vec<u64> = written.union(&maybe).copied().collect();
        let changed: BTreeSet<u64> = self.check_pages(id, range, &pages)?.into_iter().collect();
        let restored: Vec<u64> = written.difference(&changed).copied().collect();
        let reported: Vec<u64> = changed.union(&restored.iter().copied().collect()).copied().collect();
        Ok((reported, restored))
    }

    /// The findings kept for a polled watch, oldest first.
    pub fn findings(&self, id: usize) -> Result<Vec<FindingInfo>, InspectError> {
        match self.lock_watches().get(id) {
            Some(w) if !w.deleted => Ok(w.findings.iter().cloned().collect()),
            _ => Err(InspectError::NotFound(format!("no watch {id}"))),
        }
    }

    /// Pages of watch `id` that changed since the last check (or since it was set). Fails,
    /// without asking the agent, once any of the watched range is no longer granted.
    pub fn check(&self, id: usize) -> Result<Vec<u64>, InspectError> {
        let range = self.lock_watches().get(id).filter(|w| !w.deleted).map(|w| w.range);
        let range = range.ok_or_else(|| InspectError::NotFound(format!("no watch {id}")))?;
        let _granted = self.check_granted(range.gpa, range.len)?;
        let done = self.link.call(abi::OP_WATCH_CHECK, [id as u64, 0, 0, 0], &[])?;
        agent_replies::changed_in_watch(&done, id, range)
    }

    /// Checks every polled watch once: records and publishes what changed; a watch whose
    /// check fails (its range revoked) stops being polled, with one `watch.failed` event.
    pub(crate) fn poll_watches(&self) {
        let polled: Vec<(usize, Range, WatchMode)> = self
            .lock_watches()
            .iter()
            .enumerate()
            .filter(|(_, w)| w.polled && !w.deleted)
            .map(|(id, w)| (id, w.range, w.mode))
            .collect();
        for (id, range, mode) in polled {
            let outcome = match mode {
                WatchMode::Hash => self.check(id).map(|pages| (pages, Vec::new())),
                WatchMode::DirtyLog => self.poll_dirty_watch(id, range),
            };
            match outcome {
                Ok((pages, restored)) if !pages.is_empty() => {
                    let list: Vec<String> = pages
                        .iter()
                        .take(8)
                        .map(|p| if restored.contains(p) { format!("{p:#x}(restored)") } else { format!("{p:#x}") })
                        .collect();
                    say(format_args!(
                        "integrity watch {id}: {} page(s) of {:#x}+{:#x} changed: {}",
                        pages.len(),
                        range.gpa,
                        range.len,
                        list.join(" ")
                    ));
                    // The finding is recorded under the same lock the event is published
                    // in, so a subscriber that asks for findings on seeing the event finds it.
                    let mut watches = self.lock_watches();
                    let seq = self.events.publish(
                        "watch.changed",
                        serde_json::json!({
                            "watch": id, "gpa": range.gpa, "len": range.len, "pages": pages,
                            "restored": restored, "mode": mode.name(),
                        }),
                    );
                    if let Some(w) = watches.get_mut(id) {
                        if w.findings.len() == MAX_FINDINGS {
                            w.findings.pop_front();
                        }
                        w.findings.push_back(FindingInfo { seq, pages, restored });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    say(format_args!("integrity watch {id}: {e}"));
                    self.events.publish("watch.failed", serde_json::json!({ "watch": id, "error": e.to_string() }));
                    if let Some(w) = self.lock_watches().get_mut(id) {
                        w.polled = false;
                    }
                }
            }
        }
    }
}
