//! The functions the agent serves: built-ins for tests and benchmarks (`echo`, `sha256`, `sleep`,
//! `cpu-stat`, `clock`, `vsock-ping`, `storm`: a guest misbehaving on purpose) and the image's own
//! runtime, a long-running process started before the snapshot
//! that reads requests on stdin and writes responses on stdout:
//!
//! ```text
//! request:  u32 payload length, payload            (little-endian)
//! response: u32 status, u32 payload length, payload
//! ```
//!
//! The runtime is named in the image's `/etc/ember/runtime`: one line, `NAME COMMAND [ARGS...]`
//! (protocol 1, ember_abi::runtime); `EMBER_RUNTIME` in init's environment (from the kernel
//! command line: `ember serve` puts the registration's `runtime` there) replaces it. When that is
//! one of ember's own runtimes (`python3`, `exec`: protocol 2, managed.rs), `EMBER_HANDLER` names
//! its entry point and the function is served under the runtime's name. A function with layers
//! has its root there (layers.rs): its `/etc/ember/runtime` is read from that root and the
//! runtime runs chrooted into it.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ember_abi::Status;
use sha2::{Digest, Sha256};

use crate::managed::{Log, Managed};

pub const RUNTIME_CONFIG: &str = "/etc/ember/runtime";
/// The runtime given at registration, same format; it replaces the image's.
pub const RUNTIME_ENV: &str = "EMBER_RUNTIME";
/// A known runtime's entry point (the registration's `handler`).
pub const HANDLER_ENV: &str = "EMBER_HANDLER";
/// The longest `sleep` the built-in accepts, in milliseconds.
const MAX_SLEEP_MS: u64 = 60_000;
/// An invocation's time limit when the host gave none.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest response a runtime may send.
const MAX_RUNTIME_RESPONSE: usize = 16 << 20;

struct Runtime {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A built-in's answer: its output and `Ok`, or its error's text and `failed`.
fn reply(out: &mut Vec<u8>, r: io::Result<impl AsRef<[u8]>>, failed: Status) -> Status {
    match r {
        Ok(answer) => {
            out.extend_from_slice(answer.as_ref());
            Status::Ok
        }
        Err(e) => {
            out.extend_from_slice(e.to_string().as_bytes());
            failed
        }
    }
}

/// What a protocol-2 runtime is told about one invocation, and what it answers besides the result.
pub struct Invocation<'a> {
    /// The context object (JSON).
    pub context: &'a [u8],
    pub timeout: std::time::Duration,
    /// Filled with the invocation's output.
    pub log: &'a mut Log,
}

pub struct Functions {
    runtime: Option<Runtime>,
    managed: Option<Managed>,
    /// Why the runtime is not there, when it was configured but failed.
    runtime_error: Option<String>,
}

impl Functions {
    /// Starts the runtime the VM's registration names (`EMBER_RUNTIME` on the kernel command line,
    /// which the kernel hands to init as an environment variable), else the image's, if any: in
    /// `root` (the function's layers) when there is one.
    ///
    /// One of ember's runtimes that cannot load its handler fails the boot (`Err`, with the
    /// runtime's own words); a custom runtime that fails is reported when it is called.
    pub fn start(root: Option<&Path>) -> io::Result<Self> {
        let from_env = std::env::var(RUNTIME_ENV).ok().filter(|c| !c.trim().is_empty());
        if let Some(name) = from_env.as_deref().map(str::trim).filter(|n| ember_abi::runtime::is_known(n)) {
            let handler = std::env::var(HANDLER_ENV).unwrap_or_default();
            let m = Managed::start(name, &handler, root)?;
            return Ok(Self { runtime: None, managed: Some(m), runtime_error: None });
        }
        let config = match root {
            Some(r) => r.join(RUNTIME_CONFIG.trim_start_matches('/')),
            None => Path::new(RUNTIME_CONFIG).to_path_buf(),
        };
        let (conf, source) = match from_env {
            Some(c) => (c, RUNTIME_ENV.to_string()),
            None => match std::fs::read_to_string(&config) {
                Ok(c) => (c, config.display().to_string()),
                Err(_) => return Ok(Self { runtime: None, managed: None, runtime_error: None }),
            },
        };
        match Runtime::start(&conf, root) {
            Ok(r) => {
                println!("ember-agent: runtime {:?} started from {source} (pid {})", r.name, r.child.id());
                if let Some(root) = root {
                    prefetch_program(root, &conf);
                }
                Ok(Self { runtime: Some(r), managed: None, runtime_error: None })
            }
            Err(e) => {
                eprintln!("ember-agent: cannot start the runtime from {source}: {e}");
                Ok(Self { runtime: None, managed: None, runtime_error: Some(e.to_string()) })
            }
        }
    }

