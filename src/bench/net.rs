//! `ember bench net`: clones' networks, measured in one run (as root, in a network namespace the
//! benchmark makes for itself and that goes with it):
//!
//! - the namespace pool's refill: how long `ember serve`'s network thread takes to prepare a
//!   clone's namespace (TAP, veth pair, addresses, routes, nftables rules), and how many per second;
//! - restore -> the first answer of a clone (the built-in `echo` over the mailbox: the baseline),
//!   and then its first TCP request answered (`http-get` to a server in its namespace, behind the
//!   TAP: connect, request, response);
//! - a request's round trip over virtio-net (a new TCP connection each) next to the mailbox's and
//!   vsock's no-op round trips on the same clone;
//! - throughput over virtio-net, host -> guest and guest -> host (`tcp-read`, `tcp-write`), next to
//!   the mailbox and vsock moving 256 KiB payloads;
//! - the daemon's acquire on a pool of networked clones against one without a network.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handoff;
use super::layers::call;
use super::{ms, BenchError, Summary, TableReport};
use crate::config::VmConfig;
use crate::isolation::network::{guest_interface, Network, NetworkPolicy, Slot, GATEWAY};
use crate::isolation::worker::Isolation;
use crate::template::{MakeOptions, Template};
use crate::vmm::{Channels, RunOptions, RunningVm};
use serde_json::json;

/// What `ember bench net` measures.
pub struct NetBench {
    /// Clones restored, each timed to its first answer and first TCP request.
    pub runs: usize,
    /// Round trips per channel on one clone.
    pub calls: usize,
    /// Bytes per throughput run.
    pub bytes: u64,
    pub timeout: Duration,
}

const PORT: u16 = 8080;
const BULK_PORT: u16 = 8081;
const SINK_PORT: u16 = 8082;

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}

/// Servers in a clone's namespace, on its gateway address: an HTTP answer, a bulk sender and a
/// sink; stopped when dropped (the namespace can go once their sockets have).
struct Servers(Vec<TcpListener>);

