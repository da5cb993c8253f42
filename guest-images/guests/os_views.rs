//! The agent's OS views: `specula-os` over the mirror window, limited to the ranges
//! the inspector says are granted, with the results encoded for the host.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::hash::Hasher;
use core::ops::Range;

use siphasher::sip::SipHasher13;

use specula_os::wire::{self, OsRequest, ReadRecord, Writer};
use specula_os::{Checker, Error, Linux, PhysMem};

use crate::agent::*;

// The request encoding lives in `specula_os::wire`, the slot layout in `agent.rs`: the
// two must agree on every number, or the host's requests decode as something else.
const _: () = {
    assert!(wire::op::DISCOVER == OP_OS_DISCOVER && wire::op::KERNEL == OP_OS_KERNEL);
    assert!(wire::op::PROCESSES == OP_OS_PROCESSES && wire::op::MODULES == OP_OS_MODULES);
    assert!(wire::op::VMAS == OP_OS_VMAS && wire::op::READ_VIRTUAL == OP_OS_READ_VIRTUAL);
    assert!(wire::op::SYSCALLS == OP_OS_SYSCALLS && wire::op::CHECKS == OP_OS_CHECKS);
    assert!(wire::op::SYMBOLS == OP_OS_SYMBOLS && wire::op::VALIDATE == OP_OS_VALIDATE);
    assert!(wire::MAX_GRANTED_RANGES == MAX_OS_RANGES && wire::MAX_LSTARS == MAX_OS_VCPUS);
    assert!(wire::READ_RECORD_BYTES == READ_RECORD && wire::MAX_READ_RECORDS >= MAX_VALIDATE_RECORDS);
};

/// The source's RAM as the agent may read it: the window, where granted.
pub struct WindowMem {
    base: u64,
    len: u64,
    /// Granted (gpa, len) ranges, sorted; replaced by every OS command.
    granted: UnsafeCell<Vec<(u64, u64)>>,
    /// The pages read, while a view that lists them runs.
    pages_read: UnsafeCell<Option<PagesRead>>,
}

/// What one view's walk read: per source page, the 64-byte lines it read and each
/// line's keyed hash at its first read. Bounded: past [`MAX_READ_SET_PAGES`] pages it
/// only remembers that it overflowed.
struct PagesRead {
    key: (u64, u64),
    pages: BTreeMap<u64, PageLines>,
    /// A line read twice in one walk with different contents: the walk saw both, so
    /// no digest can stand for what it read.
    torn: bool,
    overflowed: bool,
}

struct PageLines {
    lines: u64,
    hashes: [u64; LINES],
}

const LINE: u64 = 64;
const LINES: usize = (PAGE / LINE) as usize;

/// The keyed hash of one 64-byte line at `line_pa`.
fn line_hash(key: (u64, u64), line_pa: u64, bytes: &[u8; LINE as usize]) -> u64 {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write_u64(line_pa);
    h.write(bytes);
    h.finish()
}

/// The digest of a page's read lines: the keyed hash of their hashes, in line order.
fn page_digest(key: (u64, u64), page: u64, lines: u64, hashes: &[u64; LINES]) -> u64 {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    h.write_u64(page);
    h.write_u64(lines);
    for (i, hash) in hashes.iter().enumerate() {
        if lines & (1 << i) != 0 {
            h.write_u64(*hash);
        }
    }
    h.finish()
}

impl PagesRead {
    fn new(key: (u64, u64)) -> Self {
        PagesRead { key, pages: BTreeMap::new(), torn: false, overflowed: false }
    }

    /// Notes the line at `line_pa` (aligned) read with `bytes`.
    fn note(&mut self, line_pa: u64, bytes: &[u8; LINE as usize]) {
        if self.overflowed {
            return;
        }
        let page = line_pa & !(PAGE - 1);
        let i = ((line_pa - page) / LINE) as usize;
        let hash = line_hash(self.key, line_pa, bytes);
        if !self.pages.contains_key(&page) && self.pages.len() >= MAX_READ_SET_PAGES {
            self.overflowed = true;
            return;
        }
        let entry = self.pages.entry(page).or_insert_with(|| PageLines { lines: 0, hashes: [0; LINES] });
        if entry.lines & (1 << i) == 0 {
            entry.lines |= 1 << i;
            entry.hashes[i] = hash;
        } else if entry.hashes[i] != hash {
            self.torn = true;
        }
    }