    /// Tells the runtime that it now runs in a restored clone.
    pub fn restored(&mut self, clone_id: u64) {
        let failed = self.managed.as_mut().and_then(|m| m.restored(clone_id).err().map(|e| (m.name.clone(), e)));
        if let Some((name, e)) = failed {
            self.fail_managed(format!("runtime {name:?} failed: {e}"));
        }
    }

    fn fail_managed(&mut self, why: String) {
        if let Some(mut m) = self.managed.take() {
            m.kill();
        }
        self.runtime_error = Some(why);
    }

    /// Runs one of ember's runtimes on an invocation: `None` when `function` is not it.
    pub fn call_managed(
        &mut self,
        function: &str,
        payload: &[u8],
        out: &mut Vec<u8>,
        inv: Invocation,
    ) -> Option<Status> {
        let m = self.managed.as_mut().filter(|m| m.name == function)?;
        match m.invoke(inv.context, inv.timeout, payload, out, inv.log) {
            Ok(status) => Some(status),
            Err(e) => {
                let why = format!("runtime {:?} failed: {e}", m.name);
                out.clear();
                out.extend_from_slice(why.as_bytes());
                self.fail_managed(why);
                Some(Status::Failed)
            }
        }
    }

    /// Runs `function` on `payload`, appending its response to `out`.
    pub fn call(&mut self, function: &str, payload: &[u8], out: &mut Vec<u8>) -> Status {
        match function {
            "echo" => {
                out.extend_from_slice(payload);
                Status::Ok
            }
            "sha256" => {
                let digest = Sha256::digest(payload);
                for b in digest {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                Status::Ok
            }
            "sleep" => {
                let ms = std::str::from_utf8(payload).ok().and_then(|s| s.trim().parse::<u64>().ok());
                match ms {
                    Some(ms) if ms <= MAX_SLEEP_MS => {
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                        out.extend_from_slice(format!("slept {ms} ms").as_bytes());
                        Status::Ok
                    }
                    _ => {
                        out.extend_from_slice(format!("sleep takes milliseconds, 0 to {MAX_SLEEP_MS}").as_bytes());
                        Status::BadRequest
                    }
                }
            }
            "vsock-ping" => reply(out, crate::vsock_socket::ping_host(payload), Status::Failed),
            "storm" => reply(out, crate::storm::run(payload), Status::BadRequest),
            "cpu-stat" => reply(out, cpu_stat(), Status::Failed),
            "clock" => reply(out, clocks(), Status::Failed),
            "touch" => reply(out, touch(payload), Status::BadRequest),
            "drive" => reply(out, drive(payload), Status::BadRequest),
            "http-get" => reply(out, crate::net::http_get(payload), Status::Failed),
            "tcp-read" => reply(out, crate::net::tcp_transfer(payload, false), Status::Failed),
            "tcp-write" => reply(out, crate::net::tcp_transfer(payload, true), Status::Failed),
            "udp-flood" => reply(out, crate::net::udp_flood(payload), Status::BadRequest),
            "udp-from" => reply(out, crate::net::udp_from(payload), Status::Failed),
            name if self.runtime.as_ref().is_some_and(|r| r.name == name) => self.call_runtime(payload, out),
            name if self.managed.as_ref().is_some_and(|m| m.name == name) => {
                // Without the host's context (vsock, or a mailbox caller without an envelope).
                let context = format!("{{\"function\":{:?}}}", name);
                let mut log = Log::default();
                let inv = Invocation { context: context.as_bytes(), timeout: DEFAULT_TIMEOUT, log: &mut log };
                self.call_managed(name, payload, out, inv).unwrap_or(Status::UnknownFunction)
            }
            name => {
                out.extend_from_slice(format!("no function {name:?} in this guest").as_bytes());
                if let Some(e) = &self.runtime_error {
                    out.extend_from_slice(format!(" (the image's runtime failed to start: {e})").as_bytes());
                }
                Status::UnknownFunction
            }
        }
    }

    fn call_runtime(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Status {
        let Some(rt) = &mut self.runtime else { return Status::UnknownFunction };
        match rt.call(payload, out) {
            Ok(status) => status,
            Err(e) => {
                // The runtime broke its protocol or died: it is not used again.
                let why = format!("runtime {:?} failed: {e}", rt.name);
                let _ = rt.child.kill();
                let _ = rt.child.wait();
                out.clear();
                out.extend_from_slice(why.as_bytes());
                self.runtime_error = Some(why);
                self.runtime = None;
                Status::Failed
            }
        }
    }
}

impl Runtime {
    fn start(conf: &str, root: Option<&Path>) -> io::Result<Self> {
        let mut words = conf.split_whitespace();
        let (Some(name), Some(cmd)) = (words.next(), words.next()) else {
            return Err(io::Error::other("expected `NAME COMMAND [ARGS...]`"));
        };
        ember_abi::check_function(name.as_bytes()).map_err(io::Error::other)?;
        let mut command = Command::new(cmd);
        command.args(words).stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(root) = root {
            let root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
            // SAFETY: between fork and exec the closure only makes async-signal-safe calls
            // (chroot, chdir) on strings prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| io::Error::other(format!("{cmd}: {e}")))?;
        let stdin = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?);
        Ok(Self { name: name.to_string(), child, stdin, stdout })
    }

    fn call(&mut self, payload: &[u8], out: &mut Vec<u8>) -> io::Result<Status> {
        self.stdin.write_all(&(payload.len() as u32).to_le_bytes())?;
        self.stdin.write_all(payload)?;
        self.stdin.flush()?;
        let mut head = [0u8; 8];
        self.stdout.read_exact(&mut head)?;
        let status = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let status = Status::from_u32(status).map_err(io::Error::other)?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_RUNTIME_RESPONSE {
            return Err(io::Error::other(format!("response of {len} bytes exceeds {MAX_RUNTIME_RESPONSE}")));
        }
        let start = out.len();
        out.resize(start + len, 0);
        self.stdout.read_exact(&mut out[start..])?;
        Ok(status)
    }
}

/// The guest's CPU time so far, from /proc/stat: `user nice system idle iowait irq softirq` in
/// clock ticks.
/// Writes every page of a new buffer of the given MiB (a test of the host's memory caps: the
/// guest's pages become the VMM's), and frees it.
fn touch(payload: &[u8]) -> io::Result<String> {
    let mib = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|m| (1..=65536).contains(m))
        .ok_or_else(|| io::Error::other("touch takes MiB, 1 to 65536"))?;
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(mib << 20).map_err(|e| io::Error::other(format!("{mib} MiB: {e}")))?;
    buf.resize(mib << 20, 0);
    for page in buf.chunks_mut(4096) {
        page[0] = 1;
    }
    Ok(format!("touched {mib} MiB"))
}

/// `drive vdX`: the disk's size in sectors as the kernel sees it now and its first 16 bytes,
/// read around the page cache (`sectors=N head=HEX`): what a host-side swap of the drive's
/// backing file looks like from inside.
fn drive(payload: &[u8]) -> io::Result<String> {
    let name = std::str::from_utf8(payload)
        .ok()
        .map(str::trim)
        .filter(|n| n.len() <= 8 && n.starts_with("vd") && n.bytes().all(|b| b.is_ascii_lowercase()))
        .ok_or_else(|| io::Error::other("drive takes a disk's name (vda, vdb, ...)"))?;
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size"))?.trim().to_string();
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(format!("/dev/{name}"))?;
    // O_DIRECT wants an aligned buffer.
    let mut raw = vec![0u8; 8192];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + 4096];
    let n = std::os::unix::fs::FileExt::read_at(&f, buf, 0)?;
    let head: String = buf[..n.min(16)].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sectors={sectors} head={head}"))
}

