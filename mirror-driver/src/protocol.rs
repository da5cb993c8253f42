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

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 4;
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

/// A vCPU's registers, enough to walk the guest's page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => DirtyMechanism::Bitmap,
            2 => DirtyMechanism::BitmapManualProtect,
            3 => DirtyMechanism::Ring,
            _ => return None,
        })
    }
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
    fn from_u32(v: u32) -> Option<Self> {
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
    Error {
        code: ErrorCode,
        text: String,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const HELLO_ACK: u16 = 2;
    pub const GET_MEMORY_MAP: u16 = 3;
    pub const MEMORY_MAP: u16 = 4;
    pub const GRANT_REQUEST: u16 = 5;
    pub const GRANT_REPLY: u16 = 6;
    pub const RELEASE: u16 = 7;
    pub const RELEASED: u16 = 8;
    pub const GET_VCPU_STATE: u16 = 9;
    pub const PAUSE_REQUEST: u16 = 11;
    pub const RESUME_REQUEST: u16 = 12;
    pub const VCPU_STATE: u16 = 10;
    pub const REVOKE: u16 = 20;
    pub const REVOKE_ACK: u16 = 21;
    pub const DISCARD: u16 = 22;
    pub const PAUSED: u16 = 23;
    pub const RESUMED: u16 = 24;
    pub const SOURCE_EXITING: u16 = 25;
    pub const DIRTY_PAGES: u16 = 26;
    pub const DIRTY_SUBSCRIBE: u16 = 13;
    pub const DIRTY_SUBSCRIBED: u16 = 14;
    pub const ERROR: u16 = 30;
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

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    kind: u16,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Malformed { kind: self.kind });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count, checked against `limit` and against the bytes left (each item `item_len`).
    fn count(&mut self, limit: usize, item_len: usize) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count > limit {
            return Err(DecodeError::CountTooLarge { count, limit });
        }
        if count * item_len > self.bytes.len() {
            return Err(DecodeError::Malformed { kind: self.kind });
        }
        Ok(count)
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed { kind: self.kind })
        }
    }
}

fn write_ranges(w: &mut Writer, ranges: &[Range]) {
    w.u32(ranges.len() as u32);
    for r in ranges {
        w.u64(r.gpa);
        w.u64(r.len);
    }
}

fn read_ranges(r: &mut Reader) -> Result<Vec<Range>, DecodeError> {
    let n = r.count(MAX_RANGES, 16)?;
    (0..n).map(|_| Ok(Range { gpa: r.u64()?, len: r.u64()? })).collect()
}

const VCPU_REGS_LEN: usize = 4 + 8 * 2 + 8 * 16 + 8 * 12;

