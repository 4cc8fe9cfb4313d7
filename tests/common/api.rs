//! Talking to `ember serve` over its Unix socket from the integration tests.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember::serve::client::Client;
use serde_json::Value;

/// One HTTP/1.1 request with a JSON body on a fresh connection: (status, body).
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let (status, _, body) = http_bytes(socket, method, path, "application/json", body.unwrap_or("").as_bytes());
    (status, String::from_utf8(body).unwrap_or_else(|e| panic!("the body is not UTF-8: {e}")))
}

pub fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Asserts an error response: `status` and a JSON `{"error": ...}` containing `needle`.
pub fn assert_error(r: (u16, String), status: u16, needle: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    let v = json_of(&r.1);
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error field: {}", r.1));
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

/// The directories the guest images come from (the repository's `images/`, or where EMBER_KERNEL
/// and EMBER_INITRD point): the daemon's image directories.
pub fn image_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![super::repo().join("images")];
    for var in ["EMBER_KERNEL", "EMBER_INITRD"] {
        if let Some(parent) = std::env::var_os(var).and_then(|p| PathBuf::from(p).parent().map(Path::to_path_buf)) {
            dirs.push(parent);
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with_images(dir, &[])
    }

    /// A daemon whose image directories are the guest images' and `more`.
    pub fn start_with_images(dir: &Path, more: &[PathBuf]) -> Self {
        Self::start_with_args(dir, more, &[])
    }

    /// A daemon with more arguments.
    pub fn start_with_args(dir: &Path, more: &[PathBuf], args: &[&str]) -> Self {
        Self::start_with_env(dir, more, args, &[])
    }

    /// A daemon with more arguments and environment variables.
    pub fn start_with_env(dir: &Path, more: &[PathBuf], args: &[&str], env: &[(&str, &Path)]) -> Self {
        let socket = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "--socket", socket.to_str().unwrap(), "--state-dir", dir.join("state").to_str().unwrap()])
            .args(args)
            .envs(env.iter().copied())
            .args(image_dirs().iter().chain(more).flat_map(|d| ["--images".to_string(), d.display().to_string()]))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "ember serve did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A daemon whose image directory holds the python3 layer's tree builds that layer in the
        // background at start: done before the test goes on, so that nothing the test counts or
        // times (fds, threads, CPU) changes under it.
        // (Watched on disk, its record in the state directory: an API request would leave a
        // thread of the API's blocking pool behind for a while.)
        if super::repo().join("images/layers/python3/usr/bin/python3").exists() {
            let record = dir.join("state/layers/python3.json");
            let deadline = Instant::now() + Duration::from_secs(300);
            while !record.exists() {
                assert!(Instant::now() < deadline, "the daemon never provided the python3 layer");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { child, socket }
    }

    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    /// SIGTERM (the daemon stops its workers and removes their cgroups), SIGKILL if it has not
    /// ended within 20 s.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_ready(s: &Path, name: &str, min_ready: u64) -> Value {
    let deadline = Instant::now() + super::BOOT_TIMEOUT;
    loop {
        let (code, body) = http(s, "GET", &format!("/functions/{name}"), None);
        assert_eq!(code, 200, "{body}");
        let v = json_of(&body);
        assert_ne!(v["state"], "failed", "{body}");
        if v["state"] == "ready" && v["ready"].as_u64().unwrap_or(0) >= min_ready {
            return v;
        }
        assert!(Instant::now() < deadline, "function {name} never became ready: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn invoke(s: &Path, name: &str, body: &str) -> Value {
    // A generous timeout unless the test sets one: tests check answers, and a slow CI machine once
    // took over 30 s (the default) for a call while many busy guests shared its cores.
    let body = match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(mut o)) => {
            o.entry("timeout_s").or_insert(Value::from(300));
            Value::Object(o).to_string()
        }
        _ => body.to_string(),
    };
    let (code, resp) = http(s, "POST", &format!("/functions/{name}/invoke"), Some(&body));
    assert_eq!(code, 200, "{resp}");
    json_of(&resp)
}

/// The daemon's open file descriptors and threads.
pub fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: &str| std::fs::read_dir(format!("/proc/{pid}/{d}")).map(|r| r.count()).unwrap_or(0);
    (count("fd"), count("task"))
}

/// One HTTP/1.1 request with a raw body of `content_type` on a fresh connection (ember's client):
/// (status, head, body).
pub fn http_bytes(socket: &Path, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut c = Client::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    c.set_timeout(Some(Duration::from_secs(120))).unwrap();
    let r = c.request(method, path, content_type, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status, r.head, r.body)
}

/// Processes whose parent is `ppid`.
pub fn children(ppid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}
