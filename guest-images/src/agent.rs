//! The ABI between the inspector (host) and its `inspector-agent` guest: a
//! ring of command slots in the agent's RAM, a data area per slot, and the
//! doorbell ports. Shared by the guest (`no_std`) and the inspector.
//!
//! Addresses in commands are *source* guest-physical addresses; the agent
//! reads them at `window_base + gpa` in its own physical space, where the
//! inspector placed the granted ranges as read-only memslots.

/// Ring header and slots.
pub const RING_GPA: u64 = 0x0200_0000;
pub const RING_SLOTS: usize = 16;
/// Data area of slot `i`: `DATA_GPA + i * DATA_SLOT_SIZE`.
pub const DATA_GPA: u64 = 0x0210_0000;
pub const DATA_SLOT_SIZE: u64 = 1 << 20;
/// Integrity-watch baselines: one u64 per 4 KiB page, `WATCH_SLOT_SIZE` bytes per watch.
pub const WATCH_GPA: u64 = 0x0400_0000;
pub const MAX_WATCHES: usize = 16;
pub const WATCH_SLOT_SIZE: u64 = 1 << 20;
/// Longest range one watch covers (one baseline u64 per page).
pub const MAX_WATCH_LEN: u64 = (WATCH_SLOT_SIZE / 8) * 4096;
/// The agent's heap (the OS views allocate): after the watch baselines.
pub const HEAP_GPA: u64 = WATCH_GPA + (MAX_WATCHES as u64) * WATCH_SLOT_SIZE;
pub const HEAP_SIZE: u64 = 96 << 20;
/// RAM the agent needs.
pub const MIN_RAM: u64 = HEAP_GPA + HEAP_SIZE;
/// Most scan hits stored (the count is exact beyond it).
pub const MAX_SCAN_HITS: usize = (DATA_SLOT_SIZE as usize - 4096) / 8;
/// Longest scan pattern.
pub const MAX_PATTERN: usize = 256;

/// The agent sleeps on this port until the doorbell rings.
pub const DOORBELL_WAIT_PORT: u16 = 0x510;
/// The agent writes this port after completing commands.
pub const DOORBELL_DONE_PORT: u16 = 0x511;
/// e820 type of the mirror window in the agent's memory map.
pub const E820_MIRROR: u32 = 0x5350_0001;

pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"SPECRING");
pub const AGENT_BOOTING: u32 = 0;
pub const AGENT_READY: u32 = 1;

/// Slot states.
pub const SLOT_FREE: u32 = 0;
pub const SLOT_SUBMITTED: u32 = 1;
pub const SLOT_DONE: u32 = 2;

/// Operations.
/// `args = [gpa, len]`: copies the bytes to the slot's data area.
pub const OP_READ: u32 = 1;
/// `args = [gpa, len]`: `result[0]` = xxh64; SHA-256 in the data area's first 32 bytes.
pub const OP_HASH: u32 = 2;
/// `args = [gpa, len, pattern_len]`, pattern at the data area's start: `result[0]` = hits,
/// `result[1]` = hits stored as u64 GPAs from data offset 4096.
pub const OP_SCAN: u32 = 3;
/// `args = [watch, gpa, len]`: records the baseline (one xxh64 per page).
pub const OP_WATCH_SET: u32 = 4;
/// `args = [watch]`: `result[0]` = changed pages, their GPAs as u64s in the data area;
/// the baseline moves to the current contents.
pub const OP_WATCH_CHECK: u32 = 5;
/// `args = [gpa, byte]`: tries to write into the window (an isolation self-test);
/// `result[0]` = the byte read back afterwards.
pub const OP_WRITE_PROBE: u32 = 6;

/// `args = [gpa, count, timeout_cycles]`: spins on the (sequence u64, TSC u64) pair at
/// `gpa`; for each new sequence number records `rdtsc() - stamped TSC` as an i64 in the
/// data area (negative where the two vCPUs' TSCs disagree by more than the latency: kept,
/// not clamped, so the reader can tell). `result[0]` = samples recorded.
pub const OP_LATENCY: u32 = 7;
/// Most latency samples per command.
pub const MAX_LATENCY_SAMPLES: u64 = DATA_SLOT_SIZE / 8;

