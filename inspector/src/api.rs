//! The introspection daemon's API: HTTP/1.1 over a Unix socket, versioned under
//! `/v1`, JSON bodies (binary `application/octet-stream` for bulk memory, streamed),
//! errors as JSON with a stable code, a request id on every reply, an event stream
//! (Server-Sent Events) with sequence numbers and a replay backlog, and the OpenAPI
//! document served at `/v1/openapi.json` (kept identical to `docs/openapi.json`).
//!
//! Access: the socket is created mode 0600 (0666 when other uids are allowed) and
//! every connection's SO_PEERCRED uid is checked: read clients (`--api-read-uid`) may
//! use the views, control clients (`--api-control-uid`, default the inspector's own
//! uid) may also pause and resume the source and create or delete watches.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::{self, ConnectInfo};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::daemon::{InspectError, Inspector};
use crate::events::{self, Event};
use crate::source::SourceError;
use mirror_driver::importer::ImportError;
use mirror_driver::protocol::ErrorCode;

/// Bytes per piece while streaming physical memory (copied from the inspector's own
/// read-only mappings of the grants).
const STREAM_CHUNK: u64 = crate::daemon::MAX_MAPPED_READ;
/// Longest JSON (hex) read.
pub const MAX_JSON_READ: u64 = 64 << 10;
/// Most scan hits per page of a scan reply.
pub const MAX_SCAN_PAGE: usize = 100_000;

/// Who may use the API.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// uids that may use the read-only views.
    pub read_uids: Vec<u32>,
    /// uids that may also control (pause, resume, watches).
    pub control_uids: Vec<u32>,
}

impl ApiAccess {
    fn may_read(&self, uid: u32) -> bool {
        self.read_uids.contains(&uid) || self.control_uids.contains(&uid)
    }
}

#[derive(Clone)]
struct AppState {
    inspector: Arc<Inspector>,
    access: Arc<ApiAccess>,
}

/// The peer of a connection.
#[derive(Clone, Debug)]
struct Peer {
    uid: Option<u32>,
}

impl connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Peer { uid: stream.io().peer_cred().ok().map(|c| c.uid()) }
    }
}

tokio::task_local! {
    static REQUEST_ID: u64;
}

/// An API error: HTTP status, stable code, message; the body also names the request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
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

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<InspectError> for ApiError {
    fn from(e: InspectError) -> Self {
        let message = e.to_string();
        match e {
            InspectError::NotGranted { .. } => Self::new(StatusCode::CONFLICT, "not_granted", message),
            InspectError::BadRequest(_) if message.contains("source is gone") => {
                Self::new(StatusCode::GONE, "source_gone", message)
            }
            InspectError::BadRequest(_) => Self::bad_request(message),
            InspectError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", message),
            InspectError::Os(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "os_error", message),
            InspectError::Agent(_) | InspectError::BadReply(_) => {
                Self::new(StatusCode::BAD_GATEWAY, "agent_error", message)
            }
            InspectError::Source(SourceError::Unsupported(_)) => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "unsupported", message)
            }
            InspectError::Source(SourceError::Mirror(ImportError::Refused {
                code: ErrorCode::PolicyDenied, ..
            })) => Self::new(StatusCode::FORBIDDEN, "policy_denied", message),
            InspectError::Source(_) => Self::new(StatusCode::BAD_GATEWAY, "source_error", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(|id| *id).unwrap_or(0);
        let body = ErrorBody { code: self.code.into(), message: self.message, request_id };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs `f`, which blocks (agent calls wait on the doorbell), on this worker thread:
/// `block_in_place` hands the worker's other tasks to another thread instead of
/// moving `f` to the blocking pool, so a request's critical path takes no thread
/// hand-offs (each costs a wake-up, tens of microseconds on an idle machine). A panic
/// in `f` becomes a 500 for this request only.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InspectError> + Send + 'static,
) -> Result<T, ApiError> {
    let id = REQUEST_ID.try_with(|id| *id).unwrap_or(0);
    let outcome = tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(ApiError::from),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("request {id}: {what}")))
        }
    }
}

/// Numbers in queries and bodies: decimal, or hex with `0x`.
fn number(text: &str, what: &str) -> Result<u64, ApiError> {
    vmm::line_server::parse_number(Some(text), what).map_err(ApiError::bad_request)
}

// ---- schemas ----

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
}

/// A granted range of source RAM, mapped read-only into the agent.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct GrantInfo {
    pub id: u64,
    pub gpa: u64,
    pub len: u64,
}