    /// Writes the read-set records into `out` from 8-aligned `at`; returns (records,
    /// offset), or `READ_SET_NONE` when none can be given or they do not fit.
    fn write_records(&self, out: &mut [u8], at: usize) -> (u64, u64) {
        let at = at.next_multiple_of(8);
        if self.overflowed || self.torn || at + self.pages.len() * READ_RECORD > out.len() {
            return (READ_SET_NONE, 0);
        }
        for (n, (&page, lines)) in self.pages.iter().enumerate() {
            let o = at + n * READ_RECORD;
            let digest = page_digest(self.key, page, lines.lines, &lines.hashes);
            out[o..o + 8].copy_from_slice(&page.to_le_bytes());
            out[o + 8..o + 16].copy_from_slice(&lines.lines.to_le_bytes());
            out[o + 16..o + 24].copy_from_slice(&digest.to_le_bytes());
        }
        (self.pages.len() as u64, at as u64)
    }
}

/// How many of `records` still hold the contents their digest says, counting from the
/// first.
fn validate(mem: &WindowMem, key: (u64, u64), records: &[ReadRecord]) -> u64 {
    let mut line = [0u8; LINE as usize];
    for (n, &ReadRecord { page, lines, digest }) in records.iter().enumerate() {
        if page % PAGE != 0 {
            return n as u64;
        }
        let mut hashes = [0u64; LINES];
        for (i, hash) in hashes.iter_mut().enumerate() {
            if lines & (1 << i) != 0 {
                let at = page + i as u64 * LINE;
                if mem.copy_out(at, &mut line).is_err() {
                    return n as u64;
                }
                *hash = line_hash(key, at, &line);
            }
        }
        if page_digest(key, page, lines, &hashes) != digest {
            return n as u64;
        }
    }
    records.len() as u64
}

const PAGE: u64 = 4096;

// SAFETY: one vCPU runs the agent; nothing else touches `granted`.
unsafe impl Sync for WindowMem {}

