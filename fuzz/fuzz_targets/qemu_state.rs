//! Fuzzes the reader of QEMU's device-state (migration) stream
//! (`specula_qemu::state::cpu_msrs`), which finds each vCPU's LSTAR in a
//! stream QEMU writes and whose video RAM pages the guest controls: any bytes must
//! give the vCPUs' MSRs or an error, never a panic, a hang or an allocation beyond
//! the stream's own size.
//!   scripts/fuzz.sh run qemu_state
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msrs) = specula_qemu::state::cpu_msrs(data) {
        assert!(!msrs.is_empty(), "a stream without vCPUs is an error");
    }
});
