//! Measurements behind `ember bench`. Figures are medians and tails over many runs, never asserted.

use std::fmt;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::devices::boot_timer::BootEvent;
use crate::vmm::{Channels, Vm, VmError};

/// Percentiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted `v` (0 < p <= 100).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// Writes a table of summaries, one row per measure, the first column `width` wide.
fn write_table<'a>(
    f: &mut fmt::Formatter<'_>,
    heading: &str,
    width: usize,
    rows: impl Iterator<Item = (&'a str, &'a Option<Summary>)>,
) -> fmt::Result {
    writeln!(f, "{heading:<width$} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10}", "n", "p50", "p90", "p99", "min", "max")?;
    for (name, s) in rows {
        match s {
            Some(s) => writeln!(
                f,
                "{name:<width$} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                s.n, s.p50, s.p90, s.p99, s.min, s.max
            )?,
            None => writeln!(f, "{name:<width$} {:>5}", 0)?,
        }
    }
    Ok(())
}

/// The result of `ember bench boot`.
pub struct BootReport {
    pub runs: usize,
    pub failures: Vec<String>,
    pub rows: Vec<(&'static str, Option<Summary>)>,
}

impl fmt::Display for BootReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ember bench boot: {} runs, {} failed", self.runs, self.failures.len())?;
        write_table(f, "milestone (ms)", 44, self.rows.iter().map(|(n, s)| (*n, s)))?;
        for e in &self.failures {
            writeln!(f, "failure: {e}")?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Boots `cfg` `runs` times (console off) and summarises where the time went.
pub fn boot(cfg: &VmConfig, runs: usize, timeout: Duration) -> Result<BootReport, VmError> {
    type Pick = fn(&BootEvent) -> f64;
    let mut first_insn = Vec::new();
    let mut setup = Vec::new();
    let mut kernel_start = Vec::new();
    let mut run_init = Vec::new();
    let mut timer = Vec::new();
    let mut timer_cpu = Vec::new();
    let mut failures = Vec::new();
    let since_vm: Pick = |e| ms(e.since_vm);
    for i in 0..runs {
        let start = Instant::now();
        let vm = Vm::boot(cfg, &Channels::default(), Box::new(std::io::sink()), start)?;
        let out = vm.run(Some(timeout))?;
        let t = out.timeline;
        if !out.exit.is_clean() {
            failures.push(format!("run {i}: {}", out.exit));
        }
        if let Some(e) = t.first_instruction {
            first_insn.push(ms(e.since_process));
            setup.push(since_vm(&e));
        }
        kernel_start.extend(t.kernel_start.as_ref().map(since_vm));
        run_init.extend(t.run_init.as_ref().map(since_vm));
        if let Some(e) = t.boot_timer {
            timer.push(since_vm(&e));
            timer_cpu.push(ms(e.cpu));
        }
    }
    Ok(BootReport {
        runs,
        failures,
        rows: vec![
            ("boot start -> first guest instruction", Summary::of(&first_insn)),
            ("VM start -> first guest instruction", Summary::of(&setup)),
            ("VM start -> kernel start (port 0x80)", Summary::of(&kernel_start)),
            ("VM start -> kernel runs init (port 0x80)", Summary::of(&run_init)),
            ("VM start -> boot timer (guest user space)", Summary::of(&timer)),
            ("CPU time (VMM + vCPUs) to boot timer", Summary::of(&timer_cpu)),
        ],
    })
}

/// The result of `ember bench restore` and `ember bench invoke`: a titled table and notes.
pub struct TableReport {
    pub title: &'static str,
    /// The first column's heading (with the unit) and width.
    pub heading: &'static str,
    pub width: usize,
    pub rows: Vec<(String, Option<Summary>)>,
    pub notes: Vec<String>,
}

impl fmt::Display for TableReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.title)?;
        write_table(f, self.heading, self.width, self.rows.iter().map(|(n, s)| (n.as_str(), s)))?;
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        Ok(())
    }
}

/// What `ember bench restore` does.
pub struct RestoreBench {
    /// Sequential restores, each timed to the clone's first guest instruction and first I/O.
    pub runs: usize,
    /// Clones restored and held at once (idle, not started) for the memory and throughput figures.
    pub clones: usize,
    /// How long to wait for one clone's first action.
    pub timeout: Duration,
}

/// Largest pool of populated idle clones `ember bench restore` holds.
const POPULATED_POOL: usize = 100;

