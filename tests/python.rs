//! ember's Python runtime on real guests, over the API: a handler computing JSON from its event
//! with a dependency from a shared layer; its exceptions as structured errors with the traceback;
//! its output as the invocation's logs, with the request id; two clones' random numbers differ; a
//! handler that never returns times out and its clone is replaced; a handler that cannot be
//! imported fails the registration with Python's own error; a runtime that exits mid-invocation
//! costs only that clone; a new version switches under a steady stream of invocations without one
//! failing. And ember's `exec` runtime: any program speaking runtime protocol 2.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::{http, json_of, wait_ready, Server};
use serde_json::{json, Value};

/// The python3 layer's tree (scripts/build-python-layer.sh writes it).
fn python_tree(test: &str) -> Option<PathBuf> {
    let dir = common::repo().join("images/layers/python3");
    if dir.join("usr/bin/python3").exists() {
        return Some(dir);
    }
    let why = format!("{} is missing (run scripts/build-python-layer.sh)", dir.display());
    assert!(!common::kvm_required(), "{test}: {why}, and EMBER_REQUIRE_KVM=1");
    eprintln!("SKIPPED {test}: {why}");
    None
}

const APP: &str = r#"
import os
import random
import sys
import time

import greeting

print("app imported")

def handler(event, context):
    op = (event or {}).get("op")
    print("handling", context.request_id, "in clone", context.clone_id)
    if op == "boom":
        raise ValueError("boom %s" % event.get("n"))
    if op == "random":
        return {"random": random.random(), "clone": context.clone_id}
    if op == "hang":
        while True:
            time.sleep(1)
    if op == "flood":
        for i in range(5000):
            print("flood line %d %s" % (i, "x" * 100))
        return "flooded"
    if op == "set":
        return {1, 2}
    if op == "exit":
        os._exit(3)
    if op == "stderr":
        print("to stderr", file=sys.stderr)
        return None
    return {
        "sum": sum(event["xs"]),
        "greeting": greeting.hello(event.get("who", "world")),
        "version": VERSION,
        "function": context.function_name,
        "time_left": context.get_remaining_time_in_millis() > 0,
    }

VERSION = "v1"
"#;

/// One invocation with an `x-request-id`: (status, body).
fn invoke_with_id(socket: &Path, name: &str, body: &str, request_id: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "POST /functions/{name}/invoke HTTP/1.1\r\nhost: ember\r\ncontent-type: application/json\r\n\
         x-request-id: {request_id}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains(&format!("x-request-id: {request_id}")), "{head}");
    (head[9..12].parse().unwrap(), json_of(body))
}

/// One invocation of `event` (as JSON). The timeout is generous: guests booting alongside (the
/// other functions' templates) slow every guest on a host where guest kernel mode is emulated.
fn call(s: &Path, name: &str, event: Value) -> Value {
    let (c, body) = http(
        s,
        "POST",
        &format!("/functions/{name}/invoke"),
        Some(&json!({"payload": event.to_string(), "timeout_s": 120}).to_string()),
    );
    assert_eq!(c, 200, "{body}");
    json_of(&body)
}

