//! The inspector side of the mirror device: attach to a source, ask for
//! grants, check and map the fds it receives (PROT_READ, MAP_SHARED), and
//! receive events. Once [`Importer::start_events`] runs, a reader thread
//! routes events to a handler and replies to the requester.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::{ErrorCode, Grant, Message, Range, VcpuRegs, ACCESS_READ_ONLY, PROTOCOL_VERSION};
use crate::wire::{self, WireError};

const PAGE: u64 = 4096;
/// How long a request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A grant mapped read-only into this process.
pub struct MappedGrant {
    pub grant: Grant,
    map_base: *mut libc::c_void,
    map_len: usize,
    /// Address of the grant's first byte in this process.
    host_addr: u64,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid until drop; no thread affinity.
unsafe impl Send for MappedGrant {}
// SAFETY: read-only shared memory may be read from any thread.
unsafe impl Sync for MappedGrant {}

impl MappedGrant {
    /// Host address of the grant's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// The granted bytes. They change as the source guest runs.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: host_addr..+len lies inside the live PROT_READ mapping.
        unsafe { std::slice::from_raw_parts(self.host_addr as *const u8, self.grant.len as usize) }
    }
}

impl Drop for MappedGrant {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this object created.
        unsafe { libc::munmap(self.map_base, self.map_len) };
    }
}

/// Checks a received fd and maps `grant` from it.
pub fn map_grant(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl queries on an fd we own.
    let (seals, flags) = unsafe { (libc::fcntl(raw, libc::F_GET_SEALS), libc::fcntl(raw, libc::F_GETFL)) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(ImportError::Unsealed { grant: grant.id });
    }
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    let aligned = grant.offset & !(PAGE - 1);
    let lead = grant.offset - aligned;
    let map_len = (lead + grant.len).div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh PROT_READ shared mapping of a sealed file; the kernel picks the address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            raw,
            aligned as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(ImportError::Map { grant: grant.id, source: std::io::Error::last_os_error() });
    }
    Ok(MappedGrant { grant, map_base: base, map_len: map_len as usize, host_addr: base as u64 + lead, _fd: fd })
}

/// A source event an inspector reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    Revoke {
        grant_id: u64,
    },
    Discard {
        gpa: u64,
        len: u64,
    },
    Paused,
    Resumed,
    /// The source said it is exiting, or the connection dropped.
    Gone,
}

/// A message and the fds that came with it.
type Received = (Message, Vec<OwnedFd>);