/// The process's private memory (smaps_rollup Private_Clean + Private_Dirty), in KiB.
pub fn private_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Raises the soft open-file limit to the hard one: a thousand VMs hold a few thousand fds.
fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Boots `cfg` once to its ready doorbell (the baseline), snapshots it into `dir`, then measures
/// restores of that snapshot.
pub fn restore(cfg: &VmConfig, dir: &std::path::Path, b: &RestoreBench) -> Result<TableReport, VmError> {
    tracing::info!("booting the baseline guest to its ready doorbell");
    use crate::snapshot::{read_state, MemoryFile, SnapshotError, SnapshotPaths};
    use crate::vmm::RunOptions;
    raise_fd_limit();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // The baseline: a fresh boot of the same guest, to the same point (its ready doorbell).
    let start = Instant::now();
    let vm = Vm::boot(cfg, &Channels::default(), Box::new(std::io::sink()), start)?;
    let vm = vm.start(RunOptions { pause_on_ready: true, ..Default::default() })?;
    if !vm.wait_ready(b.timeout.max(Duration::from_secs(600))) {
        return Err(VmError::Ended(vm.exit().unwrap_or(crate::vmm::exit::VmExit::Stopped("timeout".into()))));
    }
    let boot_ms = ms(start.elapsed());
    let t = Instant::now();
    vm.pause()?;
    vm.snapshot(dir)?;
    let snap_ms = ms(t.elapsed());
    vm.stop("snapshot taken");
    rows.push(("fresh boot: VM start -> guest ready (1 run)".to_string(), Summary::of(&[boot_ms])));
    rows.push(("pause + snapshot (1 run)".to_string(), Summary::of(&[snap_ms])));

    let paths = SnapshotPaths::new(dir);
    let state = read_state(&paths)?;
    let memory = MemoryFile::open(&paths, state.machine.mem_bytes)?;
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(paths.memory()).map_err(|e| SnapshotError::Io(paths.memory(), e))?;
        notes.push(format!(
            "memory file: {} MiB guest RAM, {:.1} MiB allocated on disk (zero pages are holes)",
            m.len() >> 20,
            (m.blocks() * 512) as f64 / (1 << 20) as f64
        ));
    }

    // Sequential restores, each to the clone's first instruction and first observable action:
    // first as they come, then with the working set populated beforehand (as a pool does).
    let ws = crate::vmm::record_working_set(&state, &memory, Duration::from_secs(10))?;
    notes.push(format!(
        "working set: {} pages read, {} pages written (recorded from one clone's run)",
        ws.read_pages(),
        ws.written_pages()
    ));
    let mut to_io_p50 = [0.0; 2];
    tracing::info!("{} sequential restores, without and with the working set populated", b.runs);
    for (k, populate) in [false, true].into_iter().enumerate() {
        let label = if populate { " [working set populated]" } else { "" };
        let (mut restore_call, mut to_insn, mut to_io, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..b.runs {
            let t = Instant::now();
            let vm = Vm::restore(&state, &memory, i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
            let call = ms(t.elapsed());
            if populate {
                vm.populate(&ws).map_err(VmError::WorkingSet)?;
            }
            // The clock for "restore ->" starts at the restore call; populating happens in the
            // pool before handoff, so it is left out of the latency.
            let populate_ms = if populate { ms(t.elapsed()) - call } else { 0.0 };
            restore_call.push(call);
            let vm = vm.start(RunOptions::default())?;
            let deadline = Instant::now() + b.timeout;
            let timeline = loop {
                let tl = vm.timeline();
                if tl.first_io.is_some() || Instant::now() > deadline || vm.exit().is_some() {
                    break tl;
                }
                std::thread::yield_now();
            };
            match (timeline.first_instruction, timeline.first_io) {
                (Some(a), Some(io)) => {
                    to_insn.push(ms(a.since_vm) - populate_ms);
                    to_io.push(ms(io.since_vm) - populate_ms);
                }
                _ => failed += 1,
            }
            vm.stop("measured");
        }
        if !populate {
            rows.push(("restore: Vm::restore call (new VM, state loaded)".to_string(), Summary::of(&restore_call)));
        }
        rows.push((format!("restore -> vCPU enters the guest{label}"), Summary::of(&to_insn)));
        rows.push((format!("restore -> guest's first I/O{label}"), Summary::of(&to_io)));
        if failed > 0 {
            notes.push(format!("{failed} restores{label} did not reach a first action within the timeout"));
        }
        to_io_p50[k] = Summary::of(&to_io).map(|s| s.p50).unwrap_or(f64::NAN);
    }
    notes.push(format!(
        "fresh boot to ready / restore to first action (p50): {:.0}x; with the working set populated: {:.0}x",
        boot_ms / to_io_p50[0],
        boot_ms / to_io_p50[1]
    ));

    // Many clones at once, restored and held idle as a pool holds them: without and with the
    // working set populated.
    for populate in [false, true] {
        // Populated clones hold private copies of the written pages, and unmapping a thousand
        // populated mappings of one file is slow here: a smaller pool gives the per-clone figure.
        let n = if populate { b.clones.min(POPULATED_POOL) } else { b.clones };
        if n == 0 {
            break;
        }
        tracing::info!("holding {n} idle clones{}", if populate { " with the working set populated" } else { "" });
        let before = private_kib();
        let t = Instant::now();
        let mut pool = Vec::with_capacity(n);
        for i in 0..n {
            let vm = Vm::restore(&state, &memory, i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
            if populate {
                vm.populate(&ws).map_err(VmError::WorkingSet)?;
            }
            pool.push(vm);
        }
        let total = t.elapsed();
        let private = private_kib().saturating_sub(before);
        notes.push(format!(
            "{} idle clones{} restored in {:.1} ms ({:.0} clones/s); private memory {:.1} KiB per clone",
            n,
            if populate { " with the working set populated" } else { "" },
            ms(total),
            n as f64 / total.as_secs_f64(),
            private as f64 / n as f64
        ));
        drop(pool);
    }
    Ok(TableReport { title: "ember bench restore", heading: "measure (ms)", width: 52, rows, notes })
}

/// What `ember bench invoke` measures.
pub struct InvokeBench {
    /// Invocations per mailbox mode.
    pub calls: usize,
    /// Invocations over vsock (each crosses the guest kernel).
    pub vsock_calls: usize,
    /// Invocations of a clone whose agent has gone idle (each waits for the agent to park).
    pub idle_calls: usize,
    pub timeout: Duration,
}

/// Connects to the agent over vsock, retrying while its listener is not up yet (a fresh clone
/// starts it after reseeding).
fn connect_agent(sock: &std::path::Path, timeout: Duration) -> Result<crate::vsock::AgentConnection, String> {
    let deadline = Instant::now() + timeout.max(Duration::from_secs(60));
    loop {
        match crate::vsock::AgentConnection::connect(sock, timeout) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The guest's CPU ticks (user+nice, kernel incl. interrupts, idle), from the agent's `cpu-stat`.
fn guest_cpu(vm: &crate::vmm::RunningVm, timeout: Duration) -> Result<[u64; 3], String> {
    let opts = crate::mailbox::CallOptions { timeout, ..Default::default() };
    let r = vm.invoke("cpu-stat", b"", opts).map_err(|e| e.to_string())?;
    let v: Vec<u64> = String::from_utf8_lossy(&r.payload).split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match v[..] {
        [user, nice, system, idle, iowait, irq, softirq] => Ok([user + nice, system + irq + softirq, idle + iowait]),
        _ => Err(format!("cpu-stat answered {:?}", String::from_utf8_lossy(&r.payload))),
    }
}

/// Restores a serving clone of the snapshot in `dir` and times invocations on each channel.
pub fn invoke(dir: &std::path::Path, b: &InvokeBench) -> Result<TableReport, VmError> {
    use crate::snapshot::{read_state, MemoryFile, SnapshotPaths};
    use crate::vmm::RunOptions;
    let paths = SnapshotPaths::new(dir);
    let state = read_state(&paths)?;
    let memory = MemoryFile::open(&paths, state.machine.mem_bytes)?;
    let scratch = std::env::temp_dir().join(format!("ember-bench-invoke-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(VmError::WorkingSet)?;
    let sock = scratch.join("vsock");
    let channels = Channels { serve: true, vsock: Some(sock.clone()), ..Default::default() };
    let vm = Vm::restore(&state, &memory, 1, &channels, Box::new(std::io::sink()));
    let vm = vm.and_then(|vm| vm.start(RunOptions::default()));
    let report = vm.and_then(|vm| invoke_channels(vm, &sock, b));
    let _ = std::fs::remove_dir_all(&scratch);
    report
}

/// Which way `ember bench invoke` calls the agent.
#[derive(Clone, Copy)]
enum Channel {
    MailboxPolled,
    MailboxDoorbell,
    Vsock,
}

fn invoke_channels(vm: crate::vmm::RunningVm, sock: &std::path::Path, b: &InvokeBench) -> Result<TableReport, VmError> {
    use crate::mailbox::CallOptions;
    let failed = |what: &str, e: &dyn fmt::Display| VmError::Devices(format!("{what}: {e}"));
    // The first call waits for the clone to take its seed and start serving.
    let t = Instant::now();
    vm.invoke("echo", b"", CallOptions { timeout: b.timeout.max(Duration::from_secs(60)), ..Default::default() })
        .map_err(|e| failed("the clone never answered", &e))?;
    let mut rows = vec![(
        "restore -> first answer (1 run, includes reseeding)".to_string(),
        Summary::of(&[ms(t.elapsed()) * 1e3]),
    )];
    let mut notes = Vec::new();
    let us = |d: Duration| d.as_secs_f64() * 1e6;

    for channel in [Channel::MailboxPolled, Channel::MailboxDoorbell, Channel::Vsock] {
        let (label, calls) = match channel {
            Channel::MailboxPolled => ("mailbox, host polls the response", b.calls),
            Channel::MailboxDoorbell => ("mailbox, response doorbell (exit)", b.calls),
            Channel::Vsock => ("vsock (one connection, kept open)", b.vsock_calls),
        };
        let mut conn = match channel {
            Channel::Vsock => Some(connect_agent(sock, b.timeout).map_err(|e| failed("vsock", &e))?),
            _ => None,
        };
        let opts = CallOptions {
            timeout: b.timeout,
            doorbell: matches!(channel, Channel::MailboxDoorbell),
            ..Default::default()
        };
        let before = guest_cpu(&vm, b.timeout).map_err(|e| failed("cpu-stat", &e))?;
        let mut v = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let r = match &mut conn {
                Some(c) => c.call("echo", b"").map_err(|e| failed(label, &e))?,
                None => vm.invoke("echo", b"", opts).map_err(|e| failed(label, &e))?,
            };
            v.push(us(t.elapsed()));
            if r.status != ember_abi::Status::Ok {
                return Err(failed(label, &r.status.describe()));
            }
        }
        let after = guest_cpu(&vm, b.timeout).map_err(|e| failed("cpu-stat", &e))?;
        let d: Vec<u64> = (0..3).map(|i| after[i].saturating_sub(before[i])).collect();
        let total = (d[0] + d[1] + d[2]).max(1);
        notes.push(format!(
            "{label}: guest CPU during the run: {:.1}% user, {:.1}% kernel (incl. interrupts), {:.1}% idle ({} ticks)",
            100.0 * d[0] as f64 / total as f64,
            100.0 * d[1] as f64 / total as f64,
            100.0 * d[2] as f64 / total as f64,
            total
        ));
        rows.push((label.to_string(), Summary::of(&v)));
    }

    if b.idle_calls > 0 {
        // The agent parks the vCPU host-side after 100 ms without a request; the next request
        // wakes it.
        let opts = CallOptions { timeout: b.timeout, ..Default::default() };
        let mut v = Vec::with_capacity(b.idle_calls);
        for _ in 0..b.idle_calls {
            std::thread::sleep(Duration::from_millis(150));
            let t = Instant::now();
            vm.invoke("echo", b"", opts).map_err(|e| failed("idle clone", &e))?;
            v.push(us(t.elapsed()));
        }
        rows.push(("mailbox, clone idle 150 ms (vCPU parked host-side)".to_string(), Summary::of(&v)));
    }
    let p50 = |i: usize| rows.get(i).and_then(|r| r.1).map(|s| s.p50).unwrap_or(f64::NAN);
    notes.push(format!("doorbell / polled (p50): {:.1}x; vsock / polled: {:.0}x", p50(2) / p50(1), p50(3) / p50(1)));
    vm.stop("measured");
    Ok(TableReport {
        title: "ember bench invoke: round trip of a no-op invocation (echo, empty payload) on a warm clone",
        heading: "round trip (us)",
        width: 58,
        rows,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.min, s.max), (50.0, 90.0, 99.0, 1.0, 100.0));
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.p50, s.p99), (2.0, 3.0));
        assert!(Summary::of(&[]).is_none());
    }
}
