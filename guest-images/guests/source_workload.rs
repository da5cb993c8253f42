//! `source-workload`: keeps writing recognizable, verifiable data into its RAM
//! (see `src/workload.rs` for the layout) so there is something real to inspect.
//!
//! Command line: `iterations=N` (0 or absent: run until stopped).
//! COM1 input, one command per line, each acknowledged with `workload: ack ...`:
//! - `poke GPA HEX`       write the bytes HEX at guest-physical address GPA
//! - `text-modify OFFSET` flip one byte of the kernel text (an integrity watch sees it)
//! - `text-restore`       rewrite the kernel text to its pristine bytes
//! - `text-flip OFFSET`   flip one byte of the kernel text and flip it back at once
//! - `reuse-pages N`      free N pool pages and reuse them with new contents
//! - `fill GPA LEN SEED`  fill a range (at or above 32 MiB) with data and planted needles
//! - `stamp N`            publish N (sequence, TSC) pairs at STAMP_GPA, ~20 us apart
//! - `churn GPA LEN RATE TSC_HZ` from now on write one word of a pseudo-random page of
//!   the range (at or above 32 MiB) RATE times a second (TSC_HZ: the TSC's frequency);
//!   RATE 0 stops
//! - `exit STATUS`        end the VM with STATUS
#![no_std]
#![no_main]

#[path = "rt/mod.rs"]
mod rt;
#[path = "../src/sha256.rs"]
mod sha256;
#[path = "../src/workload.rs"]
mod workload;

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use workload::*;

/// Page writes the `churn` command keeps up: (range start, pages, TSC cycles between
/// writes, next write's TSC, generator state). Pages 0 when off.
struct Churn {
    gpa: u64,
    pages: u64,
    cycles: u64,
    next: u64,
    state: u64,
}

static mut CHURN: Churn = Churn { gpa: 0, pages: 0, cycles: 0, next: 0, state: 0x9e37_79b9_7f4a_7c15 };

/// Iterations between churn deadline checks (each reads the TSC).
const CHURN_CHECK_INTERVAL: u64 = 256;

/// Writes every page write that is due (catching up after a pause, at most 1 s worth).
fn churn_tick() {
    // SAFETY: the main loop's vCPU is the only user of CHURN.
    let c = unsafe { &mut *core::ptr::addr_of_mut!(CHURN) };
    if c.pages == 0 {
        return;
    }
    let now = rt::rdtsc();
    let mut due = 0;
    while c.next <= now && due < 1_000_000 {
        c.state = c.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let page = (c.state >> 33) % c.pages;
        // SAFETY: the range was checked to be this guest's RAM above its code when set.
        unsafe { write_volatile((c.gpa + page * 4096 + (c.state & 0x1f8)) as *mut u64, c.state) };
        c.next += c.cycles;
        due += 1;
    }
}

/// Iterations between looks at COM1 input (each look is a VM exit).
const INPUT_POLL_INTERVAL: u64 = 1 << 14;
/// Iterations between heartbeat lines.
const HEARTBEAT_INTERVAL: u64 = 1 << 26;

static STATE: AtomicU32 = AtomicU32::new(STATE_BOOTING);

fn header() -> *mut Header {
    HEADER_GPA as *mut Header
}

fn task(i: usize) -> *mut TaskRecord {
    (TASK_TABLE_GPA as usize + i * TASK_RECORD_SIZE) as *mut TaskRecord
}

fn text() -> &'static mut [u8] {
    // SAFETY: TEXT_GPA..+TEXT_LEN is identity-mapped RAM owned by this guest (checked at start).
    unsafe { core::slice::from_raw_parts_mut(TEXT_GPA as *mut u8, TEXT_LEN) }
}

