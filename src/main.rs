//! The `ember` binary: parses the command line and dispatches to `cli`.

mod cli;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// ember's log at info level, without the rust-vmm crates' own error lines about what a guest put in
/// its queues: a guest can cause those at will, and ember reports (rate-limited) what matters.
const DEFAULT_LOG: &str = "info,virtio_queue=off,virtio_vsock=off,netlink_packet_route=error";

fn main() -> ExitCode {
    let process_start = Instant::now();
    // Started as `firecracker` (a link of that name) or `ember firecracker`: Firecracker's own
    // command line, which is not ember's.
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as = argv.first().map(|a| std::path::Path::new(a).file_name().unwrap_or_default().to_owned());
    if invoked_as.is_some_and(|n| n == "firecracker") {
        return ember::firecracker::main(&argv[1..], process_start);
    }
    if argv.get(1).is_some_and(|a| a == "firecracker") {
        return ember::firecracker::main(&argv[2..], process_start);
    }
    let cli = cli::Cli::parse();
    // JSON when `ember serve` is told so (and in its workers, which it tells through the
    // environment), text otherwise.
    let json = cli.json_log() || std::env::var(ember::isolation::worker::LOG_FORMAT_ENV).is_ok_and(|f| f == "json");
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG))
    };
    if json {
        // Workers inherit the format from here.
        std::env::set_var(ember::isolation::worker::LOG_FORMAT_ENV, "json");
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).with_target(false).init();
    }
    cli::dispatch(cli, process_start)
}
