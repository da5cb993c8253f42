//! The inspector's core: the grants mapped into the agent VM, the watches, the OS
//! views and the source, behind one typed entry point, [`Inspector::handle`]. The
//! front ends (`crate::api` over HTTP, `crate::line` on a line socket) only
//! translate to and from [`Request`] and [`Reply`]; start-up (`crate::startup`) builds
//! the core and is the only module that knows the front ends.
//!
//! - `grants`: the grant table, coverage checks, reads, hashes, scans;
//! - `watches`: integrity watches, polled or checked on request;
//! - `os`: OS views through the agent, kept by the view cache;
//! - `source`: the source's vCPUs and events (revokes, dirty pages, gone);
//! - `trace`: tracing the source's guest, its events resolved through `os`;
//! - `yara`: YARA scans, a consumer of `grants` and `os`;
//! - `replies`: the agent's replies, checked against what was asked;
//! - `error`: [`InspectError`].

mod error;
mod grants;
mod os;
mod replies;
mod source;
mod trace;
mod watches;
mod yara;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mirror_driver::protocol::DirtyMechanism;
use specula_api::{Reply, Request, Status, ViewCacheStats};
use vmm::vstate::vm::Vm;

use crate::agent_link::AgentLink;
use crate::events::EventBus;
use crate::source::Source;
use crate::view_cache::{ViewCache, ViewCacheMode};
use crate::window::MirrorWindow;

pub use error::InspectError;
pub use grants::{GrantMap, LiveGrant};
pub use os::kernel_symbol;
pub use watches::{WatchMode, MAX_FINDINGS};
pub use yara::{
    YaraTarget, CHUNK_OVERLAP, MAX_MATCHES, MAX_RULES_BYTES, MAX_VIRTUAL_BYTES, PHYSICAL_CHUNK, SCAN_TIMEOUT_S,
};

/// Where source GPA 0 appears in the agent's physical address space (above its RAM
/// and the MMIO gap); source GPA `g` is at `WINDOW_BASE + g`.
pub const WINDOW_BASE: u64 = 1 << 32;
/// The agent's page tables map at most 512 GiB.
pub const MAX_WINDOW_END: u64 = 512 << 30;
/// Default agent RAM (room for the OS views' heap).
pub const DEFAULT_MEMORY: u64 = 192 << 20;
pub(crate) const PAGE: u64 = 4096;
/// Longest read served in one request.
pub const MAX_READ: u64 = 1 << 20;
/// Longest copy from the inspector's own mappings in one call (API bulk streams go in
/// pieces of this size).
pub const MAX_MAPPED_READ: u64 = 8 << 20;
/// Longest range hashed in one request (the agent hashes it in one command: ~2 s).
pub const MAX_HASH_LEN: u64 = 1 << 30;
/// A scan runs as agent commands of at most this many bytes each; between two, a
/// revoke can take its grant away and the scan stops with an error.
pub const SCAN_STEP: u64 = 256 << 20;
/// Longest a latency measurement may spin in the agent.
pub const MAX_LATENCY_MS: u64 = 10_000;
/// How long a request waits for the source's dirty-log barrier before it walks anyway.
pub(crate) const DIRTY_SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// A running inspector.
pub struct Inspector {
    link: AgentLink,
    vm: Arc<Vm>,
    grants: RwLock<GrantMap>,
    source: Box<dyn Source>,
    source_gone: AtomicBool,
    window_len: u64,
    /// The memslots the grants sit in (one per run of adjacent grants).
    window: MirrorWindow,
    /// How the source's dirty-page feed learns of writes, when it has one: polled
    /// watches then use the feed.
    dirty_feed: Option<DirtyMechanism>,
    /// See [`crate::startup::DaemonConfig::scan_rate_limit`].
    scan_rate_limit: Option<u64>,
    /// Each watch, by id (its agent slot).
    watches: Mutex<Vec<watches::WatchState>>,
    /// OS views kept while the dirty-page feed says nothing they read was written.
    views: ViewCache,
    /// See [`crate::startup::DaemonConfig::view_cache`].
    view_cache: ViewCacheMode,
    events: EventBus,
    tracing: trace::Tracing,
}