fn setup(info: &rt::BootInfo) {
    fill_text(text());
    let digest = sha256::digest(text());
    for i in 0..TASK_COUNT {
        let record = TaskRecord {
            magic: TASK_MAGIC,
            pid: task_pid(i),
            state: TASK_SLEEPING,
            cpu: 0,
            name: task_name(i),
            runtime: 0,
            next: 0,
            prev: 0,
            start_heartbeat: 0,
        };
        // SAFETY: the task table lies in RAM owned by this guest.
        unsafe { write_volatile(task(i), record) };
    }
    for n in 0..TASK_COUNT {
        let slot = link_order(n);
        let next = if n + 1 < TASK_COUNT { task(link_order(n + 1)) as u64 } else { 0 };
        let prev = if n > 0 { task(link_order(n - 1)) as u64 } else { 0 };
        // SAFETY: as above.
        unsafe {
            (*task(slot)).next = next;
            (*task(slot)).prev = prev;
        }
    }
    let h = Header {
        magic: HEADER_MAGIC,
        version: LAYOUT_VERSION,
        cpu_count: info.cpu_count,
        heartbeat: 0,
        task_list_head: task(link_order(0)) as u64,
        task_count: TASK_COUNT as u32,
        task_record_size: TASK_RECORD_SIZE as u32,
        text_gpa: TEXT_GPA,
        text_len: TEXT_LEN as u64,
        text_sha256: digest,
        cpu_counters_gpa: CPU_COUNTERS_GPA,
        state: STATE_RUNNING,
        commands_done: 0,
    };
    // SAFETY: the header page lies in RAM owned by this guest.
    unsafe { write_volatile(header(), h) };
}

fn text_digest_ok() -> bool {
    // SAFETY: the header was written by setup().
    let expected = unsafe { read_volatile(header()).text_sha256 };
    sha256::digest(text()) == expected
}

fn main(info: &rt::BootInfo) -> u8 {
    if info.ram_end() < MIN_RAM {
        println!("workload: needs at least {} MiB of RAM, has {} MiB", MIN_RAM >> 20, info.ram_end() >> 20);
        return 2;
    }
    let iterations: u64 = match info.cmdline_value("iterations").map(str::parse) {
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            println!("workload: bad iterations= value");
            return 2;
        }
        None => 0,
    };
    setup(info);
    STATE.store(STATE_RUNNING, Ordering::Release);
    {
        // SAFETY: written by setup().
        let h = unsafe { read_volatile(header()) };
        println!(
            "workload: ready header={:#x} tasks={} list_head={:#x} text={:#x}+{:#x} cpus={} tables={}",
            HEADER_GPA,
            TASK_COUNT,
            h.task_list_head,
            TEXT_GPA,
            TEXT_LEN,
            info.cpu_count,
            if info.tables_by_loader { "loader" } else { "stub" }
        );
        let hex = sha256::hex(&h.text_sha256);
        println!("workload: text sha256 {}", core::str::from_utf8(&hex).unwrap_or("?"));
    }

    let mut input = LineInput::new();
    let mut it: u64 = 0;
    let status = loop {
        if iterations != 0 && it >= iterations {
            break 0;
        }
        it += 1;
        // SAFETY: header and task table are this guest's RAM; volatile so every write lands.
        unsafe {
            write_volatile(&mut (*header()).heartbeat, it);
            let t = task((it as usize) % TASK_COUNT);
            write_volatile(&mut (*t).runtime, read_volatile(&(*t).runtime) + 1);
            write_volatile(&mut (*t).state, if it & 1 == 0 { TASK_RUNNING } else { TASK_SLEEPING });
        }
        if it % CHURN_CHECK_INTERVAL == 0 {
            churn_tick();
        }
        if it % INPUT_POLL_INTERVAL == 0 {
            if let Some(status) = input.poll(info) {
                break status;
            }
        }
        if it % HEARTBEAT_INTERVAL == 0 {
            println!("workload: heartbeat {}", it);
        }
    };
    STATE.store(STATE_DONE, Ordering::Release);
    // SAFETY: header is this guest's RAM.
    unsafe { write_volatile(&mut (*header()).state, STATE_DONE) };
    for cpu in 1..info.cpu_count {
        // SAFETY: per-CPU counters are this guest's RAM.
        let count = unsafe { read_volatile((CPU_COUNTERS_GPA + u64::from(cpu) * COUNTER_STRIDE) as *const u64) };
        println!("workload: cpu{} counted {}", cpu, count);
    }
    let digest_ok = text_digest_ok();
    println!("workload: done after {} iterations, text digest {}", it, if digest_ok { "ok" } else { "MODIFIED" });
    if status == 0 && !digest_ok { 1 } else { status }
}

