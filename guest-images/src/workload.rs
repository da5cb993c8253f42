//! Memory layout of `source-workload`: what it writes where, so that the
//! inspector and tests can find and verify it. Shared by the guest (`no_std`)
//! and host code; every structure is `repr(C)` with fixed offsets.
//!
//! Everything hangs off a header page at [`HEADER_GPA`]:
//! - a heartbeat counter the boot vCPU bumps every iteration, and one counter
//!   per vCPU on its own cache line;
//! - a task table laid out like an OS task list: fixed-size records with a
//!   pid, a name and a state, linked through `next` pointers (guest-physical
//!   addresses) in an order that is not table order;
//! - a region of "kernel text": deterministic bytes whose SHA-256 is stored in
//!   the header, so an integrity checker can tell when it changes.

/// Guest-physical address of the [`Header`].
pub const HEADER_GPA: u64 = 0x0100_0000;
/// Per-vCPU counters: `u64` each, [`COUNTER_STRIDE`] bytes apart.
pub const CPU_COUNTERS_GPA: u64 = HEADER_GPA + 0x1000;
pub const COUNTER_STRIDE: u64 = 64;
/// The task table.
pub const TASK_TABLE_GPA: u64 = HEADER_GPA + 0x4000;
pub const TASK_COUNT: usize = 64;
pub const TASK_RECORD_SIZE: usize = core::mem::size_of::<TaskRecord>();
/// The "kernel text" region.
pub const TEXT_GPA: u64 = HEADER_GPA + 0x10000;
pub const TEXT_LEN: usize = 256 << 10;
/// Seed of the text generator.
pub const TEXT_SEED: u64 = 0x5350_4543_554c_4131;
/// Free pages the workload hands out and takes back (the "free and reuse pages" pool).
pub const POOL_GPA: u64 = HEADER_GPA + 0x100000;
pub const POOL_PAGES: usize = 256;
/// Smallest guest RAM the workload fits in.
pub const MIN_RAM: u64 = POOL_GPA + (POOL_PAGES as u64) * 4096;

/// Where `stamp` publishes (sequence u64, TSC u64) pairs for coherence-latency measurements.
pub const STAMP_GPA: u64 = HEADER_GPA + 0x3000;
/// `fill` writes only at or above this address (clear of the workload's own structures).
pub const FILL_MIN_GPA: u64 = 0x0200_0000;
/// `fill` plants this needle every [`NEEDLE_STRIDE`] bytes, at offset [`NEEDLE_OFFSET`].
pub const NEEDLE: [u8; 16] = *b"SPECULA-NEEDLE!!";
pub const NEEDLE_STRIDE: u64 = 16 << 20;
pub const NEEDLE_OFFSET: u64 = 4096 + 7;

pub const HEADER_MAGIC: [u8; 16] = *b"SPECULA-WORKLOAD";
pub const LAYOUT_VERSION: u32 = 1;
pub const TASK_MAGIC: u32 = u32::from_le_bytes(*b"TASK");

/// Workload states in [`Header::state`].
pub const STATE_BOOTING: u32 = 0;
pub const STATE_RUNNING: u32 = 1;
pub const STATE_DONE: u32 = 2;

/// Task states in [`TaskRecord::state`].
pub const TASK_RUNNING: u32 = 0;
pub const TASK_SLEEPING: u32 = 1;

/// The header page.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    pub magic: [u8; 16],
    pub version: u32,
    pub cpu_count: u32,
    pub heartbeat: u64,
    pub task_list_head: u64,
    pub task_count: u32,
    pub task_record_size: u32,
    pub text_gpa: u64,
    pub text_len: u64,
    pub text_sha256: [u8; 32],
    pub cpu_counters_gpa: u64,
    pub state: u32,
    pub commands_done: u32,
}

/// One task record.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskRecord {
    pub magic: u32,
    pub pid: u32,
    pub state: u32,
    pub cpu: u32,
    pub name: [u8; 16],
    pub runtime: u64,
    /// GPA of the next record, 0 at the end of the list.
    pub next: u64,
    pub prev: u64,
    pub start_heartbeat: u64,
}

/// Deterministic "kernel text" bytes (xorshift64*), identical in guest and host.
pub fn fill_text(buf: &mut [u8]) {
    let mut x = TEXT_SEED;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Fills `buf` (which starts at guest address `gpa`) with deterministic bytes and plants
/// [`NEEDLE`] at every stride; returns how many needles it planted.
pub fn fill_with_needles(buf: &mut [u8], gpa: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = (x & 0x7f7f_7f7f_7f7f_7f7f).to_le_bytes(); // no 0x80+ bytes: 'S' | 0x80 never matches
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut planted = 0;
    let mut at = gpa.div_ceil(NEEDLE_STRIDE) * NEEDLE_STRIDE + NEEDLE_OFFSET;
    while at + NEEDLE.len() as u64 <= gpa + buf.len() as u64 {
        let off = (at - gpa) as usize;
        buf[off..off + NEEDLE.len()].copy_from_slice(&NEEDLE);
        planted += 1;
        at += NEEDLE_STRIDE;
    }
    planted
}

/// Name of task `i`, NUL-padded.
pub fn task_name(i: usize) -> [u8; 16] {
    const NAMES: [&[u8]; 8] = [b"init", b"kthreadd", b"sshd", b"cron", b"nginx", b"postgres", b"bash", b"specula-wl"];
    let mut name = [0u8; 16];
    let base = NAMES[i % NAMES.len()];
    name[..base.len()].copy_from_slice(base);
    let suffix = i / NAMES.len();
    if suffix > 0 && base.len() + 3 <= 16 {
        name[base.len()] = b'/';
        name[base.len() + 1] = b'0' + (suffix / 10) as u8 % 10;
        name[base.len() + 2] = b'0' + (suffix % 10) as u8;
    }
    name
}

/// pid of task `i`.
pub fn task_pid(i: usize) -> u32 {
    1 + (i as u32) * 7
}

/// Order in which tasks are linked: a fixed permutation of table slots, so that
/// walking the list differs from scanning the table.
pub fn link_order(i: usize) -> usize {
    (i * 37 + 11) % TASK_COUNT
}

const _: () = assert!(TASK_RECORD_SIZE == 64);
const _: () = assert!(core::mem::size_of::<Header>() <= 4096);
const _: () = assert!(TEXT_GPA + TEXT_LEN as u64 <= POOL_GPA);
const _: () = assert!(STAMP_GPA + 16 <= TASK_TABLE_GPA);
