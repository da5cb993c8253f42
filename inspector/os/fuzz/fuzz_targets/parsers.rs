//! Fuzzes every specula-os parser: the first byte picks one, the rest is its
//! input; each must return (with any result) without panicking, hanging or
//! allocating without bound.
//!
//!   cd inspector/os/fuzz && cargo +nightly fuzz run parsers
#![no_main]

use libfuzzer_sys::fuzz_target;
use specula_os::fuzz;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 5 {
        0 => fuzz::fuzz_btf(rest),
        1 => fuzz::fuzz_vmcoreinfo(rest),
        2 => fuzz::fuzz_kallsyms(rest),
        3 => fuzz::fuzz_page_walk(rest),
        _ => fuzz::fuzz_discover(rest),
    }
});
