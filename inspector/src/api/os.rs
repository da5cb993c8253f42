//! Routes on the source's operating system: kernel, processes, modules, memory areas,
//! virtual memory, symbols, BTF, rootkit checks and YARA scans.

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use specula_api::{
    CheckReport, ChecksQuery, DecodedProcess, ErrorBody, KernelInfo, Module, Reply, Request, SymbolRecord,
    SyscallCheck, VirtualQuery, Vma, YaraReportView, YaraRequest,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::memory::unexpected;
use super::{number, ApiError, ApiResult, AppState};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(os_kernel))
        .routes(routes!(os_discover))
        .routes(routes!(os_processes))
        .routes(routes!(os_process))
        .routes(routes!(os_maps))
        .routes(routes!(os_memory))
        .routes(routes!(os_modules))
        .routes(routes!(os_check_syscalls))
        .routes(routes!(os_checks))
        .routes(routes!(os_symbols))
        .routes(routes!(os_btf))
        .routes(routes!(yara_scan))
}

/// Bytes from the core as an octet stream.
async fn bytes(s: &AppState, request: Request) -> Result<Response, ApiError> {
    match s.call(request).await? {
        Reply::Bytes(bytes) => {
            Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], bytes).into_response())
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(get, path = "/v1/os/kernel", responses((status = 200, body = KernelInfo), (status = 422, body = ErrorBody)))]
async fn os_kernel(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Kernel).await
}

/// Finds the source's kernel again (after it rebooted, say).
#[utoipa::path(post, path = "/v1/os/discover", responses((status = 200, body = KernelInfo), (status = 422, body = ErrorBody)))]
async fn os_discover(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Discover).await
}

#[utoipa::path(get, path = "/v1/os/processes", responses((status = 200, body = [DecodedProcess]), (status = 422, body = ErrorBody)))]
async fn os_processes(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Ps).await
}

/// One process, by pid (404 when the task list has none).
#[utoipa::path(get, path = "/v1/os/processes/{pid}", params(("pid" = i32, Path)),
    responses((status = 200, body = DecodedProcess), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn os_process(State(s): State<AppState>, UrlPath(pid): UrlPath<i32>) -> ApiResult<Reply> {
    s.json(Request::Process { pid }).await
}

#[utoipa::path(get, path = "/v1/os/processes/{pid}/maps", params(("pid" = u32, Path)), responses((status = 200, body = [Vma])))]
async fn os_maps(State(s): State<AppState>, UrlPath(pid): UrlPath<u32>) -> ApiResult<Reply> {
    s.json(Request::Maps { pid }).await
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
    bytes(&s, Request::Vread { pid, va, len }).await
}

#[utoipa::path(get, path = "/v1/os/modules", responses((status = 200, body = [Module])))]
async fn os_modules(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Lsmod).await
}

/// Rootkit check: system call table entries that point outside the kernel's text.
#[utoipa::path(get, path = "/v1/os/checks/syscalls", responses((status = 200, body = SyscallCheck), (status = 422, body = ErrorBody)))]
async fn os_check_syscalls(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::CheckSyscalls).await
}

/// Rootkit checks: the pid table against the task list, module kobjects and the module
/// tree against the module list, the system call table and the IDT against kernel text,
/// kernel text against its hashes at discovery.
#[utoipa::path(get, path = "/v1/os/checks", params(ChecksQuery),
    responses((status = 200, body = CheckReport), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn os_checks(State(s): State<AppState>, Query(q): Query<ChecksQuery>) -> ApiResult<Reply> {
    let only = q.only.as_deref().unwrap_or("").split(',').filter(|n| !n.is_empty()).map(String::from).collect();
    s.json(Request::Checks { only }).await
}

/// Scans guest memory with YARA rules: all granted physical memory, one process's
/// virtual memory, or the kernel image.
#[utoipa::path(post, path = "/v1/yara", request_body = YaraRequest,
    responses((status = 200, body = YaraReportView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn yara_scan(State(s): State<AppState>, Json(req): Json<YaraRequest>) -> ApiResult<Reply> {
    s.json(Request::Yara(req)).await
}

/// Every kernel symbol (kallsyms, decoded in the agent from guest memory).
#[utoipa::path(get, path = "/v1/os/symbols", responses((status = 200, body = [SymbolRecord]), (status = 422, body = ErrorBody)))]
async fn os_symbols(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Symbols).await
}

/// The kernel's BTF type information (`__start_BTF`..`__stop_BTF`), as bytes.
#[utoipa::path(get, path = "/v1/os/btf",
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 422, body = ErrorBody)))]
async fn os_btf(State(s): State<AppState>) -> Result<Response, ApiError> {
    bytes(&s, Request::Btf).await
}
