//! `ember bench firecracker`: ember driven as Firecracker is. A guest is booted and snapshotted
//! through the Firecracker-compatible API (`ember firecracker`, this binary), then, run after run,
//! a new process loads the snapshot: process start -> API socket ready, the `PUT /snapshot/load`
//! round trip with `resume_vm`, and load -> the guest's agent answering over vsock; next to the
//! same restore of the same files in this process, without a process or an API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchError, Summary, TableReport};
use crate::config::VmConfig;
use crate::serve::client::Client;

/// The pause between runs (see `run`).
const SETTLE: Duration = Duration::from_millis(100);
/// How long a process started ahead idles before its load (a platform's pool keeps them longer).
const IDLE: Duration = Duration::from_millis(50);

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}

/// A child killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ember firecracker --api-sock SOCK`, once its socket accepts: the process and how long that took.
fn start(sock: &Path) -> Result<(Process, Duration), BenchError> {
    let exe = std::env::current_exe().map_err(|e| failed("this binary", e))?;
    let _ = std::fs::remove_file(sock);
    let t = Instant::now();
    let child = Command::new(exe)
        .args(["firecracker", "--api-sock"])
        .arg(sock)
        .args(["--level", "Warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed("ember firecracker", e))?;
    let p = Process(child);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(failed("ember firecracker", "its API socket never came up"));
        }
        // (Not a spin: the new process needs the cores it starts on.)
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok((p, t.elapsed()))
}

/// One API request on a new connection that must answer 204: its round trip.
fn put(sock: &Path, method: &str, path: &str, body: &serde_json::Value) -> Result<Duration, BenchError> {
    let mut c = Client::connect(sock).map_err(|e| failed(path, e))?;
    request(&mut c, method, path, Some(body), 204)
}

/// One API request on `c` that must answer `want`: its round trip.
fn request(
    c: &mut Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    want: u16,
) -> Result<Duration, BenchError> {
    let r = c.json_request(method, path, body).map_err(|e| failed(path, e))?;
    if r.status != want {
        return Err(failed(path, format!("answered {}: {}", r.status, r.text())));
    }
    Ok(r.round_trip)
}

/// Waits until the guest's agent answers an `echo` over vsock (a restored guest resets its
/// snapshot's connections when it runs again).
fn echo(vsock: &Path, timeout: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        // Each try waits a little (a connection the guest is not up to take waits for nothing).
        let answer = crate::channel::vsock::AgentConnection::connect(vsock, Duration::from_secs(2))
            .and_then(|mut c| c.call("echo", b"bench"));
        match answer {
            Ok(r) if r.status == ember_abi::Status::Ok => return Ok(()),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            Ok(r) => return Err(failed("echo", r.status.describe())),
            Err(e) => return Err(failed("echo over vsock", e)),
        }
    }
}

