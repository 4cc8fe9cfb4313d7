//! `ember bench restore`: a fresh boot to the agent's "ready" (the baseline) and its snapshot,
//! then sequential restores of that template timed to the clone's first actions, and many idle
//! clones held at once (density and private memory).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{ms, BenchError, Summary, TableReport};
use crate::config::VmConfig;
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::SnapshotError;
use crate::template::{MakeOptions, Template};
use crate::vmm::shell::{ShellMaker, ShellSpec, VmShell};
use crate::vmm::{Channels, RunOptions, Vm, VmError};

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
    /// Processes the last held-clones round spreads its clones over (0 or 1: no such round).
    pub processes: usize,
}

/// Serving clones `ember bench restore` follows to their first park (at most).
const SERVING_RUNS: usize = 50;
/// Largest pool of populated idle clones `ember bench restore` holds.
const POPULATED_POOL: usize = 100;
/// Shells the held-clones round keeps made ahead.
const SHELLS_AHEAD: usize = 16;

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
    if template.timer_was_due() {
        notes.push(
            "the guest's timer (its tick) was due when the template was saved: each clone takes that interrupt \
             before its first action"
                .to_string(),
        );
    }
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
    tracing::info!(
        "{} sequential restores each: VM made in the call, into a VM shell made ahead, and with the working set populated",
        b.runs
    );
    let spec = template.shell_spec();
    let mut shell_made = Vec::new();
    for (k, (ahead, populate)) in [(false, false), (true, false), (true, true)].into_iter().enumerate() {
        let label = match (ahead, populate) {
            (false, _) => " [VM made in the call]",
            (true, false) => " [VM shell made ahead]",
            (true, true) => " [shell made ahead, working set populated]",
        };
        let (mut restore_call, mut to_insn, mut to_io, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for i in 0..b.runs {
            let shell = match ahead {
                true => {
                    let t = Instant::now();
                    let shell = VmShell::new(&spec)?;
                    shell_made.push(ms(t.elapsed()));
                    Some(shell)
                }
                false => None,
            };
            let t = Instant::now();
            let vm = template.restore_in(shell, i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
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
            rows.push((format!("restore: Vm::restore call{label}"), Summary::of(&restore_call)));
        }
        if ahead && !populate {
            rows.push(("VM shell made (off the restore path)".to_string(), Summary::of(&shell_made)));
        }
        rows.push((format!("restore -> vCPU enters the guest{label}"), Summary::of(&to_insn)));
        rows.push((format!("restore -> guest's first I/O{label}"), Summary::of(&to_io)));
        if failed > 0 {
            notes.push(format!("{failed} restores{label} did not reach a first action within the timeout"));
        }
        if k < 2 {
            to_io_p50[k] = Summary::of(&to_io).map(|s| s.p50).unwrap_or(f64::NAN);
        }
    }
    notes.push(format!(
        "restore -> first I/O, VM made in the call / shell made ahead (p50): {:.2}x",
        to_io_p50[0] / to_io_p50[1]
    ));
    if !b.existing {
        notes.push(format!(
            "fresh boot to ready / restore to first action (p50): {:.0}x with the VM made in the call, {:.0}x into a shell made ahead",
            boot_ms / to_io_p50[0],
            boot_ms / to_io_p50[1]
        ));
    }

    confinement(b.runs, &mut rows, &mut notes)?;
    serving_clones(&template, b, &mut rows, &mut notes)?;

    // Many clones at once, restored and held idle as a pool holds them: with the VM made in each
    // call, into shells made on a second thread meanwhile (a pool's steady state), into shells
    // all made before the clock, and with the working set populated.
    for (source, populate) in
        [(Shells::None, false), (Shells::Maker, false), (Shells::Ahead, false), (Shells::None, true)]
    {
        // Populated clones hold private copies of the written pages, and unmapping a thousand
        // populated mappings of one file is slow here: a smaller pool gives the per-clone figure.
        let n = if populate { b.clones.min(POPULATED_POOL) } else { b.clones };
        if n == 0 {
            break;
        }
        let label = match (source, populate) {
            (Shells::Maker, _) => " [shells made on a second thread]",
            (Shells::Ahead, _) => " [shells all made ahead]",
            (Shells::None, true) => " with the working set populated",
            (Shells::None, false) => " [VM made in each call]",
        };
        tracing::info!("holding {n} idle clones{label}");
        let before = private_kib();
        // A thread of its own keeps some shells ready (started before the clock, its first
        // shells ready; then it makes them while the clones are restored).
        let maker = match source {
            Shells::Maker => {
                let m = ShellMaker::start(spec.clone(), SHELLS_AHEAD).map_err(|e| BenchError::Failed(e.to_string()))?;
                if !m.wait_ready(SHELLS_AHEAD, b.timeout) {
                    return Err(BenchError::Failed(format!("no VM shells made: {:?}", m.last_error())));
                }
                Some(m)
            }
            _ => None,
        };
        let (mut ahead, shells_made) = match source {
            Shells::Ahead => make_shells(&spec, n)?,
            _ => (Vec::new(), Duration::ZERO),
        };
        let shells_kib = private_kib().saturating_sub(before);
        let t = Instant::now();
        let mut take = || match &maker {
            Some(m) => m.take(),
            None => ahead.pop(),
        };
        let (pool, each, made_in_call) = restore_held(&template, n, populate.then_some(&ws), &mut take)?;
        let total = t.elapsed();
        drop(maker);
        if !populate && n >= 200 && source != Shells::Ahead {
            // Whether a restore costs more with many VMs in the process.
            let tenth = n / 10;
            let first = format!("restore call, the first {tenth} of {n} held clones{label}");
            rows.push((first, Summary::of(&each[..tenth])));
            rows.push((
                format!("restore call, the last {tenth} of {n} held clones{label}"),
                Summary::of(&each[n - tenth..]),
            ));
        } else if source == Shells::Ahead {
            rows.push((format!("restore call, {n} clones held{label}"), Summary::of(&each)));
        }
        let private = private_kib().saturating_sub(before);
        notes.push(format!(
            "{n} idle clones{label} restored in {:.1} ms ({:.0} clones/s); private memory {:.1} KiB per clone{}",
            ms(total),
            n as f64 / total.as_secs_f64(),
            private as f64 / n as f64,
            match source {
                Shells::Maker => format!("; {made_in_call} restores found no shell ready and made their VM"),
                Shells::Ahead => format!(
                    " ({:.1} KiB of it the shells'); the {n} shells made before the clock in {:.1} ms",
                    shells_kib as f64 / n as f64,
                    ms(shells_made)
                ),
                Shells::None => String::new(),
            }
        ));
        drop(pool);
    }
    if b.processes > 1 && b.clones > 0 {
        for ahead in [false, true] {
            held_over_processes(&template.paths.dir, b, ahead, &mut rows, &mut notes)?;
        }
    }
    Ok(TableReport { title: "ember bench restore".into(), heading: "measure (ms)", width: 52, rows, notes })
}

/// Where the held clones' VMs come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shells {
    /// Made in each restore call.
    None,
    /// Shells made on a second thread while the clones are restored.
    Maker,
    /// Shells all made before the clock.
    Ahead,
}

