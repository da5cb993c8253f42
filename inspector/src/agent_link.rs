//! The host end of the agent's command ring: claim a slot, fill it, ring the
//! doorbell, wait for the agent to mark it done, collect the result.
//!
//! The agent is not trusted. A completion counts only if it carries the slot's
//! sequence number and operation; a slot whose command timed out is not reused
//! until the agent hands it back (marks it done), so a late completion can never
//! be read as the answer to a later command; every length read back is clamped
//! to the slot's data area.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_images::agent::*;
use specula_common::sync::lock;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::doorbell::Doorbell;
use vmm::memory::SharedMemory;

/// How long one command may take (a full 1 GiB SHA-256 takes a few seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Failures talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent's memory could not be accessed: {0}")]
    Memory(String),
    #[error("the agent did not complete the command within {0:?}")]
    Timeout(Duration),
    #[error("the range lies outside the mirror window")]
    OutOfWindow,
    #[error("the agent refused the command's arguments")]
    BadArgs,
    #[error("the agent does not know operation {0}")]
    UnknownOp(u32),
    #[error("the agent returned status {0}")]
    Status(u32),
    #[error("the agent completed slot {slot} with sequence {got} (op {op}), expected {expected}")]
    WrongSequence { slot: usize, expected: u64, got: u64, op: u32 },
    #[error("the agent's reply claims {len} bytes at offset {offset}, beyond its {DATA_SLOT_SIZE}-byte data area")]
    OutOfSlot { offset: u64, len: u64 },
    #[error("every command slot is held by a command the agent never completed")]
    NoFreeSlot,
    #[error("the agent has not found the source's kernel yet")]
    NotDiscovered,
    #[error("the agent's reply does not fit its data area")]
    TooBig,
    #[error("{0}")]
    Os(String),
    /// The source exited and took its memory with it (a source by pid): whatever the
    /// agent read of it since is zero pages, not an answer.
    #[error("the source exited and its memory went with it: the agent has nothing of it to read")]
    SourceMemoryGone,
}

/// A completed command. Its slot (and data area) stays reserved until it is dropped.
pub struct Completion<'a> {
    pub result: [u64; 4],
    slot: usize,
    link: &'a AgentLink,
}

impl Completion<'_> {
    /// Reads `len` bytes of the command's data area from `offset`; fails if the range
    /// leaves the data area (lengths the agent reports are not trusted).
    pub fn data(&self, offset: u64, len: u64) -> Result<Vec<u8>, AgentError> {
        if offset.checked_add(len).is_none_or(|end| end > DATA_SLOT_SIZE) {
            return Err(AgentError::OutOfSlot { offset, len });
        }
        let mut buf = vec![0u8; len as usize];
        self.link
            .memory
            .read_slice(&mut buf, GuestAddress(data_gpa(self.slot) + offset))
            .map_err(|e| AgentError::Memory(e.to_string()))?;
        Ok(buf)
    }

    /// Up to `max` u64s stored from data offset `offset`, `count` of them as the agent
    /// claims, clamped to `max` and to the data area.
    pub fn u64s(&self, offset: u64, count: u64, max: u64) -> Result<Vec<u64>, AgentError> {
        let room = DATA_SLOT_SIZE.saturating_sub(offset) / 8;
        let count = count.min(max).min(room);
        let raw = self.data(offset, count * 8)?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        self.link.release(self.slot);
    }
}

/// The command ring of one agent.
pub struct AgentLink {
    memory: SharedMemory,
    doorbell: Arc<Doorbell>,
    free: Mutex<Vec<usize>>,
    /// Slots whose command timed out, with its sequence number: reusable only once the
    /// agent marks them done.
    abandoned: Mutex<Vec<(usize, u64)>>,
    seq: Mutex<u64>,
    /// Set once the source's memory is gone: no command answers from then on, and
    /// none that was running when it went.
    source_memory_gone: std::sync::atomic::AtomicBool,
}

/// A random word from the kernel (getrandom).
fn random_u64() -> Result<u64, AgentError> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into a live buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        return Err(AgentError::Memory(format!("getrandom: {}", std::io::Error::last_os_error())));
    }
    Ok(u64::from_le_bytes(bytes))
}

impl AgentLink {
    /// Writes the ring header (before the agent boots).
    pub fn new(
        memory: SharedMemory,
        doorbell: Arc<Doorbell>,
        window_base: u64,
        window_len: u64,
    ) -> Result<Self, AgentError> {
        let header = RingHeader {
            magic: RING_MAGIC,
            window_base,
            window_len,
            agent_state: AGENT_BOOTING,
            slots: RING_SLOTS as u32,
            completed: 0,
            digest_key: [random_u64()?, random_u64()?],
        };
        write_struct(&memory, RING_GPA, &header)?;
        Ok(Self {
            memory,
            doorbell,
            free: Mutex::new((0..RING_SLOTS).collect()),
            abandoned: Mutex::new(Vec::new()),
            seq: Mutex::new(0),
            source_memory_gone: Default::default(),
        })
    }

