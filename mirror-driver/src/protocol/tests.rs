use super::codec::kind;
use super::*;

fn round_trip(m: Message) {
    let frame = m.encode(0xabcd_0123);
    let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.len, frame.len() - HEADER_LEN);
    assert_eq!(header.id, 0xabcd_0123, "the correlation id survives the trip");
    assert_eq!(Message::decode(header.kind, &frame[HEADER_LEN..]).unwrap(), m);
}

fn samples() -> Vec<Message> {
    vec![
        Message::Hello { version: 1 },
        Message::HelloAck { version: 1, ram_size: 1 << 30, vcpus: 4 },
        Message::GetMemoryMap,
        Message::MemoryMap { regions: vec![Range { gpa: 0, len: 1 << 20 }, Range { gpa: 1 << 32, len: 4096 }] },
        Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: vec![Range { gpa: 0x1000, len: 0x2000 }] },
        Message::GrantReply {
            more: true,
            grants: vec![Grant { id: 7, gpa: 0x1000, len: 0x2000, fd_index: 0, offset: 0x1000 }],
        },
        Message::Release { grant_id: 7 },
        Message::Released { grant_id: 7 },
        Message::GetVcpuState,
        Message::PauseRequest,
        Message::ResumeRequest,
        Message::VcpuState {
            vcpus: vec![VcpuRegs {
                index: 1,
                rip: 0x1000,
                cr3: 0x9000,
                gprs: [3; 16],
                gs_base: 0xffff_8880_0000_0000,
                kernel_gs_base: 7,
                star: 0x0023_0010_0000_0000,
                lstar: 0xffff_ffff_8120_0000,
                cstar: 0xffff_ffff_8120_1000,
                fmask: 0x47700,
                ..Default::default()
            }],
        },
        Message::Revoke { grant_id: 9, nonce: 0x1234_5678_9abc },
        Message::RevokeAck { grant_id: 9, nonce: 0x1234_5678_9abc },
        Message::Discard { gpa: 0x4000, len: 0x1000 },
        Message::Paused,
        Message::Resumed,
        Message::SourceExiting,
        Message::DirtySubscribe,
        Message::DirtySubscribed { interval_us: 20_000, mechanism: DirtyMechanism::Ring },
        Message::DirtyPages { coalesced: true, ranges: vec![Range { gpa: 0x1000, len: 0x3000 }] },
        Message::DirtySync { token: 7 },
        Message::DirtySynced { token: u64::MAX },
        Message::TraceSubscribe { kinds: trace_kind::MSR_WRITES },
        Message::TraceSubscribed { kinds: trace_kind::ALL, max_per_second: 1000 },
        Message::TraceMsrWrite(MsrWrite {
            vcpu: 1,
            msr: 0xc000_0082,
            value: 0xffff_ffff_c000_1000,
            previous: 0xffff_ffff_8120_0000,
            rip: 0xffff_ffff_c000_2000,
            cr3: 0x10_0000,
            stack: [0xffff_ffff_c000_2040, 0, 7, u64::MAX],
            applied: true,
        }),
        Message::TraceDropped { count: 42 },
        Message::TraceBreakpoints {
            software: true,
            points: vec![
                Breakpoint {
                    address: 0xffff_ffff_8100_1000,
                    captures: vec![
                        Capture { base: 5, derefs: vec![112], offset: 0, kind: CaptureKind::String, max_len: 256 },
                        Capture {
                            base: CAPTURE_BASE_GS,
                            derefs: vec![0x2_1440, -8],
                            offset: 0x5a8,
                            kind: CaptureKind::U32,
                            max_len: 0,
                        },
                    ],
                },
                Breakpoint { address: 0xffff_ffff_8100_2000, captures: vec![] },
            ],
        },
        Message::TraceBreakpointsSet { count: 2 },
        Message::TraceBreakpointHit(BreakpointHit {
            vcpu: 1,
            index: 0,
            rip: 0xffff_ffff_8100_1000,
            cr3: 0x1000,
            values: vec![
                Captured::Missing,
                Captured::Number(7),
                Captured::Bytes(b"/bin/true".to_vec()),
                Captured::Strings(vec![b"true".to_vec(), b"".to_vec()]),
            ],
        }),
        Message::TraceWriteTraps {
            ranges: vec![Range { gpa: 0x100_0000, len: 0x20_0000 }, Range { gpa: 0x20_3000, len: 8 }],
        },
        Message::TraceWriteTrapsSet { pages: 513 },
        Message::TraceMemoryWrite(MemoryWrite {
            vcpu: 1,
            gpa: 0x20_3010,
            len: 8,
            value: 0xffff_ffff_c000_1000,
            previous: 0xffff_ffff_8110_2030,
            rip: 0xffff_ffff_c000_2044,
            cr3: 0x10_b000,
            stack: [1, 2, 3, 4],
        }),
        Message::Error { code: ErrorCode::PolicyDenied, text: "no".into() },
    ]
}

