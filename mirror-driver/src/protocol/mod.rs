//! The mirror device's wire protocol.
//!
//! Every message is one frame on a Unix stream socket:
//!
//! ```text
//! u32 payload_len (little-endian, <= MAX_PAYLOAD) | u16 kind | u16 reserved (0) | u32 id | payload
//! ```
//!
//! `id` correlates a reply with its request: the inspector numbers its requests
//! (never 0) and the source echoes the number on every reply frame, so a late
//! reply, or frames left over from a failed batch, can never be taken for the
//! answer to a later request. Events the source pushes carry id 0.
//!
//! Payloads are fixed little-endian fields and counted arrays, each count
//! bounded. File descriptors for grants travel beside a `GrantReply` frame as
//! SCM_RIGHTS. A session starts with `Hello`/`HelloAck`; an unknown version or
//! message kind gets an `Error` reply, never a crash.

mod codec;
#[cfg(test)]
mod tests;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 7;
/// Largest payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Frame header size.
pub const HEADER_LEN: usize = 12;
/// Correlation id of frames that answer no request (events).
pub const EVENT_ID: u32 = 0;
/// Most ranges in one grant request, regions in a memory map, grants in a reply.
pub const MAX_RANGES: usize = 1024;
/// Most vCPUs in a state reply.
pub const MAX_VCPUS: usize = 256;
/// Longest error text.
pub const MAX_ERROR_TEXT: usize = 512;
/// Most fds beside one frame (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_FRAME: usize = 250;
/// Access a grant asks for: only read-only exists.
pub const ACCESS_READ_ONLY: u32 = 1;

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub gpa: u64,
    pub len: u64,
}

/// One granted piece: `len` bytes of source RAM at `gpa`, found at `offset` in the fd at `fd_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
    pub gpa: u64,
    pub len: u64,
    pub fd_index: u32,
    pub offset: u64,
}

/// A vCPU's registers, enough to walk the guest's page tables: the one shape of a
/// vCPU's state from every source, on the mirror protocol and in the inspector's API
/// (0 where the source cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "api", derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema))]
pub struct VcpuRegs {
    pub index: u32,
    pub rip: u64,
    pub rflags: u64,
    /// RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP, R8..R15.
    pub gprs: [u64; 16],
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// FS and GS segment bases, and the KERNEL_GS_BASE MSR (0 where the source cannot tell).
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    /// The system-call MSRs STAR, LSTAR (where `syscall` enters the kernel), CSTAR and
    /// SFMASK (0 where the source cannot tell).
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
}

impl VcpuRegs {
    /// The stack pointer (`gprs[6]`).
    pub fn rsp(&self) -> u64 {
        self.gprs[6]
    }
}

/// How a source learns which pages its guest wrote (reported in `DirtySubscribed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DirtyMechanism {
    /// KVM_GET_DIRTY_LOG, which re-protects every dirty page of a memslot itself:
    /// O(memslot size) per collection.
    Bitmap = 1,
    /// KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of the reported pages only
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): still O(memslot size) to read.
    BitmapManualProtect = 2,
    /// KVM's per-vCPU dirty ring: O(pages written) per collection.
    Ring = 3,
}

impl DirtyMechanism {
    /// The name tools and logs use.
    pub fn name(self) -> &'static str {
        match self {
            DirtyMechanism::Bitmap => "KVM dirty bitmap",
            DirtyMechanism::BitmapManualProtect => "KVM dirty bitmap with manual protection",
            DirtyMechanism::Ring => "KVM dirty ring",
        }
    }

    /// A one-word name, for line protocols.
    pub fn token(self) -> &'static str {
        match self {
            DirtyMechanism::Bitmap => "bitmap",
            DirtyMechanism::BitmapManualProtect => "bitmap-manual-protect",
            DirtyMechanism::Ring => "ring",
        }
    }

    pub(super) fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => DirtyMechanism::Bitmap,
            2 => DirtyMechanism::BitmapManualProtect,
            3 => DirtyMechanism::Ring,
            _ => return None,
        })
    }
}

/// Trace kinds an inspector subscribes to (bits of `TraceSubscribe::kinds`).
pub mod trace_kind {
    /// Guest writes to the MSRs of [`super::TRACED_MSRS`], reported as
    /// [`super::Message::TraceMsrWrite`] and then applied.
    pub const MSR_WRITES: u32 = 1;
    /// Hits of the hardware breakpoints this connection set
    /// ([`super::Message::TraceBreakpoints`]), as [`super::Message::TraceBreakpointHit`].
    pub const BREAKPOINTS: u32 = 2;
    /// Guest writes to the ranges of this connection's write traps
    /// ([`super::Message::TraceWriteTraps`]), as [`super::Message::TraceMemoryWrite`].
    pub const WRITE_TRAPS: u32 = 4;
    /// Every kind a subscription names (breakpoint hits come with setting breakpoints).
    pub const ALL: u32 = MSR_WRITES;
}