fn cpu_stat() -> io::Result<String> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or_else(|| io::Error::other("empty /proc/stat"))?;
    Ok(line.split_whitespace().skip(1).take(7).collect::<Vec<_>>().join(" "))
}

/// The example runtime shipped in ember's test image (`reverse`): answers each request with its
/// payload reversed, and a payload of `crash` makes it exit (a runtime that dies mid-call).
pub fn example_runtime() -> io::Result<()> {
    serve_frames(|payload| {
        if payload == b"crash" {
            std::process::exit(1);
        }
        let mut out = payload.to_vec();
        out.reverse();
        (Status::Ok, out)
    })
}

/// The example runtime of ember's example code layer (`files`): `read PATH` answers the file's
/// bytes, `write PATH TEXT` writes TEXT there, `ls DIR` answers the directory's names, one per
/// line: what a function reading its layers and writing its private root does. For benchmarks:
/// `sha256 PATH` reads a whole file and answers its digest and size, `readbench PATH seq` reads
/// it sequentially in 1 MiB reads and answers `bytes=N seconds=S`, and `readbench PATH rand N`
/// makes N direct (uncached) 4 KiB reads at spread offsets and answers their latencies'
/// percentiles (`p50_us=A p90_us=B ...`).
pub fn files_runtime() -> io::Result<()> {
    serve_frames(|payload| {
        let text = String::from_utf8_lossy(payload);
        let mut words = text.splitn(3, ' ');
        let r = match (words.next(), words.next(), words.next()) {
            (Some("read"), Some(path), None) => std::fs::read(path),
            (Some("write"), Some(path), Some(data)) => {
                std::fs::write(path, data).map(|()| format!("wrote {} bytes", data.len()).into_bytes())
            }
            (Some("sha256"), Some(path), None) => file_digest(path),
            (Some("readbench"), Some(path), Some(how)) => read_bench(path, how),
            (Some("ls"), Some(dir), None) => std::fs::read_dir(dir).and_then(|d| {
                let mut names = d
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<io::Result<Vec<_>>>()?;
                names.sort();
                Ok(names.join("\n").into_bytes())
            }),
            _ => return (Status::BadRequest, b"expected `read PATH`, `write PATH TEXT` or `ls DIR`".to_vec()),
        };
        match r {
            Ok(out) => (Status::Ok, out),
            Err(e) => (Status::Failed, e.to_string().into_bytes()),
        }
    })
}