/// A vCPU's registers (0 where the source cannot tell).
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
pub struct Vcpu {
    pub index: u32,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    /// Where `syscall` enters the kernel (0 where the source does not report it: QEMU
    /// shows it only in a device-state snapshot, see the `msrs` check).
    pub lstar: u64,
}

/// A guest-physical range (numbers, or strings in decimal or `0x` hex).
#[derive(Deserialize, ToSchema, IntoParams, Debug)]
pub struct RangeQuery {
    /// Guest-physical address.
    pub gpa: String,
    /// Length in bytes.
    pub len: String,
}

impl RangeQuery {
    fn parse(&self) -> Result<(u64, u64), ApiError> {
        Ok((number(&self.gpa, "gpa")?, number(&self.len, "len")?))
    }
}

/// Bytes as hex (small reads).
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct HexBytes {
    pub gpa: u64,
    pub hex: String,
}

/// Digests of a range.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct Digests {
    pub xxh64: String,
    pub sha256: String,
}

/// A scan request: every GPA in the range where `pattern` (hex) occurs.
#[derive(Deserialize, ToSchema, Debug)]
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
#[derive(Deserialize, ToSchema, Debug)]
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

/// Pages a watch saw change, and the event that reported them.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct FindingInfo {
    pub seq: u64,
    /// Pages written since the previous finding (changed, or restored).
    pub pages: Vec<u64>,
    /// Of `pages`, those whose contents were written and put back between two checks.
    pub restored: Vec<u64>,
}

/// The source's Linux kernel, found in its RAM with no symbols.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct KernelView {
    pub release: String,
    pub kaslr_offset: u64,
    pub phys_base: i64,
    /// `4-level` or `5-level`.
    pub paging: String,
    pub kernel_pgd: u64,
    pub online_cpus: Option<u32>,
    pub symbols: usize,
    pub btf_types: usize,
    /// Other valid VMCOREINFO copies that differ from the one used (a forged kernel shows here).
    pub conflicting_vmcoreinfo: u32,
    /// Guest-physical address of the VMCOREINFO text used.
    pub vmcoreinfo_at: u64,
}

impl From<specula_os::KernelInfo> for KernelView {
    fn from(k: specula_os::KernelInfo) -> Self {
        KernelView {
            release: k.release,
            kaslr_offset: k.kaslr_offset,
            phys_base: k.phys_base,
            paging: match k.paging_mode {
                specula_os::PagingMode::Level4 => "4-level".into(),
                specula_os::PagingMode::Level5 => "5-level".into(),
            },
            kernel_pgd: k.kernel_pgd,
            online_cpus: k.online_cpus,
            symbols: k.symbols,
            btf_types: k.btf_types,
            conflicting_vmcoreinfo: k.conflicting_vmcoreinfo,
            vmcoreinfo_at: k.vmcoreinfo_at,
        }
    }
}

/// A process of the source.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ProcessView {
    pub pid: i32,
    pub tgid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub comm: String,
    /// Arguments, read from the process's own memory.
    pub args: Vec<String>,
    pub state: u64,
    /// Nanoseconds of monotonic time at fork.
    pub start_time: u64,
    pub kernel_thread: bool,
    pub exited: bool,
    /// Physical address of its page-table root.
    pub pgd: Option<u64>,
    /// Kernel address of its task_struct.
    pub task: u64,
    pub cmdline_error: Option<String>,
}

/// A memory area of a process.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct VmaView {
    pub start: u64,
    pub end: u64,
    /// `rwxp` as in /proc/PID/maps.
    pub perms: String,
    pub pgoff: u64,
    pub file: Option<String>,
}

/// A loaded kernel module.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ModuleView {
    pub name: String,
    pub base: u64,
    pub size: u64,
    pub state: Option<String>,
}

/// The system call table check.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct SyscallCheckView {
    /// Entries checked.
    pub entries: u32,
    /// Kernel virtual address of `sys_call_table`.
    pub table: u64,
    /// Entries that do not point into the core kernel's text, with the module they point into.
    pub redirected: Vec<RedirectedSyscall>,
}

/// A redirected system call.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct RedirectedSyscall {
    pub nr: u32,
    pub target: u64,
    pub module: Option<String>,
}

