//! The JSON models of the HTTP API for memory, watches, the source and events.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// What the CLI prints of a model: a header row and one row per item.
pub trait Rows {
    /// Column names.
    fn header() -> &'static [&'static str];
    /// This item's cells, one per column.
    fn row(&self) -> Vec<String>;
}

/// `0x`-prefixed hex, as the CLI prints addresses.
pub(crate) fn hex(n: u64) -> String {
    format!("{n:#x}")
}

/// The JSON body of every error reply.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ErrorBody {
    /// Stable: `bad_request`, `forbidden`, `policy_denied`, `not_found`, `not_granted`,
    /// `source_gone`, `unsupported`, `os_error` (an OS view failed: no kernel found, a
    /// corrupt structure), `agent_error`, `source_error`, `internal`.
    pub code: String,
    pub message: String,
    pub request_id: u64,
}

/// How the view cache has fared, for the status reply and the benchmark. Times are the
/// inspector's own, from the request reaching it to the reply leaving it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ViewCacheStats {
    /// Views served from the cache with no page they read written since.
    pub hits: u64,
    /// Views served from the cache after the agent re-hashed the lines they read on
    /// pages written since, and found them unchanged.
    pub revalidated: u64,
    /// Views the agent walked (every view, where the cache is off or the source has no
    /// dirty-page feed).
    pub walks: u64,
    /// Kept views dropped: lines they read changed, or the grants or kernel did.
    pub invalidated: u64,
    /// Walks not kept: the agent could not list what it read.
    pub not_kept: u64,
    /// Microseconds spent serving hits, revalidated views and walks (a walk's time
    /// includes a failed re-hash before it).
    pub hit_us: u64,
    pub revalidated_us: u64,
    pub walk_us: u64,
    /// Dirty-log barriers taken, and the microseconds they took.
    pub syncs: u64,
    pub sync_us: u64,
}

/// Where the inspector stands.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct Status {
    /// `attached` or `gone` (the source exited; the last contents stay readable).
    pub source: String,
    /// `specula` or `qemu`.
    pub kind: String,
    pub grants: usize,
    /// KVM memslots of the agent VM.
    pub memslots: u32,
    /// Length of the mirror window (the source's highest RAM address).
    pub window_len: u64,
    /// The newest event's sequence number.
    pub last_event: u64,
    /// How the source tells this inspector which pages its guest wrote (`KVM dirty
    /// ring`, `KVM dirty bitmap with manual protection`, `KVM dirty bitmap`), or null
    /// where it does not (QEMU sources, `--no-dirty-log`): polled watches then re-hash.
    pub dirty_log: Option<String>,
    /// The same in one word: `ring`, `bitmap-manual-protect` or `bitmap`.
    pub dirty_log_token: Option<String>,
    /// OS views served again without a walk because the dirty-page feed said nothing
    /// they read was written (all zero without a feed).
    pub view_cache: ViewCacheStats,
}

impl Rows for Status {
    fn header() -> &'static [&'static str] {
        &["SOURCE", "KIND", "GRANTS", "MEMSLOTS", "WINDOW", "LAST EVENT", "DIRTY LOG"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.source.clone(),
            self.kind.clone(),
            self.grants.to_string(),
            self.memslots.to_string(),
            hex(self.window_len),
            self.last_event.to_string(),
            self.dirty_log_token.clone().unwrap_or_else(|| "none".into()),
        ]
    }
}

impl Rows for ViewCacheStats {
    fn header() -> &'static [&'static str] {
        &["HITS", "REVALIDATED", "WALKS", "INVALIDATED", "NOT KEPT", "HIT US", "WALK US", "SYNCS"]
    }
    fn row(&self) -> Vec<String> {
        [
            self.hits,
            self.revalidated,
            self.walks,
            self.invalidated,
            self.not_kept,
            self.hit_us,
            self.walk_us,
            self.syncs,
        ]
        .map(|n| n.to_string())
        .to_vec()
    }
}

/// What the inspector traces in the source's guest, and what it has reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TraceStatus {
    /// The kinds traced now (`msr_writes`, `exec`, `exit`, `module_load`, `kernel_writes`); empty when
    /// tracing is off.
    pub kinds: Vec<String>,
    /// How the breakpoint kinds break: `hardware` (debug registers) or `software`
    /// (`int3` over no-ops); null when none is traced.
    pub breakpoints: Option<String>,
    /// The source's cap on trace events per second (0 when tracing is off); past it,
    /// events are counted in `dropped`.
    pub max_per_second: u32,
    /// Trace events published on the event stream since the inspector started.
    pub events: u64,
    /// Trace events the source or the inspector dropped (rate cap, full queues).
    pub dropped: u64,
}

/// A trace request's body: which kinds to trace (all when empty or absent), and
/// whether breakpoints are `int3`s instead of the debug registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TraceRequest {
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub software_breakpoints: bool,
}