/// The example of ember's `exec` runtime (a program speaking runtime protocol 2; ember's test
/// code layer has it as `bin/ember-exec-example`): answers each event upper-cased, after printing
/// the invocation's context to stdout (the invocation's log); an event `fail` is answered with an
/// error report, `exit` makes it exit (a runtime that dies mid-invocation).
pub fn exec_example() -> io::Result<()> {
    use ember_abi::runtime as proto;
    use std::os::fd::FromRawFd;
    // SAFETY: a protocol-2 runtime is started with fds 3 and 4 open for it (managed.rs); nothing
    // else in this process uses them.
    let (mut requests, mut replies) =
        unsafe { (std::fs::File::from_raw_fd(proto::REQUEST_FD), std::fs::File::from_raw_fd(proto::REPLY_FD)) };
    let send = |replies: &mut std::fs::File, kind: u32, body: &[u8]| -> io::Result<()> {
        let mut frame = proto::header(kind, body.len()).to_vec();
        frame.extend_from_slice(body);
        replies.write_all(&frame)
    };
    send(&mut replies, proto::READY, b"ember exec example")?;
    loop {
        let mut h = [0u8; proto::FRAME_HEADER];
        match requests.read_exact(&mut h) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let (kind, len) = proto::parse_header(&h).map_err(io::Error::other)?;
        let mut body = vec![0u8; len];
        requests.read_exact(&mut body)?;
        if kind != proto::INVOKE || body.len() < 12 {
            continue;
        }
        let ctx_len = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
        let (context, event) = body[12..].split_at(ctx_len.min(body.len() - 12));
        println!("context {}", String::from_utf8_lossy(context));
        io::stdout().flush()?;
        match event {
            b"fail" => send(
                &mut replies,
                proto::ERROR,
                br#"{"type": "ExampleError", "message": "asked to fail", "traceback": ""}"#,
            )?,
            b"exit" => std::process::exit(3),
            e => send(&mut replies, proto::RESULT, &e.to_ascii_uppercase())?,
        }
    }
}

