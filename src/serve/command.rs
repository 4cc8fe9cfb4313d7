//! The daemon's command core: every request a door (the HTTP API, the lean protocol, and the
//! doors to come) can make, as a typed [`Command`] with a typed reply, and the decisions that go
//! with it: which part of a command may block, an invocation's default and longest timeout, the
//! shape of what comes back. A door parses its protocol into a command, [`call`]s it, runs what
//! [`Step::Blocking`] leaves where blocking is allowed (the HTTP API: its runtime's blocking
//! pool; a lean connection: its own thread), and maps the reply and the [`Error`]'s kind to its
//! own codes. No door decides anything else.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::error::Error;
use super::invoke::{InvokeCall, Invoked, Take};
use super::layers::LayerInfo;
use super::model::{FunctionInfo, FunctionSpec, Handoff};
use super::supervisor::Supervisor;

/// The longest invocation timeout a request may ask for.
pub const MAX_INVOKE_TIMEOUT_S: f64 = 600.0;
/// An invocation's timeout when the request gives none.
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an invocation's answer is looked for on the caller's thread before the rest of the
/// wait is left to [`Step::Blocking`]: a no-op through a polling agent answers in a few
/// microseconds; this bounds what a slower call holds a door's (async) thread for.
pub const INLINE_SPIN: Duration = Duration::from_micros(20);

/// What a command gives back: its reply now, or work that blocks (a cold start, a guest's
/// answer, a template boot, disk) for the door to run where blocking is allowed.
pub enum Step<T> {
    Done(T),
    Blocking(Box<dyn FnOnce() -> Result<T, Error> + Send>),
}

impl<T> Step<T> {
    fn later(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Self {
        Step::Blocking(Box::new(f))
    }

    /// The reply, running what blocks on this thread.
    pub fn wait(self) -> Result<T, Error> {
        match self {
            Step::Done(r) => Ok(r),
            Step::Blocking(f) => f(),
        }
    }
}

/// A request to the daemon, with its reply's type.
pub trait Command {
    type Reply: Send + 'static;

    /// Does what can be done without blocking and returns the rest as a [`Step`].
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Self::Reply>, Error>;
}

/// Calls `cmd` on the daemon's core.
pub fn call<C: Command>(sup: &Arc<Supervisor>, cmd: C) -> Result<Step<C::Reply>, Error> {
    cmd.run(sup)
}

/// Registers a function (a new version of it when registered already); the template is made
/// in the background (`PUT /functions/{name}`).
pub struct Register {
    pub name: String,
    pub spec: FunctionSpec,
}

impl Command for Register {
    type Reply = FunctionInfo;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<FunctionInfo>, Error> {
        // Opens images and may build the code layer.
        let sup = sup.clone();
        Ok(Step::later(move || sup.register(&self.name, self.spec)))
    }
}

/// Every registered function (`GET /functions`).
pub struct ListFunctions;

impl Command for ListFunctions {
    type Reply = Vec<FunctionInfo>;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Self::Reply>, Error> {
        Ok(Step::Done(sup.list()))
    }
}

/// One function (`GET /functions/{name}`).
pub struct GetFunction {
    pub name: String,
}

impl Command for GetFunction {
    type Reply = FunctionInfo;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<FunctionInfo>, Error> {
        sup.get(&self.name).map(Step::Done)
    }
}

/// Unregisters a function (`DELETE /functions/{name}`).
pub struct DeleteFunction {
    pub name: String,
}

impl Command for DeleteFunction {
    type Reply = ();
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<()>, Error> {
        let sup = sup.clone();
        Ok(Step::later(move || sup.delete(&self.name)))
    }
}

/// Hands a clone over (`POST /functions/{name}/acquire`, the lean `acquire`): a ready one at
/// once (microseconds, no system call), else a cold start, which blocks. The name is borrowed
/// where the door has it (the warm path allocates nothing for it).
pub struct Acquire<'a> {
    pub name: Cow<'a, str>,
}

impl Command for Acquire<'_> {
    type Reply = Handoff;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Handoff>, Error> {
        match sup.acquire_warm(&self.name)? {
            Some(h) => Ok(Step::Done(h)),
            None => {
                let (sup, name) = (sup.clone(), self.name.into_owned());
                Ok(Step::later(move || sup.acquire_cold(&name)))
            }
        }
    }
}

/// Takes a handed-out clone back (`POST /vms/{id}/release`, the lean `release`).
pub struct Release {
    pub id: u64,
    pub lease: String,
    /// Destroy the clone even when the function's policy would reuse it.
    pub destroy: bool,
}

