//! `ember restore`: run clones of a template.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use ember::devices::serial::ConsoleOut;
use ember::template::Template;
use ember::vmm::exit::VmExit;
use ember::vmm::shell::ShellMaker;
use ember::vmm::RunningVm;

use super::args::ChannelArgs;
use super::console::{console, SharedConsole};
use super::signals::{handle_stop_signals, stop_requested};
use super::{exit_status, severity, status_severity, timeout};

#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// The snapshot directory.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// How many clones to run at once.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clones: u32,
    /// Spread the clones over this many processes, each restoring and running its share: in one
    /// process every VM makes the next one dearer to restore (see README, Benchmarks).
    #[arg(long, value_name = "P", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    processes: u32,
    /// The first clone's id (each process that --processes starts has its own range).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    first_id: Option<u64>,
    /// Where the clones' consoles go: stdout, off, or a file path (appended to).
    #[arg(long, value_name = "PATH|stdout|off", default_value = "stdout")]
    console: String,
    /// Stop a clone (exit status 4) if its guest has not ended it after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Do not confine the vCPU and device threads with seccomp (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Populate the snapshot's recorded working set into each clone (host side) before starting it.
    /// Off by default: on hosts whose KVM emulates guest kernel mode it made a clone's first action
    /// slower, not faster (see README, Benchmarks).
    #[arg(long)]
    populate: bool,
    #[command(flatten)]
    channels: ChannelArgs,
}

pub(crate) fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let timeout = timeout(args.timeout)?;
    args.channels.check_clones(args.clones)?;
    let template = Template::open(&args.snapshot).map_err(|e| e.to_string())?;
    if args.processes > 1 && args.clones > 1 {
        drop(template);
        return spread(&args);
    }
    let ws = match args.populate {
        false => None,
        true => template.working_set().map_err(|e| e.to_string())?,
    };
    handle_stop_signals()?;
    let shared = Arc::new(Mutex::new(console(&args.console)?));
    let mut running = Vec::new();
    // Several clones: their VMs are made ahead on a second thread while earlier ones restore.
    let shells = match args.clones > 1 {
        true => Some(ShellMaker::start(template.shell_spec(), 4).map_err(|e| format!("VM shells: {e}"))?),
        false => None,
    };
    // One of several processes' share (--first-id given) is prefixed like several clones.
    let several = args.clones > 1 || args.first_id.is_some();
    let first_id = args.first_id.unwrap_or(1);
    for id in first_id..first_id + u64::from(args.clones) {
        let prefix = several.then(|| format!("[clone {id}] "));
        let out: ConsoleOut = Box::new(SharedConsole::new(shared.clone(), prefix));
        let t = Instant::now();
        let mut channels = args.channels.for_vm(Some(id), args.no_seccomp)?;
        channels.quiet = args.console == "off";
        let shell = shells.as_ref().and_then(ShellMaker::take);
        let vm = template.restore_in(shell, id, &channels, out).map_err(|e| format!("clone {id}: {e}"))?;
        if let Some(ws) = &ws {
            vm.populate(ws).map_err(|e| format!("clone {id}: cannot populate the working set: {e}"))?;
        }
        let options = ember::vmm::RunOptions { seccomp: !args.no_seccomp, ..Default::default() };
        running.push(vm.start(options).map_err(|e| format!("clone {id}: {e}"))?);
        tracing::debug!("clone {id} restored and started in {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    drop(shells);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut worst: Option<VmExit> = None;
    let mut running: Vec<(usize, RunningVm)> = running.into_iter().enumerate().collect();
    while !running.is_empty() {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let stop = stop_requested();
        let mut still = Vec::with_capacity(running.len());
        for (i, vm) in running {
            let exit = if let Some(sig) = stop {
                vm.stop(sig);
                VmExit::StoppedBySignal(sig.to_string())
            } else if vm.exit().is_some() || left == Some(Duration::ZERO) {
                vm.wait(Some(Duration::ZERO)).exit
            } else {
                still.push((i, vm));
                continue;
            };
            if !exit.is_clean() {
                eprintln!("ember: clone {}: {exit}", first_id + i as u64);
            }
            if worst.as_ref().is_none_or(|w| severity(&exit) > severity(w)) {
                worst = Some(exit);
            }
        }
        running = still;
        if let Some((_, vm)) = running.first() {
            vm.poll(left.unwrap_or(Duration::MAX).min(Duration::from_millis(20)));
        }
    }
    Ok(worst.map(|w| exit_status(&w)).unwrap_or(ExitCode::SUCCESS))
}

/// `--processes P`: this program again in P processes, each with its share of the clones and ids
/// (the same arguments otherwise). Stop signals are passed on; a process that dies takes its own
/// clones only. The exit status is the worst of theirs.
fn spread(args: &RestoreArgs) -> Result<ExitCode, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    // This process's arguments without the ones each process gets its own value of.
    let mut own = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        let s = a.to_string_lossy();
        if ["--clones", "--processes", "--first-id"].contains(&s.as_ref()) {
            skip = true;
        } else if !["--clones=", "--processes=", "--first-id="].iter().any(|p| s.starts_with(p)) {
            own.push(a);
        }
    }
    handle_stop_signals()?;
    let p = args.processes.min(args.clones);
    let mut children = Vec::with_capacity(p as usize);
    let mut next = args.first_id.unwrap_or(1);
    for i in 0..p {
        let share = args.clones / p + u32::from(i < args.clones % p);
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&own).args(["--processes", "1", "--clones", &share.to_string(), "--first-id", &next.to_string()]);
        // SAFETY: prctl with constant arguments, async-signal-safe, between fork and exec: the
        // process ends (stopping its clones cleanly) if this one dies.
        unsafe {
            cmd.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        tracing::debug!("clones {next}..{} in process {}", next + u64::from(share) - 1, child.id());
        next += u64::from(share);
        children.push(Some(child));
    }
    let mut worst = 0i32;
    let mut forwarded = false;
    while children.iter().any(Option::is_some) {
        if let (Some(sig), false) = (stop_requested(), forwarded) {
            let sig = if sig == "SIGINT" { libc::SIGINT } else { libc::SIGTERM };
            for c in children.iter().flatten() {
                // SAFETY: kill(2) on a child this process started and has not reaped.
                unsafe { libc::kill(c.id() as i32, sig) };
            }
            forwarded = true;
        }
        for slot in children.iter_mut() {
            let Some(c) = slot else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or(1);
                    if status_severity(code) > status_severity(worst) {
                        worst = code;
                    }
                    *slot = None;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for a process: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ExitCode::from(u8::try_from(worst).unwrap_or(1)))
}