pub fn firecracker(cfg: &VmConfig, runs: usize, timeout: Duration) -> Result<TableReport, BenchError> {
    let dir = std::env::temp_dir().join(format!("ember-bench-firecracker-{}", std::process::id()));
    crate::sys::private_dir(&dir).map_err(|e| failed("scratch directory", e))?;
    let r = run(cfg, runs, timeout, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run(cfg: &VmConfig, runs: usize, timeout: Duration, dir: &Path) -> Result<TableReport, BenchError> {
    let (sock, vsock) = (dir.join("api.sock"), dir.join("v.sock"));
    let (state, mem): (PathBuf, PathBuf) = (dir.join("snapshot"), dir.join("memory"));
    // The snapshot, made through the API.
    {
        let (_p, _) = start(&sock)?;
        let b = &cfg.boot_source;
        let boot = serde_json::json!({"kernel_image_path": b.kernel_image_path, "initrd_path": b.initrd_path,
            "boot_args": b.boot_args});
        put(&sock, "PUT", "/boot-source", &boot)?;
        let m = &cfg.machine_config;
        put(
            &sock,
            "PUT",
            "/machine-config",
            &serde_json::json!({"vcpu_count": m.vcpu_count, "mem_size_mib": m.mem_size_mib}),
        )?;
        put(&sock, "PUT", "/vsock", &serde_json::json!({"guest_cid": 3, "uds_path": vsock}))?;
        put(&sock, "PUT", "/actions", &serde_json::json!({"action_type": "InstanceStart"}))?;
        echo(&vsock, timeout)?;
        put(&sock, "PATCH", "/vm", &serde_json::json!({"state": "Paused"}))?;
        put(&sock, "PUT", "/snapshot/create", &serde_json::json!({"snapshot_path": state, "mem_file_path": mem}))?;
    }
    let load = serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true});
    let (mut started, mut loads, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    let (mut answering, mut ahead_loads) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // A load sent as soon as the process's socket accepts (its request waits for the rest of
        // the process's start and for the VM shell it makes ahead).
        let _ = std::fs::remove_file(&vsock);
        // The previous run's process and guest are gone; what the kernel still frees after them
        // (its memory, its VM) is let finish, so that it is not measured as this run's load.
        std::thread::sleep(SETTLE);
        let (p, up) = start(&sock)?;
        started.push(up.as_secs_f64() * 1e3);
        let t = Instant::now();
        loads.push(put(&sock, "PUT", "/snapshot/load", &load)?.as_secs_f64() * 1e3);
        echo(&vsock, timeout)?;
        answers.push(t.elapsed().as_secs_f64() * 1e3);
        drop(p);
        // A load into a process started ahead, as a platform keeps them: it answered (GET /, as
        // the Go SDK waits for its socket) and has idled for IDLE.
        let _ = std::fs::remove_file(&vsock);
        std::thread::sleep(SETTLE);
        let t = Instant::now();
        let (_p, _) = start(&sock)?;
        let mut c = Client::connect(&sock).map_err(|e| failed("GET /", e))?;
        request(&mut c, "GET", "/", None, 200)?;
        answering.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(IDLE);
        // On the connection GET / was answered on (clients keep theirs alive, as Go's does).
        let took = request(&mut c, "PUT", "/snapshot/load", Some(&load), 204)?;
        ahead_loads.push(took.as_secs_f64() * 1e3);
        echo(&vsock, timeout)?;
    }
    // The same files restored in this process: what a load is without a process and an API.
    let bytes = crate::snapshot::read_limited(&state, crate::snapshot::MAX_STATE_LEN + 4096)
        .map_err(|e| failed("the snapshot", e))?;
    let st = crate::vmm::persist::SnapshotState::decode(&bytes, &state).map_err(|e| failed("the snapshot", e))?;
    let memory = crate::snapshot::MemoryFile::open(&mem, st.machine.mem_bytes).map_err(|e| failed("the memory", e))?;
    let mut in_process = Vec::new();
    for _ in 0..runs {
        std::thread::sleep(SETTLE);
        let t = Instant::now();
        let vm = crate::vmm::Vm::restore(&st, &memory, 1, &crate::vmm::Channels::default(), Box::new(std::io::sink()))
            .and_then(|vm| vm.start(crate::vmm::RunOptions::default()))
            .map_err(|e| failed("restore", e))?;
        in_process.push(t.elapsed().as_secs_f64() * 1e3);
        drop(vm.stop("measured"));
    }
    Ok(TableReport {
        title: format!("ember bench firecracker: {runs} loads of one snapshot, each in a new process"),
        heading: "latency (ms)",
        width: 66,
        rows: vec![
            ("process start -> API socket accepts".into(), Summary::of(&started)),
            ("process start -> API answers (GET /)".into(), Summary::of(&answering)),
            ("PUT /snapshot/load (resume_vm) round trip, sent on accept".into(), Summary::of(&loads)),
            ("the same, into a process started ahead".into(), Summary::of(&ahead_loads)),
            ("load request -> the guest's agent answers over vsock".into(), Summary::of(&answers)),
            ("the same restore + start in-process, no API".into(), Summary::of(&in_process)),
        ],
        notes: vec![
            "each load: a new `ember firecracker` process, the snapshot made through its API (PATCH /vm Paused, \
             PUT /snapshot/create), loaded with mem_backend File and resume_vm"
                .into(),
            format!(
                "sent on accept: the load is written as soon as the socket accepts, and waits for the rest of the \
                 process's start; started ahead: the process answered GET / and idled {} ms first, and the load goes on GET's connection",
                IDLE.as_millis()
            ),
            "the in-process row restores the same files with Vm::restore + start, without a VM shell made ahead".into(),
        ],
    })
}