/// Confining a new thread with a vCPU thread's filter (each vCPU and device thread does, a VM
/// shell twice): ember's program, which finds a call by a search on its number, against
/// seccompiler's linear program for the same rules (the kernel runs a new filter once per call
/// number when it is installed), in alternation, `runs` times each.
fn confinement(
    runs: usize,
    rows: &mut Vec<(String, Option<Summary>)>,
    notes: &mut Vec<String>,
) -> Result<(), BenchError> {
    let filters = [crate::seccomp::vcpu_filter_linear(3), crate::seccomp::vcpu_filter(3)];
    let [linear, searched] = filters.map(|f| f.map_err(|e| BenchError::Failed(format!("vCPU filter: {e}"))));
    let (linear, searched) = (std::sync::Arc::new(linear?), std::sync::Arc::new(searched?));
    let time = |filter: &std::sync::Arc<seccompiler::BpfProgram>| -> Result<f64, BenchError> {
        let filter = filter.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            crate::seccomp::apply(&filter).map(|()| ms(t.elapsed()))
        })
        .join()
        .map_err(|_| BenchError::Failed("a confined thread panicked".into()))?
        .map_err(|e| BenchError::Failed(format!("confining a thread: {e}")))
    };
    let (mut each_linear, mut each_searched) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        each_linear.push(time(&linear)?);
        each_searched.push(time(&searched)?);
    }
    let (l, s) = (Summary::of(&each_linear), Summary::of(&each_searched));
    if let (Some(l), Some(s)) = (&l, &s) {
        notes.push(format!("confining a thread, linear / searched filter (p50): {:.1}x", l.p50 / s.p50));
    }
    rows.push((format!("confining a thread, vCPU filter: linear program ({} insns, baseline)", linear.len()), l));
    rows.push((format!("confining a thread, vCPU filter: searched ({} insns)", searched.len()), s));
    Ok(())
}

