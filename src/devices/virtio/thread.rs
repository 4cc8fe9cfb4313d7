//! The thread a virtio device serves its queues on, and how its front end (what the transport
//! calls, on vCPU threads) drives it: activate with the driver's queues, deactivate on reset, pause
//! before a snapshot (the thread answers once it has stopped touching guest memory), resume, stop.
//! Every device with a thread of its own (vsock, block, net) uses this one protocol, its front end
//! through [`QueueFront`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::QueueSnapshot;
use crate::devices::DeviceError;
use crate::sys::Locked;

/// How long pausing waits for a device thread to stop touching the queues.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a device thread does when its front end asks.
pub trait DeviceWorker {
    /// What activation hands the thread (guest memory, the queues, the interrupt, ...).
    type Activation: Send;
    /// What the thread knows of the device's own state when it pauses (`()` for a device whose
    /// thread keeps none).
    type Saved: Send;
    fn activate(&mut self, a: Self::Activation);
    /// The driver reset the device: drop the queues and whatever depended on them.
    fn deactivate(&mut self);
    /// The device's own state for a snapshot, taken as the thread pauses.
    fn saved(&self) -> Self::Saved;
}

enum Command<A, S> {
    Activate(A),
    Deactivate,
    /// Stop touching the queues and guest memory until `Resume`; the thread answers once it has,
    /// with the device's own state ([`DeviceWorker::saved`]).
    Pause(Sender<S>),
    Resume,
    Stop,
}

/// The front end's side: sends commands and wakes the thread. `S`: what the thread answers a
/// pause with ([`DeviceWorker::Saved`]).
pub struct DeviceThread<A, S = ()> {
    name: &'static str,
    tx: Sender<Command<A, S>>,
    evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The thread's side: the command eventfd (for its epoll set) and the commands behind it.
pub struct Commands<A, S = ()> {
    rx: Receiver<Command<A, S>>,
    evt: EventFd,
}

/// What a device thread runs.
pub type Body = Box<dyn FnOnce() + Send>;

/// A device thread started ahead (by a VM shell), confined, waiting for its device's body.
pub type ParkedDevice = (&'static str, crate::sys::Parked<Body>);

/// Where one VM's device threads come from: the threads its shell started ahead (each named for
/// the device it was made for), else new threads, confined with `seccomp`.
pub struct Threads {
    seccomp: Option<Arc<seccompiler::BpfProgram>>,
    ahead: Mutex<Vec<ParkedDevice>>,
}

impl Threads {
    /// New threads, each confined with `seccomp` (none: not confined).
    pub fn new(seccomp: Option<Arc<seccompiler::BpfProgram>>) -> Self {
        Self { seccomp, ahead: Mutex::new(Vec::new()) }
    }

    /// Takes `ahead` (threads confined with this source's filter) first.
    pub fn with_ahead(self, ahead: Vec<ParkedDevice>) -> Self {
        Self { ahead: Mutex::new(ahead), ..self }
    }

    /// Starts threads for devices `names` ahead, confined with `seccomp`.
    pub fn park(names: &[&'static str], seccomp: &Arc<seccompiler::BpfProgram>) -> std::io::Result<Vec<ParkedDevice>> {
        let park = |name: &'static str| {
            let f = seccomp.clone();
            let confine = move || match crate::seccomp::apply(&f) {
                Ok(()) => true,
                Err(e) => {
                    crate::log_limited!(warn, "{name}: a device thread made ahead cannot confine itself: {e}");
                    false
                }
            };
            let refused = respawn(name, Some(seccomp.clone()));
            crate::sys::Parked::spawn(name.into(), confine, |body: Body| body(), refused).map(|p| (name, p))
        };
        names.iter().map(|n| park(n)).collect()
    }

    /// Runs `body` on thread `name`: one started ahead for it if there is one, else a new one.
    fn spawn(&self, name: &'static str, body: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
        let mut body: Body = Box::new(body);
        let parked = {
            let mut ahead = self.ahead.locked();
            ahead.iter().position(|(n, _)| *n == name).map(|i| ahead.swap_remove(i).1)
        };
        if let Some(p) = parked {
            match p.start(body) {
                Ok(t) => return Ok(t),
                // Gone (it could not confine itself): a new thread, confined as usual.
                Err(back) => body = back,
            }
        }
        spawn_confined(name, self.seccomp.clone(), body)
    }
}

/// What a thread made ahead does with the body it was handed while it was still confining itself,
/// when that failed: runs it on a new thread, confined as usual, and waits for that thread (its
/// owner joins this one).
fn respawn(name: &'static str, seccomp: Option<Arc<seccompiler::BpfProgram>>) -> impl FnOnce(Body) + Send {
    move |body: Body| match spawn_confined(name, seccomp, body) {
        Ok(t) => {
            let _ = t.join();
        }
        Err(e) => tracing::error!("{name}: cannot start the device thread: {e}"),
    }
}

/// Runs `body` on a new thread `name`, confined with `seccomp` first (none: not confined). A thread
/// that cannot confine itself does not run it: the device's queues then go unserved, and the
/// guest's requests to it time out.
fn spawn_confined(
    name: &'static str,
    seccomp: Option<Arc<seccompiler::BpfProgram>>,
    body: Body,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Some(f) = seccomp {
            if let Err(e) = crate::seccomp::apply(&f) {
                tracing::error!("{name}: cannot apply the seccomp filter: {e}");
                return;
            }
        }
        body();
    })
}

