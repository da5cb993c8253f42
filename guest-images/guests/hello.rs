//! `hello`: prints a greeting on COM1, counts the vCPUs that reached ring 3,
//! and exits with the status given as `exit=N` on its command line.
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
    println!("hello: exiting with status {}", status);
    status
}

fn ap_main(_info: &rt::BootInfo, _cpu: u32) -> ! {
    ONLINE.fetch_add(1, Ordering::AcqRel);
    rt::park()
}
