//! Bytes as lowercase hex text and back (`"dead01"`), as request lines and replies
//! carry them.

use crate::parse::ParseError;

/// The digits, by value.
const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex, two digits a byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// Decodes hex text (either case, no prefix, no separators) into bytes.
///
/// The text is checked before anything is allocated: the first character that is not a
/// hex digit is named with its position, then an odd number of digits is refused.
pub fn decode(text: &str) -> Result<Vec<u8>, ParseError> {
    decode_bounded(text, usize::MAX)
}

/// [`decode`], refusing text that decodes to more than `max` bytes before reading it.
pub fn decode_bounded(text: &str, max: usize) -> Result<Vec<u8>, ParseError> {
    let digits = text.len();
    if digits / 2 > max {
        return Err(ParseError::HexTooLong { digits, max });
    }
    if let Some((position, found)) = text.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(ParseError::HexDigit { found, position });
    }
    if !digits.is_multiple_of(2) {
        return Err(ParseError::HexOddLength { digits });
    }
    Ok(text.as_bytes().chunks_exact(2).map(|pair| nibble(pair[0]) << 4 | nibble(pair[1])).collect())
}

/// The value of an ASCII hex digit (checked by the caller).
fn nibble(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_lowercase_two_digits_a_byte() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn decoding_takes_either_case_and_round_trips() {
        assert_eq!(decode("000FA5ff"), Ok(vec![0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(decode(""), Ok(Vec::new()));
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)), Ok(all));
    }

    #[test]
    fn bad_text_is_refused_by_position_without_panicking() {
        assert_eq!(decode("abc"), Err(ParseError::HexOddLength { digits: 3 }));
        assert_eq!(decode("0x10"), Err(ParseError::HexDigit { found: 'x', position: 1 }));
        assert_eq!(decode("ab cd"), Err(ParseError::HexDigit { found: ' ', position: 2 }));
        assert_eq!(decode("é1"), Err(ParseError::HexDigit { found: 'é', position: 0 }));
        assert_eq!(decode("0é"), Err(ParseError::HexDigit { found: 'é', position: 1 }));
        assert_eq!(decode("abg").unwrap_err().to_string(), "bad hex digit 'g' at position 2");
        assert_eq!(decode("abc").unwrap_err().to_string(), "hex needs an even number of digits, not 3");
    }

    #[test]
    fn the_bound_is_checked_before_the_digits() {
        assert_eq!(decode_bounded("0011", 2), Ok(vec![0, 0x11]));
        assert_eq!(decode_bounded("001122", 2), Err(ParseError::HexTooLong { digits: 6, max: 2 }));
        assert_eq!(decode_bounded("zz", 0), Err(ParseError::HexTooLong { digits: 2, max: 0 }));
    }
}
