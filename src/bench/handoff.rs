//! `ember bench handoff`: the latency of `POST /functions/{name}/acquire` and of a no-op `invoke`
//! over the real API on a Unix socket, with 1 and 16 concurrent clients, against pools restored
//! from an existing template. Each request is timed twice: by the client (request written ->
//! response read) and by the daemon (the `server-timing` header: request routed -> response
//! built, which is the handoff itself plus HTTP routing and JSON). Acquire is also timed over the
//! lean protocol on the same socket ([`crate::serve::lean`]).

use crate::isolation::worker::Isolation;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Summary, TableReport};
use crate::serve::client::{Client, ClientError, LeanClient};
use crate::serve::model::{FunctionSpec, Handoff};
use crate::serve::registry::Registry;
use crate::serve::supervisor::Supervisor;
use crate::serve::{Daemon, DaemonConfig};

/// Single-use clones: every handoff gets a fresh clone.
const FRESH: &str = "fresh";
/// Recycled clones: released clones go back to the pool.
const RECYCLED: &str = "recycled";
const RECYCLED_POOL: u32 = 16;
/// The pause between calls of the sparse round: longer than the agent's longest spin after an
/// answer (100 ms).
const SPARSE_GAP: Duration = Duration::from_millis(200);

/// What one request measured: the client's round trip and the daemon's own time, in us.
pub(super) struct Timed {
    pub(super) status: u16,
    pub(super) round_trip_us: f64,
    pub(super) server_us: Option<f64>,
    pub(super) body: Vec<u8>,
}

/// One request (with a JSON `body`) on a kept-alive connection (ember's client writes it in one
/// piece: one system call, one wake-up of the daemon).
pub(super) fn request(c: &mut Client, method: &str, path: &str, body: &str) -> std::io::Result<Timed> {
    let r = c.request(method, path, "application/json", body.as_bytes())?;
    let server_us = r.server_time().map(|d| d.as_secs_f64() * 1e6);
    Ok(Timed { status: r.status, round_trip_us: r.round_trip.as_secs_f64() * 1e6, server_us, body: r.body })
}