/// Most ranges one set of write traps names.
pub const MAX_WRITE_TRAP_RANGES: usize = 64;
/// Most bytes the write traps of a source cover, in whole pages: each trapped page is a
/// read-only piece of a memslot, and kernel text (the largest table traced) is ~16 MiB.
pub const MAX_WRITE_TRAP_BYTES: u64 = 64 << 20;

/// Most hardware breakpoints a source arms: x86's four debug address registers.
pub const MAX_BREAKPOINTS: usize = 4;
/// Most captures one breakpoint takes at a hit.
pub const MAX_CAPTURES: usize = 6;
/// Most pointers one capture follows.
pub const MAX_DEREFS: usize = 4;
/// Longest string a capture reads (with `String`, and each of a `StringArray`'s).
pub const MAX_CAPTURE_STRING: u32 = 256;
/// Most strings a `StringArray` capture reads.
pub const MAX_CAPTURE_STRINGS: usize = 16;
/// A capture's base past the 16 general-purpose registers: the GS base (the per-CPU
/// area, in a kernel's context).
pub const CAPTURE_BASE_GS: u32 = 16;

/// What a capture reads where its address computation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CaptureKind {
    /// The 8 bytes there.
    U64 = 1,
    /// The 4 bytes there.
    U32 = 2,
    /// A NUL-terminated string there (at most `max_len` bytes).
    String = 3,
    /// A NULL-terminated array of string pointers there (`argv`): at most
    /// [`MAX_CAPTURE_STRINGS`] strings of at most `max_len` bytes.
    StringArray = 4,
    /// The address itself, nothing read (a register's value, say).
    Address = 5,
}

impl CaptureKind {
    pub(super) fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => CaptureKind::U64,
            2 => CaptureKind::U32,
            3 => CaptureKind::String,
            4 => CaptureKind::StringArray,
            5 => CaptureKind::Address,
            _ => return None,
        })
    }
}

/// What to read from the guest when a breakpoint is hit, computed in the hitting vCPU's
/// own address space: start at `base` (a general-purpose register, in [`VcpuRegs::gprs`]
/// order, or [`CAPTURE_BASE_GS`]), replace the address by the 8 bytes at `address +
/// deref` for each of `derefs`, add `offset`, and read `kind` there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub base: u32,
    pub derefs: Vec<i64>,
    pub offset: i64,
    pub kind: CaptureKind,
    /// For strings: the most bytes read of each (at most [`MAX_CAPTURE_STRING`]).
    pub max_len: u32,
}

/// A hardware execution breakpoint at a guest virtual address, with what to capture
/// when a vCPU reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakpoint {
    pub address: u64,
    pub captures: Vec<Capture>,
}

/// What one capture read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Captured {
    /// An address on its way was not mapped.
    Missing,
    Number(u64),
    Bytes(Vec<u8>),
    Strings(Vec<Vec<u8>>),
}

/// A vCPU reached a breakpoint: which, where, and what its captures read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakpointHit {
    pub vcpu: u32,
    /// The breakpoint's index in the list the inspector set.
    pub index: u32,
    pub rip: u64,
    pub cr3: u64,
    /// One per capture of the breakpoint, in order.
    pub values: Vec<Captured>,
}

/// The MSRs whose guest writes a source traces, with their names: where `syscall` and
/// `sysenter` enter the kernel (LSTAR, CSTAR, SYSENTER_EIP), EFER (which turns system
/// calls on) and DEBUGCTL (branch tracing a rootkit may turn off).
pub const TRACED_MSRS: [(u32, &str); 5] = [
    (0xc000_0080, "EFER"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0x0000_0176, "SYSENTER_EIP"),
    (0x0000_01d9, "DEBUGCTL"),
];

/// The name of a traced MSR, if it is one.
pub fn traced_msr_name(msr: u32) -> Option<&'static str> {
    TRACED_MSRS.iter().find(|(index, _)| *index == msr).map(|(_, name)| *name)
}

/// Stack words an [`MsrWrite`] carries.
pub const MSR_WRITE_STACK_WORDS: usize = 4;

