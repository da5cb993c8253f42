//! `inspector-agent`: runs inside the inspector VM, in ring 3 at native speed,
//! over the mirror window where the inspector mapped granted source RAM as
//! read-only memslots. It serves commands from a ring in its RAM (layout in
//! `src/agent.rs`): read, hash (xxh64 and SHA-256, from the `xxhash-rust` and `sha2`
//! crates the host uses too), scan for a pattern, and an
//! integrity watch; it sleeps on the doorbell between batches.
//!
//! The window's contents change under the agent as the source runs; the agent
//! only ever reads it (the one write, OP_WRITE_PROBE, exists to show that a
//! write cannot reach the source).
#![no_std]
#![no_main]

extern crate alloc;

#[path = "rt/mod.rs"]
mod rt;
#[path = "../src/agent.rs"]
mod agent;
mod os_views;

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use agent::*;
use sha2::Digest;
use xxhash_rust::xxh64::xxh64;

/// The heap, in agent RAM at [`HEAP_GPA`]; the OS views allocate.
#[global_allocator]
static ALLOCATOR: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// The prebuilt `alloc` was compiled for unwinding and names this symbol; with
/// `panic=abort` no unwind ever starts, so reaching it is a bug: stop.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    rt::exit(102)
}

/// The OS views' state (one vCPU runs the agent).
static mut OS: os_views::OsState = os_views::OsState::new();

const PAGE: u64 = 4096;

/// (gpa, len) of each integrity watch; len 0 = unused.
static mut WATCHES: [(u64, u64); MAX_WATCHES] = [(0, 0); MAX_WATCHES];

struct Window {
    base: u64,
    len: u64,
    /// Keys the read-set digests of the OS views.
    digest_key: (u64, u64),
}

impl Window {
    /// The window bytes for source range `gpa..gpa+len`, if inside the window.
    fn slice(&self, gpa: u64, len: u64) -> Option<&'static [u8]> {
        let end = gpa.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: the window is identity-mapped; the inspector validated that the range is
        // granted. Its bytes may change under us (the source runs); we only read them.
        Some(unsafe { core::slice::from_raw_parts((self.base + gpa) as *const u8, len as usize) })
    }
}

fn header() -> *mut RingHeader {
    RING_GPA as *mut RingHeader
}

fn slot(i: usize) -> *mut Slot {
    slot_gpa(i) as *mut Slot
}

fn data(i: usize) -> &'static mut [u8] {
    // SAFETY: each slot's data area is agent RAM reserved for that slot.
    unsafe { core::slice::from_raw_parts_mut(data_gpa(i) as *mut u8, DATA_SLOT_SIZE as usize) }
}

fn main(info: &rt::BootInfo) -> u8 {
    if info.ram_end() < MIN_RAM {
        println!("agent: needs {} MiB of RAM, has {} MiB", MIN_RAM >> 20, info.ram_end() >> 20);
        return 2;
    }
    // SAFETY: the inspector wrote the ring header before boot.
    let h = unsafe { read_volatile(header()) };
    if h.magic != RING_MAGIC {
        println!("agent: no ring header at {:#x}", RING_GPA);
        return 2;
    }
    let mapped = info.memmap.iter().any(|e| e.kind == E820_MIRROR && e.addr == h.window_base);
    if !mapped {
        println!("agent: the memory map has no mirror window at {:#x}", h.window_base);
        return 2;
    }
    let window = Window { base: h.window_base, len: h.window_len, digest_key: (h.digest_key[0], h.digest_key[1]) };
    // SAFETY: HEAP_GPA..+HEAP_SIZE is agent RAM (checked against ram_end above) that
    // nothing else uses; the heap is initialized once, before any allocation.
    unsafe { ALLOCATOR.lock().init(HEAP_GPA as *mut u8, HEAP_SIZE as usize) };
    // SAFETY: the header is agent RAM.
    unsafe { write_volatile(&mut (*header()).agent_state, AGENT_READY) };
    println!(
        "agent: ready, mirror window {:#x}+{:#x}, {} command slots, page tables by the {}",
        window.base,
        window.len,
        RING_SLOTS,
        if info.tables_by_loader { "loader" } else { "boot stub" }
    );
    loop {
        let mut completed = 0;
        for i in 0..RING_SLOTS {
            // SAFETY: slots are agent RAM shared with the host; volatile for cross-party visibility.
            if unsafe { read_volatile(&(*slot(i)).state) } != SLOT_SUBMITTED {
                continue;
            }
            compiler_fence(Ordering::Acquire);
            // SAFETY: as above.
            let mut s = unsafe { read_volatile(slot(i)) };
            (s.status, s.result) = match execute(&window, i, &s) {
                Ok(result) => (STATUS_OK, result),
                Err(status) => (status, [0; 4]),
            };
            // The answer first, then the state that says it is there: one volatile
            // write of the whole slot may store its state (first in it) before the
            // result, and the host may read the slot in between.
            // SAFETY: as above.
            unsafe { write_volatile(slot(i), s) };
            compiler_fence(Ordering::Release);
            // SAFETY: as above.
            unsafe { write_volatile(&mut (*slot(i)).state, SLOT_DONE) };
            completed += 1;
        }
        if completed > 0 {
            // SAFETY: the header is agent RAM.
            unsafe { write_volatile(&mut (*header()).completed, read_volatile(&(*header()).completed) + completed) };
            rt::outb(DOORBELL_DONE_PORT, 0);
        }
        rt::outb(DOORBELL_WAIT_PORT, 0);
    }
}

