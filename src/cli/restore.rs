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
use super::{exit_status, severity, timeout};

#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// The snapshot directory.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// How many clones to run at once in this process.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clones: u32,
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
    for id in 1..=u64::from(args.clones) {
        let prefix = (args.clones > 1).then(|| format!("[clone {id}] "));
        let out: ConsoleOut = Box::new(SharedConsole::new(shared.clone(), prefix));
        let t = Instant::now();
        let channels = args.channels.for_vm(Some(id), args.no_seccomp)?;
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
                eprintln!("ember: clone {}: {exit}", i + 1);
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
