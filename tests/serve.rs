//! `ember serve` over its real Unix socket: bad requests (no KVM needed), then a function registered
//! from the project's guest, handed out, invoked, scaled, restarted and deleted.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A file's permission bits.
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

use common::api::{assert_error, http, http_bytes, invoke, json_of, wait_ready, Server};
use serde_json::json;

#[test]
fn bad_requests_get_4xx_with_a_json_error_and_change_nothing() {
    let dir = common::scratch("bad-requests");
    let mut srv = Server::start(&dir);
    let s = &srv.socket.clone();
    // Only the daemon's user may talk to it or read its state.
    assert_eq!((mode(s), mode(&dir.join("state")), mode(&dir.join("state/vms"))), (0o600, 0o700, 0o700));
    assert_eq!(json_of(&http(s, "GET", "/functions", None).1), json!({"functions": []}));
    assert_error(http(s, "GET", "/functions/nope", None), 404, "no function");
    assert_error(http(s, "PUT", "/functions/f", Some("{not json")), 400, "bad JSON");
    assert_error(
        http(s, "PUT", "/functions/f", Some(r#"{"kernel": "/k", "initramfs": "/i", "colour": 1}"#)),
        400,
        "unknown field",
    );
    assert_error(
        http(s, "PUT", "/functions/f", Some(r#"{"kernel": "/nonexistent/vmlinux", "initramfs": "/i"}"#)),
        403,
        "not in an image directory",
    );
    // Images come only from the daemon's image directories: not a host file elsewhere (a secret
    // handed to a guest as its initramfs), not through `..`, not through a symlink.
    let k = dir.join("k");
    std::fs::write(&k, b"x").unwrap();
    let images = &common::api::image_dirs()[0];
    let secret = format!(r#"{{"kernel": "vmlinux", "initramfs": "{}"}}"#, k.display());
    assert_error(http(s, "PUT", "/functions/f", Some(&secret)), 403, "not in an image directory");
    let escape = format!(r#"{{"kernel": "vmlinux", "initramfs": "{}/../README.md"}}"#, images.display());
    assert_error(http(s, "PUT", "/functions/f", Some(&escape)), 403, "`..`");
    assert_error(
        http(s, "PUT", "/functions/f", Some(r#"{"kernel": "vmlinux", "initramfs": "nope.cpio"}"#)),
        404,
        "nope.cpio",
    );
    let spec = |pool: &str| format!(r#"{{"kernel": "{0}", "initramfs": "{0}", "pool": {pool}}}"#, k.display());
    assert_error(
        http(s, "PUT", "/functions/f", Some(&spec(r#"{"min_ready": 5, "max": 2}"#))),
        400,
        "less than pool.min_ready",
    );
    assert_error(http(s, "PUT", "/functions/f", Some(&spec(r#"{"headroom": 0.1}"#))), 400, "headroom");
    let quoted = format!(r#"{{"kernel": "{0}", "initramfs": "{0}", "runtime": "f /bin/sh -c \"x\""}}"#, k.display());
    assert_error(http(s, "PUT", "/functions/f", Some(&quoted)), 400, "runtime");
    assert_error(http(s, "PUT", "/functions/Bad%20Name", Some(&spec("{}"))), 400, "bad name");
    assert_error(http(s, "POST", "/functions/nope/acquire", None), 404, "no function");
    assert_error(http(s, "POST", "/functions/nope/invoke", Some(r#"{"payload": "x"}"#)), 404, "no function");
    assert_error(http(s, "POST", "/vms/12345/release", Some(r#"{"lease": "x"}"#)), 404, "no handed-out VM");
    assert_error(http(s, "POST", "/vms/12345/release", None), 400, "lease");
    assert_error(http(s, "POST", "/vms/abc/release", None), 400, "bad VM id");
    assert_error(http(s, "GET", "/nowhere", None), 404, "no such endpoint");
    // A body over the limit (1 MiB) is refused before it is read whole, with a JSON error.
    {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(s).unwrap();
        let head = format!("PUT /functions/big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", 3 << 20);
        c.write_all(head.as_bytes()).unwrap();
        // The daemon may stop reading (and close) once it has refused: write errors are expected.
        let _ = c.write_all(&vec![b'x'; 2 << 20]);
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#"{"error":"#), "{answer}");
    }
    // A refused request whose body comes after its head (a route that ignores bodies, a wrong
    // method) is answered after the body, on a connection kept alive for the next request.
    {
        use std::io::{BufRead, BufReader, Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(s).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let answer = |r: &mut BufReader<std::os::unix::net::UnixStream>| {
            let (mut head, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            (head, String::from_utf8(body).unwrap())
        };
        for (method, path, status) in [("OPTIONS", "/vms/0/release", "405"), ("POST", "/functions/nope/acquire", "404")]
        {
            let body = r#"{"destroy": false, "lease": ""}"#;
            write!(c, "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            c.write_all(body.as_bytes()).unwrap();
            let (head, body) = answer(&mut r);
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{method} {path}: {head}");
            assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
            assert!(body.contains(r#""error""#), "{body}");
        }
        c.write_all(b"GET /functions HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let (head, body) = answer(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "the kept-alive connection: {head}");
        assert_eq!(json_of(&body), json!({"functions": []}));
    }
    assert_error(http(s, "DELETE", "/functions", None), 405, "method not allowed");
    assert_error(http(s, "DELETE", "/functions/nope", None), 404, "no function");
    // Nothing was registered by any of that.
    assert_eq!(json_of(&http(s, "GET", "/functions", None).1), json!({"functions": []}));
    assert!(std::fs::read_dir(dir.join("state/functions")).unwrap().next().is_none());
    let (code, doc) = http(s, "GET", "/openapi.json", None);
    assert_eq!(code, 200);
    assert!(json_of(&doc)["paths"]["/functions/{name}/acquire"].is_object());
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
    assert!(!srv.socket.exists(), "the socket outlived the server");
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping_and_the_log_can_be_json() {
    use std::io::BufRead;
    let dir = common::scratch("notify");
    // What systemd listens on for a Type=notify unit.
    let notify = dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let socket = dir.join("api.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--socket", socket.to_str().unwrap(), "--state-dir", dir.join("state").to_str().unwrap()])
        .args(["--log-format", "json"])
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut heard = || {
        let n = listener.recv(&mut buf).expect("no notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(heard(), "READY=1");
    // Ready means the API answers.
    assert_eq!(http(&socket, "GET", "/functions", None).0, 200);
    assert_eq!(heard(), "WATCHDOG=1");
    assert_eq!(heard(), "WATCHDOG=1");
    // SIGTERM: it says it is stopping, then stops cleanly.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = (0..20).map(|_| heard()).find(|m| m != "WATCHDOG=1");
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    assert!(child.wait().unwrap().success());
    // Its log: one JSON object per line, its fields at the top level.
    let lines: Vec<String> =
        std::io::BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("serving on")), "{lines:?}");
}

#[test]
fn connections_are_bounded_per_client_and_silent_ones_closed() {
    use std::io::{BufRead, BufReader, Write};
    let dir = common::scratch("connections");
    let srv = Server::start(&dir);
    let s = srv.socket.clone();
    // Another process (python3's sockets) opens connections and sends nothing: it gets 256 of
    // them; the next is closed unanswered (a lean request on it gets no answer line, where an
    // accepted connection would get one); meanwhile other clients (this one) are served; its
    // silent connections are closed once their opening time has passed.
    let script = "import socket, sys\n\
        p = sys.argv[1]\n\
        cs = []\n\
        for i in range(256):\n    c = socket.socket(socket.AF_UNIX); c.connect(p); cs.append(c)\n\
        o = socket.socket(socket.AF_UNIX); o.connect(p); o.settimeout(60)\n\
        try:\n    o.sendall(b'EMBER/1\\nacquire nope\\n'); n = len(o.recv(256))\n\
        except OSError:\n    n = 0\n\
        print('over', n, flush=True)\n\
        sys.stdin.readline()\n\
        cs[0].settimeout(120)\n\
        print('silent', len(cs[0].recv(16)), flush=True)\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, s.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "over 0", "a connection over the client's cap was kept");
    let (code, body) = http(&s, "GET", "/functions", None);
    assert_eq!(code, 200, "another client was refused while one held its cap: {body}");
    child.stdin.take().unwrap().write_all(b"go on\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "silent 0", "a silent connection was kept");
    assert!(child.wait().unwrap().success());
}

#[test]
fn functions_are_registered_handed_out_invoked_and_survive_restarts() {
    if !common::kvm_usable("serve_functions") {
        return;
    }
    let Some((kernel, initrd)) = common::images("serve_functions") else { return };
    let dir = common::scratch("functions");
    let mut srv = Server::start(&dir);
    let s = srv.socket.clone();
    // The registration names its own runtime (the image's example runtime under another name):
    // it replaces the one the image names.
    let spec = json!({
        "kernel": kernel, "initramfs": initrd, "handler": "flip", "runtime": "flip /init --example-runtime",
        "pool": {"min_ready": 2, "max": 24, "headroom": 1.5, "scale_in_delay_s": 1.0, "peak_window_s": 1.0,
                 "lease_s": 300.0}
    })
    .to_string();
    let (code, body) = http(&s, "PUT", "/functions/rev", Some(&spec));
    assert_eq!(code, 202, "{body}");
    assert_eq!(json_of(&body)["state"], "creating");
    // A new version cannot be registered while the first template is still being made.
    assert_error(http(&s, "PUT", "/functions/rev", Some(&spec)), 409, "still being created");
    // As root, the template boots in a jailed worker of its own (the guest never runs in the
    // daemon): a child process of the daemon, under a uid of its own, confined.
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let maker = loop {
            let found = common::api::children(srv.child.id()).into_iter().find_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let uid = status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(1)?.to_string();
                (uid != "0" && status.contains("\nSeccomp:\t2\n")).then_some(pid)
            });
            if let Some(pid) = found {
                break pid;
            }
            assert!(Instant::now() < deadline, "no worker makes the template");
            std::thread::sleep(Duration::from_millis(50));
        };
        let ns = |p: String| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
        assert_ne!(ns(maker.to_string()), ns("self".into()));
    }
    wait_ready(&s, "rev", 2);

    // Acquire: a warm clone, reachable through its mailbox; released once, never twice.
    let (code, body) = http(&s, "POST", "/functions/rev/acquire", None);
    assert_eq!(code, 200, "{body}");
    let h = json_of(&body);
    assert_eq!(h["cold_start"], false, "{body}");
    let mailbox = ember::channel::mailbox::Mailbox::open(Path::new(h["mailbox"].as_str().unwrap())).unwrap();
    let opts = ember::channel::mailbox::CallOptions { timeout: Duration::from_secs(120), ..Default::default() };
    assert_eq!(mailbox.call("echo", b"direct", opts).unwrap().payload, b"direct");
    let id = h["id"].as_u64().unwrap();
    let lease = h["lease"].as_str().unwrap().to_string();
    // Every thread of the daemon (API, scaler, template, vCPU and device threads) is confined.
    let pid = srv.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() > 4, "{} threads", tasks.len());
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status.lines().next().unwrap_or_default().to_string();
        assert!(status.contains("\nSeccomp:\t2\n") || status.is_empty(), "thread {name} is not confined");
    }
    // The clone's channels and the function's files are the daemon user's alone.
    // A worker's clone's mailbox is the daemon's own descriptor of the worker's sealed memfd
    // (the daemon maps no file in a directory a worker can write): reachable through the
    // daemon's /proc fd directory, which only the daemon's user can read.
    let mailbox_path = Path::new(h["mailbox"].as_str().unwrap());
    assert!(mailbox_path.starts_with(format!("/proc/{pid}/fd")), "{}", mailbox_path.display());
    assert_eq!(mode(&PathBuf::from(format!("/proc/{pid}/fd"))), 0o500);
    assert_eq!(mode(Path::new(h["vsock"].as_str().unwrap())), 0o600);
    let fdir = dir.join("state/functions/rev");
    for f in ["spec.json", "template/state", "template/memory", "template/working-set"] {
        assert_eq!(mode(&fdir.join(f)), 0o600, "{f}");
    }
    assert_eq!((mode(&fdir), mode(&fdir.join("template"))), (0o700, 0o700));
    assert_eq!(lease.len(), 32, "{body}");
    let release = format!(r#"{{"lease": "{lease}"}}"#);
    // A bad release body, no lease or another handoff's lease change nothing: the VM stays
    // handed out.
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), Some(r#"{"bogus": 1}"#)), 400, "unknown field");
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), None), 400, "lease");
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), Some(r#"{"destroy": true}"#)), 400, "lease");
    let forged = format!(r#"{{"lease": "{}"}}"#, "0".repeat(32));
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), Some(&forged)), 403, "lease does not match");
    // Single-use clones (the default policy) are destroyed on release.
    let (code, body) = http(&s, "POST", &format!("/vms/{id}/release"), Some(&release));
    assert_eq!((code, json_of(&body)), (200, json!({"id": id, "recycled": false})));
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), Some(&release)), 404, "no handed-out VM");

    // The lean protocol on the same socket: a line each way on a kept-open connection, the same
    // handoffs and refusals (the HTTP status in the error line); the connection outlives refusals.
    {
        use std::io::{BufRead, BufReader, Write};
        let c = std::os::unix::net::UnixStream::connect(&s).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut w = c;
        w.write_all(ember::serve::lean::HELLO).unwrap();
        let mut ask = |line: &str| -> serde_json::Value {
            w.write_all(line.as_bytes()).unwrap();
            let mut answer = String::new();
            r.read_line(&mut answer).unwrap();
            json_of(&answer)
        };
        let h = ask("acquire rev\n");
        let (id, lease) = (h["id"].as_u64().expect("a handoff"), h["lease"].as_str().unwrap().to_string());
        assert_eq!((h["function"].as_str(), h["cold_start"].as_bool()), (Some("rev"), Some(false)), "{h}");
        let mailbox = ember::channel::mailbox::Mailbox::open(Path::new(h["mailbox"].as_str().unwrap())).unwrap();
        assert_eq!(mailbox.call("echo", b"lean", opts).unwrap().payload, b"lean");
        let e = ask(&format!("release {id} {}\n", "0".repeat(32)));
        assert_eq!(e["status"], 403, "{e}");
        assert_eq!(ask(&format!("release {id} {lease}\n")), json!({"id": id, "recycled": false}));
        assert_eq!(ask(&format!("release {id} {lease}\n"))["status"], 404);
        assert_eq!(ask("acquire nope\n")["status"], 404);
        let e = ask("launch rev\n");
        assert_eq!(e["status"], 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains("acquire NAME"), "{e}");
        assert_eq!(ask("release x y\n")["status"], 400);
        // Destroying on release, asked for explicitly.
        let h = ask("acquire rev\n");
        let id = h["id"].as_u64().unwrap();
        assert_eq!(ask(&format!("release {id} {} destroy\n", h["lease"].as_str().unwrap()))["recycled"], false);
        // A line over the limit ends the connection after its error.
        let e = ask(&format!("acquire {}\n", "x".repeat(ember::serve::lean::MAX_LINE)));
        assert_eq!(e["status"], 400, "{e}");
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap(), 0, "the connection stayed open: {rest}");
    }

    // Invoke: the registration's handler (the image's runtime), or a named built-in.
    let r = invoke(&s, "rev", r#"{"payload": "stressed"}"#);
    assert_eq!((r["ok"].as_bool(), r["payload"].as_str()), (Some(true), Some("desserts")), "{r}");
    let r = invoke(&s, "rev", r#"{"function": "sha256", "payload": "abc"}"#);
    assert_eq!(r["payload"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let r = invoke(&s, "rev", r#"{"function": "reverse"}"#);
    assert_eq!(r["status"], "unknown function", "the image's runtime ran instead of the registration's: {r}");
    let r = invoke(&s, "rev", r#"{"function": "nope"}"#);
    assert_eq!((r["ok"].as_bool(), r["status"].as_str()), (Some(false), Some("unknown function")), "{r}");
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(r#"{"timeout_s": -1}"#)), 400, "timeout_s");
    // Bytes that are not UTF-8: raw both ways, or base64 in JSON.
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let (code, head, body) =
        http_bytes(&s, "POST", "/functions/rev/invoke?function=echo", "application/octet-stream", &bytes);
    assert_eq!((code, body.as_slice()), (200, bytes.as_slice()), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-ember-status: ok"), "{head}");
    let (code, head, body) = http_bytes(&s, "POST", "/functions/rev/invoke", "application/octet-stream", b"raw");
    assert_eq!((code, body.as_slice()), (200, b"war".as_slice()), "the handler runs by default: {head}");
    let r = invoke(&s, "rev", r#"{"function": "echo", "payload_base64": "/wABgA=="}"#);
    assert_eq!((r["payload_base64"].as_str(), r.get("payload")), (Some("/wABgA=="), None), "{r}");
    assert_error(
        http(&s, "POST", "/functions/rev/invoke", Some(r#"{"payload": "a", "payload_base64": "YQ=="}"#)),
        400,
        "not both",
    );
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(r#"{"payload_base64": "%%"}"#)), 400, "payload_base64");
    // The query's function and timeout apply to a JSON body too (the body's own win).
    let (code, body) =
        http(&s, "POST", "/functions/rev/invoke?function=echo&timeout_s=60", Some(r#"{"payload": "q"}"#));
    assert_eq!((code, json_of(&body)["payload"].as_str()), (200, Some("q")), "{body}");
    let (code, _, body) = http_bytes(&s, "POST", "/functions/rev/invoke?colour=red", "application/octet-stream", b"x");
    assert_eq!(code, 400);
    assert!(json_of(&String::from_utf8_lossy(&body))["error"].as_str().unwrap().contains("bad query"));
    // An agent that does not answer in time: 504, its clone is destroyed, the next call works.
    let slow = r#"{"function": "sleep", "payload": "5000", "timeout_s": 0.5}"#;
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(slow)), 504, "no response");
    assert_eq!(invoke(&s, "rev", r#"{"payload": "after"}"#)["payload"], "retfa");
    assert!(json_of(&http(&s, "GET", "/functions/rev", None).1)["invocation_errors"].as_u64() >= Some(1));
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(r#"{"function": "bad name"}"#)), 400, "function name");

    // Many concurrent clients: no VM is handed out twice, and there are never more than `max` (24)
    // clones at once: beyond it a cold start is refused with 429, not made.
    let cold_before = json_of(&http(&s, "GET", "/functions/rev", None).1)["cold_starts"].as_u64().unwrap();
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let s = s.clone();
                scope
                    .spawn(move || (0..2).map(|_| http(&s, "POST", "/functions/rev/acquire", None)).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut handoffs: Vec<(u64, String)> = Vec::new();
    for (code, body) in &answers {
        match code {
            200 => {
                let h = json_of(body);
                handoffs.push((h["id"].as_u64().unwrap(), h["lease"].as_str().unwrap().to_string()));
            }
            429 => assert!(json_of(body)["error"].as_str().unwrap().contains("pool.max"), "{body}"),
            _ => panic!("acquire answered {code}: {body}"),
        }
    }
    assert!((2..=24).contains(&handoffs.len()), "{} handed out: {answers:?}", handoffs.len());
    let ids: Vec<u64> = handoffs.iter().map(|h| h.0).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "a VM was handed out twice: {ids:?}");
    let info = json_of(&http(&s, "GET", "/functions/rev", None).1);
    assert_eq!(info["busy"].as_u64(), Some(handoffs.len() as u64), "{info}");
    // Every handoff that found the pool empty was a cold start, and is counted as one (how many
    // there were depends on how fast the pool refilled during the burst).
    let cold = answers.iter().filter(|(c, b)| *c == 200 && json_of(b)["cold_start"] == true).count() as u64;
    assert_eq!(info["cold_starts"].as_u64(), Some(cold_before + cold), "{info}");
    for (id, lease) in &handoffs {
        let body = format!(r#"{{"lease": "{lease}"}}"#);
        assert_eq!(http(&s, "POST", &format!("/vms/{id}/release"), Some(&body)).0, 200);
    }
    let info = wait_ready(&s, "rev", 2);
    assert_eq!(info["busy"], 0, "{info}");

    let (code, metrics) = http(&s, "GET", "/metrics", None);
    assert_eq!(code, 200);
    let handoffs = info["handoffs"].as_u64().unwrap();
    assert!(metrics.contains(&format!("ember_handoffs_total{{function=\"rev\"}} {handoffs}")), "{metrics}");
    assert!(metrics.contains("ember_handoff_seconds_count"), "{metrics}");
    assert!(metrics.contains("ember_cold_start_ratio{function=\"rev\"}"), "{metrics}");
    // Every clone it has had was restored (the ready ones, the cold starts' among them), each at
    // the CPU a restore was measured (or assumed) to cost when it was made.
    let metric = |name: &str| -> f64 {
        let line = format!("{name}{{function=\"rev\"}} ");
        let at = metrics.lines().find_map(|l| l.strip_prefix(line.as_str()));
        at.unwrap_or_else(|| panic!("no {name}: {metrics}")).parse().unwrap()
    };
    let restores = info["restores"].as_u64().unwrap();
    assert!(restores >= 2 && restores >= cold_before + cold, "{info}");
    assert!(metric("ember_restores_total") >= restores as f64, "{metrics}");
    let cpu = info["restore_cpu_s"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu < 10.0, "{info}");
    assert!(metric("ember_restore_cpu_seconds_total") >= info["restore_cpu_seconds"].as_f64().unwrap(), "{metrics}");
    assert!(metric("ember_restore_cpu_seconds") > 0.0, "{metrics}");

    // Template files moved away under the running daemon: clones still come from the loaded template.
    let template = dir.join("state/functions/rev/template");
    let saved = dir.join("template-saved");
    std::fs::rename(&template, &saved).unwrap();
    for _ in 0..3 {
        assert_eq!(invoke(&s, "rev", r#"{"payload": "ok"}"#)["payload"], "ko");
    }
    std::fs::rename(&saved, &template).unwrap();
    // The memory file truncated in place under live clones: the daemon restores from its sealed
    // copy and never faults on the file (a SIGBUS would kill it).
    let memory = template.join("memory");
    let kept = dir.join("memory-kept");
    std::fs::copy(&memory, &kept).unwrap();
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(0).unwrap();
    for _ in 0..3 {
        assert_eq!(invoke(&s, "rev", r#"{"payload": "ok"}"#)["payload"], "ko");
    }
    std::fs::rename(&kept, &memory).unwrap();

    // A new registration that changes only the pool policy: the same version, the template kept
    // (no boot), the new policy in force; the restart below finds the template matching it.
    let version = json_of(&http(&s, "GET", "/functions/rev", None).1)["version"].clone();
    assert!(version.is_string(), "{version}");
    let mut repooled: serde_json::Value = serde_json::from_str(&spec).unwrap();
    repooled["pool"]["lease_s"] = json!(6.0);
    // Whether a template was made again is told by its state file (a new snapshot is a new file),
    // not by the time taken (a slow machine must not fail this).
    let stamp = || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.join("state/functions/rev/template/state")).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let made = stamp();
    // PUTs `spec` and waits until the function's info says `took` (the new policy serves): that info.
    let repool = |spec: &serde_json::Value, took: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let (code, body) = http(&s, "PUT", "/functions/rev", Some(&spec.to_string()));
        assert_eq!(code, 202, "{body}");
        let t = Instant::now();
        loop {
            let i = json_of(&http(&s, "GET", "/functions/rev", None).1);
            if took(&i) {
                break i;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "the new policy never took over: {i}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let info = repool(&repooled, &|i| i["update"].is_null() && i["spec"]["pool"]["lease_s"] == 6.0);
    assert_eq!(info["version"], version, "{info}");
    assert_eq!(stamp(), made, "a pool-only change made the template again");
    assert_eq!(invoke(&s, "rev", r#"{"payload": "new"}"#)["payload"], "wen");

    // A clone not released within its lease (`lease_s`, now 6 s: the first phase's leases are long
    // so that a slow machine never loses a clone it is still using) is destroyed; its release is
    // refused.
    let h = json_of(&http(&s, "POST", "/functions/rev/acquire", None).1);
    std::thread::sleep(Duration::from_secs_f64(6.5));
    let late = format!(r#"{{"lease": "{}"}}"#, h["lease"].as_str().unwrap());
    assert_error(http(&s, "POST", &format!("/vms/{}/release", h["id"]), Some(&late)), 404, "no handed-out VM");
    let info = json_of(&http(&s, "GET", "/functions/rev", None).1);
    assert_eq!((info["expired_leases"].as_u64(), info["busy"].as_u64()), (Some(1), Some(0)), "{info}");
    // An invocation is bounded by its own timeout, not the lease: one that outlasts `lease_s`
    // keeps its clone to the end.
    let r = invoke(&s, "rev", r#"{"function": "sleep", "payload": "7000", "timeout_s": 60}"#);
    assert_eq!(r["ok"], true, "{r}");
    let info = json_of(&http(&s, "GET", "/functions/rev", None).1);
    assert_eq!(info["expired_leases"].as_u64(), Some(1), "{info}");

    // A clean restart: the function comes back from its saved template, without booting.
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
    assert!(!s.exists());
    let mut srv = Server::start(&dir);
    wait_ready(&s, "rev", 1);
    assert_eq!(stamp(), made, "the restart made the template again");
    assert_eq!(invoke(&s, "rev", r#"{"payload": "abc"}"#)["payload"], "cba");

    // Killed outright: the stale socket and channels are cleaned up and nothing registered is lost.
    srv.signal(libc::SIGKILL);
    let mut srv = Server::start(&dir);
    wait_ready(&s, "rev", 1);
    assert_eq!(invoke(&s, "rev", r#"{"payload": "xyz"}"#)["payload"], "zyx");

    // One client calling in a loop with `max` 1 and single-use clones: each call finds the one
    // clone being restored and waits for it instead of being refused (429).
    let mut one = repooled.clone();
    one["pool"] = json!({"min_ready": 1, "max": 1});
    repool(&one, &|i| i["spec"]["pool"]["max"] == 1);
    for i in 0..30 {
        let body = r#"{"function": "echo", "payload": "1", "timeout_s": 300}"#;
        let (code, body) = http(&s, "POST", "/functions/rev/invoke", Some(body));
        assert_eq!(code, 200, "call {i}: {body}");
    }

    assert_eq!(http(&s, "DELETE", "/functions/rev", None).0, 204);
    assert_error(http(&s, "GET", "/functions/rev", None), 404, "no function");
    assert!(!dir.join("state/functions/rev").exists());
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
}
