//! Fuzzes the `vmm` command line: `vmm::config::parse_args` on a fuzzed argument
//! vector, and each argument through the value parsers it uses
//! (`parse_memory`, `parse_cpus`, `parse_serial`, `parse_range`,
//! `vmm::memory::parse_size`).
//!
//! Checks: no panic; every accepted configuration is within the documented
//! limits (memory in [MIN_MEMORY, MAX_MEMORY] and 4 KiB-aligned, 1..=MAX cpus,
//! non-empty mirror-policy ranges that do not wrap, a serial file path that is
//! not empty); the value parsers agree with what `parse_args` accepted.
//!
//! Input: NUL-separated arguments (each converted with `from_utf8_lossy`, as an
//! argv entry would be after `to_string_lossy`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::arch::x86_64::mptable::MAX_SUPPORTED_CPUS;
use vmm::config::{parse_args, parse_cpus, parse_memory, parse_range, parse_serial, Command};
use vmm::devices::serial::SerialOutput;
use vmm::memory::{parse_size, MAX_MEMORY, MIN_MEMORY};

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();

    for arg in &args {
        if let Ok(size) = parse_memory(arg) {
            assert!((MIN_MEMORY..=MAX_MEMORY).contains(&size) && size % 4096 == 0, "{arg:?} -> {size}");
        }
        if let Ok(cpus) = parse_cpus(arg) {
            assert!(cpus >= 1 && cpus <= MAX_SUPPORTED_CPUS, "{arg:?} -> {cpus}");
        }
        if let Ok(SerialOutput::File(path)) = parse_serial(arg) {
            assert!(!path.as_os_str().is_empty());
        }
        if let Some(range) = parse_range(arg) {
            assert!(range.len > 0 && range.gpa.checked_add(range.len).is_some(), "{arg:?} -> {range:?}");
        }
        let _ = parse_size(arg);
    }

    if let Ok(Command::Run(config)) = parse_args(args.clone()) {
        assert!((MIN_MEMORY..=MAX_MEMORY).contains(&config.memory) && config.memory % 4096 == 0);
        assert!(config.cpus >= 1 && config.cpus <= MAX_SUPPORTED_CPUS);
        if let SerialOutput::File(path) = &config.serial {
            assert!(!path.as_os_str().is_empty());
        }
        for range in config.mirror_policy.iter().flatten() {
            assert!(range.len > 0 && range.gpa.checked_add(range.len).is_some(), "{range:?}");
        }
        assert!(config.boot.extra_memmap.is_empty());
    }
});
