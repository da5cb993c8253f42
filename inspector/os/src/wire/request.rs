//! The host's requests to the agent's OS views.
//!
//! An OS command travels in a ring slot (see the agent ABI, `guest-images/src/agent.rs`):
//! its `op`, four `args`, and a data area that holds, in order, the granted ranges
//! ([`encode_granted`]: the only guest memory the agent may read for it) and the
//! request's own input (the third part of [`OsRequest::encode`]). `args[3]` belongs to
//! the envelope, not to the request: the host sets it to ask for the pages a view's
//! walk read (the ABI's `LIST_PAGES_READ`); [`OsRequest::encode`] leaves it 0 and
//! [`OsRequest::decode`] ignores it.
//!
//! The agent's data area is not length-delimited (the host writes a prefix of it), so
//! a decoder reads exactly what counts and arguments announce and ignores the rest.

use alloc::vec::Vec;

use super::Reader;
use crate::anchors::CpuState;
use crate::checks::select;
use crate::Error;

/// The OS operations, by number: a ring slot's `op` (the agent ABI's `OP_OS_*`, which
/// the agent checks at compile time against these).
pub mod op {
    /// [`OsRequest::Discover`](super::OsRequest::Discover).
    pub const DISCOVER: u32 = 8;
    /// [`OsRequest::Kernel`](super::OsRequest::Kernel).
    pub const KERNEL: u32 = 9;
    /// [`OsRequest::Processes`](super::OsRequest::Processes).
    pub const PROCESSES: u32 = 10;
    /// [`OsRequest::Modules`](super::OsRequest::Modules).
    pub const MODULES: u32 = 11;
    /// [`OsRequest::Vmas`](super::OsRequest::Vmas).
    pub const VMAS: u32 = 12;
    /// [`OsRequest::ReadVirtual`](super::OsRequest::ReadVirtual).
    pub const READ_VIRTUAL: u32 = 13;
    /// [`OsRequest::Syscalls`](super::OsRequest::Syscalls).
    pub const SYSCALLS: u32 = 14;
    /// [`OsRequest::Checks`](super::OsRequest::Checks).
    pub const CHECKS: u32 = 15;
    /// [`OsRequest::Symbols`](super::OsRequest::Symbols).
    pub const SYMBOLS: u32 = 16;
    /// [`OsRequest::Validate`](super::OsRequest::Validate) (17 is a watch operation).
    pub const VALIDATE: u32 = 18;
}

/// Most granted ranges one OS command carries (the agent ABI's `MAX_OS_RANGES`).
pub const MAX_GRANTED_RANGES: usize = 4096;
/// Most vCPUs whose LSTAR one [`OsRequest::Checks`] carries (the ABI's `MAX_OS_VCPUS`).
pub const MAX_LSTARS: usize = 1024;
/// Most read-set records one [`OsRequest::Validate`] carries: more than fit in the
/// agent's data area, so the bound that matters there is the area itself; this one
/// bounds what a decoder allocates for any input.
pub const MAX_READ_RECORDS: usize = 1 << 16;
/// Bytes of one encoded [`ReadRecord`] (the ABI's `READ_RECORD`).
pub const READ_RECORD_BYTES: usize = 24;

/// A granted range of source RAM: its guest-physical start and its length.
pub type GrantedRange = (u64, u64);

/// What a view's walk read on one source page, as the agent lists it with a view and
/// the host hands it back to learn whether the page still holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    /// Guest-physical address of the page (page-aligned).
    pub page: u64,
    /// Bit `i` set: the walk read bytes of the page's 64-byte line `i`.
    pub lines: u64,
    /// Keyed hash of those lines' contents, as the walk read them.
    pub digest: u64,
}

/// A request to the agent's OS views: one variant per OS operation, with its
/// arguments by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OsRequest {
    /// Find the kernel (again), anchored to the vCPUs' state, and describe it; replied
    /// with `encode_kernel`.
    Discover {
        /// Each vCPU's state, as the source reported it (none: the view says it is not
        /// anchored); at most [`crate::anchors::MAX_ANCHOR_CPUS`].
        cpus: Vec<CpuState>,
    },
    /// Describe the kernel found; `encode_kernel`.
    Kernel,
    /// The process list; `encode_processes`.
    Processes,
    /// The module list; `encode_modules`.
    Modules,
    /// The memory areas of process `pid`; `encode_vmas`.
    Vmas {
        /// The process.
        pid: u32,
    },
    /// `len` bytes of virtual memory at `va`, replied as they are.
    ReadVirtual {
        /// The process whose memory is read; 0 for the kernel's.
        pid: u32,
        /// Where.
        va: u64,
        /// How many bytes (the agent refuses more than its reply area holds).
        len: u64,
    },
    /// The system call table check; `encode_syscalls`.
    Syscalls,
    /// The rootkit checks; `encode_checks`.
    Checks {
        /// Which checks (bits of [`crate::checks::select`]).
        which: u64,
        /// Each vCPU's `(index, LSTAR)`, where the host read them (the `msrs` check
        /// needs them); at most [`MAX_LSTARS`].
        lstars: Option<Vec<(u32, u64)>>,
    },
    /// Kallsyms entries `start..start + max` (as many as fit the reply) and the total;
    /// `encode_symbols`.
    Symbols {
        /// The first symbol.
        start: u64,
        /// Most symbols wanted.
        max: u64,
    },
    /// Re-hashes the lines `records` name; replied in `result[0]`: how many of them,
    /// from the first, still hold what their digests say.
    Validate {
        /// What earlier walks read; at most [`MAX_READ_RECORDS`].
        records: Vec<ReadRecord>,
    },
}