/// OS views (Linux, found in the source's RAM with no symbols: see the `specula-os`
/// crate). Every OS command's data area starts with the granted ranges, `u32 count`
/// then `count` (gpa u64, len u64) pairs, which bound what the agent may read; the
/// reply (a `specula_os::wire` encoding) replaces them, `result[0]` = its length, and
/// `result[3]` = how many of its walks were made again because the source changed what
/// they read under them (`specula_os::linux::walked_until_consistent`).
/// `OP_OS_DISCOVER` (re)finds the kernel; the others use what it found.
pub const OP_OS_DISCOVER: u32 = 8;
pub const OP_OS_KERNEL: u32 = 9;
pub const OP_OS_PROCESSES: u32 = 10;
pub const OP_OS_MODULES: u32 = 11;
/// `args = [pid]`.
pub const OP_OS_VMAS: u32 = 12;
/// `args = [pid, va, len]`: the bytes of a process's virtual memory (pid 0: the kernel's).
pub const OP_OS_READ_VIRTUAL: u32 = 13;
/// The system call table check (`specula_os::Linux::syscall_table_check`).
pub const OP_OS_SYSCALLS: u32 = 14;
/// `args = [which]`: the rootkit checks (`specula_os::Linux::rootkit_checks`), `which`
/// a mask of `specula_os::checks::select` bits.
pub const OP_OS_CHECKS: u32 = 15;
/// `args = [start, max]`: kallsyms entries `start..start+max` (as many as fit) and the total.
pub const OP_OS_SYMBOLS: u32 = 16;
/// `args = [watch, count]`, `count` page GPAs (u64s) at the data area's start: re-hashes
/// only those pages of the watch; `result[0]` = how many changed, their GPAs written over
/// the input. The baseline of each moves to its current contents.
pub const OP_WATCH_CHECK_PAGES: u32 = 17;
/// Most pages one [`OP_WATCH_CHECK_PAGES`] command carries.
pub const MAX_CHECK_PAGES: usize = DATA_SLOT_SIZE as usize / 8;
/// Most granted ranges an OS command carries.
pub const MAX_OS_RANGES: usize = 4096;
/// Most vCPUs whose LSTAR an `OP_OS_CHECKS` input carries (after the ranges, when
/// args[1] is 1: a u32 count, then a u32 vCPU index and a u64 value each).
pub const MAX_OS_VCPUS: usize = 1024;

/// The OS views a re-walk can be spared. When `args[3]` is [`LIST_PAGES_READ`], the agent
/// lists with the reply what the walk read (page tables included), one 24-byte record
/// per source page, sorted by page: `gpa u64` (page-aligned), `lines u64` (bit `i` set:
/// the walk read bytes of the page's 64-byte line `i`), `digest u64` (keyed hash of
/// those lines' contents, as the walk read them). `result[1]` records from data offset
/// `result[2]` (8-aligned, after the reply); `result[1]` = [`READ_SET_NONE`] when it kept
/// no list (too many pages, or a line that changed between two reads of one walk).
pub const fn lists_pages_read(op: u32) -> bool {
    matches!(op, OP_OS_KERNEL | OP_OS_PROCESSES | OP_OS_MODULES | OP_OS_VMAS | OP_OS_SYSCALLS | OP_OS_CHECKS)
}
/// `args[3]` of such a view when the inspector wants the list (it costs the walk a
/// keyed hash per line read, wasted where no dirty-page feed can make use of it).
pub const LIST_PAGES_READ: u64 = 1;
/// `result[1]` of an OS view whose read set the agent did not keep.
pub const READ_SET_NONE: u64 = u64::MAX;
/// Most pages one read set lists (a walk that reads more is not listed).
pub const MAX_READ_SET_PAGES: usize = 1 << 14;
/// Bytes per read-set record.
pub const READ_RECORD: usize = 24;
/// `args = [count]`, after the granted ranges in the data area: `count` read-set records
/// (see [`lists_pages_read`]); `result[0]` = how many of them, from the first, still
/// hold the contents their digest says (`count` when all do).
pub const OP_OS_VALIDATE: u32 = 18;
/// Most records one [`OP_OS_VALIDATE`] carries.
pub const MAX_VALIDATE_RECORDS: usize = (DATA_SLOT_SIZE as usize - 4 - MAX_OS_RANGES * 16) / READ_RECORD;

/// Statuses.
pub const STATUS_OK: u32 = 0;
pub const STATUS_OUT_OF_WINDOW: u32 = 1;
pub const STATUS_BAD_ARGS: u32 = 2;
pub const STATUS_UNKNOWN_OP: u32 = 3;
/// The OS views have not found a kernel yet: send `OP_OS_DISCOVER` first.
pub const STATUS_NOT_DISCOVERED: u32 = 4;
/// An OS view failed; the data area holds `u32 len` and the error text.
pub const STATUS_OS_ERROR: u32 = 5;
/// The reply does not fit in the data area.
pub const STATUS_TOO_BIG: u32 = 6;

/// The ring header at [`RING_GPA`], followed by [`RING_SLOTS`] slots.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RingHeader {
    pub magic: u64,
    pub window_base: u64,
    pub window_len: u64,
    pub agent_state: u32,
    pub slots: u32,
    pub completed: u64,
    /// The SipHash key of read-set digests: random, from the inspector, never seen by
    /// the source, so a source cannot make changed contents keep their digest.
    pub digest_key: [u64; 2],
}

/// One command slot.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    pub state: u32,
    pub op: u32,
    pub seq: u64,
    pub args: [u64; 4],
    pub status: u32,
    pub _pad: u32,
    pub result: [u64; 4],
}

/// Address of slot `i`.
pub const fn slot_gpa(i: usize) -> u64 {
    RING_GPA + 64 + (i as u64) * core::mem::size_of::<Slot>() as u64
}

/// Address of slot `i`'s data area.
pub const fn data_gpa(i: usize) -> u64 {
    DATA_GPA + (i as u64) * DATA_SLOT_SIZE
}

const _: () = assert!(core::mem::size_of::<RingHeader>() <= 64);
const _: () = assert!(slot_gpa(RING_SLOTS) <= DATA_GPA);
const _: () = assert!(data_gpa(RING_SLOTS) <= WATCH_GPA);
