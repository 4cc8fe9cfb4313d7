//! Firecracker's API on its Unix socket: each path and method as Firecracker serves it (204 for
//! a successful PUT or PATCH, 200 with the documented body for a GET, 400 with
//! `{"fault_message": ...}` otherwise), over the process's one [`Machine`].

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::machine::Machine;
use super::metrics::Metrics;
use super::model::{self, unsupported, Fault};
use crate::request_body::Refused;
use crate::sys::Locked;

type Shared = State<Arc<Mutex<Machine>>>;

/// This door's OpenAPI document (`GET /openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "fault_message": self.0 }))).into_response()
    }
}

/// A body Firecracker requires: present and valid.
fn body<T: DeserializeOwned>(method: &str, bytes: &Bytes) -> Result<T, Fault> {
    if bytes.is_empty() {
        return Err(Fault::new(format!("Empty {method} request.")));
    }
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    if !v.is_object() {
        return Err(Fault::new(
            "An error occurred when deserializing the json body of a request: expected a JSON object.",
        ));
    }
    Ok(serde_json::from_value(v)?)
}

fn done(r: Result<(), Fault>) -> Response {
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(f) => f.into_response(),
    }
}

async fn root(State(m): Shared) -> Response {
    Json(m.locked().info()).into_response()
}

async fn version() -> Response {
    Json(serde_json::json!({ "firecracker_version": model::FIRECRACKER_API_VERSION })).into_response()
}

async fn get_machine_config(State(m): Shared) -> Response {
    Json(m.locked().machine_config()).into_response()
}

async fn put_machine_config(State(m): Shared, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|c| m.locked().set_machine_config(c, false)))
}

async fn patch_machine_config(State(m): Shared, b: Bytes) -> Response {
    done(body("PATCH", &b).and_then(|c| m.locked().set_machine_config(c, true)))
}

async fn put_boot_source(State(m): Shared, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|s| m.locked().put_boot_source(s)))
}

async fn put_drive(State(m): Shared, Path(id): Path<String>, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|d| m.locked().put_drive(&id, d)))
}

async fn put_net(State(m): Shared, Path(id): Path<String>, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|n| m.locked().put_net(&id, n)))
}

async fn patch_drive(State(m): Shared, Path(id): Path<String>, b: Bytes) -> Response {
    done(body("PATCH", &b).and_then(|d| m.locked().patch_drive(&id, d)))
}

async fn patch_net(State(m): Shared, Path(id): Path<String>, b: Bytes) -> Response {
    done(body("PATCH", &b).and_then(|n| m.locked().patch_net(&id, n)))
}

async fn put_metrics(State(m): Shared, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|c| m.locked().configure_metrics(c)))
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn put_vsock(State(m): Shared, b: Bytes) -> Response {
    done(body("PUT", &b).and_then(|v| m.locked().put_vsock(v)))
}

async fn get_vm_config(State(m): Shared) -> Response {
    Json(m.locked().full_config()).into_response()
}

async fn patch_vm(State(m): Shared, b: Bytes) -> Response {
    done(body::<model::VmState>("PATCH", &b).and_then(|v| m.locked().set_state(&v.state)))
}

/// Work on the machine that blocks (a boot, a snapshot's memory written or mapped): off the
/// async thread.
async fn blocking(
    m: Arc<Mutex<Machine>>,
    f: impl FnOnce(&mut Machine) -> Result<(), Fault> + Send + 'static,
) -> Response {
    let r = tokio::task::spawn_blocking(move || f(&mut m.locked())).await;
    done(r.unwrap_or_else(|e| Err(Fault::new(format!("the request failed: {e}")))))
}

async fn put_snapshot_create(State(m): Shared, b: Bytes) -> Response {
    match body::<model::SnapshotCreate>("PUT", &b) {
        Ok(c) => blocking(m, move |m| m.create_snapshot(c)).await,
        Err(f) => f.into_response(),
    }
}

async fn put_snapshot_load(State(m): Shared, b: Bytes) -> Response {
    match body::<model::SnapshotLoad>("PUT", &b) {
        // On the runtime's thread (a millisecond; the API serves one microVM, and Firecracker's
        // answers each request in turn too): a handoff to the blocking pool and back costs more
        // than the API's own work.
        Ok(l) => done(m.locked().load_snapshot(l)),
        Err(f) => f.into_response(),
    }
}