/// Runs slot `i`'s command; returns its result words or a failure status.
fn execute(window: &Window, i: usize, s: &Slot) -> Result<[u64; 4], u32> {
    let [a0, a1, a2, _] = s.args;
    let result = match s.op {
        OP_READ => {
            if a1 > DATA_SLOT_SIZE {
                return Err(STATUS_BAD_ARGS);
            }
            let src = window.slice(a0, a1).ok_or(STATUS_OUT_OF_WINDOW)?;
            data(i)[..src.len()].copy_from_slice(src);
            [a1, 0, 0, 0]
        }
        OP_HASH => {
            let src = window.slice(a0, a1).ok_or(STATUS_OUT_OF_WINDOW)?;
            let digest = sha2::Sha256::digest(src);
            data(i)[..32].copy_from_slice(&digest);
            [xxh64(src, 0), 0, 0, 0]
        }
        OP_SCAN => {
            let plen = a2 as usize;
            if plen == 0 || plen > MAX_PATTERN {
                return Err(STATUS_BAD_ARGS);
            }
            let hay = window.slice(a0, a1).ok_or(STATUS_OUT_OF_WINDOW)?;
            let mut pattern = [0u8; MAX_PATTERN];
            pattern[..plen].copy_from_slice(&data(i)[..plen]);
            let (total, stored) = scan(hay, &pattern[..plen], a0, &mut data(i)[4096..]);
            [total, stored, 0, 0]
        }
        OP_WATCH_SET => {
            let id = a0 as usize;
            if id >= MAX_WATCHES || a2 == 0 || a2 > MAX_WATCH_LEN || a1 % PAGE != 0 || a2 % PAGE != 0 {
                return Err(STATUS_BAD_ARGS);
            }
            let src = window.slice(a1, a2).ok_or(STATUS_OUT_OF_WINDOW)?;
            let baseline = baseline(id);
            for (page, digest) in src.chunks(PAGE as usize).zip(baseline.iter_mut()) {
                *digest = xxh64(page, 0);
            }
            // SAFETY: one vCPU runs the agent.
            unsafe { (*core::ptr::addr_of_mut!(WATCHES))[id] = (a1, a2) };
            [a2 / PAGE, 0, 0, 0]
        }
        OP_WATCH_CHECK => {
            let id = a0 as usize;
            // SAFETY: one vCPU runs the agent.
            let (gpa, len) = *unsafe { (*core::ptr::addr_of!(WATCHES)).get(id).ok_or(STATUS_BAD_ARGS)? };
            if len == 0 {
                return Err(STATUS_BAD_ARGS);
            }
            let src = window.slice(gpa, len).ok_or(STATUS_OUT_OF_WINDOW)?;
            let out = data(i);
            let mut changed = 0u64;
            for (n, (page, digest)) in src.chunks(PAGE as usize).zip(baseline(id).iter_mut()).enumerate() {
                let now = xxh64(page, 0);
                if now != *digest {
                    *digest = now;
                    let at = changed as usize * 8;
                    if at + 8 <= out.len() {
                        out[at..at + 8].copy_from_slice(&(gpa + n as u64 * PAGE).to_le_bytes());
                    }
                    changed += 1;
                }
            }
            [changed, 0, 0, 0]
        }
        OP_WATCH_CHECK_PAGES => {
            let id = a0 as usize;
            // SAFETY: one vCPU runs the agent.
            let (gpa, len) = *unsafe { (*core::ptr::addr_of!(WATCHES)).get(id).ok_or(STATUS_BAD_ARGS)? };
            let count = a1 as usize;
            if len == 0 || count > MAX_CHECK_PAGES {
                return Err(STATUS_BAD_ARGS);
            }
            let src = window.slice(gpa, len).ok_or(STATUS_OUT_OF_WINDOW)?;
            let digests = baseline(id);
            let io = data(i);
            let mut changed = 0usize;
            for n in 0..count {
                let page = u64::from_le_bytes(io[n * 8..n * 8 + 8].try_into().map_err(|_| STATUS_BAD_ARGS)?);
                if page < gpa || page >= gpa + len || page % PAGE != 0 {
                    return Err(STATUS_BAD_ARGS);
                }
                let index = ((page - gpa) / PAGE) as usize;
                let at = index * PAGE as usize;
                let now = xxh64(&src[at..at + PAGE as usize], 0);
                if now != digests[index] {
                    digests[index] = now;
                    // changed <= n: the output never overtakes the input still to read.
                    io[changed * 8..changed * 8 + 8].copy_from_slice(&page.to_le_bytes());
                    changed += 1;
                }
            }
            [changed as u64, 0, 0, 0]
        }
        OP_WRITE_PROBE => {
            let target = window.slice(a0, 1).ok_or(STATUS_OUT_OF_WINDOW)?.as_ptr() as *mut u8;
            // SAFETY: a deliberate write into a read-only memslot: KVM turns it into an MMIO
            // exit that the VMM drops, so the source never sees it.
            unsafe { write_volatile(target, a1 as u8) };
            // SAFETY: reading the same byte back.
            [u64::from(unsafe { read_volatile(target) }), 0, 0, 0]
        }
        OP_LATENCY => {
            if a1 == 0 || a1 > MAX_LATENCY_SAMPLES {
                return Err(STATUS_BAD_ARGS);
            }
            let stamp = window.slice(a0, 16).ok_or(STATUS_OUT_OF_WINDOW)?.as_ptr() as *const u64;
            let out = data(i);
            let start = rt::rdtsc();
            // SAFETY: the stamp pair lies in the window (checked above); volatile reads see
            // each new value the source publishes.
            let mut last = unsafe { read_volatile(stamp) };
            let mut n = 0u64;
            while n < a1 && rt::rdtsc() - start < a2 {
                // SAFETY: as above.
                let seq = unsafe { read_volatile(stamp) };
                if seq != last {
                    let now = rt::rdtsc();
                    // SAFETY: as above.
                    let stamped = unsafe { read_volatile(stamp.add(1)) };
                    let at = n as usize * 8;
                    out[at..at + 8].copy_from_slice(&now.wrapping_sub(stamped).to_le_bytes());
                    n += 1;
                    last = seq;
                }
            }
            [n, 0, 0, 0]
        }
        OP_OS_DISCOVER..=OP_OS_SYMBOLS | OP_OS_VALIDATE => {
            // SAFETY: one vCPU runs the agent, and `OS` is only touched here.
            let os = unsafe { &mut *core::ptr::addr_of_mut!(OS) };
            return os_views::execute(os, window.base, window.len, window.digest_key, s.op, s.args, data(i));
        }
        _ => return Err(STATUS_UNKNOWN_OP),
    };
    Ok(result)
}

