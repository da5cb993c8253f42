//! Fuzzes the mirror protocol decoder (`mirror_driver::protocol::{decode_header,
//! Message::decode}`): any bytes, read as a frame header and a payload, must
//! decode or fail with a `DecodeError`, never panic; whatever decodes must
//! re-encode to a frame that decodes to the same message (round trip).
//!
//! Input: 12 header bytes (length, kind, reserved, correlation id), then the payload
//! (cut to the header's length).
//!   scripts/fuzz.sh run decode
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror_driver::protocol::{decode_header, Message, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN {
        return;
    }
    let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
    let payload = &data[HEADER_LEN..];
    let Ok(h) = decode_header(&header) else { return };
    let payload = &payload[..h.len.min(payload.len())];
    if let Ok(message) = Message::decode(h.kind, payload) {
        let frame = message.encode(h.id);
        let again = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(again.len, frame.len() - HEADER_LEN, "encoded header length matches the payload");
        assert_eq!(again.id, h.id, "the correlation id survives the round trip");
        assert_eq!(Message::decode(again.kind, &frame[HEADER_LEN..]).unwrap(), message);
    }
});
