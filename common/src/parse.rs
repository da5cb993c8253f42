//! Parsers of the numbers, sizes and ranges that command lines and request lines take.
//!
//! - a number is decimal, or hex with `0x` ([`number`]);
//! - a size is decimal with an optional `K`, `M`, `G` or `T` suffix (binary units,
//!   either case) ([`size`]);
//! - a range is `GPA:LEN`: GPA a number, LEN a size or `0x` hex, not empty and not past
//!   the end of the 64-bit address space ([`range`]).

/// Why some text is not the value it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A required argument is absent.
    #[error("missing {what}")]
    Missing { what: String },
    /// `text` is not a decimal or `0x` hex number that fits in 64 bits.
    #[error("bad {what} '{text}'")]
    Number { what: String, text: String },
    /// `text` is not a size.
    #[error("bad size '{text}': expected a number with an optional K, M, G or T suffix, at most 16 EiB")]
    Size { text: String },
    /// `text` has no `:` between its GPA and its length.
    #[error("bad range '{text}': expected GPA:LEN, e.g. 0x1000000:64M")]
    RangeForm { text: String },
    /// The GPA or the length of range `text` does not parse.
    #[error("bad range '{text}'")]
    RangeField {
        text: String,
        #[source]
        source: Box<ParseError>,
    },
    /// Range `text` has length 0.
    #[error("bad range '{text}': its length is 0")]
    EmptyRange { text: String },
    /// Range `text` ends past the 64-bit address space.
    #[error("bad range '{text}': it ends past the 64-bit address space")]
    RangeOverflow { text: String },
    /// `text` is none of the words a setting takes (`expected` lists them).
    #[error("expected {expected}, not '{text}'")]
    Choice { text: String, expected: &'static str },
    /// Hex text with an odd number of digits.
    #[error("hex needs an even number of digits, not {digits}")]
    HexOddLength { digits: usize },
    /// A character that is not a hex digit, at byte `position` of the text.
    #[error("bad hex digit '{found}' at position {position}")]
    HexDigit { found: char, position: usize },
    /// Hex text that decodes to more than `max` bytes.
    #[error("hex text of {digits} digits decodes to more than {max} bytes")]
    HexTooLong { digits: usize, max: usize },
}

/// A `GPA:LEN` range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange {
    pub gpa: u64,
    pub len: u64,
}

/// Parses a request argument named `what` (for the error): decimal, or hex with `0x`.
/// `None` (the argument is absent) is [`ParseError::Missing`].
pub fn number(word: Option<&str>, what: &str) -> Result<u64, ParseError> {
    let word = word.ok_or_else(|| ParseError::Missing { what: what.to_string() })?;
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed.map_err(|_| ParseError::Number { what: what.to_string(), text: word.to_string() })
}

/// Parses a size: `4096`, `512M`, `2g`; surrounding whitespace is ignored.
pub fn size(text: &str) -> Result<u64, ParseError> {
    let bad = || ParseError::Size { text: text.to_string() };
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.as_bytes().last().ok_or_else(bad)? {
        b'K' | b'k' => (&trimmed[..trimmed.len() - 1], 10),
        b'M' | b'm' => (&trimmed[..trimmed.len() - 1], 20),
        b'G' | b'g' => (&trimmed[..trimmed.len() - 1], 30),
        b'T' | b't' => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses `GPA:LEN`: GPA decimal or `0x` hex; LEN `0x` hex or a [`size`].
pub fn range(text: &str) -> Result<GpaRange, ParseError> {
    let (gpa, len) = text.split_once(':').ok_or_else(|| ParseError::RangeForm { text: text.to_string() })?;
    let field = |source: ParseError| ParseError::RangeField { text: text.to_string(), source: Box::new(source) };
    let gpa = number(Some(gpa), "GPA").map_err(field)?;
    let len = match len.strip_prefix("0x") {
        Some(_) => number(Some(len), "LEN"),
        None => size(len),
    }
    .map_err(field)?;
    if len == 0 {
        return Err(ParseError::EmptyRange { text: text.to_string() });
    }
    if gpa.checked_add(len).is_none() {
        return Err(ParseError::RangeOverflow { text: text.to_string() });
    }
    Ok(GpaRange { gpa, len })
}

/// Picks the value whose name is `text` from `choices`; `expected` lists the names for
/// the error ("auto, ring or bitmap").
pub fn choice<T: Copy>(text: &str, choices: &[(&str, T)], expected: &'static str) -> Result<T, ParseError> {
    choices
        .iter()
        .find(|(name, _)| *name == text)
        .map(|&(_, value)| value)
        .ok_or_else(|| ParseError::Choice { text: text.to_string(), expected })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_in_decimal_and_hex_and_name_what_failed() {
        assert_eq!(number(Some("0x10"), "GPA"), Ok(16));
        assert_eq!(number(Some("10"), "GPA"), Ok(10));
        assert_eq!(number(Some("0xffffffffffffffff"), "GPA"), Ok(u64::MAX));
        let bad = number(Some("0xzz"), "GPA").unwrap_err();
        assert_eq!(bad, ParseError::Number { what: "GPA".into(), text: "0xzz".into() });
        assert_eq!(bad.to_string(), "bad GPA '0xzz'");
        assert_eq!(number(None, "LEN").unwrap_err().to_string(), "missing LEN");
        for text in ["", "0x", "-1", "1.5", "0x1_0", "18446744073709551616", "0X10"] {
            assert!(number(Some(text), "N").is_err(), "{text:?}");
        }
    }

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_overflow() {
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("2G"), Ok(2 << 30));
        assert_eq!(size("2g"), Ok(2 << 30));
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size(" 1k "), Ok(1024));
        assert_eq!(size("1T"), Ok(1 << 40));
        for text in ["x", "", "M", "99999999999T", "0x10", "1.5G", "-1K"] {
            assert_eq!(size(text), Err(ParseError::Size { text: text.into() }), "{text:?}");
        }
    }

    #[test]
    fn ranges_are_gpa_colon_len() {
        assert_eq!(range("0x1000000:64M"), Ok(GpaRange { gpa: 0x100_0000, len: 64 << 20 }));
        assert_eq!(range("4096:0x1000"), Ok(GpaRange { gpa: 4096, len: 0x1000 }));
        assert_eq!(range("0:1"), Ok(GpaRange { gpa: 0, len: 1 }));
        assert_eq!(range("0x1000"), Err(ParseError::RangeForm { text: "0x1000".into() }));
        assert_eq!(range("0x1000:0"), Err(ParseError::EmptyRange { text: "0x1000:0".into() }));
        assert_eq!(range("0x1000:0x0"), Err(ParseError::EmptyRange { text: "0x1000:0x0".into() }));
        let text = "0xffffffffffffffff:2";
        assert_eq!(range(text), Err(ParseError::RangeOverflow { text: text.into() }));
        assert_eq!(crate::error_chain(&range("zz:1").unwrap_err()), "bad range 'zz:1': bad GPA 'zz'");
        assert_eq!(crate::error_chain(&range("0:0xg").unwrap_err()), "bad range '0:0xg': bad LEN '0xg'");
        assert!(matches!(range("0:lots"), Err(ParseError::RangeField { .. })));
    }

    #[test]
    fn choices_name_what_was_expected() {
        let choices = [("on", true), ("off", false)];
        assert_eq!(choice("on", &choices, "on or off"), Ok(true));
        assert_eq!(choice("off", &choices, "on or off"), Ok(false));
        let error = choice("maybe", &choices, "on or off").unwrap_err();
        assert_eq!(error.to_string(), "expected on or off, not 'maybe'");
    }
}
