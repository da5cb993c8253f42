//! The frame encoding: message kinds, and each message's payload as fixed
//! little-endian fields and bounded, counted arrays.

use super::{
    Breakpoint, BreakpointHit, Capture, CaptureKind, Captured, DecodeError, DirtyMechanism, ErrorCode, Grant,
    MemoryWrite, Message, MsrWrite, Range, VcpuRegs, CAPTURE_BASE_GS, HEADER_LEN, MAX_BREAKPOINTS, MAX_CAPTURES,
    MAX_CAPTURE_STRING, MAX_CAPTURE_STRINGS, MAX_DEREFS, MAX_ERROR_TEXT, MAX_FDS_PER_FRAME, MAX_PAYLOAD, MAX_RANGES,
    MAX_VCPUS, MAX_WRITE_TRAP_RANGES, MEMORY_WRITE_MAX_LEN, MSR_WRITE_STACK_WORDS,
};

pub(super) mod kind {
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
    pub const DIRTY_SYNC: u16 = 15;
    pub const DIRTY_SYNCED: u16 = 27;
    pub const TRACE_SUBSCRIBE: u16 = 16;
    pub const TRACE_SUBSCRIBED: u16 = 17;
    pub const TRACE_MSR_WRITE: u16 = 28;
    pub const TRACE_DROPPED: u16 = 29;
    pub const TRACE_BREAKPOINTS: u16 = 18;
    pub const TRACE_BREAKPOINTS_SET: u16 = 19;
    pub const TRACE_BREAKPOINT_HIT: u16 = 31;
    pub const TRACE_WRITE_TRAPS: u16 = 32;
    pub const TRACE_WRITE_TRAPS_SET: u16 = 33;
    pub const TRACE_MEMORY_WRITE: u16 = 34;
    pub const ERROR: u16 = 30;
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

/// A counted array of at most `limit` ranges.
fn read_ranges(r: &mut Reader, limit: usize) -> Result<Vec<Range>, DecodeError> {
    let n = r.count(limit, 16)?;
    (0..n).map(|_| Ok(Range { gpa: r.u64()?, len: r.u64()? })).collect()
}

/// The writer's stack words of a traced write.
fn read_stack(r: &mut Reader) -> Result<[u64; MSR_WRITE_STACK_WORDS], DecodeError> {
    let mut stack = [0; MSR_WRITE_STACK_WORDS];
    for word in stack.iter_mut() {
        *word = r.u64()?;
    }
    Ok(stack)
}

fn read_breakpoint(r: &mut Reader) -> Result<Breakpoint, DecodeError> {
    let address = r.u64()?;
    let n = r.count(MAX_CAPTURES, 24)?;
    let captures = (0..n)
        .map(|_| {
            let base = r.u32()?;
            let derefs = (0..r.count(MAX_DEREFS, 8)?).map(|_| Ok(r.u64()? as i64)).collect::<Result<_, _>>()?;
            let offset = r.u64()? as i64;
            let kind = CaptureKind::from_u32(r.u32()?).ok_or(DecodeError::Malformed { kind: r.kind })?;
            let max_len = r.u32()?;
            if base > CAPTURE_BASE_GS || max_len > MAX_CAPTURE_STRING {
                return Err(DecodeError::Malformed { kind: r.kind });
            }
            Ok(Capture { base, derefs, offset, kind, max_len })
        })
        .collect::<Result<_, _>>()?;
    Ok(Breakpoint { address, captures })
}

fn write_bytes(w: &mut Writer, bytes: &[u8]) {
    w.u32(bytes.len() as u32);
    w.0.extend_from_slice(bytes);
}

fn read_bytes(r: &mut Reader) -> Result<Vec<u8>, DecodeError> {
    let n = r.count(MAX_CAPTURE_STRING as usize, 1)?;
    Ok(r.take(n)?.to_vec())
}

fn write_captured(w: &mut Writer, v: &Captured) {
    match v {
        Captured::Missing => w.u32(0),
        Captured::Number(n) => {
            w.u32(1);
            w.u64(*n);
        }
        Captured::Bytes(b) => {
            w.u32(2);
            write_bytes(w, b);
        }
        Captured::Strings(list) => {
            w.u32(3);
            w.u32(list.len() as u32);
            for b in list {
                write_bytes(w, b);
            }
        }
    }
}

fn read_captured(r: &mut Reader) -> Result<Captured, DecodeError> {
    Ok(match r.u32()? {
        0 => Captured::Missing,
        1 => Captured::Number(r.u64()?),
        2 => Captured::Bytes(read_bytes(r)?),
        3 => {
            let n = r.count(MAX_CAPTURE_STRINGS, 4)?;
            Captured::Strings((0..n).map(|_| read_bytes(r)).collect::<Result<_, _>>()?)
        }
        _ => return Err(DecodeError::Malformed { kind: r.kind }),
    })
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
            Message::DirtySync { token } => {
                w.u64(*token);
                kind::DIRTY_SYNC
            }
            Message::DirtySynced { token } => {
                w.u64(*token);
                kind::DIRTY_SYNCED
            }
            Message::TraceSubscribe { kinds } => {
                w.u32(*kinds);
                kind::TRACE_SUBSCRIBE
            }
            Message::TraceSubscribed { kinds, max_per_second } => {
                w.u32(*kinds);
                w.u32(*max_per_second);
                kind::TRACE_SUBSCRIBED
            }
            Message::TraceMsrWrite(m) => {
                w.u32(m.vcpu);
                w.u32(m.msr);
                for v in [m.value, m.previous, m.rip, m.cr3].iter().chain(&m.stack) {
                    w.u64(*v);
                }
                w.u32(u32::from(m.applied));
                kind::TRACE_MSR_WRITE
            }
            Message::TraceDropped { count } => {
                w.u64(*count);
                kind::TRACE_DROPPED
            }
            Message::TraceBreakpoints { software, points } => {
                w.u32(u32::from(*software));
                w.u32(points.len() as u32);
                for p in points {
                    w.u64(p.address);
                    w.u32(p.captures.len() as u32);
                    for c in &p.captures {
                        w.u32(c.base);
                        w.u32(c.derefs.len() as u32);
                        for d in &c.derefs {
                            w.u64(*d as u64);
                        }
                        w.u64(c.offset as u64);
                        w.u32(c.kind as u32);
                        w.u32(c.max_len);
                    }
                }
                kind::TRACE_BREAKPOINTS
            }
            Message::TraceBreakpointsSet { count } => {
                w.u32(*count);
                kind::TRACE_BREAKPOINTS_SET
            }
            Message::TraceBreakpointHit(hit) => {
                w.u32(hit.vcpu);
                w.u32(hit.index);
                w.u64(hit.rip);
                w.u64(hit.cr3);
                w.u32(hit.values.len() as u32);
                for v in &hit.values {
                    write_captured(&mut w, v);
                }
                kind::TRACE_BREAKPOINT_HIT
            }
            Message::TraceWriteTraps { ranges } => {
                write_ranges(&mut w, ranges);
                kind::TRACE_WRITE_TRAPS
            }
            Message::TraceWriteTrapsSet { pages } => {
                w.u64(*pages);
                kind::TRACE_WRITE_TRAPS_SET
            }
            Message::TraceMemoryWrite(m) => {
                w.u32(m.vcpu);
                w.u64(m.gpa);
                w.u32(m.len);
                for v in [m.value, m.previous, m.rip, m.cr3].iter().chain(&m.stack) {
                    w.u64(*v);
                }
                kind::TRACE_MEMORY_WRITE
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
            kind::MEMORY_MAP => Message::MemoryMap { regions: read_ranges(&mut r, MAX_RANGES)? },
            kind::GRANT_REQUEST => Message::GrantRequest { access: r.u32()?, ranges: read_ranges(&mut r, MAX_RANGES)? },
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
                Message::DirtyPages { coalesced, ranges: read_ranges(&mut r, MAX_RANGES)? }
            }
            kind::DIRTY_SYNC => Message::DirtySync { token: r.u64()? },
            kind::DIRTY_SYNCED => Message::DirtySynced { token: r.u64()? },
            kind::TRACE_SUBSCRIBE => Message::TraceSubscribe { kinds: r.u32()? },
            kind::TRACE_SUBSCRIBED => Message::TraceSubscribed { kinds: r.u32()?, max_per_second: r.u32()? },
            kind::TRACE_MSR_WRITE => {
                let (vcpu, msr) = (r.u32()?, r.u32()?);
                let (value, previous, rip, cr3) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let stack = read_stack(&mut r)?;
                let applied = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed { kind }),
                };
                Message::TraceMsrWrite(MsrWrite { vcpu, msr, value, previous, rip, cr3, stack, applied })
            }
            kind::TRACE_DROPPED => Message::TraceDropped { count: r.u64()? },
            kind::TRACE_BREAKPOINTS => {
                let software = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed { kind }),
                };
                let n = r.count(MAX_BREAKPOINTS, 12)?;
                let points = (0..n).map(|_| read_breakpoint(&mut r)).collect::<Result<_, _>>()?;
                Message::TraceBreakpoints { software, points }
            }
            kind::TRACE_BREAKPOINTS_SET => Message::TraceBreakpointsSet { count: r.u32()? },
            kind::TRACE_BREAKPOINT_HIT => {
                let (vcpu, index, rip, cr3) = (r.u32()?, r.u32()?, r.u64()?, r.u64()?);
                let n = r.count(MAX_CAPTURES, 4)?;
                let values = (0..n).map(|_| read_captured(&mut r)).collect::<Result<_, _>>()?;
                Message::TraceBreakpointHit(BreakpointHit { vcpu, index, rip, cr3, values })
            }
            kind::TRACE_WRITE_TRAPS => Message::TraceWriteTraps { ranges: read_ranges(&mut r, MAX_WRITE_TRAP_RANGES)? },
            kind::TRACE_WRITE_TRAPS_SET => Message::TraceWriteTrapsSet { pages: r.u64()? },
            kind::TRACE_MEMORY_WRITE => {
                let (vcpu, gpa, len) = (r.u32()?, r.u64()?, r.u32()?);
                if len == 0 || len > MEMORY_WRITE_MAX_LEN {
                    return Err(DecodeError::Malformed { kind });
                }
                let (value, previous, rip, cr3) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let stack = read_stack(&mut r)?;
                Message::TraceMemoryWrite(MemoryWrite { vcpu, gpa, len, value, previous, rip, cr3, stack })
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
