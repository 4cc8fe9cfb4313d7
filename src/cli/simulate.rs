//! `ember simulate`: trace replay against the autoscaler, fixed keep-alive and the hybrid-histogram
//! policy, or a synthetic trace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ember::scale::simulate as sim;

#[derive(Args)]
pub(crate) struct SimulateArgs {
    /// The trace: CSV lines `arrival_s,function,duration_s`.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["generate", "azure_invocations"],
          conflicts_with_all = ["generate", "azure_invocations"])]
    trace: Option<PathBuf>,
    /// An Azure Functions 2019 trace's invocation counts (invocations_per_function_md.anon.dNN.csv)
    /// as the trace.
    #[arg(long, value_name = "FILE", conflicts_with = "generate")]
    azure_invocations: Option<PathBuf>,
    /// Its execution-time percentiles (function_durations_percentiles.anon.dNN.csv).
    #[arg(long, value_name = "FILE", requires = "azure_invocations")]
    azure_durations: Option<PathBuf>,
    /// The minutes of the Azure day file to take, FIRST..END (0-based, END excluded).
    #[arg(long, value_name = "FIRST..END", default_value = "0..1440")]
    minutes: String,
    /// Modelled time from "restore" to a clone that can take work, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50.0)]
    restore_ms: f64,
    /// The CPU one restore costs (restore to serving), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = sim::RESTORE_CPU_S * 1e3)]
    restore_cpu_ms: f64,
    /// The memory that costs as much as one core, MiB: turns restores' CPU into idle
    /// clone-seconds.
    #[arg(long, value_name = "MIB", default_value_t = ember::scale::fleet::CORE_MIB)]
    core_mib: f64,
    /// The keep-alive policy's time, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    keep_alive_s: f64,
    /// The autoscaler's policy as JSON (the `pool` object of a registration), for every function;
    /// defaults otherwise.
    #[arg(long, value_name = "JSON")]
    policy: Option<String>,
    /// The modelled host's memory, MiB (a function's clones are limited to what it holds).
    #[arg(long, value_name = "MIB", default_value_t = 524_288.0)]
    host_mib: f64,
    /// Memory for ready clones, all functions together, MiB (default: half of --host-mib).
    #[arg(long, value_name = "MIB")]
    idle_budget_mib: Option<f64>,
    /// A clone's memory, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128.0)]
    clone_mib: f64,
    /// Also the trade-off curve: cold starts against idle clone-seconds for the autoscaler at
    /// several `cold_start_cost_s`, keep-alive at several windows, hybrid at several ranges.
    #[arg(long)]
    curve: bool,
    /// Write the trade-off curve as an SVG plot to FILE (implies --curve).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Write the report (and the trade-off curve, with --curve) to FILE as JSON: per policy, its
    /// cold starts, idle clone-seconds, restores and their CPU, peaks and their memory.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write each function's outcome under every policy to FILE (CSV).
    #[arg(long, value_name = "FILE")]
    per_function: Option<PathBuf>,
    /// Replay a synthetic trace of this shape; with --out, write it there instead.
    #[arg(long, value_enum)]
    generate: Option<sim::Shape>,
    #[arg(long, value_name = "FILE", requires = "generate")]
    out: Option<PathBuf>,
    /// Length of a generated trace (default: 600 s, an hour for a fleet).
    #[arg(long, value_name = "SECONDS")]
    seconds: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Functions in a generated fleet, or at most this many from an Azure trace.
    #[arg(long, value_name = "N")]
    functions: Option<u32>,
    /// A generated fleet's fastest mean rate, per second.
    #[arg(long, value_name = "PER_S")]
    max_rate: Option<f64>,
    /// Decades between a generated fleet's fastest and slowest function.
    #[arg(long, value_name = "DECADES")]
    rate_spread: Option<f64>,
    /// Bursts per hour over a generated fleet.
    #[arg(long, value_name = "N")]
    bursts_per_hour: Option<f64>,
    /// The share of a generated fleet's non-timer functions that take bursts.
    #[arg(long, value_name = "SHARE")]
    burst_share: Option<f64>,
}

