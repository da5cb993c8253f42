//! Checks on what the agent answers. The agent runs beside hostile guest data and is
//! not trusted: a count it claims is bounded by what it was asked, and every address
//! it returns must lie where it was asked to look, or the whole reply is refused
//! ([`InspectError::BadReply`]) rather than passed on in part.

use guest_images::agent as abi;
use mirror_driver::protocol::Range;

use super::InspectError;
use crate::agent_link::Completion;
use crate::view_cache::PageRead;

const PAGE: u64 = 4096;

/// A scan step's reply over `[gpa, gpa + len)` for a pattern of `pattern_len` bytes:
/// (matches, the first ones stored). No more matches than starting positions, and every
/// stored match starts inside the step's share of the range.
pub(crate) fn scan_matches(
    done: &Completion<'_>,
    gpa: u64,
    len: u64,
    pattern_len: u64,
) -> Result<(u64, Vec<u64>), InspectError> {
    let possible = len.saturating_sub(pattern_len.saturating_sub(1));
    let claimed = done.result[0];
    if claimed > possible {
        return Err(InspectError::BadReply(format!("{claimed} matches claimed in {len} bytes")));
    }
    let hits = done.u64s(4096, done.result[1].min(claimed), abi::MAX_SCAN_HITS as u64)?;
    if let Some(bad) = hits.iter().find(|&&hit| hit < gpa || hit >= gpa + possible) {
        return Err(InspectError::BadReply(format!("match at {bad:#x} lies outside {gpa:#x}+{len:#x}")));
    }
    Ok((claimed, hits))
}

/// A full watch check's reply: the changed pages of watch `id` over `range`, each a
/// page-aligned address inside it, at most one per page.
pub(crate) fn changed_in_watch(done: &Completion<'_>, id: usize, range: Range) -> Result<Vec<u64>, InspectError> {
    let pages = done.u64s(0, done.result[0], range.len / PAGE)?;
    let outside = |&&page: &&u64| page < range.gpa || page >= range.gpa + range.len || !page.is_multiple_of(PAGE);
    if let Some(bad) = pages.iter().find(outside) {
        return Err(InspectError::BadReply(format!("changed page {bad:#x} is not in watch {id}")));
    }
    Ok(pages)
}

/// A check of chosen pages' reply: the ones that changed, each one of `asked` (sorted).
pub(crate) fn changed_of_asked(done: &Completion<'_>, asked: &[u64]) -> Result<Vec<u64>, InspectError> {
    let claimed = done.result[0];
    if claimed > asked.len() as u64 {
        return Err(InspectError::BadReply(format!("{claimed} changed pages of {} checked", asked.len())));
    }
    let got = done.u64s(0, claimed, asked.len() as u64)?;
    if let Some(bad) = got.iter().find(|p| asked.binary_search(p).is_err()) {
        return Err(InspectError::BadReply(format!("changed page {bad:#x} was not asked about")));
    }
    Ok(got)
}

