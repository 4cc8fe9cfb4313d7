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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    cli::dispatch(cli::Cli::parse(), process_start)
}
