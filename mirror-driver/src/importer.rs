//! The inspector side of the mirror device: attach to a source, ask for
//! grants, check and map the fds it receives (PROT_READ, MAP_SHARED), and
//! receive events. Once [`Importer::start_events`] runs, a reader thread
//! routes events to a handler and replies to the requester.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memfd::GRANT_SEALS;
use crate::protocol::{
    DirtyMechanism, ErrorCode, Grant, Message, Range, VcpuRegs, ACCESS_READ_ONLY, EVENT_ID, PROTOCOL_VERSION,
};
use crate::wire::{self, Frame, WireError};

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

/// A grant mapped read-only into this process.
pub struct MappedGrant {
    pub grant: Grant,
    map_base: *mut libc::c_void,
    map_len: usize,
    /// Address of the grant's first byte in this process.
    host_addr: u64,
    /// Moved into a caller's reservation ([`MappedGrant::relocate`]).
    relocated: bool,
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

    /// Bytes this grant's mapping spans (whole pages).
    pub fn map_len(&self) -> u64 {
        self.map_len as u64
    }

    /// Moves the mapping to `addr` (page-aligned), so that grants side by side in
    /// guest-physical space sit side by side in this process and one memslot covers them.
    /// From then on, dropping the grant leaves private zero pages where it was instead of
    /// a hole: the memslot over it keeps a backing that holds nothing of the source, and
    /// no later mapping of this process can land inside the memslot.
    ///
    /// # Safety
    /// `addr..addr + self.map_len()` must be a mapping the caller owns and hands over to
    /// this grant for the life of the process (the caller never unmaps it).
    pub unsafe fn relocate(&mut self, addr: u64) -> Result<(), ImportError> {
        // SAFETY: moves exactly this grant's mapping over the caller's reservation (the
        // caller's contract); MREMAP_FIXED replaces what was there atomically.
        let moved = unsafe {
            libc::mremap(
                self.map_base,
                self.map_len,
                self.map_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                addr as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(ImportError::Map { grant: self.grant.id, source: std::io::Error::last_os_error() });
        }
        let lead = self.host_addr - self.map_base as u64;
        self.map_base = moved;
        self.host_addr = moved as u64 + lead;
        self.relocated = true;
        Ok(())
    }

    /// The granted bytes. They change as the source guest runs.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: host_addr..+len lies inside the live PROT_READ mapping.
        unsafe { std::slice::from_raw_parts(self.host_addr as *const u8, self.grant.len as usize) }
    }
}

