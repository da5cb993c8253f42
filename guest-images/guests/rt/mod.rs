//! Ring-3 runtime for Specula guests: entry from the CPL0 stub, serial output,
//! exit through the debug-exit port, boot information (PVH start info, command
//! line, memory map, MP table), and the C memory functions rustc expects.

#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

#[path = "../../src/abi.rs"]
pub mod abi;

global_asm!(include_str!("boot.S"), options(att_syntax));

/// Writes one byte to an I/O port (ring 3 may, because IOPL=3).
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; IOPL=3 permits it in ring 3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads the time-stamp counter (allowed in ring 3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads a counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Serializes concurrent writers on COM1 so lines from different vCPUs do not interleave.
static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

/// COM1 output.
pub struct Serial;

impl Serial {
    /// Writes raw bytes to COM1.
    pub fn write_bytes(bytes: &[u8]) {
        while SERIAL_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        for &b in bytes {
            if b == b'\n' {
                outb(abi::COM1_PORT, b'\r');
            }
            outb(abi::COM1_PORT, b);
        }
        SERIAL_LOCK.store(false, Ordering::Release);
    }

    /// Returns the next received byte, if the UART has one.
    pub fn try_read() -> Option<u8> {
        const LSR_DATA_READY: u8 = 1;
        if inb(abi::COM1_PORT + 5) & LSR_DATA_READY != 0 {
            Some(inb(abi::COM1_PORT))
        } else {
            None
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Serial::write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats a line to COM1 in one locked write.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::rt::LineBuf::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.push(b'\n');
        $crate::rt::Serial::write_bytes(line.as_bytes());
    }};
}

/// A fixed line buffer so a formatted line reaches the UART in one locked write.
pub struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }
    pub fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            self.push(b);
        }
        Ok(())
    }
}

/// Ends the VM with `status` (the `vmm` exits with it).
pub fn exit(status: u8) -> ! {
    outb(abi::DEBUG_EXIT_PORT, status);
    loop {
        core::hint::spin_loop();
    }
}

/// Parks the calling vCPU for the rest of the VM's life.
pub fn park() -> ! {
    outb(abi::PARK_PORT, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// One entry of the PVH memory map (`hvm_memmap_table_entry`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// What the guest learns at boot.
pub struct BootInfo {
    pub cmdline: &'static str,
    pub memmap: &'static [MemMapEntry],
    pub cpu_count: u32,
    /// The loader built the identity page tables (Specula note 2), not the boot stub.
    pub tables_by_loader: bool,
}

unsafe extern "C" {
    /// Set to 1 by a loader that built the page tables (boot.S).
    static boot_host_tables: u32;
}

const MAX_CMDLINE: usize = 4096;
const MAX_MEMMAP_ENTRIES: usize = 128;
const E820_RAM: u32 = 1;

impl BootInfo {
    /// Reads the PVH start info at `addr` (identity-mapped).
    ///
    /// # Safety
    /// `addr` must be the start-info address the loader handed to the entry point.
    unsafe fn from_start_info(addr: u64) -> Self {
        let p = addr as *const u8;
        // SAFETY: the flag is a u32 in this image's data, written by the loader before boot
        // and by nothing after.
        let tables_by_loader = unsafe { core::ptr::read_volatile(&raw const boot_host_tables) } != 0;
        // SAFETY: the loader put a hvm_start_info here; fields are read unaligned-safe.
        unsafe {
            let magic = core::ptr::read_unaligned(p as *const u32);
            if magic != abi::HVM_START_MAGIC {
                panic!("bad PVH start info magic {magic:#x}");
            }
            let cmdline_paddr = core::ptr::read_unaligned(p.add(24) as *const u64);
            let memmap_paddr = core::ptr::read_unaligned(p.add(40) as *const u64);
            let memmap_entries = core::ptr::read_unaligned(p.add(48) as *const u32) as usize;
            let cmdline = if cmdline_paddr == 0 { "" } else { c_str(cmdline_paddr as *const u8, MAX_CMDLINE) };
            let memmap = if memmap_paddr == 0 {
                &[][..]
            } else {
                core::slice::from_raw_parts(
                    memmap_paddr as *const MemMapEntry,
                    memmap_entries.min(MAX_MEMMAP_ENTRIES),
                )
            };
            Self { cmdline, memmap, cpu_count: mp_table_cpu_count().unwrap_or(1), tables_by_loader }
        }
    }

    /// Value of `key=value` on the command line.
    pub fn cmdline_value(&self, key: &str) -> Option<&'static str> {
        self.cmdline.split(' ').find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Bytes of usable RAM the memory map reports.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum()
    }

    /// End of the highest usable RAM range.
    pub fn ram_end(&self) -> u64 {
        self.memmap.iter().filter(|e| e.kind == E820_RAM).map(|e| e.addr + e.size).max().unwrap_or(0)
    }
}

/// Reads a NUL-terminated ASCII string of at most `max` bytes.
///
/// # Safety
/// `p` must point to readable memory up to the NUL or `max` bytes.
unsafe fn c_str(p: *const u8, max: usize) -> &'static str {
    let mut len = 0;
    // SAFETY: bounded by `max`, within memory the caller vouches for.
    while len < max && unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes were just read.
    let bytes = unsafe { core::slice::from_raw_parts(p, len) };
    core::str::from_utf8(bytes).unwrap_or("<non-utf8 cmdline>")
}

