//! ember as Firecracker: its command line, and its API driven the way Firecracker's clients drive
//! it (configure, InstanceStart, pause, resume), on a real guest booted through the API.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api::{http, json_of};
use common::netns::{ip, Netns};

fn ember() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ember"))
}

fn fault(r: (u16, String), needle: &str) {
    assert_eq!(r.0, 400, "{}", r.1);
    let msg =
        json_of(&r.1)["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message: {}", r.1)).to_string();
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

#[test]
fn its_command_line_is_firecrackers() {
    let out = ember().args(["firecracker", "--colour", "red"]).output().unwrap();
    assert_eq!(out.status.code(), Some(153), "Firecracker's status for a bad argument");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Found argument 'colour' which wasn't expected"), "{err}");
    let out = ember().args(["firecracker", "--no-api"]).output().unwrap();
    assert_eq!(out.status.code(), Some(153));
    // A compiled filter file is refused by name, never ignored.
    let out = ember().args(["firecracker", "--seccomp-filter", "/tmp/f.bpf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seccomp-filter"));
    // A metrics path that cannot be opened: a clear error, no socket left behind.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let out = ember()
        .args(["firecracker", "--api-sock", sock.to_str().unwrap(), "--metrics-path", "/nonexistent/dir/m.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot initialize the metrics system"), "{out:?}");
    assert!(!sock.exists());
    // Started through a link named firecracker, as clients start it.
    let link = dir.path().join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ember"), &link).unwrap();
    let out = Command::new(&link).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Firecracker v1."), "{out:?}");
}

/// Every request's body is read before it is answered, as Firecracker's server does, whatever the
/// path: an answer written while the client is still sending is lost when the connection closes
/// with unread bytes (a client through a TCP bridge then saw "closed without response"). A body
/// over `--http-api-max-payload-size` is refused with its size, once it has been read.
#[test]
fn a_request_is_answered_once_its_whole_body_is_read() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("fc.sock");
    let mut cmd = ember();
    cmd.args(["firecracker", "--api-sock", s.to_str().unwrap(), "--http-api-max-payload-size", "1000"])
        .stdout(Stdio::null());
    let _child = Killed(cmd.spawn().unwrap());
    wait_socket(&s);
    for (path, len, needle) in [
        ("/cpu-config", 900, "not supported by ember"),
        ("/no-such-path", 900, "Invalid request method and/or path"),
        ("/boot-source", 900, "kernel_image_path"),
        ("/cpu-config", 5000, "Request payload with size 5000 is larger than the limit of 1000"),
    ] {
        let mut c = std::os::unix::net::UnixStream::connect(&s).unwrap();
        let body = format!("{{\"x\": \"{}\"}}", "y".repeat(len - 9));
        assert_eq!(body.len(), len);
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&body.as_bytes()[..len / 2]).unwrap();
        // Half the body sent: no answer yet.
        c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 4096];
        match c.read(&mut buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Ok(n) => panic!("{path}: answered before its body was read: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("{path}: {e}"),
        }
        c.write_all(&body.as_bytes()[len / 2..]).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).contains("}") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "{path}: closed without an answer: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains(needle), "{path}: expected {needle:?} in {answer}");
    }
}

/// Waits for `socket` to accept connections.
fn wait_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the API socket never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two network namespaces (as root), each with a TAP at 172.16.0.1/24 and a web server there that
/// answers which namespace it is in: where a guest's interface leads. The TAPs have one MAC, as a
/// platform gives the TAPs of a snapshot's clones (a restored guest's ARP cache holds it).
struct Taps {
    first: Netns,
    second: Netns,
}

impl Taps {
    fn new() -> Option<Self> {
        if !common::netns::root("firecracker api (TAP network interfaces)") {
            return None;
        }
        let taps = Self { first: Netns::new("f1"), second: Netns::new("f2") };
        for (ns, tap) in [(&taps.first, "tap0"), (&taps.second, "tap1")] {
            ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["-n", &ns.0, "link", "set", tap, "address", "02:00:ac:10:00:01"]);
            ip(&["-n", &ns.0, "addr", "add", "172.16.0.1/24", "dev", tap]);
            ip(&["-n", &ns.0, "link", "set", tap, "up"]);
            let answer = format!("HTTP/1.0 200 OK\r\n\r\nbehind {tap}");
            let listener = ns.run(|| std::net::TcpListener::bind("172.16.0.1:8080").unwrap());
            std::thread::spawn(move || {
                for mut c in listener.incoming().flatten() {
                    use std::io::{Read, Write};
                    let mut req = [0u8; 1024];
                    let _ = c.read(&mut req);
                    let _ = c.write_all(answer.as_bytes());
                }
            });
        }
        Some(taps)
    }
}

