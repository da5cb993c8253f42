//! Fuzzes `inspector::control::unhex`, which decodes the HEXPATTERN of a control
//! socket `scan` request (text straight from the client).
//!
//! Checks: no panic; an accepted string has an even length, every pair of
//! characters is a valid `u8::from_str_radix(_, 16)` (so it denotes the returned
//! byte), and the result has half as many bytes as the text.
//!
//! `0é0` (a multibyte character across an even offset) once panicked; it is an
//! error now (see mirror-driver/fuzz/known-bugs/control_unhex, kept as a regression seed).
//!
//! Input: the HEXPATTERN word (UTF-8; invalid inputs are skipped).
#![no_main]

use inspector::control::unhex;
use libfuzzer_sys::fuzz_target;


fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match unhex(text) {
        Ok(bytes) => {
            assert_eq!(text.len() % 2, 0);
            assert_eq!(bytes.len(), text.len() / 2);
            for (i, byte) in bytes.iter().enumerate() {
                let pair = &text[2 * i..2 * i + 2];
                assert_eq!(u8::from_str_radix(pair, 16).ok(), Some(*byte), "{pair:?}");
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