/// A guest's write to a traced MSR, as its vCPU exited on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsrWrite {
    /// The vCPU that wrote.
    pub vcpu: u32,
    /// The MSR's index (one of [`TRACED_MSRS`]).
    pub msr: u32,
    /// What the guest wrote.
    pub value: u64,
    /// What the MSR held before.
    pub previous: u64,
    /// Where the writing `wrmsr` is, and the address space it ran in.
    pub rip: u64,
    pub cr3: u64,
    /// The first words on the writer's stack (0 where unmapped): the return address
    /// into the code that asked for the write is usually the first (`wrmsr` sits in a
    /// small leaf function such as Linux's `native_write_msr`).
    pub stack: [u64; MSR_WRITE_STACK_WORDS],
    /// Whether the source applied the write (false: KVM refused the value, and the
    /// guest got the #GP it would have got without tracing).
    pub applied: bool,
}

/// Most bytes one [`MemoryWrite`] carries: KVM completes wider stores in pieces of at
/// most 8 bytes, each its own exit.
pub const MEMORY_WRITE_MAX_LEN: u32 = 8;

/// A guest write to a write-trapped range, as its vCPU exited on it (a write to a
/// read-only page, which the source completed exactly as the guest asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryWrite {
    /// The vCPU that wrote.
    pub vcpu: u32,
    /// Where it wrote, and how many bytes (1 to [`MEMORY_WRITE_MAX_LEN`]).
    pub gpa: u64,
    pub len: u32,
    /// The bytes written, and those they replaced (little-endian, `len` of each).
    pub value: u64,
    pub previous: u64,
    /// Where the vCPU is after the writing instruction (KVM's emulator has stepped
    /// past it by the exit), and the address space it ran in.
    pub rip: u64,
    pub cr3: u64,
    /// The first words on the writer's stack (0 where unmapped).
    pub stack: [u64; MSR_WRITE_STACK_WORDS],
}

/// Error codes carried by [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    BadVersion = 1,
    UnknownMessage = 2,
    Malformed = 3,
    TooLarge = 4,
    OutOfRange = 5,
    PolicyDenied = 6,
    BadAccess = 7,
    UnknownGrant = 8,
    NotNow = 9,
    PeerRefused = 10,
    Internal = 11,
}

