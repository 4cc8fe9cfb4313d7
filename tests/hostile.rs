//! A compromised worker (a guest that escaped into its VMM controls that process, as its uid, in
//! its jail): the daemon follows nothing it wrote, owns or sent. The workers here are a test
//! build's, told to act as compromised ones (`EMBER_TEST_HOSTILE_WORKER`, honoured only by debug
//! builds; see `serve::worker::process`): one plants symlinks to a file of the host's under every
//! name in its template directory, keeps running after its template is made and truncates its
//! clones' mailboxes; the other names that file, through `..`, as a writable drive in its
//! template's state. The file stays as it was (content, mode, owner), the daemon lives, the first
//! function serves (also after a restart that reopens its template), the second is refused, and
//! no template worker outlives its template. Two guest boots (the two templates, at once).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::api::{children, http, invoke, json_of, wait_ready, Server};
use serde_json::json;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What an attack on `p` would change: its content, mode, owner and group.
fn fingerprint(p: &Path) -> (Vec<u8>, u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (std::fs::read(p).unwrap(), m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn a_compromised_worker_reaches_nothing_outside_its_own_directories() {
    if !common::kvm_usable("hostile") {
        return;
    }
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!common::kvm_required(), "worker jails need root");
        eprintln!("hostile: skipped (jails need root)");
        return;
    }
    let (kernel, initrd) = common::images("hostile").unwrap();
    let dir = common::scratch("hostile");
    // A file of the host's, owned by someone else, outside the state directory.
    let target = dir.join("host-file");
    std::fs::write(&target, b"the host's own content, as long as a state file's name").unwrap();
    std::os::unix::fs::chown(&target, Some(4242), Some(4242)).unwrap();
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let before = fingerprint(&target);
    let env = [("EMBER_TEST_HOSTILE_WORKER", target.as_path())];
    let mut srv = Server::start_with_env(&dir, &[], &[], &env);
    let s = srv.socket.clone();
    let spec = json!({"kernel": kernel, "initramfs": initrd, "pool": {"min_ready": 2, "max": 4}}).to_string();
    for name in ["hostile-links", "hostile-drives"] {
        let (code, body) = http(&s, "PUT", &format!("/functions/{name}"), Some(&spec));
        assert_eq!(code, 202, "{body}");
    }
    // A guest that does not say ready within its registration's bound fails that registration
    // (and gives its boot slot back).
    let slow = json!({"kernel": kernel, "initramfs": initrd, "boot_timeout_s": 1}).to_string();
    let (code, body) = http(&s, "PUT", "/functions/slow", Some(&slow));
    assert_eq!(code, 202, "{body}");
    wait_for("slow to fail", common::BOOT_TIMEOUT, || {
        json_of(&http(&s, "GET", "/functions/slow", None).1)["state"] == "failed"
    });
    let v = json_of(&http(&s, "GET", "/functions/slow", None).1);
    assert!(v["reason"].as_str().unwrap_or_default().contains("never signalled ready"), "{v}");
    // The template whose state names another drive than the registration's is refused.
    wait_for("hostile-drives to be refused", common::BOOT_TIMEOUT, || {
        let v = json_of(&http(&s, "GET", "/functions/hostile-drives", None).1);
        assert_ne!(v["state"], "ready", "a template with a forged drive list was taken: {v}");
        v["state"] == "failed"
    });
    let v = json_of(&http(&s, "GET", "/functions/hostile-drives", None).1);
    assert!(v["reason"].as_str().unwrap_or_default().contains("drives are not the registration's"), "{v}");
    wait_ready(&s, "hostile-links", 2);
    // No template worker lingers: the daemon's only child is hostile-links' serving worker.
    let daemon = srv.child.id();
    wait_for("the template workers to be gone", Duration::from_secs(60), || children(daemon).len() == 1);
    // Its clones answer, though the worker truncated (tried to) every mailbox it handed over.
    for i in 0..20 {
        let r = invoke(&s, "hostile-links", &format!(r#"{{"function": "echo", "payload": "call {i}"}}"#));
        assert_eq!(r["payload"], format!("call {i}"), "{r}");
    }
    assert!(srv.child.try_wait().unwrap().is_none(), "the daemon died");
    // What a worker can write is bounded: its directory is a small tmpfs of its own (it tried to
    // write 64 MiB there).
    let fills: Vec<u64> = std::fs::read_dir(dir.join("state/workers"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path().join("fill")).ok())
        .map(|m| m.len())
        .collect();
    assert!(!fills.is_empty() && fills.iter().all(|n| *n <= 1 << 20), "{fills:?}");
    // The daemon wrote its template directory itself: regular files, its own.
    let tdir = dir.join("state/functions/hostile-links/template");
    for f in ["state", "memory", "working-set", "registration.json", "version"] {
        let m = std::fs::symlink_metadata(tdir.join(f)).unwrap();
        assert!(m.file_type().is_file() && m.uid() == 0 && m.nlink() == 1, "{f}: {m:?}");
    }
    assert_eq!(fingerprint(&target), before, "the host's file changed");

    // A restart reopens the template the daemon wrote (not the worker's directory): it serves.
    // Installed meanwhile from it: a function whose workers die before they serve.
    assert!(srv.signal(libc::SIGTERM).success());
    let registry = ember::serve::registry::Registry::open(&dir.join("state")).unwrap();
    let crash: ember::serve::model::FunctionSpec = serde_json::from_str(&spec).unwrap();
    registry.install("hostile-crash", &crash, &tdir).unwrap();
    drop(registry);
    let srv = Server::start_with_env(&dir, &[], &[], &env);
    let s = srv.socket.clone();
    wait_ready(&s, "hostile-links", 1);
    let r = invoke(&s, "hostile-links", r#"{"function": "echo", "payload": "again"}"#);
    assert_eq!(r["payload"], "again", "{r}");
    assert_eq!(fingerprint(&target), before, "the host's file changed");
    // Its workers keep dying before they serve: once they are restarted less often, a request for
    // a clone is answered 503 with when to come back (the lean protocol's retry_after_s), and
    // the function says it is restarting; the other function is not affected.
    use std::io::{BufRead, BufReader, Write};
    let c = std::os::unix::net::UnixStream::connect(&s).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut lines = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    w.write_all(ember::serve::lean::HELLO).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let refusal = loop {
        w.write_all(b"acquire hostile-crash\n").unwrap();
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        let v = json_of(&line);
        assert!(v.get("id").is_none(), "a clone of a worker that dies at its first restore: {v}");
        if v["status"] == 503 {
            break v;
        }
        assert!(Instant::now() < deadline, "never a 503 while the worker is restarted: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(refusal["retry_after_s"].as_u64().is_some_and(|s| s >= 1), "{refusal}");
    assert!(refusal["error"].as_str().unwrap().contains("being restarted"), "{refusal}");
    let info = json_of(&http(&s, "GET", "/functions/hostile-crash", None).1);
    assert!(info["worker"]["restarts"].as_u64().unwrap() >= 2, "{info}");
    let metrics = http(&s, "GET", "/metrics", None).1;
    let restarts = metrics.lines().find(|l| l.starts_with("ember_worker_restarts_total{function=\"hostile-crash\"}"));
    assert!(restarts.is_some_and(|l| !l.ends_with(" 0")), "{metrics}");
    let r = invoke(&s, "hostile-links", r#"{"function": "echo", "payload": "still"}"#);
    assert_eq!(r["payload"], "still", "{r}");
    // A clean stop leaves no worker directory mounted (a template boot in progress included:
    // hostile-drives boots again after the restart).
    drop(srv);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = dir.join("state").display().to_string();
    assert!(!mounts.contains(&state), "{mounts}");
}
