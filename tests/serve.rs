//! `ember serve` over its real Unix socket: bad requests (no KVM needed), then a function registered
//! from the project's guest, handed out, invoked, scaled, restarted and deleted.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::api::{assert_error, http, http_bytes, invoke, json_of, wait_ready, Server};
use serde_json::json;

#[test]
fn bad_requests_get_4xx_with_a_json_error_and_change_nothing() {
    let dir = common::scratch("bad-requests");
    let mut srv = Server::start(&dir);
    let s = &srv.socket.clone();
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
        400,
        "does not exist",
    );
    let k = dir.join("k");
    std::fs::write(&k, b"x").unwrap();
    let spec = |pool: &str| format!(r#"{{"kernel": "{0}", "initramfs": "{0}", "pool": {pool}}}"#, k.display());
    assert_error(
        http(s, "PUT", "/functions/f", Some(&spec(r#"{"min_ready": 5, "max": 2}"#))),
        400,
        "less than pool.min_ready",
    );
    assert_error(http(s, "PUT", "/functions/f", Some(&spec(r#"{"headroom": 0.1}"#))), 400, "headroom");
    let quoted = format!(r#"{{"kernel": "{0}", "initramfs": "{0}", "runtime": "f /bin/sh -c \"x\""}}"#, k.display());
    assert_error(http(s, "PUT", "/functions/f", Some(&quoted)), 400, "runtime");
    assert_error(http(s, "PUT", "/functions/Bad%20Name", Some(&spec("{}"))), 400, "bad function name");
    assert_error(http(s, "POST", "/functions/nope/acquire", None), 404, "no function");
    assert_error(http(s, "POST", "/functions/nope/invoke", Some(r#"{"payload": "x"}"#)), 404, "no function");
    assert_error(http(s, "POST", "/vms/12345/release", None), 404, "no handed-out VM");
    assert_error(http(s, "POST", "/vms/abc/release", None), 400, "bad VM id");
    assert_error(http(s, "GET", "/nowhere", None), 404, "no such endpoint");
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
        "pool": {"min_ready": 2, "max": 24, "headroom": 1.5, "scale_in_delay_s": 1.0, "peak_window_s": 1.0}
    })
    .to_string();
    let (code, body) = http(&s, "PUT", "/functions/rev", Some(&spec));
    assert_eq!(code, 202, "{body}");
    assert_eq!(json_of(&body)["state"], "creating");
    assert_error(http(&s, "PUT", "/functions/rev", Some(&spec)), 409, "already registered");
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
    // A bad release body changes nothing: the VM stays handed out.
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), Some(r#"{"bogus": 1}"#)), 400, "unknown field");
    // Single-use clones (the default policy) are destroyed on release.
    let (code, body) = http(&s, "POST", &format!("/vms/{id}/release"), None);
    assert_eq!((code, json_of(&body)), (200, json!({"id": id, "recycled": false})));
    assert_error(http(&s, "POST", &format!("/vms/{id}/release"), None), 404, "no handed-out VM");

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
    assert_error(http(&s, "POST", "/functions/rev/invoke?function=echo", Some("{}")), 400, "octet-stream");
    let (code, _, body) = http_bytes(&s, "POST", "/functions/rev/invoke?colour=red", "application/octet-stream", b"x");
    assert_eq!(code, 400);
    assert!(json_of(&String::from_utf8_lossy(&body))["error"].as_str().unwrap().contains("bad query"));
    // An agent that does not answer in time: 504, its clone is destroyed, the next call works.
    let slow = r#"{"function": "sleep", "payload": "5000", "timeout_s": 0.5}"#;
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(slow)), 504, "no response");
    assert_eq!(invoke(&s, "rev", r#"{"payload": "after"}"#)["payload"], "retfa");
    assert!(json_of(&http(&s, "GET", "/functions/rev", None).1)["invocation_errors"].as_u64() >= Some(1));
    assert_error(http(&s, "POST", "/functions/rev/invoke", Some(r#"{"function": "bad name"}"#)), 400, "function name");

    // Many concurrent clients: no VM is handed out twice.
    let ids: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let s = s.clone();
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..2 {
                        let (code, body) = http(&s, "POST", "/functions/rev/acquire", None);
                        assert_eq!(code, 200, "{body}");
                        mine.push(json_of(&body)["id"].as_u64().unwrap());
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "a VM was handed out twice: {ids:?}");
    let info = json_of(&http(&s, "GET", "/functions/rev", None).1);
    assert_eq!(info["busy"].as_u64(), Some(32), "{info}");
    // Two ready clones cannot cover 32 requests at once: the rest were cold starts, not failures.
    assert!(info["cold_starts"].as_u64().unwrap() > 0, "{info}");
    for id in &ids {
        assert_eq!(http(&s, "POST", &format!("/vms/{id}/release"), None).0, 200);
    }
    let info = wait_ready(&s, "rev", 2);
    assert_eq!(info["busy"], 0, "{info}");

    let (code, metrics) = http(&s, "GET", "/metrics", None);
    assert_eq!(code, 200);
    let handoffs = info["handoffs"].as_u64().unwrap();
    assert!(metrics.contains(&format!("ember_handoffs_total{{function=\"rev\"}} {handoffs}")), "{metrics}");
    assert!(metrics.contains("ember_handoff_seconds_count"), "{metrics}");
    assert!(metrics.contains("ember_cold_start_ratio{function=\"rev\"}"), "{metrics}");

    // Template files deleted under the running daemon: clones still come from the loaded template.
    let template = dir.join("state/functions/rev/template");
    let saved = dir.join("template-saved");
    std::fs::rename(&template, &saved).unwrap();
    for _ in 0..3 {
        assert_eq!(invoke(&s, "rev", r#"{"payload": "ok"}"#)["payload"], "ko");
    }
    std::fs::rename(&saved, &template).unwrap();

    // A clean restart: the function comes back from its saved template, without booting.
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
    assert!(!s.exists());
    let t = Instant::now();
    let mut srv = Server::start(&dir);
    wait_ready(&s, "rev", 1);
    assert!(t.elapsed() < Duration::from_secs(20), "the restart booted the guest again ({:?})", t.elapsed());
    assert_eq!(invoke(&s, "rev", r#"{"payload": "abc"}"#)["payload"], "cba");

    // Killed outright: the stale socket and channels are cleaned up and nothing registered is lost.
    srv.signal(libc::SIGKILL);
    let mut srv = Server::start(&dir);
    wait_ready(&s, "rev", 1);
    assert_eq!(invoke(&s, "rev", r#"{"payload": "xyz"}"#)["payload"], "zyx");

    assert_eq!(http(&s, "DELETE", "/functions/rev", None).0, 204);
    assert_error(http(&s, "GET", "/functions/rev", None), 404, "no function");
    assert!(!dir.join("state/functions/rev").exists());
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
}
