//! Dirty-page sets for the mirror's dirty-log feed: page runs from KVM's bitmaps,
//! clipped to what a connection was granted, and a per-connection backlog that stays
//! bounded however far behind its inspector falls (runs are coalesced, never dropped).

use crate::protocol::{Range, MAX_RANGES};

const PAGE: u64 = 4096;
/// Most runs a connection's backlog holds before it is coalesced.
pub const MAX_BACKLOG_RUNS: usize = 4 * MAX_RANGES;

/// The runs of set bits in a KVM dirty bitmap (bit `i` = page `i` of the slot starting at
/// `base`), in GPA order. Bits past `size` are ignored.
pub fn bitmap_runs(base: u64, bitmap: &[u64], size: u64) -> Vec<Range> {
    let words = bitmap.iter().enumerate().filter(|(_, &w)| w != 0).map(|(i, &w)| (i as u64 * 64, w));
    word_runs(base, words, size)
}

/// The runs of a sparse dirty bitmap: `(first page, bits)` words in ascending order
/// (bit `i` = page `first + i` of the slot starting at `base`), as a dirty ring's
/// harvest gives them. Pages past `size` are ignored.
pub fn sparse_bitmap_runs(base: u64, words: &[(u64, u64)], size: u64) -> Vec<Range> {
    word_runs(base, words.iter().copied(), size)
}

fn word_runs(base: u64, words: impl Iterator<Item = (u64, u64)>, size: u64) -> Vec<Range> {
    let pages = size / PAGE;
    let mut runs: Vec<Range> = Vec::new();
    for (first, word) in words {
        let mut bits = word;
        while bits != 0 {
            let page = first.saturating_add(u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
            if page >= pages {
                return runs;
            }
            let gpa = base + page * PAGE;
            match runs.last_mut() {
                Some(last) if last.gpa + last.len == gpa => last.len += PAGE,
                _ => runs.push(Range { gpa, len: PAGE }),
            }
        }
    }
    runs
}

/// Sorts and merges overlapping or touching runs (empty ones dropped), so no page is
/// counted twice: a receiver's work on them is bounded by the pages they cover.
/// Runs past the end of the address space end there.
pub fn normalize(runs: &mut Vec<Range>) {
    runs.retain(|r| r.len > 0);
    for r in runs.iter_mut() {
        r.len = r.len.min(u64::MAX - r.gpa);
    }
    runs.sort_unstable_by_key(|r| r.gpa);
    let mut merged: Vec<Range> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        match merged.last_mut() {
            Some(last) if r.gpa <= last.gpa + last.len => {
                last.len = last.len.max(r.gpa + r.len - last.gpa);
            }
            _ => merged.push(r),
        }
    }
    *runs = merged;
}

/// The parts of `dirty` that lie inside `allowed` (both in GPA order, `allowed` merged).
pub fn clip(dirty: &[Range], allowed: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut a = 0;
    for d in dirty {
        let d_end = d.gpa + d.len;
        while a < allowed.len() && allowed[a].gpa + allowed[a].len <= d.gpa {
            a += 1;
        }
        let mut i = a;
        while i < allowed.len() && allowed[i].gpa < d_end {
            let lo = d.gpa.max(allowed[i].gpa);
            let hi = d_end.min(allowed[i].gpa + allowed[i].len);
            if lo < hi {
                out.push(Range { gpa: lo, len: hi - lo });
            }
            i += 1;
        }
    }
    out
}

/// What a connection has not been sent yet.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backlog {
    runs: Vec<Range>,
    coalesced: bool,
}

