//! Invocations through the daemon: acquire a clone, call the function through its mailbox (with
//! ember's runtimes, in an envelope with the call's context, answered with its logs and error
//! report), release it; bounded in flight per function and in all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::error::Error;
use super::function::Function;
use super::supervisor::Supervisor;
use crate::channel::mailbox::{check_request, CallOptions, InvokeError, Mailbox, PendingCall};
use crate::sys::Locked;
use ember_abi::mailbox::{envelope_request, parse_envelope_response};

/// How long `invoke` polls for the agent's answer before sleeping until the agent rings.
pub const INVOKE_SPIN: Duration = Duration::from_micros(50);

/// How long past its timeout an invocation keeps its clone from the lease sweep.
const INVOKE_LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Invocations in flight at once, all functions together; more get 429. Each holds a thread of
/// the blocking pool for up to its timeout.
pub(super) const MAX_INVOKES: usize = 256;

/// Invocations in flight at once for one function: a function whose guests hang cannot take every
/// invocation slot.
pub(super) const MAX_INVOKES_PER_FUNCTION: usize = 64;

/// An invocation's place among the daemon's (at most `MAX_INVOKES`) and its function's (at
/// most `MAX_INVOKES_PER_FUNCTION`) in flight, given back when dropped (on every way out of a
/// call).
pub struct InvokeSlots {
    all: Arc<AtomicUsize>,
    f: Arc<Function>,
}

impl InvokeSlots {
    fn take(all: &Arc<AtomicUsize>, f: &Arc<Function>) -> Result<Self, Error> {
        if all.fetch_add(1, Ordering::SeqCst) >= MAX_INVOKES {
            all.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::busy(format!("{MAX_INVOKES} invocations in flight; try again")));
        }
        if f.counters.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_INVOKES_PER_FUNCTION {
            f.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
            all.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::busy(format!(
                "function {:?} has {MAX_INVOKES_PER_FUNCTION} invocations in flight; try again",
                f.name
            )));
        }
        Ok(Self { all: all.clone(), f: f.clone() })
    }
}

impl Drop for InvokeSlots {
    fn drop(&mut self) {
        self.f.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.all.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What [`Supervisor::invoke_begin`] is asked to invoke.
#[derive(Clone, Copy)]
pub struct InvokeCall<'a> {
    pub name: &'a str,
    /// The handler (the function's own when `None`).
    pub handler: Option<&'a str>,
    pub payload: &'a [u8],
    pub timeout: Duration,
    pub request_id: &'a str,
}

/// Which clone an invocation may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// A ready one, or none (no cold start, no wait).
    Warm,
    /// As [`Supervisor::acquire_cold`], after `Warm` found none.
    Cold,
}

/// Where an invocation's request stands.
enum CallState {
    Posted(PendingCall<Arc<Mailbox>>),
    /// Not posted yet: the clone's mailbox was held by another caller when it was tried.
    Waiting {
        mailbox: Arc<Mailbox>,
        handler: String,
        request: Vec<u8>,
        opts: CallOptions,
    },
    /// Refused before it reached the guest.
    Failed(InvokeError),
}

/// An invocation with its clone taken (and, usually, its request posted), its answer not read:
/// [`InvokeInFlight::answered`] looks for the answer without blocking for long, and
/// [`Supervisor::invoke_finish`] completes it (on any thread).
pub struct InvokeInFlight {
    f: Arc<Function>,
    _slots: InvokeSlots,
    id: u64,
    lease: String,
    version: Option<String>,
    /// Whether it runs the function's own handler (only then is the clone recycled).
    own: bool,
    managed: bool,
    request_id: String,
    state: CallState,
}

impl InvokeInFlight {
    /// Whether the answer can be read without waiting, looking for it for at most `spin`.
    pub fn answered(&self, spin: Duration) -> bool {
        match &self.state {
            CallState::Posted(p) => p.poll(spin),
            CallState::Waiting { .. } => false,
            CallState::Failed(_) => true,
        }
    }
}

