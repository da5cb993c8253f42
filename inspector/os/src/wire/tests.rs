use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::checks::{CheckReport, CheckRun, Finding, FindingKind};
use crate::{Error, Module};

fn module(name: &str) -> Module {
    Module { module: 1, name: name.into(), state: 0, state_name: Some("MODULE_STATE_LIVE".into()), base: 2, size: 3 }
}

#[test]
fn views_round_trip_and_overflow_is_reported() {
    let ms = vec![module("dummy"), module("crc7")];
    let mut buf = vec![0u8; 4096];
    let mut w = Writer::new(&mut buf);
    encode_modules(&ms, &mut w);
    let n = w.finish().unwrap();
    assert_eq!(decode_modules(&buf[..n]).unwrap(), ms);
    let mut small = vec![0u8; 16];
    let mut w = Writer::new(&mut small);
    encode_modules(&ms, &mut w);
    assert_eq!(w.finish(), None, "a reply that does not fit says so");
}

#[test]
fn check_reports_round_trip_and_hostile_ones_are_errors() {
    let report = CheckReport {
        runs: vec![
            CheckRun { check: "processes".into(), examined: 80, error: None },
            CheckRun { check: "interrupts".into(), examined: 0, error: Some("no idt_table".into()) },
        ],
        findings: vec![Finding {
            kind: FindingKind::HiddenProcess,
            id: 77,
            name: Some("evil".into()),
            address: 0xffff_8880_0000_1000,
            detail: None,
        }],
    };
    let mut buf = vec![0u8; 4096];
    let mut w = Writer::new(&mut buf);
    encode_checks(&report, &mut w);
    let n = w.finish().unwrap();
    assert_eq!(decode_checks(&buf[..n]).unwrap(), report);
    for cut in 0..n {
        assert!(decode_checks(&buf[..cut]).is_err(), "cut at {cut}");
    }
    let mut bad_kind = buf[..n].to_vec();
    let kind_at = n - (1 + 8 + 1 + 4 + 4 + 8 + 1);
    assert_eq!(bad_kind[kind_at], 1);
    bad_kind[kind_at] = 99;
    assert_eq!(decode_checks(&bad_kind), Err(Error::BadReply("unknown finding kind")));
    // More findings than two runs can hold.
    let mut many = MAGIC_CHECKS.to_le_bytes().to_vec();
    many.extend_from_slice(&0u32.to_le_bytes());
    many.extend_from_slice(&1u32.to_le_bytes());
    assert!(decode_checks(&many).is_err());
}

#[test]
fn hostile_replies_are_errors() {
    let ms = vec![module("dummy")];
    let mut buf = vec![0u8; 4096];
    let mut w = Writer::new(&mut buf);
    encode_modules(&ms, &mut w);
    let n = w.finish().unwrap();
    for cut in 0..n {
        assert!(decode_modules(&buf[..cut]).is_err(), "cut at {cut}");
    }
    let mut huge = MAGIC_MODULES.to_le_bytes().to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_modules(&huge).is_err());
    assert!(decode_processes(&buf[..n]).is_err(), "the wrong kind of record");
    let mut long = MAGIC_MODULES.to_le_bytes().to_vec();
    long.extend_from_slice(&1u32.to_le_bytes());
    long.extend_from_slice(&1u64.to_le_bytes());
    long.extend_from_slice(&(MAX_FIELD as u32 + 1).to_le_bytes());
    assert!(decode_modules(&long).is_err());
}

/// One request of every kind, with arguments that use every bit they may.
fn requests() -> Vec<OsRequest> {
    vec![
        OsRequest::Discover {
            cpus: vec![
                crate::CpuState {
                    cpu: 0,
                    cr3: 0x1_0000_1001,
                    lstar: 0xffff_ffff_8100_0040,
                    gs_base: 0,
                    kernel_gs_base: 7,
                },
                crate::CpuState { cpu: u32::MAX, cr3: u64::MAX, lstar: 0, gs_base: u64::MAX, kernel_gs_base: 0 },
            ],
        },
        OsRequest::Discover { cpus: vec![] },
        OsRequest::Kernel,
        OsRequest::Processes,
        OsRequest::Modules,
        OsRequest::Vmas { pid: u32::MAX },
        OsRequest::ReadVirtual { pid: 0, va: 0xffff_ffff_8100_0000, len: 4096 },
        OsRequest::Syscalls,
        OsRequest::Checks { which: crate::checks::select::DEFAULT, lstars: None },
        OsRequest::Checks { which: crate::checks::select::MSRS, lstars: Some(vec![]) },
        OsRequest::Checks { which: crate::checks::select::ALL, lstars: Some(vec![(0, 0xffff_ffff_8120_0000), (7, 1)]) },
        OsRequest::Symbols { start: 100, max: u64::MAX },
        OsRequest::Validate { records: vec![] },
        OsRequest::Validate {
            records: vec![
                ReadRecord { page: 0x1000, lines: 1, digest: 2 },
                ReadRecord { page: 0x7fff_f000, lines: u64::MAX, digest: 3 },
            ],
        },
    ]
}

