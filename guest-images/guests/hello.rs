//! `hello`: prints a greeting on COM1, counts the vCPUs that reached ring 3,
//! and exits with the status given as `exit=N` on its command line.
//! `action=reset` instead resets the machine through the i8042; `action=fault`
//! executes `ud2` with no IDT, which triple-faults the vCPU.
#![no_std]
#![no_main]

#[path = "rt/mod.rs"]
mod rt;

use core::sync::atomic::{AtomicU32, Ordering};

/// vCPUs that reached ring 3 (the bootstrap vCPU counts itself).
static ONLINE: AtomicU32 = AtomicU32::new(1);

/// How long the bootstrap vCPU waits for the others, in TSC cycles (~1-2 s).
const AP_WAIT_CYCLES: u64 = 4_000_000_000;

fn main(info: &rt::BootInfo) -> u8 {
    let status = match info.cmdline_value("exit").map(str::parse::<u8>) {
        Some(Ok(status)) => status,
        Some(Err(_)) => {
            println!("hello: bad exit= value on the command line");
            return 2;
        }
        None => 0,
    };
    let start = rt::rdtsc();
    while ONLINE.load(Ordering::Acquire) < info.cpu_count && rt::rdtsc() - start < AP_WAIT_CYCLES {
        core::hint::spin_loop();
    }
    println!(
        "Hello from Specula guest: {} of {} vCPUs in ring 3, {} MiB RAM",
        ONLINE.load(Ordering::Acquire),
        info.cpu_count,
        info.ram_bytes() >> 20
    );
    println!("hello: cmdline \"{}\"", info.cmdline);
    match info.cmdline_value("action") {
        Some("reset") => {
            println!("hello: resetting through the i8042");
            rt::outb(0x64, 0xfe);
            rt::park()
        }
        Some("fault") => {
            println!("hello: executing ud2");
            // SAFETY: deliberately raises #UD to test the VMM's crash handling.
            unsafe { core::arch::asm!("ud2") };
            rt::park()
        }
        _ => {}
    }
    println!("hello: exiting with status {}", status);
    status
}

fn ap_main(_info: &rt::BootInfo, _cpu: u32) -> ! {
    ONLINE.fetch_add(1, Ordering::AcqRel);
    rt::park()
}
