//! `ember bench python`: what ember's Python runtime costs, in one run on the same host and guest.
//!
//! - a fresh boot of a Python function to ready (kernel boot, the layers mounted, the interpreter
//!   started, the handler imported): what every call would wait for without snapshots, and what
//!   making its template takes (`--boots` of them);
//! - restore -> first answer from the handler (the cold start a user sees), against restore ->
//!   first answer from the agent's built-in `echo` on clones of the same template (the baseline:
//!   the same clone without the runtime in the path), over `--runs` clones each;
//! - a warm no-op invocation on one clone through the mailbox, Python handler against `echo`;
//! - the same through the daemon's API (`POST /functions/{name}/invoke` on a recycled clone,
//!   HTTP/1.1 on a Unix socket, the invocation's context, logs and meta included), Python against
//!   `echo` from the same template;
//! - private host memory per idle Python clone, `--clones` of them started and each called once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::handoff::{daemon, register, request, round, wait_full, wait_quiet};
use super::layers::{call, clone_of};
use super::restore::private_kib;
use super::{ms, BenchError, Summary, TableReport};
use crate::config::{DriveConfig, VmConfig};
use crate::image::{Limits, Store};
use crate::serve::client::Client;
use crate::template::{MakeOptions, Template};

/// What `ember bench python` measures.
pub struct PythonBench {
    /// The python3 layer's tree (scripts/build-python-layer.sh).
    pub python: PathBuf,
    pub boots: usize,
    pub runs: usize,
    pub calls: usize,
    pub clones: usize,
    pub timeout: Duration,
}

const HANDLER: &str = "def handler(event, context):\n    return event\n";

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}

