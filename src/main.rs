//! The `ember` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ember::bench;
use ember::config::{BootSource, MachineConfig, VmConfig, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use ember::devices::serial::ConsoleOut;
use ember::vmm::exit::VmExit;
use ember::vmm::{RunningVm, Vm};
use std::sync::atomic::{AtomicU8, Ordering};

/// ember: a minimal KVM microVM manager.
///
/// Boots trimmed Linux guests (an ELF vmlinux through PVH, or a bzImage) on KVM. Guest console
/// output goes to stdout; ember's own log goes to stderr (set EMBER_LOG=debug for more).
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off, reboots or crashes.
    ///
    /// Exit status: 0 when the guest powered off or rebooted; 1 for bad input or a VMM error; 2 for
    /// a command-line usage error; 3 when the guest crashed (kernel panic, triple fault, KVM internal
    /// error: the reason and the vCPU's RIP are printed); 4 when --timeout stopped it.
    ///
    /// While it runs, SIGUSR1 pauses the VM (every vCPU parked, its state saved) and SIGUSR2
    /// resumes it.
    Run(RunArgs),
    /// Run clones of a snapshot (made with `ember run --snapshot-on-ready DIR`).
    ///
    /// Each clone is a new VM whose memory maps the snapshot's memory file copy-on-write, with all
    /// of the snapshot's vCPU, VM and device state; it goes on from the snapshot point with its own
    /// clone id (1..N) and fresh RNG seed material. With N > 1 each console line is prefixed with
    /// `[clone I]`. Exit status as for `run`, for the worst clone.
    Restore(RestoreArgs),
    /// Invoke a function in a running VM or clone (one started with `--mailbox PATH`).
    ///
    /// The response payload is written to stdout as is. Exit status: 0 when the function answered
    /// "ok"; 5 when it answered another status (printed on stderr with the payload); 1 when no
    /// answer came (timeout, the VM ended, a malformed response) or the mailbox cannot be used;
    /// 2 for a usage error.
    Invoke(InvokeArgs),
    /// Run the pool supervisor: an HTTP/1.1 + JSON API on a Unix socket for a function scheduler
    /// (register functions, acquire/release/invoke warm clones, /metrics, /openapi.json).
    ///
    /// Registered functions and their templates are kept under --state-dir and survive a restart.
    /// SIGINT / SIGTERM stop every VM and remove the socket.
    Serve(ServeArgs),
    /// Replay an invocation trace against the autoscaler (with a modelled restore time) and a fixed
    /// keep-alive policy; report cold starts and idle clone-seconds. Or write a synthetic trace.
    Simulate(SimulateArgs),
    /// Measure ember.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct SimulateArgs {
    /// The trace: CSV lines `arrival_s,function,duration_s`.
    #[arg(long, value_name = "FILE", required_unless_present = "generate", conflicts_with = "generate")]
    trace: Option<PathBuf>,
    /// Modelled time from "restore" to a clone that can take work, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50.0)]
    restore_ms: f64,
    /// The keep-alive policy's time, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    keep_alive_s: f64,
    /// The autoscaler's policy as JSON (the `pool` object of a registration); defaults otherwise.
    #[arg(long, value_name = "JSON")]
    policy: Option<String>,
    /// Write a synthetic trace of this shape to --out instead.
    #[arg(long, value_enum, requires = "out")]
    generate: Option<ember::serve::simulate::Shape>,
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Length of a generated trace.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn simulate(args: SimulateArgs) -> Result<ExitCode, String> {
    use ember::serve::simulate as sim;
    if let (Some(shape), Some(out)) = (args.generate, &args.out) {
        if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 86_400.0) {
            return Err(format!("--seconds {} is not in (0, 86400]", args.seconds));
        }
        let t = sim::generate(shape, args.seconds, args.seed);
        std::fs::write(out, sim::to_csv(&t)).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        println!("{} invocations written to {}", t.len(), out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let path = args.trace.ok_or("--trace is required")?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trace = sim::parse_trace(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let policy: ember::serve::scaler::PoolPolicy = match &args.policy {
        Some(j) => serde_json::from_str(j).map_err(|e| format!("--policy: {e}"))?,
        None => Default::default(),
    };
    policy.validate().map_err(|e| format!("--policy: {e}"))?;
    for (flag, v) in [("--restore-ms", args.restore_ms), ("--keep-alive-s", args.keep_alive_s)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{flag} {v} must be a non-negative number"));
        }
    }
    let restore_s = args.restore_ms / 1e3;
    let report = sim::Report {
        trace: path.display().to_string(),
        restore_s,
        keep_alive_s: args.keep_alive_s,
        autoscaler: sim::autoscaler(&trace, &policy, restore_s),
        keep_alive: sim::keep_alive(&trace, args.keep_alive_s, restore_s),
    };
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct ServeArgs {
    /// The Unix socket to serve on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Where registrations, templates and clones' channels live (default: $XDG_STATE_HOME/ember or
    /// ~/.local/state/ember).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

fn default_state_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("ember"));
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set; give --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/ember"))
}

/// How the host reaches the guest agent.
#[derive(Args, Clone)]
struct ChannelArgs {
    /// Create the VM's mailbox at PATH (a new file, removed when the VM ends), so that `ember
    /// invoke --mailbox PATH` can reach it; implies --serve. With several clones PATH must
    /// contain `{id}`, replaced by each clone's id.
    #[arg(long, value_name = "PATH")]
    mailbox: Option<String>,
    /// The vsock device's host socket (Firecracker's hybrid vsock: connect and send `CONNECT
    /// <port>\n`; guest connections to host port P go to `PATH_P`); implies --serve. With several
    /// clones PATH must contain `{id}`.
    #[arg(long, value_name = "PATH")]
    vsock: Option<String>,
    /// Have the guest agent serve invocations after "ready" instead of powering the VM off.
    #[arg(long)]
    serve: bool,
}

impl ChannelArgs {
    /// The channels of one VM (`id`: a clone's id, for `{id}` in paths); `no_seccomp` also leaves
    /// device threads unconfined.
    fn for_vm(&self, id: Option<u64>, no_seccomp: bool) -> Result<ember::vmm::Channels, String> {
        let path = |p: &Option<String>| match (p, id) {
            (None, _) => None,
            (Some(p), None) => Some(PathBuf::from(p)),
            (Some(p), Some(id)) => Some(PathBuf::from(p.replace("{id}", &id.to_string()))),
        };
        let (mailbox, vsock) = (path(&self.mailbox), path(&self.vsock));
        let serve = self.serve || mailbox.is_some() || vsock.is_some();
        Ok(ember::vmm::Channels { serve, mailbox, vsock, device_seccomp: !no_seccomp })
    }

    /// Checks that per-clone paths differ.
    fn check_clones(&self, clones: u32) -> Result<(), String> {
        for (flag, p) in [("--mailbox", &self.mailbox), ("--vsock", &self.vsock)] {
            match p {
                Some(p) if clones > 1 && !p.contains("{id}") => {
                    return Err(format!("{flag} {p}: with --clones {clones} the path must contain {{id}}"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Args)]
struct InvokeArgs {
    /// The function: a built-in of the agent (echo, sha256, sleep, cpu-stat) or the image's own.
    function: String,
    /// Invoke through the VM's mailbox (from `ember run|restore --mailbox PATH`).
    #[arg(long, value_name = "PATH", required_unless_present = "vsock", conflicts_with = "vsock")]
    mailbox: Option<PathBuf>,
    /// Invoke over vsock, through the VM's vsock socket (from `ember run|restore --vsock PATH`).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The payload, as a string.
    #[arg(long, value_name = "STR", conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload from a file (`-`: stdin).
    #[arg(long, value_name = "PATH|-")]
    payload_file: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    timeout: f64,
    /// Have the agent ring the response doorbell (an exit) and sleep until it does, instead of
    /// polling the response.
    #[arg(long)]
    doorbell: bool,
}

fn invoke(args: InvokeArgs) -> Result<ExitCode, String> {
    use std::io::{Read, Write};
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).map_err(|e| format!("cannot read stdin: {e}"))?;
            v
        }
        (None, Some(f)) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?,
        (None, None) => Vec::new(),
    };
    let timeout = timeout(Some(args.timeout))?.unwrap_or_default();
    let r = match (&args.mailbox, &args.vsock) {
        (Some(path), _) => {
            let mailbox = ember::mailbox::Mailbox::open(path).map_err(|e| e.to_string())?;
            let opts = ember::mailbox::CallOptions { timeout, doorbell: args.doorbell, ..Default::default() };
            mailbox.call(&args.function, &payload, opts).map_err(|e| e.to_string())?
        }
        (None, Some(path)) => {
            let mut conn = ember::vsock::AgentConnection::connect(path, timeout).map_err(|e| e.to_string())?;
            conn.call(&args.function, &payload).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("--mailbox or --vsock is required".into()),
    };
    if r.status != ember_abi::Status::Ok {
        eprintln!("ember: {}: {}: {}", args.function, r.status.describe(), String::from_utf8_lossy(&r.payload));
        return Ok(ExitCode::from(5));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&r.payload).and_then(|_| out.flush()).map_err(|e| format!("cannot write the response: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Clone)]
struct MachineArgs {
    /// Kernel to boot: an ELF vmlinux (entered through PVH when it has the note) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "config", conflicts_with = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs to load (an uncompressed cpio boots fastest).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing ember's default (see guest/kernel/cmdline).
    #[arg(long, value_name = "STR", conflicts_with = "config")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-32).
    #[arg(long, value_name = "N", default_value_t = u64::from(DEFAULT_VCPUS), conflicts_with = "config")]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MEM_MIB, conflicts_with = "config")]
    mem_mib: u64,
    /// The whole machine as a Firecracker-style JSON file ("boot-source", "machine-config")
    /// instead of the flags above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl MachineArgs {
    fn to_config(&self) -> Result<VmConfig, String> {
        let cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            (None, Some(kernel)) => VmConfig {
                boot_source: BootSource {
                    kernel_image_path: kernel.clone(),
                    initrd_path: self.initrd.clone(),
                    boot_args: self.cmdline.clone(),
                },
                machine_config: MachineConfig { vcpu_count: self.vcpus, mem_size_mib: self.mem_mib },
            },
            (None, None) => return Err("either --kernel or --config is required".into()),
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

#[derive(Args)]
struct RunArgs {
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

#[derive(Args)]
struct RestoreArgs {
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

#[derive(Subcommand)]
enum BenchCommand {
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
    /// restored from a template (`ember run --snapshot-on-ready`).
    Handoff(BenchHandoffArgs),
}

#[derive(Args)]
struct BenchHandoffArgs {
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
}

#[derive(Args)]
struct BenchInvokeArgs {
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
struct BenchBootArgs {
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
struct BenchRestoreArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Number of sequential restores to time.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Number of idle clones to hold at once.
    #[arg(long, default_value_t = 1000)]
    clones: usize,
    /// Where to keep the snapshot (default: a temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Seconds to wait for one clone's first action.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
}

fn bench_restore(args: BenchRestoreArgs) -> Result<ExitCode, String> {
    let cfg = args.machine.to_config()?;
    let t = timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(10));
    let (dir, temporary) = match args.snapshot_dir {
        Some(d) => (d, false),
        None => (std::env::temp_dir().join(format!("ember-bench-restore-{}", std::process::id())), true),
    };
    let b = bench::RestoreBench { runs: args.runs, clones: args.clones, timeout: t };
    let report = bench::restore(&cfg, &dir, &b).map_err(|e| e.to_string());
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", report?);
    Ok(ExitCode::SUCCESS)
}

fn console(spec: &str) -> Result<ConsoleOut, String> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "off" => Box::new(std::io::sink()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open console file {path}: {e}"))?,
        ),
    })
}

fn timeout(secs: Option<f64>) -> Result<Option<Duration>, String> {
    secs.map(|s| Duration::try_from_secs_f64(s).map_err(|_| format!("invalid timeout {s}"))).transpose()
}

fn run(args: RunArgs, process_start: Instant) -> Result<ExitCode, String> {
    let cfg = args.machine.to_config()?;
    let out = console(&args.console)?;
    let timeout = timeout(args.timeout)?;
    let channels = args.channels.for_vm(None, args.no_seccomp)?;
    let vm = Vm::boot(&cfg, &channels, out, process_start).map_err(|e| e.to_string())?;
    // The guest console's input is ember's stdin when its output is ember's stdout.
    let console_input = match args.console.as_str() {
        "stdout" => Some(ember::devices::console_input::stdin().map_err(|e| format!("cannot use stdin: {e}"))?),
        _ => None,
    };
    let options = ember::vmm::RunOptions {
        timeout,
        seccomp: !args.no_seccomp,
        console_input,
        pause_on_ready: args.snapshot_on_ready.is_some(),
        ..Default::default()
    };
    let running = vm.start(options).map_err(|e| e.to_string())?;
    let Some(dir) = args.snapshot_on_ready else {
        return Ok(exit_status(&run_until_end(running, timeout)?));
    };
    if !running.wait_ready(timeout.unwrap_or(Duration::MAX)) {
        let outcome = running.wait(Some(Duration::ZERO));
        eprintln!("ember: the guest never signalled ready, no snapshot taken");
        return Ok(exit_status(&outcome.exit));
    }
    let t = Instant::now();
    running.pause().map_err(|e| e.to_string())?;
    let paused = t.elapsed();
    running.snapshot(&dir).map_err(|e| format!("cannot snapshot into {}: {e}", dir.display()))?;
    tracing::info!(
        "snapshot written to {} (pause {:.3} ms, save {:.3} ms)",
        dir.display(),
        paused.as_secs_f64() * 1e3,
        (t.elapsed() - paused).as_secs_f64() * 1e3
    );
    running.stop("snapshot taken");

    // The template's working set, from one clone's run, for restores to populate ahead of time.
    let paths = ember::snapshot::SnapshotPaths::new(&dir);
    let state = ember::snapshot::read_state(&paths).map_err(|e| e.to_string())?;
    let memory = ember::snapshot::MemoryFile::open(&paths, state.machine.mem_bytes).map_err(|e| e.to_string())?;
    let ws = ember::vmm::record_working_set(&state, &memory, WORKING_SET_WINDOW).map_err(|e| e.to_string())?;
    ws.save(&paths.working_set()).map_err(|e| e.to_string())?;
    tracing::info!(
        "working set recorded: {} pages read, {} pages written ({})",
        ws.read_pages(),
        ws.written_pages(),
        paths.working_set().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// How long the recording clone runs (it usually ends sooner: the guest agent powers off).
const WORKING_SET_WINDOW: Duration = Duration::from_secs(10);

/// What SIGUSR1 / SIGUSR2 asked for: 1 pause, 2 resume.
static PAUSE_REQUEST: AtomicU8 = AtomicU8::new(0);
/// The signal (SIGINT, SIGTERM) that asked ember to stop its VMs, or 0.
static STOP_SIGNAL: AtomicU8 = AtomicU8::new(0);

extern "C" fn on_pause_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    PAUSE_REQUEST.store(if sig == libc::SIGUSR1 { 1 } else { 2 }, Ordering::SeqCst);
}

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(sig as u8, Ordering::SeqCst);
}

/// SIGINT and SIGTERM stop the VMs cleanly (their mailbox files are removed) instead of killing
/// ember.
fn handle_stop_signals() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    Ok(())
}

/// Why ember was asked to stop, if it was.
fn stop_requested() -> Option<&'static str> {
    match i32::from(STOP_SIGNAL.load(Ordering::SeqCst)) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

/// Runs a started VM until it ends or `timeout` passes. SIGUSR1 pauses it, SIGUSR2 resumes it;
/// SIGINT / SIGTERM stop it (a clean end).
fn run_until_end(running: RunningVm, timeout: Option<Duration>) -> Result<VmExit, String> {
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        vmm_sys_util::signal::register_signal_handler(sig, on_pause_signal)
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
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
        match PAUSE_REQUEST.swap(0, Ordering::SeqCst) {
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

/// ember's exit status for how a VM ended (the CLI's contract, see `ember run --help`).
fn exit_status(exit: &VmExit) -> ExitCode {
    if exit.is_clean() {
        tracing::info!("VM ended: {exit}");
        ExitCode::SUCCESS
    } else if matches!(exit, VmExit::Stopped(_)) {
        eprintln!("ember: {exit}");
        ExitCode::from(4)
    } else {
        eprintln!("ember: VM failed: {exit}");
        ExitCode::from(3)
    }
}

/// Severity of an exit status, for reporting the worst of several clones.
fn severity(exit: &VmExit) -> u8 {
    match exit {
        e if e.is_clean() => 0,
        VmExit::Stopped(_) => 1,
        _ => 2,
    }
}

fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let timeout = timeout(args.timeout)?;
    args.channels.check_clones(args.clones)?;
    let paths = ember::snapshot::SnapshotPaths::new(&args.snapshot);
    let state = ember::snapshot::read_state(&paths).map_err(|e| e.to_string())?;
    let memory = ember::snapshot::MemoryFile::open(&paths, state.machine.mem_bytes).map_err(|e| e.to_string())?;
    let ws = match args.populate {
        false => None,
        true => ember::snapshot::working_set::WorkingSet::load(&paths.working_set(), state.machine.mem_bytes)
            .map_err(|e| e.to_string())?,
    };
    handle_stop_signals()?;
    let shared = std::sync::Arc::new(std::sync::Mutex::new(console(&args.console)?));
    let mut running = Vec::new();
    for id in 1..=u64::from(args.clones) {
        let out: ConsoleOut = match args.clones {
            1 => Box::new(SharedConsole { inner: shared.clone(), prefix: None, line: Vec::new() }),
            _ => Box::new(SharedConsole {
                inner: shared.clone(),
                prefix: Some(format!("[clone {id}] ")),
                line: Vec::new(),
            }),
        };
        let t = Instant::now();
        let channels = args.channels.for_vm(Some(id), args.no_seccomp)?;
        let vm = Vm::restore(&state, &memory, id, &channels, out).map_err(|e| format!("clone {id}: {e}"))?;
        if let Some(ws) = &ws {
            vm.populate(ws).map_err(|e| format!("clone {id}: cannot populate the working set: {e}"))?;
        }
        let options = ember::vmm::RunOptions { seccomp: !args.no_seccomp, ..Default::default() };
        running.push(vm.start(options).map_err(|e| format!("clone {id}: {e}"))?);
        tracing::debug!("clone {id} restored and started in {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    }
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

/// One clone's console on an output shared by several clones. With a prefix, output is written a
/// whole line at a time (each line prefixed with the clone's name), so that clones' lines never mix.
struct SharedConsole {
    inner: std::sync::Arc<std::sync::Mutex<ConsoleOut>>,
    prefix: Option<String>,
    line: Vec<u8>,
}

impl SharedConsole {
    fn write_line(&mut self) -> std::io::Result<()> {
        let mut out = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prefix) = &self.prefix {
            out.write_all(prefix.as_bytes())?;
        }
        out.write_all(&self.line)?;
        self.line.clear();
        Ok(())
    }
}

impl std::io::Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.prefix.is_none() {
            return self.inner.lock().unwrap_or_else(|p| p.into_inner()).write(buf);
        }
        for part in buf.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(part);
            if part.ends_with(b"\n") {
                self.write_line()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl Drop for SharedConsole {
    fn drop(&mut self) {
        // A last line without its newline.
        if !self.line.is_empty() {
            self.line.push(b'\n');
            let _ = self.write_line();
        }
    }
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args, process_start),
        Command::Restore(args) => restore(args),
        Command::Invoke(args) => invoke(args),
        Command::Simulate(args) => simulate(args),
        Command::Serve(args) => args
            .state_dir
            .map(Ok)
            .unwrap_or_else(default_state_dir)
            .and_then(|dir| ember::serve::run(&args.socket, &dir))
            .map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Boot(args)) => args
            .machine
            .to_config()
            .and_then(|cfg| {
                let t = timeout(Some(args.timeout))?.unwrap_or(Duration::from_secs(120));
                bench::boot(&cfg, args.runs, t).map_err(|e| e.to_string())
            })
            .map(|report| {
                println!("{report}");
                ExitCode::SUCCESS
            }),
        Command::Bench(BenchCommand::Restore(args)) => bench_restore(args),
        Command::Bench(BenchCommand::Handoff(args)) => {
            ember::serve::bench::handoff(&args.snapshot, args.pool, args.requests as usize).map(|report| {
                println!("{report}");
                ExitCode::SUCCESS
            })
        }
        Command::Bench(BenchCommand::Invoke(args)) => timeout(Some(args.timeout)).and_then(|t| {
            let b = bench::InvokeBench {
                calls: args.calls,
                vsock_calls: args.vsock_calls,
                idle_calls: args.idle_calls,
                timeout: t.unwrap_or_default(),
            };
            let report = bench::invoke(&args.snapshot, &b).map_err(|e| e.to_string())?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ember: error: {e}");
        ExitCode::FAILURE
    })
}