impl Message {
    /// Encodes the message as one frame (header and payload) with correlation id `id`.
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let mut w = Writer(vec![0; HEADER_LEN]);
        let kind = match self {
            Message::Hello { version } => {
                w.u32(*version);
                kind::HELLO
            }
            Message::HelloAck { version, ram_size, vcpus } => {
                w.u32(*version);
                w.u64(*ram_size);
                w.u32(*vcpus);
                kind::HELLO_ACK
            }
            Message::GetMemoryMap => kind::GET_MEMORY_MAP,
            Message::MemoryMap { regions } => {
                write_ranges(&mut w, regions);
                kind::MEMORY_MAP
            }
            Message::GrantRequest { access, ranges } => {
                w.u32(*access);
                write_ranges(&mut w, ranges);
                kind::GRANT_REQUEST
            }
            Message::GrantReply { more, grants } => {
                w.u32(u32::from(*more));
                w.u32(grants.len() as u32);
                for g in grants {
                    w.u64(g.id);
                    w.u64(g.gpa);
                    w.u64(g.len);
                    w.u32(g.fd_index);
                    w.u64(g.offset);
                }
                kind::GRANT_REPLY
            }
            Message::Release { grant_id } => {
                w.u64(*grant_id);
                kind::RELEASE
            }
            Message::Released { grant_id } => {
                w.u64(*grant_id);
                kind::RELEASED
            }
            Message::GetVcpuState => kind::GET_VCPU_STATE,
            Message::PauseRequest => kind::PAUSE_REQUEST,
            Message::ResumeRequest => kind::RESUME_REQUEST,
            Message::VcpuState { vcpus } => {
                w.u32(vcpus.len() as u32);
                for v in vcpus {
                    w.u32(v.index);
                    w.u64(v.rip);
                    w.u64(v.rflags);
                    for g in v.gprs {
                        w.u64(g);
                    }
                    for c in [
                        v.cr0,
                        v.cr2,
                        v.cr3,
                        v.cr4,
                        v.efer,
                        v.fs_base,
                        v.gs_base,
                        v.kernel_gs_base,
                        v.star,
                        v.lstar,
                        v.cstar,
                        v.fmask,
                    ] {
                        w.u64(c);
                    }
                }
                kind::VCPU_STATE
            }
            Message::Revoke { grant_id, nonce } => {
                w.u64(*grant_id);
                w.u64(*nonce);
                kind::REVOKE
            }
            Message::RevokeAck { grant_id, nonce } => {
                w.u64(*grant_id);
                w.u64(*nonce);
                kind::REVOKE_ACK
            }
            Message::Discard { gpa, len } => {
                w.u64(*gpa);
                w.u64(*len);
                kind::DISCARD
            }
            Message::Paused => kind::PAUSED,
            Message::Resumed => kind::RESUMED,
            Message::SourceExiting => kind::SOURCE_EXITING,
            Message::DirtySubscribe => kind::DIRTY_SUBSCRIBE,
            Message::DirtySubscribed { interval_us, mechanism } => {
                w.u32(*interval_us);
                w.u32(*mechanism as u32);
                kind::DIRTY_SUBSCRIBED
            }
            Message::DirtyPages { coalesced, ranges } => {
                w.u32(u32::from(*coalesced));
                write_ranges(&mut w, ranges);
                kind::DIRTY_PAGES
            }
            Message::Error { code, text } => {
                w.u32(*code as u32);
                let text = truncate_utf8(text, MAX_ERROR_TEXT);
                w.u32(text.len() as u32);
                w.0.extend_from_slice(text.as_bytes());
                kind::ERROR
            }
        };
        let payload_len = (w.0.len() - HEADER_LEN) as u32;
        w.0[0..4].copy_from_slice(&payload_len.to_le_bytes());
        w.0[4..6].copy_from_slice(&kind.to_le_bytes());
        w.0[8..12].copy_from_slice(&id.to_le_bytes());
        w.0
    }

    /// Decodes a payload of message kind `kind`; every count and length is bounded.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        let mut r = Reader { bytes: payload, kind };
        let message = match kind {
            kind::HELLO => Message::Hello { version: r.u32()? },
            kind::HELLO_ACK => Message::HelloAck { version: r.u32()?, ram_size: r.u64()?, vcpus: r.u32()? },
            kind::GET_MEMORY_MAP => Message::GetMemoryMap,
            kind::MEMORY_MAP => Message::MemoryMap { regions: read_ranges(&mut r)? },
            kind::GRANT_REQUEST => Message::GrantRequest { access: r.u32()?, ranges: read_ranges(&mut r)? },
            kind::GRANT_REPLY => {
                let more = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed { kind }),
                };
                let n = r.count(MAX_FDS_PER_FRAME, 36)?;
                let grants = (0..n)
                    .map(|_| {
                        Ok(Grant { id: r.u64()?, gpa: r.u64()?, len: r.u64()?, fd_index: r.u32()?, offset: r.u64()? })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                Message::GrantReply { more, grants }
            }
            kind::RELEASE => Message::Release { grant_id: r.u64()? },
            kind::RELEASED => Message::Released { grant_id: r.u64()? },
            kind::GET_VCPU_STATE => Message::GetVcpuState,
            kind::PAUSE_REQUEST => Message::PauseRequest,
            kind::RESUME_REQUEST => Message::ResumeRequest,
            kind::VCPU_STATE => {
                let n = r.count(MAX_VCPUS, VCPU_REGS_LEN)?;
                let mut vcpus = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut v = VcpuRegs { index: r.u32()?, rip: r.u64()?, rflags: r.u64()?, ..Default::default() };
                    for g in v.gprs.iter_mut() {
                        *g = r.u64()?;
                    }
                    v.cr0 = r.u64()?;
                    v.cr2 = r.u64()?;
                    v.cr3 = r.u64()?;
                    v.cr4 = r.u64()?;
                    v.efer = r.u64()?;
                    v.fs_base = r.u64()?;
                    v.gs_base = r.u64()?;
                    v.kernel_gs_base = r.u64()?;
                    v.star = r.u64()?;
                    v.lstar = r.u64()?;
                    v.cstar = r.u64()?;
                    v.fmask = r.u64()?;
                    vcpus.push(v);
                }
                Message::VcpuState { vcpus }
            }
            kind::REVOKE => Message::Revoke { grant_id: r.u64()?, nonce: r.u64()? },
            kind::REVOKE_ACK => Message::RevokeAck { grant_id: r.u64()?, nonce: r.u64()? },
            kind::DISCARD => Message::Discard { gpa: r.u64()?, len: r.u64()? },
            kind::PAUSED => Message::Paused,
            kind::RESUMED => Message::Resumed,
            kind::SOURCE_EXITING => Message::SourceExiting,
            kind::DIRTY_SUBSCRIBE => Message::DirtySubscribe,
            kind::DIRTY_SUBSCRIBED => Message::DirtySubscribed {
                interval_us: r.u32()?,
                mechanism: DirtyMechanism::from_u32(r.u32()?).ok_or(DecodeError::Malformed { kind })?,
            },
            kind::DIRTY_PAGES => {
                let coalesced = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed { kind }),
                };
                Message::DirtyPages { coalesced, ranges: read_ranges(&mut r)? }
            }
            kind::ERROR => {
                let raw = r.u32()?;
                let code = ErrorCode::from_u32(raw).ok_or(DecodeError::BadErrorCode(raw))?;
                let n = r.count(MAX_ERROR_TEXT, 1)?;
                let text = String::from_utf8(r.take(n)?.to_vec()).map_err(|_| DecodeError::Malformed { kind })?;
                Message::Error { code, text }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let frame = m.encode(0xabcd_0123);
        let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.len, frame.len() - HEADER_LEN);
        assert_eq!(header.id, 0xabcd_0123, "the correlation id survives the trip");
        assert_eq!(Message::decode(header.kind, &frame[HEADER_LEN..]).unwrap(), m);
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { version: 1 },
            Message::HelloAck { version: 1, ram_size: 1 << 30, vcpus: 4 },
            Message::GetMemoryMap,
            Message::MemoryMap { regions: vec![Range { gpa: 0, len: 1 << 20 }, Range { gpa: 1 << 32, len: 4096 }] },
            Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa: 0x1000, len: 0x2000 }] },
            Message::GrantReply {
                more: true,
                grants: vec![Grant { id: 7, gpa: 0x1000, len: 0x2000, fd_index: 0, offset: 0x1000 }],
            },
            Message::Release { grant_id: 7 },
            Message::Released { grant_id: 7 },
            Message::GetVcpuState,
            Message::PauseRequest,
            Message::ResumeRequest,
            Message::VcpuState {
                vcpus: vec![VcpuRegs {
                    index: 1,
                    rip: 0x1000,
                    cr3: 0x9000,
                    gprs: [3; 16],
                    gs_base: 0xffff_8880_0000_0000,
                    kernel_gs_base: 7,
                    star: 0x0023_0010_0000_0000,
                    lstar: 0xffff_ffff_8120_0000,
                    cstar: 0xffff_ffff_8120_1000,
                    fmask: 0x47700,
                    ..Default::default()
                }],
            },
            Message::Revoke { grant_id: 9, nonce: 0x1234_5678_9abc },
            Message::RevokeAck { grant_id: 9, nonce: 0x1234_5678_9abc },
            Message::Discard { gpa: 0x4000, len: 0x1000 },
            Message::Paused,
            Message::Resumed,
            Message::SourceExiting,
            Message::DirtySubscribe,
            Message::DirtySubscribed { interval_us: 20_000, mechanism: DirtyMechanism::Ring },
            Message::DirtyPages { coalesced: true, ranges: vec![Range { gpa: 0x1000, len: 0x3000 }] },
            Message::Error { code: ErrorCode::PolicyDenied, text: "no".into() },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            round_trip(m);
        }
    }

    #[test]
    fn oversized_frames_and_counts_are_refused() {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        assert_eq!(decode_header(&header), Err(DecodeError::TooLarge(MAX_PAYLOAD + 1)));
        let mut payload = ACCESS_READ_ONLY.to_le_bytes().to_vec();
        payload.extend_from_slice(&(MAX_RANGES as u32 + 1).to_le_bytes());
        assert!(matches!(Message::decode(kind::GRANT_REQUEST, &payload), Err(DecodeError::CountTooLarge { .. })));
        // A count that claims more items than the payload holds.
        let mut payload = ACCESS_READ_ONLY.to_le_bytes().to_vec();
        payload.extend_from_slice(&100u32.to_le_bytes());
        assert!(matches!(Message::decode(kind::GRANT_REQUEST, &payload), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn unknown_kinds_and_trailing_bytes_are_refused() {
        assert_eq!(Message::decode(999, &[]), Err(DecodeError::UnknownKind(999)));
        assert_eq!(DecodeError::UnknownKind(999).code(), ErrorCode::UnknownMessage);
        assert!(matches!(Message::decode(kind::PAUSED, &[0]), Err(DecodeError::Malformed { .. })));
        // A dirty-feed reply naming no mechanism this crate knows.
        for code in [0u32, 4, u32::MAX] {
            let payload: Vec<u8> = [20_000u32, code].iter().flat_map(|w| w.to_le_bytes()).collect();
            let decoded = Message::decode(kind::DIRTY_SUBSCRIBED, &payload);
            assert!(matches!(decoded, Err(DecodeError::Malformed { .. })), "mechanism {code}: {decoded:?}");
        }
        let mut header = Message::Paused.encode(EVENT_ID);
        header[6] = 1;
        assert_eq!(decode_header(header[..HEADER_LEN].try_into().unwrap()), Err(DecodeError::BadHeader));
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error_not_a_panic() {
        for m in samples() {
            let frame = m.encode(1);
            let kind = u16::from_le_bytes([frame[4], frame[5]]);
            let payload = &frame[HEADER_LEN..];
            for cut in 0..payload.len() {
                assert!(Message::decode(kind, &payload[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
    }

    /// A deterministic fuzz pass: random and mutated payloads for every kind must decode or
    /// fail cleanly (the libFuzzer target in fuzz/ explores further).
    #[test]
    fn random_and_mutated_payloads_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = samples().iter().map(|m| m.encode(7)).collect();
        for round in 0..50_000 {
            let mut frame = seeds[round % seeds.len()].clone();
            for _ in 0..(next() % 6) {
                if frame.is_empty() {
                    break;
                }
                let at = (next() as usize) % frame.len();
                match next() % 3 {
                    0 => frame[at] = next() as u8,
                    1 => frame.truncate(at),
                    _ => frame.insert(at, next() as u8),
                }
            }
            if frame.len() < HEADER_LEN {
                continue;
            }
            if let Ok(header) = decode_header(frame[..HEADER_LEN].try_into().unwrap()) {
                if let Ok(message) = Message::decode(header.kind, &frame[HEADER_LEN..]) {
                    // Whatever decodes re-encodes to the same message.
                    let again = message.encode(header.id);
                    let again_header = decode_header(again[..HEADER_LEN].try_into().unwrap()).unwrap();
                    assert_eq!(again_header.id, header.id);
                    assert_eq!(Message::decode(again_header.kind, &again[HEADER_LEN..]).unwrap(), message);
                }
            }
            let kind = (next() % 40) as u16;
            let _ = Message::decode(kind, &frame[HEADER_LEN.min(frame.len())..]);
        }
    }

    #[test]
    fn error_text_must_be_utf8() {
        let mut payload = (ErrorCode::Internal as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&2u32.to_le_bytes());
        payload.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(Message::decode(kind::ERROR, &payload), Err(DecodeError::Malformed { .. })));
    }

    #[test]
    fn long_error_text_is_truncated_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT);
        let frame = Message::Error { code: ErrorCode::Internal, text }.encode(1);
        match Message::decode(kind::ERROR, &frame[HEADER_LEN..]).unwrap() {
            Message::Error { text, .. } => assert!(text.len() <= MAX_ERROR_TEXT && text.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }
}
