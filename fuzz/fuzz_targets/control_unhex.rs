//! Fuzzes the inspector's line-socket request parser, `inspector::line::parse`, and
//! the decoder of a `scan` request's HEXPATTERN, `specula_common::hex::decode` (text
//! straight from the client). (The target keeps its old name, after `control::unhex`.)
//!
//! Checks: no panic; hex the decoder accepts has an even length, every pair of
//! characters is a valid `u8::from_str_radix(_, 16)` (so it denotes the returned
//! byte), and the result has half as many bytes as the text; hex it refuses is
//! refused for a named non-hex character (at its position) or an odd length. A line
//! the parser refuses gets one non-empty line of error; `scan GPA LEN TEXT` accepted
//! carries exactly the bytes TEXT denotes.
//!
//! `0é0` (a multibyte character across an even offset) once panicked `unhex`; it is
//! an error now (see fuzz/known-bugs/control_unhex, kept as a regression seed).
//!
//! Input: the HEXPATTERN word, also parsed as a whole request line (UTF-8; invalid
//! inputs are skipped).
#![no_main]

use inspector::line::parse;
use libfuzzer_sys::fuzz_target;
use specula_api::Request;
use specula_common::hex::decode;
use specula_common::ParseError;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let decoded = decode(text);
    match &decoded {
        Ok(bytes) => {
            assert_eq!(text.len() % 2, 0);
            assert_eq!(bytes.len(), text.len() / 2);
            for (i, byte) in bytes.iter().enumerate() {
                let pair = &text[2 * i..2 * i + 2];
                assert_eq!(u8::from_str_radix(pair, 16).ok(), Some(*byte), "{pair:?}");
            }
        }
        Err(ParseError::HexDigit { found, position }) => {
            assert!(text[*position..].starts_with(*found) && !found.is_ascii_hexdigit(), "{text:?}");
        }
        Err(ParseError::HexOddLength { digits }) => assert!(*digits == text.len() && digits % 2 == 1),
        Err(e) => panic!("{text:?} refused as {e:?}"),
    }

    // The same text as a whole request line, and as a `scan` request's pattern.
    for line in [text.to_string(), format!("scan 0x1000 16 {text}")] {
        match parse(&line) {
            Ok(Request::Scan { gpa: 0x1000, len: 16, pattern }) if line.len() > text.len() => {
                let word = line.split_whitespace().nth(3).unwrap_or("");
                assert_eq!(Ok(pattern), decode(word), "{line:?}");
            }
            Ok(_) => {}
            Err(e) => {
                let message = e.to_string();
                assert!(!message.is_empty() && !message.contains('\n'), "{line:?} -> {message:?}");
            }
        }
    }
});