impl Backlog {
    /// Adds written runs; past [`MAX_BACKLOG_RUNS`] runs are widened to ever coarser
    /// aligned blocks until they fit (a superset: nothing written is lost).
    pub fn add(&mut self, runs: &[Range]) {
        self.runs.extend_from_slice(runs);
        normalize(&mut self.runs);
        let mut block = 2 << 20;
        while self.runs.len() > MAX_BACKLOG_RUNS {
            for r in &mut self.runs {
                let lo = r.gpa & !(block - 1);
                let hi = (r.gpa + r.len).next_multiple_of(block);
                *r = Range { gpa: lo, len: hi - lo };
            }
            normalize(&mut self.runs);
            self.coalesced = true;
            block <<= 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Takes everything, as frames of at most [`MAX_RANGES`] runs each, with whether
    /// any of it was coalesced.
    pub fn take(&mut self) -> (bool, Vec<Vec<Range>>) {
        let coalesced = std::mem::take(&mut self.coalesced);
        let frames = std::mem::take(&mut self.runs).chunks(MAX_RANGES).map(<[Range]>::to_vec).collect();
        (coalesced, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(gpa: u64, len: u64) -> Range {
        Range { gpa, len }
    }

    #[test]
    fn bitmaps_become_page_runs_and_bits_past_the_slot_are_ignored() {
        let bitmap = [0b1110_0001u64, 1 << 63 | 1, u64::MAX];
        let runs = bitmap_runs(0x10_0000, &bitmap, 128 * PAGE);
        assert_eq!(
            runs,
            vec![
                r(0x10_0000, PAGE),
                r(0x10_0000 + 5 * PAGE, 3 * PAGE),
                r(0x10_0000 + 64 * PAGE, PAGE),
                r(0x10_0000 + 127 * PAGE, PAGE)
            ],
            "the third word is past the 128-page slot"
        );
        let runs = bitmap_runs(0, &[1 << 63, 1], 65 * PAGE);
        assert_eq!(runs, vec![r(63 * PAGE, 2 * PAGE)], "a run across two words");
    }

    #[test]
    fn sparse_words_become_the_same_runs_as_the_full_bitmap() {
        let bitmap = [0b1011u64, 0, 0, 1 << 63, 1, 0, u64::MAX];
        let sparse: Vec<(u64, u64)> =
            bitmap.iter().enumerate().filter(|(_, &w)| w != 0).map(|(i, &w)| (i as u64 * 64, w)).collect();
        for size in [7 * 64 * PAGE, 6 * 64 * PAGE + 3 * PAGE, 4 * 64 * PAGE] {
            assert_eq!(sparse_bitmap_runs(0x4000_0000, &sparse, size), bitmap_runs(0x4000_0000, &bitmap, size));
        }
        let runs = sparse_bitmap_runs(0, &sparse, 7 * 64 * PAGE);
        assert_eq!(runs[..3], [r(0, 2 * PAGE), r(3 * PAGE, PAGE), r(255 * PAGE, 2 * PAGE)]);
        // A word past the slot, as a hostile or stale harvest could hold, yields nothing.
        assert!(sparse_bitmap_runs(0, &[(u64::MAX - 3, u64::MAX)], 64 * PAGE).is_empty());
    }

    #[test]
    fn runs_are_clipped_to_the_grants() {
        let dirty = [r(0, 0x3000), r(0x5000, 0x1000), r(0x8000, 0x4000)];
        let allowed = [r(0x1000, 0x1000), r(0x9000, 0x1000), r(0xb000, 0x10000)];
        assert_eq!(clip(&dirty, &allowed), vec![r(0x1000, 0x1000), r(0x9000, 0x1000), r(0xb000, 0x1000)]);
        assert!(clip(&dirty, &[]).is_empty());
    }

    #[test]
    fn hostile_runs_merge_into_what_they_cover() {
        // A source's report: the same run a thousand times, runs inside it, and runs that
        // would wrap the address space.
        let mut runs = vec![r(0x10_0000, 0x10_0000); 1000];
        runs.extend([
            r(0x18_0000, 0x1000),
            r(0x20_0000, 0),
            r(u64::MAX - 0xfff, u64::MAX),
            r(u64::MAX - 0x1fff, 0x1000),
        ]);
        normalize(&mut runs);
        assert_eq!(runs, vec![r(0x10_0000, 0x10_0000), r(u64::MAX - 0x1fff, 0x1fff)]);
    }

    #[test]
    fn a_backlog_past_its_bound_is_coalesced_into_a_superset() {
        let mut backlog = Backlog::default();
        // Every other page of 64 MiB: 8192 runs.
        let scattered: Vec<Range> = (0..8192).map(|i| r(i * 2 * PAGE, PAGE)).collect();
        backlog.add(&scattered[..10]);
        backlog.add(&scattered[..10]);
        assert_eq!(backlog.runs.len(), 10, "the same pages twice are one set");
        backlog.add(&scattered);
        assert!(backlog.runs.len() <= MAX_BACKLOG_RUNS);
        assert!(scattered
            .iter()
            .all(|p| backlog.runs.iter().any(|b| b.gpa <= p.gpa && p.gpa + p.len <= b.gpa + b.len)));
        let (coalesced, frames) = backlog.take();
        assert!(coalesced);
        assert!(frames.iter().all(|f| f.len() <= MAX_RANGES));
        assert!(backlog.is_empty() && !backlog.take().0, "taking empties it and clears the flag");
    }
}
