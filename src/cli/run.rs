//! `ember run`: boot a VM and run it until the guest ends it, or make a template at its "ready".

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use ember::template::{MakeOptions, Template, TemplateError};
use ember::vmm::exit::VmExit;
use ember::vmm::{RunningVm, Vm};

use super::args::{ChannelArgs, MachineArgs};
use super::console::console;
use super::signals::{handle_pause_signals, handle_stop_signals, stop_requested, take_pause_request};
use super::{exit_status, timeout};

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Where the guest console goes: stdout (and then ember's stdin is the console's input), off, or
    /// a file path (appended to).
    #[arg(long, value_name = "PATH|stdout|off", default_value = "stdout")]
    console: String,
    /// Stop the VM (exit status 4) if the guest has not ended it after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Do not confine the vCPU and device threads with seccomp (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Make a template: when the guest agent signals "ready" (the control page's doorbell), pause
    /// the VM, snapshot it into DIR (files `state` and `memory`) and stop it (exit status 0).
    #[arg(long, value_name = "DIR")]
    snapshot_on_ready: Option<PathBuf>,
    #[command(flatten)]
    channels: ChannelArgs,
}

pub(crate) fn run(args: RunArgs, process_start: Instant) -> Result<ExitCode, String> {
    let cfg = args.machine.to_config()?;
    let out = console(&args.console)?;
    let timeout = timeout(args.timeout)?;
    let channels = args.channels.for_vm(None, args.no_seccomp)?;
    // The guest console's input is ember's stdin when its output is ember's stdout.
    let console_input = match args.console.as_str() {
        "stdout" => Some(ember::devices::console_input::stdin().map_err(|e| format!("cannot use stdin: {e}"))?),
        _ => None,
    };
    if let Some(dir) = args.snapshot_on_ready {
        let opts = MakeOptions {
            channels,
            console: out,
            console_input,
            seccomp: !args.no_seccomp,
            timeout: timeout.unwrap_or(Duration::MAX),
            working_set: true,
            process_start,
        };
        return match Template::make(&cfg, &dir, opts) {
            Ok(_) => Ok(ExitCode::SUCCESS),
            // No snapshot is a failure even when the guest ended cleanly (it powered off before
            // its agent was ready): 1, or the status of how it ended (3 crashed, 4 timed out).
            Err(e @ TemplateError::NeverReady { .. }) => {
                eprintln!("ember: {e}");
                let TemplateError::NeverReady { exit, .. } = e else { return Err("unreachable".into()) };
                let status = exit_status(&exit);
                Ok(if status == ExitCode::SUCCESS { ExitCode::FAILURE } else { status })
            }
            Err(e) => Err(e.to_string()),
        };
    }
    let vm = Vm::boot(&cfg, &channels, out, process_start).map_err(|e| e.to_string())?;
    let options = ember::vmm::RunOptions { timeout, seccomp: !args.no_seccomp, console_input, ..Default::default() };
    let running = vm.start(options).map_err(|e| e.to_string())?;
    Ok(exit_status(&run_until_end(running, timeout)?))
}

/// Runs a started VM until it ends or `timeout` passes. SIGUSR1 pauses it, SIGUSR2 resumes it;
/// SIGINT / SIGTERM stop it (a clean end).
fn run_until_end(running: RunningVm, timeout: Option<Duration>) -> Result<VmExit, String> {
    handle_pause_signals()?;
    handle_stop_signals()?;
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if running.poll(left.unwrap_or(Duration::MAX).min(Duration::from_millis(20))).is_some() {
            return Ok(running.wait(Some(Duration::ZERO)).exit);
        }
        if let Some(sig) = stop_requested() {
            running.stop(sig);
            return Ok(VmExit::StoppedBySignal(sig.to_string()));
        }
        if left == Some(Duration::ZERO) {
            let t = timeout.unwrap_or_default();
            return Ok(running.stop(&format!("timed out after {:.1} s", t.as_secs_f64())).exit);
        }
        match take_pause_request() {
            1 => {
                running.pause().map_err(|e| e.to_string())?;
                tracing::info!("VM paused (SIGUSR2 resumes it)");
            }
            2 => {
                running.resume();
                tracing::info!("VM resumed");
            }
            _ => {}
        }
    }
}
