//! HTTP/1.1 over the inspector's API socket, and the errors of the `specula` CLI.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request as HttpRequest, StatusCode};
use hyper_util::rt::TokioIo;
use specula_api::{ErrorBody, Reply, Request};

/// Why a `specula` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the API")]
    Http(#[from] hyper::Error),
    #[error("building the HTTP request")]
    Request(#[from] hyper::http::Error),
    #[error("{code} ({status}): {message} [request {request_id}]")]
    Api { code: String, status: u16, message: String, request_id: u64 },
    #[error("the API's reply to {path} is not what it should be")]
    Reply {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0} is served on the inspector's line socket only (inspector --control-socket)")]
    LineOnly(&'static str),
    /// specula-os is no_std: its error is shown, not chained.
    #[error("the guest's BTF: {0}")]
    Btf(specula_os::Error),
    #[error("building the ISF")]
    Isf(#[from] inspector::isf::IsfError),
    #[error("launch")]
    Launch(#[from] inspector::launch::LaunchError),
    #[error("an argument")]
    Parse(#[from] specula_common::ParseError),
}

/// An API reply: status and body.
pub struct HttpReply {
    pub status: StatusCode,
    pub body: Bytes,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// An HTTP/1.1 connection to the API socket.
pub async fn connect(socket: &Path) -> Result<hyper::client::conn::http1::SendRequest<Body>, CliError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CliError::Connect { socket: socket.to_path_buf(), source })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One HTTP request.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<HttpReply, CliError> {
    let mut sender = connect(socket).await?;
    let builder = HttpRequest::builder().method(method).uri(path).header("host", "specula");
    let request = match body {
        Some(v) => {
            builder.header("content-type", "application/json").body(Full::new(Bytes::from(v.to_string())).boxed())?
        }
        None => builder.body(Empty::<Bytes>::new().boxed())?,
    };
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(HttpReply { status, body })
}

/// The body of a successful reply, or the API's error.
pub fn success(reply: HttpReply, path: &str) -> Result<Bytes, CliError> {
    if reply.status.is_success() {
        return Ok(reply.body);
    }
    let error: ErrorBody =
        serde_json::from_slice(&reply.body).map_err(|source| CliError::Reply { path: path.into(), source })?;
    Err(CliError::Api {
        code: error.code,
        status: reply.status.as_u16(),
        message: error.message,
        request_id: error.request_id,
    })
}

/// Sends a request on its route; returns the raw body and the typed reply.
pub async fn send(socket: &Path, request: &Request) -> Result<(Bytes, Reply), CliError> {
    let route = request.route().ok_or(CliError::LineOnly("this request"))?;
    let method = Method::from_bytes(route.method.as_bytes()).unwrap_or(Method::GET);
    let body = success(call(socket, method, &route.path, route.body.as_ref()).await?, &route.path)?;
    let reply =
        request.reply_from_http(&body).map_err(|source| CliError::Reply { path: route.path.clone(), source })?;
    Ok((body, reply))
}

/// Sends a request and returns its typed reply.
pub async fn ask(socket: &Path, request: &Request) -> Result<Reply, CliError> {
    send(socket, request).await.map(|(_, reply)| reply)
}
