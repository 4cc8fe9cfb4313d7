//! ember's runtimes (`python3`, `exec`): a runtime process speaking protocol 2
//! (ember_abi::runtime) on fds 3 and 4, its stdout and stderr collected as the function's log.
//!
//! The agent starts it before the snapshot and waits for its READY (the handler loaded), so the
//! template holds a runtime that has imported the handler. An ERROR before READY, or the runtime
//! exiting, fails the boot with the runtime's own words.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_abi::runtime::{self as proto, json_string};
use ember_abi::Status;

/// ember's Python bootstrap, written into the function's root when the runtime starts.
const PYTHON_BOOTSTRAP: &str = include_str!("bootstrap.py");
const BOOTSTRAP_PATH: &str = "run/ember/bootstrap.py";
const PYTHON: &str = "usr/bin/python3";
/// Where a function's code layer is (its working directory).
pub const CODE_DIR: &str = "/var/task";
/// The most log bytes kept per invocation; the rest is counted and marked truncated.
pub const MAX_LOG: usize = 64 << 10;
/// How long the runtime may take to load the handler.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long after an invocation's deadline the agent gives up on the runtime.
const GRACE: Duration = Duration::from_secs(1);
/// What of the runtime's output before READY is relayed to the console, at most.
const MAX_START_OUTPUT: usize = 8 << 10;

/// An invocation's log: the runtime's stdout and stderr while it ran, bounded.
#[derive(Default)]
pub struct Log {
    pub text: Vec<u8>,
    pub dropped: u64,
}

impl Log {
    fn take(&mut self, b: &[u8]) {
        let room = MAX_LOG.saturating_sub(self.text.len());
        let n = room.min(b.len());
        self.text.extend_from_slice(&b[..n]);
        self.dropped += (b.len() - n) as u64;
    }

    /// The response's meta object: the log and, for an error, the runtime's report.
    pub fn meta(&self, error: Option<&[u8]>) -> String {
        let mut m = String::from("{\"logs\":");
        json_string(&mut m, &self.text);
        m.push_str(&format!(",\"logs_truncated\":{}", self.dropped > 0));
        if self.dropped > 0 {
            m.push_str(&format!(",\"logs_dropped_bytes\":{}", self.dropped));
        }
        if let Some(e) = error {
            // Passed on as the runtime wrote it: the host parses (and bounds) it.
            m.push_str(",\"error\":");
            m.push_str(&String::from_utf8_lossy(e));
        }
        m.push('}');
        m
    }
}

pub struct Managed {
    pub name: String,
    child: Child,
    requests: File,
    replies: File,
    output: File,
    /// Reply bytes read but not yet a whole frame.
    pending: Vec<u8>,
}

