//! Routes on watches, the source's vCPUs and the event stream. [`routes`] are the
//! control routes (the parent router layers them with the control check);
//! [`read_routes`] only read.

use std::convert::Infallible;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use specula_api::{
    ErrorBody, Event, EventQuery, FindingInfo, Reply, Request, TraceRequest, TraceStatus, WatchInfo, WatchRequest,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{number, ApiError, ApiResult, AppState};
use crate::events;

/// Routes that change what the inspector or the source does.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_watch))
        .routes(routes!(delete_watch))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(trace_start, trace_stop))
}

/// Routes that only read.
pub(super) fn read_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_watches))
        .routes(routes!(findings))
        .routes(routes!(event_stream))
        .routes(routes!(trace_status))
}

#[utoipa::path(get, path = "/v1/watches", responses((status = 200, body = [WatchInfo])))]
async fn list_watches(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::Watches).await
}

/// Creates a polled watch (control clients).
#[utoipa::path(post, path = "/v1/watches", request_body = WatchRequest, responses((status = 200, body = WatchInfo), (status = 403, body = ErrorBody)))]
async fn create_watch(State(s): State<AppState>, Json(q): Json<WatchRequest>) -> ApiResult<Reply> {
    let (gpa, len) = (number(&q.gpa, "gpa")?, number(&q.len, "len")?);
    s.json(Request::Watch { gpa, len, polled: true }).await
}

/// Deletes a watch (control clients).
#[utoipa::path(delete, path = "/v1/watches/{id}", params(("id" = usize, Path)), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_watch(State(s): State<AppState>, UrlPath(id): UrlPath<usize>) -> Result<StatusCode, ApiError> {
    s.done(Request::DeleteWatch { id }).await
}

#[utoipa::path(get, path = "/v1/watches/{id}/findings", params(("id" = usize, Path)), responses((status = 200, body = [FindingInfo])))]
async fn findings(State(s): State<AppState>, UrlPath(id): UrlPath<usize>) -> ApiResult<Reply> {
    s.json(Request::Findings { id }).await
}

/// Pauses the source's vCPUs (control clients; QEMU sources, and Specula sources that allow it).
#[utoipa::path(post, path = "/v1/source/pause", responses((status = 204), (status = 501, body = ErrorBody)))]
async fn pause(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    s.done(Request::Pause).await
}

/// Resumes the source's vCPUs (control clients).
#[utoipa::path(post, path = "/v1/source/resume", responses((status = 204), (status = 501, body = ErrorBody)))]
async fn resume(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    s.done(Request::Resume).await
}

/// Starts tracing the source's guest (control clients; a Specula vmm started with
/// `--mirror-allow-trace`): the kinds named (`msr_writes`, `exec`, `exit`,
/// `module_load`, `kernel_writes`; all when none is named) are reported on the event stream as
/// `trace.*` events. Replaces what was traced before.
#[utoipa::path(post, path = "/v1/trace", request_body = TraceRequest, responses((status = 200, body = TraceStatus), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 501, body = ErrorBody)))]
async fn trace_start(State(s): State<AppState>, Json(q): Json<TraceRequest>) -> ApiResult<Reply> {
    s.json(Request::TraceStart { kinds: q.kinds, software_breakpoints: q.software_breakpoints }).await
}

/// Stops tracing (control clients): the source disarms what no inspector traces.
#[utoipa::path(delete, path = "/v1/trace", responses((status = 200, body = TraceStatus), (status = 501, body = ErrorBody)))]
async fn trace_stop(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::TraceStop).await
}

/// What is traced, and how many trace events were reported and dropped.
#[utoipa::path(get, path = "/v1/trace", responses((status = 200, body = TraceStatus)))]
async fn trace_status(State(s): State<AppState>) -> ApiResult<Reply> {
    s.json(Request::TraceStatus).await
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