/// A kernel symbol, at its running (KASLR-slid) address.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct SymbolView {
    pub name: String,
    /// nm-style type: `T`/`t` text, `D`/`d` data, `B`/`b` bss, `R`/`r` read-only data.
    pub kind: String,
    pub address: u64,
}

/// A YARA scan request.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct YaraRequest {
    /// YARA rules source (at most 1 MiB).
    pub rules: String,
    /// `physical` (every granted range; default), `process` (needs `pid`) or `kernel`.
    pub target: Option<String>,
    pub pid: Option<u32>,
}

/// A YARA scan's matches.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct YaraReportView {
    pub scanned_bytes: u64,
    pub matches: Vec<YaraMatchView>,
    /// More than 10 000 matches: the rest are not listed.
    pub truncated: bool,
}

/// One string of one rule matched at one place.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct YaraMatchView {
    pub rule: String,
    pub namespace: String,
    pub tags: Vec<String>,
    /// The string's identifier (`$name`).
    pub string: String,
    pub length: u64,
    /// Guest-physical address (physical scans).
    pub gpa: Option<u64>,
    /// Process id (process scans; 0 for kernel scans).
    pub pid: Option<u32>,
    /// Virtual address (process and kernel scans).
    pub va: Option<u64>,
}

/// Which rootkit checks to run.
#[derive(Deserialize, IntoParams, Debug)]
pub struct ChecksQuery {
    /// Comma-separated checks: `processes`, `modules`, `syscalls`, `interrupts`,
    /// `kernel_text`, `msrs` (default: all but `msrs`, which reads each vCPU's LSTAR;
    /// on a QEMU source that takes a device-state snapshot, pausing the guest for a
    /// few milliseconds).
    pub only: Option<String>,
}

/// The rootkit checks' report.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct CheckReportView {
    /// True when every check ran and none found anything.
    pub clean: bool,
    pub checks: Vec<CheckRunView>,
    pub findings: Vec<FindingView>,
}

/// One check: what it looked at, or why it could not run on this kernel.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct CheckRunView {
    /// `processes`, `modules`, `syscalls`, `interrupts`, `kernel_text` or `msrs`.
    pub check: String,
    /// Tasks in the pid table, listed modules, table entries, present gates or text pages.
    pub examined: u64,
    pub error: Option<String>,
}

/// Evidence of tampering.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct FindingView {
    /// `hidden_process`, `unhashed_process`, `hidden_module`, `syscall_redirected`,
    /// `syscall_dispatch_redirected`, `interrupt_hooked`, `kernel_text_modified` or
    /// `syscall_entry_hooked` (a vCPU's LSTAR is not `entry_SYSCALL_64`; id: the vCPU).
    pub kind: String,
    /// The pid, system call number, vector, or offset in `x64_sys_call` (absent where none).
    pub id: Option<i64>,
    /// The process's comm, the module's name, the system call's name, or the symbol of a text page.
    pub name: Option<String>,
    /// Kernel address: the task_struct, the struct module, the handler, the text page.
    pub address: u64,
    /// The module a handler points into; where a hidden module was found.
    pub detail: Option<String>,
}

/// A virtual range of a process.
#[derive(Deserialize, IntoParams, Debug)]
pub struct VirtualQuery {
    /// Virtual address.
    pub va: String,
    /// Length (at most 1 MiB).
    pub len: String,
}

/// Event stream filters.
#[derive(Deserialize, IntoParams, Debug)]
pub struct EventQuery {
    /// Replay events after this sequence number (also read from `Last-Event-ID`).
    pub since: Option<u64>,
    /// Comma-separated kinds or kind prefixes (`watch`, `source.gone`, ...).
    pub kinds: Option<String>,
}

// ---- handlers ----

#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = Status)))]
async fn status(State(s): State<AppState>) -> ApiResult<Status> {
    let i = &s.inspector;
    Ok(Json(Status {
        source: if i.source_gone() { "gone" } else { "attached" }.into(),
        kind: i.source_kind().into(),
        grants: i.grants().len(),
        memslots: i.memslots(),
        window_len: i.window_len(),
        last_event: i.events().last_seq(),
        dirty_log: i.dirty_feed().map(|m| m.name().to_string()),
    }))
}

#[utoipa::path(get, path = "/v1/grants", responses((status = 200, body = [GrantInfo])))]
async fn grants(State(s): State<AppState>) -> ApiResult<Vec<GrantInfo>> {
    Ok(Json(s.inspector.grants().into_iter().map(|(id, gpa, len)| GrantInfo { id, gpa, len }).collect()))
}