impl OsRequest {
    /// The ring slot's `op` for this request (one of [`op`]).
    pub fn op(&self) -> u32 {
        match self {
            OsRequest::Discover { .. } => op::DISCOVER,
            OsRequest::Kernel => op::KERNEL,
            OsRequest::Processes => op::PROCESSES,
            OsRequest::Modules => op::MODULES,
            OsRequest::Vmas { .. } => op::VMAS,
            OsRequest::ReadVirtual { .. } => op::READ_VIRTUAL,
            OsRequest::Syscalls => op::SYSCALLS,
            OsRequest::Checks { .. } => op::CHECKS,
            OsRequest::Symbols { .. } => op::SYMBOLS,
            OsRequest::Validate { .. } => op::VALIDATE,
        }
    }

    /// The slot's `op` and `args`, and the input that follows the granted ranges in its
    /// data area. Arguments a request does not use are 0, and so is `args[3]` (the
    /// envelope's read-set flag, which the host sets itself).
    ///
    /// `Checks`: `args = [which, 1 if lstars, 0, 0]`, input (with lstars) a `u32` count,
    /// then a `u32` vCPU index and a `u64` LSTAR each. `Validate`: `args = [count, 0, 0,
    /// 0]`, input `count` records of `page`, `lines`, `digest` (`u64`s). `Vmas`: `[pid,
    /// 0, 0, 0]`; `ReadVirtual`: `[pid, va, len, 0]`; `Symbols`: `[start, max, 0, 0]`.
    pub fn encode(&self) -> (u32, [u64; 4], Vec<u8>) {
        let mut input = Vec::new();
        let args = match self {
            OsRequest::Discover { cpus } => {
                input.reserve(cpus.len() * CPU_STATE_BYTES);
                for c in cpus {
                    input.extend_from_slice(&c.cpu.to_le_bytes());
                    for word in [c.cr3, c.lstar, c.gs_base, c.kernel_gs_base] {
                        input.extend_from_slice(&word.to_le_bytes());
                    }
                }
                [cpus.len() as u64, 0, 0, 0]
            }
            OsRequest::Kernel | OsRequest::Processes | OsRequest::Modules | OsRequest::Syscalls => [0; 4],
            OsRequest::Vmas { pid } => [u64::from(*pid), 0, 0, 0],
            OsRequest::ReadVirtual { pid, va, len } => [u64::from(*pid), *va, *len, 0],
            OsRequest::Checks { which, lstars } => {
                if let Some(lstars) = lstars {
                    input.reserve(4 + lstars.len() * 12);
                    input.extend_from_slice(&(lstars.len() as u32).to_le_bytes());
                    for (cpu, lstar) in lstars {
                        input.extend_from_slice(&cpu.to_le_bytes());
                        input.extend_from_slice(&lstar.to_le_bytes());
                    }
                }
                [*which, u64::from(lstars.is_some()), 0, 0]
            }
            OsRequest::Symbols { start, max } => [*start, *max, 0, 0],
            OsRequest::Validate { records } => {
                input.reserve(records.len() * READ_RECORD_BYTES);
                for r in records {
                    for word in [r.page, r.lines, r.digest] {
                        input.extend_from_slice(&word.to_le_bytes());
                    }
                }
                [records.len() as u64, 0, 0, 0]
            }
        };
        (self.op(), args, input)
    }

