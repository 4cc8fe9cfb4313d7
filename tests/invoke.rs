//! Invocations of a real guest's agent on restored clones, through the mailbox: the built-in
//! functions, the image's runtime, concurrency, errors, the `ember invoke` command.

mod common;

use std::time::{Duration, Instant};

use common::{ember, text};
use ember::channel::mailbox::{CallOptions, InvokeError};
use ember::channel::vsock::AgentConnection;
use ember::template::Template;
use ember::vmm::{Channels, RunOptions, RunningVm};
use ember_abi::Status;

/// The first invocation of a clone waits for it to take its seed and start serving.
const FIRST_CALL: Duration = Duration::from_secs(120);
/// Generous: calls are checked for their answers, and a slow CI machine must not fail them.
const CALL: Duration = Duration::from_secs(60);

fn opts(timeout: Duration) -> CallOptions {
    CallOptions { timeout, ..Default::default() }
}

#[test]
fn a_storming_guest_costs_only_itself() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("a_storming_guest_costs_only_itself") else { return };
    let scratch = common::scratch("storm");
    let channels =
        |id: u64| Channels { serve: true, vsock: Some(scratch.join(format!("{id}.vsock"))), ..Default::default() };
    let hostile = serving_clone(dir, 1, &channels(1));
    let good = serving_clone(dir, 2, &channels(2));
    let (fds, threads) = common::fds_and_threads();
    let rss = common::rss_kib();
    // The hostile clone rings doorbells and notifies queues as fast as it can, then floods vsock
    // with connections nobody serves; its sibling keeps answering every call meanwhile.
    // (Each guest connect is emulated guest kernel work on hosts like this project's: a few hundred
    // are a flood for the device thread, whose work per wakeup is bounded anyway.)
    for storm in ["doorbell 3000", "vsock 300"] {
        let mailbox = hostile.mailbox();
        let t = std::thread::spawn(move || mailbox.call("storm", storm.as_bytes(), opts(Duration::from_secs(300))));
        let mut calls = 0;
        // At least one call, however soon the storm ends.
        while calls == 0 || !t.is_finished() {
            let r = good.invoke("echo", b"still here", opts(CALL)).expect("the good clone stopped answering");
            assert_eq!(r.payload, b"still here");
            calls += 1;
        }
        let r = t.join().unwrap().expect("the storm did not finish");
        assert_eq!(r.status, Status::Ok, "{storm}: {}", String::from_utf8_lossy(&r.payload));
        assert!(calls > 0, "{storm}: no call to the good clone completed");
        eprintln!("{storm}: {}; the good clone answered {calls} calls meanwhile", String::from_utf8_lossy(&r.payload));
    }
    // A storm the agent does not understand is refused, not run.
    let r = hostile.invoke("storm", b"hurricane 5", opts(CALL)).unwrap();
    assert_eq!(r.status, Status::BadRequest, "{}", String::from_utf8_lossy(&r.payload));
    // It hurt nobody, not even itself: it still answers; the host holds no more fds or threads
    // than before and its memory stayed flat.
    assert_eq!(hostile.invoke("echo", b"x", opts(CALL)).unwrap().payload, b"x");
    assert_eq!(common::fds_and_threads(), (fds, threads), "fds or threads leaked");
    let grown = common::rss_kib().saturating_sub(rss);
    assert!(grown < 64 << 10, "the process grew by {grown} KiB during the storms");
    hostile.stop("test");
    good.stop("test");
}

/// Restores serving clones with ids `ids` of the template and waits until each answers.
fn serving_clones(test: &str, ids: &[u64]) -> Option<Vec<RunningVm>> {
    let dir = common::template(test)?;
    Some(ids.iter().map(|&id| serving_clone(dir, id, &Channels { serve: true, ..Default::default() })).collect())
}

/// Restores one serving clone of the snapshot in `dir` and waits until it answers.
fn serving_clone(dir: &std::path::Path, id: u64, channels: &Channels) -> RunningVm {
    serving_clone_with_console(dir, id, channels, Box::new(std::io::sink()))
}

