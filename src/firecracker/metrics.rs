//! Firecracker's metrics: configured once (`PUT /metrics` or `--metrics-path`), then written as
//! one JSON object per line to that file or named pipe every [`FLUSH_PERIOD`], on `FlushMetrics`
//! and when the process ends. Counters report what happened since the previous line (Firecracker's
//! "per flush" counts); latencies and start-up times are the latest values.
//!
//! The groups ember writes, with Firecracker's names: `utc_timestamp_ms`, `id` and `properties`
//! (when asked for), `api_server`, `get_api_requests`, `put_api_requests`, `patch_api_requests`,
//! `latencies_us`, and from the VM once it runs `vcpu`, `block`/`block_ID` and `net`/`net_ID`.
//! Groups of devices ember does not have (balloon, MMDS, entropy, ...) are not written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::Method;
use serde_json::{Map, Value};

use super::model::{Fault, MetricsConfig};
use crate::sys::Locked;

/// How often a line is written without being asked (Firecracker's period).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// Each request group's counters, Firecracker's names (each `X` has `X_count`, and for PUT and
/// PATCH `X_fails`).
const GET: &[&str] = &["instance_info", "machine_cfg", "mmds", "vmm_version", "hotplug_memory"];
const PUT: &[&str] = &[
    "actions",
    "boot_source",
    "drive",
    "logger",
    "machine_cfg",
    "cpu_cfg",
    "metrics",
    "network",
    "mmds",
    "vsock",
    "pmem",
    "serial",
    "hotplug_memory",
];
const PATCH: &[&str] = &["drive", "network", "machine_cfg", "mmds", "hotplug_memory", "pmem"];
/// The latencies (µs) ember measures: the API's whole request, and the VMM's part of it.
const LATENCIES: &[&str] = &[
    "full_create_snapshot",
    "diff_create_snapshot",
    "load_snapshot",
    "pause_vm",
    "resume_vm",
    "vmm_full_create_snapshot",
    "vmm_diff_create_snapshot",
    "vmm_load_snapshot",
    "vmm_pause_vm",
    "vmm_resume_vm",
];

/// The request group a request is counted in: (`get_api_requests`, ...) and the counter's stem.
fn counted(method: &Method, path: &str) -> Option<(&'static str, &'static str)> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let stem = match first {
        "" => "instance_info",
        "version" => "vmm_version",
        "machine-config" => "machine_cfg",
        "boot-source" => "boot_source",
        "drives" => "drive",
        "network-interfaces" => "network",
        "cpu-config" => "cpu_cfg",
        "hotplug" => "hotplug_memory",
        "actions" | "logger" | "metrics" | "mmds" | "vsock" | "pmem" | "serial" => first,
        _ => return None,
    };
    let (group, stems) = match *method {
        Method::GET => ("get_api_requests", GET),
        Method::PUT => ("put_api_requests", PUT),
        Method::PATCH => ("patch_api_requests", PATCH),
        _ => return None,
    };
    let stem = stems.iter().find(|s| **s == stem)?;
    Some((group, stem))
}

#[derive(Default)]
struct Inner {
    out: Option<File>,
    emit_id: bool,
    properties: Option<BTreeMap<String, String>>,
    /// Requests by (group, counter name), since the last line.
    requests: BTreeMap<(&'static str, String), u64>,
    latencies: BTreeMap<&'static str, u64>,
    api_server: Map<String, Value>,
}

/// The process's metrics.
#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    /// Starts writing to `c.metrics_path` (a file, created if missing and appended to, or a
    /// named pipe, never waited on); only once per process, as in Firecracker.
    pub fn configure(&self, c: &MetricsConfig) -> Result<(), Fault> {
        let mut m = self.0.locked();
        if m.out.is_some() {
            return Err(Fault::new("Reinitialization of metrics not allowed."));
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&c.metrics_path)
            .map_err(|e| Fault::new(format!("Cannot initialize the metrics system due to bad user input: {e}")))?;
        (m.out, m.emit_id, m.properties) = (Some(f), c.emit_id, c.properties.clone());
        Ok(())
    }

    pub fn configured(&self) -> bool {
        self.0.locked().out.is_some()
    }

    /// Counts one request (and, when it was refused, one failure of it).
    pub fn request(&self, method: &Method, path: &str, failed: bool) {
        let Some((group, stem)) = counted(method, path) else { return };
        let mut m = self.0.locked();
        *m.requests.entry((group, format!("{stem}_count"))).or_default() += 1;
        if failed && group != "get_api_requests" {
            *m.requests.entry((group, format!("{stem}_fails"))).or_default() += 1;
        }
    }