    /// Waits until the agent reports it is serving.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let state = GuestAddress(RING_GPA + std::mem::offset_of!(RingHeader, agent_state) as u64);
        self.doorbell
            .wait_until(timeout, || self.memory.read_obj::<u32>(state).map(|s| s == AGENT_READY).unwrap_or(false))
    }

    /// Runs one command: `input` goes to the slot's data area first.
    pub fn call(&self, op: u32, args: [u64; 4], input: &[u8]) -> Result<Completion<'_>, AgentError> {
        self.call_within(op, args, input, COMMAND_TIMEOUT)
    }

    /// [`AgentLink::call`] with its own deadline.
    pub fn call_within(
        &self,
        op: u32,
        args: [u64; 4],
        input: &[u8],
        timeout: Duration,
    ) -> Result<Completion<'_>, AgentError> {
        let gone = || self.source_memory_gone.load(std::sync::atomic::Ordering::SeqCst);
        if gone() {
            return Err(AgentError::SourceMemoryGone);
        }
        let slot = self.claim()?;
        let seq = self.next_seq();
        match self.run(slot, seq, op, args, input, timeout) {
            // The agent may have read zero pages where the source's memory was.
            Ok(_) if gone() => {
                self.release(slot);
                Err(AgentError::SourceMemoryGone)
            }
            Ok(result) => Ok(Completion { result, slot, link: self }),
            Err(AgentError::Timeout(t)) => {
                // The agent may still be working on it: keep the slot until it says done.
                lock(&self.abandoned).push((slot, seq));
                Err(AgentError::Timeout(t))
            }
            Err(e) => {
                self.release(slot);
                Err(e)
            }
        }
    }

    /// From now on every command fails with [`AgentError::SourceMemoryGone`], and so
    /// does each one running now, whatever the agent answers.
    pub fn mark_source_memory_gone(&self) {
        self.source_memory_gone.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn release(&self, slot: usize) {
        lock(&self.free).push(slot);
    }

    fn next_seq(&self) -> u64 {
        let mut seq = lock(&self.seq);
        *seq += 1;
        *seq
    }

    /// Returns abandoned slots the agent has since completed to the free list.
    fn reclaim_abandoned(&self) {
        let mut abandoned = lock(&self.abandoned);
        abandoned.retain(|&(slot, _)| {
            let done = self.memory.read_obj::<u32>(GuestAddress(slot_gpa(slot))).is_ok_and(|st| st == SLOT_DONE);
            if done && self.memory.write_obj(SLOT_FREE, GuestAddress(slot_gpa(slot))).is_ok() {
                lock(&self.free).push(slot);
                return false;
            }
            true
        });
    }

    fn claim(&self) -> Result<usize, AgentError> {
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        loop {
            self.reclaim_abandoned();
            if let Some(slot) = lock(&self.free).pop() {
                return Ok(slot);
            }
            if lock(&self.abandoned).len() == RING_SLOTS {
                return Err(AgentError::NoFreeSlot);
            }
            if std::time::Instant::now() > deadline {
                return Err(AgentError::Timeout(COMMAND_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run(
        &self,
        slot: usize,
        seq: u64,
        op: u32,
        args: [u64; 4],
        input: &[u8],
        timeout: Duration,
    ) -> Result<[u64; 4], AgentError> {
        if !input.is_empty() {
            self.memory
                .write_slice(input, GuestAddress(data_gpa(slot)))
                .map_err(|e| AgentError::Memory(e.to_string()))?;
        }
        let mut s = Slot { state: SLOT_FREE, op, seq, args, status: 0, _pad: 0, result: [0; 4] };
        write_struct(&self.memory, slot_gpa(slot), &s)?;
        // Publish the state last: the agent reads the other fields once it sees SUBMITTED.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.memory
            .write_obj(SLOT_SUBMITTED, GuestAddress(slot_gpa(slot)))
            .map_err(|e| AgentError::Memory(e.to_string()))?;
        self.doorbell.ring();
        let done =
            || self.memory.read_obj::<u32>(GuestAddress(slot_gpa(slot))).map(|st| st == SLOT_DONE).unwrap_or(false);
        if !self.doorbell.wait_until(timeout, done) {
            return Err(AgentError::Timeout(timeout));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        s = read_struct(&self.memory, slot_gpa(slot))?;
        self.memory
            .write_obj(SLOT_FREE, GuestAddress(slot_gpa(slot)))
            .map_err(|e| AgentError::Memory(e.to_string()))?;
        if s.seq != seq || s.op != op {
            return Err(AgentError::WrongSequence { slot, expected: seq, got: s.seq, op: s.op });
        }
        match s.status {
            STATUS_OK => Ok(s.result),
            STATUS_OUT_OF_WINDOW => Err(AgentError::OutOfWindow),
            STATUS_BAD_ARGS => Err(AgentError::BadArgs),
            STATUS_UNKNOWN_OP => Err(AgentError::UnknownOp(op)),
            STATUS_NOT_DISCOVERED => Err(AgentError::NotDiscovered),
            STATUS_TOO_BIG => Err(AgentError::TooBig),
            STATUS_OS_ERROR => Err(AgentError::Os(self.error_text(slot))),
            other => Err(AgentError::Status(other)),
        }
    }

    /// The error text an OS command left in its data area (`u32 len` + text), bounded.
    fn error_text(&self, slot: usize) -> String {
        let at = GuestAddress(data_gpa(slot));
        let len = self.memory.read_obj::<u32>(at).unwrap_or(0).min(MAX_ERROR_TEXT);
        let mut text = vec![0u8; len as usize];
        let _ = self.memory.read_slice(&mut text, GuestAddress(data_gpa(slot) + 4));
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// Longest error text taken from the agent.
const MAX_ERROR_TEXT: u32 = 1024;

fn write_struct<T: Copy>(memory: &GuestMemoryMmap, gpa: u64, value: &T) -> Result<(), AgentError> {
    // SAFETY: T is a repr(C) plain-data ABI struct; viewing it as bytes is sound.
    let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) };
    memory.write_slice(bytes, GuestAddress(gpa)).map_err(|e| AgentError::Memory(e.to_string()))
}

fn read_struct<T: Copy>(memory: &GuestMemoryMmap, gpa: u64) -> Result<T, AgentError> {
    let mut bytes = vec![0u8; std::mem::size_of::<T>()];
    memory.read_slice(&mut bytes, GuestAddress(gpa)).map_err(|e| AgentError::Memory(e.to_string()))?;
    // SAFETY: T is a repr(C) plain-data ABI struct valid for any bit pattern, read unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A real command ring over real guest memory with a scripted agent on the other
/// end, for tests of what the host does with hostile replies.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    const WINDOW: u64 = 1 << 32;

    pub(crate) fn ring() -> (AgentLink, SharedMemory, Arc<Doorbell>) {
        let size = (WATCH_GPA.next_multiple_of(4096)).max(vmm::memory::MIN_MEMORY);
        let memory = vmm::memory::GuestRam::new(size).unwrap().shared_memory();
        let doorbell = Arc::new(Doorbell::new());
        let link = AgentLink::new(memory.clone(), doorbell.clone(), WINDOW, 1 << 20).unwrap();
        (link, memory, doorbell)
    }

    /// A hostile or slow agent: answers each submitted slot with `answer(slot copy)` after
    /// `delay(slot copy)`, writing back whatever `answer` returns.
    pub(crate) fn fake_agent(
        memory: SharedMemory,
        doorbell: Arc<Doorbell>,
        stop: Arc<AtomicBool>,
        delay: impl Fn(&Slot) -> Duration + Send + 'static,
        answer: impl Fn(Slot) -> Slot + Send + Sync + 'static,
    ) -> std::thread::JoinHandle<()> {
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            let mut seen = [0u64; RING_SLOTS];
            while !stop.load(Ordering::SeqCst) {
                for (i, last) in seen.iter_mut().enumerate() {
                    let s: Slot = read_struct(&memory, slot_gpa(i)).unwrap();
                    if s.state != SLOT_SUBMITTED || s.seq == *last {
                        continue;
                    }
                    *last = s.seq;
                    let (memory, doorbell, answer, wait) =
                        (memory.clone(), doorbell.clone(), answer.clone(), delay(&s));
                    std::thread::spawn(move || {
                        std::thread::sleep(wait);
                        // As the agent does: the answer first, then the state that says
                        // it is there (a host that sees DONE must read the answer).
                        let mut reply = answer(s);
                        reply.state = SLOT_SUBMITTED;
                        write_struct(&memory, slot_gpa(i), &reply).unwrap();
                        std::sync::atomic::fence(Ordering::Release);
                        memory.write_obj(SLOT_DONE, GuestAddress(slot_gpa(i))).unwrap();
                        doorbell.guest_done();
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    }

    /// Slot `i` as it is now.
    pub(crate) fn slot_at(memory: &SharedMemory, i: usize) -> Option<Slot> {
        read_struct(memory, slot_gpa(i)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{fake_agent, ring};
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn echo(mut s: Slot) -> Slot {
        s.status = STATUS_OK;
        s.result = [s.args[0], 0, 0, 0];
        s
    }

    #[test]
    fn a_late_completion_is_never_taken_for_a_later_command() {
        let (link, memory, doorbell) = ring();
        let stop = Arc::new(AtomicBool::new(false));
        // The agent sits on command 1 for 300 ms, answering it only after it timed out.
        let slow = |s: &Slot| if s.args[0] == 1 { Duration::from_millis(300) } else { Duration::ZERO };
        let agent = fake_agent(memory, doorbell, stop.clone(), slow, echo);
        assert!(matches!(
            link.call_within(OP_READ, [1, 0, 0, 0], &[], Duration::from_millis(50)),
            Err(AgentError::Timeout(_))
        ));
        // Keep commands flowing while the late answer lands.
        let started = std::time::Instant::now();
        let mut n = 2u64;
        while started.elapsed() < Duration::from_millis(600) {
            let done = link.call(OP_READ, [n, 0, 0, 0], &[]).unwrap();
            assert_eq!(done.result[0], n, "command {n} got its own answer");
            n += 1;
        }
        assert_eq!(lock(&link.free).len(), RING_SLOTS, "the late slot came back once the agent finished");
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap();
    }

    /// The source's memory went while a command ran (the vCPU's EFAULT, mended with
    /// zero pages): its answer is refused, and so is every later command, slots freed.
    #[test]
    fn once_the_source_memory_is_gone_no_answer_is_taken() {
        let (link, memory, doorbell) = ring();
        let link = Arc::new(link);
        let stop = Arc::new(AtomicBool::new(false));
        let slow = |s: &Slot| if s.args[0] == 1 { Duration::from_millis(300) } else { Duration::ZERO };
        let agent = fake_agent(memory, doorbell, stop.clone(), slow, echo);
        assert_eq!(link.call(OP_READ, [7, 0, 0, 0], &[]).unwrap().result[0], 7, "answers while the memory is there");
        let running = {
            let link = link.clone();
            std::thread::spawn(move || link.call(OP_SCAN, [1, 0, 0, 0], &[]).map(|done| done.result[0]))
        };
        std::thread::sleep(Duration::from_millis(100));
        link.mark_source_memory_gone();
        assert!(matches!(running.join().unwrap(), Err(AgentError::SourceMemoryGone)), "the command running then");
        assert!(matches!(link.call(OP_READ, [2, 0, 0, 0], &[]), Err(AgentError::SourceMemoryGone)), "a later one");
        assert_eq!(lock(&link.free).len(), RING_SLOTS, "no slot is lost");
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap();
    }

    #[test]
    fn a_completion_with_another_sequence_number_is_refused() {
        let (link, memory, doorbell) = ring();
        let stop = Arc::new(AtomicBool::new(false));
        let forge = |s: Slot| Slot { seq: s.seq + 1, ..echo(s) };
        let agent = fake_agent(memory, doorbell, stop.clone(), |_| Duration::ZERO, forge);
        let err = link.call(OP_READ, [5, 0, 0, 0], &[]).err().expect("a forged sequence is an error");
        assert!(matches!(err, AgentError::WrongSequence { .. }), "{err}");
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap();
    }

    #[test]
    fn counts_and_lengths_from_the_agent_are_clamped_to_the_data_area() {
        let (link, memory, doorbell) = ring();
        let stop = Arc::new(AtomicBool::new(false));
        let huge = |s: Slot| Slot { result: [u64::MAX, u64::MAX / 8, 0, 0], ..echo(s) };
        let agent = fake_agent(memory, doorbell, stop.clone(), |_| Duration::ZERO, huge);
        let done = link.call(OP_SCAN, [0; 4], &[]).unwrap();
        assert_eq!(done.u64s(4096, done.result[1], 10).unwrap().len(), 10, "clamped to the caller's maximum");
        let all = done.u64s(4096, done.result[1], u64::MAX).unwrap();
        assert_eq!(all.len() as u64, (DATA_SLOT_SIZE - 4096) / 8, "clamped to the data area");
        assert!(matches!(done.data(0, done.result[0]), Err(AgentError::OutOfSlot { .. })));
        assert!(matches!(done.data(DATA_SLOT_SIZE - 4, 8), Err(AgentError::OutOfSlot { .. })));
        drop(done);
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap();
    }

    #[test]
    fn an_agent_that_never_answers_runs_out_of_slots_instead_of_hanging() {
        let (link, _memory, _doorbell) = ring();
        for _ in 0..RING_SLOTS {
            let outcome = link.call_within(OP_READ, [0; 4], &[], Duration::from_millis(1));
            assert!(matches!(outcome, Err(AgentError::Timeout(_))));
        }
        assert!(matches!(link.call(OP_READ, [0; 4], &[]), Err(AgentError::NoFreeSlot)));
    }
}
