//! The inspector side of the mirror device: attach to a source, ask for
//! grants, check and map the fds it receives (PROT_READ, MAP_SHARED), and
//! receive events. Once [`Importer::start_events`] runs, a reader thread
//! routes events to a handler and replies to the requester.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specula_common::sync::lock;

use crate::protocol::{
    Breakpoint, BreakpointHit, DirtyMechanism, ErrorCode, MemoryWrite, Message, MsrWrite, Range, VcpuRegs,
    ACCESS_READ_ONLY, EVENT_ID, PROTOCOL_VERSION,
};
use crate::wire::{self, Frame, WireError};

mod mapping;
#[cfg(test)]
mod tests;

pub use mapping::{map_device, map_foreign, map_grant, put_zero_pages, MappedGrant};

const PAGE: u64 = 4096;
/// How long a request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A source's dirty-page feed, as it described it when subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyFeed {
    /// How often the source collects written pages.
    pub interval: Duration,
    /// How it learns of them.
    pub mechanism: DirtyMechanism,
}

/// Failures on the inspector side.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot connect to the mirror socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mirror protocol")]
    Wire(#[from] WireError),
    #[error("the source refused: {code:?}: {text}")]
    Refused { code: ErrorCode, text: String },
    #[error("unexpected reply from the source: {0}")]
    Unexpected(String),
    #[error("grant {grant} refused: its fd lacks F_SEAL_SHRINK, so a shrink of the source's memory would SIGBUS us")]
    Unsealed { grant: u64 },
    #[error("grant {grant} refused: its fd lacks F_SEAL_FUTURE_WRITE, so its holder could re-open it writable")]
    WritableSeals { grant: u64 },
    #[error("grant {grant} refused: {offset:#x}+{len:#x} is not page-aligned or lies beyond its {size:#x}-byte file")]
    OutOfFile { grant: u64, offset: u64, len: u64, size: u64 },
    #[error("grant {grant} ({gpa:#x}+{len:#x}) refused: it is not within the ranges asked for")]
    NotAsked { grant: u64, gpa: u64, len: u64 },
    #[error("grant {grant} refused: its fd is open for writing; grants must be read-only")]
    Writable { grant: u64 },
    #[error("grant {grant} refused: its reply carried no fd at index {index}")]
    MissingFd { grant: u64, index: u32 },
    #[error("cannot map grant {grant}")]
    Map {
        grant: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the source did not reply in time")]
    Timeout,
    #[error("the source is gone")]
    SourceGone,
}

/// A source event an inspector reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    Revoke {
        grant_id: u64,
        /// To echo in the acknowledgement.
        nonce: u64,
    },
    Discard {
        gpa: u64,
        len: u64,
    },
    Paused,
    Resumed,
    /// Pages the source guest wrote in this inspector's grants (after
    /// [`Importer::subscribe_dirty`]); `coalesced`: the runs may cover unwritten pages too.
    Dirty {
        coalesced: bool,
        ranges: Vec<Range>,
    },
    /// The barrier of [`Importer::dirty_sync`]: every `Dirty` event the source's log held
    /// when it was asked came before this one.
    DirtySynced {
        token: u64,
    },
    /// A guest write to a traced MSR (after [`Importer::subscribe_trace`]), as the
    /// source applied it.
    MsrWrite(MsrWrite),
    /// A vCPU reached one of the breakpoints this connection set
    /// ([`Importer::set_breakpoints`]), with what the breakpoint's captures read.
    BreakpointHit(BreakpointHit),
    /// A guest write to one of the ranges this connection trapped
    /// ([`Importer::set_write_traps`]), as the source completed it.
    MemoryWrite(MemoryWrite),
    /// The source dropped `count` trace events since it last said so (over its rate
    /// cap, or behind a full queue).
    TraceDropped {
        count: u64,
    },
    /// The source said it is exiting, or the connection dropped.
    Gone,
}