/// What an invocation through the daemon answered.
#[derive(Debug)]
pub struct Invoked {
    pub status: ember_abi::Status,
    /// The result (for an error of one of ember's runtimes: nothing; see `error`).
    pub payload: Vec<u8>,
    /// The clone that ran it.
    pub clone_id: u64,
    pub version: Option<String>,
    /// With one of ember's runtimes: the invocation's output (bounded by the agent).
    pub logs: Option<String>,
    pub logs_truncated: bool,
    /// With one of ember's runtimes, when the handler failed: `{type, message, traceback}`.
    pub error: Option<serde_json::Value>,
}

/// The meta of an envelope response, as the agent writes it.
#[derive(serde::Deserialize)]
struct Meta {
    #[serde(default)]
    logs: String,
    #[serde(default)]
    logs_truncated: bool,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// The most log lines of one invocation that go to the daemon's own log.
const MAX_LOGGED_LINES: usize = 64;

impl Invoked {
    fn from_response(
        r: crate::channel::mailbox::Response,
        envelope: bool,
        clone_id: u64,
        version: Option<String>,
    ) -> Result<Self, Error> {
        let mut inv = Invoked {
            status: r.status,
            payload: Vec::new(),
            clone_id,
            version,
            logs: None,
            logs_truncated: false,
            error: None,
        };
        // Statuses the agent gives before the envelope is read (a malformed request) carry text.
        if !envelope || matches!(r.status, ember_abi::Status::BadRequest | ember_abi::Status::TooLarge) {
            inv.payload = r.payload;
            return Ok(inv);
        }
        let bad = |why: String| Error::guest_failed(format!("the guest answered out of protocol: {why}"));
        let (meta, result) = parse_envelope_response(&r.payload).map_err(|e| bad(e.to_string()))?;
        let meta: Meta = serde_json::from_slice(meta).map_err(|e| bad(format!("meta: {e}")))?;
        inv.payload = result.to_vec();
        inv.logs = Some(meta.logs);
        inv.logs_truncated = meta.logs_truncated;
        if r.status == ember_abi::Status::Error {
            let error =
                meta.error.filter(|e| e.is_object()).ok_or_else(|| bad("an error without its report".into()))?;
            inv.error = Some(error);
        }
        Ok(inv)
    }

    /// Writes the invocation's output to the daemon's log, each line with the function, version,
    /// clone and request id (at most [`MAX_LOGGED_LINES`] lines, and rate-limited).
    fn log_lines(&self, function: &str, request_id: &str) {
        let Some(logs) = &self.logs else { return };
        let version = self.version.as_deref().unwrap_or("");
        for line in logs.lines().take(MAX_LOGGED_LINES) {
            crate::log_limited!(info, function, version, clone = self.clone_id, request_id, "{line}");
        }
    }
}

/// What a failed invocation is to the API's caller.
pub(super) fn invoke_refusal(e: InvokeError) -> Error {
    match e {
        InvokeError::Timeout(_) => Error::guest_timeout(e.to_string()),
        InvokeError::BadFunction(_) | InvokeError::PayloadTooLarge(_) => Error::bad_request(e.to_string()),
        _ => Error::guest_failed(e.to_string()),
    }
}

impl Supervisor {
    /// acquire (a clone as `take` says) + invoke through the mailbox + release. With one of
    /// ember's runtimes the invocation carries its context (`request_id` among it) and comes back
    /// with its log and, for a handler's error, the runtime's report. Blocks (a cold start, a slow
    /// function).
    pub fn invoke(&self, call: &InvokeCall<'_>, take: Take) -> Result<Invoked, Error> {
        let inflight = self.invoke_begin(call, take)?.ok_or_else(|| Error::busy("no ready clone"))?;
        self.invoke_finish(inflight)
    }