/// Counts enabled processors in the Intel MP table, as Linux does when it has no ACPI.
fn mp_table_cpu_count() -> Option<u32> {
    const START: usize = 0xf0000;
    const END: usize = 0x100000;
    let mut addr = START;
    while addr < END {
        // SAFETY: the BIOS area below 1 MiB is identity-mapped and always readable.
        let sig = unsafe { core::ptr::read_volatile(addr as *const [u8; 4]) };
        if &sig == b"_MP_" {
            // SAFETY: a 16-byte floating pointer structure starts here.
            let table = unsafe { core::ptr::read_unaligned((addr + 4) as *const u32) } as usize;
            return count_processors(table);
        }
        addr += 16;
    }
    None
}

fn count_processors(table: usize) -> Option<u32> {
    if table == 0 || table >= 0x100000 {
        return None;
    }
    // SAFETY: the MP config table lies below 1 MiB (checked above), identity-mapped.
    let header = unsafe { core::slice::from_raw_parts(table as *const u8, 44) };
    if &header[..4] != b"PCMP" {
        return None;
    }
    let base_len = u16::from_le_bytes([header[4], header[5]]) as usize;
    let entry_count = u16::from_le_bytes([header[34], header[35]]) as usize;
    let end = table + base_len.min(0x10000);
    let mut p = table + 44;
    let mut cpus = 0;
    for _ in 0..entry_count {
        if p >= end {
            break;
        }
        // SAFETY: p stays inside the table's stated base length.
        let kind = unsafe { *(p as *const u8) };
        if kind == 0 {
            // SAFETY: a processor entry is 20 bytes; its flags are at offset 3.
            let flags = unsafe { *((p + 3) as *const u8) };
            if flags & 1 != 0 {
                cpus += 1;
            }
            p += 20;
        } else {
            p += 8;
        }
    }
    (cpus > 0).then_some(cpus)
}

/// Ring-3 entry, reached by `iretq` from the CPL0 stub.
#[no_mangle]
extern "C" fn specula_ring3_entry(start_info: u64, cpu: u64) -> ! {
    // SAFETY: the stub passes the start-info pointer it received from the loader.
    let info = unsafe { BootInfo::from_start_info(start_info) };
    if cpu == 0 {
        let status = crate::main(&info);
        exit(status)
    } else {
        crate::ap_main(&info, cpu as u32)
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {}", info);
    exit(101)
}

// rustc lowers copies and fills to these C functions; there is no libc, so the
// runtime provides them. `rep movsb`/`rep stosb` are fast for long runs but pay a
// start-up cost of tens of cycles; most copies are short (an OS view reads guest
// structures 8 bytes at a time, tens of thousands of times per request), so up to
// 16 bytes are moved with two possibly overlapping loads and stores instead.
// No loops here: LLVM could turn a copy loop back into a call to memcpy.

/// Copies `n` ≤ 16 bytes with two overlapping unaligned accesses of the widest size
/// that fits (the first and the last `w` bytes).
///
/// # Safety
/// `dst` and `src` are valid for `n` bytes; the ranges may overlap only if every load
/// happens before every store, which this function ensures.
#[inline(always)]
unsafe fn copy_short(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY (all blocks below): each access lies within the first or last `w` bytes
    // of ranges the caller guarantees are `n` ≥ `w` bytes long.
    unsafe {
        if n >= 8 {
            let (a, b) = ((src as *const u64).read_unaligned(), (src.add(n - 8) as *const u64).read_unaligned());
            (dst as *mut u64).write_unaligned(a);
            (dst.add(n - 8) as *mut u64).write_unaligned(b);
        } else if n >= 4 {
            let (a, b) = ((src as *const u32).read_unaligned(), (src.add(n - 4) as *const u32).read_unaligned());
            (dst as *mut u32).write_unaligned(a);
            (dst.add(n - 4) as *mut u32).write_unaligned(b);
        } else if n >= 2 {
            let (a, b) = ((src as *const u16).read_unaligned(), (src.add(n - 2) as *const u16).read_unaligned());
            (dst as *mut u16).write_unaligned(a);
            (dst.add(n - 2) as *mut u16).write_unaligned(b);
        } else if n == 1 {
            *dst = *src;
        }
    }
}

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n <= 16 {
        // SAFETY: the caller guarantees valid ranges of n bytes.
        unsafe { copy_short(dst, src, n) };
        return dst;
    }
    // SAFETY: the caller guarantees non-overlapping valid ranges of n bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n <= 16 {
        // SAFETY: valid ranges of n bytes; copy_short loads everything before it stores.
        unsafe { copy_short(dst, src, n) };
        return dst;
    }
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards with the direction flag, restored before returning.
    unsafe {
        asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    if n <= 16 {
        let splat = u64::from(value as u8) * 0x0101_0101_0101_0101;
        // SAFETY: as in copy_short, every store lies within the first or last bytes of
        // the n-byte range the caller guarantees.
        unsafe {
            if n >= 8 {
                (dst as *mut u64).write_unaligned(splat);
                (dst.add(n - 8) as *mut u64).write_unaligned(splat);
            } else if n >= 4 {
                (dst as *mut u32).write_unaligned(splat as u32);
                (dst.add(n - 4) as *mut u32).write_unaligned(splat as u32);
            } else if n >= 2 {
                (dst as *mut u16).write_unaligned(splat as u16);
                (dst.add(n - 2) as *mut u16).write_unaligned(splat as u16);
            } else if n == 1 {
                *dst = value as u8;
            }
        }
        return dst;
    }
    // SAFETY: the caller guarantees dst is valid for n bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt `core` references an unwinding personality routine even under
/// `panic=abort`; it is never called because nothing unwinds.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