impl WindowMem {
    /// Copies granted window bytes at `pa` into `buf`.
    fn copy_out(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let err = Error::PhysRead { pa, len: buf.len() as u64 };
        let end = pa.checked_add(buf.len() as u64).ok_or(err.clone())?;
        // SAFETY: single-threaded agent; `granted` is only replaced between commands.
        let granted = unsafe { &*self.granted.get() };
        let inside = granted.iter().any(|&(g, l)| pa >= g && end <= g + l) && end <= self.len;
        if !inside {
            return Err(err);
        }
        // SAFETY: the range lies in the identity-mapped window, in a granted memslot; the
        // source may change it under us, we only read.
        unsafe { core::ptr::copy_nonoverlapping((self.base + pa) as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl PhysMem for WindowMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        // SAFETY: single-threaded agent; only this read and `execute` touch it.
        let Some(read) = (unsafe { &mut *self.pages_read.get() }) else {
            return self.copy_out(pa, buf);
        };
        // While a view's walk is recorded, each line is copied once and both the walk's
        // bytes and the line's hash come from that copy: they cannot disagree.
        let end = pa.checked_add(buf.len() as u64).ok_or(Error::PhysRead { pa, len: buf.len() as u64 })?;
        let mut line = [0u8; LINE as usize];
        let mut at = pa & !(LINE - 1);
        while at < end {
            self.copy_out(at, &mut line).map_err(|_| Error::PhysRead { pa, len: buf.len() as u64 })?;
            read.note(at, &line);
            let (from, to) = (at.max(pa), (at + LINE).min(end));
            buf[(from - pa) as usize..(to - pa) as usize].copy_from_slice(&line[(from - at) as usize..(to - at) as usize]);
            at += LINE;
        }
        Ok(())
    }

    fn prefetch(&self, pa: u64) {
        if pa < self.len {
            // SAFETY: a prefetch never faults and reads nothing architecturally; the
            // address is inside the window (an ungranted part is simply not fetched).
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>((self.base + pa) as *const i8) };
        }
    }

    fn ram_ranges(&self) -> Vec<Range<u64>> {
        // SAFETY: as above.
        unsafe { &*self.granted.get() }.iter().map(|&(g, l)| g..g + l).collect()
    }
}

/// What the OS views keep between commands.
pub struct OsState {
    mem: Option<&'static WindowMem>,
    linux: Option<Linux<'static, WindowMem>>,
    /// The rootkit checks, with the kernel-text hashes taken when `linux` was found.
    checker: Option<Checker>,
}

impl OsState {
    pub const fn new() -> Self {
        OsState { mem: None, linux: None, checker: None }
    }
}

/// Writes an error's text as the reply.
fn fail(out: &mut [u8], error: &Error) -> u32 {
    let text = alloc::format!("{error}");
    let n = text.len().min(out.len() - 4);
    out[..4].copy_from_slice(&(n as u32).to_le_bytes());
    out[4..4 + n].copy_from_slice(&text.as_bytes()[..n]);
    STATUS_OS_ERROR
}

/// Runs OS command `op` with the slot's data area `data`.
pub fn execute(
    state: &mut OsState,
    window_base: u64,
    window_len: u64,
    digest_key: (u64, u64),
    op: u32,
    args: [u64; 4],
    data: &mut [u8],
) -> Result<[u64; 4], u32> {
    // The request is copied out of the data area here: the reply is written over it.
    let (mut ranges, input) = wire::decode_granted(data).map_err(|_| STATUS_BAD_ARGS)?;
    let request = OsRequest::decode(op, args, input).map_err(|_| STATUS_BAD_ARGS)?;
    let mem: &'static WindowMem = *state.mem.get_or_insert_with(|| {
        Box::leak(Box::new(WindowMem {
            base: window_base,
            len: window_len,
            granted: UnsafeCell::new(Vec::new()),
            pages_read: UnsafeCell::new(None),
        }))
    });
    ranges.sort_unstable();
    // SAFETY: single-threaded; no borrow of `granted` is alive between commands.
    unsafe { *mem.granted.get() = ranges };
    match &request {
        OsRequest::Validate { records } => {
            if records.len() > MAX_VALIDATE_RECORDS {
                return Err(STATUS_BAD_ARGS);
            }
            return Ok([validate(mem, digest_key, records), 0, 0, 0]);
        }
        OsRequest::Discover { cpus } => {
            (state.linux, state.checker) = (None, None);
            match Linux::discover_with(mem, cpus) {
                Ok(linux) => {
                    // The text is hashed now, when it is believed to be the kernel's own.
                    state.checker = Some(Checker::new(&linux));
                    state.linux = Some(linux);
                }
                Err(e) => return Err(fail(data, &e)),
            }
        }
        _ => {}
    }
    let (Some(linux), Some(checker)) = (state.linux.as_ref(), state.checker.as_ref()) else {
        return Err(STATUS_NOT_DISCOVERED);
    };
    // The reply is encoded straight into the data area (the granted ranges in it were
    // read above): no staging buffer to clear and copy per command.
    let room = data.len();
    let listed = lists_pages_read(op) && args[3] == LIST_PAGES_READ;
    // SAFETY: single-threaded; no reference to it is alive between reads.
    unsafe { *mem.pages_read.get() = listed.then(|| PagesRead::new(digest_key)) };
    let redone_before = linux.walks_redone();
    let outcome: Result<usize, Error> = (|| {
        let mut w = Writer::new(&mut *data);
        match request {
            OsRequest::Discover { .. } | OsRequest::Kernel => wire::encode_kernel(&linux.kernel_info()?, &mut w),
            OsRequest::Processes => wire::encode_processes(&linux.processes()?, &mut w),
            OsRequest::Modules => wire::encode_modules(&linux.modules()?, &mut w),
            OsRequest::Syscalls => wire::encode_syscalls(&linux.syscall_table_check()?, &mut w),
            OsRequest::Checks { which, lstars } => {
                wire::encode_checks(&checker.run_with(linux, which, lstars.as_deref()), &mut w)
            }
            OsRequest::Symbols { start, max } => {
                // Names average ~25 bytes (at most 512): a page that fits the data area unless
                // names are unusually long, which ends in STATUS_TOO_BIG.
                let fit = (room / 256).max(1) as u64;
                wire::encode_symbols(linux.kallsyms(), start as usize, max.min(fit) as usize, &mut w)
            }
            OsRequest::Vmas { pid } => {
                let ps = linux.processes()?;
                let p = ps.iter().find(|p| p.pid as u32 == pid).ok_or(Error::Corrupt(alloc::format!("no process {pid}")))?;
                wire::encode_vmas(&linux.vmas(p)?, &mut w)
            }
            OsRequest::ReadVirtual { pid, va, len } => {
                if len > room as u64 {
                    return Err(Error::TooLarge { what: "virtual read", value: len, max: room as u64 });
                }
                drop(w);
                let bytes = &mut data[..len as usize];
                if pid == 0 {
                    specula_os::VirtMem::read_virt(linux.kernel(), va, bytes)?;
                } else {
                    let ps = linux.processes()?;
                    let p = ps.iter().find(|p| p.pid as u32 == pid).ok_or(Error::Corrupt(alloc::format!("no process {pid}")))?;
                    linux.read_process(p, va, bytes)?;
                }
                return Ok(len as usize);
            }
            // Answered above, without a walk.
            OsRequest::Validate { .. } => return Err(Error::BadRequest("validate is not a view")),
        }
        w.finish().ok_or(Error::TooLarge { what: "reply", value: room as u64 + 1, max: room as u64 })
    })();
    // SAFETY: as above; the walk is over.
    let read = unsafe { (*mem.pages_read.get()).take() };
    let redone = linux.walks_redone() - redone_before;
    match outcome {
        Ok(len) => match read {
            Some(read) => {
                let (records, at) = read.write_records(data, len);
                Ok([len as u64, records, at, redone])
            }
            None => Ok([len as u64, READ_SET_NONE, 0, redone]),
        },
        Err(Error::TooLarge { what: "reply", .. }) => Err(STATUS_TOO_BIG),
        Err(e) => Err(fail(data, &e)),
    }
}
