//! The daemon's core against a stub backend, without KVM: clones are mailboxes that the host
//! answers itself (echo), templates are labelled directories, time is a clock the test moves.
//! Leases, their expiry, recycling, `max`, failed restores, versions, exit events and invoke run
//! here in milliseconds; the integration tests run the same paths on real guests.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::{Backend, CloneHandle, RestoreError, RestoreJob, Restored, TemplateJob};
use super::command::{self, Step};
use super::error::ErrorKind;
use super::images::ImageDirs;
use super::layers::Builder;
use super::model::{FunctionSpec, FunctionState};
use super::registry::RegistryError;
use super::supervisor::{Clock, Supervisor};
use crate::channel::mailbox::Mailbox;
use crate::isolation::network::Network;
use crate::sys::Locked;
use crate::template::Template;

/// Clones whose agent is the host itself: each answers every call with its payload.
#[derive(Default)]
pub(super) struct Stub {
    pub(super) restores: AtomicU64,
    pub(super) templates: AtomicU64,
    /// Refusals the next restores meet, in order.
    pub(super) failures: Mutex<VecDeque<RestoreError>>,
    /// Restores to come that panic (a bug in a backend).
    pub(super) panics: AtomicU64,
}

struct StubClone {
    mailbox: Arc<Mailbox>,
    agent: Option<std::thread::JoinHandle<()>>,
}

impl CloneHandle for StubClone {
    fn ended(&self) -> bool {
        self.mailbox.ended()
    }

    fn mailbox(&self) -> Arc<Mailbox> {
        self.mailbox.clone()
    }

    fn request_stop(&self, _why: &str) {
        self.mailbox.vm_ended();
    }
}

impl Drop for StubClone {
    fn drop(&mut self) {
        self.mailbox.vm_ended();
        if let Some(t) = self.agent.take() {
            let _ = t.join();
        }
    }
}

impl Backend for Stub {
    fn make_template(&self, job: TemplateJob<'_>) -> Result<Option<Arc<Template>>, RegistryError> {
        self.templates.fetch_add(1, Ordering::SeqCst);
        job.registry.record_template(job.name, job.spec, job.version, job.next)?;
        Ok(None)
    }

    fn restore(&self, job: RestoreJob<'_>) -> Result<Restored, RestoreError> {
        if let Some(e) = self.failures.locked().pop_front() {
            return Err(e);
        }
        if self.panics.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            panic!("the stub's restore panics, as asked");
        }
        self.restores.fetch_add(1, Ordering::SeqCst);
        let mailbox = Arc::new(Mailbox::create(None).map_err(|e| e.to_string())?);
        // Restored with its agent up, as a clone of a template taken once its agent served.
        mailbox.agent_polls();
        let agent = {
            let m = mailbox.clone();
            std::thread::spawn(move || m.echo_until_ended())
        };
        let (mailbox_path, vsock) = job.channels;
        let vm = Box::new(StubClone { mailbox, agent: Some(agent) });
        Ok(Restored { vm, mailbox: mailbox_path, vsock, at: Instant::now(), took: Duration::ZERO })
    }

    fn wait_all(&self, _timeout: Duration) {}
}

/// The host's clock moved forward by what the test says.
#[derive(Default)]
pub(super) struct TestClock {
    ahead: Mutex<Duration>,
}

impl TestClock {
    pub(super) fn advance(&self, by: Duration) {
        *self.ahead.locked() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> Instant {
        Instant::now() + *self.ahead.locked()
    }
}

/// A daemon's core over a fresh state directory, with the stub, the test clock and an image
/// directory holding a kernel and an initramfs (never booted).
pub(super) struct Core {
    pub(super) sup: Arc<Supervisor>,
    pub(super) stub: Arc<Stub>,
    pub(super) clock: Arc<TestClock>,
    images: PathBuf,
    _dir: tempfile::TempDir,
}

impl Core {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("vmlinux"), b"not booted").unwrap();
        std::fs::write(images.join("initramfs.cpio"), b"not booted").unwrap();
        let state = dir.path().join("state");
        let builder = Builder::spawn(&super::layers::Layers::store_dir(&state), None).unwrap();
        let (stub, clock) = (Arc::new(Stub::default()), Arc::new(TestClock::default()));
        let image_dirs = ImageDirs::open(std::slice::from_ref(&images)).unwrap();
        let network = Network::unavailable("not in these tests".into());
        let sup = Supervisor::open(&state, image_dirs, builder, stub.clone(), network, clock.clone()).unwrap();
        Self { sup, stub, clock, images, _dir: dir }
    }

    /// A registration of the stub's kind with `pool` (JSON).
    pub(super) fn spec(&self, pool: serde_json::Value) -> FunctionSpec {
        serde_json::from_value(serde_json::json!({
            "kernel": self.images.join("vmlinux"), "initramfs": self.images.join("initramfs.cpio"), "pool": pool
        }))
        .unwrap()
    }

    /// Registers `name` and waits until it is ready (its "template" made).
    pub(super) fn register(&self, name: &str, spec: FunctionSpec) {
        command::call(&self.sup, command::Register { name: name.into(), spec }).unwrap().wait().unwrap();
        wait_for(|| self.sup.get(name).unwrap().update.is_none_or(|u| u.state != FunctionState::Creating));
        wait_for(|| self.sup.get(name).unwrap().state == FunctionState::Ready);
    }

    pub(super) fn acquire(&self, name: &str) -> Result<super::model::Handoff, super::error::Error> {
        command::call(&self.sup, command::Acquire { name: name.into() }).and_then(Step::wait)
    }

    pub(super) fn release(&self, id: u64, lease: &str) -> Result<bool, super::error::Error> {
        let r = command::Release { id, lease: lease.into(), destroy: false };
        command::call(&self.sup, r).and_then(Step::wait).map(|r| r.recycled)
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.sup.shutdown();
    }
}