#[utoipa::path(get, path = "/v1/vcpus", responses((status = 200, body = [Vcpu]), (status = 410, body = ErrorBody)))]
async fn vcpus(State(s): State<AppState>) -> ApiResult<Vec<Vcpu>> {
    let inspector = s.inspector.clone();
    let regs = blocking(move || inspector.vcpus()).await?;
    Ok(Json(
        regs.into_iter()
            .map(|v| Vcpu {
                index: v.index,
                rip: v.rip,
                rsp: v.gprs[6],
                rflags: v.rflags,
                cr0: v.cr0,
                cr3: v.cr3,
                cr4: v.cr4,
                efer: v.efer,
                fs_base: v.fs_base,
                gs_base: v.gs_base,
                kernel_gs_base: v.kernel_gs_base,
                lstar: v.lstar,
            })
            .collect(),
    ))
}

/// Guest-physical memory as a binary stream of exactly `len` bytes.
#[utoipa::path(get, path = "/v1/memory/physical", params(RangeQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 409, body = ErrorBody)))]
async fn read_physical(State(s): State<AppState>, Query(q): Query<RangeQuery>) -> Result<Response, ApiError> {
    let (gpa, len) = q.parse()?;
    let inspector = s.inspector.clone();
    blocking(move || inspector.check_range(gpa, len)).await?;
    let request_id = REQUEST_ID.try_with(|id| *id).unwrap_or(0);
    let chunks = stream::unfold(0u64, move |done| {
        let inspector = s.inspector.clone();
        async move {
            if done >= len {
                return None;
            }
            let n = (len - done).min(STREAM_CHUNK);
            let read = tokio::task::spawn_blocking(move || inspector.read_mapped(gpa + done, n)).await;
            let item = match read {
                Ok(Ok(bytes)) => Ok(axum::body::Bytes::from(bytes)),
                // The status line is gone: a broken stream is the only way left to fail.
                Ok(Err(e)) => Err(std::io::Error::other(format!("request {request_id}: {e}"))),
                Err(e) => Err(std::io::Error::other(format!("request {request_id}: {e}"))),
            };
            Some((item, done + n))
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_LENGTH, len.into()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// A small read as hex (at most 64 KiB).
#[utoipa::path(get, path = "/v1/memory/physical/hex", params(RangeQuery), responses((status = 200, body = HexBytes)))]
async fn read_physical_hex(State(s): State<AppState>, Query(q): Query<RangeQuery>) -> ApiResult<HexBytes> {
    let (gpa, len) = q.parse()?;
    if len > MAX_JSON_READ {
        return Err(ApiError::bad_request(format!(
            "JSON reads are at most {MAX_JSON_READ} bytes: use /v1/memory/physical for bulk data"
        )));
    }
    let inspector = s.inspector.clone();
    let bytes = blocking(move || inspector.read(gpa, len)).await?;
    Ok(Json(HexBytes { gpa, hex: bytes.iter().map(|b| format!("{b:02x}")).collect() }))
}

#[utoipa::path(post, path = "/v1/hash", request_body = RangeQuery, responses((status = 200, body = Digests)))]
async fn hash(State(s): State<AppState>, Json(q): Json<RangeQuery>) -> ApiResult<Digests> {
    let (gpa, len) = q.parse()?;
    let inspector = s.inspector.clone();
    let (xxh, sha) = blocking(move || inspector.hash(gpa, len)).await?;
    Ok(Json(Digests { xxh64: format!("{xxh:016x}"), sha256: sha.iter().map(|b| format!("{b:02x}")).collect() }))
}

#[utoipa::path(post, path = "/v1/scan", request_body = ScanRequest, responses((status = 200, body = ScanResult)))]
async fn scan(State(s): State<AppState>, Json(q): Json<ScanRequest>) -> ApiResult<ScanResult> {
    let (gpa, len) = (number(&q.gpa, "gpa")?, number(&q.len, "len")?);
    let pattern = crate::control::unhex(&q.pattern).map_err(ApiError::bad_request)?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_SCAN_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_SCAN_PAGE}")));
    }
    let inspector = s.inspector.clone();
    let (total, hits) = blocking(move || inspector.scan(gpa, len, &pattern)).await?;
    let page: Vec<u64> = hits.iter().skip(q.offset).take(limit).copied().collect();
    let next = q.offset + page.len();
    Ok(Json(ScanResult { total, hits: page, next_offset: (next < hits.len()).then_some(next) }))
}

#[utoipa::path(get, path = "/v1/watches", responses((status = 200, body = [WatchInfo])))]
async fn list_watches(State(s): State<AppState>) -> ApiResult<Vec<WatchInfo>> {
    Ok(Json(
        s.inspector
            .watches()
            .into_iter()
            .map(|(id, r, polled, findings, mode)| WatchInfo {
                id,
                gpa: r.gpa,
                len: r.len,
                mode: mode.name().into(),
                polled,
                findings,
            })
            .collect(),
    ))
}

/// Creates a polled watch (control clients).
#[utoipa::path(post, path = "/v1/watches", request_body = WatchRequest, responses((status = 200, body = WatchInfo), (status = 403, body = ErrorBody)))]
async fn create_watch(State(s): State<AppState>, Json(q): Json<WatchRequest>) -> ApiResult<WatchInfo> {
    let (gpa, len) = (number(&q.gpa, "gpa")?, number(&q.len, "len")?);
    let inspector = s.inspector.clone();
    let id = blocking(move || inspector.watch(gpa, len, true)).await?;
    let mode = s.inspector.polled_watch_mode().name().into();
    Ok(Json(WatchInfo { id, gpa, len, mode, polled: true, findings: 0 }))
}

/// Deletes a watch (control clients).
#[utoipa::path(delete, path = "/v1/watches/{id}", params(("id" = usize, Path)), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_watch(State(s): State<AppState>, UrlPath(id): UrlPath<usize>) -> Result<StatusCode, ApiError> {
    s.inspector.delete_watch(id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/watches/{id}/findings", params(("id" = usize, Path)), responses((status = 200, body = [FindingInfo])))]
async fn findings(State(s): State<AppState>, UrlPath(id): UrlPath<usize>) -> ApiResult<Vec<FindingInfo>> {
    Ok(Json(
        s.inspector
            .findings(id)?
            .into_iter()
            .map(|f| FindingInfo { seq: f.seq, pages: f.pages, restored: f.restored })
            .collect(),
    ))
}

/// Pauses the source's vCPUs (control clients; QEMU sources, and Specula sources that allow it).
#[utoipa::path(post, path = "/v1/source/pause", responses((status = 204), (status = 501, body = ErrorBody)))]
async fn pause(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    let inspector = s.inspector.clone();
    blocking(move || inspector.set_paused(true)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resumes the source's vCPUs (control clients).
#[utoipa::path(post, path = "/v1/source/resume", responses((status = 204), (status = 501, body = ErrorBody)))]
async fn resume(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    let inspector = s.inspector.clone();
    blocking(move || inspector.set_paused(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Server-Sent Events: each `data:` is an [`Event`] as JSON, its `id:` the sequence.
#[utoipa::path(get, path = "/v1/events", params(EventQuery), responses((status = 200, content_type = "text/event-stream", body = Event)))]
async fn event_stream(
    State(s): State<AppState>,
    Query(q): Query<EventQuery>,
    headers: axum::http::HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let since = q.since.or(last_id).unwrap_or(s.inspector.events().last_seq());
    let kinds: Vec<String> =
        q.kinds.as_deref().unwrap_or("").split(',').filter(|k| !k.is_empty()).map(str::to_string).collect();
    let wanted = move |e: &Event| {
        e.kind == "events.missed"
            || kinds.is_empty()
            || kinds.iter().any(|k| e.kind == *k || e.kind.starts_with(&format!("{k}.")))
    };
    let (replay, receiver) = s.inspector.events().subscribe(since);
    let live =
        stream::unfold((receiver, replay.last().map_or(since, |e| e.seq.max(since))), |(mut rx, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq > last => {
                        let seq = e.seq;
                        return Some((e, (rx, seq)));
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        return Some((events::missed(last + 1, last + n), (rx, last + n)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    let all = stream::iter(replay).chain(live).filter(move |e| std::future::ready(wanted(e))).map(|e| {
        let mut event = SseEvent::default().event(e.kind.clone()).data(serde_json::to_string(&e).unwrap_or_default());
        if e.seq > 0 {
            event = event.id(e.seq.to_string());
        }
        Ok(event)
    });
    Sse::new(all).keep_alive(KeepAlive::default())
}

#[utoipa::path(get, path = "/v1/os/kernel", responses((status = 200, body = KernelView), (status = 422, body = ErrorBody)))]
async fn os_kernel(State(s): State<AppState>) -> ApiResult<KernelView> {
    let inspector = s.inspector.clone();
    Ok(Json(blocking(move || inspector.os_kernel()).await?.into()))
}

/// Finds the source's kernel again (after it rebooted, say).
#[utoipa::path(post, path = "/v1/os/discover", responses((status = 200, body = KernelView), (status = 422, body = ErrorBody)))]
async fn os_discover(State(s): State<AppState>) -> ApiResult<KernelView> {
    let inspector = s.inspector.clone();
    Ok(Json(blocking(move || inspector.os_discover()).await?.into()))
}

#[utoipa::path(get, path = "/v1/os/processes", responses((status = 200, body = [ProcessView]), (status = 422, body = ErrorBody)))]
async fn os_processes(State(s): State<AppState>) -> ApiResult<Vec<ProcessView>> {
    let inspector = s.inspector.clone();
    let ps = blocking(move || inspector.os_processes()).await?;
    Ok(Json(
        ps.into_iter()
            .map(|d| {
                let p = d.process;
                ProcessView {
                    args: p.args(),
                    pid: p.pid,
                    tgid: p.tgid,
                    ppid: p.ppid,
                    uid: p.uid,
                    euid: p.euid,
                    gid: p.gid,
                    comm: p.comm,
                    state: p.state,
                    start_time: p.start_time,
                    kernel_thread: p.kernel_thread,
                    exited: p.exit_state != 0,
                    pgd: p.pgd,
                    task: p.task,
                    cmdline_error: d.cmdline_error,
                }
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/os/processes/{pid}/maps", params(("pid" = u32, Path)), responses((status = 200, body = [VmaView])))]
async fn os_maps(State(s): State<AppState>, UrlPath(pid): UrlPath<u32>) -> ApiResult<Vec<VmaView>> {
    let inspector = s.inspector.clone();
    let vmas = blocking(move || inspector.os_vmas(pid)).await?;
    Ok(Json(
        vmas.into_iter()
            .map(|v| VmaView { perms: v.perms(), start: v.start, end: v.end, pgoff: v.pgoff, file: v.file_name })
            .collect(),
    ))
}

/// A process's virtual memory (pid 0: the kernel's), as bytes.
#[utoipa::path(get, path = "/v1/os/processes/{pid}/memory", params(("pid" = u32, Path), VirtualQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>)))]
async fn os_memory(
    State(s): State<AppState>,
    UrlPath(pid): UrlPath<u32>,
    Query(q): Query<VirtualQuery>,
) -> Result<Response, ApiError> {
    let (va, len) = (number(&q.va, "va")?, number(&q.len, "len")?);
    let inspector = s.inspector.clone();
    let bytes = blocking(move || inspector.os_read_virtual(pid, va, len)).await?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], bytes).into_response())
}

/// Rootkit check: system call table entries that point outside the kernel's text.
#[utoipa::path(get, path = "/v1/os/checks/syscalls", responses((status = 200, body = SyscallCheckView), (status = 422, body = ErrorBody)))]
async fn os_check_syscalls(State(s): State<AppState>) -> ApiResult<SyscallCheckView> {
    let inspector = s.inspector.clone();
    let c = blocking(move || inspector.os_syscall_check()).await?;
    Ok(Json(SyscallCheckView {
        entries: c.entries,
        table: c.table,
        redirected: c
            .redirected
            .into_iter()
            .map(|r| RedirectedSyscall { nr: r.nr, target: r.target, module: r.module })
            .collect(),
    }))
}

/// Rootkit checks: the pid table against the task list, module kobjects and the module
/// tree against the module list, the system call table and the IDT against kernel text,
/// kernel text against its hashes at discovery.
#[utoipa::path(get, path = "/v1/os/checks", params(ChecksQuery),
    responses((status = 200, body = CheckReportView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn os_checks(State(s): State<AppState>, Query(q): Query<ChecksQuery>) -> ApiResult<CheckReportView> {
    use specula_os::checks::select;
    let mut which = 0u64;
    for name in q.only.as_deref().unwrap_or("").split(',').filter(|n| !n.is_empty()) {
        let bit = select::NAMES.iter().position(|n| *n == name).ok_or_else(|| {
            ApiError::bad_request(format!("unknown check {name:?}; checks are {}", select::NAMES.join(", ")))
        })?;
        which |= 1 << bit;
    }
    let which = if which == 0 { select::DEFAULT } else { which };
    let inspector = s.inspector.clone();
    let report = blocking(move || inspector.os_checks(which)).await?;
    Ok(Json(CheckReportView {
        clean: report.findings.is_empty() && report.runs.iter().all(|r| r.error.is_none()),
        checks: report
            .runs
            .into_iter()
            .map(|r| CheckRunView { check: r.check, examined: r.examined, error: r.error })
            .collect(),
        findings: report
            .findings
            .into_iter()
            .map(|f| FindingView {
                kind: f.kind.name().into(),
                id: (f.id >= 0).then_some(f.id),
                name: f.name,
                address: f.address,
                detail: f.detail,
            })
            .collect(),
    }))
}

/// Scans guest memory with YARA rules: all granted physical memory, one process's
/// virtual memory, or the kernel image.
#[utoipa::path(post, path = "/v1/yara", request_body = YaraRequest,
    responses((status = 200, body = YaraReportView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn yara_scan(State(s): State<AppState>, Json(req): Json<YaraRequest>) -> ApiResult<YaraReportView> {
    use crate::yara_scan::YaraTarget;
    let target = match (req.target.as_deref().unwrap_or("physical"), req.pid) {
        ("physical", None) => YaraTarget::Physical,
        ("kernel", None) => YaraTarget::Kernel,
        ("process", Some(pid)) => YaraTarget::Process(pid),
        ("process", None) => return Err(ApiError::bad_request("a process scan needs a pid")),
        (other, _) => {
            return Err(ApiError::bad_request(format!(
                "unknown target {other:?} (physical, process with a pid, or kernel)"
            )))
        }
    };
    let inspector = s.inspector.clone();
    let report = blocking(move || inspector.yara_scan(&req.rules, target)).await?;
    Ok(Json(YaraReportView {
        scanned_bytes: report.scanned_bytes,
        truncated: report.truncated,
        matches: report
            .matches
            .into_iter()
            .map(|m| YaraMatchView {
                rule: m.rule,
                namespace: m.namespace,
                tags: m.tags,
                string: m.string,
                length: m.length,
                gpa: m.gpa,
                pid: m.pid,
                va: m.va,
            })
            .collect(),
    }))
}

/// Every kernel symbol (kallsyms, decoded in the agent from guest memory).
#[utoipa::path(get, path = "/v1/os/symbols", responses((status = 200, body = [SymbolView]), (status = 422, body = ErrorBody)))]
async fn os_symbols(State(s): State<AppState>) -> ApiResult<Vec<SymbolView>> {
    let inspector = s.inspector.clone();
    let symbols = blocking(move || inspector.os_symbols()).await?;
    Ok(Json(
        symbols
            .into_iter()
            .map(|s| SymbolView { name: s.name, kind: s.kind.to_string(), address: s.address })
            .collect(),
    ))
}

/// The kernel's BTF type information (`__start_BTF`..`__stop_BTF`), as bytes.
#[utoipa::path(get, path = "/v1/os/btf",
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 422, body = ErrorBody)))]
async fn os_btf(State(s): State<AppState>) -> Result<Response, ApiError> {
    let inspector = s.inspector.clone();
    let blob = blocking(move || inspector.os_symbols().and_then(|symbols| inspector.os_btf(&symbols))).await?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], blob).into_response())
}

#[utoipa::path(get, path = "/v1/os/modules", responses((status = 200, body = [ModuleView])))]
async fn os_modules(State(s): State<AppState>) -> ApiResult<Vec<ModuleView>> {
    let inspector = s.inspector.clone();
    let ms = blocking(move || inspector.os_modules()).await?;
    Ok(Json(
        ms.into_iter().map(|m| ModuleView { name: m.name, base: m.base, size: m.size, state: m.state_name }).collect(),
    ))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Specula introspection API",
        version = "1",
        description = "The inspector daemon's API over a Unix socket."
    ),
    paths(
        status,
        grants,
        vcpus,
        read_physical,
        read_physical_hex,
        hash,
        scan,
        list_watches,
        create_watch,
        delete_watch,
        findings,
        pause,
        resume,
        event_stream,
        os_kernel,
        os_discover,
        os_processes,
        os_maps,
        os_memory,
        os_modules,
        os_check_syscalls,
        os_checks,
        os_symbols,
        os_btf,
        yara_scan
    ),
    components(schemas(
        Status,
        GrantInfo,
        Vcpu,
        HexBytes,
        Digests,
        ScanRequest,
        ScanResult,
        WatchRequest,
        WatchInfo,
        FindingInfo,
        ErrorBody,
        Event,
        RangeQuery,
        KernelView,
        ProcessView,
        VmaView,
        ModuleView,
        SyscallCheckView,
        CheckReportView,
        CheckRunView,
        FindingView,
        SymbolView,
        YaraRequest,
        YaraReportView,
        YaraMatchView,
        RedirectedSyscall
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document, as served.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes")
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

// ---- middleware ----

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Gives every request an id (in `x-request-id` and in error bodies) and checks the
/// peer: unknown uids are refused, control endpoints need a control uid.
async fn gate(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    REQUEST_ID
        .scope(id, async move {
            let control = is_control(request.method(), request.uri().path());
            let allowed = match peer.uid {
                Some(uid) if control => s.access.control_uids.contains(&uid),
                Some(uid) => s.access.may_read(uid),
                None => false,
            };
            let mut response = if allowed {
                next.run(request).await
            } else {
                let what = if control { "control this inspector" } else { "use this API" };
                let uid = peer.uid.map_or("unknown".to_string(), |u| u.to_string());
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("uid {uid} may not {what}")).into_response()
            };
            response.headers_mut().insert("x-request-id", HeaderValue::from(id));
            response
        })
        .await
}

fn is_control(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    (path.starts_with("/v1/watches") && (method == Method::POST || method == Method::DELETE))
        || path.starts_with("/v1/source/")
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/grants", get(grants))
        .route("/v1/vcpus", get(vcpus))
        .route("/v1/memory/physical", get(read_physical))
        .route("/v1/memory/physical/hex", get(read_physical_hex))
        .route("/v1/hash", post(hash))
        .route("/v1/scan", post(scan))
        .route("/v1/watches", get(list_watches).post(create_watch))
        .route("/v1/watches/{id}", delete(delete_watch))
        .route("/v1/watches/{id}/findings", get(findings))
        .route("/v1/source/pause", post(pause))
        .route("/v1/source/resume", post(resume))
        .route("/v1/events", get(event_stream))
        .route("/v1/os/kernel", get(os_kernel))
        .route("/v1/os/discover", post(os_discover))
        .route("/v1/os/processes", get(os_processes))
        .route("/v1/os/processes/{pid}/maps", get(os_maps))
        .route("/v1/os/processes/{pid}/memory", get(os_memory))
        .route("/v1/os/modules", get(os_modules))
        .route("/v1/os/checks/syscalls", get(os_check_syscalls))
        .route("/v1/os/checks", get(os_checks))
        .route("/v1/os/symbols", get(os_symbols))
        .route("/v1/os/btf", get(os_btf))
        .route("/v1/yara", post(yara_scan))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint under /v1") })
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Binds `path` and serves the API on a runtime of its own thread.
pub fn serve(path: &Path, inspector: Arc<Inspector>, access: ApiAccess) -> std::io::Result<()> {
    // SAFETY: getuid cannot fail.
    let own = unsafe { libc::getuid() };
    let others = access.read_uids.iter().chain(&access.control_uids).any(|&u| u != own);
    let std_listener = mirror_driver::socket::bind_private(path, if others { 0o666 } else { 0o600 })?;
    if others {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    }
    std_listener.set_nonblocking(true)?;
    let state = AppState { inspector, access: Arc::new(access) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match UnixListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => return log::error!("api: {e}"),
            };
            let app = router(state).into_make_service_with_connect_info::<Peer>();
            if let Err(e) = axum::serve(listener, app).await {
                log::error!("api: {e}");
            }
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_openapi_document_is_the_one_served() {
        let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).expect(
            "docs/openapi.json (regenerate: cargo run -p inspector --bin specula -- openapi > docs/openapi.json)",
        );
        assert_eq!(committed.trim_end(), openapi_json().trim_end(), "docs/openapi.json is stale: regenerate it");
    }

    #[test]
    fn control_endpoints_are_told_apart() {
        use axum::http::Method;
        assert!(is_control(&Method::POST, "/v1/watches"));
        assert!(is_control(&Method::DELETE, "/v1/watches/3"));
        assert!(is_control(&Method::POST, "/v1/source/pause"));
        assert!(!is_control(&Method::GET, "/v1/watches"));
        assert!(!is_control(&Method::POST, "/v1/scan"));
        assert!(!is_control(&Method::GET, "/v1/watches/3/findings"));
    }
}
