//! A Firecracker-compatible front door: ember started as `firecracker` (a link of that name) or
//! as `ember firecracker` takes Firecracker's command line and serves Firecracker's per-VM API on
//! `--api-sock`, one microVM per process, over `vmm/` (the same VMM `ember run` uses).
//!
//! - [`args`]: Firecracker's command line, parsed its way.
//! - [`model`]: the API's bodies, and the fault that refuses a request.
//! - [`machine`]: the microVM, configured before `InstanceStart`, then running or paused.
//! - [`api`]: the routes.
//!
//! What this door serves today, path by path, and what it refuses by name (never accepting a
//! request and ignoring it), is in `docs/firecracker.md`.

pub mod api;
pub mod args;
pub mod log;
pub mod machine;
pub mod metrics;
pub mod model;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use args::Args;
use machine::Machine;
use model::Fault;

use crate::sys::Locked;

/// Firecracker's exit statuses that this door uses.
const EXIT_GENERIC: u8 = 1;
const EXIT_BAD_CONFIGURATION: u8 = 152;
const EXIT_ARG_PARSING: u8 = 153;

/// The help `--help` prints.
const HELP: &str = "ember, as firecracker: Firecracker's command line and API over ember's VMM.\n\n\
    Arguments:\n  --api-sock <PATH>   the API's Unix socket (default /run/firecracker.socket)\n  \
    --id <ID>           the microVM's id (default anonymous-instance)\n  \
    --config-file <PATH> configure the microVM from a JSON file and start it\n  \
    --no-api            no API socket (requires --config-file)\n  \
    --level <LEVEL>     log level: Error, Warning, Info, Debug, Trace, Off\n  \
    --log-path <PATH>   where the log goes (default: stderr)\n  \
    --show-level, --show-log-origin   log line decorations\n  \
    --no-seccomp        do not confine the threads with seccomp\n  \
    --http-api-max-payload-size <BYTES>   the largest request body\n  \
    --boot-timer, --mmds-size-limit <BYTES>, --version, --help\n\n\
    See docs/firecracker.md for what ember serves and refuses.\n";

/// Runs `ember` as Firecracker with `args` (the arguments after the program name).
pub fn main(args: &[String], process_start: Instant) -> ExitCode {
    let a = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Arguments parsing error: {e}\n\nFor more information try --help.");
            return ExitCode::from(EXIT_ARG_PARSING);
        }
    };
    if a.flag("help") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if a.flag("version") {
        println!("Firecracker v{} (ember {})", model::FIRECRACKER_API_VERSION, env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_log(&a) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_BAD_CONFIGURATION);
    }
    match run(&a, process_start) {
        Ok(code) => code,
        Err((code, e)) => {
            tracing::error!("{e}");
            eprintln!("{e}");
            ExitCode::from(code)
        }
    }
}

/// The log as `--level`, `--log-path`, `--show-level`, `--show-log-origin` and `--module` say.
fn init_log(a: &Args) -> Result<(), String> {
    let l = log::Logger {
        level: a.value("level").map(str::to_string),
        log_path: a.value("log-path").map(PathBuf::from),
        show_level: Some(a.flag("show-level")),
        show_log_origin: Some(a.flag("show-log-origin")),
        module: a.value("module").map(str::to_string),
    };
    log::init(&l).map_err(|f| f.0)
}

type Failure = (u8, String);