/// Waits (up to 10 s, far beyond what any of these takes) for `cond`.
pub(super) fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "the condition never held");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn busy(sup: &Supervisor, name: &str) -> u32 {
    sup.get(name).unwrap().busy
}

#[test]
fn a_handoff_is_recycled_as_the_policy_says_and_then_destroyed() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 4, "max_uses": 2})));
    let h = c.acquire("f").unwrap();
    assert!(h.cold_start, "the pool was empty");
    assert_eq!(busy(&c.sup, "f"), 1);
    assert!(c.release(h.id, &h.lease).unwrap(), "one use of two: back to the pool");
    assert_eq!(busy(&c.sup, "f"), 0);
    let again = c.acquire("f").unwrap();
    assert_eq!((again.id, again.cold_start), (h.id, false), "the recycled clone, warm");
    assert!(!c.release(again.id, &again.lease).unwrap(), "its second use was its last");
    let info = c.sup.get("f").unwrap();
    assert_eq!((info.handoffs, info.cold_starts, info.recycled_clones, info.busy), (2, 1, 1, 0));
    assert_eq!(c.stub.restores.load(Ordering::SeqCst), 1);
}

#[test]
fn a_release_needs_its_own_lease_and_comes_once() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 4})));
    let (a, b) = (c.acquire("f").unwrap(), c.acquire("f").unwrap());
    assert_eq!(c.release(a.id, &b.lease).unwrap_err().kind(), ErrorKind::Forbidden);
    assert_eq!(c.release(999, &a.lease).unwrap_err().kind(), ErrorKind::NotFound);
    c.release(a.id, &a.lease).unwrap();
    assert_eq!(c.release(a.id, &a.lease).unwrap_err().kind(), ErrorKind::NotFound, "released already");
    c.release(b.id, &b.lease).unwrap();
    assert_eq!(busy(&c.sup, "f"), 0);
}

#[test]
fn a_lease_ends_at_its_deadline_with_or_without_the_scaler() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 4, "lease_s": 30})));
    let (a, b) = (c.acquire("f").unwrap(), c.acquire("f").unwrap());
    c.clock.advance(Duration::from_secs(29));
    c.sup.expire_leases();
    assert_eq!(c.sup.handed_ids().len(), 2, "not yet");
    c.clock.advance(Duration::from_secs(2));
    // A release after the deadline is refused even before the sweep has come round.
    let e = c.release(a.id, &a.lease).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("expired"), "{e}");
    c.sup.expire_leases();
    assert!(c.sup.handed_ids().is_empty());
    assert_eq!(c.release(b.id, &b.lease).unwrap_err().kind(), ErrorKind::NotFound);
    let info = c.sup.get("f").unwrap();
    assert_eq!((info.expired_leases, info.busy), (2, 0), "every busy place given back");
}

#[test]
fn max_bounds_the_clones_out_and_a_release_frees_a_place() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 2})));
    let (a, _b) = (c.acquire("f").unwrap(), c.acquire("f").unwrap());
    let e = c.acquire("f").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    c.release(a.id, &a.lease).unwrap();
    c.acquire("f").unwrap();
    assert_eq!(busy(&c.sup, "f"), 2);
}

#[test]
fn a_failed_restore_gives_its_place_back_and_says_when_to_come_back() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 1})));
    c.stub.failures.locked().push_back(RestoreError::Restarting(Duration::from_millis(1500)));
    c.stub.failures.locked().push_back(RestoreError::Failed("no memory".into()));
    let e = c.acquire("f").unwrap_err();
    assert_eq!((e.kind(), e.retry_after_s()), (ErrorKind::Restarting, Some(2)));
    let e = c.acquire("f").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal);
    assert_eq!(busy(&c.sup, "f"), 0, "no place is lost to a failed cold start");
    c.acquire("f").expect("the one place under max is free again");
}