/// What start-up hands the core: the agent VM with the grants in its window, and
/// the source they came from.
pub struct Parts {
    pub link: AgentLink,
    pub vm: Arc<Vm>,
    pub grants: GrantMap,
    pub source: Box<dyn Source>,
    pub window_len: u64,
    pub window: MirrorWindow,
    pub dirty_feed: Option<DirtyMechanism>,
    pub scan_rate_limit: Option<u64>,
    pub view_cache: ViewCacheMode,
}

pub(crate) fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "inspector: {line}");
    let _ = out.flush();
}

impl Inspector {
    /// The core, over what start-up built.
    pub fn new(parts: Parts) -> Self {
        Self {
            link: parts.link,
            vm: parts.vm,
            grants: RwLock::new(parts.grants),
            source: parts.source,
            source_gone: AtomicBool::new(false),
            window_len: parts.window_len,
            window: parts.window,
            dirty_feed: parts.dirty_feed,
            scan_rate_limit: parts.scan_rate_limit,
            watches: Mutex::new(Vec::new()),
            views: ViewCache::default(),
            view_cache: parts.view_cache,
            events: EventBus::new(),
            tracing: trace::Tracing::default(),
        }
    }

    /// Serves one request: the one entry point of every front end.
    pub fn handle(&self, request: Request) -> Result<Reply, InspectError> {
        match request {
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Views => Ok(Reply::Views(self.view_cache_stats())),
            Request::Grants
            | Request::Read { .. }
            | Request::AuditRead { .. }
            | Request::Hash { .. }
            | Request::Scan { .. }
            | Request::WriteProbe { .. }
            | Request::Latency { .. } => self.handle_memory(request),
            Request::Watch { .. }
            | Request::Watches
            | Request::DeleteWatch { .. }
            | Request::Findings { .. }
            | Request::Check { .. } => self.handle_watch(request),
            Request::Vcpus | Request::Pause | Request::Resume => self.handle_source(request),
            Request::Yara(scan) => Ok(Reply::Yara(self.yara_scan_request(&scan)?)),
            Request::TraceStart { .. } | Request::TraceStop | Request::TraceStatus => self.handle_trace(request),
            // Every other request is an OS view.
            view => self.handle_os(view),
        }
    }

    /// Where the inspector stands.
    pub fn status(&self) -> Status {
        Status {
            source: if self.source_gone() { "gone" } else { "attached" }.into(),
            kind: self.source_kind().into(),
            grants: self.read_grants().len(),
            memslots: self.memslots(),
            window_len: self.window_len,
            last_event: self.events.last_seq(),
            dirty_log: self.dirty_feed.map(|m| m.name().to_string()),
            dirty_log_token: self.dirty_feed.map(|m| m.token().to_string()),
            view_cache: self.view_cache_stats(),
        }
    }

    /// Whether the source has gone away (the inspector keeps serving what it maps).
    pub fn source_gone(&self) -> bool {
        self.source_gone.load(Ordering::SeqCst)
    }

    /// Memslots of the agent VM that exist in KVM now (its RAM and the mirror window).
    pub fn memslots(&self) -> u32 {
        self.vm.memslot_count()
    }

    /// The inspector's event stream.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// How the source's dirty-page feed learns of writes; None without a feed.
    pub fn dirty_feed(&self) -> Option<DirtyMechanism> {
        self.dirty_feed
    }

    /// How the kept OS views have fared.
    pub fn view_cache_stats(&self) -> ViewCacheStats {
        self.views.stats()
    }

    /// What the inspector is attached to: `specula` or `qemu`.
    pub fn source_kind(&self) -> &'static str {
        self.source.kind()
    }

    /// Size of the mirror window (the source's highest RAM address).
    pub fn window_len(&self) -> u64 {
        self.window_len
    }

    /// Waits until the agent has booted and serves commands.
    pub(crate) fn wait_agent_ready(&self, limit: Duration) -> bool {
        self.link.wait_ready(limit)
    }
}
