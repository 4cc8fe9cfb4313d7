//! The `ember` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ember::bench;
use ember::config::{BootSource, MachineConfig, VmConfig, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use ember::devices::serial::ConsoleOut;
use ember::vmm::Vm;

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
    Run(RunArgs),
    /// Measure ember.
    #[command(subcommand)]
    Bench(BenchCommand),
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
    /// Do not confine the vCPU threads with seccomp (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot the guest N times; report p50/p90/p99 of VM start -> kernel start, -> init, -> the
    /// boot-timer write, and of process start -> first guest instruction.
    Boot(BenchBootArgs),
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
    let vm = Vm::boot(&cfg, out, process_start).map_err(|e| e.to_string())?;
    // The guest console's input is ember's stdin when its output is ember's stdout.
    let console_input = match args.console.as_str() {
        "stdout" => Some(ember::devices::console_input::stdin().map_err(|e| format!("cannot use stdin: {e}"))?),
        _ => None,
    };
    let options = ember::vmm::RunOptions { timeout, seccomp: !args.no_seccomp, console_input };
    let outcome = vm.run_with(options).map_err(|e| e.to_string())?;
    let t = outcome.timeline;
    if let Some(e) = t.boot_timer {
        tracing::debug!("boot timer: {e}");
    }
    if outcome.exit.is_clean() {
        tracing::info!("VM ended: {}", outcome.exit);
        Ok(ExitCode::SUCCESS)
    } else if matches!(outcome.exit, ember::vmm::exit::VmExit::Stopped(_)) {
        eprintln!("ember: {}", outcome.exit);
        Ok(ExitCode::from(4))
    } else {
        eprintln!("ember: VM failed: {}", outcome.exit);
        Ok(ExitCode::from(3))
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
    };
    result.unwrap_or_else(|e| {
        eprintln!("ember: error: {e}");
        ExitCode::FAILURE
    })
}