/// What an OS view's walk read (see [`abi::lists_pages_read`]): `None` where the agent
/// kept no list. Records must name page-aligned pages inside the window of `window_len`
/// bytes, in increasing order, each with at least one line, after the `reply_len`-byte
/// reply; or the reply is refused.
pub(crate) fn pages_read(
    done: &Completion<'_>,
    reply_len: u64,
    window_len: u64,
) -> Result<Option<Vec<PageRead>>, InspectError> {
    let (count, offset) = (done.result[1], done.result[2]);
    if count == abi::READ_SET_NONE {
        return Ok(None);
    }
    let bad = |why: String| InspectError::BadReply(format!("what the walk read: {why}"));
    if offset < reply_len || !offset.is_multiple_of(8) {
        return Err(bad(format!("listed at offset {offset}, inside a {reply_len}-byte reply")));
    }
    let room = abi::DATA_SLOT_SIZE.saturating_sub(offset) / abi::READ_RECORD as u64;
    if count > room.min(abi::MAX_READ_SET_PAGES as u64) {
        return Err(bad(format!("{count} pages claimed")));
    }
    let words = done.u64s(offset, count * 3, count * 3)?;
    let mut pages: Vec<PageRead> = Vec::with_capacity(count as usize);
    for w in words.chunks_exact(3) {
        let page = PageRead { gpa: w[0], lines: w[1], digest: w[2] };
        let inside = page.gpa.checked_add(PAGE).is_some_and(|end| end <= window_len);
        let ordered = pages.last().is_none_or(|prev| prev.gpa < page.gpa);
        if !inside || !page.gpa.is_multiple_of(PAGE) || !ordered || page.lines == 0 {
            return Err(bad(format!(
                "page {:#x} (lines {:#x}) is not a page after the last, in the window",
                page.gpa, page.lines
            )));
        }
        pages.push(page);
    }
    Ok(Some(pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_link::testing::{fake_agent, ring};
    use guest_images::agent::{data_gpa, Slot, OP_SCAN, OP_WATCH_CHECK, OP_WATCH_CHECK_PAGES, STATUS_OK};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    /// Runs `op` against an agent that answers with `result` and `values` (u64s at data
    /// offset `at`), and hands the completion to `check`.
    fn answered<T>(
        op: u32,
        result: [u64; 4],
        at: u64,
        values: Vec<u64>,
        check: impl FnOnce(&Completion<'_>) -> T,
    ) -> T {
        let (link, memory, doorbell) = ring();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = memory.clone();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let lie = move |s: Slot| {
            let slot = (0..guest_images::agent::RING_SLOTS)
                .find(|&i| {
                    crate::agent_link::testing::slot_at(&writer, i).is_some_and(|t| t.seq == s.seq && t.op == s.op)
                })
                .expect("the answered slot");
            writer.write_slice(&bytes, GuestAddress(data_gpa(slot) + at)).unwrap();
            Slot { status: STATUS_OK, result, ..s }
        };
        let agent = fake_agent(memory, doorbell, stop.clone(), |_| Duration::ZERO, lie);
        let done = link.call(op, [0; 4], &[]).expect("the agent answered");
        let outcome = check(&done);
        drop(done);
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap();
        outcome
    }

    fn refused<T: std::fmt::Debug>(outcome: Result<T, InspectError>, says: &str) {
        match outcome {
            Err(InspectError::BadReply(text)) => assert!(text.contains(says), "{text}"),
            other => panic!("a lying agent's reply was taken: {other:?}"),
        }
    }

    #[test]
    fn a_read_set_is_taken_only_as_ordered_pages_in_the_window_after_the_reply() {
        use guest_images::agent::{OP_OS_PROCESSES, READ_SET_NONE};
        let read = |words: Vec<u64>, at: u64| {
            let count = words.len() as u64 / 3;
            answered(OP_OS_PROCESSES, [100, count, at, 0], at, words, |d| pages_read(d, 100, 1 << 30))
        };
        let honest = read(vec![0x1000, 0b11, 7, 0x8000, 1 << 63, 9], 104).unwrap();
        assert_eq!(
            honest,
            Some(vec![
                PageRead { gpa: 0x1000, lines: 0b11, digest: 7 },
                PageRead { gpa: 0x8000, lines: 1 << 63, digest: 9 }
            ])
        );
        let none = answered(OP_OS_PROCESSES, [100, READ_SET_NONE, 0, 0], 0, vec![], |d| pages_read(d, 100, 1 << 30));
        assert_eq!(none.unwrap(), None);
        refused(read(vec![0x1000, 1, 0], 96), "inside a 100-byte reply");
        refused(read(vec![0x8000, 1, 0, 0x1000, 1, 0], 104), "not a page after the last");
        refused(read(vec![0x1000, 1, 0, 0x1000, 1, 0], 104), "not a page after the last");
        refused(read(vec![0x1800, 1, 0], 104), "not a page after the last");
        refused(read(vec![0x1000, 0, 0], 104), "not a page after the last");
        refused(read(vec![0x4000_0000, 1, 0], 104), "not a page after the last");
        refused(read(vec![u64::MAX - 0xfff, 1, 0], 104), "not a page after the last");
        refused(
            answered(OP_OS_PROCESSES, [100, 1 << 40, 104, 0], 104, vec![], |d| pages_read(d, 100, 1 << 30)),
            "pages claimed",
        );
    }

    #[test]
    fn a_page_check_reply_names_only_pages_it_was_asked_about() {
        let asked = [0x10_0000u64, 0x10_2000, 0x10_5000];
        // Honest: a subset of what was asked.
        let ok = answered(OP_WATCH_CHECK_PAGES, [1, 0, 0, 0], 0, vec![0x10_2000], |d| changed_of_asked(d, &asked));
        assert_eq!(ok.unwrap(), vec![0x10_2000]);
        // A page of the source the inspector never asked about (a lie that would make the
        // inspector report, and restore-check, memory outside the watch).
        refused(
            answered(OP_WATCH_CHECK_PAGES, [1, 0, 0, 0], 0, vec![0x10_1000], |d| changed_of_asked(d, &asked)),
            "was not asked about",
        );
        // More changed pages than were checked.
        refused(
            answered(OP_WATCH_CHECK_PAGES, [4, 0, 0, 0], 0, vec![0x10_0000; 4], |d| changed_of_asked(d, &asked)),
            "4 changed pages of 3 checked",
        );
        // A count as large as a u64 is refused before anything is read.
        refused(
            answered(OP_WATCH_CHECK_PAGES, [u64::MAX, 0, 0, 0], 0, vec![], |d| changed_of_asked(d, &asked)),
            "changed pages of 3 checked",
        );
    }

    #[test]
    fn a_watch_check_reply_stays_inside_the_watch_on_page_boundaries() {
        let range = Range { gpa: 0x20_0000, len: 0x4000 };
        let ok =
            answered(OP_WATCH_CHECK, [2, 0, 0, 0], 0, vec![0x20_0000, 0x20_3000], |d| changed_in_watch(d, 7, range));
        assert_eq!(ok.unwrap(), vec![0x20_0000, 0x20_3000]);
        for bad in [0x20_4000u64, 0x1f_f000, 0x20_0800] {
            refused(
                answered(OP_WATCH_CHECK, [1, 0, 0, 0], 0, vec![bad], |d| changed_in_watch(d, 7, range)),
                "is not in watch 7",
            );
        }
        // A claimed count beyond the watch's pages is clamped to them, not trusted.
        let many =
            answered(OP_WATCH_CHECK, [1 << 40, 0, 0, 0], 0, vec![0x20_1000; 8], |d| changed_in_watch(d, 7, range));
        assert_eq!(many.unwrap().len(), 4, "four pages in the watch");
    }

    #[test]
    fn a_scan_reply_claims_no_more_matches_than_positions_and_none_outside() {
        let (gpa, len) = (0x40_0000u64, 0x1000u64);
        let ok = answered(OP_SCAN, [2, 2, 0, 0], 4096, vec![gpa, gpa + 0xff8], |d| scan_matches(d, gpa, len, 8));
        assert_eq!(ok.unwrap(), (2, vec![gpa, gpa + 0xff8]));
        refused(
            answered(OP_SCAN, [0x1000, 0, 0, 0], 4096, vec![], |d| scan_matches(d, gpa, len, 8)),
            "matches claimed",
        );
        // A match whose pattern would run past the step (it belongs to the next one).
        refused(
            answered(OP_SCAN, [1, 1, 0, 0], 4096, vec![gpa + 0xffc], |d| scan_matches(d, gpa, len, 8)),
            "lies outside",
        );
        refused(answered(OP_SCAN, [1, 1, 0, 0], 4096, vec![0], |d| scan_matches(d, gpa, len, 8)), "lies outside");
    }
}
