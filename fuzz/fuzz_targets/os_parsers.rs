//! Fuzzes every specula-os parser of guest memory (the agent runs them over a hostile
//! guest's RAM): BTF, VMCOREINFO text, kallsyms tables, page walks, whole-kernel
//! discovery (with every view and rootkit check) over a synthetic physical memory, and
//! the agent-to-host reply decoders.
//! Each must return an error or a result, never panic, hang or allocate without bound.
//!
//! Input: byte 0 picks the parser, the rest is its input.
//!   scripts/fuzz.sh run os_parsers
#![no_main]

use libfuzzer_sys::fuzz_target;
use specula_os::{fuzz, wire};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 11 {
        0 => fuzz::fuzz_btf(rest),
        1 => fuzz::fuzz_vmcoreinfo(rest),
        2 => fuzz::fuzz_kallsyms(rest),
        3 => fuzz::fuzz_page_walk(rest),
        4 => fuzz::fuzz_discover(rest),
        5 => drop(wire::decode_processes(rest)),
        6 => drop(wire::decode_modules(rest)),
        7 => drop(wire::decode_vmas(rest)),
        8 => drop(wire::decode_syscalls(rest)),
        9 => drop(wire::decode_checks(rest)),
        _ => drop(wire::decode_kernel(rest)),
    }
});