pub fn python(cfg: &VmConfig, b: &PythonBench) -> Result<TableReport, BenchError> {
    let scratch = std::env::temp_dir().join(format!("ember-bench-python-{}", std::process::id()));
    let r = run(cfg, b, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

fn run(cfg: &VmConfig, b: &PythonBench, scratch: &Path) -> Result<TableReport, BenchError> {
    let io = |what: &'static str| move |e: std::io::Error| failed(what, e);
    let mut rows: Vec<(String, Option<Summary>)> = Vec::new();
    let mut notes = Vec::new();
    if !b.python.join("usr/bin/python3").exists() {
        return Err(failed(
            "python3 layer",
            format!("{} has no usr/bin/python3 (run scripts/build-python-layer.sh)", b.python.display()),
        ));
    }

    // The layers: ember's python3 layer and a code layer with a no-op handler.
    let code = scratch.join("code");
    std::fs::create_dir_all(&code).map_err(io("scratch"))?;
    std::fs::write(code.join("app.py"), HANDLER).map_err(io("handler"))?;
    let store = Store::open(&scratch.join("images")).map_err(io("image store"))?;
    let limits = Limits::default();
    let python = store.build(&b.python, &limits).map_err(|e| failed("python3 layer", e))?;
    let code = store.build_at(&code, Path::new("var/task"), &limits).map_err(|e| failed("code layer", e))?;
    notes.push(format!(
        "the python3 layer: {:.1} MiB EROFS image, built in {:.1} s",
        python.layer.size as f64 / (1 << 20) as f64,
        python.seconds
    ));
    let mut vm_cfg = cfg.clone().with_layers(vec![
        DriveConfig::read_only("l0", python.layer.path.clone()),
        DriveConfig::read_only("code", code.layer.path.clone()),
    ]);
    vm_cfg.boot_source.boot_args =
        Some(format!("{} EMBER_RUNTIME=\"python3\" EMBER_HANDLER=\"app.handler\"", vm_cfg.cmdline()));

    // Fresh boots to ready; the last one is the template.
    let mut boot_s = Vec::new();
    let mut template = None;
    for i in 0..b.boots.max(1) {
        let dir = scratch.join(format!("template-{i}"));
        let opts = MakeOptions { working_set: false, timeout: b.timeout, ..Default::default() };
        let t = Instant::now();
        let made = Template::make(&vm_cfg, &dir, opts)?;
        boot_s.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(old) = template.replace((made.template, dir)) {
            drop(old.0);
            let _ = std::fs::remove_dir_all(old.1);
        }
    }
    let (t, template_dir) = template.ok_or_else(|| failed("template", "none made"))?;
    rows.push(("fresh boot -> Python ready (template made) (ms)".into(), Summary::of(&boot_s)));

    // Restore -> first answer, alternating Python and echo clones of the one template.
    let (mut py_ms, mut echo_ms) = (Vec::new(), Vec::new());
    for i in 0..b.runs {
        for (samples, function, payload) in [(&mut py_ms, "python3", "{}"), (&mut echo_ms, "echo", "{}")] {
            let start = Instant::now();
            let vm = clone_of(&t, 10 + i as u64 * 2 + u64::from(function == "echo"))?;
            call(&vm, function, payload, b.timeout)?;
            samples.push(ms(start.elapsed()));
            vm.stop("measured");
        }
    }
    let (py, echo) = (Summary::of(&py_ms), Summary::of(&echo_ms));
    rows.push(("restore -> first answer, Python handler (ms)".into(), py.clone()));
    rows.push(("restore -> first answer, built-in echo, same template (ms)".into(), echo.clone()));
    if let (Some(py), Some(echo), Some(boot)) = (py, echo, Summary::of(&boot_s)) {
        notes.push(format!(
            "cold start from the template / a fresh boot, p50: {:.4}x ({:.1} ms against {:.1} s); Python / echo: {:.2}x",
            py.p50 / boot.p50,
            py.p50,
            boot.p50 / 1e3,
            py.p50 / echo.p50
        ));
    }

    // Warm no-op calls on one clone through the mailbox.
    let vm = clone_of(&t, 5)?;
    call(&vm, "python3", "{}", b.timeout)?;
    let warm = |function: &str| -> Result<Option<Summary>, BenchError> {
        let mut v = Vec::with_capacity(b.calls);
        for _ in 0..b.calls {
            let s = Instant::now();
            call(&vm, function, "{}", b.timeout)?;
            v.push(s.elapsed().as_secs_f64() * 1e6);
        }
        Ok(Summary::of(&v))
    };
    let (py_warm, echo_warm) = (warm("python3")?, warm("echo")?);
    vm.stop("measured");
    rows.push(("warm no-op invoke, mailbox, Python handler (us)".into(), py_warm));
    rows.push(("warm no-op invoke, mailbox, built-in echo (us)".into(), echo_warm));

    // Through the daemon's API.
    api_rounds(&template_dir, scratch, b, &mut rows, &mut notes).map_err(|e| failed("through the API", e))?;

    // Memory per idle Python clone: started, called once, then left idle.
    let before = private_kib();
    let mut held = Vec::with_capacity(b.clones);
    for i in 0..b.clones {
        let vm = clone_of(&t, 100_000 + i as u64)?;
        call(&vm, "python3", "{}", b.timeout)?;
        held.push(vm);
    }
    wait_quiet();
    let after = private_kib();
    for vm in held {
        vm.stop("measured");
    }
    notes.push(format!(
        "{} idle Python clones (started, each called once, {} MiB guests): {:.2} MiB private host memory per clone",
        b.clones,
        cfg.machine_config.mem_size_mib,
        after.saturating_sub(before) as f64 / 1024.0 / b.clones.max(1) as f64
    ));
    Ok(TableReport {
        title: format!("ember bench python: {} boots, {} runs, {} calls", b.boots.max(1), b.runs, b.calls),
        heading: "measure",
        width: 60,
        rows,
        notes,
    })
}

/// Invocations through an in-process daemon serving the template twice: as a Python function
/// (the context in an envelope, the log and meta back) and as `echo`.
fn api_rounds(
    template: &Path,
    scratch: &Path,
    b: &PythonBench,
    rows: &mut Vec<(String, Option<Summary>)>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let state = scratch.join("state");
    let pool = serde_json::json!({"min_ready": 2, "max": 8, "max_uses": u32::MAX, "headroom": 1.0,
        "scale_in_delay_s": 3600.0, "burst_window_s": 0.0});
    register(
        template,
        &state,
        "py",
        pool.clone(),
        serde_json::json!({"runtime": "python3", "handler": "app.handler"}),
    )?;
    register(template, &state, "echo", pool, serde_json::json!({"handler": "echo"}))?;
    let socket = scratch.join("api.sock");
    let isolation = crate::isolation::worker::Isolation::default_for_this_user();
    let daemon = daemon(&state, &socket, isolation, None, crate::serve::DEFAULT_API_THREADS)?;
    let sup = daemon.supervisor().clone();
    let result = (|| {
        wait_full(&sup, "py", 2)?;
        wait_full(&sup, "echo", 2)?;
        // One call each first: the recycled clone's first call is its cold start (measured above).
        for name in ["py", "echo"] {
            let mut c = Client::connect(&socket).map_err(|e| e.to_string())?;
            let t = request(&mut c, "POST", &format!("/functions/{name}/invoke"), r#"{"payload": "{}"}"#)
                .map_err(|e| e.to_string())?;
            if t.status != 200 {
                return Err(format!("{name}: {}", String::from_utf8_lossy(&t.body)));
            }
        }
        wait_quiet();
        sup.pause_scaling(true);
        for name in ["py", "echo"] {
            // The previous round's clone polls on for a while after its last call: not beside this one.
            wait_quiet();
            let invoke =
                move |c: &mut Client| request(c, "POST", &format!("/functions/{name}/invoke"), r#"{"payload": "{}"}"#);
            let (rtt, srv) = round(&socket, 1, b.calls, &invoke, &move |_, t| {
                let v: serde_json::Value = serde_json::from_slice(&t.body).map_err(|e| e.to_string())?;
                if v["status"] != "ok" {
                    return Err(format!("{name} answered {v}"));
                }
                Ok(())
            })?;
            let what = if name == "py" { "Python handler" } else { "built-in echo" };
            rows.push((format!("warm no-op invoke, API, {what}: round trip (us)"), Summary::of(&rtt)));
            rows.push((format!("warm no-op invoke, API, {what}: in the daemon (us)"), Summary::of(&srv)));
        }
        notes.push(
            "API: POST /functions/{name}/invoke on a recycled clone, 1 client, HTTP/1.1 on a kept-alive Unix-socket \
             connection; in the daemon: its server-timing header"
                .into(),
        );
        Ok(())
    })();
    daemon.stop();
    result
}
