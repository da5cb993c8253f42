#![no_std]
#![no_main]
#[path = "rt/mod.rs"]
mod rt;
fn main(_info: &rt::BootInfo) -> u8 { 0 }
fn ap_main(_info: &rt::BootInfo, _cpu: u32) -> ! { rt::park() }