#[test]
fn a_new_version_serves_new_handoffs_and_the_old_clones_go_as_they_come_back() {
    let c = Core::new();
    let spec = c.spec(serde_json::json!({"min_ready": 0, "max": 4, "max_uses": 10}));
    c.register("f", spec.clone());
    let v1 = c.sup.get("f").unwrap().version.unwrap();
    let old = c.acquire("f").unwrap();
    // The pool policy alone: the same version, no new template.
    let templates = c.stub.templates.load(Ordering::SeqCst);
    let same = FunctionSpec { pool: serde_json::from_value(serde_json::json!({"max": 5})).unwrap(), ..spec.clone() };
    c.register("f", same);
    wait_for(|| c.sup.get("f").unwrap().max_clones == 5);
    assert_eq!(c.sup.get("f").unwrap().version.as_deref(), Some(v1.as_str()));
    assert_eq!(c.stub.templates.load(Ordering::SeqCst), templates, "the template is kept");
    // Something the guest sees: a new version.
    c.register("f", FunctionSpec { handler: "other".into(), ..spec });
    wait_for(|| c.sup.get("f").unwrap().version.as_deref() != Some(v1.as_str()));
    assert!(!c.release(old.id, &old.lease).unwrap(), "a clone of the old version is not recycled");
    let new = c.acquire("f").unwrap();
    assert!(c.release(new.id, &new.lease).unwrap(), "one of the new version is");
}

#[test]
fn the_end_of_a_handed_out_vm_is_an_event() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 2})));
    let h = c.acquire("f").unwrap();
    assert!(!c.sup.wait_ended(h.id, Duration::from_millis(10)).unwrap());
    let m = c.sup.handed.locked().get(&h.id).map(|x| x.clone.vm.mailbox()).unwrap();
    let waiter = {
        let sup = c.sup.clone();
        std::thread::spawn(move || sup.wait_ended(h.id, Duration::from_secs(60)))
    };
    m.vm_ended();
    assert!(waiter.join().unwrap().unwrap());
    assert!(!c.release(h.id, &h.lease).unwrap(), "an ended clone is never recycled");
    assert_eq!(c.sup.wait_ended(h.id, Duration::ZERO).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn an_invocation_runs_on_a_clone_and_gives_it_back() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 0, "max": 2})));
    let inv = |payload: &str| {
        let i = command::Invoke::new("f".into(), None, payload.as_bytes().to_vec(), Some(5.0), "r".into()).unwrap();
        command::call(&c.sup, i).and_then(Step::wait)
    };
    let r = inv("hello").unwrap();
    assert_eq!((r.status, r.payload.as_slice()), (ember_abi::Status::Ok, &b"hello"[..]));
    let again = inv("again").unwrap();
    assert_eq!(again.clone_id, r.clone_id, "recycled after an invocation (max_uses unset)");
    let info = c.sup.get("f").unwrap();
    assert_eq!((info.invocations, info.invocation_errors, info.busy), (2, 0, 0));
    assert_eq!(inv("x").map(|_| ()), Ok(()));
    let e = command::Invoke::new("f".into(), Some("bad name".into()), Vec::new(), None, "r".into()).map(|_| ());
    assert_eq!(e.unwrap_err().kind(), ErrorKind::BadRequest);
}

#[test]
fn the_scaler_keeps_min_ready_clones_and_an_ended_one_is_replaced() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 2, "max": 4})));
    wait_for(|| {
        c.sup.tick();
        c.sup.get("f").unwrap().ready >= 2
    });
    let h = c.acquire("f").unwrap();
    assert!(!h.cold_start);
    // A ready clone whose VM ends is dropped by the sweep and replaced.
    let ready: Vec<Arc<Mailbox>> = {
        let f = c.sup.function("f").unwrap();
        let pool = f.pool.locked();
        pool.ready.iter().map(|p| p.vm.mailbox()).collect()
    };
    ready.iter().for_each(|m| m.vm_ended());
    wait_for(|| {
        c.sup.tick();
        let i = c.sup.get("f").unwrap();
        i.replaced_clones >= ready.len() as u64 && i.ready >= 2
    });
}

#[test]
fn no_function_no_handoff() {
    let c = Core::new();
    assert_eq!(c.acquire("nope").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(matches!(c.sup.get("nope"), Err(e) if e.kind() == ErrorKind::NotFound));
    let bad = command::Register { name: "Bad Name".into(), spec: c.spec(serde_json::json!({})) };
    assert_eq!(command::call(&c.sup, bad).and_then(Step::wait).unwrap_err().kind(), ErrorKind::BadRequest);
    let outside = FunctionSpec { kernel: Path::new("/etc/passwd").into(), ..c.spec(serde_json::json!({})) };
    let r = command::call(&c.sup, command::Register { name: "f".into(), spec: outside }).and_then(Step::wait);
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Forbidden, "outside the image directories");
}

#[test]
fn a_restore_that_panics_loses_no_place_under_max() {
    let c = Core::new();
    c.register("f", c.spec(serde_json::json!({"min_ready": 1, "max": 1})));
    c.stub.panics.store(1, Ordering::SeqCst);
    let ticked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.sup.tick()));
    assert!(ticked.is_err(), "the restore panicked");
    assert_eq!(c.sup.get("f").unwrap().restoring, 0, "its reserved place was given back");
    wait_for(|| {
        c.sup.tick();
        c.sup.get("f").unwrap().ready == 1
    });
}
