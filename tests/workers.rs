//! Worker processes (`ember serve` as root: jailed): each function's clones run in a process of
//! their own, confined (seccomp on every thread, its own uid, no capabilities, its own mount, pid
//! and network namespaces and root, a cgroup with the function's limits); one worker's death, by
//! SIGKILL or by its memory cap, costs only that function's clones, which are replaced; nothing is
//! left behind by clone cycles, a DELETE, a daemon stop or a daemon SIGKILL + restart. One guest
//! boot (the shared template), installed as two functions.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{children, http, invoke, json_of, wait_ready, Server};
use ember::serve::model::FunctionSpec;
use ember::serve::registry::Registry;
use serde_json::{json, Value};

fn worker(s: &Path, name: &str) -> Value {
    let (code, body) = http(s, "GET", &format!("/functions/{name}"), None);
    assert_eq!(code, 200, "{body}");
    json_of(&body)["worker"].clone()
}

fn pid_of(s: &Path, name: &str) -> i32 {
    let w = worker(s, name);
    w["pid"].as_i64().unwrap_or_else(|| panic!("{name} has no live worker: {w}")) as i32
}

fn alive(pid: i32) -> bool {
    // A reaped process has no /proc entry; a zombie still has one, marked Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker cgroup directories under the daemon's base (next to `cgroup`, a worker's).
fn sibling_cgroups(cgroup: &str) -> Vec<PathBuf> {
    let base = Path::new(cgroup).parent().unwrap();
    std::fs::read_dir(base).unwrap().flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect()
}

fn check_confined(pid: i32) {
    let mnt = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(mnt(&pid.to_string()), mnt("self"), "the worker shares the host's mount namespace");
    let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(net(&pid.to_string()), net("self"), "the worker shares the host's network namespace");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for (key, want) in [
        ("CapEff:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
    ] {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        assert!(line.ends_with(want), "{line}");
    }
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() >= 3, "{} threads", tasks.len());
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if status.is_empty() {
            continue; // the thread ended meanwhile
        }
        let name = status.lines().next().unwrap_or_default().to_string();
        assert!(status.contains("\nSeccomp:\t2\n"), "worker thread {name} is not confined");
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uids.split_whitespace().skip(1).all(|u| u != "0"), "worker thread {name} runs as root: {uids}");
    }
    // What the worker sees as its root: none of the host's files (probed through its own root).
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(Path::new("/etc/passwd").exists());
    for probe in ["etc/passwd", "dev/kvm", "proc/1", "usr/bin", "root"] {
        assert!(!root.join(probe).exists(), "the worker can see /{probe}");
    }
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(mounts.lines().count() <= 4, "{mounts}");
}