impl SourceEvent {
    /// The event a frame with the event id carries, if it is one.
    fn from_message(message: &Message) -> Option<Self> {
        Some(match *message {
            Message::DirtyPages { coalesced, ref ranges } => SourceEvent::Dirty { coalesced, ranges: ranges.clone() },
            Message::Revoke { grant_id, nonce } => SourceEvent::Revoke { grant_id, nonce },
            Message::Discard { gpa, len } => SourceEvent::Discard { gpa, len },
            Message::Paused => SourceEvent::Paused,
            Message::Resumed => SourceEvent::Resumed,
            Message::SourceExiting => SourceEvent::Gone,
            Message::DirtySynced { token } => SourceEvent::DirtySynced { token },
            Message::TraceMsrWrite(write) => SourceEvent::MsrWrite(write),
            Message::TraceBreakpointHit(ref hit) => SourceEvent::BreakpointHit(hit.clone()),
            Message::TraceMemoryWrite(write) => SourceEvent::MemoryWrite(write),
            Message::TraceDropped { count } => SourceEvent::TraceDropped { count },
            _ => return None,
        })
    }
}

/// A session with a source.
pub struct Importer {
    stream: UnixStream,
    pub ram_size: u64,
    pub vcpus: u32,
    replies: Option<Mutex<Receiver<Frame>>>,
    /// Events that arrived before [`Importer::start_events`].
    early_events: Mutex<Vec<SourceEvent>>,
    next_id: AtomicU32,
    /// Serializes request/reply pairs.
    request_lock: Mutex<()>,
    /// Serializes frames on the socket: the event thread acknowledges revokes while
    /// other threads send requests.
    write_lock: Mutex<()>,
}