/// What the guest's agent fetches from 172.16.0.1:8080 over its network interface.
fn fetch(vsock: &Path) -> String {
    agent(vsock, "http-get", "172.16.0.1:8080/ 20000")
}

/// The microVM driven as Firecracker's Go SDK drives it, in its order: wait for the socket (GET
/// /machine-config), logger and metrics, machine, boot source, drives, network interface (a TAP),
/// vsock, InstanceStart; then pause, snapshot, resume; a load in a new process with
/// `network_overrides` and `resume_vm`; and the shutdown it sends, SendCtrlAltDel. Without root
/// (no TAP) the network interface is left out.
#[test]
fn a_guest_is_configured_started_paused_and_resumed_through_the_api() {
    if !common::kvm_usable("firecracker api") {
        return;
    }
    let Some((kernel, initrd)) = common::images("firecracker api") else { return };
    let taps = Taps::new();
    let dir = tempfile::tempdir().unwrap();
    let (s, drive, vsock) = (dir.path().join("fc.sock"), dir.path().join("data.img"), dir.path().join("v.sock"));
    std::fs::write(&drive, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(["firecracker", "--api-sock", s.to_str().unwrap(), "--id", "fc-test", "--level", "Info"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = &taps {
        t.first.enter(&mut cmd);
    }
    let mut child = Killed(cmd.spawn().unwrap());
    wait_socket(&s);
    assert_eq!(json_of(&http(&s, "GET", "/machine-config", None).1)["vcpu_count"], 1, "the SDK's first request");
    let info = json_of(&http(&s, "GET", "/", None).1);
    assert_eq!((info["id"].as_str(), info["state"].as_str()), (Some("fc-test"), Some("Not started")));
    assert!(json_of(&http(&s, "GET", "/version", None).1)["firecracker_version"].is_string());
    // Before InstanceStart: what only a running microVM takes is refused.
    fault(http(&s, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)), "before starting");
    fault(http(&s, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), "without kernel configuration");
    fault(http(&s, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)), "before starting");
    // The log, moved to a file with its level shown, and the metrics (once), as the SDK does first.
    let log = dir.path().join("fc.log");
    fault(http(&s, "PUT", "/logger", Some(r#"{"level": "Loud"}"#)), "Invalid log level");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info", "show_level": true}}"#, log.display());
    assert_eq!(http(&s, "PUT", "/logger", Some(&logger)).0, 204);
    let metrics = dir.path().join("metrics.json");
    let m = format!(r#"{{"metrics_path": "{}", "emit_id": true}}"#, metrics.display());
    assert_eq!(http(&s, "PUT", "/metrics", Some(&m)).0, 204);
    fault(http(&s, "PUT", "/metrics", Some(&m)), "Reinitialization of metrics not allowed.");
    fault(http(&s, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#)), "before starting");
    assert_eq!(http(&s, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256}"#)).0, 204);
    fault(http(&s, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256, "smt": true}"#)), "smt");
    fault(http(&s, "PATCH", "/machine-config", Some("{}")), "Empty PATCH request.");
    // Firecracker's default machine in the end (128 MiB): a load restores it into the VM shell
    // the loading process made ahead (see below).
    assert_eq!(http(&s, "PATCH", "/machine-config", Some(r#"{"mem_size_mib": 128}"#)).0, 204);
    fault(http(&s, "PUT", "/boot-source", Some(r#"{"kernel_image_path": "/no/vmlinux"}"#)), "cannot be opened");
    // The guest's address on its interface: ember's agent reads it from the command line.
    let args = format!("{} ember_net=172.16.0.2/24", ember::config::default_cmdline());
    let boot = serde_json::json!({"kernel_image_path": kernel, "initrd_path": initrd, "boot_args": args});
    assert_eq!(http(&s, "PUT", "/boot-source", Some(&boot.to_string())).0, 204);
    let d = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
        drive.display()
    );
    assert_eq!(http(&s, "PUT", "/drives/data", Some(&d)).0, 204);
    fault(http(&s, "PUT", "/drives/other", Some(&d)), "does not match");
    fault(http(&s, "PUT", "/drives/a-b", Some(&d.replace("data", "a-b"))), "alphanumeric characters and underscores");
    if taps.is_some() {
        let n = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#;
        assert_eq!(http(&s, "PUT", "/network-interfaces/eth0", Some(n)).0, 204);
        fault(http(&s, "PUT", "/network-interfaces/eth0", Some(&n.replace("06:00", "zz:00"))), "bad guest_mac");
    }
    let v = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, vsock.display());
    assert_eq!(http(&s, "PUT", "/vsock", Some(&v)).0, 204);
    fault(http(&s, "PUT", "/boot-source", Some("")), "Empty PUT request.");
    fault(http(&s, "PUT", "/boot-source", Some("[1, 2]")), "expected a JSON object");
    fault(http(&s, "GET", "/no-such-path", None), "Invalid request method and/or path: GET /no-such-path.");
    fault(http(&s, "PUT", "/mmds", Some("{}")), "not supported by ember");
    fault(http(&s, "PATCH", "/drives/data", Some(r#"{"drive_id": "data"}"#)), "before starting");
    let cfg = json_of(&http(&s, "GET", "/vm/config", None).1);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 128);
    assert_eq!(cfg["drives"][0]["drive_id"], "data");
    // Boot.
    assert_eq!(http(&s, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().any(|l| l.contains("INFO") && l.contains("microVM started")), "{logged}");
    assert_eq!(json_of(&http(&s, "GET", "/", None).1)["state"], "Running");
    fault(http(&s, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)), "after starting");
    fault(http(&s, "PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#)), "after starting");
    assert!(vsock.exists(), "the vsock device listens on its uds_path");
    // Its guest serves over vsock (ember's agent, with a vsock device): up once it says ready.
    let console = read_stdout(&mut child.0);
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    while !console.lock().unwrap().contains("EMBER_GUEST_READY") {
        assert!(Instant::now() < deadline, "the guest never became ready: {}", console.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    echo(&vsock, "through vsock");
    if taps.is_some() {
        let got = fetch(&vsock);
        assert!(got.ends_with("behind tap0"), "the guest's interface is on tap0: {got}");
    }
    fault(http(&s, "PUT", "/logger", Some(r#"{"level": "Debug"}"#)), "after starting");
    // The drive's backing file swapped while the guest runs: the guest sees the new size and
    // bytes (read around its page cache).
    assert_eq!(agent(&vsock, "drive", "vda"), format!("sectors=2048 head={}", "00".repeat(16)));
    let data2 = dir.path().join("data2.img");
    let mut bytes = b"swapped drive...".to_vec();
    bytes.resize(2 << 20, 0);
    std::fs::write(&data2, &bytes).unwrap();
    fault(http(&s, "PATCH", "/drives/data", Some(r#"{"drive_id": "data"}"#)), "nothing to change");
    fault(http(&s, "PATCH", "/drives/none", Some(r#"{"drive_id": "none", "path_on_host": "/x"}"#)), "no drive");
    let missing = format!(r#"{{"drive_id": "data", "path_on_host": "{}"}}"#, dir.path().join("gone").display());
    fault(http(&s, "PATCH", "/drives/data", Some(&missing)), "Unable to patch the block device");
    let patch = format!(r#"{{"drive_id": "data", "path_on_host": "{}"}}"#, data2.display());
    assert_eq!(http(&s, "PATCH", "/drives/data", Some(&patch)).0, 204, "PATCH /drives/data");
    let want =
        format!("sectors=4096 head={}", b"swapped drive...".iter().map(|b| format!("{b:02x}")).collect::<String>());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = agent(&vsock, "drive", "vda");
        if seen == want {
            break;
        }
        assert!(Instant::now() < deadline, "the guest never saw the new drive: {seen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(json_of(&http(&s, "GET", "/vm/config", None).1)["drives"][0]["path_on_host"], data2.to_str().unwrap());
    // A metrics line now: the requests so far, the vCPUs' exits and the drive's reads.
    assert_eq!(http(&s, "PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#)).0, 204);
    // (Counters count per line: a line written every 60 s may have taken some of them.)
    let lines: Vec<_> = std::fs::read_to_string(&metrics).unwrap().lines().map(json_of).collect();
    let total = |group: &str, key: &str| lines.iter().map(|l| l[group][key].as_u64().unwrap_or(0)).sum::<u64>();
    let line = lines.last().unwrap();
    assert_eq!(line["id"], "fc-test");
    assert!(total("put_api_requests", "drive_count") >= 2, "{line}");
    assert!(total("put_api_requests", "drive_fails") >= 1, "{line}");
    assert_eq!(total("patch_api_requests", "drive_count"), 5, "{line}");
    assert_eq!(total("patch_api_requests", "drive_fails"), 4, "{line}");
    assert!(total("vcpu", "exit_mmio_write") > 0, "{line}");
    assert!(total("block_data", "read_count") >= 2, "{line}");
    assert_eq!(total("block_data", "update_count"), 1, "{line}");
    assert_eq!(line["block"]["read_bytes"], line["block_data"]["read_bytes"], "{line}");
    if taps.is_some() {
        assert!(total("net_eth0", "tx_packets_count") > 0, "{line}");
        assert!(total("net_eth0", "rx_bytes_count") > 0, "{line}");
    }
    let (state, mem) = (dir.path().join("snap.state"), dir.path().join("snap.mem"));
    let create = format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#, state.display(), mem.display());
    fault(http(&s, "PUT", "/snapshot/create", Some(&create)), "pause it first");
    assert_eq!(http(&s, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    assert_eq!(json_of(&http(&s, "GET", "/", None).1)["state"], "Paused");
    let diff = create.replace('}', r#", "snapshot_type": "Diff"}"#);
    fault(http(&s, "PUT", "/snapshot/create", Some(&diff)), "Diff snapshot");
    assert_eq!(http(&s, "PUT", "/snapshot/create", Some(&create)).0, 204);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 << 20, "the guest's memory");
    assert_eq!(http(&s, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    assert_eq!(json_of(&http(&s, "GET", "/", None).1)["state"], "Running");
    echo(&vsock, "after the snapshot");
    stop(child);
    // The snapshot, loaded into a new process as Firecracker's clients do (the old process's
    // vsock socket file removed first, as Firecracker needs too).
    std::fs::remove_file(&vsock).unwrap();
    // In the second namespace, whose TAP is tap1: the interface moves there (network_overrides).
    let ns2 = taps.as_ref().map(|t| &t.second);
    let (s2, child2) = firecracker(dir.path(), "fc2", ns2);
    fault(
        http(
            &s2,
            "PUT",
            "/snapshot/load",
            Some(&format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#, drive.display(), mem.display())),
        ),
        "not a snapshot ember can load",
    );
    // A load that failed past its checks ends the process, as in Firecracker (status 1).
    assert_eq!(exited(child2).code(), Some(1));
    let (s2, child2) = firecracker(dir.path(), "fc2b", ns2);
    let mut load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    if taps.is_some() {
        load["network_overrides"] = serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tap1"}]);
    }
    let load = load.to_string();
    fault(http(&s2, "PUT", "/snapshot/load", Some(&load.replace("File", "Uffd"))), "Uffd");
    // (A logger may be set before a load, as in Firecracker.)
    let log2 = dir.path().join("fc2b.log");
    let logger = format!(r#"{{"log_path": "{}", "level": "Info"}}"#, log2.display());
    assert_eq!(http(&s2, "PUT", "/logger", Some(&logger)).0, 204);
    assert_eq!(http(&s2, "PUT", "/snapshot/load", Some(&load)).0, 204);
    assert_eq!(json_of(&http(&s2, "GET", "/", None).1)["state"], "Running");
    assert_eq!(json_of(&http(&s2, "GET", "/machine-config", None).1)["mem_size_mib"], 128);
    let logged = std::fs::read_to_string(&log2).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("snapshot loaded") && l.contains("into_shell=true")),
        "restored into the shell made ahead for Firecracker's default machine: {logged}"
    );
    fault(http(&s2, "PUT", "/snapshot/load", Some(&load)), "after starting");
    // The first connection after the load is served, not lost to the transport reset the restored
    // guest handles first (the device holds it until the guest has): no retry here.
    assert_eq!(agent(&vsock, "echo", "in the restored guest"), "in the restored guest");
    if taps.is_some() {
        let got = fetch(&vsock);
        assert!(got.ends_with("behind tap1"), "the restored guest's interface is on tap1: {got}");
    }
    // The SDK's Shutdown: Ctrl+Alt+Del; the guest reboots, which ends the microVM and its process
    // (status 0).
    assert_eq!(http(&s2, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    let status = exited(child2);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!s2.exists(), "the API socket is removed at exit");
    // Loaded paused, on another vsock path, with the deprecated mem_file_path; and no load into
    // a microVM that was configured first.
    let (s3, child3) = firecracker(dir.path(), "fc3", ns2);
    assert_eq!(http(&s3, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 256}"#)).0, 204);
    fault(http(&s3, "PUT", "/snapshot/load", Some(&load)), "not allowed after configuring");
    stop(child3);
    let (s4, child4) = firecracker(dir.path(), "fc4", ns2);
    let vsock2 = dir.path().join("v2.sock");
    let load2 = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "vsock_override": {{"uds_path": "{}"}}}}"#,
        state.display(),
        mem.display(),
        vsock2.display()
    );
    assert_eq!(http(&s4, "PUT", "/snapshot/load", Some(&load2)).0, 204);
    assert_eq!(json_of(&http(&s4, "GET", "/", None).1)["state"], "Paused");
    assert_eq!(http(&s4, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    echo(&vsock2, "restored paused, then resumed");
    stop(child4);
}

/// `ember firecracker --api-sock DIR/ID.sock --id ID` (in network namespace `ns`), its socket up.
fn firecracker(dir: &Path, id: &str, ns: Option<&Netns>) -> (std::path::PathBuf, Killed) {
    let s = dir.join(format!("{id}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(["firecracker", "--api-sock", s.to_str().unwrap(), "--id", id])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(ns) = ns {
        ns.enter(&mut cmd);
    }
    let child = Killed(cmd.spawn().unwrap());
    wait_socket(&s);
    (s, child)
}

/// An `echo` through the guest's agent over vsock, tried until it answers: the agent listens from
/// about the time it says ready, and a restored guest resets the connections of its snapshot when
/// it runs again (a connection made before the guest has handled that is reset too).
fn echo(vsock: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = ember::channel::vsock::AgentConnection::connect(vsock, Duration::from_secs(120))
            .and_then(|mut c| c.call("echo", text.as_bytes()));
        match answer {
            Ok(r) => {
                assert_eq!((r.status, r.payload.as_slice()), (ember_abi::Status::Ok, text.as_bytes()));
                return;
            }
            Err(e) => assert!(Instant::now() < deadline, "the guest's agent never answered on vsock: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A call of the guest agent's built-in `function` over vsock: its answer, as text.
fn agent(vsock: &Path, function: &str, payload: &str) -> String {
    let mut c = ember::channel::vsock::AgentConnection::connect(vsock, Duration::from_secs(120)).unwrap();
    let r = c.call(function, payload.as_bytes()).unwrap();
    let text = String::from_utf8_lossy(&r.payload).into_owned();
    assert_eq!(r.status, ember_abi::Status::Ok, "{function} {payload}: {text}");
    text
}

/// Waits (up to two minutes) for the child to end on its own: its status.
fn exited(mut child: Killed) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Firecracker has no handler for SIGTERM: the process ends by it, and so does ember's.
fn stop(mut child: Killed) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
}

/// A child process killed when the test ends, whatever way it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's stdout, read as it comes.
fn read_stdout(child: &mut std::process::Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::Read;
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            t.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

#[test]
fn a_config_file_starts_the_guest_without_an_api() {
    if !common::kvm_usable("firecracker config file") {
        return;
    }
    let Some((kernel, initrd)) = common::images("firecracker config file") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    let text = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    });
    std::fs::write(&cfg, text.to_string()).unwrap();
    let mut child = ember()
        .args(["firecracker", "--no-api", "--config-file", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child_output(&mut child, common::BOOT_TIMEOUT);
    assert!(out.0.success(), "exit: {:?}", out.0);
    assert!(out.1.contains("EMBER_GUEST_READY"), "{}", out.1);
    // A section ember cannot honour is refused with Firecracker's bad-configuration status.
    std::fs::write(
        &cfg,
        serde_json::json!({"boot-source": {"kernel_image_path": kernel}, "balloon": {"amount_mib": 1}}).to_string(),
    )
    .unwrap();
    let out = ember().args(["firecracker", "--no-api", "--config-file", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(152));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"balloon\""), "{out:?}");
    // With an API socket too: refused the same way, and the socket does not outlive the process.
    let sock = dir.path().join("fc.sock");
    let out = ember()
        .args(["firecracker", "--api-sock", sock.to_str().unwrap(), "--config-file", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(152));
    assert!(!sock.exists(), "the API socket is removed");
}

/// Waits for `child` to end (killing it after `timeout`): its status and stdout.
fn child_output(child: &mut std::process::Child, timeout: Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap())
}