/// A pipe's two ends, numbered 10 and up (so that the child's dup2 onto 3 and 4 never meets
/// them), close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::with_capacity(2);
    for fd in fds {
        // SAFETY: `fd` is a pipe end we just created and own; F_DUPFD_CLOEXEC makes a copy >= 10.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        let err = io::Error::last_os_error();
        // SAFETY: `fd` is ours, closed once.
        unsafe { libc::close(fd) };
        if high < 0 {
            return Err(err);
        }
        // SAFETY: `high` is a fresh fd we own.
        out.push(unsafe { OwnedFd::from_raw_fd(high) });
    }
    let w = out.pop().ok_or_else(|| io::Error::other("pipe"))?;
    let r = out.pop().ok_or_else(|| io::Error::other("pipe"))?;
    Ok((r, w))
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Managed {
    /// Starts runtime `name` (one of ember_abi::runtime::KNOWN_RUNTIMES) for `handler`, chrooted
    /// into `root`, and waits until it has loaded the handler.
    pub fn start(name: &str, handler: &str, root: Option<&Path>) -> io::Result<Self> {
        proto::check_handler(name, handler).map_err(io::Error::other)?;
        let root = root.ok_or_else(|| {
            io::Error::other(format!("runtime {name} needs a root from layers (the function has none)"))
        })?;
        let (program, args): (String, Vec<String>) = match name {
            "python3" => {
                if !root.join(PYTHON).exists() {
                    return Err(io::Error::other(format!(
                        "runtime python3: /{PYTHON} is not in the function's layers (add the python3 layer)"
                    )));
                }
                let path = root.join(BOOTSTRAP_PATH);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, PYTHON_BOOTSTRAP)?;
                (format!("/{PYTHON}"), vec!["-B".into(), format!("/{BOOTSTRAP_PATH}")])
            }
            _ => {
                let program =
                    if handler.starts_with('/') { handler.to_string() } else { format!("{CODE_DIR}/{handler}") };
                if !root.join(program.trim_start_matches('/')).is_file() {
                    return Err(io::Error::other(format!("runtime exec: {program} is not in the function's layers")));
                }
                (program, Vec::new())
            }
        };
        let (req_r, req_w) = pipe()?;
        let (rep_r, rep_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let out_w2 = out_w.try_clone()?;
        let workdir = if root.join(CODE_DIR.trim_start_matches('/')).is_dir() { CODE_DIR } else { "/" };
        let root_c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let workdir_c = std::ffi::CString::new(workdir).map_err(io::Error::other)?;
        let (req_fd, rep_fd) = (req_r.as_raw_fd(), rep_w.as_raw_fd());
        let mut command = Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/tmp")
            .env("LANG", "C.UTF-8")
            .env("EMBER_RUNTIME_PROTOCOL", "2")
            .env("EMBER_HANDLER", handler)
            // The kernel command line's workarounds for the host's CPU (ember's cmdline file).
            .envs(std::env::vars_os().filter(|(k, _)| k == "GLIBC_TUNABLES"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2));
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls (chroot,
        // chdir, dup2) on values prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::chroot(root_c.as_ptr()) != 0
                    || libc::chdir(workdir_c.as_ptr()) != 0
                    || libc::dup2(req_fd, proto::REQUEST_FD) < 0
                    || libc::dup2(rep_fd, proto::REPLY_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| io::Error::other(format!("runtime {name}: {program}: {e}")))?;
        drop((req_r, rep_w, command));
        set_nonblocking(&rep_r)?;
        set_nonblocking(&out_r)?;
        let mut m = Self {
            name: name.to_string(),
            child,
            requests: File::from(req_w),
            replies: File::from(rep_r),
            output: File::from(out_r),
            pending: Vec::new(),
        };
        let started = Instant::now();
        let mut early = Log::default();
        let reply = m.next_reply(started + START_TIMEOUT, &mut early);
        let output = String::from_utf8_lossy(&early.text[..early.text.len().min(MAX_START_OUTPUT)]).into_owned();
        for line in output.lines() {
            println!("ember-agent: {name}: {line}");
        }
        match reply {
            Ok((proto::READY, body)) => {
                println!(
                    "ember-agent: runtime {name} ready ({}) in {:.2} s, handler {handler}",
                    String::from_utf8_lossy(&body[..body.len().min(256)]),
                    started.elapsed().as_secs_f64()
                );
                Ok(m)
            }
            Ok((proto::ERROR, body)) => {
                m.kill();
                Err(io::Error::other(format!("runtime {name} cannot load handler {handler}: {}", error_line(&body))))
            }
            Ok((kind, _)) => {
                m.kill();
                Err(io::Error::other(format!("runtime {name}: frame kind {kind} before READY")))
            }
            Err(e) => {
                m.kill();
                let last = output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
                Err(io::Error::other(format!("runtime {name} did not start: {e}; its last output: {last:?}")))
            }
        }
    }

    /// Tells the runtime it now runs in clone `clone_id` (the RNG is reseeded already).
    pub fn restored(&mut self, clone_id: u64) -> io::Result<()> {
        let body = format!("{{\"clone_id\":{clone_id}}}");
        self.send(proto::RESTORED, &[body.as_bytes()])
    }

    fn send(&mut self, kind: u32, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut frame = Vec::with_capacity(proto::FRAME_HEADER + len);
        frame.extend_from_slice(&proto::header(kind, len));
        for p in parts {
            frame.extend_from_slice(p);
        }
        self.requests.write_all(&frame)
    }

    /// Runs one invocation: its result (or the runtime's error report) in `out`, its output in
    /// `log`. `Err` when the runtime broke the protocol, died or overran the deadline: it is not
    /// used again.
    pub fn invoke(
        &mut self,
        context: &[u8],
        timeout: Duration,
        event: &[u8],
        out: &mut Vec<u8>,
        log: &mut Log,
    ) -> io::Result<Status> {
        let deadline = Instant::now() + timeout;
        let deadline_ns = monotonic_ns().saturating_add(timeout.as_nanos() as u64);
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&deadline_ns.to_le_bytes());
        head[8..].copy_from_slice(&(context.len() as u32).to_le_bytes());
        self.send(proto::INVOKE, &[&head, context, event])?;
        let (kind, body) = self.next_reply(deadline + GRACE, log)?;
        // What the runtime wrote before its answer is in the pipe already.
        self.drain_output(log);
        out.extend_from_slice(&body);
        match kind {
            proto::RESULT => Ok(Status::Ok),
            proto::ERROR => Ok(Status::Error),
            k => Err(io::Error::other(format!("unexpected frame kind {k}"))),
        }
    }

    /// The next reply frame, collecting output meanwhile; an error at `deadline` or when the
    /// runtime closes its end.
    fn next_reply(&mut self, deadline: Instant, log: &mut Log) -> io::Result<(u32, Vec<u8>)> {
        let mut buf = [0u8; 16 << 10];
        loop {
            if self.pending.len() >= proto::FRAME_HEADER {
                let mut h = [0u8; proto::FRAME_HEADER];
                h.copy_from_slice(&self.pending[..proto::FRAME_HEADER]);
                let (kind, len) = proto::parse_header(&h).map_err(io::Error::other)?;
                if self.pending.len() >= proto::FRAME_HEADER + len {
                    let body = self.pending[proto::FRAME_HEADER..proto::FRAME_HEADER + len].to_vec();
                    self.pending.drain(..proto::FRAME_HEADER + len);
                    return Ok((kind, body));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!("no answer from the runtime in time ({:?} over)", GRACE)));
            }
            let mut fds = [
                libc::pollfd { fd: self.replies.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.output.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: poll reads and writes the two pollfds of the array we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                self.drain_output(log);
            }
            if fds[0].revents != 0 {
                match self.replies.read(&mut buf) {
                    Ok(0) => {
                        self.drain_output(log);
                        // It is exiting (its files close before its exit is reported) or it closed
                        // the channel and goes on: either way it is done with.
                        let _ = self.child.kill();
                        let status = self.child.wait();
                        use std::os::unix::process::ExitStatusExt;
                        return Err(io::Error::other(match status {
                            Ok(s) if s.signal() != Some(libc::SIGKILL) => format!("the runtime exited ({s})"),
                            _ => "the runtime closed its reply channel".to_string(),
                        }));
                    }
                    Ok(n) => {
                        if self.pending.len() + n > proto::FRAME_HEADER + proto::MAX_FRAME {
                            return Err(io::Error::other("reply frame too large"));
                        }
                        self.pending.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Reads whatever output is there now (never blocks).
    fn drain_output(&mut self, log: &mut Log) {
        let mut buf = [0u8; 16 << 10];
        loop {
            match self.output.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => log.take(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's CLOCK_MONOTONIC, in nanoseconds (what a runtime's monotonic clock reads).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// One line from a runtime's ERROR report (`{"type", "message", ...}`): `type: message`, else the
/// report itself, shortened.
fn error_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let field = |name: &str| -> Option<String> {
        let key = format!("\"{name}\":");
        let start = text.find(&key)? + key.len();
        let rest = text[start..].trim_start().strip_prefix('"')?;
        let mut s = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(s),
                '\\' => match chars.next()? {
                    'n' => s.push(' '),
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
        None
    };
    let line = match (field("type"), field("message")) {
        (Some(t), Some(m)) => format!("{t}: {m}"),
        _ => text.into_owned(),
    };
    line.chars().filter(|c| !c.is_control()).take(600).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_bounded_and_meta_is_json_shaped() {
        let mut l = Log::default();
        l.take(b"line \"one\"\n");
        assert_eq!(l.meta(None), r#"{"logs":"line \"one\"\n","logs_truncated":false}"#);
        l.take(&vec![b'x'; MAX_LOG]);
        assert_eq!(l.text.len(), MAX_LOG);
        assert!(l.meta(Some(br#"{"type":"E"}"#)).ends_with(r#""logs_dropped_bytes":11,"error":{"type":"E"}}"#));
    }

    #[test]
    fn error_lines_come_from_the_report() {
        assert_eq!(
            error_line(br#"{"type": "ModuleNotFoundError", "message": "No module named 'app'", "traceback": "..."}"#),
            "ModuleNotFoundError: No module named 'app'"
        );
        assert_eq!(error_line(b"not json"), "not json");
    }
}
