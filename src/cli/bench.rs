//! `ember bench`: boot, restore, invoke and handoff measurements.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use ember::bench;
use ember::snapshot::write_atomic;

use super::args::MachineArgs;
use super::timeout;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
    /// Also write the results as JSON: each measure's percentiles and every sample, and the notes.
    #[arg(long, value_name = "FILE", global = true)]
    json: Option<PathBuf>,
    /// Also write the latency distributions as an SVG plot (a row per measure, log scale).
    #[arg(long, value_name = "FILE", global = true)]
    plot: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Boot the guest N times; report p50/p90/p99 of VM start -> kernel start, -> init, -> the
    /// boot-timer write, and of process start -> first guest instruction.
    Boot(BenchBootArgs),
    /// Boot the guest once to its ready doorbell (the baseline), snapshot it, then restore it N
    /// times one after another (p50/p90/p99 of restore -> first guest instruction and -> the
    /// guest's first I/O), and hold M idle clones at once (time, clones/s, private memory per clone).
    Restore(BenchRestoreArgs),
    /// Round trip of a no-op invocation on a warm clone, per channel: p50/p90/p99 over --calls
    /// invocations, the guest's user/kernel CPU split during each run, and the cost of waking an
    /// idle clone.
    Invoke(BenchInvokeArgs),
    /// Latency of `POST /functions/{name}/acquire` and of a no-op `invoke` through `ember serve`'s
    /// API, with 1 and 16 concurrent clients, measured by the client and by the daemon, on pools
    /// restored from a template (`ember run --snapshot-on-ready`); sparse invokes (a call every
    /// 200 ms) with the host's CPU time per call; a fresh clone's first call.
    Handoff(BenchHandoffArgs),
    /// Functions whose files are layers: image build time and size; restore -> first answer with
    /// the code in a layer against the code in the initramfs; virtio-blk sequential and 4 KiB
    /// random reads in a guest against the same file on the host; private memory of clones of two
    /// functions sharing one layer file, each reading all of it. Boots three templates.
    Layers(BenchLayersArgs),
    /// ember's Python runtime: a fresh boot to ready against restore -> first answer from the
    /// handler (and from the built-in echo, same template), warm no-op invocations through the
    /// mailbox and the daemon's API, private memory per idle Python clone. Needs the python3
    /// layer's tree (scripts/build-python-layer.sh).
    Python(BenchPythonArgs),
    /// Clones' networks (as root, in a network namespace of the benchmark's own): the namespace
    /// pool's refill rate; restore -> first answer and -> first TCP request answered; a request's
    /// round trip over virtio-net next to the mailbox's; throughput over virtio-net both ways next
    /// to the mailbox's. Boots one template.
    Net(BenchNetArgs),
    /// ember driven as Firecracker: a guest booted and snapshotted through the Firecracker-compatible
    /// API, then loaded run after run into a new `ember firecracker` process: process start -> API
    /// socket ready, the `PUT /snapshot/load` round trip, load -> the guest answering over vsock,
    /// next to the same restore in-process. Boots one guest.
    Firecracker(BenchFirecrackerArgs),
    /// One process of `ember bench restore --processes` (started by it; talks on stdin/stdout).
    #[command(hide = true)]
    HoldClones(BenchHoldArgs),
}

#[derive(Args)]
pub(crate) struct BenchHoldArgs {
    /// The template snapshot directory.
    #[arg(long, value_name = "DIR")]
    template: PathBuf,
    /// Clones to restore and hold.
    #[arg(long)]
    clones: usize,
    /// VM shells made before the clock starts (restores beyond them make their VM).
    #[arg(long, default_value_t = 0)]
    shells: usize,
}

#[derive(Args)]
pub(crate) struct BenchNetArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Clones timed from restore to their first TCP request answered.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=64))]
    runs: u64,
    /// Round trips per channel on one clone.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    calls: u64,
    /// MiB per throughput run.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    mib: u64,
    /// Seconds to wait for one boot or one answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchFirecrackerArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Loads, each in a new process.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    runs: u64,
    /// Seconds to wait for the boot or for one answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchPythonArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// The python3 layer's tree.
    #[arg(long, value_name = "DIR", default_value = "images/layers/python3")]
    python: PathBuf,
    /// Fresh boots to ready (each makes a template; the last one is measured).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100))]
    boots: u64,
    /// Clones per kind for restore -> first answer.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    runs: u64,
    /// Warm invocations per kind and channel.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    calls: u64,
    /// Idle Python clones held for the memory measure.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clones: u64,
    /// Seconds to wait for one boot or one answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchLayersArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// The example code layer's tree (scripts/build-initramfs.sh writes it).
    #[arg(long, value_name = "DIR", default_value = "images/examples/files")]
    code: PathBuf,
    /// Size of the shared data layer's file, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    layer_mib: u64,
    /// Clones per kind for restore -> first answer.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    runs: u64,
    /// Clones held at once for the memory measure (half of each function; restored, not started).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clones: u64,
    /// Clones (half of each function) started to read the whole data layer each (on hosts that
    /// emulate guest kernel mode a guest reads ~1 MB/s: a few, not all of them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    readers: u64,
    /// Direct 4 KiB random reads, in the guest and on the host.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    random_reads: u64,
    /// Seconds to wait for one boot or one answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchHandoffArgs {
    /// The template snapshot directory.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Ready single-use clones for the fresh-clone invoke round (one per call).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pool: u32,
    /// Requests per client and round (acquire + release and invoke rounds run on recycled clones;
    /// the fresh-clone round makes at most --pool calls).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    requests: u64,
    /// Where the daemon runs the clones (as `ember serve --isolation`).
    #[arg(long, value_name = "MODE")]
    isolation: Option<super::serve::Isolation>,
    /// Threads that serve the daemon's HTTP API (as `ember serve --api-threads`).
    #[arg(long, value_name = "N", default_value_t = ember::serve::DEFAULT_API_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    api_threads: usize,
}