fn wait_failed(s: &Path, name: &str) -> String {
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    loop {
        let (_, body) = http(s, "GET", &format!("/functions/{name}"), None);
        let v = json_of(&body);
        if v["state"] == "failed" {
            return v["reason"].as_str().unwrap_or_default().to_string();
        }
        assert_ne!(v["state"], "ready", "{body}");
        assert!(Instant::now() < deadline, "{name} never failed: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn python_functions_answer_fail_log_and_switch_versions() {
    if !common::kvm_usable("python") {
        return;
    }
    let Some((kernel, initrd)) = common::images("python") else { return };
    let Some(python) = python_tree("python") else { return };
    let dir = common::scratch("python");
    let sources = dir.join("sources");
    let deps = sources.join("deps/opt/python/greeting");
    std::fs::create_dir_all(&deps).unwrap();
    std::fs::write(deps.join("__init__.py"), "def hello(who):\n    return 'hello, %s' % who\n").unwrap();
    let (v1, v2) = (sources.join("code-v1"), sources.join("code-v2"));
    for (d, version) in [(&v1, "v1"), (&v2, "v2")] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("app.py"), APP.replace("VERSION = \"v1\"", &format!("VERSION = {version:?}"))).unwrap();
    }
    let srv = Server::start_with_images(&dir, std::slice::from_ref(&sources));
    let s = srv.socket.clone();

    let spec = |code: &Path, handler: &str| {
        json!({
            "kernel": kernel, "initramfs": initrd, "runtime": "python3", "handler": handler,
            "code": code, "layers": ["deps"], "mem_mib": 256,
            // Single-use clones: every call below runs on a fresh copy of the template.
            "pool": {"min_ready": 2, "max": 8, "max_uses": 1}
        })
        .to_string()
    };
    // The daemon provides ember's python3 layer from the tree setup built (images/layers/python3
    // in its image directory): listed once built, the same content as a PUT of that tree.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let layers = json_of(&http(&s, "GET", "/layers", None).1);
        if layers["layers"].as_array().unwrap().iter().any(|l| l["name"] == "python3") {
            break;
        }
        assert!(Instant::now() < deadline, "the python3 layer was never provided: {layers}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (c, body) = http(&s, "PUT", "/layers/python3", Some(&json!({"path": python}).to_string()));
    assert_eq!(c, 200, "{body}");
    let (c, body) = http(&s, "PUT", "/layers/deps", Some(&json!({"path": sources.join("deps")}).to_string()));
    assert_eq!(c, 201, "{body}");
    // A handler that is not Python's `module.function` is refused at once.
    let (c, body) = http(&s, "PUT", "/functions/bad", Some(&spec(&v1, "app")));
    assert_eq!(c, 400, "{body}");

    let (c, body) = http(&s, "PUT", "/functions/py", Some(&spec(&v1, "app.handler")));
    assert_eq!(c, 202, "{body}");
    assert_eq!(json_of(&body)["spec"]["layers"], json!(["python3", "deps"]), "{body}");
    // A module that does not exist: the registration fails with Python's ImportError text.
    let (c, body) = http(&s, "PUT", "/functions/bad", Some(&spec(&v1, "nomodule.handler")));
    assert_eq!(c, 202, "{body}");
    // ember's exec runtime, with the example program of the test image's code.
    let exec = common::repo().join("images/examples/exec");
    let ex = json!({
        "kernel": kernel, "initramfs": initrd, "runtime": "exec", "handler": "bin/ember-exec-example",
        "code": exec, "pool": {"min_ready": 1, "max": 4}
    });
    let (c, body) = http(&s, "PUT", "/functions/ex", Some(&ex.to_string()));
    assert_eq!(c, 202, "{body}");
    let reason = wait_failed(&s, "bad");
    assert!(reason.contains("ModuleNotFoundError") && reason.contains("nomodule"), "{reason}");

    let info = wait_ready(&s, "py", 2);
    let version1 = info["version"].as_str().unwrap().to_string();

    // JSON in, JSON out, with a dependency from the shared layer, the context filled in.
    let (c, r) = invoke_with_id(
        &s,
        "py",
        &json!({"payload": r#"{"xs": [1, 2, 39], "who": "ember"}"#, "timeout_s": 120}).to_string(),
        "req-42",
    );
    assert_eq!(c, 200, "{r}");
    assert_eq!((r["status"].as_str(), r["ok"].as_bool()), (Some("ok"), Some(true)), "{r}");
    let out: Value = serde_json::from_str(r["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        out,
        json!({"sum": 42, "greeting": "hello, ember", "version": "v1", "function": "py", "time_left": true})
    );
    assert_eq!((r["request_id"].as_str(), r["version"].as_str()), (Some("req-42"), Some(version1.as_str())), "{r}");
    let clone = r["clone_id"].as_u64().unwrap();
    assert_eq!(r["logs"], json!([format!("handling req-42 in clone {clone}")]), "{r}");
    assert_eq!(r["logs_truncated"], false);

    // An exception: status `error`, its type, message and traceback; the next call works.
    let r = call(&s, "py", json!({"op": "boom", "n": 7}));
    assert_eq!((r["status"].as_str(), r["ok"].as_bool()), (Some("error"), Some(false)), "{r}");
    assert_eq!((r["error"]["type"].as_str(), r["error"]["message"].as_str()), (Some("ValueError"), Some("boom 7")));
    let tb = r["error"]["traceback"].as_str().unwrap();
    assert!(tb.contains("app.py") && tb.contains("raise ValueError") && !tb.contains("bootstrap"), "{tb}");
    assert_eq!(call(&s, "py", json!({"xs": [1]}))["status"], "ok");
    // A return value JSON cannot encode; an event that is not JSON; stderr is in the log too.
    let r = call(&s, "py", json!({"op": "set"}));
    assert!(r["error"]["message"].as_str().unwrap().contains("cannot be encoded as JSON"), "{r}");
    let (c, body) = http(&s, "POST", "/functions/py/invoke", Some(r#"{"payload": "not json", "timeout_s": 120}"#));
    let r = json_of(&body);
    assert_eq!((c, r["status"].as_str()), (200, Some("error")), "{body}");
    assert!(r["error"]["message"].as_str().unwrap().contains("not JSON"), "{r}");
    let r = call(&s, "py", json!({"op": "stderr"}));
    assert_eq!((r["payload"].as_str(), r["logs"][1].as_str()), (Some("null"), Some("to stderr")), "{r}");
    // An output flood is cut, marked, and costs the clone nothing.
    let r = call(&s, "py", json!({"op": "flood"}));
    assert_eq!((r["payload"].as_str(), r["logs_truncated"].as_bool()), (Some("\"flooded\""), Some(true)), "{r}");
    let logged: usize = r["logs"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().len() + 1).sum();
    // (+1: the cut last line has no newline of its own.)
    assert!(logged <= (64 << 10) + 1, "{logged} bytes of logs");

    // A runtime that exits mid-invocation: that call fails, its clone goes, the next call works.
    // (A process's exit is slow where the guest kernel is emulated: its memory goes page by
    // page before the agent sees its pipe close; seconds here, more while guests boot.)
    let exit = json!({"payload": r#"{"op": "exit"}"#, "timeout_s": 180}).to_string();
    let r = json_of(&http(&s, "POST", "/functions/py/invoke", Some(&exit)).1);
    assert_eq!(r["status"], "function failed", "{r}");
    assert!(r["payload"].as_str().unwrap().contains("exited"), "{r}");
    assert_eq!(call(&s, "py", json!({"xs": [3]}))["status"], "ok");

    // The exec runtime: the context reaches the program, its stdout is the log, its error report
    // and its exit are told apart.
    wait_ready(&s, "ex", 1);
    let (c, r) = invoke_with_id(&s, "ex", r#"{"payload": "hello", "timeout_s": 120}"#, "req-ex");
    assert_eq!((c, r["status"].as_str(), r["payload"].as_str()), (200, Some("ok"), Some("HELLO")), "{r}");
    let context = r["logs"][0].as_str().unwrap().strip_prefix("context ").unwrap();
    let context = json_of(context);
    assert_eq!((context["request_id"].as_str(), context["function"].as_str()), (Some("req-ex"), Some("ex")), "{r}");
    assert_eq!(context["clone_id"], r["clone_id"], "{r}");
    let r = json_of(&http(&s, "POST", "/functions/ex/invoke", Some(r#"{"payload": "fail", "timeout_s": 120}"#)).1);
    assert_eq!((r["status"].as_str(), r["error"]["type"].as_str()), (Some("error"), Some("ExampleError")), "{r}");
    let (_, body) = http(&s, "POST", "/functions/ex/invoke", Some(r#"{"payload": "exit", "timeout_s": 180}"#));
    assert_eq!(json_of(&body)["status"], "function failed", "{body}");
    let (_, body) = http(&s, "POST", "/functions/ex/invoke", Some(r#"{"payload": "again", "timeout_s": 120}"#));
    assert_eq!(json_of(&body)["payload"], "AGAIN", "{body}");

    // Two clones of one template draw different random numbers.
    let a = call(&s, "py", json!({"op": "random"}));
    let b = call(&s, "py", json!({"op": "random"}));
    let (a, b) = (json_of(a["payload"].as_str().unwrap()), json_of(b["payload"].as_str().unwrap()));
    assert_ne!(a["clone"], b["clone"], "single-use clones");
    assert_ne!(a["random"], b["random"], "two clones returned the same random.random()");

    // A handler that never returns: the call times out, its clone goes, the function serves on.
    let replaced_before = json_of(&http(&s, "GET", "/functions/py", None).1)["invocation_errors"].as_u64().unwrap();
    let (c, body) = http(
        &s,
        "POST",
        "/functions/py/invoke",
        Some(&json!({"payload": r#"{"op": "hang"}"#, "timeout_s": 2}).to_string()),
    );
    assert_eq!(c, 504, "{body}");
    let info = json_of(&http(&s, "GET", "/functions/py", None).1);
    assert_eq!(info["invocation_errors"].as_u64().unwrap(), replaced_before + 1, "{info}");
    assert_eq!(call(&s, "py", json!({"xs": [2]}))["status"], "ok");

    // A new version under a steady stream of invocations: none fails, and the answers move from
    // v1 to v2.
    // (The stream runs while the new template boots, which slows every guest on the host: its
    // calls get a generous timeout, and the test waits for what it asserts, a v1 answer before
    // the switch and a v2 one after it, instead of sleeping for it.)
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let streamer = {
        let (s, stop, seen) = (s.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let body = r#"{"payload": "{\"xs\": [1]}", "timeout_s": 300}"#;
                let (c, body) = http(&s, "POST", "/functions/py/invoke", Some(body));
                assert_eq!(c, 200, "an invocation failed during the switch: {body}");
                let r = json_of(&body);
                assert_eq!(r["status"], "ok", "{r}");
                let version = json_of(r["payload"].as_str().unwrap())["version"].as_str().unwrap().to_string();
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&version) {
                    seen.push(version);
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let seen_now = || seen.lock().unwrap().clone();
    let wait_seen = |what: &str, f: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + common::BOOT_TIMEOUT;
        while !f(&seen_now()) {
            assert!(!streamer.is_finished(), "the invocation stream ended");
            assert!(Instant::now() < deadline, "no {what} answer in the stream: {:?}", seen_now());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_seen("v1", &|s| !s.is_empty());
    let (c, body) = http(&s, "PUT", "/functions/py", Some(&spec(&v2, "app.handler")));
    assert_eq!(c, 202, "{body}");
    let v = json_of(&body);
    assert_eq!(
        (v["version"].as_str(), v["update"]["state"].as_str()),
        (Some(version1.as_str()), Some("creating")),
        "{v}"
    );
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    let version2 = loop {
        let v = json_of(&http(&s, "GET", "/functions/py", None).1);
        assert_ne!(v["update"]["state"], "failed", "{v}");
        if v["version"].as_str() != Some(version1.as_str()) && v["update"].is_null() {
            break v["version"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the new version never took over: {v}");
        std::thread::sleep(Duration::from_millis(300));
    };
    wait_seen("v2", &|s| s.len() > 1);
    stop.store(true, Ordering::SeqCst);
    streamer.join().expect("the invocation stream failed");
    assert_eq!(seen_now(), ["v1", "v2"], "answers by version over the switch");
    let r = call(&s, "py", json!({"xs": [5]}));
    assert_eq!(
        (r["version"].as_str(), json_of(r["payload"].as_str().unwrap())["version"].as_str()),
        (Some(version2.as_str()), Some("v2"))
    );
    // (The daemon is killed when `srv` goes: one CI run saw it miss a SIGTERM sent here, with
    // ~25 guest threads in the process; a second SIGTERM stopped it at once. Not understood yet;
    // tests/serve.rs checks the clean stop.)
    drop(srv);
}