fn serving_clone_with_console(
    dir: &std::path::Path,
    id: u64,
    channels: &Channels,
    console: ember::devices::serial::ConsoleOut,
) -> RunningVm {
    let template = Template::open(dir).unwrap();
    let vm = template.restore(id, channels, console).expect("restore");
    let vm = vm.start(RunOptions::default()).expect("start");
    let r = vm.invoke("echo", b"up?", opts(FIRST_CALL)).expect("the clone never answered");
    assert_eq!(r.payload, b"up?");
    vm
}

/// Connects to the agent over vsock, retrying while its listener is not up yet.
fn vsock_connect(path: &std::path::Path) -> AgentConnection {
    let deadline = Instant::now() + FIRST_CALL;
    loop {
        match AgentConnection::connect(path, CALL) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("vsock not ready yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no vsock connection to the agent: {e}"),
        }
    }
}

fn vsock_channels(path: &std::path::Path) -> Channels {
    Channels { serve: true, vsock: Some(path.to_path_buf()), ..Default::default() }
}

#[test]
fn built_in_functions_and_the_runtime_answer_over_the_mailbox() {
    let _one = common::one_at_a_time();
    let Some(vms) = serving_clones("built_in_functions_answer", &[1]) else { return };
    let vm = &vms[0];
    for doorbell in [false, true] {
        let o = CallOptions { timeout: CALL, doorbell, ..Default::default() };
        let r = vm.invoke("echo", b"hello, mailbox", o).unwrap();
        assert_eq!((r.status, r.payload.as_slice()), (Status::Ok, &b"hello, mailbox"[..]), "doorbell {doorbell}");
    }
    // The response doorbell (an exit) only for a caller that sleeps on it: one that polls long
    // enough to see the answer costs the guest none; one that sleeps is rung. Which of the two a
    // call is depends on who is faster, the agent or the caller, so the test asserts the
    // protocol's promise over the calls that did each (`Mailbox::doorbell_waits`), not a count of
    // rings that a fast or a slow machine would change.
    let mailbox = vm.mailbox();
    // A ring is counted when the vCPU thread handles its exit, which can be after the caller saw
    // the answer (its sleep has a timeout); the agent sees no request before that exit is
    // handled: one more (polled) call and every earlier ring is in the count.
    let settle = || assert_eq!(vm.invoke("echo", b"", opts(CALL)).unwrap().payload, b"");
    let counts = || {
        let (announced, slept) = mailbox.doorbell_waits();
        (mailbox.responses_rung(), announced, slept)
    };
    settle();
    let (rung, announced, _) = counts();
    for _ in 0..20 {
        let o = CallOptions { timeout: CALL, doorbell: true, spin: Duration::from_secs(10), ..Default::default() };
        assert_eq!(vm.invoke("echo", b"p", o).unwrap().payload, b"p");
    }
    settle();
    let (rung_after, announced_after, _) = counts();
    assert!(
        rung_after - rung <= announced_after - announced,
        "the agent rang {} times for 20 callers that polled, of which {} asked to be rung",
        rung_after - rung,
        announced_after - announced
    );
    // Callers that sleep at once on calls that take the guest 100 ms: the caller is all but
    // certainly asleep before the answer, and the test repeats until one was (a caller that lost
    // the CPU for longer than the call does not sleep).
    let (rung, _, slept) = counts();
    let mut sleepers = 0;
    for _ in 0..20 {
        let o = CallOptions { timeout: CALL, doorbell: true, ..Default::default() };
        let r = vm.invoke("sleep", b"100", o).unwrap();
        assert_eq!((r.status, text(&r.payload)), (Status::Ok, "slept 100 ms".to_string()));
        sleepers = counts().2 - slept;
        if sleepers >= 3 {
            break;
        }
    }
    assert!(sleepers > 0, "no caller slept on a 100 ms call in 20 tries");
    settle();
    let rung = counts().0 - rung;
    assert!(rung >= sleepers, "the agent rang {rung} times for {sleepers} callers that slept");
    let r = vm.invoke("sha256", b"abc", opts(CALL)).unwrap();
    assert_eq!(text(&r.payload), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let r = vm.invoke("sleep", b"50", opts(CALL)).unwrap();
    assert_eq!((r.status, text(&r.payload)), (Status::Ok, "slept 50 ms".to_string()));
    let r = vm.invoke("sleep", b"forever", opts(CALL)).unwrap();
    assert_eq!(r.status, Status::BadRequest, "{}", text(&r.payload));
    let r = vm.invoke("no-such-function", b"", opts(CALL)).unwrap();
    assert_eq!(r.status, Status::UnknownFunction);
    assert!(text(&r.payload).contains("no-such-function"), "{}", text(&r.payload));

    // The image's runtime (a separate process in the guest, started before the snapshot).
    let r = vm.invoke("reverse", b"stressed", opts(CALL)).unwrap();
    assert_eq!((r.status, text(&r.payload)), (Status::Ok, "desserts".to_string()));
    // The largest payload the mailbox carries, both ways.
    let big: Vec<u8> = (0..ember_abi::mailbox::MAX_PAYLOAD).map(|i| (i * 7 % 251) as u8).collect();
    let r = vm.invoke("echo", &big, opts(CALL)).unwrap();
    assert!(r.payload == big, "a {}-byte echo came back changed", big.len());
    // A runtime that dies mid-call: reported, and the agent goes on serving.
    let r = vm.invoke("reverse", b"crash", opts(CALL)).unwrap();
    assert_eq!(r.status, Status::Failed, "{}", text(&r.payload));
    assert!(text(&r.payload).contains("runtime \"reverse\" failed"), "{}", text(&r.payload));
    let r = vm.invoke("reverse", b"again", opts(CALL)).unwrap();
    assert_ne!(r.status, Status::Ok);
    assert_eq!(vm.invoke("echo", b"still here", opts(CALL)).unwrap().payload, b"still here");
}

#[test]
fn an_agent_that_does_not_answer_in_time_is_a_timeout_and_the_next_call_works() {
    let _one = common::one_at_a_time();
    let Some(vms) = serving_clones("a_slow_agent_is_a_timeout", &[1]) else { return };
    let vm = &vms[0];
    let t = Instant::now();
    let e = vm.invoke("sleep", b"5000", opts(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(e, InvokeError::Timeout(_)), "{e}");
    // It gave up at its timeout, not when the answer came (which is at least 5 s after the post).
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The late answer to the abandoned request is never taken for this one's.
    let r = vm.invoke("echo", b"fresh", opts(CALL)).unwrap();
    assert_eq!(r.payload, b"fresh");
    // Bad requests are refused before they reach the guest.
    assert!(matches!(vm.invoke("bad name", b"", opts(CALL)), Err(InvokeError::BadFunction(_))));
    let too_big = vec![0u8; ember_abi::mailbox::MAX_PAYLOAD + 1];
    assert!(matches!(vm.invoke("echo", &too_big, opts(CALL)), Err(InvokeError::PayloadTooLarge(_))));
    // A VM that has ended answers at once.
    let mailbox = vm.mailbox();
    vms.into_iter().for_each(|vm| drop(vm.stop("test")));
    assert!(matches!(mailbox.call("echo", b"", opts(CALL)), Err(InvokeError::VmEnded)));
}

#[test]
fn a_thousand_sequential_invocations_leak_nothing() {
    let _one = common::one_at_a_time();
    let Some(vms) = serving_clones("a_thousand_sequential_invocations", &[1]) else { return };
    let vm = &vms[0];
    let (fds, tasks) = common::fds_and_threads();
    for i in 0..1000u32 {
        let payload = format!("call {i} {}", "x".repeat((i % 97) as usize));
        let o = CallOptions { timeout: CALL, doorbell: i % 2 == 1, ..Default::default() };
        let r = vm.invoke("echo", payload.as_bytes(), o).unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(r.payload, payload.as_bytes(), "call {i}");
    }
    assert_eq!(common::fds_and_threads(), (fds, tasks), "fds or threads leaked");
}

#[test]
fn two_clones_invoked_concurrently_get_their_own_answers() {
    let _one = common::one_at_a_time();
    let Some(vms) = serving_clones("two_clones_invoked_concurrently", &[1, 2]) else { return };
    std::thread::scope(|s| {
        for (k, vm) in vms.iter().enumerate() {
            s.spawn(move || {
                for i in 0..300 {
                    let payload = format!("clone {k} call {i}");
                    let r = vm.invoke("sha256", payload.as_bytes(), opts(CALL)).unwrap();
                    let want = vm.invoke("echo", payload.as_bytes(), opts(CALL)).unwrap();
                    assert_eq!(want.payload, payload.as_bytes());
                    assert_eq!(r.payload.len(), 64);
                }
            });
        }
        // Two threads on one clone: each call gets its own answer.
        let vm = &vms[0];
        for t in 0..2 {
            s.spawn(move || {
                for i in 0..200 {
                    let payload = format!("thread {t} call {i}");
                    assert_eq!(vm.invoke("echo", payload.as_bytes(), opts(CALL)).unwrap().payload, payload.as_bytes());
                }
            });
        }
    });
}

#[test]
fn ember_invoke_reaches_a_clone_that_ember_restore_runs() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("ember_invoke_reaches_a_clone") else { return };
    let scratch = common::scratch("cli");
    let pattern = scratch.join("clone-{id}.mailbox");
    let mut restore = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["restore", "--snapshot", dir.to_str().unwrap(), "--clones", "2", "--console", "off"])
        .args(["--mailbox", pattern.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mailbox = |id: u32| scratch.join(format!("clone-{id}.mailbox"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(mailbox(1).exists() && mailbox(2).exists()) {
        assert!(Instant::now() < deadline, "ember restore made no mailbox files");
        std::thread::sleep(Duration::from_millis(20));
    }
    for id in [1, 2] {
        let m = mailbox(id);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["invoke", "--mailbox", m.to_str().unwrap(), "--timeout", "120", "--payload-file", "-", "reverse"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(format!("clone {id}").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{id} enolc"));
    }
    let out = ember(&["invoke", "--mailbox", mailbox(1).to_str().unwrap(), "nope"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown function"), "{}", text(&out.stderr));
    let out = ember(&["invoke", "--mailbox", scratch.join("missing").to_str().unwrap(), "echo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("No such file"), "{}", text(&out.stderr));

    // SIGTERM stops the clones cleanly and removes their mailbox files.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(restore.id() as i32, libc::SIGTERM) };
    let status = restore.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(restore.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!mailbox(1).exists() && !mailbox(2).exists(), "mailbox files left behind");
}

#[test]
fn vsock_carries_a_megabyte_both_ways_and_guest_connections_reach_the_host() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("vsock_carries_a_megabyte") else { return };
    let scratch = common::scratch("vsock-mib");
    let sock = scratch.join("vsock");
    let vm = serving_clone(dir, 1, &vsock_channels(&sock));
    let mut conn = vsock_connect(&sock);
    let r = conn.call("echo", b"hello, vsock").unwrap();
    assert_eq!((r.status, r.payload.as_slice()), (Status::Ok, &b"hello, vsock"[..]));
    let r = conn.call("sha256", b"abc").unwrap();
    assert_eq!(text(&r.payload), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    // 1 MiB there and back, twice on the same connection.
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for _ in 0..2 {
        let r = conn.call("echo", &big).unwrap();
        assert_eq!(r.status, Status::Ok);
        assert!(r.payload == big, "1 MiB over vsock came back changed");
    }
    // The mailbox works beside it.
    assert_eq!(vm.invoke("echo", b"mailbox too", opts(CALL)).unwrap().payload, b"mailbox too");
    // Unknown functions are answered, not dropped.
    assert_eq!(conn.call("nope", b"").unwrap().status, Status::UnknownFunction);

    // Guest-initiated: the guest connects to host port 7000, which is the Unix socket `<path>_7000`.
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_7000", sock.display())).unwrap();
    let host = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut line = [0u8; 5];
        s.read_exact(&mut line).unwrap();
        s.write_all(b"pong from the host").unwrap();
        line
    });
    let r = vm.invoke("vsock-ping", b"7000", opts(FIRST_CALL)).unwrap();
    assert_eq!((r.status, text(&r.payload)), (Status::Ok, "pong from the host".to_string()));
    assert_eq!(&host.join().unwrap(), b"ping\n");
    // No listener on the host port: the guest's connection is refused, cleanly.
    let r = vm.invoke("vsock-ping", b"7001", opts(FIRST_CALL)).unwrap();
    assert_eq!(r.status, Status::Failed, "{}", text(&r.payload));
    drop(vm);
    assert!(!sock.exists(), "the vsock socket outlived its VM");
}

#[test]
fn after_a_restore_old_vsock_connections_are_reset_and_new_ones_work() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("after_a_restore_old_vsock_connections") else { return };
    let scratch = common::scratch("vsock-restore");
    let (sock_a, sock_b) = (scratch.join("a.vsock"), scratch.join("b.vsock"));
    let a = serving_clone(dir, 1, &vsock_channels(&sock_a));
    let mut old = vsock_connect(&sock_a);
    assert_eq!(old.call("echo", b"before").unwrap().payload, b"before");
    // A snapshot of the clone with that connection open.
    a.pause().unwrap();
    let second = scratch.join("snapshot");
    a.snapshot(&second).unwrap();
    drop(a.stop("snapshot taken"));
    assert!(old.call("echo", b"after").is_err(), "a connection to a stopped VM still answered");

    let cap = common::Capture::default();
    let b = serving_clone_with_console(&second, 2, &vsock_channels(&sock_b), Box::new(cap.clone()));
    // One event was delivered: the transport reset.
    b.pause().unwrap();
    assert_eq!(vsock_events(&b.state().unwrap()), vsock_events(&read_state(&second)).wrapping_add(1));
    b.resume();
    // The guest's side of the old connection was reset by the transport reset ember sends.
    let deadline = Instant::now() + FIRST_CALL;
    while !cap.text().contains("vsock connection ended") {
        assert!(Instant::now() < deadline, "the old connection was not reset in the guest:\n{}", cap.text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut new = vsock_connect(&sock_b);
    assert_eq!(new.call("echo", b"after the restore").unwrap().payload, b"after the restore");
    assert_eq!(b.invoke("echo", b"mailbox", opts(CALL)).unwrap().payload, b"mailbox");
    drop(b.stop("test"));

    // A connection made as soon as a clone of that snapshot starts is served at once: the device
    // holds it until the guest has handled the reset (and wakes the guest for it) rather than
    // offer it to a guest that would take it and then reset it with the old ones, silently. A
    // few clones, since which the guest would see first is a matter of timing.
    let template = Template::open(&second).unwrap();
    for id in 3..7 {
        let sock = scratch.join(format!("{id}.vsock"));
        let vm = template.restore(id, &vsock_channels(&sock), Box::new(std::io::sink())).unwrap();
        let vm = vm.start(RunOptions::default()).unwrap();
        let mut c = AgentConnection::connect(&sock, CALL).unwrap();
        let answer = c.call("echo", b"at once").unwrap_or_else(|e| panic!("clone {id}: the first connection: {e}"));
        assert_eq!(answer.payload, b"at once");
        drop(vm.stop("test"));
    }
}

#[test]
fn a_clone_of_a_template_without_vsock_connections_is_sent_no_transport_reset() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("a_clone_of_a_template_without_vsock_connections") else { return };
    let scratch = common::scratch("vsock-no-reset");
    let sock = scratch.join("a.vsock");
    // The clone serves (it has answered a call) and takes vsock connections ...
    let a = serving_clone(dir, 1, &vsock_channels(&sock));
    assert_eq!(vsock_connect(&sock).call("echo", b"over vsock").unwrap().payload, b"over vsock");
    // ... and its guest was never told to reset its connections: no event was delivered, so it
    // did not begin by taking that interrupt.
    a.pause().unwrap();
    assert_eq!(vsock_events(&a.state().unwrap()), vsock_events(&read_state(dir)));
}

fn read_state(dir: &std::path::Path) -> ember::vmm::persist::SnapshotState {
    ember::vmm::persist::SnapshotState::read(&ember::snapshot::SnapshotPaths::new(dir)).unwrap()
}

/// How many events the vsock device has delivered to the guest (its event queue's used index).
fn vsock_events(state: &ember::vmm::persist::SnapshotState) -> u16 {
    let vsock = state.devices.virtio.iter().find(|d| d.device_type == 19).expect("no vsock device");
    vsock.queues[2].next_used
}

/// The guest's `clock` answer: (CLOCK_REALTIME, CLOCK_MONOTONIC) in ns.
fn guest_clocks(vm: &RunningVm) -> (u128, u128) {
    let r = vm.invoke("clock", b"", opts(CALL)).unwrap();
    let text = String::from_utf8(r.payload).unwrap();
    let field = |name: &str| -> u128 {
        let v = text.split_whitespace().find_map(|f| f.strip_prefix(name)?.strip_prefix('='));
        v.unwrap_or_else(|| panic!("no {name} in {text:?}")).parse().unwrap()
    };
    (field("realtime"), field("monotonic"))
}

/// Asserts that `vm`'s clocks are a clone's: its monotonic clock within 3 s of `mono_first` (an
/// earlier clone's reading of the same snapshot), its wall clock the host's.
fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// When a clone was restored: the host's wall clock and a monotonic instant, taken just before.
struct RestoredAt(u128, Instant);

impl RestoredAt {
    fn now() -> Self {
        Self(now_ns(), Instant::now())
    }
}

/// A clone's clocks, read now: its monotonic clock goes on from the snapshot's (it moved on by
/// at most the host time since its restore, never by the time between the snapshot and the
/// restore), and its wall clock is the host's (set by the agent from the control page at the
/// restore: from then on, up to now). `first`: the first clone's monotonic reading and the host
/// time its restore and read took.
fn assert_clone_clocks(vm: &RunningVm, restored: &RestoredAt, first: (u128, Duration), what: &str) {
    let (real, mono) = guest_clocks(vm);
    let after = now_ns();
    let took = restored.1.elapsed().max(first.1);
    let gap = mono.abs_diff(first.0);
    assert!(gap < (took + Duration::from_secs(1)).as_nanos(), "{what} is {gap} ns further on its monotonic clock");
    assert!(
        (restored.0.saturating_sub(1_000_000_000)..=after).contains(&real),
        "{what}: its wall clock {real} is not the host's since its restore ({}..{after})",
        restored.0
    );
}

/// A CPUID table as comparable words (function, index, flags, EAX..EDX per entry).
fn cpuid_words(c: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<[u32; 7]> {
    c.iter().map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]).collect()
}

/// The first clone's monotonic reading and the time its restore and read took; how long to wait
/// before the next restore so that a clone that replayed the wait would be caught.
fn first_clone_clock(vm: &RunningVm, restored: &RestoredAt) -> ((u128, Duration), Duration) {
    let (_, mono) = guest_clocks(vm);
    let took = restored.1.elapsed();
    ((mono, took), (took * 2 + Duration::from_secs(2)).max(Duration::from_secs(5)))
}

#[test]
fn a_clone_goes_on_from_its_snapshots_clock_with_the_hosts_wall_clock_time() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("a_clone_goes_on_from_its_snapshots_clock") else { return };
    let restored = RestoredAt::now();
    let first = serving_clone(dir, 1, &Channels { serve: true, ..Default::default() });
    let (first_clock, wait) = first_clone_clock(&first, &restored);
    first.stop("test");
    // Clones restored later do not see the time in between on their monotonic clock (nor replay
    // it: a clone's kernel would otherwise run every timer of the gap before anything else)...
    std::thread::sleep(wait);
    // ...but their wall clock is the host's (set by the agent from the control page).
    let restored = RestoredAt::now();
    let later = serving_clone(dir, 2, &Channels { serve: true, ..Default::default() });
    assert_clone_clocks(&later, &restored, first_clock, "a clone restored later");
    later.stop("test");
}

#[test]
fn a_clone_restored_into_a_vm_shell_made_long_before_goes_on_like_any_other() {
    use ember::vmm::shell::{ShellSpec, VmShell};
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("a_clone_restored_into_a_vm_shell") else { return };
    let template = Template::open(dir).unwrap();
    let channels = Channels { serve: true, ..Default::default() };
    // A shell made now and left waiting: its vCPUs hold the template's registers, FPU and MSRs
    // already, its RAM maps the template's memory file (its guest has never run).
    let shell = VmShell::new(&template.shell_spec()).unwrap();
    assert!(shell.fits(&template.state));
    let restored = RestoredAt::now();
    let first = serving_clone(dir, 1, &channels);
    let (first_clock, wait) = first_clone_clock(&first, &restored);
    first.stop("test");
    std::thread::sleep(wait);
    let restored = RestoredAt::now();
    let vm = template.restore_in(Some(shell), 2, &channels, Box::new(std::io::sink())).unwrap();
    let vm = vm.start(RunOptions::default()).unwrap();
    // It sees the template's memory (its agent answers, its runtime too) ...
    assert_eq!(vm.invoke("echo", b"up?", opts(FIRST_CALL)).unwrap().payload, b"up?");
    let r = vm.invoke("sha256", b"abc", opts(CALL)).unwrap();
    assert_eq!(text(&r.payload), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(text(&vm.invoke("reverse", b"stressed", opts(CALL)).unwrap().payload), "desserts");
    // ... and its clocks are a clone's, not the shell's age: its monotonic clock goes on from the
    // snapshot, its wall clock is the host's.
    assert_clone_clocks(&vm, &restored, first_clock, "a clone restored into an old shell");
    vm.stop("test");

    // A shell made before its snapshot was known (what `ember firecracker` makes while it waits
    // for a load): the machine's shape only; the restore loads the vCPU state it did not.
    let m = &template.state.machine;
    let generic = ShellSpec::generic(m.mem_bytes, template.state.vcpus.len());
    let shell = VmShell::new(&generic).unwrap();
    assert!(shell.fits(&template.state), "a Linux guest's snapshot without a PIT fits its machine's generic shell");
    // Its vCPUs have the CPUID a guest of that shape boots with, which the snapshot of one that
    // booted still has (but for the bits KVM derives from the vCPU's state): the restore need
    // not load it.
    assert!(shell.holds_cpuid_of(&template.state), "a generic shell holds a booted guest's CPUID");
    let restored = RestoredAt::now();
    let vm = template.restore_in(Some(shell), 2, &channels, Box::new(std::io::sink())).unwrap();
    let vm = vm.start(RunOptions::default()).unwrap();
    assert_eq!(vm.invoke("echo", b"generic", opts(FIRST_CALL)).unwrap().payload, b"generic");
    assert_eq!(text(&vm.invoke("reverse", b"stressed", opts(CALL)).unwrap().payload), "desserts");
    assert_clone_clocks(&vm, &restored, first_clock, "a clone restored into a generic shell");
    // Its vCPU's CPUID, derived bits included, is the snapshot's.
    vm.pause().unwrap();
    let now = vm.state().unwrap();
    for (i, (a, b)) in now.vcpus.iter().zip(&template.state.vcpus).enumerate() {
        let (a, b) = (cpuid_words(&a.cpuid), cpuid_words(&b.cpuid));
        assert_eq!(a, b, "vCPU {i}'s CPUID after a restore into a generic shell");
    }
    vm.stop("test");
    let other = ShellSpec::generic(m.mem_bytes * 2, template.state.vcpus.len());
    assert!(!VmShell::new(&other).unwrap().fits(&template.state));

    // A shell made for another machine does not fit; the restore makes the VM it needs instead.
    let other = ShellSpec { mem_bytes: template.state.machine.mem_bytes * 2, ..template.shell_spec() };
    let misfit = VmShell::new(&other).unwrap();
    assert!(!misfit.fits(&template.state));
    let vm = template.restore_in(Some(misfit), 3, &channels, Box::new(std::io::sink())).unwrap();
    let vm = vm.start(RunOptions::default()).unwrap();
    assert_eq!(vm.invoke("echo", b"up?", opts(FIRST_CALL)).unwrap().payload, b"up?");
    vm.stop("test");

    // Threads made ahead are confined; a clone run without seccomp (`--no-seccomp`) starts its
    // own, unconfined, and still serves (its vsock device on a thread of its own too).
    let shell = VmShell::new(&template.shell_spec()).unwrap();
    assert_eq!(shell.threads_ahead(), template.state.vcpus.len() + 1, "a vCPU thread each, and vsock's");
    let bare = VmShell::new(&ShellSpec { threads_ahead: false, ..template.shell_spec() }).unwrap();
    assert_eq!(bare.threads_ahead(), 0);
    drop((shell, bare));
    let unconfined = Channels { device_seccomp: false, ..channels.clone() };
    let vm = template.restore_in(None, 4, &unconfined, Box::new(std::io::sink())).unwrap();
    let vm = vm.start(RunOptions { seccomp: false, ..RunOptions::default() }).unwrap();
    assert_eq!(vm.invoke("echo", b"unconfined", opts(FIRST_CALL)).unwrap().payload, b"unconfined");
    vm.stop("test");

    // Clones whose channels are named files (as a worker's are): the mailbox is a file another
    // process opens, either the one a shell made in that directory, renamed, or one mapped over
    // the shell's anonymous one; the vsock device runs on the thread the shell started for it,
    // activated when the clone starts.
    let scratch = common::scratch("shell-channels");
    let files = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        names
    };
    let in_scratch = ShellSpec { mailbox_dir: Some(scratch.clone()), ..template.shell_spec() };
    for (id, spec) in [(4u64, template.shell_spec()), (5, in_scratch)] {
        let (mbox, sock) = (scratch.join(format!("{id}.mailbox")), scratch.join(format!("{id}.vsock")));
        let named = Channels { mailbox: Some(mbox.clone()), ..vsock_channels(&sock) };
        let shell = VmShell::new(&spec).unwrap();
        let vm = template.restore_in(Some(shell), id, &named, Box::new(std::io::sink())).unwrap();
        assert_eq!(files(), [format!("{id}.mailbox"), format!("{id}.vsock")], "the shell's mailbox file is renamed");
        let vm = vm.start(RunOptions::default()).unwrap();
        let outside = ember::channel::mailbox::Mailbox::open(&mbox).unwrap();
        assert_eq!(outside.call("echo", b"named", opts(FIRST_CALL)).unwrap().payload, b"named");
        let mut conn = vsock_connect(&sock);
        assert_eq!(conn.call("echo", b"over vsock").unwrap().payload, b"over vsock");
        assert_eq!(text(&vm.invoke("reverse", b"stressed", opts(CALL)).unwrap().payload), "desserts");
        drop(outside);
        vm.stop("test");
        assert!(files().is_empty(), "the clone's files outlived it: {:?}", files());
    }
    // A shell whose mailbox file is not used (the clone's mailbox is anonymous) removes it.
    let in_scratch = ShellSpec { mailbox_dir: Some(scratch.clone()), ..template.shell_spec() };
    let shell = VmShell::new(&in_scratch).unwrap();
    assert_eq!(files().len(), 1);
    let vm = template.restore_in(Some(shell), 6, &channels, Box::new(std::io::sink())).unwrap();
    assert!(files().is_empty(), "{:?}", files());
    let vm = vm.start(RunOptions::default()).unwrap();
    assert_eq!(vm.invoke("echo", b"anonymous", opts(FIRST_CALL)).unwrap().payload, b"anonymous");
    vm.stop("test");
}