#[test]
fn each_function_runs_in_a_jailed_worker_whose_death_costs_only_its_clones() {
    let Some(template) = common::template("workers") else { return };
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!common::kvm_required(), "worker jails need root");
        eprintln!("workers: skipped (jails need root)");
        return;
    }
    let (kernel, initrd) = common::images("workers").unwrap();
    let dir = common::scratch("workers");
    let registry = Registry::open(&dir.join("state")).unwrap();
    let pool = json!({"min_ready": 2, "max": 6, "max_uses": 1});
    let spec = |limits: Value| -> FunctionSpec {
        serde_json::from_value(json!({"kernel": kernel, "initramfs": initrd, "pool": pool, "limits": limits})).unwrap()
    };
    registry.install("a", &spec(json!({})), template).unwrap();
    registry.install("b", &spec(json!({"memory_mib": 40, "pids": 64, "cpus": 0.5})), template).unwrap();
    drop(registry);
    let mut srv = Server::start(&dir);
    let s = srv.socket.clone();
    wait_ready(&s, "a", 2);
    wait_ready(&s, "b", 2);

    // One worker per function, each jailed, under its own uid, with its cgroup's limits set.
    let (wa, wb) = (worker(&s, "a"), worker(&s, "b"));
    let (pa, pb) = (pid_of(&s, "a"), pid_of(&s, "b"));
    assert_ne!(pa, pb);
    assert_eq!(wa["jailed"], true, "{wa}");
    assert_ne!(wa["uid"], wb["uid"]);
    assert_eq!(wb["memory_limit_bytes"], 40u64 << 20, "{wb}");
    let cg_b = wb["cgroup"].as_str().unwrap().to_string();
    let limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(Path::new(&cg_b).join(f)).ok())
        .unwrap();
    assert_eq!(limit.trim(), (40u64 << 20).to_string());
    let procs = std::fs::read_to_string(Path::new(&cg_b).join("cgroup.procs")).unwrap();
    assert!(!procs.trim().is_empty(), "the worker is not in its cgroup");
    check_confined(pa);
    check_confined(pb);
    let daemon = srv.child.id();
    let mut workers = children(daemon);
    workers.sort();
    let mut want = vec![pa, pb];
    want.sort();
    assert_eq!(workers, want, "the daemon's child processes are its two workers");

    // Invocations go through the supervisor to clones in the workers.
    for name in ["a", "b"] {
        let r = invoke(&s, name, r#"{"function": "echo", "payload": "hi"}"#);
        assert_eq!(r["payload"], "hi", "{r}");
    }

    // A guest that writes more memory than its function's cap: the kernel kills b's worker (not
    // anything else), b's clones are replaced by a new worker's, a never notices.
    let (code, body) =
        // (The call ends when the worker is killed; its timeout only has to outlast the guest's
        // first touches of 40 MiB, each emulated guest kernel work at half a CPU here.)
        http(&s, "POST", "/functions/b/invoke", Some(r#"{"function": "touch", "payload": "96", "timeout_s": 600}"#));
    assert!(code >= 500 || json_of(&body)["ok"] == false, "{code} {body}");
    wait_for("b's worker to be replaced", Duration::from_secs(90), || {
        let w = worker(&s, "b");
        w["restarts"] == 1 && w["pid"].is_i64()
    });
    let wb = worker(&s, "b");
    let last = wb["last_exit"].as_str().unwrap_or_default();
    assert!(last.contains("SIGKILL") && last.contains("memory limit"), "{wb}");
    assert!(!alive(pb));
    assert_eq!(pid_of(&s, "a"), pa);
    assert_eq!(invoke(&s, "a", r#"{"function": "echo", "payload": "a"}"#)["payload"], "a");
    wait_ready(&s, "b", 2);
    assert_eq!(invoke(&s, "b", r#"{"function": "echo", "payload": "b"}"#)["payload"], "b");
    // Within the cap, b's guests work as before.
    // (Each page a guest touches first is emulated guest kernel work here, at half a CPU: slow.)
    let r = invoke(&s, "b", r#"{"function": "touch", "payload": "1", "timeout_s": 240}"#);
    assert_eq!(r["payload"], "touched 1 MiB", "{r}");

    // A guest that storms exits (doorbells, unclaimed MMIO, queue notifications) as fast as its
    // vCPU goes: its worker is throttled at b's CPU cap, a keeps answering, the daemon does not grow.
    let rss = |pid: u32| -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap()
    };
    // b's CPU time, as its worker's cgroup counts it.
    let cpu_used = || -> u64 {
        let w = worker(&s, "b");
        w["cpu_used_us"].as_u64().unwrap_or_else(|| panic!("no CPU time for b's worker: {w}"))
    };
    let (throttled, rss_before) = (worker(&s, "b")["cpu_throttled_periods"].as_u64().unwrap(), rss(daemon));
    let (used_before, storm_start) = (cpu_used(), Instant::now());
    let storm = {
        let s = s.clone();
        std::thread::spawn(move || {
            http(
                &s,
                "POST",
                "/functions/b/invoke",
                Some(r#"{"function": "storm", "payload": "doorbell 3000", "timeout_s": 120}"#),
            )
        })
    };
    let mut calls = 0;
    while calls == 0 || !storm.is_finished() {
        assert_eq!(invoke(&s, "a", r#"{"function": "echo", "payload": "a"}"#)["payload"], "a");
        calls += 1;
    }
    let (code, body) = storm.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(calls > 0);
    // The cap held: b used at most half a CPU over the storm (plus a period's worth of slack).
    // It was throttled if it reached the cap, which a loaded host may not have let it do.
    let (used, wall) = (cpu_used() - used_before, storm_start.elapsed().as_micros() as u64);
    let wb = worker(&s, "b");
    assert!(used <= wall / 2 + 100_000, "b used {used} us of CPU in {wall} us at a cap of half a CPU: {wb}");
    if used >= wall / 2 - wall / 10 {
        assert!(wb["cpu_throttled_periods"].as_u64().unwrap() > throttled, "b reached its cap unthrottled: {wb}");
    }
    assert!(rss(daemon) < rss_before + 16 * 1024, "the daemon grew: {} -> {} KiB", rss_before, rss(daemon));
    eprintln!("storm: {} periods throttled; a answered {calls} invocations meanwhile", wb["cpu_throttled_periods"]);

    // SIGKILL of a's worker: a's clones are replaced, b keeps serving throughout.
    // SAFETY: kill(2) on a process this test found.
    unsafe { libc::kill(pa, libc::SIGKILL) };
    for _ in 0..20 {
        assert_eq!(invoke(&s, "b", r#"{"function": "echo", "payload": "b"}"#)["payload"], "b");
    }
    wait_for("a's worker to be replaced", Duration::from_secs(90), || {
        worker(&s, "a")["pid"].as_i64().is_some_and(|p| p as i32 != pa)
    });
    let wa = worker(&s, "a");
    assert_eq!(wa["restarts"], 1, "{wa}");
    assert!(wa["last_exit"].as_str().unwrap_or_default().contains("killed by SIGKILL"), "{wa}");
    wait_ready(&s, "a", 2);
    assert_eq!(invoke(&s, "a", r#"{"function": "echo", "payload": "a2"}"#)["payload"], "a2");
    let pa = pid_of(&s, "a");
    check_confined(pa);

    // Clone cycles leave nothing behind in the worker: its fds, threads and channel files stay
    // flat (one cycle: acquire, release destroying the clone, the pool refilled).
    let run_dir = |name: &str| -> PathBuf {
        let v = json_of(&http(&s, "POST", &format!("/functions/{name}/acquire"), None).1);
        let lease = v["lease"].as_str().unwrap().to_string();
        let path = PathBuf::from(v["vsock"].as_str().unwrap());
        let (code, body) = http(
            &s,
            "POST",
            &format!("/vms/{}/release", v["id"]),
            Some(&format!(r#"{{"lease": "{lease}", "destroy": true}}"#)),
        );
        assert_eq!(code, 200, "{body}");
        path.parent().unwrap().to_path_buf()
    };
    let count = |p: String| std::fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    let cycle = |n: usize| {
        let mut dir = PathBuf::new();
        for _ in 0..n {
            dir = run_dir("a");
            wait_ready(&s, "a", 2);
        }
        dir
    };
    let rd = cycle(20);
    // Sampled with the pool full and quiet (its target reached, nothing being restored): what the
    // worker holds then is the most it holds for that target.
    wait_for("a's pool to fill", Duration::from_secs(300), || {
        let f = json_of(&http(&s, "GET", "/functions/a", None).1);
        f["restoring"] == 0 && f["warming"] == 0 && f["ready"] == f["target_ready"]
    });
    let mounts = || std::fs::read_to_string(format!("/proc/{pa}/mountinfo")).unwrap().lines().count();
    let cgroups = || sibling_cgroups(worker(&s, "a")["cgroup"].as_str().unwrap()).len();
    let before = (count(format!("/proc/{pa}/fd")), count(format!("/proc/{pa}/task")), count(rd.display().to_string()));
    let (mounts_before, cgroups_before) = (mounts(), cgroups());
    // (EMBER_SOAK=1: the 10,000 cycles of the issue; about an hour here.)
    cycle(if std::env::var_os("EMBER_SOAK").is_some() { 10_000 } else { 150 });
    // What the worker holds at a given moment also depends on its pool and VM shells (clones
    // being destroyed, restored, shells being made): a leak is what does not settle back.
    let settled = Instant::now() + Duration::from_secs(300);
    loop {
        let after =
            (count(format!("/proc/{pa}/fd")), count(format!("/proc/{pa}/task")), count(rd.display().to_string()));
        if after.0 <= before.0 + 8 && after.1 <= before.1 + 4 && after.2 <= before.2 + 4 {
            break;
        }
        assert!(Instant::now() < settled, "{before:?} -> {after:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pid_of(&s, "a"), pa);
    assert_eq!((mounts(), cgroups()), (mounts_before, cgroups_before), "mounts or cgroups left by clone cycles");
    assert_eq!(children(daemon).len(), 2, "processes left by clone cycles");

    // DELETE: the worker exits, its cgroup and channel directory go.
    let cg_a = worker(&s, "a")["cgroup"].as_str().unwrap().to_string();
    assert_eq!(http(&s, "DELETE", "/functions/a", None).0, 204);
    wait_for("a's worker to exit", Duration::from_secs(60), || !alive(pa));
    wait_for("a's cgroup to go", Duration::from_secs(60), || !Path::new(&cg_a).exists());
    assert!(!rd.exists(), "{} is left", rd.display());

    // A daemon killed with SIGKILL takes its workers with it; a restart removes what they left.
    let pb = pid_of(&s, "b");
    let cg_b = worker(&s, "b")["cgroup"].as_str().unwrap().to_string();
    srv.signal(libc::SIGKILL);
    wait_for("b's worker to die with the daemon", Duration::from_secs(60), || !alive(pb));
    let srv2 = Server::start(&dir);
    let s = srv2.socket.clone();
    wait_ready(&s, "b", 2);
    wait_for("the killed daemon's worker cgroup to go", Duration::from_secs(90), || !Path::new(&cg_b).exists());
    assert_eq!(sibling_cgroups(worker(&s, "b")["cgroup"].as_str().unwrap()).len(), 1);
    assert_eq!(invoke(&s, "b", r#"{"function": "echo", "payload": "again"}"#)["payload"], "again");
    let pb = pid_of(&s, "b");
    let cg_b = worker(&s, "b")["cgroup"].as_str().unwrap().to_string();
    let mut srv2 = srv2;
    assert!(srv2.signal(libc::SIGTERM).success());
    wait_for("the worker to exit with the daemon", Duration::from_secs(60), || !alive(pb));
    wait_for("the cgroup to go", Duration::from_secs(60), || !Path::new(&cg_b).exists());

    // `--isolation process` (what a daemon without root runs): workers, not jailed, still
    // confined with seccomp and no_new_privs.
    let pdir = common::scratch("process");
    Registry::open(&pdir.join("state")).unwrap().install("p", &spec(json!({})), template).unwrap();
    let srv3 = Server::start_with_args(&pdir, &[], &["--isolation", "process"]);
    let s = srv3.socket.clone();
    wait_ready(&s, "p", 2);
    let w = worker(&s, "p");
    assert_eq!((w["jailed"].as_bool(), w["uid"].as_u64(), w["cgroup"].is_null()), (Some(false), Some(0), true), "{w}");
    let pid = pid_of(&s, "p");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n") && status.contains("\nNoNewPrivs:\t1\n"), "{status}");
    assert_eq!(invoke(&s, "p", r#"{"function": "echo", "payload": "p"}"#)["payload"], "p");
}
