//! The host end of the agent's command ring: claim a slot, fill it, ring the
//! doorbell, wait for the agent to mark it done, collect the result.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_images::agent::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::doorbell::Doorbell;

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
}

/// A completed command.
pub struct Completion {
    pub result: [u64; 4],
    slot: usize,
    memory: GuestMemoryMmap,
}

impl Completion {
    /// Reads `len` bytes of the command's data area from `offset`.
    pub fn data(&self, offset: u64, len: usize) -> Result<Vec<u8>, AgentError> {
        let mut buf = vec![0u8; len];
        self.memory
            .read_slice(&mut buf, GuestAddress(data_gpa(self.slot) + offset))
            .map_err(|e| AgentError::Memory(e.to_string()))?;
        Ok(buf)
    }
}

/// The command ring of one agent.
pub struct AgentLink {
    memory: GuestMemoryMmap,
    doorbell: Arc<Doorbell>,
    free: Mutex<Vec<usize>>,
    seq: Mutex<u64>,
}

impl AgentLink {
    /// Writes the ring header (before the agent boots).
    pub fn new(
        memory: GuestMemoryMmap,
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
        };
        write_struct(&memory, RING_GPA, &header)?;
        Ok(Self { memory, doorbell, free: Mutex::new((0..RING_SLOTS).collect()), seq: Mutex::new(0) })
    }

    /// Waits until the agent reports it is serving.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let state = GuestAddress(RING_GPA + std::mem::offset_of!(RingHeader, agent_state) as u64);
        self.doorbell
            .wait_until(timeout, || self.memory.read_obj::<u32>(state).map(|s| s == AGENT_READY).unwrap_or(false))
    }

    /// Runs one command: `input` goes to the slot's data area first.
    pub fn call(&self, op: u32, args: [u64; 4], input: &[u8]) -> Result<Completion, AgentError> {
        let slot = self.claim()?;
        let outcome = self.run(slot, op, args, input);
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        outcome
    }

    fn claim(&self) -> Result<usize, AgentError> {
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(slot) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                return Ok(slot);
            }
            if std::time::Instant::now() > deadline {
                return Err(AgentError::Timeout(COMMAND_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run(&self, slot: usize, op: u32, args: [u64; 4], input: &[u8]) -> Result<Completion, AgentError> {
        if !input.is_empty() {
            self.memory
                .write_slice(input, GuestAddress(data_gpa(slot)))
                .map_err(|e| AgentError::Memory(e.to_string()))?;
        }
        let seq = {
            let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
            *seq += 1;
            *seq
        };
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
        if !self.doorbell.wait_until(COMMAND_TIMEOUT, done) {
            return Err(AgentError::Timeout(COMMAND_TIMEOUT));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        s = read_struct(&self.memory, slot_gpa(slot))?;
        self.memory
            .write_obj(SLOT_FREE, GuestAddress(slot_gpa(slot)))
            .map_err(|e| AgentError::Memory(e.to_string()))?;
        match s.status {
            STATUS_OK => Ok(Completion { result: s.result, slot, memory: self.memory.clone() }),
            STATUS_OUT_OF_WINDOW => Err(AgentError::OutOfWindow),
            STATUS_BAD_ARGS => Err(AgentError::BadArgs),
            STATUS_UNKNOWN_OP => Err(AgentError::UnknownOp(op)),
            other => Err(AgentError::Status(other)),
        }
    }
}

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