#[test]
fn write_traps_and_their_writes_are_bounded() {
    let too_many: Vec<Range> = (0..=MAX_WRITE_TRAP_RANGES as u64).map(|i| Range { gpa: i << 12, len: 1 }).collect();
    let frame = Message::TraceWriteTraps { ranges: too_many }.encode(1);
    assert!(matches!(
        Message::decode(kind::TRACE_WRITE_TRAPS, &frame[HEADER_LEN..]),
        Err(DecodeError::CountTooLarge { limit: MAX_WRITE_TRAP_RANGES, .. })
    ));
    for len in [0, MEMORY_WRITE_MAX_LEN + 1, u32::MAX] {
        let frame = Message::TraceMemoryWrite(MemoryWrite { len, ..Default::default() }).encode(1);
        let decoded = Message::decode(kind::TRACE_MEMORY_WRITE, &frame[HEADER_LEN..]);
        assert!(matches!(decoded, Err(DecodeError::Malformed { .. })), "a {len}-byte write: {decoded:?}");
    }
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        round_trip(m);
    }
}

#[test]
fn oversized_frames_and_counts_are_refused() {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    assert_eq!(decode_header(&header), Err(DecodeError::TooLarge(MAX_PAYLOAD + 1)));
    let mut payload = ACCESS_READ_ONLY.to_le_bytes().to_vec();
    payload.extend_from_slice(&(MAX_RANGES as u32 + 1).to_le_bytes());
    assert!(matches!(Message::decode(kind::GRANT_REQUEST, &payload), Err(DecodeError::CountTooLarge { .. })));
    // A count that claims more items than the payload holds.
    let mut payload = ACCESS_READ_ONLY.to_le_bytes().to_vec();
    payload.extend_from_slice(&100u32.to_le_bytes());
    assert!(matches!(Message::decode(kind::GRANT_REQUEST, &payload), Err(DecodeError::Malformed { .. })));
}

#[test]
fn unknown_kinds_and_trailing_bytes_are_refused() {
    assert_eq!(Message::decode(999, &[]), Err(DecodeError::UnknownKind(999)));
    assert_eq!(DecodeError::UnknownKind(999).code(), ErrorCode::UnknownMessage);
    assert!(matches!(Message::decode(kind::PAUSED, &[0]), Err(DecodeError::Malformed { .. })));
    // A dirty-feed reply naming no mechanism this crate knows.
    for code in [0u32, 4, u32::MAX] {
        let payload: Vec<u8> = [20_000u32, code].iter().flat_map(|w| w.to_le_bytes()).collect();
        let decoded = Message::decode(kind::DIRTY_SUBSCRIBED, &payload);
        assert!(matches!(decoded, Err(DecodeError::Malformed { .. })), "mechanism {code}: {decoded:?}");
    }
    // Breakpoints beyond the four debug registers, a capture base past GS, a string
    // longer than the cap, an unknown capture kind.
    let five = Message::TraceBreakpoints {
        software: false,
        points: vec![Breakpoint { address: 1, captures: vec![] }; MAX_BREAKPOINTS + 1],
    };
    let frame = five.encode(1);
    let decoded = Message::decode(kind::TRACE_BREAKPOINTS, &frame[HEADER_LEN..]);
    assert!(matches!(decoded, Err(DecodeError::CountTooLarge { .. })), "{decoded:?}");
    let capture = Capture { base: 0, derefs: vec![], offset: 0, kind: CaptureKind::U64, max_len: 0 };
    for bad in [
        Capture { base: CAPTURE_BASE_GS + 1, ..capture.clone() },
        Capture { max_len: MAX_CAPTURE_STRING + 1, ..capture.clone() },
    ] {
        let frame = Message::TraceBreakpoints {
            software: false,
            points: vec![Breakpoint { address: 1, captures: vec![bad.clone()] }],
        }
        .encode(1);
        let decoded = Message::decode(kind::TRACE_BREAKPOINTS, &frame[HEADER_LEN..]);
        assert!(matches!(decoded, Err(DecodeError::Malformed { .. })), "{bad:?}: {decoded:?}");
    }
    let mut frame =
        Message::TraceBreakpoints { software: false, points: vec![Breakpoint { address: 1, captures: vec![capture] }] }
            .encode(1);
    let kind_at = frame.len() - 8;
    frame[kind_at] = 9;
    assert!(Message::decode(kind::TRACE_BREAKPOINTS, &frame[HEADER_LEN..]).is_err(), "capture kind 9");
    frame[kind_at] = CaptureKind::U64 as u8;
    frame[HEADER_LEN] = 2;
    assert!(
        matches!(Message::decode(kind::TRACE_BREAKPOINTS, &frame[HEADER_LEN..]), Err(DecodeError::Malformed { .. })),
        "software is neither 0 nor 1"
    );
    frame[HEADER_LEN] = 0;
    assert!(Message::decode(kind::TRACE_BREAKPOINTS, &frame[HEADER_LEN..]).is_ok(), "as encoded, it decodes");
    // An MSR write whose `applied` flag is neither 0 nor 1.
    let mut frame = Message::TraceMsrWrite(MsrWrite::default()).encode(EVENT_ID);
    let last = frame.len() - 4;
    frame[last] = 2;
    let decoded = Message::decode(kind::TRACE_MSR_WRITE, &frame[HEADER_LEN..]);
    assert!(matches!(decoded, Err(DecodeError::Malformed { .. })), "{decoded:?}");
    let mut header = Message::Paused.encode(EVENT_ID);
    header[6] = 1;
    assert_eq!(decode_header(header[..HEADER_LEN].try_into().unwrap()), Err(DecodeError::BadHeader));
}