    /// The first half of [`Supervisor::invoke`], for a caller that must not block: with `Warm`,
    /// `None` when the pool has no ready clone (nothing taken; the arrival is counted, so the
    /// caller goes on with `Cold`). Otherwise the request is posted to the clone if its mailbox is
    /// free now (it is left to [`Supervisor::invoke_finish`] if not). Microseconds, no waiting.
    pub fn invoke_begin(&self, call: &InvokeCall<'_>, take: Take) -> Result<Option<InvokeInFlight>, Error> {
        let InvokeCall { name, handler, payload, timeout, request_id } = *call;
        let f = self.function(name)?;
        // Bounded: a refusal now beats a caller waiting on a blocking pool that hung guests fill.
        let slots = InvokeSlots::take(&self.invokes, &f)?;
        // What can be checked without a clone is checked before one is taken.
        let handler = handler.unwrap_or(f.spec.default_function()).to_string();
        let managed = f.spec.known_runtime() == Some(handler.as_str());
        check_request(&handler, payload).map_err(invoke_refusal)?;
        let handoff = match take {
            Take::Warm => match self.acquire_warm(name)? {
                Some(h) => h,
                None => return Ok(None),
            },
            Take::Cold => self.acquire_cold(name)?,
        };
        // The version of the clone's function (a switch may have happened since `f` was looked up).
        let (mailbox, version) = {
            let mut handed = self.handed.locked();
            match handed.get_mut(&handoff.id) {
                Some(h) => {
                    // The invocation is bounded by its own timeout, not by the pool's lease (which
                    // is for clients that acquire a clone): a `timeout_s` longer than `lease_s`
                    // must not lose the clone mid-call.
                    h.expires = h.expires.max(self.clock.now() + timeout + INVOKE_LEASE_MARGIN);
                    (h.clone.vm.mailbox(), h.function.version.locked().clone())
                }
                None => return Err(Error::internal("the handed-out VM vanished")),
            }
        };
        let request = if managed {
            let context = serde_json::json!({
                "request_id": request_id,
                "function": name,
                "version": version,
                "clone_id": handoff.id,
                "memory_mib": f.spec.mem_mib,
                "timeout_ms": timeout.as_millis() as u64,
            });
            let ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
            envelope_request(ms, context.to_string().as_bytes(), payload)
        } else {
            payload.to_vec()
        };
        // Many invocations wait at once on few cores: poll briefly, then sleep until the agent
        // rings, so that waiting callers do not take the CPU the guests need to answer.
        let opts = CallOptions { timeout, doorbell: true, spin: INVOKE_SPIN, envelope: managed, ..Default::default() };
        let own = handler == f.spec.default_function();
        let state = match check_request(&handler, &request) {
            Err(e) => CallState::Failed(e),
            Ok(_) => match Mailbox::try_begin(mailbox.clone(), &handler, &request, opts) {
                Ok(Some(p)) => CallState::Posted(p),
                Ok(None) => CallState::Waiting { mailbox, handler, request, opts },
                Err(e) => CallState::Failed(e),
            },
        };
        let (id, lease, request_id) = (handoff.id, handoff.lease, request_id.to_string());
        Ok(Some(InvokeInFlight { f, _slots: slots, id, lease, version, own, managed, request_id, state }))
    }

    /// The second half of [`Supervisor::invoke`]: waits for the answer (blocks, at most the
    /// call's timeout), releases the clone and counts the invocation.
    pub fn invoke_finish(&self, inflight: InvokeInFlight) -> Result<Invoked, Error> {
        let InvokeInFlight { f, _slots, id, lease, version, own, managed, request_id, state } = inflight;
        let response = match state {
            CallState::Posted(p) => p.finish(),
            CallState::Waiting { mailbox, handler, request, opts } => {
                Mailbox::begin(mailbox, &handler, &request, opts).and_then(|p| p.finish())
            }
            CallState::Failed(e) => Err(e),
        };
        let r = response.map_err(invoke_refusal);
        let r = r.and_then(|resp| Invoked::from_response(resp, managed, id, version));
        // A clone that did not answer (or answered out of protocol) is not handed to anyone again;
        // nor is one whose runtime (one of ember's) broke: it answers `failed` only then.
        let broken = managed && r.as_ref().is_ok_and(|i| i.status == ember_abi::Status::Failed);
        // Recycled (by the policy) only when it ran the function's own handler.
        let _ = self.release_after(id, &lease, r.is_err() || broken, own);
        f.counters.invocations.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(inv) => {
                if inv.status != ember_abi::Status::Ok {
                    f.counters.invocation_errors.fetch_add(1, Ordering::Relaxed);
                }
                inv.log_lines(&f.name, &request_id);
            }
            Err(_) => {
                f.counters.invocation_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}