/// A session with a source.
pub struct Importer {
    stream: UnixStream,
    pub ram_size: u64,
    pub vcpus: u32,
    replies: Option<Mutex<Receiver<Received>>>,
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
            request_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
        };
        match importer.request(&Message::Hello { version: PROTOCOL_VERSION })?.0 {
            Message::HelloAck { ram_size, vcpus, .. } => {
                importer.ram_size = ram_size;
                importer.vcpus = vcpus;
                Ok(importer)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Sends one frame, never interleaved with another thread's.
    fn send(&self, message: &Message) -> Result<(), WireError> {
        let _serialized = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        wire::send(&self.stream, message, &[])
    }

    fn next_reply(&self) -> Result<Received, ImportError> {
        match &self.replies {
            Some(rx) => rx.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(REPLY_TIMEOUT).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ImportError::Timeout,
                mpsc::RecvTimeoutError::Disconnected => ImportError::SourceGone,
            }),
            None => Ok(wire::recv(&self.stream)?),
        }
    }

    /// Sends a request and returns its reply; an Error reply becomes `Refused`.
    pub fn request(&self, message: &Message) -> Result<Received, ImportError> {
        let _serialized = self.request_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(send_error) = self.send(message) {
            // A source that refuses us replies and closes before our request lands: its
            // reason is still in our receive buffer and says more than EPIPE does.
            return match self.next_reply() {
                Ok((Message::Error { code, text }, _)) => Err(ImportError::Refused { code, text }),
                _ => Err(send_error.into()),
            };
        }
        let (reply, fds) = self.next_reply()?;
        if let Message::Error { code, text } = reply {
            return Err(ImportError::Refused { code, text });
        }
        Ok((reply, fds))
    }

    /// The source's RAM ranges.
    pub fn memory_map(&self) -> Result<Vec<Range>, ImportError> {
        match self.request(&Message::GetMemoryMap)?.0 {
            Message::MemoryMap { regions } => Ok(regions),
            other => Err(unexpected(other)),
        }
    }

    /// Asks for read-only grants of `ranges` and maps every piece.
    pub fn grant(&self, ranges: &[Range]) -> Result<Vec<MappedGrant>, ImportError> {
        let _serialized = self.request_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.send(&Message::GrantRequest { access: ACCESS_READ_ONLY, ranges: ranges.to_vec() })?;
        let mut mapped = Vec::new();
        loop {
            let (reply, fds) = self.next_reply()?;
            let (more, grants) = match reply {
                Message::GrantReply { more, grants } => (more, grants),
                Message::Error { code, text } => return Err(ImportError::Refused { code, text }),
                other => return Err(unexpected(other)),
            };
            let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
            for g in grants {
                let fd = fds
                    .get_mut(g.fd_index as usize)
                    .and_then(Option::take)
                    .ok_or(ImportError::MissingFd { grant: g.id, index: g.fd_index })?;
                mapped.push(map_grant(g, fd)?);
            }
            if !more {
                return Ok(mapped);
            }
        }
    }

    /// Gives a grant back.
    pub fn release(&self, grant_id: u64) -> Result<(), ImportError> {
        match self.request(&Message::Release { grant_id })?.0 {
            Message::Released { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Registers of the source's vCPUs.
    pub fn vcpu_state(&self) -> Result<Vec<VcpuRegs>, ImportError> {
        match self.request(&Message::GetVcpuState)?.0 {
            Message::VcpuState { vcpus } => Ok(vcpus),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledges a revoke once its mapping is gone.
    pub fn ack_revoke(&self, grant_id: u64) -> Result<(), ImportError> {
        Ok(self.send(&Message::RevokeAck { grant_id })?)
    }

    /// Starts the reader thread: events go to `handler` (on that thread), replies to requests.
    pub fn start_events<F>(self, mut handler: F) -> Result<Arc<Importer>, ImportError>
    where
        F: FnMut(&Importer, SourceEvent) + Send + 'static,
    {
        let (tx, rx): (Sender<Received>, _) = mpsc::channel();
        let reader = self.stream.try_clone().map_err(|e| ImportError::Wire(WireError::Io(e)))?;
        let importer = Arc::new(Importer { replies: Some(Mutex::new(rx)), ..self });
        let weak = Arc::downgrade(&importer);
        std::thread::Builder::new()
            .name("mirror-events".into())
            .spawn(move || loop {
                let event = match wire::recv(&reader) {
                    Ok((Message::Revoke { grant_id }, _)) => SourceEvent::Revoke { grant_id },
                    Ok((Message::Discard { gpa, len }, _)) => SourceEvent::Discard { gpa, len },
                    Ok((Message::Paused, _)) => SourceEvent::Paused,
                    Ok((Message::Resumed, _)) => SourceEvent::Resumed,
                    Ok((Message::SourceExiting, _)) | Err(_) => SourceEvent::Gone,
                    Ok(reply) => {
                        if tx.send(reply).is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let gone = event == SourceEvent::Gone;
                if let Some(importer) = weak.upgrade() {
                    handler(&importer, event);
                }
                if gone {
                    return;
                }
            })
            .map_err(|e| ImportError::Wire(WireError::Io(e)))?;
        Ok(importer)
    }
}

fn unexpected(message: Message) -> ImportError {
    ImportError::Unexpected(format!("{message:?}"))
}