/// What a release answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Released {
    pub id: u64,
    /// Whether the clone went back to the pool.
    pub recycled: bool,
}

impl Command for Release {
    type Reply = Released;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Released>, Error> {
        let recycled = sup.release(self.id, &self.lease, self.destroy)?;
        Ok(Step::Done(Released { id: self.id, recycled }))
    }
}

/// Invokes a function: acquire, a call through the clone's mailbox, release
/// (`POST /functions/{name}/invoke`).
pub struct Invoke {
    pub name: String,
    /// The function inside the guest; the registration's when `None`.
    pub function: Option<String>,
    pub payload: Vec<u8>,
    pub timeout: Duration,
    pub request_id: String,
}

impl Invoke {
    /// An invocation of `name`, its timeout checked ([`DEFAULT_INVOKE_TIMEOUT`] when `None`).
    pub fn new(
        name: String,
        function: Option<String>,
        payload: Vec<u8>,
        timeout_s: Option<f64>,
        request_id: String,
    ) -> Result<Self, Error> {
        let timeout = timeout_s.map_or(Ok(DEFAULT_INVOKE_TIMEOUT), check_timeout)?;
        if let Some(f) = &function {
            check_function(f)?;
        }
        Ok(Self { name, function, payload, timeout, request_id })
    }
}

/// An invocation's timeout: more than 0 and at most [`MAX_INVOKE_TIMEOUT_S`] seconds.
pub fn check_timeout(t: f64) -> Result<Duration, Error> {
    if t > 0.0 && t <= MAX_INVOKE_TIMEOUT_S {
        Ok(Duration::from_secs_f64(t))
    } else {
        Err(Error::bad_request(format!("timeout_s {t} is not in (0, {MAX_INVOKE_TIMEOUT_S}]")))
    }
}

/// A function name inside the guest, as the agent takes it.
pub fn check_function(f: &str) -> Result<(), Error> {
    ember_abi::check_function(f.as_bytes()).map(|_| ()).map_err(|e| Error::bad_request(format!("function {f:?}: {e}")))
}

impl Invoke {
    fn call(&self) -> InvokeCall<'_> {
        InvokeCall {
            name: &self.name,
            handler: self.function.as_deref(),
            payload: &self.payload,
            timeout: self.timeout,
            request_id: &self.request_id,
        }
    }
}

impl Command for Invoke {
    type Reply = Invoked;
    /// A ready clone and a quick answer are served on the caller's thread (a hop to another
    /// thread costs more than the whole call); a cold start, a busy mailbox or an answer not
    /// there within [`INLINE_SPIN`] is left to block.
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Invoked>, Error> {
        match sup.invoke_begin(&self.call(), Take::Warm)? {
            Some(inflight) if inflight.answered(INLINE_SPIN) => sup.invoke_finish(inflight).map(Step::Done),
            Some(inflight) => {
                let sup = sup.clone();
                Ok(Step::later(move || sup.invoke_finish(inflight)))
            }
            None => {
                let sup = sup.clone();
                Ok(Step::later(move || sup.invoke(&self.call(), Take::Cold)))
            }
        }
    }
}

impl Invoked {
    /// The JSON reply to an invocation: status, the payload (as text, or base64 when it is not
    /// UTF-8), the clone and version that ran it, and, with ember's runtimes, its logs and error.
    pub fn to_json(self, request_id: &str) -> serde_json::Value {
        use base64::Engine;
        let ok = self.status == ember_abi::Status::Ok;
        let mut body = serde_json::json!({
            "status": self.status.describe(), "ok": ok, "request_id": request_id, "clone_id": self.clone_id
        });
        if let Some(v) = self.version {
            body["version"] = v.into();
        }
        match String::from_utf8(self.payload) {
            Ok(text) => body["payload"] = text.into(),
            Err(e) => body["payload_base64"] = base64::engine::general_purpose::STANDARD.encode(e.as_bytes()).into(),
        }
        if let Some(logs) = self.logs {
            body["logs"] = logs.lines().collect::<Vec<_>>().into();
            body["logs_truncated"] = self.logs_truncated.into();
        }
        if let Some(e) = self.error {
            body["error"] = e;
        }
        body
    }
}

/// Where a layer's tree comes from.
pub enum LayerSource {
    /// A directory, tar archive or OCI image beneath one of the daemon's image directories.
    Path(PathBuf),
    /// An uploaded archive (a tar, possibly gzip-compressed, or an OCI / `docker save` tarball).
    Archive(Vec<u8>),
}

