//! Fuzzes the number parsing of the line-protocol request servers (the vmm's API
//! socket and the inspector's line socket): `vmm::line_server::parse_number`
//! on every word of a request line, split the way `api::execute` and
//! `line::parse` split it. (`execute` itself needs a live VM or inspector.)
//!
//! Checks: no panic; an accepted word is decimal, or `0x` and hex, and denotes the
//! returned value (checked against an independent digit-by-digit parser, which
//! also accepts the leading `+` that Rust's integer parsing allows); a refused word
//! is a `ParseError::Number` naming what was being parsed and the word, a missing
//! one `ParseError::Missing`.
//!
//! Input: one request line (UTF-8; other bytes are replaced as `from_utf8_lossy` does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use specula_common::ParseError;
use vmm::line_server::parse_number;

/// Independent reference: `[+]digits` in `radix`, no overflow.
fn reference(word: &str) -> Option<u64> {
    let (digits, radix) = match word.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (word, 10),
    };
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0u64, |acc, c| acc.checked_mul(radix)?.checked_add(u64::from(c.to_digit(radix as u32)?)))
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let mut words = line.split_whitespace();
    // The request name, then its arguments, as the executors read them.
    let _request = words.next();
    for what in ["GPA", "LEN", "ID"] {
        let word = words.next();
        match parse_number(word, what) {
            Ok(value) => assert_eq!(Some(value), reference(word.unwrap()), "{word:?}"),
            Err(error) => match (word, &error) {
                (None, ParseError::Missing { what: named }) => assert_eq!(named, what),
                (Some(w), ParseError::Number { what: named, text }) => {
                    assert_eq!((named.as_str(), text.as_str()), (what, w), "{error}");
                    assert_eq!(reference(w), None, "{w:?} refused: {error}");
                }
                _ => panic!("{word:?} refused as {error:?}"),
            },
        }
    }
});
