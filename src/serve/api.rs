//! The HTTP/1.1 + JSON API on a Unix socket (axum), as described in `openapi.json`. Every error is
//! `{"error": "..."}` with a 4xx/5xx status; every response carries the request id (the caller's
//! `x-request-id`, or one ember made), which the logs of the request carry too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use tracing::Instrument;

use super::command::{self, Command, Step};
use super::model::{Error, ErrorKind, FunctionSpec};
use super::supervisor::Supervisor;
use crate::request_body::Refused;

pub const OPENAPI: &str = include_str!("openapi.json");
/// The largest request body: a payload as large as the mailbox takes, base64-encoded in JSON.
pub const MAX_BODY: usize = 1 << 20;

/// The request's id (the caller's `x-request-id`, or one ember made), for handlers.
#[derive(Clone)]
struct RequestId(String);

/// An error response: `{"error": "..."}`, with `Retry-After` (seconds) when the caller should
/// come back later.
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> Self {
        Self { status, message, retry_after_s: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// The HTTP status of a refusal of `kind` (the lean protocol answers the same codes).
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Restarting => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::GuestFailed => StatusCode::BAD_GATEWAY,
        ErrorKind::GuestTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self { status: status(e.kind()), message: e.to_string(), retry_after_s: e.retry_after_s() }
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg.into())
}

/// Parses a JSON body, refusing unknown fields (the types say `deny_unknown_fields`).
fn json_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("bad JSON body: {e}")))
}

type Sup = State<Arc<Supervisor>>;

/// Calls `cmd` on the core: what it does at once is done here, what blocks goes to the runtime's
/// blocking pool.
async fn call<C: Command>(sup: &Arc<Supervisor>, cmd: C) -> Result<C::Reply, ApiError> {
    match command::call(sup, cmd)? {
        Step::Done(r) => Ok(r),
        Step::Blocking(f) => {
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || span.in_scope(f))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("task failed: {e}")))?
                .map_err(ApiError::from)
        }
    }
}

async fn put_function(State(sup): Sup, Path(name): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let spec: FunctionSpec = json_body(&body)?;
    let info = call(&sup, command::Register { name, spec }).await?;
    Ok((StatusCode::ACCEPTED, Json(info)).into_response())
}

async fn list_functions(State(sup): Sup) -> Result<Response, ApiError> {
    let functions = call(&sup, command::ListFunctions).await?;
    Ok(Json(serde_json::json!({ "functions": functions })).into_response())
}

async fn get_function(State(sup): Sup, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(call(&sup, command::GetFunction { name }).await?).into_response())
}

async fn delete_function(State(sup): Sup, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    call(&sup, command::DeleteFunction { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn acquire(State(sup): Sup, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(call(&sup, command::Acquire { name: name.into() }).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    /// The lease token `acquire` answered with.
    lease: String,
    /// Destroy the clone even when the function's policy would reuse it.
    #[serde(default)]
    destroy: bool,
}

async fn release(State(sup): Sup, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let id: u64 = id.parse().map_err(|_| bad_request(format!("bad VM id {id:?}")))?;
    if body.is_empty() {
        return Err(bad_request("the body must carry the handoff's lease: {\"lease\": \"...\"}"));
    }
    let b: ReleaseBody = json_body(&body)?;
    let released = call(&sup, command::Release { id, lease: b.lease, destroy: b.destroy }).await?;
    Ok(Json(released).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    /// The function inside the guest; the registration's `handler` when absent.
    #[serde(default)]
    function: Option<String>,
    /// The payload, as text.
    #[serde(default)]
    payload: Option<String>,
    /// The payload, base64: for bytes that are not UTF-8.
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    timeout_s: Option<f64>,
}

/// The query of an invoke whose body is the raw payload (`application/octet-stream`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    function: Option<String>,
    timeout_s: Option<f64>,
}

const OCTET_STREAM: &str = "application/octet-stream";

/// Invokes the function. A JSON body (or none) gets a JSON answer; an `application/octet-stream`
/// body is the payload itself (function and timeout in the query) and gets the response bytes
/// back, the agent's status in `x-ember-status`.
async fn invoke(
    State(sup): Sup,
    Path(name): Path<String>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    query: Result<Query<InvokeQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(format!("bad query: {}", e.body_text())))?;
    // The query is checked whole, even where a JSON body's own values will win.
    if let Some(t) = query.timeout_s {
        command::check_timeout(t)?;
    }
    if let Some(f) = &query.function {
        command::check_function(f)?;
    }
    let raw = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with(OCTET_STREAM));
    let (function, payload, timeout_s) = if raw {
        (query.function, body.to_vec(), query.timeout_s)
    } else {
        let b: InvokeBody = if body.is_empty() { InvokeBody::default() } else { json_body(&body)? };
        let payload = match (b.payload, b.payload_base64) {
            (Some(_), Some(_)) => return Err(bad_request("give payload or payload_base64, not both")),
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => {
                BASE64.decode(b64.as_bytes()).map_err(|e| bad_request(format!("payload_base64: {e}")))?
            }
            (None, None) => Vec::new(),
        };
        // The query's function and timeout apply to a JSON body too; the body's own win.
        (b.function.or(query.function), payload, b.timeout_s.or(query.timeout_s))
    };
    let invoke = command::Invoke::new(name, function, payload, timeout_s, request_id.clone())?;
    let r = call(&sup, invoke).await?;
    if raw {
        let status = HeaderValue::from_static(r.status.describe());
        return Ok((
            [
                (CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM)),
                (HeaderName::from_static("x-ember-status"), status),
            ],
            r.payload,
        )
            .into_response());
    }
    Ok(Json(r.to_json(&request_id)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerBody {
    /// A directory, tar archive or OCI image beneath one of the daemon's image directories.
    path: std::path::PathBuf,
}

/// The largest archive `PUT /layers/{name}` takes as its body.
pub const MAX_UPLOAD: usize = 256 << 20;

/// Builds a layer from a path (a JSON body) or from the archive that is the body (any other
/// content type): 201 when made, 200 when the name already has this content.
async fn put_layer(
    State(sup): Sup,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // JSON when it says so, or says nothing; curl's `-d` labels a JSON object as a form, and no
    // archive starts with `{`.
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let json = content_type.is_none_or(|v| {
        v.starts_with("application/json")
            || (v.starts_with("application/x-www-form-urlencoded") && body.first() == Some(&b'{'))
    });
    let source = if json {
        if body.len() > MAX_BODY {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a JSON body is at most {MAX_BODY} bytes"),
            ));
        }
        let b: LayerBody = json_body(&body)?;
        command::LayerSource::Path(b.path)
    } else {
        command::LayerSource::Archive(body.to_vec())
    };
    let put = call(&sup, command::PutLayer { name, source }).await?;
    let status = if put.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(put.info)).into_response())
}

