//! The `ember` command line: one file per subcommand; `main.rs` only parses and dispatches.

mod args;
mod bench;
mod console;
mod image;
mod invoke;
mod restore;
mod run;
mod serve;
mod signals;
mod simulate;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ember::vmm::exit::VmExit;

/// ember: a minimal KVM microVM manager.
///
/// Boots trimmed Linux guests (an ELF vmlinux through PVH, or a bzImage) on KVM. Guest console
/// output goes to stdout; ember's own log goes to stderr (set EMBER_LOG=debug for more).
#[derive(Parser)]
#[command(version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Boot a VM and run it until the guest powers off, reboots or crashes.
    ///
    /// Exit status: 0 when the guest powered off or rebooted; 1 for bad input or a VMM error; 2 for
    /// a command-line usage error; 3 when the guest crashed (kernel panic, triple fault, KVM internal
    /// error: the reason and the vCPU's RIP are printed); 4 when --timeout stopped it.
    ///
    /// While it runs, SIGUSR1 pauses the VM (every vCPU parked, its state saved) and SIGUSR2
    /// resumes it.
    Run(run::RunArgs),
    /// Run clones of a snapshot (made with `ember run --snapshot-on-ready DIR`).
    ///
    /// Each clone is a new VM whose memory maps the snapshot's memory file copy-on-write, with all
    /// of the snapshot's vCPU, VM and device state; it goes on from the snapshot point with its own
    /// clone id (1..N) and fresh RNG seed material. With N > 1 each console line is prefixed with
    /// `[clone I]`. Exit status as for `run`, for the worst clone.
    Restore(restore::RestoreArgs),
    /// Invoke a function in a running VM or clone (one started with `--mailbox PATH`).
    ///
    /// The response payload is written to stdout as is. Exit status: 0 when the function answered
    /// "ok"; 5 when it answered another status (printed on stderr with the payload); 1 when no
    /// answer came (timeout, the VM ended, a malformed response) or the mailbox cannot be used;
    /// 2 for a usage error.
    Invoke(invoke::InvokeArgs),
    /// Run the pool supervisor: an HTTP/1.1 + JSON API on a Unix socket for a function scheduler
    /// (register functions, acquire/release/invoke warm clones, /metrics, /openapi.json).
    ///
    /// Registered functions and their templates are kept under --state-dir and survive a restart.
    /// SIGINT / SIGTERM stop every VM and remove the socket.
    Serve(serve::ServeArgs),
    /// Replay an invocation trace against the autoscaler (with a modelled restore time), a fixed
    /// keep-alive policy and the hybrid-histogram policy; report cold starts and idle
    /// clone-seconds (and the trade-off curve, as a table or an SVG plot). The trace: a CSV file,
    /// a generated one (single functions or a fleet), or the Azure Functions 2019 trace's files.
    /// Or write a synthetic trace.
    Simulate(simulate::SimulateArgs),
    /// Measure ember: a table of p50/p90/p99 per measure (and, with --json / --plot, every
    /// sample as JSON and the distributions as an SVG plot).
    Bench(bench::BenchArgs),
    /// Build, list and remove read-only EROFS layer images (from a directory, a tar, an OCI image
    /// layout or a `docker save` tarball), kept content-addressed under --state-dir/images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// A function's worker process (started by `ember serve`, with its socket on descriptor 3).
    #[command(hide = true)]
    Worker,
}

impl Cli {
    /// Whether the command asks for a JSON log (`ember serve --log-format json`, or its file).
    pub(crate) fn json_log(&self) -> bool {
        matches!(&self.command, Command::Serve(args) if args.json_log())
    }
}

/// Runs the parsed command; `process_start` anchors boot timelines.
pub(crate) fn dispatch(cli: Cli, process_start: Instant) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run::run(args, process_start),
        Command::Restore(args) => restore::restore(args),
        Command::Invoke(args) => invoke::invoke(args),
        Command::Simulate(args) => simulate::simulate(args),
        Command::Serve(args) => serve::serve(args),
        Command::Bench(args) => bench::bench(args),
        Command::Image(command) => image::image(command),
        Command::Worker => ember::isolation::worker::process::run().map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ember: error: {e}");
        ExitCode::FAILURE
    })
}

pub(crate) fn timeout(secs: Option<f64>) -> Result<Option<Duration>, String> {
    secs.map(|s| Duration::try_from_secs_f64(s).map_err(|_| format!("invalid timeout {s}"))).transpose()
}

/// Exit status: a VM failed (crashed, an error).
const EXIT_VM_FAILED: u8 = 3;
/// Exit status: ember stopped a VM (a timeout).
const EXIT_VM_STOPPED: u8 = 4;

/// ember's exit status for how a VM ended (the CLI's contract, see `ember run --help`).
pub(crate) fn exit_status(exit: &VmExit) -> ExitCode {
    if exit.is_clean() {
        tracing::info!("VM ended: {exit}");
        ExitCode::SUCCESS
    } else if matches!(exit, VmExit::Stopped(_)) {
        eprintln!("ember: {exit}");
        ExitCode::from(EXIT_VM_STOPPED)
    } else {
        eprintln!("ember: VM failed: {exit}");
        ExitCode::from(EXIT_VM_FAILED)
    }
}

/// Severity of an exit status, for reporting the worst of several clones.
pub(crate) fn severity(exit: &VmExit) -> u8 {
    match exit {
        e if e.is_clean() => 0,
        VmExit::Stopped(_) => 1,
        _ => 2,
    }
}

/// [`severity`] of a process's exit status (another ember's): any status that is not one of
/// [`exit_status`]'s (it could not start, set up or restore) is worse than a failed VM.
pub(crate) fn status_severity(code: i32) -> u8 {
    match u8::try_from(code) {
        Ok(0) => 0,
        Ok(EXIT_VM_STOPPED) => 1,
        Ok(EXIT_VM_FAILED) => 2,
        _ => 3,
    }
}