impl<A: Send + 'static, S: Send + 'static> DeviceThread<A, S> {
    /// Starts thread `name` (from `threads`) running `body` with the commands it must serve. The
    /// thread is started with the device (before any vCPU runs and is confined).
    pub fn spawn(
        name: &'static str,
        threads: &Threads,
        body: impl FnOnce(Commands<A, S>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let (tx, rx) = channel();
        let commands = Commands { rx, evt: evt.try_clone()? };
        let thread = threads.spawn(name, move || body(commands))?;
        Ok(Self { name, tx, evt, thread: Some(thread) })
    }

    fn send(&self, c: Command<A, S>) {
        if self.tx.send(c).is_ok() {
            let _ = self.evt.write(1);
        }
    }

    pub fn activate(&self, a: A) {
        self.send(Command::Activate(a));
    }

    pub fn deactivate(&self) {
        self.send(Command::Deactivate);
    }

    /// Returns once the thread has stopped touching the queues and guest memory, with the
    /// device's own state as the thread had it then; `None` after a second, with a warning (a
    /// thread that does not answer is stuck, not busy).
    pub fn pause(&self) -> Option<S> {
        let (tx, rx) = channel();
        self.send(Command::Pause(tx));
        let saved = rx.recv_timeout(PAUSE_TIMEOUT).ok();
        if saved.is_none() {
            crate::log_limited!(warn, "{}: the device thread did not pause in time", self.name);
        }
        saved
    }

    pub fn resume(&self) {
        self.send(Command::Resume);
    }
}

/// A device front end's share of the thread protocol: the queues it handed to its thread (kept
/// for snapshots), the device's own state as its thread last paused, and the thread. The
/// `VirtioDevice` methods of every threaded device are these.
pub struct QueueFront<A, S = ()> {
    queues: Option<Arc<Mutex<Vec<Queue>>>>,
    paused: Paused<S>,
    thread: DeviceThread<A, S>,
}

/// Where a device's thread stands in the pause protocol, as its front end last heard.
enum Paused<S> {
    /// Not paused (or resumed since).
    Running,
    /// Asked to pause, it did not answer in time.
    Stuck,
    /// Paused, with the device's own state as the thread had it.
    Saved(S),
}

/// Why a threaded device has no paused state to save.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum NotPaused {
    #[error("the device is running (it was not paused before the save)")]
    Running,
    #[error("the device thread did not pause in time")]
    Stuck,
}

impl<A: Send + 'static, S: Send + 'static> QueueFront<A, S> {
    pub fn new(thread: DeviceThread<A, S>) -> Self {
        Self { queues: None, paused: Paused::Running, thread }
    }

    /// Hands the driver's `queues` (exactly `count` of them, or the device is not activated) to
    /// the thread, in what `activation` makes of them.
    pub fn activate(
        &mut self,
        device: &str,
        count: usize,
        queues: Vec<Queue>,
        activation: impl FnOnce(Arc<Mutex<Vec<Queue>>>) -> A,
    ) -> Result<(), DeviceError> {
        if queues.len() != count {
            let noun = if count == 1 { "queue" } else { "queues" };
            return Err(DeviceError::BadState(format!("{device} needs {count} {noun}, got {}", queues.len())));
        }
        let queues = Arc::new(Mutex::new(queues));
        self.queues = Some(queues.clone());
        self.thread.activate(activation(queues));
        Ok(())
    }

    pub fn reset(&mut self) {
        self.queues = None;
        self.thread.deactivate();
    }

    pub fn pause(&mut self) {
        self.paused = match self.thread.pause() {
            Some(s) => Paused::Saved(s),
            None => Paused::Stuck,
        };
    }

    pub fn resume(&mut self) {
        self.paused = Paused::Running;
        self.thread.resume();
    }

    /// Whether the driver activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.queues.is_some()
    }

    /// The device's own state as its thread had it when it paused; an error while it runs, or
    /// when it did not answer.
    pub fn paused_state(&self) -> Result<&S, NotPaused> {
        match &self.paused {
            Paused::Saved(s) => Ok(s),
            Paused::Running => Err(NotPaused::Running),
            Paused::Stuck => Err(NotPaused::Stuck),
        }
    }

    /// The queues' state for a snapshot (none before activation).
    pub fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
        let q = self.queues.as_ref()?.locked();
        Some(q.iter().map(QueueSnapshot::of).collect())
    }
}