impl Rows for TraceStatus {
    fn header() -> &'static [&'static str] {
        &["KINDS", "BREAKPOINTS", "MAX/S", "EVENTS", "DROPPED"]
    }
    fn row(&self) -> Vec<String> {
        let kinds = if self.kinds.is_empty() { "-".to_string() } else { self.kinds.join(",") };
        let breakpoints = self.breakpoints.clone().unwrap_or_else(|| "-".into());
        vec![kinds, breakpoints, self.max_per_second.to_string(), self.events.to_string(), self.dropped.to_string()]
    }
}

/// A granted range of source RAM, mapped read-only into the agent.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct GrantInfo {
    pub id: u64,
    pub gpa: u64,
    pub len: u64,
}

impl Rows for GrantInfo {
    fn header() -> &'static [&'static str] {
        &["ID", "GPA", "LEN"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.id.to_string(), hex(self.gpa), hex(self.len)]
    }
}

/// A vCPU's registers: the mirror protocol's own shape, served as it is.
pub use mirror_driver::protocol::VcpuRegs as Vcpu;

impl Rows for Vcpu {
    fn header() -> &'static [&'static str] {
        &["CPU", "RIP", "RSP", "CR3", "CR4", "EFER", "GS_BASE"]
    }
    fn row(&self) -> Vec<String> {
        let mut row = vec![self.index.to_string()];
        row.extend([self.rip, self.rsp(), self.cr3, self.cr4, self.efer, self.gs_base].map(hex));
        row
    }
}

/// A guest-physical range (numbers, or strings in decimal or `0x` hex).
#[derive(Serialize, Deserialize, ToSchema, IntoParams, Debug)]
pub struct RangeQuery {
    /// Guest-physical address.
    pub gpa: String,
    /// Length in bytes.
    pub len: String,
}

/// Bytes as hex (small reads).
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct HexBytes {
    pub gpa: u64,
    pub hex: String,
}

/// Digests of a range.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct Digests {
    pub xxh64: String,
    pub sha256: String,
}

impl Rows for Digests {
    fn header() -> &'static [&'static str] {
        &["XXH64", "SHA256"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.xxh64.clone(), self.sha256.clone()]
    }
}

/// A scan request: every GPA in the range where `pattern` (hex) occurs.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ScanRequest {
    pub gpa: String,
    pub len: String,
    /// The pattern, hex (1 to 256 bytes).
    pub pattern: String,
    /// First hit to return (paging).
    #[serde(default)]
    pub offset: usize,
    /// Most hits to return (default 1000, at most 100000).
    pub limit: Option<usize>,
}

/// Scan hits, paged.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ScanResult {
    /// Every match in the range.
    pub total: u64,
    /// Hits `offset..offset + hits.len()` of those the agent recorded.
    pub hits: Vec<u64>,
    /// Offset of the next page, if there is one.
    pub next_offset: Option<usize>,
}

/// A watch to create.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct WatchRequest {
    pub gpa: String,
    pub len: String,
}

/// An integrity watch.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct WatchInfo {
    pub id: usize,
    pub gpa: u64,
    pub len: u64,
    /// `dirty-log`: the source's dirty-page feed says which pages were written and only
    /// those are re-hashed (a write then restore between two checks is still reported);
    /// `hash`: each interval the agent re-hashes every page (sources without dirty logging,
    /// and watches checked on request).
    pub mode: String,
    /// Whether the inspector polls it (findings and events) or only checks it on request.
    pub polled: bool,
    pub findings: usize,
}

impl Rows for WatchInfo {
    fn header() -> &'static [&'static str] {
        &["ID", "GPA", "LEN", "MODE", "POLLED", "FINDINGS"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            hex(self.gpa),
            hex(self.len),
            self.mode.clone(),
            self.polled.to_string(),
            self.findings.to_string(),
        ]
    }
}

/// Pages a watch saw change, and the event that reported them.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct FindingInfo {
    pub seq: u64,
    /// Pages written since the previous finding (changed, or restored).
    pub pages: Vec<u64>,
    /// Of `pages`, those whose contents were written and put back between two checks.
    pub restored: Vec<u64>,
}

impl Rows for FindingInfo {
    fn header() -> &'static [&'static str] {
        &["EVENT", "PAGES", "RESTORED"]
    }
    fn row(&self) -> Vec<String> {
        let list = |pages: &[u64]| pages.iter().map(|&p| hex(p)).collect::<Vec<_>>().join(" ");
        vec![self.seq.to_string(), list(&self.pages), list(&self.restored)]
    }
}

/// One event of the inspector's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increases by one per event, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `watch.changed`, `watch.failed`, `grant.revoked`, `source.paused`, `source.resumed`,
    /// `source.discarded`, `source.gone`, or `events.missed` (the backlog no longer held
    /// what the client asked for).
    pub kind: String,
    /// Kind-specific fields.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Event stream filters.
#[derive(Serialize, Deserialize, IntoParams, Debug)]
pub struct EventQuery {
    /// Replay events after this sequence number (also read from `Last-Event-ID`).
    pub since: Option<u64>,
    /// Comma-separated kinds or kind prefixes (`watch`, `source.gone`, ...).
    pub kinds: Option<String>,
}