/// Runs the benchmark on a copy of the template in `snapshot` (hard links): `pool` single-use
/// clones for the fresh-clone invoke, 16 recycled ones for the acquire rounds, `per_client`
/// requests per client and round.
/// Clones run where `isolation` says (in worker processes, or in the daemon itself).
/// The daemon's HTTP API runs on `api_threads` threads.
pub fn handoff(
    snapshot: &Path,
    pool: u32,
    per_client: usize,
    isolation: Isolation,
    api_threads: usize,
) -> Result<TableReport, String> {
    let dir = std::env::temp_dir().join(format!("ember-bench-handoff-{}", std::process::id()));
    let result = run(snapshot, &dir, pool, per_client, isolation, api_threads);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Registers `name` in the state directory `state` with the template in `snapshot`, its pool
/// policy `pool` and the registration's other fields from `extra` (a JSON object).
pub(super) fn register(
    snapshot: &Path,
    state: &Path,
    name: &str,
    pool: serde_json::Value,
    extra: serde_json::Value,
) -> Result<(), String> {
    let mut spec = serde_json::json!({"kernel": "/nonexistent", "initramfs": "/nonexistent", "pool": pool});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let spec: FunctionSpec = serde_json::from_value(spec).map_err(|e| e.to_string())?;
    Registry::open(state).map_err(|e| e.to_string())?.install(name, &spec, snapshot).map_err(|e| e.to_string())
}

/// `ember serve` in this process over the state directory `state` (its functions installed with
/// [`register`]; nothing is booted, so no image directory), its API on `socket`; clones' networks
/// as `network` says (see [`DaemonConfig::network`]). Left unconfined (the benchmark's own
/// threads go on measuring) and deaf to signals.
pub(super) fn daemon(
    state: &Path,
    socket: &Path,
    isolation: Isolation,
    network: Option<bool>,
    api_threads: usize,
) -> Result<Daemon, String> {
    let cfg = DaemonConfig {
        isolation,
        network,
        api_threads,
        confine: false,
        stop_on_signals: false,
        ..DaemonConfig::new(socket, state)
    };
    Daemon::start(&cfg)
}

pub(super) type Request<C> = dyn Fn(&mut C) -> std::io::Result<Timed> + Sync;
pub(super) type After<C> = dyn Fn(&mut C, &Timed) -> Result<(), String> + Sync;

/// `clients` clients each send `n` requests `req` on an HTTP connection of their own, each
/// followed by `after` (untimed). Returns (round trips, daemon times) in us.
pub(super) fn round(
    socket: &Path,
    clients: usize,
    n: usize,
    req: &Request<Client>,
    after: &After<Client>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    round_on(&|| Client::connect(socket), clients, n, req, after)
}

/// [`round`] on connections that `connect` opens.
fn round_on<C>(
    connect: &(dyn Fn() -> std::io::Result<C> + Sync),
    clients: usize,
    n: usize,
    req: &Request<C>,
    after: &After<C>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let per_client: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(move || -> Result<(Vec<f64>, Vec<f64>), String> {
                    let mut c = connect().map_err(|e| e.to_string())?;
                    let (mut rtt, mut srv) = (Vec::with_capacity(n), Vec::with_capacity(n));
                    for _ in 0..n {
                        let t = req(&mut c).map_err(|e| e.to_string())?;
                        if t.status != 200 {
                            return Err(format!(
                                "the daemon answered {}: {}",
                                t.status,
                                String::from_utf8_lossy(&t.body)
                            ));
                        }
                        rtt.push(t.round_trip_us);
                        srv.extend(t.server_us);
                        after(&mut c, &t)?;
                    }
                    Ok((rtt, srv))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into()))).collect::<Result<_, _>>()
    })?;
    Ok(per_client.into_iter().fold((Vec::new(), Vec::new()), |(mut a, mut b), (x, y)| {
        a.extend(x);
        b.extend(y);
        (a, b)
    }))
}

/// Releases the clone an acquire handed over, on the same connection.
pub(super) fn release_it(c: &mut Client, acquired: &Timed) -> Result<(), String> {
    let h: Handoff = serde_json::from_slice(&acquired.body).map_err(|e| e.to_string())?;
    c.release(h.id, &h.lease, false).map_err(|e| e.to_string())?;
    Ok(())
}

/// How long a polling lean client looks for its answer before it sleeps in its read.
const CLIENT_POLL: Duration = Duration::from_micros(200);