fn run(a: &Args, process_start: Instant) -> Result<ExitCode, Failure> {
    let generic = |e: String| (EXIT_GENERIC, e);
    if let Some(f) = a.value("seccomp-filter") {
        return Err(generic(format!(
            "--seccomp-filter {f}: ember does not apply Firecracker's compiled filter files; its own filters \
             confine every thread (drop the flag), or run with --no-seccomp"
        )));
    }
    for (flag, what) in [("metadata", "MMDS"), ("describe-snapshot", "Firecracker's snapshots")] {
        if a.flag(flag) {
            return Err(generic(format!("--{flag}: {what} is not supported by ember (see docs/firecracker.md)")));
        }
    }
    if a.flag("enable-pci") {
        return Err(generic(
            "--enable-pci: PCI devices are not supported by ember (its devices are virtio-mmio)".into(),
        ));
    }
    if a.flag("snapshot-version") {
        println!("v{}", crate::snapshot::format::FORMAT_VERSION);
        return Ok(ExitCode::SUCCESS);
    }
    let max_body = a.number("http-api-max-payload-size").map_err(|e| (EXIT_ARG_PARSING, e))?;
    a.number("mmds-size-limit").map_err(|e| (EXIT_ARG_PARSING, e))?;
    let id = a.value("id").unwrap_or(args::DEFAULT_ID).to_string();
    let seccomp = !a.flag("no-seccomp");
    let console: crate::devices::serial::ConsoleOut = Box::new(std::io::stdout());
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(path) = a.value("metrics-path") {
        let c = model::MetricsConfig { metrics_path: path.into(), ..Default::default() };
        metrics.configure(&c).map_err(|f| generic(f.0))?;
    }
    let machine = Arc::new(Mutex::new(Machine::new(id, console, seccomp, process_start, metrics.clone())));
    // The API's socket before the filter (and before the VM: clients wait for it).
    let listener = match a.flag("no-api") {
        true => None,
        false => {
            let path = PathBuf::from(a.value("api-sock").unwrap_or(args::DEFAULT_API_SOCK));
            let l = std::os::unix::net::UnixListener::bind(&path)
                .map_err(|e| generic(format!("Failed to open the API socket at {}: {e}", path.display())))?;
            let l = (l, SocketFile(path));
            l.0.set_nonblocking(true).map_err(|e| generic(e.to_string()))?;
            Some(l)
        }
    };
    if seccomp {
        let filter = crate::seccomp::firecracker_filter().map_err(|e| generic(format!("seccomp: {e}")))?;
        crate::seccomp::apply_allowing_files(&filter)
            .map_err(|e| generic(format!("cannot confine ember with seccomp: {e}")))?;
    }
    // What the first VM would do on the request's path, done while the process waits for it:
    // /dev/kvm opened, filters compiled, a VM made, and a shell for a snapshot of Firecracker's
    // default machine (one vCPU, 128 MiB) that a load may take (threads made ahead are confined:
    // none without seccomp).
    let ahead = std::thread::Builder::new().name("fc-prepare".into()).spawn(move || {
        if let Err(e) = crate::vmm::prepare_ahead() {
            tracing::debug!("preparing ahead: {e}");
            return None;
        }
        let spec =
            crate::vmm::shell::ShellSpec::generic(machine::DEFAULT_MEM_MIB << 20, machine::DEFAULT_VCPUS as usize);
        let spec = crate::vmm::shell::ShellSpec { threads_ahead: seccomp, ..spec };
        crate::vmm::shell::VmShell::new(&spec).inspect_err(|e| tracing::debug!("a VM shell ahead: {e}")).ok()
    });
    if let Ok(ahead) = ahead {
        machine.locked().set_ahead(ahead);
    }
    if let Some(path) = a.value("config-file") {
        configure_from_file(&mut machine.locked(), Path::new(path)).map_err(|f| (EXIT_BAD_CONFIGURATION, f.0))?;
        machine.locked().start().map_err(|f| (EXIT_BAD_CONFIGURATION, f.0))?;
    }
    // The blocking pool's thread (InstanceStart, snapshots) started now and kept.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .build()
        .map_err(|e| generic(format!("cannot start the runtime: {e}")))?;
    drop(rt.spawn_blocking(|| ()));
    let result = rt.block_on(serve(machine.clone(), metrics, listener.as_ref().map(|l| &l.0), max_body));
    drop(listener);
    // The last line, as Firecracker writes one at exit.
    if let Err(f) = machine.locked().write_metrics() {
        tracing::warn!("{}", f.0);
    }
    let exit = result.map_err(generic)?;
    tracing::info!("the microVM ended: {exit}");
    Ok(if exit.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_GENERIC) })
}

/// The API socket's file, removed when the process is done with it (on every way out).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves the API (when there is one) until the guest ends; returns how it ended.
async fn serve(
    machine: Arc<Mutex<Machine>>,
    metrics: Arc<metrics::Metrics>,
    listener: Option<&std::os::unix::net::UnixListener>,
    max_body: Option<usize>,
) -> Result<crate::vmm::exit::VmExit, String> {
    let ended = {
        let machine = machine.clone();
        async move {
            let mut next_flush = tokio::time::Instant::now() + metrics::FLUSH_PERIOD;
            loop {
                if let Some(exit) = machine.locked().ended() {
                    return exit;
                }
                if tokio::time::Instant::now() >= next_flush {
                    next_flush += metrics::FLUSH_PERIOD;
                    if let Err(f) = machine.locked().write_metrics() {
                        crate::log_limited!(warn, "{}", f.0);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let Some(listener) = listener else { return Ok(ended.await) };
    let listener = listener.try_clone().map_err(|e| e.to_string())?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
    let limit = max_body.unwrap_or(args::DEFAULT_MAX_PAYLOAD);
    let app = api::router(machine.clone(), metrics.clone(), limit);
    let start = machine.locked().process_start();
    metrics.started(start.elapsed(), metrics::process_cpu_time());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = rx.await;
    });
    let mut server = tokio::spawn(std::future::IntoFuture::into_future(server));
    tokio::select! {
        r = &mut server => Err(format!("the API server stopped: {r:?}")),
        exit = ended => {
            // Answers being written (the one that said why, when a load failed) go out first.
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
            Ok(exit)
        }
    }
}

/// Configures the microVM from a Firecracker config file (`--config-file`), refusing any section
/// ember cannot honour.
fn configure_from_file(m: &mut Machine, path: &Path) -> Result<(), Fault> {
    let text = std::fs::read_to_string(path).map_err(|e| Fault::new(format!("{}: {e}", path.display())))?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)?;
    for (key, value) in v {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "boot-source" => m.put_boot_source(serde_json::from_value(value)?)?,
            "machine-config" => m.set_machine_config(serde_json::from_value(value)?, false)?,
            "drives" => {
                for d in serde_json::from_value::<Vec<model::Drive>>(value)? {
                    m.put_drive(&d.drive_id.clone(), d)?;
                }
            }
            "network-interfaces" => {
                for n in serde_json::from_value::<Vec<model::NetworkInterface>>(value)? {
                    m.put_net(&n.iface_id.clone(), n)?;
                }
            }
            "vsock" => m.put_vsock(serde_json::from_value(value)?)?,
            other => return Err(model::unsupported(&format!("the config file's {other:?} section"))),
        }
    }
    Ok(())
}