    /// Records the latest latency of `what` (one of Firecracker's `latencies_us`).
    pub fn latency(&self, what: &'static str, d: Duration) {
        if LATENCIES.contains(&what) {
            self.0.locked().latencies.insert(what, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// The process's start-up: from its start to the API socket serving, in wall-clock and CPU
    /// time.
    pub fn started(&self, wall: Duration, cpu: Duration) {
        let mut m = self.0.locked();
        m.api_server.insert("process_startup_time_us".into(), (wall.as_micros() as u64).into());
        m.api_server.insert("process_startup_time_cpu_us".into(), (cpu.as_micros() as u64).into());
    }

    /// Writes one line: the counters since the last one, and `vm`'s (the microVM's counters, once
    /// it runs). `Ok(false)` when metrics are not configured (nothing is written, as in
    /// Firecracker).
    pub fn flush(&self, id: &str, vm: Option<Map<String, Value>>) -> Result<bool, Fault> {
        let mut m = self.0.locked();
        if m.out.is_none() {
            return Ok(false);
        }
        let line = Self::line(&mut m, id, vm);
        let Some(out) = m.out.as_mut() else { return Ok(false) };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| Fault::new(format!("Failed to write metrics: {e}")))?;
        bytes.push(b'\n');
        out.write_all(&bytes).map_err(|e| Fault::new(format!("Failed to write metrics: {e}")))?;
        Ok(true)
    }

    fn line(m: &mut Inner, id: &str, vm: Option<Map<String, Value>>) -> Map<String, Value> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut line = Map::new();
        line.insert("utc_timestamp_ms".into(), (now.as_millis() as u64).into());
        if m.emit_id {
            line.insert("id".into(), id.into());
        }
        if let Some(p) = &m.properties {
            line.insert("properties".into(), serde_json::to_value(p).unwrap_or_default());
        }
        line.insert("api_server".into(), m.api_server.clone().into());
        let requests = std::mem::take(&mut m.requests);
        for (group, stems) in [("get_api_requests", GET), ("put_api_requests", PUT), ("patch_api_requests", PATCH)] {
            let mut g = Map::new();
            for stem in stems {
                let mut names = vec![format!("{stem}_count")];
                if group != "get_api_requests" {
                    names.push(format!("{stem}_fails"));
                }
                for n in names {
                    let v = requests.get(&(group, n.clone())).copied().unwrap_or(0);
                    g.insert(n, v.into());
                }
            }
            line.insert(group.into(), g.into());
        }
        let latencies: Map<String, Value> =
            LATENCIES.iter().map(|l| (l.to_string(), m.latencies.get(l).copied().unwrap_or(0).into())).collect();
        line.insert("latencies_us".into(), latencies.into());
        line.extend(vm.unwrap_or_default());
        line
    }
}

/// This process's CPU time so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn requests_are_counted_per_line_with_firecrackers_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let m = Metrics::default();
        assert!(!m.flush("vm", None).unwrap(), "nothing is written before it is configured");
        let cfg = MetricsConfig { metrics_path: path.clone(), emit_id: true, properties: None };
        m.configure(&cfg).unwrap();
        assert!(m.configure(&cfg).unwrap_err().0.contains("Reinitialization"));
        m.request(&Method::PUT, "/drives/root", false);
        m.request(&Method::PUT, "/drives/data", true);
        m.request(&Method::GET, "/", false);
        m.request(&Method::PATCH, "/network-interfaces/eth0", true);
        m.request(&Method::DELETE, "/drives/x", true);
        m.latency("pause_vm", Duration::from_micros(42));
        let mut vm = Map::new();
        vm.insert("vcpu".into(), serde_json::json!({"exit_io_in": 3}));
        assert!(m.flush("vm-1", Some(vm)).unwrap());
        assert!(m.flush("vm-1", None).unwrap());
        let l = lines(&path);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["id"], "vm-1");
        assert_eq!(
            (l[0]["put_api_requests"]["drive_count"].as_u64(), l[0]["put_api_requests"]["drive_fails"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(l[0]["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(l[0]["patch_api_requests"]["network_fails"], 1);
        assert_eq!(l[0]["latencies_us"]["pause_vm"], 42);
        assert_eq!(l[0]["vcpu"]["exit_io_in"], 3);
        assert!(l[0]["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        // Counters are per line; latencies are the latest value.
        assert_eq!(l[1]["put_api_requests"]["drive_count"], 0);
        assert_eq!(l[1]["latencies_us"]["pause_vm"], 42);
    }

    #[test]
    fn a_path_that_cannot_be_opened_is_refused() {
        let m = Metrics::default();
        let cfg = MetricsConfig { metrics_path: "/nonexistent/dir/m.json".into(), ..Default::default() };
        assert!(m.configure(&cfg).unwrap_err().0.contains("Cannot initialize the metrics system"));
        assert!(!m.configured());
    }
}
