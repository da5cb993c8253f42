//! Routes on the source's memory and state: status, grants, vCPUs, reads, hashes, scans.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use specula_api::{
    Digests, ErrorBody, GrantInfo, HexBytes, RangeQuery, Reply, Request, ScanRequest, ScanResult, Status, Vcpu,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{number, request_id, ApiError, ApiResult, AppState};

/// Bytes per piece while streaming physical memory (copied from the inspector's own
/// read-only mappings of the grants).
const STREAM_CHUNK: u64 = crate::core::MAX_MAPPED_READ;
/// Longest JSON (hex) read.
pub const MAX_JSON_READ: u64 = 64 << 10;
/// Most scan hits per page of a scan reply.
pub const MAX_SCAN_PAGE: usize = 100_000;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(grants))
        .routes(routes!(vcpus))
        .routes(routes!(read_physical))
        .routes(routes!(read_physical_hex))
        .routes(routes!(hash))
        .routes(routes!(scan))
}

fn range(q: &RangeQuery) -> Result<(u64, u64), ApiError> {
    Ok((number(&q.gpa, "gpa")?, number(&q.len, "len")?))
}

#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = Status)))]
async fn status(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Status).await
}

#[utoipa::path(get, path = "/v1/grants", responses((status = 200, body = [GrantInfo])))]
async fn grants(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Grants).await
}

#[utoipa::path(get, path = "/v1/vcpus", responses((status = 200, body = [Vcpu]), (status = 410, body = ErrorBody)))]
async fn vcpus(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Vcpus).await
}

/// Guest-physical memory as a binary stream of exactly `len` bytes.
#[utoipa::path(get, path = "/v1/memory/physical", params(RangeQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 409, body = ErrorBody)))]
async fn read_physical(State(s): State<AppState>, Query(q): Query<RangeQuery>) -> Result<Response, ApiError> {
    let (gpa, len) = range(&q)?;
    let inspector = s.inspector.clone();
    super::blocking(move || inspector.check_range(gpa, len)).await?;
    let request_id = request_id();
    // Bulk data skips the agent: pieces are copied from the inspector's own mappings.
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
    let (gpa, len) = range(&q)?;
    if len > MAX_JSON_READ {
        return Err(ApiError::bad_request(format!(
            "JSON reads are at most {MAX_JSON_READ} bytes: use /v1/memory/physical for bulk data"
        )));
    }
    match s.call(Request::Read { gpa, len }).await? {
        Reply::Bytes(bytes) => Ok(Json(HexBytes { gpa, hex: specula_common::hex::encode(&bytes) })),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/v1/hash", request_body = RangeQuery, responses((status = 200, body = Digests)))]
async fn hash(State(s): State<AppState>, Json(q): Json<RangeQuery>) -> ApiResult<Reply> {
    let (gpa, len) = range(&q)?;
    s.json(Request::Hash { gpa, len }).await
}

#[utoipa::path(post, path = "/v1/scan", request_body = ScanRequest, responses((status = 200, body = ScanResult)))]
async fn scan(State(s): State<AppState>, Json(q): Json<ScanRequest>) -> ApiResult<ScanResult> {
    let (gpa, len) = (number(&q.gpa, "gpa")?, number(&q.len, "len")?);
    let pattern = specula_common::hex::decode(&q.pattern)?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_SCAN_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_SCAN_PAGE}")));
    }
    let (total, hits) = match s.call(Request::Scan { gpa, len, pattern }).await? {
        Reply::Hits { total, hits } => (total, hits),
        other => return Err(unexpected(other)),
    };
    let page: Vec<u64> = hits.iter().skip(q.offset).take(limit).copied().collect();
    let next = q.offset + page.len();
    Ok(Json(ScanResult { total, hits: page, next_offset: (next < hits.len()).then_some(next) }))
}

/// A reply of the wrong kind from the core: a bug, answered as one.
pub(super) fn unexpected(reply: Reply) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the core answered {:?}", std::mem::discriminant(&reply)),
    )
}