#[test]
fn every_truncation_of_every_message_is_an_error_not_a_panic() {
    for m in samples() {
        let frame = m.encode(1);
        let kind = u16::from_le_bytes([frame[4], frame[5]]);
        let payload = &frame[HEADER_LEN..];
        for cut in 0..payload.len() {
            assert!(Message::decode(kind, &payload[..cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
}

/// A deterministic fuzz pass: random and mutated payloads for every kind must decode or
/// fail cleanly (the libFuzzer target in fuzz/ explores further).
#[test]
fn random_and_mutated_payloads_never_panic() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seeds: Vec<Vec<u8>> = samples().iter().map(|m| m.encode(7)).collect();
    for round in 0..50_000 {
        let mut frame = seeds[round % seeds.len()].clone();
        for _ in 0..(next() % 6) {
            if frame.is_empty() {
                break;
            }
            let at = (next() as usize) % frame.len();
            match next() % 3 {
                0 => frame[at] = next() as u8,
                1 => frame.truncate(at),
                _ => frame.insert(at, next() as u8),
            }
        }
        if frame.len() < HEADER_LEN {
            continue;
        }
        if let Ok(header) = decode_header(frame[..HEADER_LEN].try_into().unwrap()) {
            if let Ok(message) = Message::decode(header.kind, &frame[HEADER_LEN..]) {
                // Whatever decodes re-encodes to the same message.
                let again = message.encode(header.id);
                let again_header = decode_header(again[..HEADER_LEN].try_into().unwrap()).unwrap();
                assert_eq!(again_header.id, header.id);
                assert_eq!(Message::decode(again_header.kind, &again[HEADER_LEN..]).unwrap(), message);
            }
        }
        let kind = (next() % 40) as u16;
        let _ = Message::decode(kind, &frame[HEADER_LEN.min(frame.len())..]);
    }
}

#[test]
fn error_text_must_be_utf8() {
    let mut payload = (ErrorCode::Internal as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(Message::decode(kind::ERROR, &payload), Err(DecodeError::Malformed { .. })));
}

#[test]
fn long_error_text_is_truncated_on_a_char_boundary() {
    let text = "é".repeat(MAX_ERROR_TEXT);
    let frame = Message::Error { code: ErrorCode::Internal, text }.encode(1);
    match Message::decode(kind::ERROR, &frame[HEADER_LEN..]).unwrap() {
        Message::Error { text, .. } => assert!(text.len() <= MAX_ERROR_TEXT && text.chars().all(|c| c == 'é')),
        other => panic!("{other:?}"),
    }
}