fn minutes(s: &str) -> Result<std::ops::Range<usize>, String> {
    let bad = || format!("--minutes {s:?}: expected FIRST..END");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    Ok(a.trim().parse().map_err(|_| bad())?..b.trim().parse().map_err(|_| bad())?)
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub(crate) fn simulate(args: SimulateArgs) -> Result<ExitCode, String> {
    // A report piped into a reader that stops early (`| head`) ends the command quietly, as any
    // filter does, rather than as a failed write.
    // SAFETY: setting a signal's disposition to its default touches no memory of ours; this
    // command writes only to stdout and its own files, and starts no child.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    use ember::scale::{fleet, hybrid, traces};
    let fleet_flags = args.max_rate.is_some()
        || args.rate_spread.is_some()
        || args.bursts_per_hour.is_some()
        || args.burst_share.is_some();
    if fleet_flags && args.generate != Some(sim::Shape::Fleet) {
        return Err("--max-rate, --rate-spread, --bursts-per-hour and --burst-share are for --generate fleet".into());
    }
    let (name, trace) = if let Some(shape) = args.generate {
        let seconds = args.seconds.unwrap_or(if shape == sim::Shape::Fleet { 3600.0 } else { 600.0 });
        let trace = if shape == sim::Shape::Fleet {
            let d = traces::FleetParams::default();
            let p = traces::FleetParams {
                functions: args.functions.unwrap_or(d.functions),
                seconds,
                max_rate: args.max_rate.unwrap_or(d.max_rate),
                rate_spread: args.rate_spread.unwrap_or(d.rate_spread),
                bursts_per_hour: args.bursts_per_hour.unwrap_or(d.bursts_per_hour),
                burst_share: args.burst_share.unwrap_or(d.burst_share),
                seed: args.seed,
            };
            p.validate()?;
            traces::fleet(&p)
        } else {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0) {
                return Err(format!("--seconds {seconds} is not in (0, 86400]"));
            }
            if args.functions.is_some() {
                return Err("--functions is for --generate fleet or an Azure trace".into());
            }
            sim::generate(shape, seconds, args.seed)
        };
        if let Some(out) = &args.out {
            std::fs::write(out, sim::to_csv(&trace)).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            println!("{} invocations written to {}", trace.len(), out.display());
            return Ok(ExitCode::SUCCESS);
        }
        (format!("generated {shape:?} (seed {}, {seconds} s)", args.seed).to_lowercase(), trace)
    } else if let Some(inv) = &args.azure_invocations {
        let durations = args.azure_durations.as_ref().map(read).transpose()?;
        let sel = traces::AzureSelection {
            minutes: minutes(&args.minutes)?,
            functions: args.functions.map(|n| n as usize),
            seed: args.seed,
        };
        let trace =
            traces::azure(&read(inv)?, durations.as_deref(), &sel).map_err(|e| format!("{}: {e}", inv.display()))?;
        (inv.display().to_string(), trace)
    } else {
        let path = args.trace.as_ref().ok_or("--trace is required")?;
        let trace = sim::parse_trace(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
        (path.display().to_string(), trace)
    };
    let policy: ember::scale::scaler::PoolPolicy = match &args.policy {
        Some(j) => serde_json::from_str(j).map_err(|e| format!("--policy: {e}"))?,
        None => Default::default(),
    };
    policy.validate().map_err(|e| format!("--policy: {e}"))?;
    for (flag, v) in [
        ("--restore-ms", args.restore_ms),
        ("--keep-alive-s", args.keep_alive_s),
        ("--host-mib", args.host_mib),
        ("--clone-mib", args.clone_mib),
        ("--restore-cpu-ms", args.restore_cpu_ms),
        ("--core-mib", args.core_mib),
        ("--idle-budget-mib", args.idle_budget_mib.unwrap_or(0.0)),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{flag} {v} must be a non-negative number"));
        }
    }
    if args.clone_mib <= 0.0 || args.host_mib <= 0.0 {
        return Err("--clone-mib and --host-mib must be more than 0".into());
    }
    let restore_s = args.restore_ms / 1e3;
    let mut host = sim::SimHost {
        host: fleet::Host::with_memory(args.host_mib),
        clone_mib: args.clone_mib,
        restore_cpu_s: args.restore_cpu_ms / 1e3,
    };
    host.host.core_mib = args.core_mib;
    if let Some(b) = args.idle_budget_mib {
        host.host.idle_budget_mib = b;
    }
    let (ours, stats) = sim::autoscaler_by_function(&trace, &policy, &host, restore_s);
    let ka = sim::keep_alive_by_function(&trace, args.keep_alive_s, restore_s);
    let hy = hybrid::hybrid_by_function(&trace, &hybrid::HybridParams::default(), restore_s);
    if let Some(path) = &args.per_function {
        let mut csv = String::from("function,invocations");
        for policy in ["ember", "keep_alive", "hybrid"] {
            csv.push_str(&format!(",{policy}_cold,{policy}_idle_s,{policy}_restores,{policy}_peak"));
        }
        csv.push('\n');
        for ((e, k), h) in ours.iter().zip(&ka).zip(&hy) {
            csv.push_str(&format!("{},{}", e.0, e.1.invocations));
            for o in [&e.1, &k.1, &h.1] {
                csv.push_str(&format!(
                    ",{},{:.1},{},{}",
                    o.cold_starts, o.idle_clone_seconds, o.restores, o.peak_clones
                ));
            }
            csv.push('\n');
        }
        std::fs::write(path, csv).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let report = sim::Report {
        trace: name,
        restore_s,
        host: host.clone(),
        rows: vec![
            ("ember autoscaler".into(), sim::total(&ours)),
            (format!("keep-alive {:.0} s", args.keep_alive_s), sim::total(&ka)),
            ("hybrid histogram".into(), sim::total(&hy)),
        ],
    };
    print!("{report}");
    println!(
        "idle budget {:.0} MiB ({:.0} clones of {:.0} MiB): at most {:.0} MiB wanted, binding at {} of {} ticks",
        host.host.idle_budget_mib,
        host.host.idle_budget_mib / host.clone_mib,
        host.clone_mib,
        stats.peak_budget_used_mib,
        stats.budget_binding_ticks,
        stats.ticks
    );
    let curve = (args.curve || args.plot.is_some()).then(|| sim::tradeoff(&trace, &policy, &host, restore_s));
    if let Some(curve) = &curve {
        print!("{}", sim::curve_table(curve, &host));
        if let Some(path) = &args.plot {
            let title = format!("{} ({} invocations)", report.trace, report.rows[0].1.invocations);
            std::fs::write(path, sim::curve_svg(curve, &title))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("plot written to {}", path.display());
        }
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report.json(curve.as_deref())).map_err(|e| e.to_string())?;
        std::fs::write(path, json + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