/// Builds a layer and names it (`PUT /layers/{name}`).
pub struct PutLayer {
    pub name: String,
    pub source: LayerSource,
}

/// A layer, and whether this call made it (false: the name had this content already).
pub struct LayerPut {
    pub info: LayerInfo,
    pub created: bool,
}

impl Command for PutLayer {
    type Reply = LayerPut;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<LayerPut>, Error> {
        let sup = sup.clone();
        Ok(Step::later(move || {
            let (info, created) = match &self.source {
                LayerSource::Path(p) => sup.put_layer(&self.name, p)?,
                LayerSource::Archive(a) => sup.put_layer_upload(&self.name, a)?,
            };
            Ok(LayerPut { info, created })
        }))
    }
}

/// Every layer (`GET /layers`).
pub struct ListLayers;

impl Command for ListLayers {
    type Reply = Vec<LayerInfo>;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<Self::Reply>, Error> {
        // Reads each layer's record from disk.
        let sup = sup.clone();
        Ok(Step::later(move || Ok(sup.list_layers())))
    }
}

/// One layer (`GET /layers/{name}`).
pub struct GetLayer {
    pub name: String,
}

impl Command for GetLayer {
    type Reply = LayerInfo;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<LayerInfo>, Error> {
        let sup = sup.clone();
        Ok(Step::later(move || sup.get_layer(&self.name)))
    }
}

/// Deletes a layer no function uses (`DELETE /layers/{name}`).
pub struct DeleteLayer {
    pub name: String,
}

impl Command for DeleteLayer {
    type Reply = ();
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<()>, Error> {
        let sup = sup.clone();
        Ok(Step::later(move || sup.delete_layer(&self.name)))
    }
}

/// The daemon's metrics, as Prometheus text (`GET /metrics`).
pub struct Metrics;

impl Command for Metrics {
    type Reply = String;
    fn run(self, sup: &Arc<Supervisor>) -> Result<Step<String>, Error> {
        Ok(Step::Done(sup.prometheus()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::error::ErrorKind;

    #[test]
    fn an_invocation_gets_the_default_timeout_and_bad_ones_are_refused() {
        let inv = |t: Option<f64>, f: Option<&str>| {
            Invoke::new("f".into(), f.map(str::to_string), Vec::new(), t, "r".into()).map(|i| i.timeout)
        };
        assert_eq!(inv(None, None), Ok(DEFAULT_INVOKE_TIMEOUT));
        assert_eq!(inv(Some(0.25), Some("echo")), Ok(Duration::from_millis(250)));
        assert_eq!(inv(Some(MAX_INVOKE_TIMEOUT_S), None), Ok(Duration::from_secs(600)));
        for bad in [0.0, -1.0, 601.0, f64::NAN, f64::INFINITY] {
            assert_eq!(inv(Some(bad), None).unwrap_err().kind(), ErrorKind::BadRequest, "{bad}");
        }
        assert_eq!(inv(None, Some("no such/fn")).unwrap_err().kind(), ErrorKind::BadRequest);
    }

    #[test]
    fn an_invocation_reply_carries_text_or_base64_and_the_runtime_report() {
        let inv = |payload: Vec<u8>, logs: Option<&str>| Invoked {
            status: ember_abi::Status::Ok,
            payload,
            clone_id: 7,
            version: Some("v1".into()),
            logs: logs.map(str::to_string),
            logs_truncated: false,
            error: None,
        };
        let j = inv(b"hi".to_vec(), Some("a\nb")).to_json("r1");
        assert_eq!(j["payload"], "hi");
        assert_eq!(
            (j["ok"].as_bool(), j["clone_id"].as_u64(), j["request_id"].as_str()),
            (Some(true), Some(7), Some("r1"))
        );
        assert_eq!(j["logs"], serde_json::json!(["a", "b"]));
        let j = inv(vec![0xff, 0], None).to_json("r2");
        assert_eq!((j.get("payload"), j["payload_base64"].as_str()), (None, Some("/wA=")));
        assert!(j.get("logs").is_none());
    }

    #[test]
    fn a_step_runs_what_blocks_when_waited_for() {
        assert_eq!(Step::Done(3).wait(), Ok(3));
        assert_eq!(Step::later(|| Ok(4)).wait(), Ok(4));
        assert_eq!(Step::<u8>::later(|| Err(Error::busy("later"))).wait().unwrap_err().kind(), ErrorKind::Busy);
    }
}