impl Importer {
    /// Connects to `path` and says hello.
    pub fn connect(path: &Path) -> Result<Self, ImportError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ImportError::Connect { path: path.display().to_string(), source })?;
        let mut importer = Self {
            stream,
            ram_size: 0,
            vcpus: 0,
            replies: None,
            early_events: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
            request_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
        };
        match importer.request(&Message::Hello { version: PROTOCOL_VERSION })?.message {
            Message::HelloAck { ram_size, vcpus, .. } => {
                importer.ram_size = ram_size;
                importer.vcpus = vcpus;
                Ok(importer)
            }
            other => Err(unexpected(other)),
        }
    }

    /// A fresh correlation id (never the event id).
    fn new_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != EVENT_ID {
                return id;
            }
        }
    }

    /// Sends one frame, never interleaved with another thread's.
    fn send(&self, id: u32, message: &Message) -> Result<(), WireError> {
        let _serialized = lock(&self.write_lock);
        wire::send(&self.stream, id, message, &[])
    }

    /// The next frame that answers request `id`. Late replies to earlier requests are
    /// dropped; an error the source sends unprompted (as it closes) answers any request.
    fn next_reply(&self, id: u32) -> Result<Frame, ImportError> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let frame = match &self.replies {
                Some(rx) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    lock(rx).recv_timeout(left).map_err(|e| match e {
                        mpsc::RecvTimeoutError::Timeout => ImportError::Timeout,
                        mpsc::RecvTimeoutError::Disconnected => ImportError::SourceGone,
                    })?
                }
                None => wire::recv(&self.stream)?,
            };
            if frame.id == id || (frame.id == EVENT_ID && matches!(frame.message, Message::Error { .. })) {
                return Ok(frame);
            }
            if frame.id == EVENT_ID {
                if let Some(event) = SourceEvent::from_message(&frame.message) {
                    lock(&self.early_events).push(event);
                    continue;
                }
            }
            log::debug!("mirror: dropping a stale reply (id {}) while waiting for {id}", frame.id);
            if Instant::now() >= deadline {
                return Err(ImportError::Timeout);
            }
        }
    }

    /// Sends a request and returns its reply; an Error reply becomes `Refused`.
    pub fn request(&self, message: &Message) -> Result<Frame, ImportError> {
        let _serialized = lock(&self.request_lock);
        let id = self.new_id();
        if let Err(send_error) = self.send(id, message) {
            // A source that refuses us replies and closes before our request lands: its
            // reason is still in our receive buffer and says more than EPIPE does.
            return match self.next_reply(id) {
                Ok(Frame { message: Message::Error { code, text }, .. }) => Err(ImportError::Refused { code, text }),
                _ => Err(send_error.into()),
            };
        }
        let frame = self.next_reply(id)?;
        if let Message::Error { code, text } = frame.message {
            return Err(ImportError::Refused { code, text });
        }
        Ok(frame)
    }

    /// The source's RAM ranges.
    pub fn memory_map(&self) -> Result<Vec<Range>, ImportError> {
        match self.request(&Message::GetMemoryMap)?.message {
            Message::MemoryMap { regions } => Ok(regions),
            other => Err(unexpected(other)),
        }
    }

    /// Asks for read-only grants of `ranges` and maps every piece. On any failure every
    /// piece mapped so far is unmapped and released, so nothing is left half-mapped.
    pub fn grant(&self, ranges: &[Range]) -> Result<Vec<MappedGrant>, ImportError> {
        let mut mapped = Vec::new();
        let outcome = self.grant_into(ranges, &mut mapped);
        if outcome.is_err() {
            let ids: Vec<u64> = mapped.iter().map(|m| m.grant.id).collect();
            drop(mapped);
            for id in ids {
                let _ = self.release(id);
            }
            return outcome.map(|()| Vec::new());
        }
        Ok(mapped)
    }

    fn grant_into(&self, ranges: &[Range], mapped: &mut Vec<MappedGrant>) -> Result<(), ImportError> {
        let _serialized = lock(&self.request_lock);
        let id = self.new_id();
        self.send(id, &Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: ranges.to_vec() })?;
        loop {
            let Frame { message, fds, .. } = self.next_reply(id)?;
            let (more, grants) = match message {
                Message::GrantReply { more, grants } => (more, grants),
                Message::Error { code, text } => return Err(ImportError::Refused { code, text }),
                other => return Err(unexpected(other)),
            };
            let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
            for g in grants {
                if !ranges.iter().any(|r| g.gpa >= r.gpa && g.gpa.saturating_add(g.len) <= r.gpa.saturating_add(r.len))
                {
                    return Err(ImportError::NotAsked { grant: g.id, gpa: g.gpa, len: g.len });
                }
                let fd = fds
                    .get_mut(g.fd_index as usize)
                    .and_then(Option::take)
                    .ok_or(ImportError::MissingFd { grant: g.id, index: g.fd_index })?;
                mapped.push(map_grant(g, fd)?);
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Gives a grant back.
    pub fn release(&self, grant_id: u64) -> Result<(), ImportError> {
        match self.request(&Message::Release { grant_id })?.message {
            Message::Released { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Registers of the source's vCPUs.
    pub fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, ImportError> {
        match self.request(&Message::GetVcpuState)?.message {
            Message::VcpuState { vcpus } => Ok(vcpus),
            other => Err(unexpected(other)),
        }
    }

    /// Pauses (`true`) or resumes the source, where it allows inspectors to.
    pub fn set_paused(&self, paused: bool) -> Result<(), ImportError> {
        let request = if paused { Message::PauseRequest } else { Message::ResumeRequest };
        match self.request(&request)?.message {
            Message::Paused | Message::Resumed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Asks for the pages the source guest writes in this connection's grants, as
    /// [`SourceEvent::Dirty`] events; returns how often and how the source collects them.
    pub fn subscribe_dirty(&self) -> Result<DirtyFeed, ImportError> {
        match self.request(&Message::DirtySubscribe)?.message {
            Message::DirtySubscribed { interval_us, mechanism } => {
                Ok(DirtyFeed { interval: Duration::from_micros(u64::from(interval_us)), mechanism })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Asks for the source's trace events of `kinds` (bits of
    /// [`crate::protocol::trace_kind`]; 0 stops them) as events; returns the source's
    /// cap on trace events per second.
    pub fn subscribe_trace(&self, kinds: u32) -> Result<u32, ImportError> {
        match self.request(&Message::TraceSubscribe { kinds })?.message {
            Message::TraceSubscribed { kinds: granted, max_per_second } if granted == kinds => Ok(max_per_second),
            other => Err(unexpected(other)),
        }
    }

    /// Arms exactly these breakpoints in the source's guest, hardware or `software`
    /// (none: disarms), their hits arriving as [`SourceEvent::BreakpointHit`]; returns
    /// how many are armed.
    pub fn set_breakpoints(&self, software: bool, points: &[Breakpoint]) -> Result<u32, ImportError> {
        match self.request(&Message::TraceBreakpoints { software, points: points.to_vec() })?.message {
            Message::TraceBreakpointsSet { count } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Traps the guest's writes to exactly these guest-physical ranges (none: disarms),
    /// each arriving as [`SourceEvent::MemoryWrite`]; returns the pages trapped.
    pub fn set_write_traps(&self, ranges: &[Range]) -> Result<u64, ImportError> {
        match self.request(&Message::TraceWriteTraps { ranges: ranges.to_vec() })?.message {
            Message::TraceWriteTrapsSet { pages } => Ok(pages),
            other => Err(unexpected(other)),
        }
    }

    /// Asks a subscribed source to collect its dirty log now: its written pages arrive as
    /// `Dirty` events, followed by [`SourceEvent::DirtySynced`] with `token`, on the event
    /// handler, before this returns.
    pub fn dirty_sync(&self, token: u64) -> Result<(), ImportError> {
        match self.request(&Message::DirtySync { token })?.message {
            Message::DirtySynced { token: echoed } if echoed == token => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledges a revoke once its mapping is gone.
    pub fn ack_revoke(&self, grant_id: u64, nonce: u64) -> Result<(), ImportError> {
        Ok(self.send(EVENT_ID, &Message::RevokeAck { grant_id, nonce })?)
    }

    /// Starts the reader thread: events go to `handler` (on that thread, starting with any
    /// that arrived earlier), replies to requests.
    pub fn start_events<F>(self, mut handler: F) -> Result<Arc<Importer>, ImportError>
    where
        F: FnMut(&Importer, SourceEvent) + Send + 'static,
    {
        let (tx, rx): (Sender<Frame>, _) = mpsc::channel();
        let reader = self.stream.try_clone().map_err(|e| ImportError::Wire(WireError::Io(e)))?;
        let early = std::mem::take(&mut *lock(&self.early_events));
        let importer = Arc::new(Importer { replies: Some(Mutex::new(rx)), ..self });
        let weak = Arc::downgrade(&importer);
        std::thread::Builder::new()
            .name("mirror-events".into())
            .spawn(move || {
                let mut deliver = |event: SourceEvent| {
                    if let Some(importer) = weak.upgrade() {
                        handler(&importer, event);
                    }
                };
                early.into_iter().for_each(&mut deliver);
                loop {
                    let frame = match wire::recv(&reader) {
                        Ok(frame) => frame,
                        Err(_) => {
                            deliver(SourceEvent::Gone);
                            return;
                        }
                    };
                    match (frame.id, SourceEvent::from_message(&frame.message)) {
                        (EVENT_ID, Some(event)) => {
                            let gone = event == SourceEvent::Gone;
                            deliver(event);
                            if gone {
                                return;
                            }
                        }
                        _ => {
                            if tx.send(frame).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| ImportError::Wire(WireError::Io(e)))?;
        Ok(importer)
    }
}

fn unexpected(message: Message) -> ImportError {
    ImportError::Unexpected(format!("{message:?}"))
}