#[derive(Args)]
pub(crate) struct BenchInvokeArgs {
    /// A template snapshot (`ember run --snapshot-on-ready DIR`) to restore the clone from.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Invocations per mailbox mode (polled, doorbell).
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Invocations over vsock (each takes milliseconds on hosts that emulate guest kernel mode).
    #[arg(long, default_value_t = 10_000)]
    vsock_calls: usize,
    /// Invocations of an idle clone.
    #[arg(long, default_value_t = 20)]
    idle_calls: usize,
    /// Seconds to wait for one answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchBootArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Number of boots.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Per-boot timeout in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    timeout: f64,
}

#[derive(Args)]
pub(crate) struct BenchRestoreArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Number of sequential restores to time.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Number of idle clones to hold at once.
    #[arg(long, default_value_t = 1000)]
    clones: usize,
    /// Where to keep the snapshot (default: a temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR", conflicts_with = "template")]
    snapshot_dir: Option<PathBuf>,
    /// Restore this existing template (a --snapshot-dir of an earlier run, or `ember run
    /// --snapshot-on-ready DIR`) instead of booting one: no fresh-boot baseline then, for
    /// profiling the restore path quickly.
    #[arg(long, value_name = "DIR")]
    template: Option<PathBuf>,
    /// Seconds to wait for one clone's first action.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
    /// Also hold the idle clones spread over this many processes (1: not).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    processes: u64,
}

fn bench_restore(args: BenchRestoreArgs) -> Result<bench::TableReport, String> {
    let cfg = args.machine.to_config()?;
    let t = timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(10));
    let (dir, temporary) = match (args.template.clone(), args.snapshot_dir) {
        (Some(d), _) | (None, Some(d)) => (d, false),
        (None, None) => (std::env::temp_dir().join(format!("ember-bench-restore-{}", std::process::id())), true),
    };
    let b = bench::restore::RestoreBench {
        runs: args.runs,
        clones: args.clones,
        timeout: t,
        existing: args.template.is_some(),
        processes: args.processes as usize,
    };
    let report = bench::restore::restore(&cfg, &dir, &b).map_err(|e| e.to_string());
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report
}

pub(crate) fn bench(args: BenchArgs) -> Result<ExitCode, String> {
    // Checked before anything is measured: a run of minutes must not end in a bad path.
    for p in args.json.iter().chain(&args.plot) {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(format!("{}: no directory {}", p.display(), dir.display()));
        }
    }
    let report = match args.command {
        BenchCommand::Boot(args) => {
            let cfg = args.machine.to_config()?;
            let t = timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(120));
            bench::boot::boot(&cfg, args.runs, t).map_err(|e| e.to_string())?
        }
        BenchCommand::Restore(args) => bench_restore(args)?,
        BenchCommand::HoldClones(args) => {
            bench::restore::hold_clones(&args.template, args.clones, args.shells).map_err(|e| e.to_string())?;
            return Ok(ExitCode::SUCCESS);
        }
        BenchCommand::Layers(args) => {
            let b = bench::layers::LayersBench {
                code: args.code,
                layer_mib: args.layer_mib,
                runs: args.runs as usize,
                clones: args.clones as usize,
                readers: args.readers as usize,
                random_reads: args.random_reads as usize,
                timeout: timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(600)),
            };
            bench::layers::layers(&args.machine.to_config()?, &b).map_err(|e| e.to_string())?
        }
        BenchCommand::Python(args) => {
            let mut cfg = args.machine.to_config()?;
            // The interpreter and the standard library want more than the agent alone.
            cfg.machine_config.mem_size_mib = cfg.machine_config.mem_size_mib.max(256);
            let b = bench::python::PythonBench {
                python: args.python,
                boots: args.boots as usize,
                runs: args.runs as usize,
                calls: args.calls as usize,
                clones: args.clones as usize,
                timeout: timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(600)),
            };
            bench::python::python(&cfg, &b).map_err(|e| e.to_string())?
        }
        BenchCommand::Net(args) => {
            let b = bench::net::NetBench {
                runs: args.runs as usize,
                calls: args.calls as usize,
                bytes: args.mib << 20,
                timeout: timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(120)),
            };
            bench::net::net(&args.machine.to_config()?, &b).map_err(|e| e.to_string())?
        }
        BenchCommand::Firecracker(args) => {
            let t = timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(300));
            bench::firecracker::firecracker(&args.machine.to_config()?, args.runs as usize, t)
                .map_err(|e| e.to_string())?
        }
        BenchCommand::Handoff(args) => bench::handoff::handoff(
            &args.snapshot,
            args.pool,
            args.requests as usize,
            super::serve::Isolation::resolve(args.isolation)?,
            args.api_threads,
        )?,
        BenchCommand::Invoke(args) => {
            let b = bench::invoke::InvokeBench {
                calls: args.calls,
                vsock_calls: args.vsock_calls,
                idle_calls: args.idle_calls,
                timeout: timeout(Some(args.timeout))?.unwrap_or_default(),
            };
            bench::invoke::invoke(&args.snapshot, &b).map_err(|e| e.to_string())?
        }
    };
    println!("{report}");
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?;
        write_atomic(p, (text + "\n").as_bytes()).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &args.plot {
        write_atomic(p, report.svg().as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}