fn ap_main(_info: &rt::BootInfo, cpu: u32) -> ! {
    while STATE.load(Ordering::Acquire) == STATE_BOOTING {
        core::hint::spin_loop();
    }
    let counter = (CPU_COUNTERS_GPA + u64::from(cpu) * COUNTER_STRIDE) as *mut u64;
    let mut n = 0u64;
    while STATE.load(Ordering::Relaxed) == STATE_RUNNING {
        n += 1;
        // SAFETY: this vCPU's counter slot, in this guest's RAM.
        unsafe { write_volatile(counter, n) };
    }
    rt::park()
}

/// Assembles COM1 input into command lines.
struct LineInput {
    line: [u8; 128],
    len: usize,
}

impl LineInput {
    fn new() -> Self {
        Self { line: [0; 128], len: 0 }
    }

    /// Drains the UART; runs each complete line. Returns a status when told to exit.
    fn poll(&mut self, info: &rt::BootInfo) -> Option<u8> {
        while let Some(b) = rt::Serial::try_read() {
            if b == b'\n' || b == b'\r' {
                if self.len > 0 {
                    let len = core::mem::replace(&mut self.len, 0);
                    let line = self.line;
                    if let Some(status) = run_command(&line[..len], info) {
                        return Some(status);
                    }
                }
            } else if self.len < self.line.len() {
                self.line[self.len] = b;
                self.len += 1;
            }
        }
        None
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

/// Runs one command line; returns a status for `exit`.
fn run_command(line: &[u8], info: &rt::BootInfo) -> Option<u8> {
    let Ok(line) = core::str::from_utf8(line) else {
        println!("workload: error non-utf8 command");
        return None;
    };
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let command = words.next().unwrap_or("");
    let result: Result<(), &str> = match command {
        "poke" => (|| {
            let gpa = words.next().and_then(parse_u64).ok_or("poke needs GPA HEX")?;
            let hex = words.next().ok_or("poke needs GPA HEX")?.as_bytes();
            if hex.len() % 2 != 0 || hex.len() > 64 {
                return Err("poke HEX must be 1 to 32 whole bytes");
            }
            let len = (hex.len() / 2) as u64;
            let in_ram = info.memmap.iter().any(|e| e.kind == 1 && gpa >= e.addr && gpa + len <= e.addr + e.size);
            if !in_ram || gpa < HEADER_GPA {
                return Err("poke GPA must lie in RAM at or above the workload header");
            }
            for (i, pair) in hex.chunks(2).enumerate() {
                let byte = hex_byte(pair).ok_or("poke HEX has a non-hex digit")?;
                // SAFETY: checked to lie in this guest's RAM, above its code and tables.
                unsafe { write_volatile((gpa + i as u64) as *mut u8, byte) };
            }
            Ok(())
        })(),
        "text-modify" => (|| {
            let offset = words.next().and_then(parse_u64).ok_or("text-modify needs OFFSET")? as usize;
            let text = text();
            let byte = text.get_mut(offset).ok_or("text-modify OFFSET is past the text")?;
            // SAFETY: a byte of this guest's text region.
            unsafe { write_volatile(byte, !read_volatile(byte)) };
            Ok(())
        })(),
        "text-flip" => (|| {
            let offset = words.next().and_then(parse_u64).ok_or("text-flip needs OFFSET")? as usize;
            let text = text();
            let byte = text.get_mut(offset).ok_or("text-flip OFFSET is past the text")?;
            // SAFETY: a byte of this guest's text region, flipped and flipped back at once:
            // a patch that is gone before anyone looks.
            unsafe {
                write_volatile(byte, !read_volatile(byte));
                write_volatile(byte, !read_volatile(byte));
            }
            Ok(())
        })(),
        "text-restore" => {
            fill_text(text());
            Ok(())
        }
        "reuse-pages" => (|| {
            let n = words.next().and_then(parse_u64).ok_or("reuse-pages needs N")? as usize;
            // SAFETY: reads the header written by setup().
            let generation = unsafe { read_volatile(&(*header()).commands_done) };
            for page in 0..n.min(POOL_PAGES) {
                let base = (POOL_GPA as usize + page * 4096) as *mut u64;
                for word in 0..512 {
                    // SAFETY: pool pages are this guest's RAM.
                    unsafe { write_volatile(base.add(word), (u64::from(generation) << 32) | (page as u64) << 16 | word as u64) };
                }
            }
            Ok(())
        })(),
        "fill" => (|| {
            let gpa = words.next().and_then(parse_u64).ok_or("fill needs GPA LEN SEED")?;
            let len = words.next().and_then(parse_u64).ok_or("fill needs GPA LEN SEED")?;
            let seed = words.next().and_then(parse_u64).ok_or("fill needs GPA LEN SEED")?;
            let in_ram = info.memmap.iter().any(|e| e.kind == 1 && gpa >= e.addr && gpa.saturating_add(len) <= e.addr + e.size);
            if !in_ram || gpa < FILL_MIN_GPA {
                return Err("fill range must lie in RAM at or above 32 MiB");
            }
            // SAFETY: checked to lie in this guest's RAM, clear of its code and structures.
            let buf = unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len as usize) };
            let needles = fill_with_needles(buf, gpa, seed);
            println!("workload: filled {:#x}+{:#x} with {} needles", gpa, len, needles);
            Ok(())
        })(),
        "stamp" => (|| {
            const SPACING_CYCLES: u64 = 50_000;
            let count = words.next().and_then(parse_u64).ok_or("stamp needs N")?;
            let seq = STAMP_GPA as *mut u64;
            for i in 1..=count {
                // SAFETY: the stamp slot is this guest's RAM. TSC first, then the sequence
                // number that tells a reader a new stamp is complete.
                unsafe {
                    write_volatile(seq.add(1), rt::rdtsc());
                    core::sync::atomic::fence(Ordering::Release);
                    write_volatile(seq, i);
                }
                let start = rt::rdtsc();
                while rt::rdtsc() - start < SPACING_CYCLES {
                    core::hint::spin_loop();
                }
            }
            Ok(())
        })(),
        "churn" => (|| {
            let gpa = words.next().and_then(parse_u64).ok_or("churn needs GPA")?;
            let len = words.next().and_then(parse_u64).ok_or("churn needs LEN")?;
            let rate = words.next().and_then(parse_u64).ok_or("churn needs RATE")?;
            let hz = words.next().and_then(parse_u64).ok_or("churn needs TSC_HZ")?;
            let in_ram = info.memmap.iter().any(|e| e.kind == 1 && gpa >= e.addr && gpa.saturating_add(len) <= e.addr + e.size);
            if rate != 0 && (!in_ram || gpa < FILL_MIN_GPA || gpa % 4096 != 0 || len < 4096) {
                return Err("churn range must be page-aligned RAM at or above 32 MiB");
            }
            // SAFETY: the main loop's vCPU is the only user of CHURN.
            let c = unsafe { &mut *core::ptr::addr_of_mut!(CHURN) };
            c.pages = if rate == 0 { 0 } else { len / 4096 };
            c.gpa = gpa;
            c.cycles = if rate == 0 { 0 } else { (hz / rate).max(1) };
            c.next = rt::rdtsc();
            Ok(())
        })(),
        "exit" => {
            let status = words.next().and_then(parse_u64).unwrap_or(0);
            println!("workload: ack exit {}", status);
            return Some(status as u8);
        }
        _ => Err("unknown command"),
    };
    match result {
        Ok(()) => {
            // SAFETY: the header is this guest's RAM.
            let done = unsafe {
                let n = read_volatile(&(*header()).commands_done) + 1;
                write_volatile(&mut (*header()).commands_done, n);
                n
            };
            println!("workload: ack {} seq={}", command, done);
        }
        Err(why) => println!("workload: error {}: {}", command, why),
    }
    None
}