impl ErrorCode {
    pub(super) fn from_u32(v: u32) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadVersion,
            2 => UnknownMessage,
            3 => Malformed,
            4 => TooLarge,
            5 => OutOfRange,
            6 => PolicyDenied,
            7 => BadAccess,
            8 => UnknownGrant,
            9 => NotNow,
            10 => PeerRefused,
            11 => Internal,
            _ => return None,
        })
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Inspector -> source: opens a session.
    Hello {
        version: u32,
    },
    /// Source -> inspector: session accepted.
    HelloAck {
        version: u32,
        ram_size: u64,
        vcpus: u32,
    },
    GetMemoryMap,
    MemoryMap {
        regions: Vec<Range>,
    },
    GrantRequest {
        access: u32,
        ranges: Vec<Range>,
    },
    /// Grants, with one fd per grant beside the frame (index = `fd_index`, counted within
    /// this frame). SCM_RIGHTS carries at most [`MAX_FDS_PER_FRAME`] fds, so a large grant
    /// arrives as several frames; `more` is set on all but the last.
    GrantReply {
        more: bool,
        grants: Vec<Grant>,
    },
    Release {
        grant_id: u64,
    },
    Released {
        grant_id: u64,
    },
    GetVcpuState,
    /// Inspector -> source: hold the source's vCPUs (if the source allows it); the reply
    /// is `Paused` with the request's id, and every inspector gets the `Paused` event.
    PauseRequest,
    /// Inspector -> source: release this inspector's hold.
    ResumeRequest,
    VcpuState {
        vcpus: Vec<VcpuRegs>,
    },
    /// Source -> inspector events.
    /// `nonce` is random: only an acknowledgement that echoes it counts, so a peer cannot
    /// acknowledge a revoke before it was sent.
    Revoke {
        grant_id: u64,
        nonce: u64,
    },
    /// Inspector -> source: the revoked grant's mapping is gone.
    RevokeAck {
        grant_id: u64,
        nonce: u64,
    },
    Discard {
        gpa: u64,
        len: u64,
    },
    Paused,
    Resumed,
    SourceExiting,
    /// Inspector -> source: send this connection the pages the source guest writes in its
    /// grants (KVM's dirty log), until it disconnects. Reply: `DirtySubscribed`, or an
    /// error where the source keeps no dirty log.
    DirtySubscribe,
    /// Source -> inspector: subscribed; the source collects every `interval_us`, by
    /// `mechanism`.
    DirtySubscribed {
        interval_us: u32,
        mechanism: DirtyMechanism,
    },
    /// Source -> inspector event: page runs written since the last report, within this
    /// connection's grants, in GPA order. `coalesced`: the source merged runs because the
    /// inspector fell behind, so the runs may cover pages that were not written.
    DirtyPages {
        coalesced: bool,
        ranges: Vec<Range>,
    },
    /// Inspector -> source (a subscriber): collect the dirty log now and send this
    /// connection every written page it holds, then the `DirtySynced` event with `token`.
    /// The inspector then knows it has heard of every write the source's log had seen
    /// when it asked. Reply: `DirtySynced` (after the event), or an error.
    DirtySync {
        token: u64,
    },
    /// Source -> inspector: the barrier of a `DirtySync`, sent first as an event (after
    /// every `DirtyPages` it flushed) and then as the request's reply.
    DirtySynced {
        token: u64,
    },
    /// Inspector -> source: send this connection the trace events of `kinds` (bits of
    /// [`trace_kind`]; 0 stops them), until it disconnects. The source arms what its
    /// subscribers want, and disarms what none wants. Reply: `TraceSubscribed`, or an
    /// error where the source does not allow tracing or cannot trace a kind.
    TraceSubscribe {
        kinds: u32,
    },
    /// Source -> inspector: the kinds now sent to this connection, and the most trace
    /// events the source reports per second (all kinds, all subscribers: past it they
    /// are counted in `TraceDropped`).
    TraceSubscribed {
        kinds: u32,
        max_per_second: u32,
    },
    /// Source -> inspector event: a guest write to a traced MSR.
    TraceMsrWrite(MsrWrite),
    /// Source -> inspector event: `count` trace events were dropped since the last such
    /// event (over the rate cap, or behind a full queue).
    TraceDropped {
        count: u64,
    },
    /// Inspector -> source: arm exactly these breakpoints (at most [`MAX_BREAKPOINTS`];
    /// none disarms) on every vCPU, their hits sent to this connection. Hardware ones
    /// use the debug registers; `software` ones an `int3` the source writes over a no-op
    /// instruction at (or, past an `endbr64`, just after) each address, skipped at each
    /// hit, where the debug registers do not work. One connection holds the breakpoints
    /// at a time; they are released when it sets none or disconnects. Reply:
    /// `TraceBreakpointsSet`, or an error.
    TraceBreakpoints {
        software: bool,
        points: Vec<Breakpoint>,
    },
    /// Source -> inspector: the breakpoints are armed (`count` of them).
    TraceBreakpointsSet {
        count: u32,
    },
    /// Source -> inspector event: a vCPU reached one of this connection's breakpoints.
    TraceBreakpointHit(BreakpointHit),
    /// Inspector -> source: trap the guest's writes to exactly these guest-physical
    /// ranges (at most [`MAX_WRITE_TRAP_RANGES`], [`MAX_WRITE_TRAP_BYTES`] in whole pages;
    /// none disarms), reported to this connection. Their pages become read-only to the
    /// guest: each write exits, the source completes it and reports those that touch a
    /// range. One connection holds the write traps at a time; they are released when it
    /// sets none or disconnects. Reply: `TraceWriteTrapsSet`, or an error.
    TraceWriteTraps {
        ranges: Vec<Range>,
    },
    /// Source -> inspector: the write traps are armed, over `pages` pages.
    TraceWriteTrapsSet {
        pages: u64,
    },
    /// Source -> inspector event: a guest write to one of this connection's trapped ranges.
    TraceMemoryWrite(MemoryWrite),
    Error {
        code: ErrorCode,
        text: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("frame header has a non-zero reserved field")]
    BadHeader,
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("message kind {kind} is truncated or has trailing bytes")]
    Malformed { kind: u16 },
    #[error("a count of {count} exceeds the limit of {limit}")]
    CountTooLarge { count: usize, limit: usize },
    #[error("unknown error code {0}")]
    BadErrorCode(u32),
}

impl DecodeError {
    /// The error code to send back for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge(_) | DecodeError::CountTooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownKind(_) => ErrorCode::UnknownMessage,
            _ => ErrorCode::Malformed,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes (at most [`MAX_PAYLOAD`]).
    pub len: usize,
    /// Message kind.
    pub kind: u16,
    /// Correlation id ([`EVENT_ID`] for events).
    pub id: u32,
}

/// Parses a frame header: the payload length, kind and correlation id.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let kind = u16::from_le_bytes([header[4], header[5]]);
    if u16::from_le_bytes([header[6], header[7]]) != 0 {
        return Err(DecodeError::BadHeader);
    }
    if len > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(len));
    }
    let id = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    Ok(FrameHeader { len, kind, id })
}
