//! The inspector's HTTP API on a Unix socket (axum): each route builds a
//! [`specula_api::Request`], the core handles it ([`Inspector::handle`]), and the
//! reply goes back as JSON (the models of `specula_api`) or as bytes.
//!
//! Access is per sub-router, each with its own layer: every route needs a uid the
//! API lets in ([`ApiAccess::may_read`]); the control routes (`control::routes`: pause,
//! resume, creating and deleting watches) need a control uid as well. A new route
//! is read-only only if it is put among the read routes. Every request gets an id,
//! in `x-request-id` and in error bodies.

mod control;
mod memory;
mod os;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::connect_info::{self, ConnectInfo};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use specula_api::{ErrorBody, Reply, Request};
use tokio::net::UnixListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::core::{InspectError, Inspector};
use crate::source::SourceError;
use mirror_driver::importer::ImportError;
use mirror_driver::protocol::ErrorCode;

/// Who may use the API.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// uids that may use the read-only views.
    pub read_uids: Vec<u32>,
    /// uids that may also control (pause, resume, watches).
    pub control_uids: Vec<u32>,
}

impl ApiAccess {
    /// Whether `uid` may use the read routes (a control uid may too).
    pub fn may_read(&self, uid: u32) -> bool {
        self.read_uids.contains(&uid) || self.control_uids.contains(&uid)
    }
}

#[derive(Clone)]
struct AppState {
    inspector: Arc<Inspector>,
    access: Arc<ApiAccess>,
}

impl AppState {
    /// Has the core serve `request` on this worker thread (see [`blocking`]).
    async fn call(&self, request: Request) -> Result<Reply, ApiError> {
        let inspector = self.inspector.clone();
        blocking(move || inspector.handle(request)).await
    }

    /// [`AppState::call`], answering JSON.
    async fn json(&self, request: Request) -> Result<Json<Reply>, ApiError> {
        self.call(request).await.map(Json)
    }

    /// [`AppState::call`] for a request that answers nothing: 204.
    async fn done(&self, request: Request) -> Result<StatusCode, ApiError> {
        self.call(request).await.map(|_| StatusCode::NO_CONTENT)
    }
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

/// The id of the request being served (0 outside one).
fn request_id() -> u64 {
    REQUEST_ID.try_with(|id| *id).unwrap_or(0)
}

/// An API error: HTTP status, stable code, message; the body also names the request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
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
            InspectError::SourceGone => Self::new(StatusCode::GONE, "source_gone", message),
            InspectError::BadRequest(_) => Self::bad_request(message),
            InspectError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", message),
            InspectError::Os(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "os_error", message),
            InspectError::Agent(_) | InspectError::BadReply(_) => {
                Self::new(StatusCode::BAD_GATEWAY, "agent_error", message)
            }
            InspectError::Misrouted(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
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

impl From<specula_api::ParseError> for ApiError {
    fn from(e: specula_api::ParseError) -> Self {
        Self::bad_request(specula_common::error_chain(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code.into(), message: self.message, request_id: request_id() };
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
    let id = request_id();
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
    Ok(specula_common::parse::number(Some(text), what)?)
}

/// The document's frame; the paths and schemas come from the routes themselves.
#[derive(OpenApi)]
#[openapi(info(
    title = "Specula introspection API",
    version = "1",
    description = "The inspector daemon's API over a Unix socket."
))]
struct ApiDoc;

/// Every route, and the OpenAPI document they make.
fn routes(access: &Arc<ApiAccess>) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let read = memory::routes().merge(os::routes()).merge(control::read_routes());
    let control = control::routes().route_layer(middleware::from_fn_with_state(access.clone(), require_control));
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(read).merge(control).split_for_parts()
}

/// The OpenAPI document, as served.
pub fn openapi_json() -> String {
    let nobody = Arc::new(ApiAccess { read_uids: vec![], control_uids: vec![] });
    routes(&nobody).1.to_pretty_json().expect("the OpenAPI document serializes")
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Gives every request an id (in `x-request-id` and in error bodies) and refuses
/// peers the API does not let in at all.
async fn gate(
    State(access): State<Arc<ApiAccess>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: HttpRequest,
    next: Next,
) -> Response {
    let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    REQUEST_ID
        .scope(id, async move {
            let mut response = match peer.uid {
                Some(uid) if access.may_read(uid) => next.run(request).await,
                _ => forbidden(peer.uid, "use this API"),
            };
            response.headers_mut().insert("x-request-id", HeaderValue::from(id));
            response
        })
        .await
}

/// The control routes' own layer: a control uid only.
async fn require_control(
    State(access): State<Arc<ApiAccess>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: HttpRequest,
    next: Next,
) -> Response {
    match peer.uid {
        Some(uid) if access.control_uids.contains(&uid) => next.run(request).await,
        _ => forbidden(peer.uid, "control this inspector"),
    }
}

fn forbidden(uid: Option<u32>, what: &str) -> Response {
    let uid = uid.map_or("unknown".to_string(), |u| u.to_string());
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("uid {uid} may not {what}")).into_response()
}

fn router(state: AppState) -> Router {
    let (routes, doc) = routes(&state.access);
    let doc = Arc::new(doc.to_pretty_json().expect("the OpenAPI document serializes"));
    routes
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc.to_string()).into_response() }
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint under /v1") })
        .layer(middleware::from_fn_with_state(state.access.clone(), gate))
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
}