/// `n` shells for `spec`, and how long making them took.
fn make_shells(spec: &ShellSpec, n: usize) -> Result<(Vec<VmShell>, Duration), BenchError> {
    let t = Instant::now();
    let shells = (0..n).map(|_| VmShell::new(spec)).collect::<Result<Vec<_>, _>>()?;
    Ok((shells, t.elapsed()))
}

/// Clones that serve, as a pool's do (their console discarded), one at a time: restore -> the
/// agent parks its vCPU (rings the idle doorbell), and the process's CPU time over that span,
/// nearly all of it the clone's guest running from the snapshot point to its first park.
fn serving_clones(
    template: &Template,
    b: &RestoreBench,
    rows: &mut Vec<(String, Option<Summary>)>,
    notes: &mut Vec<String>,
) -> Result<(), BenchError> {
    use crate::devices::boot_timer::process_cpu_time;
    let n = b.runs.min(SERVING_RUNS);
    tracing::info!("{n} serving clones, each to its first park");
    let (mut to_park, mut cpu, mut failed) = (Vec::new(), Vec::new(), 0);
    let channels = Channels { serve: true, quiet: true, ..Default::default() };
    for i in 0..n {
        let (t, c) = (Instant::now(), process_cpu_time());
        let vm = template.restore_in(None, i as u64 + 1, &channels, Box::new(std::io::sink()))?;
        let vm = vm.start(RunOptions::default())?;
        let mailbox = vm.mailbox();
        let deadline = t + b.timeout;
        while !mailbox.agent_idle() && Instant::now() < deadline && vm.exit().is_none() {
            std::thread::sleep(Duration::from_micros(50));
        }
        if mailbox.agent_idle() {
            to_park.push(ms(t.elapsed()));
            cpu.push(ms(process_cpu_time().saturating_sub(c)));
        } else {
            failed += 1;
        }
        vm.stop("measured");
    }
    rows.push(("serving clone: restore -> agent parks its vCPU".to_string(), Summary::of(&to_park)));
    rows.push(("serving clone: CPU time, restore -> park".to_string(), Summary::of(&cpu)));
    if failed > 0 {
        notes.push(format!("{failed} serving clones did not park within the timeout"));
    }
    Ok(())
}

/// Restores `n` idle clones of `template` and holds them: each into the shell `take` gives, if
/// any (else the restore makes its VM), populated with `ws` when given. Returns the clones, each
/// one's time in ms (restore and populating), and how many made their VM.
fn restore_held(
    template: &Template,
    n: usize,
    ws: Option<&WorkingSet>,
    take: &mut dyn FnMut() -> Option<VmShell>,
) -> Result<(Vec<Vm>, Vec<f64>, usize), BenchError> {
    let (mut pool, mut each, mut made) = (Vec::with_capacity(n), Vec::with_capacity(n), 0);
    for i in 0..n {
        let one = Instant::now();
        let shell = take();
        made += usize::from(shell.is_none());
        let vm = template.restore_in(shell, i as u64 + 1, &Channels::default(), Box::new(std::io::sink()))?;
        if let Some(ws) = ws {
            vm.populate(ws).map_err(VmError::WorkingSet)?;
        }
        each.push(ms(one.elapsed()));
        pool.push(vm);
    }
    Ok((pool, each, made))
}