    /// The request in a slot: its `op`, `args` and `input`, the data area after the
    /// granted ranges (bytes past what the request announces are ignored). Unknown
    /// operations, arguments out of range, unused arguments that are not 0, counts
    /// over their caps and input shorter than its counts are
    /// [`Error::BadRequest`]; `args[3]` is not looked at.
    pub fn decode(op: u32, args: [u64; 4], input: &[u8]) -> Result<OsRequest, Error> {
        let [a0, a1, a2, _] = args;
        // Arguments past the ones a request uses must be 0.
        let unused = |from: usize| {
            if args[from..3].iter().all(|&a| a == 0) {
                Ok(())
            } else {
                Err(Error::BadRequest("an argument the request does not use is not 0"))
            }
        };
        let pid = |a: u64| u32::try_from(a).map_err(|_| Error::BadRequest("pid does not fit 32 bits"));
        let request = match op {
            op::DISCOVER => OsRequest::Discover { cpus: decode_cpus(a0, input)? },
            op::KERNEL => OsRequest::Kernel,
            op::PROCESSES => OsRequest::Processes,
            op::MODULES => OsRequest::Modules,
            op::SYSCALLS => OsRequest::Syscalls,
            op::VMAS => OsRequest::Vmas { pid: pid(a0)? },
            op::READ_VIRTUAL => OsRequest::ReadVirtual { pid: pid(a0)?, va: a1, len: a2 },
            op::CHECKS => {
                if a0 & !select::ALL != 0 {
                    return Err(Error::BadRequest("checks: unknown check bits"));
                }
                let lstars = match a1 {
                    0 => None,
                    1 => Some(decode_lstars(input)?),
                    _ => return Err(Error::BadRequest("checks: args[1] is neither 0 nor 1")),
                };
                OsRequest::Checks { which: a0, lstars }
            }
            op::SYMBOLS => OsRequest::Symbols { start: a0, max: a1 },
            op::VALIDATE => OsRequest::Validate { records: decode_records(a0, input)? },
            _ => return Err(Error::BadRequest("unknown OS operation")),
        };
        let used = match request {
            OsRequest::Kernel | OsRequest::Processes | OsRequest::Modules | OsRequest::Syscalls => 0,
            OsRequest::Vmas { .. } | OsRequest::Validate { .. } | OsRequest::Discover { .. } => 1,
            OsRequest::Checks { .. } | OsRequest::Symbols { .. } => 2,
            OsRequest::ReadVirtual { .. } => 3,
        };
        unused(used)?;
        Ok(request)
    }
}

/// Bytes of one encoded [`CpuState`]: a `u32` index, then CR3, LSTAR, GS_BASE and
/// KERNEL_GS_BASE (`u64`s).
pub const CPU_STATE_BYTES: usize = 36;

/// `count` vCPU states (at most [`crate::anchors::MAX_ANCHOR_CPUS`]).
fn decode_cpus(count: u64, input: &[u8]) -> Result<Vec<CpuState>, Error> {
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= crate::anchors::MAX_ANCHOR_CPUS)
        .ok_or(Error::BadRequest("discover: too many vCPUs"))?;
    let mut r = Reader::request(input);
    (0..count)
        .map(|_| {
            Ok(CpuState { cpu: r.u32()?, cr3: r.u64()?, lstar: r.u64()?, gs_base: r.u64()?, kernel_gs_base: r.u64()? })
        })
        .collect()
}

/// A `u32` count, then a `u32` vCPU index and a `u64` LSTAR each.
fn decode_lstars(input: &[u8]) -> Result<Vec<(u32, u64)>, Error> {
    let mut r = Reader::request(input);
    let count = r.u32()? as usize;
    if count > MAX_LSTARS {
        return Err(Error::BadRequest("more vCPUs than MAX_LSTARS"));
    }
    (0..count).map(|_| Ok((r.u32()?, r.u64()?))).collect()
}

/// `count` records of three `u64`s.
fn decode_records(count: u64, input: &[u8]) -> Result<Vec<ReadRecord>, Error> {
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= MAX_READ_RECORDS)
        .ok_or(Error::BadRequest("more read-set records than MAX_READ_RECORDS"))?;
    // Checked before anything is allocated: the count comes from the other side.
    if input.len() / READ_RECORD_BYTES < count {
        return Err(Error::BadRequest("truncated"));
    }
    let mut r = Reader::request(input);
    (0..count).map(|_| Ok(ReadRecord { page: r.u64()?, lines: r.u64()?, digest: r.u64()? })).collect()
}

/// Appends the granted ranges as every OS command's data area starts: a `u32` count,
/// then a guest-physical start and a length (`u64`s) each. At most
/// [`MAX_GRANTED_RANGES`], or the agent refuses the command.
pub fn encode_granted(ranges: &[GrantedRange], out: &mut Vec<u8>) {
    out.reserve(4 + ranges.len() * 16);
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (gpa, len) in ranges {
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
}

/// The granted ranges at the start of an OS command's data area, in the order sent,
/// and the bytes after them (the request's input, for [`OsRequest::decode`]).
pub fn decode_granted(data: &[u8]) -> Result<(Vec<GrantedRange>, &[u8]), Error> {
    let mut r = Reader::request(data);
    let count = r.u32()? as usize;
    if count > MAX_GRANTED_RANGES {
        return Err(Error::BadRequest("more granted ranges than MAX_GRANTED_RANGES"));
    }
    let ranges = (0..count).map(|_| Ok((r.u64()?, r.u64()?))).collect::<Result<Vec<_>, Error>>()?;
    Ok((ranges, &data[r.at..]))
}