#[test]
fn requests_round_trip_through_the_data_area() {
    for request in requests() {
        let (op, args, input) = request.encode();
        assert_eq!(op, request.op());
        assert_eq!(args[3], 0, "args[3] is the envelope's");
        // As in a slot: the granted ranges first, then the input, then whatever the data
        // area held before (it is not length-delimited).
        let mut data = Vec::new();
        encode_granted(&[(0, 0x1000), (0x10_0000, 0x20_0000)], &mut data);
        data.extend_from_slice(&input);
        data.extend_from_slice(&[0xa5; 64]);
        let (ranges, rest) = decode_granted(&data).unwrap();
        assert_eq!(ranges, [(0, 0x1000), (0x10_0000, 0x20_0000)]);
        assert_eq!(OsRequest::decode(op, args, rest), Ok(request.clone()), "{request:?}");
        // The read-set flag does not change the request.
        assert_eq!(OsRequest::decode(op, [args[0], args[1], args[2], 1], rest), Ok(request));
    }
}

#[test]
fn the_operation_numbers_are_the_abis() {
    // guest-images/src/agent.rs: OP_OS_DISCOVER = 8 .. OP_OS_SYMBOLS = 16, OP_OS_VALIDATE = 18.
    let ops: Vec<u32> = requests().iter().map(OsRequest::op).collect();
    assert_eq!(ops, [8, 8, 9, 10, 11, 12, 13, 14, 15, 15, 15, 16, 18, 18]);
}

#[test]
fn garbage_requests_are_errors() {
    let bad = |op: u32, args: [u64; 4], input: &[u8]| match OsRequest::decode(op, args, input) {
        Err(Error::BadRequest(_)) => {}
        other => panic!("op {op} args {args:?} input {input:?}: {other:?}"),
    };
    for op in [0, 1, 7, 17, 19, 0x100, u32::MAX] {
        bad(op, [0; 4], &[]);
    }
    // Unused arguments that are not 0; arguments out of range.
    bad(op::KERNEL, [1, 0, 0, 0], &[]);
    bad(op::PROCESSES, [0, 0, 1, 0], &[]);
    bad(op::VMAS, [1, 1, 0, 0], &[]);
    bad(op::VMAS, [1 << 32, 0, 0, 0], &[]);
    bad(op::READ_VIRTUAL, [u64::MAX, 0, 1, 0], &[]);
    bad(op::SYMBOLS, [0, 10, 1, 0], &[]);
    bad(op::CHECKS, [1 << 7, 0, 0, 0], &[]);
    bad(op::CHECKS, [1, 2, 0, 0], &[]);
    // Counts beyond their caps or beyond the input.
    bad(op::CHECKS, [32, 1, 0, 0], &[]);
    bad(op::CHECKS, [32, 1, 0, 0], &(MAX_LSTARS as u32 + 1).to_le_bytes());
    let mut one_short = 2u32.to_le_bytes().to_vec();
    one_short.extend_from_slice(&[0; 12 + 11]);
    bad(op::CHECKS, [32, 1, 0, 0], &one_short);
    bad(op::VALIDATE, [2, 0, 0, 0], &[0; 2 * READ_RECORD_BYTES - 1]);
    bad(op::VALIDATE, [MAX_READ_RECORDS as u64 + 1, 0, 0, 0], &[]);
    bad(op::VALIDATE, [u64::MAX, 0, 0, 0], &[]);
    // Granted ranges: too many, or fewer than counted.
    assert!(decode_granted(&[]).is_err());
    assert!(decode_granted(&(MAX_GRANTED_RANGES as u32 + 1).to_le_bytes()).is_err());
    let mut short = 2u32.to_le_bytes().to_vec();
    short.extend_from_slice(&[0; 31]);
    assert_eq!(decode_granted(&short), Err(Error::BadRequest("truncated")));
    // Discover: no more vCPUs than the cap, and no fewer states than counted.
    assert_eq!(
        OsRequest::decode(op::DISCOVER, [crate::anchors::MAX_ANCHOR_CPUS as u64 + 1, 0, 0, 0], &[]),
        Err(Error::BadRequest("discover: too many vCPUs"))
    );
    assert_eq!(
        OsRequest::decode(op::DISCOVER, [2, 0, 0, 0], &[0; request::CPU_STATE_BYTES + 3]),
        Err(Error::BadRequest("truncated"))
    );
}

#[test]
fn noise_decodes_to_errors_or_to_requests_that_round_trip() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000u64 {
        let op = 8 + (next() % 12) as u32;
        // Mostly small arguments, so that valid requests come up too.
        let args = [0; 4].map(|_: u64| if next() % 3 == 0 { next() } else { next() % 3 });
        let input: Vec<u8> = (0..(i % 97)).map(|_| next() as u8 % 4).collect();
        if let Ok(request) = OsRequest::decode(op, args, &input) {
            let (op2, args2, input2) = request.encode();
            assert_eq!(op2, op);
            assert_eq!(OsRequest::decode(op2, args2, &input2), Ok(request));
        }
    }
}
