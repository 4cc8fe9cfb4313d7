//! `ember bench restore`: a fresh boot to the agent's "ready" (the baseline) and its snapshot,
//! then sequential restores of that template timed to the clone's first actions, and many idle
//! clones held at once (density and private memory).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{ms, BenchError, Summary, TableReport};
use crate::config::VmConfig;
use crate::snapshot::SnapshotError;
use crate::template::{MakeOptions, Template};
use crate::vmm::{Channels, RunOptions, VmError};

/// What `ember bench restore` does.
pub struct RestoreBench {
    /// Sequential restores, each timed to the clone's first guest instruction and first I/O.
    pub runs: usize,
    /// Clones restored and held at once (idle, not started) for the memory and throughput figures.
    pub clones: usize,
    /// How long to wait for one clone's first action.
    pub timeout: Duration,
    /// Restore the template already in the directory instead of booting one (no baseline).
    pub existing: bool,
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

/// Boots `cfg` once to its ready doorbell (the baseline), snapshots it into `dir`, then measures
/// restores of that snapshot.
pub fn restore(cfg: &VmConfig, dir: &Path, b: &RestoreBench) -> Result<TableReport, BenchError> {
    crate::sys::raise_fd_limit();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // The baseline: a fresh boot of the same guest, to the same point (its ready doorbell).
    let (template, boot_ms, working_set) = if b.existing {
        notes.push(format!("restoring the existing template {} (no fresh boot measured)", dir.display()));
        let template = Template::open(dir)?;
        let ws = template.working_set()?;
        (template, f64::NAN, ws)
    } else {
        tracing::info!("booting the baseline guest to its ready doorbell");
        let opts = MakeOptions { timeout: b.timeout.max(Duration::from_secs(600)), ..Default::default() };
        let made = Template::make(cfg, dir, opts)?;
        rows.push(("fresh boot: VM start -> guest ready (1 run)".to_string(), Summary::of(&[ms(made.ready)])));
        rows.push(("pause + snapshot (1 run)".to_string(), Summary::of(&[ms(made.pause + made.save)])));
        (made.template, ms(made.ready), made.working_set)
    };
    let paths = &template.paths;
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
    let ws = match working_set {
        Some(ws) => ws,
        None => return Err(BenchError::Failed("the template has no working set".into())),
    };
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
            let vm = template.restore(i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
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
    if !b.existing {
        notes.push(format!(
            "fresh boot to ready / restore to first action (p50): {:.0}x; with the working set populated: {:.0}x",
            boot_ms / to_io_p50[0],
            boot_ms / to_io_p50[1]
        ));
    }

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
        let mut each = Vec::with_capacity(n);
        for i in 0..n {
            let one = Instant::now();
            let vm = template.restore(i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
            if populate {
                vm.populate(&ws).map_err(VmError::WorkingSet)?;
            }
            each.push(ms(one.elapsed()));
            pool.push(vm);
        }
        let total = t.elapsed();
        if !populate && n >= 200 {
            // Whether a restore costs more with many VMs in the process.
            let tenth = n / 10;
            rows.push((format!("restore call, the first {tenth} of {n} held clones"), Summary::of(&each[..tenth])));
            rows.push((format!("restore call, the last {tenth} of {n} held clones"), Summary::of(&each[n - tenth..])));
        }
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
    Ok(TableReport { title: "ember bench restore".into(), heading: "measure (ms)", width: 52, rows, notes })
}