impl<A, S> Drop for DeviceThread<A, S> {
    fn drop(&mut self) {
        if self.tx.send(Command::Stop).is_ok() {
            let _ = self.evt.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<A, S> Commands<A, S> {
    /// The eventfd that becomes readable when a command waits.
    pub fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// Adds the command eventfd to the thread's `epoll` set under `token` (epoll_ctl is allowed
    /// to a confined device thread; the epoll itself was made before it was confined).
    pub fn watch(&self, epoll: &Epoll, token: u64) -> std::io::Result<()> {
        epoll.ctl(ControlOperation::Add, self.fd(), EpollEvent::new(EventSet::IN, token))
    }

    /// Carries out every waiting command; false when the thread must stop. A pause holds here
    /// until the front end resumes (or stops) the device.
    pub fn serve<W: DeviceWorker<Activation = A, Saved = S>>(&self, w: &mut W) -> bool {
        let _ = self.evt.read();
        while let Ok(c) = self.rx.try_recv() {
            if !self.command(w, c) {
                return false;
            }
        }
        true
    }

    fn command<W: DeviceWorker<Activation = A, Saved = S>>(&self, w: &mut W, c: Command<A, S>) -> bool {
        match c {
            Command::Stop => return false,
            Command::Deactivate => w.deactivate(),
            Command::Activate(a) => {
                w.deactivate();
                w.activate(a);
            }
            Command::Pause(ack) => return self.hold(w, ack),
            Command::Resume => {}
        }
        true
    }

    /// Paused (the VM is being saved): the thread touches neither the queues nor guest memory
    /// until it is resumed; `ack` says it has stopped, with the device's own state. False when the
    /// thread must stop.
    fn hold<W: DeviceWorker<Activation = A, Saved = S>>(&self, w: &mut W, ack: Sender<S>) -> bool {
        let _ = ack.send(w.saved());
        loop {
            match self.rx.recv() {
                Ok(Command::Resume) => return true,
                Ok(Command::Stop) | Err(_) => return false,
                Ok(Command::Pause(again)) => {
                    let _ = again.send(w.saved());
                }
                Ok(Command::Deactivate) => w.deactivate(),
                Ok(c @ Command::Activate(_)) => return self.command(w, c),
            }
        }
    }
}

/// Waits for the events of a device thread's `epoll` (retrying when interrupted); `None` when the
/// thread cannot go on (the error is logged as `name`'s).
pub fn wait<'a>(epoll: &Epoll, events: &'a mut [EpollEvent], name: &str) -> Option<&'a [EpollEvent]> {
    wait_for(epoll, events, -1, name)
}

/// [`wait`], for at most `timeout_ms` (-1: no limit); no events when it passed.
pub fn wait_for<'a>(
    epoll: &Epoll,
    events: &'a mut [EpollEvent],
    timeout_ms: i32,
    name: &str,
) -> Option<&'a [EpollEvent]> {
    loop {
        match epoll.wait(timeout_ms, events) {
            Ok(n) => return Some(&events[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name}: epoll: {e}");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counter {
        active: Option<u32>,
        seen: Arc<AtomicUsize>,
    }

    impl DeviceWorker for Counter {
        type Activation = u32;
        type Saved = u32;
        fn activate(&mut self, a: u32) {
            self.active = Some(a);
            self.seen.fetch_add(a as usize, Ordering::SeqCst);
        }
        fn deactivate(&mut self) {
            self.active = None;
        }
        fn saved(&self) -> u32 {
            self.active.unwrap_or(0)
        }
    }

    thread_local!(static PREPARED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

    /// Runs a body on `threads`' thread `name` and says which thread ran it and whether that
    /// thread was prepared ahead.
    fn run_on(threads: &Threads, name: &'static str) -> (Option<String>, bool) {
        let (tx, rx) = channel();
        let body = move || {
            let _ = tx.send((std::thread::current().name().map(String::from), PREPARED.with(|p| p.get())));
        };
        threads.spawn(name, body).unwrap().join().unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn a_thread_made_ahead_runs_its_devices_body_and_other_devices_get_new_threads() {
        let ahead = |ok: bool| {
            let prepare = move || {
                PREPARED.with(|p| p.set(true));
                ok
            };
            ("vsock", crate::sys::Parked::spawn("vsock".into(), prepare, |body: Body| body(), drop).unwrap())
        };
        let threads = Threads::new(None).with_ahead(vec![ahead(true)]);
        assert_eq!(run_on(&threads, "virtio-blk"), (Some("virtio-blk".into()), false));
        assert_eq!(run_on(&threads, "vsock"), (Some("vsock".into()), true), "the thread made ahead");
        assert_eq!(run_on(&threads, "vsock"), (Some("vsock".into()), false), "each is used once");
        // One that could not prepare itself has ended: the body gets a new thread.
        let failed = ahead(false);
        while !failed.1.failed() {
            std::thread::yield_now();
        }
        let threads = Threads::new(None).with_ahead(vec![failed]);
        assert_eq!(run_on(&threads, "vsock"), (Some("vsock".into()), false));
        // Dropped unused, they end (joined).
        drop(Threads::new(None).with_ahead(vec![ahead(true), ahead(true)]));
    }

    #[test]
    fn a_body_handed_to_a_thread_that_then_fails_to_prepare_runs_on_a_new_one() {
        // The thread made ahead prepares itself only once its body has been handed over, and fails.
        let (handed_tx, handed_rx) = channel::<()>();
        let prepare = move || {
            let _ = handed_rx.recv();
            false
        };
        let parked =
            crate::sys::Parked::spawn("vsock".into(), prepare, |body: Body| body(), respawn("vsock", None)).unwrap();
        let (tx, rx) = channel();
        let body: Body = Box::new(move || {
            let _ = tx.send((std::thread::current().id(), std::thread::current().name().map(String::from)));
        });
        let handle = parked.start(body).map_err(|_| "refused at once").unwrap();
        let parked_id = handle.thread().id();
        handed_tx.send(()).unwrap();
        // Joining the thread made ahead waits for the one that ran the body.
        handle.join().unwrap();
        let (ran_on, name) = rx.try_recv().expect("the body ran before the join returned");
        assert_ne!(ran_on, parked_id, "not on the thread that could not prepare itself");
        assert_eq!(name.as_deref(), Some("vsock"));
    }

    #[test]
    fn threads_made_ahead_are_confined_before_their_body_runs() {
        let filter = Arc::new(crate::seccomp::device_filter().unwrap());
        let parked = Threads::park(&["vsock"], &filter).unwrap();
        let threads = Threads::new(Some(filter)).with_ahead(parked);
        let (tx, rx) = channel();
        let body = move || {
            // Not among the device filter's calls.
            // SAFETY: getppid has no arguments and touches no memory.
            let _ = tx.send(unsafe { libc::syscall(libc::SYS_getppid) });
        };
        threads.spawn("vsock", body).unwrap().join().unwrap();
        assert_eq!(rx.recv().unwrap(), -1);
        assert!(threads.ahead.locked().is_empty(), "the thread made ahead was not used");
    }

    /// A test device thread: serves `w` its commands until it is stopped.
    fn serve_counter(commands: &Commands<u32, u32>, mut w: Counter) {
        let epoll = Epoll::new().unwrap();
        commands.watch(&epoll, 1).unwrap();
        let mut events = [EpollEvent::default(); 4];
        loop {
            wait(&epoll, &mut events, "test-device").unwrap();
            if !commands.serve(&mut w) {
                return;
            }
        }
    }

    #[test]
    fn commands_reach_the_thread_and_drop_stops_it() {
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let t = DeviceThread::spawn("test-device", &Threads::new(None), move |commands: Commands<u32, u32>| {
            serve_counter(&commands, Counter { active: None, seen: s })
        })
        .unwrap();
        t.activate(5);
        // The pause answers with the device's state as the thread has it.
        assert_eq!(t.pause(), Some(5));
        // Paused: an activation waits behind the hold, and is carried out by it.
        t.activate(7);
        assert_eq!(t.pause(), Some(7));
        t.resume();
        t.deactivate();
        drop(t);
        assert_eq!(seen.load(Ordering::SeqCst), 12);
    }

    #[test]
    fn a_front_has_a_paused_state_only_once_its_thread_answered_the_pause() {
        let serve = |commands: Commands<u32, u32>| serve_counter(&commands, Counter::default());
        let mut front = QueueFront::new(DeviceThread::spawn("test-device", &Threads::new(None), serve).unwrap());
        assert!(!front.is_active());
        front.activate("test", 0, Vec::new(), |_| 3).unwrap();
        assert!(front.is_active());
        assert_eq!(front.paused_state(), Err(NotPaused::Running));
        front.pause();
        assert_eq!(front.paused_state(), Ok(&3));
        front.resume();
        assert_eq!(front.paused_state(), Err(NotPaused::Running));
        front.reset();
        assert!(!front.is_active());

        // A thread that does not answer (here: gone): stuck, not a state made up for it.
        let gone = |_: Commands<u32, u32>| {};
        let mut front = QueueFront::new(DeviceThread::spawn("test-device", &Threads::new(None), gone).unwrap());
        front.pause();
        assert_eq!(front.paused_state(), Err(NotPaused::Stuck));
    }
}
