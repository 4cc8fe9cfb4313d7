//! `ember bench handoff`: the latency of `POST /functions/{name}/acquire` (and of a no-op `invoke`) over the real API on a
//! Unix socket, with 1 and 16 concurrent clients, against a pool restored from an existing template.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::supervisor::Supervisor;
use crate::bench::{Summary, TableReport};

const FUNCTION: &str = "bench";

/// One request (with a JSON `body`) on a kept-alive connection; the status code.
fn request(s: &mut BufReader<UnixStream>, method: &str, path: &str, body: &str) -> std::io::Result<u16> {
    write!(
        s.get_mut(),
        "{method} {path} HTTP/1.1\r\nhost: ember\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // Read the head, then exactly content-length bytes of body.
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        if s.read_line(&mut head)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let head = head.to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    head.get(9..12).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("bad status line"))
}

/// Runs the benchmark on a copy of the template in `snapshot` (hard links), with `pool` ready
/// clones per round and `per_client` acquires per client.
pub fn handoff(snapshot: &Path, pool: u32, per_client: usize) -> Result<TableReport, String> {
    let dir = std::env::temp_dir().join(format!("ember-bench-handoff-{}", std::process::id()));
    let result = run(snapshot, &dir, pool, per_client);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(snapshot: &Path, dir: &Path, pool: u32, per_client: usize) -> Result<TableReport, String> {
    let fdir = dir.join("state/functions").join(FUNCTION);
    std::fs::create_dir_all(fdir.join("template")).map_err(|e| e.to_string())?;
    for f in [crate::snapshot::STATE_FILE, crate::snapshot::MEMORY_FILE] {
        std::fs::hard_link(snapshot.join(f), fdir.join("template").join(f))
            .or_else(|_| std::fs::copy(snapshot.join(f), fdir.join("template").join(f)).map(|_| ()))
            .map_err(|e| format!("{}: {e}", snapshot.join(f).display()))?;
    }
    let spec = serde_json::json!({
        "kernel": "/nonexistent", "initramfs": "/nonexistent",
        "pool": {"min_ready": pool, "max": pool * 2 + 16, "headroom": 1.0, "scale_in_delay_s": 3600.0},
    });
    std::fs::write(fdir.join("spec.json"), spec.to_string()).map_err(|e| e.to_string())?;
    let sup = Supervisor::open(&dir.join("state")).map_err(|e| e.to_string())?;
    let scaler = sup.start_scaling().map_err(|e| e.to_string())?;
    let socket = dir.join("api.sock");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket) }).map_err(|e| e.to_string())?;
    let app = super::api::router(sup.clone());
    let server = rt.spawn(async move { axum::serve(listener, app).await });

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for clients in [1usize, 16] {
        sup.pause_scaling(false);
        wait_full(&sup, pool)?;
        wait_quiet();
        // Refills would restore clones (guest work) beside the measurement: paused for the round.
        sup.pause_scaling(true);
        let n = per_client.min(pool as usize / clients).max(1);
        let samples: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..clients)
                .map(|_| {
                    let socket = socket.clone();
                    s.spawn(move || -> Result<Vec<f64>, String> {
                        let mut c = BufReader::new(UnixStream::connect(&socket).map_err(|e| e.to_string())?);
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            let t = Instant::now();
                            let code =
                                request(&mut c, "POST", "/functions/bench/acquire", "").map_err(|e| e.to_string())?;
                            v.push(t.elapsed().as_secs_f64() * 1e6);
                            if code != 200 {
                                return Err(format!("acquire answered {code}"));
                            }
                        }
                        Ok(v)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into()))).collect::<Result<_, _>>()
        })?;
        let all: Vec<f64> = samples.into_iter().flatten().collect();
        let info = sup.get(FUNCTION).map_err(|e| e.to_string())?;
        notes.push(format!("{clients} client(s): {} handoffs so far, {} cold starts", info.handoffs, info.cold_starts));
        rows.push((format!("acquire round trip, {clients} client(s), kept-alive connections"), Summary::of(&all)));
        release_all(&sup);
    }
    // End to end: acquire + a no-op (echo, empty payload) through the mailbox + release, one
    // client; each invocation gets a fresh clone whose agent has parked its vCPU, so the call
    // includes waking it.
    sup.pause_scaling(false);
    wait_full(&sup, pool)?;
    wait_quiet();
    sup.pause_scaling(true);
    let mut c = BufReader::new(UnixStream::connect(&socket).map_err(|e| e.to_string())?);
    let mut v = Vec::new();
    for _ in 0..per_client.min(pool as usize) {
        let t = Instant::now();
        let code =
            request(&mut c, "POST", "/functions/bench/invoke", r#"{"payload": ""}"#).map_err(|e| e.to_string())?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        if code != 200 {
            return Err(format!("invoke answered {code}"));
        }
    }
    rows.push(("invoke (no-op) end to end, 1 client".to_string(), Summary::of(&v)));
    server.abort();
    sup.shutdown();
    let _ = scaler.join();
    notes.push(
        "round trip measured by the client: request written -> response read, over HTTP/1.1 on the Unix socket; \
         the pool was full and quiet (clones done starting) and refills paused during each round"
            .into(),
    );
    Ok(TableReport { title: "ember bench handoff", heading: "handoff (us)", width: 58, rows, notes })
}

/// Waits until the pool holds `pool` ready clones (and their agents have had time to start).
fn wait_full(sup: &Arc<Supervisor>, pool: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = sup.get(FUNCTION).map_err(|e| e.to_string())?;
        if info.ready >= pool {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the pool never filled ({} of {pool} ready)", info.ready));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until this process (the clones' vCPUs included) is nearly idle: freshly restored clones
/// spend their first moments reseeding, which on some hosts is seconds of emulated guest work.
fn wait_quiet() {
    let cpu = || {
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<u64> = s.rsplit(')').next()?.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                Some(f.get(10)? + f.get(11)?)
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let before = cpu();
        std::thread::sleep(Duration::from_millis(500));
        // Clock ticks (100/s): under 5% of one core over the half second.
        if cpu() - before <= 2 {
            return;
        }
    }
}

fn release_all(sup: &Supervisor) {
    for id in sup.handed_ids() {
        let _ = sup.release(id);
    }
}
