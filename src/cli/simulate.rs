//! `ember simulate`: trace replay against the autoscaler and a keep-alive policy, or a synthetic
//! trace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub(crate) struct SimulateArgs {
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

pub(crate) fn simulate(args: SimulateArgs) -> Result<ExitCode, String> {
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
