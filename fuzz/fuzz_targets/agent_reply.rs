//! Fuzzes the inspector's reading of agent completions (`inspector::agent_link`),
//! without KVM: the agent VM's RAM is a plain `GuestMemoryMmap`, and a thread
//! plays a hostile agent. For each input the host side calls `AgentLink::call`
//! with a fuzzed operation; the fake agent waits on the doorbell, finds the
//! submitted slot, and answers with fuzzed bytes: the whole `Slot` (status,
//! result words, op/seq/args overwritten as a compromised agent could) with its
//! state forced to DONE (an agent that never answers only meets the 120 s
//! timeout), plus fuzzed bytes in the slot's data area.
//!
//! Checks: `call` never panics; the status maps onto the documented outcome
//! (OK -> `Completion` with the agent's result words; 1, 2, 3 -> OutOfWindow,
//! BadArgs, UnknownOp(op); others -> Status); the slot is freed; then the data
//! is read back with the lengths the daemon (inspector/src/daemon.rs) derives:
//! `read` len, `hash` 32, `check` min(result[0], DATA_SLOT_SIZE / 8) * 8 — and,
//! like `scan` (daemon.rs:173-174) and `latency` (daemon.rs:225), lengths taken
//! from the agent's result words unbounded.
//!
//! The daemon's counts from the agent are clamped (`Completion::u64s`): the target reads
//! them as the daemon does and checks every read stays inside the slot's data area.
//! Input: [0] op selector, [1] 0xff: full-size reads (else at most 64 KiB),
//! [2..4] unused, [4..36] host args, [36..] agent reply: 88 bytes of Slot (its
//! state word is ignored: DONE is forced), then data-area bytes (written at
//! offsets 0 and 4096 of the slot's data area).
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use guest_images::agent::*;
use inspector::agent_link::{AgentError, AgentLink};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::doorbell::Doorbell;
use vmm::memory::{GuestRam, SharedMemory};

const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

struct Fixture {
    link: AgentLink,
    memory: SharedMemory,
    /// The reply the fake agent gives next: (slot bytes, data bytes).
    reply: Arc<Mutex<(Vec<u8>, Vec<u8>, bool)>>,
    answered: Arc<AtomicBool>,
}


fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Ring, slots and every data slot (DATA_GPA + 16 MiB) fit in 64 MiB.
        let memory = GuestRam::new(64 << 20).unwrap().shared_memory();
        let doorbell = Arc::new(Doorbell::new());
        let link = AgentLink::new(memory.clone(), doorbell.clone(), 1 << 32, 1 << 30).unwrap();
        let reply = Arc::new(Mutex::new((Vec::new(), Vec::new(), false)));
        let answered = Arc::new(AtomicBool::new(false));
        let (agent_memory, agent_reply, agent_answered) = (memory.clone(), reply.clone(), answered.clone());
        std::thread::spawn(move || loop {
            doorbell.guest_wait(Duration::from_millis(100), || false);
            for slot in 0..RING_SLOTS {
                let state: u32 = agent_memory.read_obj(GuestAddress(slot_gpa(slot))).unwrap();
                if state != SLOT_SUBMITTED {
                    continue;
                }
                let reply = agent_reply.lock().unwrap();
                let (slot_bytes, data, forge) = &*reply;
                let mut slot_bytes = slot_bytes.clone();
                if !forge {
                    // An honest agent echoes the command's op and sequence number.
                    let mut submitted = [0u8; 12];
                    agent_memory.read_slice(&mut submitted, GuestAddress(slot_gpa(slot) + 4)).unwrap();
                    slot_bytes[4..16].copy_from_slice(&submitted);
                }
                agent_memory.write_slice(data, GuestAddress(data_gpa(slot))).unwrap();
                agent_memory.write_slice(data, GuestAddress(data_gpa(slot) + 4096)).unwrap();
                // Everything but the state word first, then DONE, as the agent publishes.
                agent_memory.write_slice(&slot_bytes[4..], GuestAddress(slot_gpa(slot) + 4)).unwrap();
                agent_answered.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::Release);
                agent_memory.write_obj(SLOT_DONE, GuestAddress(slot_gpa(slot))).unwrap();
            }
            doorbell.guest_done();
        });
        Fixture { link, memory, reply, answered }
    })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 36 + SLOT_BYTES {
        return;
    }
    let f = fixture();
    let op = u32::from(data[0] % 9); // OP_READ..=OP_LATENCY, and unknown ones
    let args = [u64_at(data, 4), u64_at(data, 12), u64_at(data, 20), u64_at(data, 28)];
    let slot_bytes = &data[36..36 + SLOT_BYTES];
    let agent_data = &data[36 + SLOT_BYTES..];
    let status = u32::from_le_bytes(slot_bytes[48..52].try_into().unwrap());
    let result = [u64_at(slot_bytes, 56), u64_at(slot_bytes, 64), u64_at(slot_bytes, 72), u64_at(slot_bytes, 80)];
    // One input in eight plays an agent that forges the op or sequence number.
    let forge = data[2] % 8 == 7;
    *f.reply.lock().unwrap() = (slot_bytes.to_vec(), agent_data.to_vec(), forge);
    f.answered.store(false, Ordering::SeqCst);

    // The host's input goes to the data area first (a scan pattern); the agent overwrites it.
    let input = &agent_data[..agent_data.len().min(MAX_PATTERN)];
    let outcome = f.link.call(op, args, input);
    assert!(f.answered.load(Ordering::SeqCst), "call returned before the agent answered");
    for slot in 0..RING_SLOTS {
        let state: u32 = f.memory.read_obj(GuestAddress(slot_gpa(slot))).unwrap();
        assert_eq!(state, SLOT_FREE, "slot {slot} is free again after the call");
    }
    let done = match (status, outcome) {
        (_, Err(AgentError::WrongSequence { .. })) if forge => return,
        (STATUS_OK, Ok(done)) => done,
        (STATUS_OUT_OF_WINDOW, Err(AgentError::OutOfWindow)) | (STATUS_BAD_ARGS, Err(AgentError::BadArgs)) => return,
        (STATUS_UNKNOWN_OP, Err(AgentError::UnknownOp(o))) if o == op => return,
        (STATUS_NOT_DISCOVERED, Err(AgentError::NotDiscovered)) | (STATUS_TOO_BIG, Err(AgentError::TooBig)) => return,
        (STATUS_OS_ERROR, Err(AgentError::Os(text))) => {
            assert!(text.len() <= 4096, "the agent's error text is bounded");
            return;
        }
        (s, Err(AgentError::Status(t))) if s == t && s > STATUS_TOO_BIG => return,
        (s, Err(e)) => panic!("status {s} came back as {e:?}"),
        (s, Ok(_)) => panic!("status {s} came back as a completion"),
    };
    assert_eq!(done.result, result, "the agent's result words");

    // Reads of the data area, with the lengths the daemon uses. Reads of up to the
    // whole 1 MiB slot cost more than the rest of a run, so unless data[1] is 0xff
    // the bounded lengths are capped at 64 KiB.
    let cap = if data[1] == 0xff { DATA_SLOT_SIZE as usize } else { 64 << 10 };
    let bounded = |n: u64| (n as usize).min(DATA_SLOT_SIZE as usize / 8) * 8;
    let bounded = |n: u64| bounded(n).min(cap);
    let shown = agent_data.len().min(4096);
    let read_len = (args[1] as usize).min(1 << 20).min(cap);
    let bytes = done.data(0, read_len as u64).expect("a read within the data slot");
    assert_eq!(&bytes[..read_len.min(shown)], &agent_data[..read_len.min(shown)]);
    assert_eq!(done.data(0, 32).unwrap().len(), 32);
    assert_eq!(done.data(0, bounded(result[0]) as u64).unwrap().len(), bounded(result[0]));
    // Whatever the agent claims, a read past the data area is an error, never a panic or
    // an allocation of what it claims.
    assert!(done.data(result[0], result[1]).is_ok() == result[0].checked_add(result[1]).is_some_and(|e| e <= DATA_SLOT_SIZE));
    // The daemon's clamped list reads (scan hits, latency samples, changed pages).
    let max = (cap / 8) as u64;
    let hits = done.u64s(4096, result[1], max).expect("clamped to the data area");
    assert!(hits.len() as u64 <= max.min((DATA_SLOT_SIZE - 4096) / 8));
    let samples = done.u64s(0, result[0], max).expect("clamped to the data area");
    assert!(samples.len() as u64 <= max);
});