impl Drop for MappedGrant {
    fn drop(&mut self) {
        if !self.relocated {
            // SAFETY: unmapping exactly the mapping this object created.
            unsafe { libc::munmap(self.map_base, self.map_len) };
            return;
        }
        // SAFETY: replaces exactly this grant's mapping, inside the reservation it was
        // handed, with private zero pages; the kernel's MMU notifiers zap every secondary
        // mapping (KVM's) of the old pages before mmap returns.
        let zeros = unsafe {
            libc::mmap(
                self.map_base,
                self.map_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if zeros == libc::MAP_FAILED {
            // The old mapping may be gone and a hole left inside a memslot, where a later
            // mapping of this process could land and be read by the agent: stop here.
            eprintln!(
                "mirror: cannot put zero pages in place of grant {} ({}); aborting rather than leave a hole",
                self.grant.id,
                std::io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

/// Maps a range of another VMM's RAM file (QEMU's memfd) opened read-only: the fd must
/// be O_RDONLY and large enough; seals are the other VMM's business.
pub fn map_foreign(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    check_extent(&grant, &fd)?;
    map_checked(grant, fd)
}

/// Maps a range the kernel mirror device attached ([`crate::kernel_mirror`]): the fd
/// must be read-only. Its extent is the device's (an anonymous inode has no size to
/// check): it refuses a mapping beyond the attached range.
pub fn map_device(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    let aligned = grant.len > 0 && grant.offset.is_multiple_of(PAGE) && grant.len.is_multiple_of(PAGE);
    if !aligned || usize::try_from(grant.len).is_err() {
        return Err(ImportError::OutOfFile { grant: grant.id, offset: grant.offset, len: grant.len, size: 0 });
    }
    map_checked(grant, fd)
}

/// Checks a received fd (read-only, sealed against shrink and future writes, large
/// enough for the grant) and maps `grant` from it.
pub fn map_grant(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl queries on an fd we own.
    let (seals, flags) = unsafe { (libc::fcntl(raw, libc::F_GET_SEALS), libc::fcntl(raw, libc::F_GETFL)) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(ImportError::Unsealed { grant: grant.id });
    }
    if seals & GRANT_SEALS != GRANT_SEALS {
        return Err(ImportError::WritableSeals { grant: grant.id });
    }
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(ImportError::Writable { grant: grant.id });
    }
    check_extent(&grant, &fd)?;
    map_checked(grant, fd)
}

/// Maps a grant whose fd passed its checks, PROT_READ and MAP_SHARED.
fn map_checked(grant: Grant, fd: OwnedFd) -> Result<MappedGrant, ImportError> {
    let raw = fd.as_raw_fd();
    let aligned = grant.offset & !(PAGE - 1);
    let lead = grant.offset - aligned;
    let map_len = (lead + grant.len).div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh PROT_READ shared mapping of a checked file; the kernel picks the address.
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
    Ok(MappedGrant {
        grant,
        map_base: base,
        map_len: map_len as usize,
        host_addr: base as u64 + lead,
        relocated: false,
        _fd: fd,
    })
}

/// Fails unless the grant is page-aligned, non-empty and lies inside the fd's file
/// (a mapping beyond the end would SIGBUS on first touch).
fn check_extent(grant: &Grant, fd: &OwnedFd) -> Result<(), ImportError> {
    // SAFETY: stat is plain data; fstat fills it for an fd we own.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let size = if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } == 0 { stat.st_size as u64 } else { 0 };
    let fits = grant.len > 0
        && grant.offset.is_multiple_of(PAGE)
        && grant.len.is_multiple_of(PAGE)
        && grant.offset.checked_add(grant.len).is_some_and(|end| end <= size)
        && usize::try_from(grant.len).is_ok();
    if fits {
        Ok(())
    } else {
        Err(ImportError::OutOfFile { grant: grant.id, offset: grant.offset, len: grant.len, size })
    }
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn unexpected(message: Message) -> ImportError {
    ImportError::Unexpected(format!("{message:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixListener;

    /// A source that answers each request first with a stale reply (another id), then
    /// with the right one.
    fn double_talking_source(path: &Path) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            while let Ok(frame) = wire::recv(&stream) {
                let reply = match frame.message {
                    Message::Hello { .. } => {
                        Message::HelloAck { version: PROTOCOL_VERSION, ram_size: 1 << 20, vcpus: 1 }
                    }
                    Message::GetMemoryMap => Message::MemoryMap { regions: vec![Range { gpa: 0, len: 1 << 20 }] },
                    _ => Message::Error { code: ErrorCode::UnknownMessage, text: "no".into() },
                };
                let stale = Message::MemoryMap { regions: vec![Range { gpa: 0xbad000, len: 4096 }] };
                wire::send(&stream, frame.id.wrapping_add(1000), &stale, &[]).unwrap();
                wire::send(&stream, frame.id, &reply, &[]).unwrap();
            }
        })
    }

    #[test]
    fn replies_to_other_requests_are_never_taken_for_this_one() {
        let dir = std::env::temp_dir().join(format!("specula-importer-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let source = double_talking_source(&path);
        let importer = Importer::connect(&path).expect("the HelloAck with the right id is found");
        for _ in 0..3 {
            assert_eq!(importer.memory_map().unwrap(), vec![Range { gpa: 0, len: 1 << 20 }]);
        }
        drop(importer);
        source.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn grant_fd(size: u64, grant_seals: bool) -> OwnedFd {
        let file = crate::memfd::create_ram_memfd(size).unwrap();
        if grant_seals {
            crate::memfd::seal_future_writes(&file).unwrap();
        }
        std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap().into()
    }

    #[test]
    fn a_relocated_grant_leaves_zero_pages_not_a_hole_when_dropped() {
        let file = crate::memfd::create_ram_memfd(8192).unwrap();
        file.write_all_at(b"SOURCE!!", 4096).unwrap();
        crate::memfd::seal_future_writes(&file).unwrap();
        let fd: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap().into();
        let mut mapped = map_grant(Grant { id: 7, gpa: 0, len: 8192, fd_index: 0, offset: 0 }, fd).unwrap();
        // SAFETY: a fresh anonymous reservation of our own, never unmapped by this test
        // until the grant is gone.
        let reservation = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(reservation, libc::MAP_FAILED);
        // SAFETY: the reservation is ours and exactly as long as the grant's mapping.
        unsafe { mapped.relocate(reservation as u64) }.unwrap();
        assert_eq!(mapped.host_addr(), reservation as u64);
        assert_eq!(&mapped.bytes()[4096..4104], b"SOURCE!!");
        drop(mapped);
        // SAFETY: the dropped grant left a readable private mapping there.
        let after = unsafe { std::slice::from_raw_parts(reservation as *const u8, 8192) };
        assert!(after.iter().all(|&b| b == 0), "the source's bytes are gone, and the range still reads");
        // SAFETY: the test's own reservation, no longer used.
        unsafe { libc::munmap(reservation, 8192) };
    }

    #[test]
    fn received_fds_are_checked_before_they_are_mapped() {
        let grant = |offset, len| Grant { id: 1, gpa: 0, len, fd_index: 0, offset };
        assert!(map_grant(grant(0, 8192), grant_fd(8192, true)).is_ok());
        let beyond = map_grant(grant(4096, 8192), grant_fd(8192, true));
        assert!(matches!(beyond, Err(ImportError::OutOfFile { size: 8192, .. })), "a grant past the file's end");
        let unaligned = map_grant(grant(100, 4096), grant_fd(8192, true));
        assert!(matches!(unaligned, Err(ImportError::OutOfFile { .. })));
        let empty = map_grant(grant(0, 0), grant_fd(8192, true));
        assert!(matches!(empty, Err(ImportError::OutOfFile { .. })));
        let unsealed = map_grant(grant(0, 4096), grant_fd(8192, false));
        assert!(matches!(unsealed, Err(ImportError::WritableSeals { .. })), "a grant its holder could make writable");
    }
}