impl Drop for Servers {
    fn drop(&mut self) {
        for l in &self.0 {
            // SAFETY: shutdown on a listener we hold: its accept() returns, and its thread ends.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Accepts until the listener is shut down, serving each connection with `f`.
fn serve(l: TcpListener, mut f: impl FnMut(TcpStream) + Send + 'static) {
    std::thread::spawn(move || {
        while let Ok((s, _)) = l.accept() {
            f(s);
        }
    });
}

fn servers(slot: &Slot, bytes: u64) -> Result<Servers, BenchError> {
    let ns = slot.namespace();
    let bind = move |port: u16| -> std::io::Result<TcpListener> {
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns with the slot's namespace descriptor, on this short-lived thread only.
                if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                TcpListener::bind((GATEWAY, port))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))
        })
    };
    let io = |e: std::io::Error| failed("server in the clone's namespace", e);
    let (http, bulk, sink) = (bind(PORT).map_err(io)?, bind(BULK_PORT).map_err(io)?, bind(SINK_PORT).map_err(io)?);
    let held =
        Servers(vec![http.try_clone().map_err(io)?, bulk.try_clone().map_err(io)?, sink.try_clone().map_err(io)?]);
    serve(http, |mut s| {
        let (mut req, mut buf) = (Vec::new(), [0u8; 1024]);
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let block = vec![7u8; 64 << 10];
    serve(bulk, move |mut s| {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if s.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    serve(sink, move |mut s| while matches!(s.read(&mut buf), Ok(n) if n > 0) {});
    Ok(held)
}

fn clone_on(t: &Template, id: u64, slot: &Slot) -> Result<RunningVm, BenchError> {
    let tap = slot.dup_tap().map_err(|e| failed("TAP", e))?;
    let channels = Channels { serve: true, taps: vec![Arc::new(tap)], ..Default::default() };
    Ok(t.restore(id, &channels, Box::new(std::io::sink()))?.start(RunOptions::default())?)
}

/// Ready clones per pool for the handoff comparison.
const HANDOFF_POOL: u32 = 8;

pub fn net(cfg: &VmConfig, b: &NetBench) -> Result<TableReport, BenchError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(failed("ember bench net", "needs root (network namespaces, TAP devices, nftables)"));
    }
    // Everything from here on happens in a network namespace of the benchmark's own.
    // SAFETY: unshare takes no pointers; no other thread runs yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(failed("unshare(CLONE_NEWNET)", std::io::Error::last_os_error()));
    }
    let scratch = std::env::temp_dir().join(format!("ember-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| failed("scratch directory", e))?;
    let r = run(cfg, b, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

fn run(plain_cfg: &VmConfig, b: &NetBench, scratch: &Path) -> Result<TableReport, BenchError> {
    let mut rows: Vec<(String, Option<Summary>)> = Vec::new();
    let mut notes = Vec::new();
    let network = Network::start(scratch, false);
    if !network.available() {
        return Err(failed("clone networks", "unavailable (see the log)"));
    }
    // The pool's refill: namespaces prepared back to back.
    let spare = b.runs.clamp(2, crate::isolation::network::MAX_SPARE);
    let t = Instant::now();
    network.attach("bench", &NetworkPolicy::default(), spare).map_err(|e| failed("attach", e))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while network.info("bench").map(|i| i.ready_namespaces).unwrap_or(0) < spare {
        if Instant::now() > deadline {
            return Err(failed("namespace pool", "not filled within 120 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let fill = t.elapsed();
    rows.push((format!("namespace pool: {spare} prepared, ms each (mean)"), Summary::of(&[ms(fill) / spare as f64])));
    notes.push(format!(
        "namespace pool refill: {spare} namespaces in {:.1} ms ({:.0}/s, one thread)",
        ms(fill),
        spare as f64 / fill.as_secs_f64()
    ));

    // The networked template.
    let mut cfg = plain_cfg.clone();
    cfg.network_interfaces = vec![guest_interface()];
    let slot = network.take("bench", b.timeout).map_err(|e| failed("namespace", e))?;
    let channels =
        Channels { taps: vec![Arc::new(slot.dup_tap().map_err(|e| failed("TAP", e))?)], ..Default::default() };
    let dir = scratch.join("template");
    let opts = MakeOptions { timeout: Duration::from_secs(600), channels, ..Default::default() };
    let made = Template::make(&cfg, &dir, opts)?;
    drop(slot);
    notes.push(format!("template booted to ready in {:.1} s", made.ready.as_secs_f64()));
    let template = made.template;

    // restore -> first answer, then -> first TCP request answered.
    let (mut first, mut tcp, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..b.runs {
        let slot = network.take("bench", b.timeout).map_err(|e| failed("namespace", e))?;
        let _servers = servers(&slot, b.bytes)?;
        let t = Instant::now();
        let vm = clone_on(&template, i as u64 + 1, &slot)?;
        call(&vm, "echo", "", b.timeout)?;
        let answered = t.elapsed();
        let out = call(&vm, "http-get", &format!("{GATEWAY}:{PORT}/"), b.timeout)?;
        if !out.ends_with("ok") {
            return Err(failed("http-get", out));
        }
        let done = t.elapsed();
        first.push(ms(answered));
        tcp.push(ms(done - answered));
        total.push(ms(done));
        vm.stop("measured");
    }
    rows.push(("restore -> first answer (echo, mailbox)".into(), Summary::of(&first)));
    rows.push(("then -> first TCP request answered".into(), Summary::of(&tcp)));
    rows.push(("restore -> first TCP request answered".into(), Summary::of(&total)));

    // Round trips and throughput on one clone.
    let slot = network.take("bench", b.timeout).map_err(|e| failed("namespace", e))?;
    let servers = servers(&slot, b.bytes)?;
    let sock = scratch.join("vsock");
    let tap = slot.dup_tap().map_err(|e| failed("TAP", e))?;
    let channels = Channels { serve: true, taps: vec![Arc::new(tap)], vsock: Some(sock.clone()), ..Default::default() };
    let vm = template.restore(1000, &channels, Box::new(std::io::sink()))?.start(RunOptions::default())?;
    call(&vm, "echo", "", b.timeout)?;
    let mut agent = super::invoke::connect_agent(&sock, b.timeout).map_err(|e| failed("vsock", e))?;
    let mut vsock_call = |payload: &[u8]| -> Result<(), BenchError> {
        let r = agent.call("echo", payload).map_err(|e| failed("vsock", e))?;
        match r.payload.len() == payload.len() {
            true => Ok(()),
            false => Err(failed("vsock", "a short answer")),
        }
    };
    let (mut mailbox, mut vsock, mut http) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.calls {
        let t = Instant::now();
        call(&vm, "echo", "", b.timeout)?;
        mailbox.push(ms(t.elapsed()));
        let t = Instant::now();
        vsock_call(b"")?;
        vsock.push(ms(t.elapsed()));
        let t = Instant::now();
        call(&vm, "http-get", &format!("{GATEWAY}:{PORT}/"), b.timeout)?;
        http.push(ms(t.elapsed()));
    }
    rows.push(("round trip: mailbox no-op".into(), Summary::of(&mailbox)));
    rows.push(("round trip: vsock no-op (one connection, kept open)".into(), Summary::of(&vsock)));
    rows.push(("round trip: TCP connect + request + answer over virtio-net".into(), Summary::of(&http)));
    let mib = b.bytes as f64 / (1 << 20) as f64;
    let mut rate = |what: &str, f: &dyn Fn() -> Result<String, BenchError>| -> Result<(), BenchError> {
        let mut v = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = f()?;
            if !out.starts_with(&b.bytes.to_string()) {
                return Err(failed(what, out));
            }
            v.push(mib / t.elapsed().as_secs_f64());
        }
        v.sort_by(f64::total_cmp);
        notes.push(format!("{what}: {:.1} MiB/s (median of 3 runs of {mib:.0} MiB)", v[1]));
        Ok(())
    };
    rate("virtio-net host -> guest", &|| call(&vm, "tcp-read", &format!("{GATEWAY}:{BULK_PORT}"), b.timeout))?;
    rate("virtio-net guest -> host", &|| {
        call(&vm, "tcp-write", &format!("{GATEWAY}:{SINK_PORT} {}", b.bytes), b.timeout)
    })?;
    let payload = "x".repeat(256 << 10);
    let t = Instant::now();
    for _ in 0..32 {
        call(&vm, "echo", &payload, b.timeout)?;
    }
    notes.push(format!(
        "mailbox: {:.1} MiB/s (32 echoes of 256 KiB, both directions counted)",
        16.0 / t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    for _ in 0..4 {
        vsock_call(payload.as_bytes())?;
    }
    notes.push(format!(
        "vsock: {:.2} MiB/s (4 echoes of 256 KiB, both directions counted)",
        2.0 / t.elapsed().as_secs_f64()
    ));
    let p50 = |v: &[f64]| Summary::of(v).map(|s| s.p50).unwrap_or(f64::NAN);
    notes.push(format!(
        "round trip (p50), against the mailbox: vsock {:.0}x, TCP request over virtio-net {:.0}x",
        p50(&vsock) / p50(&mailbox),
        p50(&http) / p50(&mailbox)
    ));
    vm.stop("measured");
    drop(servers);
    drop(slot);
    network.shutdown();
    drop(network);

    // Handoff with networking on vs off: acquire + release through the API, on a pool of the
    // networked template and one of a template without a card.
    let plain = scratch.join("plain");
    let opts = MakeOptions { timeout: Duration::from_secs(600), ..Default::default() };
    Template::make(plain_cfg, &plain, opts)?;
    let state = scratch.join("state");
    let pool = json!({"min_ready": HANDOFF_POOL, "max": HANDOFF_POOL * 2, "headroom": 1.0,
        "scale_in_delay_s": 3600.0, "burst_window_s": 0.0, "max_uses": u32::MAX});
    handoff::register(&plain, &state, "plain", pool.clone(), json!({})).map_err(|e| failed("register", e))?;
    handoff::register(&dir, &state, "net", pool, json!({"network": {}})).map_err(|e| failed("register", e))?;
    // (The namespaces above are gone by now: the new network thread's transit addresses are free.)
    std::thread::sleep(Duration::from_secs(1));
    let socket = scratch.join("api.sock");
    let daemon = handoff::daemon(&state, &socket, Isolation::None, Some(false), crate::serve::DEFAULT_API_THREADS)
        .map_err(|e| failed("daemon", e))?;
    let measured = (|| -> Result<(), String> {
        for name in ["plain", "net"] {
            handoff::wait_full(daemon.supervisor(), name, HANDOFF_POOL)?;
        }
        handoff::wait_quiet();
        daemon.supervisor().pause_scaling(true);
        for name in ["plain", "net"] {
            let acquire = move |c: &mut crate::serve::client::Client| {
                handoff::request(c, "POST", &format!("/functions/{name}/acquire"), "")
            };
            let (rtt, srv) = handoff::round(&socket, 1, b.calls, &acquire, &handoff::release_it)?;
            let what = if name == "net" { "networked pool" } else { "pool without network" };
            let ms = |us: &[f64]| us.iter().map(|u| u / 1e3).collect::<Vec<_>>();
            rows.push((format!("acquire + release, {what}: acquire in the daemon"), Summary::of(&ms(&srv))));
            rows.push((format!("acquire + release, {what}: acquire round trip"), Summary::of(&ms(&rtt))));
        }
        Ok(())
    })();
    daemon.stop();
    measured.map_err(|e| failed("handoff", e))?;
    Ok(TableReport {
        title: format!("ember bench net: {} clones, {} round trips per channel", b.runs, b.calls),
        heading: "latency (ms)",
        width: 62,
        rows,
        notes,
    })
}