/// Reads the runtime's program (in `root`, a layer) through once, before the template is taken:
/// its pages are then in the template's guest page cache, which every clone shares copy-on-write,
/// instead of being read from the drive by each clone the first time it runs that code (each read
/// a block request: guest kernel work). Programs in the initramfs are in memory already.
fn prefetch_program(root: &Path, conf: &str) {
    let Some(cmd) = conf.split_whitespace().nth(1).filter(|c| c.starts_with('/')) else { return };
    let path = root.join(cmd.trim_start_matches('/'));
    let t = std::time::Instant::now();
    if let Ok(mut f) = std::fs::File::open(&path) {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while let Ok(n @ 1..) = f.read(&mut buf) {
            total += n;
        }
        println!("ember-agent: prefetched {cmd} ({total} bytes) in {:.2} s", t.elapsed().as_secs_f64());
    }
}

fn file_digest(path: &str) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{hex} {total}").into_bytes())
}

fn read_bench(path: &str, how: &str) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if how == "seq" {
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let (t, mut total) = (std::time::Instant::now(), 0u64);
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        return Ok(format!("bytes={total} seconds={:.6}", t.elapsed().as_secs_f64()).into_bytes());
    }
    let n: usize = how
        .strip_prefix("rand ")
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| (1..=100_000).contains(n))
        .ok_or_else(|| io::Error::other("readbench PATH seq | readbench PATH rand N (1..100000)"))?;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let blocks = (f.metadata()?.len() / 4096).max(1);
    // O_DIRECT wants an aligned buffer.
    let mut raw = vec![0u8; 8192];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        // A multiplicative hash spreads the offsets over the file.
        let block = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % blocks;
        let t = std::time::Instant::now();
        f.read_at(buf, block * 4096)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
    Ok(format!(
        "n={n} p50_us={:.1} p90_us={:.1} p99_us={:.1} min_us={:.1} max_us={:.1}",
        pct(50.0),
        pct(90.0),
        pct(99.0),
        lat[0],
        lat[n - 1]
    )
    .into_bytes())
}

/// The runtime side of the protocol: reads each request from stdin and writes `handle`'s answer
/// to stdout, until stdin ends.
fn serve_frames(mut handle: impl FnMut(&[u8]) -> (Status, Vec<u8>)) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    loop {
        let mut len = [0u8; 4];
        match stdin.read_exact(&mut len) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        stdin.read_exact(&mut payload)?;
        let (status, out) = handle(&payload);
        stdout.write_all(&(status as u32).to_le_bytes())?;
        stdout.write_all(&(out.len() as u32).to_le_bytes())?;
        stdout.write_all(&out)?;
        stdout.flush()?;
    }
}

/// `clock`: the guest's CLOCK_REALTIME and CLOCK_MONOTONIC, in ns, as `realtime=N monotonic=N`.
fn clocks() -> io::Result<String> {
    let read = |clock: libc::clockid_t| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec we own.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128)
    };
    Ok(format!("realtime={} monotonic={}", read(libc::CLOCK_REALTIME)?, read(libc::CLOCK_MONOTONIC)?))
}