async fn list_layers(State(sup): Sup) -> Result<Response, ApiError> {
    let layers = call(&sup, command::ListLayers).await?;
    Ok(Json(serde_json::json!({ "layers": layers })).into_response())
}

async fn get_layer(State(sup): Sup, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(call(&sup, command::GetLayer { name }).await?).into_response())
}

async fn delete_layer(State(sup): Sup, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    call(&sup, command::DeleteLayer { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(sup): Sup) -> Result<Response, ApiError> {
    let text = call(&sup, command::Metrics).await?;
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see GET /openapi.json)".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint (see GET /openapi.json)".into())
}

fn is_json(resp: &Response) -> bool {
    resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// The most body bytes a request to `req`'s route may carry.
fn body_limit(req: &Request) -> usize {
    if req.uri().path().starts_with("/layers/") {
        MAX_UPLOAD
    } else {
        MAX_BODY
    }
}

/// Gives every request an id (the caller's `x-request-id` or a new one), logs under it and
/// returns it, with the time the daemon took (`server-timing: ember;dur=<ms>`, request routed to
/// response built).
async fn request_id(mut req: Request, next: Next) -> Response {
    let mut t = std::time::Instant::now();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("ember-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    req.extensions_mut().insert(RequestId(id.clone()));
    // The whole body is read before the request is routed (see crate::request_body).
    let limit = body_limit(&req);
    let mut resp = match crate::request_body::read_whole(req, limit).await {
        Ok(req) => {
            // The client's upload time is not the daemon's.
            t = std::time::Instant::now();
            next.run(req).instrument(span.clone()).await
        }
        Err(Refused::TooLarge { declared: Some(declared), limit }) => {
            let msg = format!("the body is {declared} bytes, over this request's limit of {limit} bytes");
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, msg).into_response()
        }
        Err(Refused::TooLarge { declared: None, limit }) => {
            let msg = format!("the body is over this request's limit of {limit} bytes");
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, msg).into_response()
        }
        Err(Refused::Unreadable(e)) => bad_request(format!("cannot read the body: {e}")).into_response(),
    };
    if resp.status().is_client_error() && !is_json(&resp) {
        // axum's own refusals (a body over the limit, a bad content length) come as text: every
        // error this API answers is `{"error": "..."}`.
        let status = resp.status();
        let text = axum::body::to_bytes(resp.into_body(), 64 << 10).await.unwrap_or_default();
        resp = ApiError::new(status, String::from_utf8_lossy(&text).trim().to_string()).into_response();
    }
    span.in_scope(|| tracing::debug!(status = resp.status().as_u16(), "done"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let took = format!("ember;dur={:.4}", t.elapsed().as_secs_f64() * 1e3);
    if let Ok(v) = HeaderValue::from_str(&took) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

/// The API's routes over `sup`.
pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/functions", get(list_functions))
        .route("/functions/{name}", get(get_function).put(put_function).delete(delete_function))
        .route("/functions/{name}/acquire", post(acquire))
        .route("/functions/{name}/invoke", post(invoke))
        .route("/vms/{id}/release", post(release))
        .route("/layers", get(list_layers))
        .route(
            "/layers/{name}",
            get(get_layer).put(put_layer).delete(delete_layer).layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(sup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_kind_of_refusal_has_its_status_and_a_json_body() {
        let kinds = [
            (ErrorKind::BadRequest, 400),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::Busy, 429),
            (ErrorKind::Internal, 500),
            (ErrorKind::GuestFailed, 502),
            (ErrorKind::Restarting, 503),
            (ErrorKind::GuestTimeout, 504),
        ];
        for (kind, code) in kinds {
            let r = ApiError::from(Error::new(kind, "why")).into_response();
            assert_eq!(r.status().as_u16(), code, "{kind:?}");
            assert!(is_json(&r), "{kind:?}");
            assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
        }
        let r = ApiError::from(Error::restarting("later", Duration::from_millis(2500))).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "3");
    }
}
