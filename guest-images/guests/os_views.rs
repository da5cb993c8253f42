//! The agent's OS views: `specula-os` over the mirror window, limited to the ranges
//! the inspector says are granted, with the results encoded for the host.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ops::Range;

use specula_os::wire::{self, Writer};
use specula_os::{Error, Linux, PhysMem};

use crate::agent::*;

/// The source's RAM as the agent may read it: the window, where granted.
pub struct WindowMem {
    base: u64,
    len: u64,
    /// Granted (gpa, len) ranges, sorted; replaced by every OS command.
    granted: UnsafeCell<Vec<(u64, u64)>>,
}

// SAFETY: one vCPU runs the agent; nothing else touches `granted`.
unsafe impl Sync for WindowMem {}

impl PhysMem for WindowMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
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
}

impl OsState {
    pub const fn new() -> Self {
        OsState { mem: None, linux: None }
    }
}

/// Reads the granted ranges at the start of the data area.
fn granted(input: &[u8]) -> Result<Vec<(u64, u64)>, u32> {
    let count = u32::from_le_bytes(input.get(..4).ok_or(STATUS_BAD_ARGS)?.try_into().unwrap()) as usize;
    if count > MAX_OS_RANGES {
        return Err(STATUS_BAD_ARGS);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * 16;
        let field = |o: usize| input.get(at + o..at + o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let (gpa, len) = (field(0).ok_or(STATUS_BAD_ARGS)?, field(8).ok_or(STATUS_BAD_ARGS)?);
        out.push((gpa, len));
    }
    out.sort_unstable();
    Ok(out)
}

/// The `(vCPU, LSTAR)` list after `ranges` granted ranges: a u32 count, then a u32
/// index and a u64 value each; at most [`MAX_OS_VCPUS`].
fn lstars(input: &[u8], ranges: usize) -> Result<Vec<(u32, u64)>, u32> {
    let at = 4 + ranges * 16;
    let count = u32::from_le_bytes(input.get(at..at + 4).ok_or(STATUS_BAD_ARGS)?.try_into().unwrap()) as usize;
    if count > MAX_OS_VCPUS {
        return Err(STATUS_BAD_ARGS);
    }
    (0..count)
        .map(|i| {
            let e = at + 4 + i * 12;
            let cpu = input.get(e..e + 4).ok_or(STATUS_BAD_ARGS)?;
            let lstar = input.get(e + 4..e + 12).ok_or(STATUS_BAD_ARGS)?;
            Ok((u32::from_le_bytes(cpu.try_into().unwrap()), u64::from_le_bytes(lstar.try_into().unwrap())))
        })
        .collect()
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
pub fn execute(state: &mut OsState, window_base: u64, window_len: u64, op: u32, args: [u64; 4], data: &mut [u8]) -> Result<[u64; 4], u32> {
    let ranges = granted(data)?;
    // OP_OS_CHECKS with args[1] = 1: the vCPUs' LSTAR values follow the ranges.
    let lstars = if op == OP_OS_CHECKS && args[1] == 1 { Some(lstars(data, ranges.len())?) } else { None };
    let mem: &'static WindowMem = *state.mem.get_or_insert_with(|| {
        Box::leak(Box::new(WindowMem { base: window_base, len: window_len, granted: UnsafeCell::new(Vec::new()) }))
    });
    // SAFETY: single-threaded; no borrow of `granted` is alive between commands.
    unsafe { *mem.granted.get() = ranges };
    if op == OP_OS_DISCOVER {
        state.linux = None;
        match Linux::discover(mem) {
            Ok(linux) => state.linux = Some(linux),
            Err(e) => return Err(fail(data, &e)),
        }
    }
    let Some(linux) = state.linux.as_ref() else { return Err(STATUS_NOT_DISCOVERED) };
    // The reply is encoded straight into the data area (the granted ranges in it were
    // read above): no staging buffer to clear and copy per command.
    let room = data.len();
    let outcome: Result<usize, Error> = (|| {
        let mut w = Writer::new(&mut *data);
        match op {
            OP_OS_DISCOVER | OP_OS_KERNEL => wire::encode_kernel(&linux.kernel_info()?, &mut w),
            OP_OS_PROCESSES => wire::encode_processes(&linux.processes()?, &mut w),
            OP_OS_MODULES => wire::encode_modules(&linux.modules()?, &mut w),
            OP_OS_SYSCALLS => wire::encode_syscalls(&linux.syscall_table_check()?, &mut w),
            OP_OS_CHECKS => wire::encode_checks(&linux.rootkit_checks_with(args[0], lstars.as_deref()), &mut w),
            OP_OS_SYMBOLS => {
                // Names average ~25 bytes (at most 512): a page that fits the data area unless
                // names are unusually long, which ends in STATUS_TOO_BIG.
                let fit = (room / 256).max(1) as u64;
                wire::encode_symbols(linux.kallsyms(), args[0] as usize, args[1].min(fit) as usize, &mut w)
            }
            OP_OS_VMAS => {
                let ps = linux.processes()?;
                let p = ps.iter().find(|p| p.pid as u64 == args[0]).ok_or(Error::Corrupt(alloc::format!("no process {}", args[0])))?;
                wire::encode_vmas(&linux.vmas(p)?, &mut w)
            }
            OP_OS_READ_VIRTUAL => {
                let (pid, va, len) = (args[0], args[1], args[2]);
                if len > room as u64 {
                    return Err(Error::TooLarge { what: "virtual read", value: len, max: room as u64 });
                }
                drop(w);
                let bytes = &mut data[..len as usize];
                if pid == 0 {
                    specula_os::VirtMem::read_virt(linux.kernel(), va, bytes)?;
                } else {
                    let ps = linux.processes()?;
                    let p = ps.iter().find(|p| p.pid as u64 == pid).ok_or(Error::Corrupt(alloc::format!("no process {pid}")))?;
                    linux.read_process(p, va, bytes)?;
                }
                return Ok(len as usize);
            }
            _ => return Err(Error::Corrupt(alloc::format!("unknown OS op {op}"))),
        }
        w.finish().ok_or(Error::TooLarge { what: "reply", value: room as u64 + 1, max: room as u64 })
    })();
    match outcome {
        Ok(len) => Ok([len as u64, 0, 0, 0]),
        Err(Error::TooLarge { what: "reply", .. }) => Err(STATUS_TOO_BIG),
        Err(e) => Err(fail(data, &e)),
    }
}