/// `PUT /logger`: before InstanceStart, as in Firecracker.
async fn put_logger(State(m): Shared, b: Bytes) -> Response {
    let configure = |l: super::log::Logger| {
        m.locked().check_not_started()?;
        super::log::configure(&l)
    };
    done(body::<super::log::Logger>("PUT", &b).and_then(configure))
}

async fn put_actions(State(m): Shared, b: Bytes) -> Response {
    let action = match body::<model::Action>("PUT", &b) {
        Ok(a) => a,
        Err(f) => return f.into_response(),
    };
    match action.action_type.as_str() {
        "InstanceStart" => blocking(m, Machine::start).await,
        "SendCtrlAltDel" => done(m.locked().send_ctrl_alt_del()),
        "FlushMetrics" => done(m.locked().flush_metrics()),
        other => Fault::new(format!(
            "unknown variant `{other}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"
        ))
        .into_response(),
    }
}

/// Paths of Firecracker's API that ember does not serve yet: named in the refusal.
const NOT_YET: &[(&str, &str)] = &[
    ("/balloon", "the balloon device"),
    ("/cpu-config", "CPU templates (cpu-config)"),
    ("/entropy", "the entropy device"),
    ("/hotplug/memory", "memory hotplug"),
    ("/mmds", "MMDS"),
    ("/pmem", "pmem devices"),
    ("/serial", "the serial device's configuration"),
];

/// Anything else: a path ember knows of but does not serve yet, or none of Firecracker's.
async fn fallback(req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Some((_, what)) = NOT_YET.iter().find(|(p, _)| path == *p || path.starts_with(&format!("{p}/"))) {
        return unsupported(what).into_response();
    }
    Fault::new(format!("Invalid request method and/or path: {} {}.", req.method(), path)).into_response()
}

/// Reads each request's whole body before it is answered, as Firecracker does (see
/// crate::request_body); a body over `limit` is refused with its size.
async fn whole_body(State(limit): State<usize>, req: Request, next: Next) -> Response {
    match crate::request_body::read_whole(req, limit).await {
        Ok(req) => next.run(req).await,
        Err(Refused::TooLarge { declared: Some(size), limit }) => Fault::new(format!(
            "Request payload with size {size} is larger than the limit of {limit} allowed by server."
        ))
        .into_response(),
        Err(Refused::TooLarge { declared: None, limit }) => {
            Fault::new(format!("Request payload is larger than the limit of {limit} allowed by server."))
                .into_response()
        }
        Err(Refused::Unreadable(e)) => Fault::new(format!("The request's body could not be read: {e}")).into_response(),
    }
}

/// Counts each request in the metrics of its path, as a failure when it was refused.
async fn count(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut response = next.run(req).await;
    metrics.request(&method, &path, !response.status().is_success());
    // What axum refused before a handler ran (a path that is not UTF-8) answers as Firecracker
    // answers every refusal.
    let json = response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|t| t == "application/json");
    if response.status().is_client_error() && !json {
        let body = axum::body::to_bytes(std::mem::take(response.body_mut()), 64 << 10).await.unwrap_or_default();
        response = Fault::new(String::from_utf8_lossy(&body).trim()).into_response();
    }
    response
}

/// The API's routes over the process's machine, each request counted in `metrics`, bodies up to
/// `max_body` bytes.
pub fn router(machine: Arc<Mutex<Machine>>, metrics: Arc<Metrics>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/openapi.json", get(openapi))
        .route("/version", get(version))
        .route("/machine-config", get(get_machine_config).put(put_machine_config).patch(patch_machine_config))
        .route("/boot-source", axum::routing::put(put_boot_source))
        .route("/drives/{id}", axum::routing::put(put_drive).patch(patch_drive))
        .route("/network-interfaces/{id}", axum::routing::put(put_net).patch(patch_net))
        .route("/metrics", axum::routing::put(put_metrics))
        .route("/vsock", axum::routing::put(put_vsock))
        .route("/logger", axum::routing::put(put_logger))
        .route("/vm/config", get(get_vm_config))
        .route("/vm", axum::routing::patch(patch_vm))
        .route("/actions", axum::routing::put(put_actions))
        .route("/snapshot/create", axum::routing::put(put_snapshot_create))
        .route("/snapshot/load", axum::routing::put(put_snapshot_load))
        .fallback(any(fallback))
        .method_not_allowed_fallback(fallback)
        .with_state(machine)
        .layer(axum::middleware::from_fn_with_state(max_body, whole_body))
        .layer(axum::middleware::from_fn_with_state(metrics, count))
        .layer(axum::extract::DefaultBodyLimit::disable())
}
