//! `ember serve` under load: a registration whose template is gone is made again, and recycled
//! clones take 10,000 invokes from 16 clients with no fd or thread leak. A test binary of its own,
//! so that no other test competes for the host's cores while it runs.

mod common;

use std::time::{Duration, Instant};

use common::api::{fds_and_threads, http, invoke, json_of, wait_ready, Server};
use serde_json::json;

#[test]
fn a_lost_template_is_made_again_and_recycled_clones_serve_10000_invokes_without_leaks() {
    if !common::kvm_usable("serve_load") {
        return;
    }
    let Some((kernel, initrd)) = common::images("serve_load") else { return };
    let dir = common::scratch("load");
    // What an idle daemon holds, for the leak check at the end.
    let mut idle = Server::start(&dir.join("idle"));
    let baseline = settled_fds_and_threads(idle.child.id());
    assert_eq!(idle.signal(libc::SIGTERM).code(), Some(0));

    // A registration whose template is gone (a wiped disk, a crash before the snapshot): the
    // daemon makes it again at start, and nothing registered is lost.
    let fdir = dir.join("state/functions/load");
    std::fs::create_dir_all(&fdir).unwrap();
    let spec = json!({
        "kernel": kernel, "initramfs": initrd,
        "pool": {"min_ready": 16, "max": 24, "max_uses": 1000000}
    });
    std::fs::write(fdir.join("spec.json"), spec.to_string()).unwrap();
    let mut srv = Server::start(&dir);
    let s = srv.socket.clone();
    assert_eq!(json_of(&http(&s, "GET", "/functions/load", None).1)["state"], "creating");
    wait_ready(&s, "load", 16);
    assert!(fdir.join("template/state").exists(), "the template was not saved again");

    // Recycled clones: released back to the pool and handed out again, unless asked otherwise.
    let h = json_of(&http(&s, "POST", "/functions/load/acquire", None).1);
    let id = h["id"].as_u64().unwrap();
    let release = |h: &serde_json::Value, destroy: bool| {
        format!(r#"{{"lease": "{}", "destroy": {destroy}}}"#, h["lease"].as_str().unwrap())
    };
    let (code, body) = http(&s, "POST", &format!("/vms/{id}/release"), Some(&release(&h, false)));
    assert_eq!((code, json_of(&body)), (200, json!({"id": id, "recycled": true})));
    let again = json_of(&http(&s, "POST", "/functions/load/acquire", None).1);
    assert_eq!(again["id"].as_u64(), Some(id), "the recycled clone was not handed out next");
    let (code, body) = http(&s, "POST", &format!("/vms/{id}/release"), Some(&release(&again, true)));
    assert_eq!((code, json_of(&body)), (200, json!({"id": id, "recycled": false})));

    // 10,000 invokes from 16 clients, each answer checked.
    let t = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..16 {
            let s = s.clone();
            scope.spawn(move || {
                for i in 0..625 {
                    let payload = format!("client {client} call {i}");
                    // A generous timeout: the test checks answers and leaks, not latency (16 busy
                    // clones on a CI machine's share of two cores once took over 30 s for a call).
                    let call = json!({"function": "echo", "payload": payload, "timeout_s": 300});
                    let r = invoke(&s, "load", &call.to_string());
                    assert_eq!(r["payload"].as_str(), Some(payload.as_str()), "{r}");
                }
            });
        }
    });
    eprintln!("10,000 invokes from 16 clients in {:.1} s", t.elapsed().as_secs_f64());
    let info = json_of(&http(&s, "GET", "/functions/load", None).1);
    assert_eq!((info["invocations"].as_u64(), info["invocation_errors"].as_u64()), (Some(10_000), Some(0)), "{info}");
    assert_eq!(info["busy"], 0, "{info}");
    // Every invoke's clone went back to the pool (plus the acquire/release above), and the pool
    // counted on them: far fewer restores than invokes (one per invoke when clones in use were
    // not the pool's own and came back above its level).
    assert_eq!(info["recycled_clones"].as_u64(), Some(10_001), "{info}");
    let restores = info["restores"].as_u64().unwrap();
    eprintln!("{restores} restores for 10,000 invokes");
    assert!(restores < 1_000, "{info}");

    // No leak: once the function is gone, the daemon holds what an idle one does.
    assert_eq!(http(&s, "DELETE", "/functions/load", None).0, 204);
    let pid = srv.child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = fds_and_threads(pid);
    while now != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = fds_and_threads(pid);
    }
    assert_eq!(now, baseline, "(fds, threads) after the load vs an idle daemon");
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
}

/// The daemon's fds and threads once they have stayed the same for a second (the connections that
/// found the server listening are closed by then).
fn settled_fds_and_threads(pid: u32) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (fds_and_threads(pid), Instant::now());
    while since.elapsed() < Duration::from_secs(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = fds_and_threads(pid);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}