fn baseline(id: usize) -> &'static mut [u64] {
    // SAFETY: each watch has its own baseline area in agent RAM.
    unsafe { core::slice::from_raw_parts_mut((WATCH_GPA + id as u64 * WATCH_SLOT_SIZE) as *mut u64, (WATCH_SLOT_SIZE / 8) as usize) }
}

/// Finds every occurrence of `pattern` in `hay`, overlapping ones included, with the
/// `memchr` crate's memmem.
/// Stores the GPAs (`base + offset`) of as many hits as fit in `out`; returns (total, stored).
fn scan(hay: &[u8], pattern: &[u8], base: u64, out: &mut [u8]) -> (u64, u64) {
    let max_stored = (out.len() / 8).min(MAX_SCAN_HITS) as u64;
    let (mut total, mut stored) = (0u64, 0u64);
    // Every start position counts, overlapping ones too ("aa" occurs twice in "aaa"),
    // so each search resumes one byte past the last match.
    let finder = memchr::memmem::Finder::new(pattern);
    let mut from = 0usize;
    while let Some(found) = hay.get(from..).and_then(|rest| finder.find(rest)) {
        let offset = from + found;
        from = offset + 1;
        if stored < max_stored {
            let at = stored as usize * 8;
            out[at..at + 8].copy_from_slice(&(base + offset as u64).to_le_bytes());
            stored += 1;
        }
        total += 1;
    }
    (total, stored)
}

fn ap_main(_info: &rt::BootInfo, _cpu: u32) -> ! {
    rt::park()
}