/// The held-clones round spread over `b.processes` processes (`ember bench hold-clones`), each
/// restoring its share: into shells all made before the clock (`ahead`) or with the VM made in
/// each call. In one process every VM makes some of the next one's work dearer (KVM_CREATE_VM,
/// and whatever runs the process's MMU notifiers, one per VM).
fn held_over_processes(
    dir: &Path,
    b: &RestoreBench,
    ahead: bool,
    rows: &mut Vec<(String, Option<Summary>)>,
    notes: &mut Vec<String>,
) -> Result<(), BenchError> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let failed = |what: String| BenchError::Failed(what);
    let (n, p) = (b.clones, b.processes.min(b.clones));
    let label = match ahead {
        true => format!(" [over {p} processes, shells all made ahead]"),
        false => format!(" [over {p} processes, VM made in each call]"),
    };
    tracing::info!("holding {n} idle clones{label}");
    let exe = std::env::current_exe().map_err(|e| failed(format!("this program's path: {e}")))?;
    let started = Instant::now();
    let mut children = Vec::with_capacity(p);
    for i in 0..p {
        let share = n / p + usize::from(i < n % p);
        let shells = if ahead { share } else { 0 };
        let mut child = Command::new(&exe)
            .args(["bench", "hold-clones", "--clones", &share.to_string(), "--shells", &shells.to_string()])
            .arg("--template")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", exe.display())))?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed("a child without pipes".into()));
        };
        children.push((child, input, BufReader::new(output)));
    }
    let line = |r: &mut BufReader<std::process::ChildStdout>| -> Result<String, BenchError> {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) => Err(failed("a holding process ended early (its error is above)".into())),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(failed(format!("reading a holding process: {e}"))),
        }
    };
    let mut shells_kib = 0u64;
    for (_, _, r) in children.iter_mut() {
        let l = line(r)?;
        let mut words = l.split_whitespace();
        if words.next() != Some("ready") {
            return Err(failed(format!("a holding process said {l:?}")));
        }
        shells_kib += words.next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
    }
    let prepared = started.elapsed();
    let t = Instant::now();
    for (_, w, _) in children.iter_mut() {
        w.write_all(b"go\n").map_err(|e| failed(format!("starting a holding process: {e}")))?;
    }
    let (mut each, mut private, mut whole, mut made) = (Vec::with_capacity(n), 0u64, 0u64, 0u64);
    for (_, _, r) in children.iter_mut() {
        let l = line(r)?;
        let mut words = l.split_whitespace();
        if words.next() != Some("done") {
            return Err(failed(format!("a holding process said {l:?}")));
        }
        let mut number = || words.next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
        private += number();
        whole += number();
        made += number();
        each.extend(words.filter_map(|w| w.parse::<f64>().ok()));
    }
    let total = t.elapsed();
    for (mut child, w, _) in children {
        drop(w);
        let _ = child.wait();
    }
    rows.push((format!("restore call, {n} clones held{label}"), Summary::of(&each)));
    let shells = match ahead {
        true => format!(
            "; the processes started and made their shells ({:.1} KiB each) before the clock in {:.1} ms",
            shells_kib as f64 / n as f64,
            ms(prepared)
        ),
        false => String::new(),
    };
    notes.push(format!(
        "{n} idle clones{label} restored in {:.1} ms ({:.0} clones/s); private memory {:.1} KiB per clone \
         ({:.1} KiB with the processes' own and the shells'); {made} restores made their VM{shells}",
        ms(total),
        n as f64 / total.as_secs_f64(),
        private as f64 / n as f64,
        whole as f64 / n as f64,
    ));
    Ok(())
}

/// `ember bench hold-clones`: one process of `held_over_processes`. Opens the template and makes
/// `shells` VM shells, says `ready SHELLS_KIB` (the private memory they took); on `go` restores
/// `clones` clones (into those shells while there are some, else making each VM in the call)
/// and holds them, says `done`, and holds them until its input closes. `done` says
/// `PRIVATE_KIB TOTAL_KIB MADE MS...`: private memory grown by the restores and in all, restores
/// that made their VM, each restore call.
pub fn hold_clones(dir: &Path, clones: usize, shells: usize) -> Result<(), BenchError> {
    use std::io::{BufRead, Write};
    crate::sys::raise_fd_limit();
    let template = Template::open(dir)?;
    let before = private_kib();
    let (mut ahead, _) = make_shells(&template.shell_spec(), shells)?;
    let io = |e: std::io::Error| BenchError::Failed(format!("talking to the benchmark: {e}"));
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", private_kib().saturating_sub(before)).and_then(|_| out.flush()).map_err(io)?;
    let mut input = std::io::stdin().lock();
    let mut go = String::new();
    if input.read_line(&mut go).map_err(io)? == 0 {
        return Ok(());
    }
    let before = private_kib();
    let (pool, each, made) = restore_held(&template, clones, None, &mut || ahead.pop())?;
    let each: String = each.iter().map(|ms| format!(" {ms:.4}")).collect();
    let now = private_kib();
    writeln!(out, "done {} {now} {made}{each}", now.saturating_sub(before)).and_then(|_| out.flush()).map_err(io)?;
    // Held until the benchmark is done with every process.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut input, &mut rest);
    drop(pool);
    Ok(())
}