/// One request line of the lean protocol ([`crate::serve::lean`]) and its answer line; the
/// status is 200 unless the answer is an error. `poll`: look for the answer for up to
/// [`CLIENT_POLL`] before sleeping in the read (as a scheduler that wants microseconds would).
fn lean_request(c: &mut LeanClient, line: &str, poll: bool) -> std::io::Result<Timed> {
    use std::os::fd::AsRawFd;
    let t = Instant::now();
    c.send(line)?;
    if poll && !c.buffered() {
        let mut fd = libc::pollfd { fd: c.stream().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one live pollfd, without waiting.
        while t.elapsed() < CLIENT_POLL && unsafe { libc::poll(&mut fd, 1, 0) } == 0 {
            std::hint::spin_loop();
        }
    }
    // Timed to the answer line read, as an HTTP request is to its body (its JSON parsed after).
    let mut line = Vec::new();
    c.read_line(&mut line)?;
    let round_trip_us = t.elapsed().as_secs_f64() * 1e6;
    let (status, body) = match LeanClient::parse::<serde_json::Value>(&line) {
        Ok(_) => (200, line),
        Err(ClientError::Refused { status, message, .. }) => (status, message.into_bytes()),
        Err(ClientError::Io(e)) => return Err(e),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    Ok(Timed { status, round_trip_us, server_us: None, body })
}

/// Releases the clone a lean acquire handed over, on the same connection.
fn lean_release(c: &mut LeanClient, acquired: &Timed) -> Result<(), String> {
    let h: Handoff = serde_json::from_slice(&acquired.body).map_err(|e| e.to_string())?;
    c.release(h.id, &h.lease, false).map_err(|e| e.to_string())?;
    Ok(())
}

fn no_release<C>(_: &mut C, _: &Timed) -> Result<(), String> {
    Ok(())
}

fn run(
    snapshot: &Path,
    dir: &Path,
    pool: u32,
    per_client: usize,
    isolation: Isolation,
    api_threads: usize,
) -> Result<TableReport, String> {
    let state = dir.join("state");
    let quiet = |min_ready: u32| {
        serde_json::json!({"min_ready": min_ready, "max": min_ready * 2 + 16, "headroom": 1.0,
            "scale_in_delay_s": 3600.0, "burst_window_s": 0.0, "max_uses": 1})
    };
    register(snapshot, &state, FRESH, quiet(pool), serde_json::json!({}))?;
    let mut recycled = quiet(RECYCLED_POOL);
    recycled["max_uses"] = u32::MAX.into();
    register(snapshot, &state, RECYCLED, recycled, serde_json::json!({}))?;
    let socket = dir.join("api.sock");
    let daemon = daemon(&state, &socket, isolation, None, api_threads)?;
    let sup = daemon.supervisor().clone();
    let settle = || -> Result<(), String> {
        sup.pause_scaling(false);
        wait_full(&sup, FRESH, pool)?;
        wait_full(&sup, RECYCLED, RECYCLED_POOL)?;
        wait_quiet();
        // Refills would restore clones (guest work) beside the measurement: paused for a round.
        sup.pause_scaling(true);
        Ok(())
    };
    let acquire = |c: &mut Client| request(c, "POST", &format!("/functions/{RECYCLED}/acquire"), "");
    let invoke = |name: &'static str| {
        move |c: &mut Client| request(c, "POST", &format!("/functions/{name}/invoke"), r#"{"payload": ""}"#)
    };

    let lean_acquire = |poll: bool| move |c: &mut LeanClient| lean_request(c, &format!("acquire {RECYCLED}"), poll);

    let mut rows = Vec::new();
    let mut add = |what: String, (rtt, srv): (Vec<f64>, Vec<f64>)| {
        rows.push((format!("{what}: round trip"), Summary::of(&rtt)));
        if !srv.is_empty() {
            rows.push((format!("{what}: in the daemon"), Summary::of(&srv)));
        }
    };
    for clients in [1usize, 16] {
        settle()?;
        let r = round(&socket, clients, per_client, &acquire, &release_it)?;
        add(format!("acquire (recycled pool), {clients} client(s)"), r);
        for (poll, how) in [(false, "client reads"), (true, "client polls")] {
            settle()?;
            let lean = || LeanClient::connect(&socket);
            let r = round_on(&lean, clients, per_client, &lean_acquire(poll), &lean_release)?;
            add(format!("acquire, lean protocol, {how}, {clients} client(s)"), r);
        }
    }
    for clients in [1usize, 16] {
        settle()?;
        let r = round(&socket, clients, per_client, &invoke(RECYCLED), &no_release)?;
        add(format!("invoke no-op, recycled clone, {clients} client(s)"), r);
    }
    // Calls further apart than the agent's longest spin after an answer: each finds the vCPU
    // parked; the host's CPU time over the round is what the clone costs between calls.
    settle()?;
    let busy_before = host_busy_ticks();
    let sparse = (per_client / 40).max(10);
    let pause = |_: &mut Client, _: &Timed| {
        std::thread::sleep(SPARSE_GAP);
        Ok(())
    };
    let r = round(&socket, 1, sparse, &invoke(RECYCLED), &pause)?;
    let busy_ms = host_busy_ticks().saturating_sub(busy_before) as f64 * 10.0;
    add(format!("invoke no-op, recycled clone, 1 client, a call every {} ms", SPARSE_GAP.as_millis()), r);
    let sparse_note = format!(
        "sparse round: the host's CPU busy {:.0} ms per call (all processes; /proc/stat, 10 ms ticks)",
        busy_ms / sparse as f64
    );
    // A fresh clone per call: its agent has parked the vCPU, so the call includes waking it.
    settle()?;
    let r = round(&socket, 1, per_client.min(pool as usize), &invoke(FRESH), &no_release)?;
    add("invoke no-op, fresh clone, 1 client".into(), r);
    let (fresh, recycled) = (sup.get(FRESH).map_err(|e| e.to_string())?, sup.get(RECYCLED).map_err(|e| e.to_string())?);
    daemon.stop();
    let notes = vec![
        format!(
            "cold starts: {} of {} handoffs (recycled pool), {} of {} (fresh pool)",
            recycled.cold_starts, recycled.handoffs, fresh.cold_starts, fresh.handoffs
        ),
        "round trip: request written -> response read by the client, HTTP/1.1 on a kept-alive Unix-socket connection"
            .into(),
        "lean protocol: a request line and a JSON answer line on a kept-open connection to the same socket; \
         'client polls': the client looks for the answer for up to 200 us before sleeping in its read"
            .into(),
        host_gaps(),
        sparse_note,
        "in the daemon: the server-timing header, request routed -> response built (axum middleware)".into(),
        "each round starts with full, quiet pools (clones done starting) and refills paused".into(),
    ];
    Ok(TableReport { title: "ember bench handoff".into(), heading: "latency (us)", width: 64, rows, notes })
}

/// How often the host took the core from a thread that only reads the clock, over half a second:
/// a request's time grows by such a gap whenever one falls inside it, so at that rate a p99 under
/// the gaps' length is out of reach on the host, whatever the daemon does.
fn host_gaps() -> String {
    let start = Instant::now();
    let (mut last, mut over_10, mut over_20, mut longest) = (start, 0u32, 0u32, Duration::ZERO);
    while last - start < Duration::from_millis(500) {
        let now = Instant::now();
        let gap = now - last;
        over_10 += u32::from(gap > Duration::from_micros(10));
        over_20 += u32::from(gap > Duration::from_micros(20));
        longest = longest.max(gap);
        last = now;
    }
    format!(
        "host: a thread that only reads the clock lost its core for over 10 us {} times/s, over 20 us {} times/s \
         (longest {:.0} us; measured over 0.5 s after the rounds)",
        over_10 * 2,
        over_20 * 2,
        longest.as_secs_f64() * 1e6
    )
}

/// Waits until `name`'s pool holds `pool` ready clones.
pub(super) fn wait_full(sup: &Arc<Supervisor>, name: &str, pool: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = sup.get(name).map_err(|e| e.to_string())?;
        if info.ready >= pool {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the {name} pool never filled ({} of {pool} ready)", info.ready));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host's busy time so far, every core's, in clock ticks (100/s): from the first line of
/// /proc/stat, user, nice, system, irq and softirq (not idle, iowait or time the hypervisor
/// stole). 0 when it cannot be read.
fn host_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
            Some([0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum())
        })
        .unwrap_or(0)
}

/// Waits until the host is nearly idle, every process counted: clones run in worker processes,
/// freshly restored clones spend their first moments reseeding (on some hosts seconds of emulated
/// guest work), and a clone's agent polls for a while after its last request before it parks,
/// which on a small host takes a core from whatever is measured next. Gives up after a minute,
/// saying so in the log.
pub(super) fn wait_quiet() {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = host_busy_ticks();
        std::thread::sleep(Duration::from_millis(500));
        let used = host_busy_ticks().saturating_sub(before);
        // Under 10% of one core over the half second.
        if used <= 5 {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!("the host stayed busy ({}% of a core) before a round: measured anyway", used * 2);
            return;
        }
    }
}
