//! Networks for clones (`ember serve` as root), only to addresses inside network namespaces this
//! test creates: the daemon runs in a namespace of its own ("host"), joined to a "server"
//! namespace (the public side, 192.0.2.0/24) and a "proxy" namespace (198.51.100.0/24) that ends a
//! VXLAN tunnel into a private subnet (10.50.0.0/24). One guest boot: the daemon makes the
//! networked template of `web`; `pinned` (egress_ip) and `private` (a tunnel, no egress) are
//! installed from it while the daemon is down after a SIGKILL.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::{assert_error, http, image_dirs, invoke, json_of, wait_ready};
use common::netns::{ip, ip_out, Netns};
use ember::serve::model::FunctionSpec;
use ember::serve::registry::Registry;
use serde_json::{json, Value};

/// This daemon's interfaces in the namespace (names starting with `em` or `et`).
fn ember_links(ns: &Netns) -> Vec<String> {
    ip_out(&["-n", &ns.0, "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("em") || n.starts_with("et"))
        .collect()
}

/// The nftables tables in the namespace.
fn tables(ns: &Netns) -> String {
    ns.run(|| {
        let o = Command::new("nft").args(["list", "tables"]).output().expect("run nft");
        String::from_utf8_lossy(&o.stdout).into_owned()
    })
}

/// An HTTP server inside a namespace: answers `from <peer>` and keeps the peers it saw.
struct HttpServer {
    peers: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    fn start(ns: &Netns, addr: &'static str) -> Self {
        let listener = ns.run(move || TcpListener::bind(addr).unwrap());
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\nfrom {peer}\n");
                seen.lock().unwrap().push(peer);
            }
        });
        Self { peers }
    }

    fn peers(&self) -> Vec<String> {
        self.peers.lock().unwrap().clone()
    }
}

/// `ember serve` inside namespace `ns`.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    /// `egress_nat`: `routed` (clones leave with their transit addresses) or `masquerade`.
    fn start(dir: &Path, ns: &Netns, egress_nat: &str) -> Self {
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["serve", "--socket", socket.to_str().unwrap(), "--state-dir", dir.join("state").to_str().unwrap()])
            .args(["--egress-nat", egress_nat])
            .args(image_dirs().iter().flat_map(|d| ["--images".to_string(), d.display().to_string()]))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        ns.enter(&mut cmd);
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "ember serve did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
        }
    }
}

/// `http-get` in a clone of `name`: the response, or the failure (status, payload).
fn get(s: &Path, name: &str, target: &str) -> (bool, String) {
    let r = invoke(s, name, &json!({"function": "http-get", "payload": target, "timeout_s": 120}).to_string());
    (r["ok"] == true, r["payload"].as_str().unwrap_or_default().to_string())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn register(s: &Path, name: &str, spec: &Value) -> (u16, String) {
    http(s, "PUT", &format!("/functions/{name}"), Some(&spec.to_string()))
}

#[test]
fn clones_reach_what_their_function_allows_and_nothing_else() {
    if !common::kvm_usable("network") {
        return;
    }
    let Some((kernel, initrd)) = common::images("network") else { return };
    if !common::netns::root("network (clone networks)") {
        return;
    }
    let dir = common::scratch("network");
    let host = Netns::new("h");
    let server = Netns::new("s");
    let proxy = Netns::new("p");
    let link = |a: &Netns, an: &str, aaddr: &str, b: &Netns, bn: &str, baddr: &str| {
        ip(&["link", "add", an, "type", "veth", "peer", "name", bn]);
        ip(&["link", "set", an, "netns", &a.0]);
        ip(&["link", "set", bn, "netns", &b.0]);
        ip(&["-n", &a.0, "addr", "add", aaddr, "dev", an]);
        ip(&["-n", &b.0, "addr", "add", baddr, "dev", bn]);
        ip(&["-n", &a.0, "link", "set", an, "up"]);
        ip(&["-n", &b.0, "link", "set", bn, "up"]);
    };
    let tag = std::process::id() % 10000;
    link(&host, &format!("vs{tag}"), "192.0.2.1/24", &server, &format!("vh{tag}"), "192.0.2.2/24");
    link(&host, &format!("vp{tag}"), "198.51.100.1/24", &proxy, &format!("vq{tag}"), "198.51.100.2/24");
    // The host's second public address (the pinned function's), and the way back to clones.
    ip(&["-n", &host.0, "addr", "add", "192.0.2.10/32", "dev", "lo"]);
    ip(&["-n", &server.0, "route", "add", "10.199.0.0/16", "via", "192.0.2.1"]);
    // The private subnet behind the proxy's end of the tunnel.
    ip(&[
        "-n",
        &proxy.0,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "remote",
        "198.51.100.1",
        "dstport",
        "4789",
    ]);
    ip(&["-n", &proxy.0, "addr", "add", "10.50.0.5/24", "dev", "vx0"]);
    ip(&["-n", &proxy.0, "link", "set", "vx0", "up"]);
    // An internal service beyond the host that is not public (10.60.0.0/24, routed through the
    // server's side): egress does not reach it unless the policy allows it.
    // So is a stand-in for a cloud's instance metadata service (link-local, 169.254.169.254).
    ip(&["-n", &server.0, "addr", "add", "10.60.0.5/32", "dev", "lo"]);
    ip(&["-n", &host.0, "route", "add", "10.60.0.0/24", "via", "192.0.2.2"]);
    ip(&["-n", &server.0, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    ip(&["-n", &host.0, "route", "add", "169.254.169.254/32", "via", "192.0.2.2"]);
    let internal = HttpServer::start(&server, "10.60.0.5:8080");
    let metadata = HttpServer::start(&server, "169.254.169.254:80");
    let public = HttpServer::start(&server, "192.0.2.2:8080");
    let private = HttpServer::start(&proxy, "10.50.0.5:8080");
    // A service of the daemon's host, reachable from the server's side.
    let own = HttpServer::start(&host, "0.0.0.0:8081");

    let spec = |network: Value, min_ready: u32| json!({"kernel": kernel, "initramfs": initrd, "pool": {"min_ready": min_ready}, "network": network});
    let mut daemon = Daemon::start(&dir, &host, "routed");
    let s = daemon.socket.clone();
    let (code, body) = register(&s, "web", &spec(json!({"egress": true}), 2));
    assert_eq!(code, 202, "{body}");
    let info = wait_ready(&s, "web", 2);
    assert!(info["network"]["prepared"].as_u64().unwrap() >= 3, "{info}");

    // Two clones of one snapshot fetch at once: the server sees two distinct sources, each a
    // clone's own transit address.
    let s2 = s.clone();
    let other = std::thread::spawn(move || get(&s2, "web", "192.0.2.2:8080/"));
    let first = get(&s, "web", "192.0.2.2:8080/");
    let second = other.join().unwrap();
    assert!(first.0 && second.0, "{first:?} {second:?}");
    let peers = public.peers();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_ne!(peers[0], peers[1], "two clones left with one address");
    for p in &peers {
        assert!(p.starts_with("10.199."), "{p}");
        assert!(first.1.contains(p.as_str()) || second.1.contains(p.as_str()), "{first:?} {second:?}");
    }

    // A clone reaches neither its sibling nor the host's own services (the host's service
    // answers the server's side).
    let (code, body) = http(&s, "POST", "/functions/web/acquire", None);
    assert_eq!(code, 200, "{body}");
    let a = json_of(&body);
    let (code, body) = http(&s, "POST", "/functions/web/acquire", None);
    assert_eq!(code, 200, "{body}");
    let b = json_of(&body);
    let (a_addr, b_addr) = (a["address"].as_str().unwrap(), b["address"].as_str().unwrap());
    assert_ne!(a_addr, b_addr);
    let mailbox = ember::channel::mailbox::Mailbox::open(Path::new(a["mailbox"].as_str().unwrap())).unwrap();
    let opts = ember::channel::mailbox::CallOptions { timeout: Duration::from_secs(120), ..Default::default() };
    let call = |target: String| {
        let r = mailbox.call("http-get", target.as_bytes(), opts).unwrap();
        (r.status == ember_abi::Status::Ok, String::from_utf8_lossy(&r.payload).into_owned())
    };
    let (ok, out) = call("192.0.2.2:8080/".into());
    assert!(ok && out.contains(&format!("from {a_addr}")), "{out}");
    let gateway = Ipv4(a_addr).host_end();
    for target in [format!("{b_addr}:8080/ 3000"), "192.0.2.1:8081/ 3000".to_string(), format!("{gateway}:8081/ 3000")]
    {
        let (ok, out) = call(target.clone());
        assert!(!ok, "{target}: {out}");
        assert!(out.contains("timed out"), "{target}: {out} (refused means the packet got through)");
    }
    assert!(own.peers().is_empty(), "{:?}", own.peers());
    server.run(|| std::net::TcpStream::connect("192.0.2.1:8081").unwrap());
    wait_for("the host's service to see the server", Duration::from_secs(60), || own.peers().len() == 1);
    // A guest that forges its source (its sibling's transit address, an address of the private
    // subnet) gets nothing out: the datagram with its own address, sent after the forged ones on
    // the same path, is the first (and only) one the server gets, from the clone's own address.
    let udp = server.run(|| std::net::UdpSocket::bind("192.0.2.2:9999").unwrap());
    let send = |from: &str, text: &str| {
        let r = mailbox.call("udp-from", format!("{from} 192.0.2.2:9999 {text}").as_bytes(), opts).unwrap();
        assert_eq!(r.status, ember_abi::Status::Ok, "{}", String::from_utf8_lossy(&r.payload));
    };
    send(b_addr, "forged-sibling");
    send("10.50.0.7", "forged-private");
    send("172.16.0.2", "own");
    let mut buf = [0u8; 256];
    udp.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let (n, peer) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((String::from_utf8_lossy(&buf[..n]), peer.ip().to_string()), ("own".into(), a_addr.to_string()));
    udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(udp.recv_from(&mut buf).is_err(), "a forged datagram came after: {:?}", String::from_utf8_lossy(&buf));
    for h in [&a, &b] {
        let path = format!("/vms/{}/release", h["id"]);
        let (code, body) = http(&s, "POST", &path, Some(&json!({"lease": h["lease"], "destroy": true}).to_string()));
        assert_eq!(code, 200, "{body}");
    }

    // SIGKILL: the workers go with the daemon and every namespace with them; the host table is
    // what is left.
    daemon.signal(libc::SIGKILL);
    wait_for("the clones' namespaces to go", Duration::from_secs(120), || ember_links(&host).is_empty());
    assert!(tables(&host).contains("ember_"), "{}", tables(&host));

    // While it is down, the template is installed as two more functions.
    let template = dir.join("state/functions/web/template");
    let registry = Registry::open(&dir.join("state")).unwrap();
    let install = |name: &str, network: Value| {
        let spec: FunctionSpec = serde_json::from_value(spec(network, 1)).unwrap();
        registry.install(name, &spec, &template).unwrap();
    };
    install("pinned", json!({"egress_ip": "192.0.2.10", "egress_allow": ["10.60.0.0/24"]}));
    install("private", json!({"private": {"subnet": "10.50.0.0/24", "proxy": "198.51.100.2", "vni": 42}}));
    drop(registry);
    // Restarted with public egress masqueraded (the default): the host's address on the way out.
    let mut daemon = Daemon::start(&dir, &host, "masquerade");
    let s = daemon.socket.clone();
    for name in ["web", "pinned", "private"] {
        wait_ready(&s, name, 1);
    }
    let (ok, out) = get(&s, "web", "192.0.2.2:8080/");
    assert!(ok && out.contains("from 192.0.2.1\n"), "{out}");

    // egress_ip: the server sees the function's address.
    let (ok, out) = get(&s, "pinned", "192.0.2.2:8080/");
    assert!(ok && out.contains("from 192.0.2.10"), "{out}");
    // The private subnet answers through the tunnel, to the function's address there; it is not
    // the public side's, and nobody else's.
    let (ok, out) = get(&s, "private", "10.50.0.5:8080/");
    assert!(ok && out.contains("from 10.50.0.254"), "{out}");
    assert_eq!(private.peers(), ["10.50.0.254"]);
    let (ok, out) = get(&s, "private", "192.0.2.2:8080/ 3000");
    assert!(!ok && out.contains("timed out"), "{out}");
    let (ok, out) = get(&s, "web", "10.50.0.5:8080/ 3000");
    assert!(!ok && out.contains("timed out"), "{out}");
    assert_eq!(private.peers().len(), 1);
    // Egress is public egress: not the internal service nor the link-local metadata address
    // (dropped: "timed out", where a packet that got through would be answered or refused)...
    for target in ["10.60.0.5:8080/ 3000", "169.254.169.254:80/ 3000"] {
        let (ok, out) = get(&s, "web", target);
        assert!(!ok && out.contains("timed out"), "{target}: {out}");
    }
    assert!(internal.peers().is_empty() && metadata.peers().is_empty(), "{:?}", internal.peers());
    // ...unless the function's policy allows it.
    let (ok, out) = get(&s, "pinned", "10.60.0.5:8080/");
    assert!(ok && out.contains("from 192.0.2.10"), "{out}");
    assert_eq!(internal.peers(), ["192.0.2.10"]);

    // A guest flooding its card costs its own worker: another function answers meanwhile, and the
    // daemon's memory stays flat.
    let pid = daemon.child.id();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse::<u64>().ok()).unwrap()
    };
    let before = rss();
    let s2 = s.clone();
    let flood = std::thread::spawn(move || {
        invoke(&s2, "web", &json!({"function": "udp-flood", "payload": "192.0.2.2:9 8000"}).to_string())
    });
    std::thread::sleep(Duration::from_secs(1));
    let (ok, out) = get(&s, "pinned", "192.0.2.2:8080/");
    assert!(ok && out.contains("from 192.0.2.10"), "{out}");
    let flooded = flood.join().unwrap();
    assert_eq!(flooded["ok"], true, "{flooded}");
    let sent: u64 = flooded["payload"].as_str().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(sent > 100, "{flooded}");
    assert!(rss() < before + 8 * 1024, "daemon RSS {before} -> {} KiB during a flood", rss());

    // Bad policies are refused with the reason, and nothing is left half made.
    let links = ember_links(&host).iter().filter(|l| l.starts_with("et")).count();
    // The sets' names (their elements come and go with the pools' namespaces).
    let set_names = || {
        host.run(|| {
            let out = Command::new("nft").args(["-j", "list", "sets"]).output().unwrap().stdout;
            let v: Value = serde_json::from_slice(&out).unwrap();
            let mut names: Vec<String> = v["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|o| Some(format!("{} {}", o["set"]["table"].as_str()?, o["set"]["name"].as_str()?)))
                .collect();
            names.sort();
            names
        })
    };
    let sets = set_names();
    assert_eq!(sets.len(), 3, "{sets:?}");
    for (network, why) in [
        (json!({"egress_ip": "203.0.113.7"}), "not an address of this host"),
        (json!({"private": {"subnet": "10.50.0.128/25", "proxy": "198.51.100.3", "vni": 7}}), "overlaps"),
        (json!({"private": {"subnet": "10.60.0.0/24", "proxy": "198.51.100.3", "vni": 42}}), "vni 42"),
        (json!({"private": {"subnet": "10.199.5.0/24", "proxy": "198.51.100.3"}}), "transit"),
        (json!({"egres": true}), "unknown field"),
    ] {
        let (code, body) = register(&s, "bad", &spec(network.clone(), 1));
        assert_error((code, body), 400, why);
    }
    assert_eq!(ember_links(&host).iter().filter(|l| l.starts_with("et")).count(), links);
    assert_eq!(set_names(), sets, "a refused registration left a set behind");
    assert_eq!(http(&s, "GET", "/functions/bad", None).0, 404);

    // Clone cycles leave no namespace behind (each clone's veth end shows its namespace).
    let cycles: u32 = if std::env::var("EMBER_SOAK").is_ok_and(|v| v == "1") { 1000 } else { 60 };
    // The daemon's descriptors: its clones' network ends (a TAP and a namespace for each ready
    // clone and prepared namespace, however many the pools hold at the moment), and all others.
    let fds = || {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.display().to_string())
            .collect();
        let taps = links.iter().filter(|l| *l == "/dev/net/tun").count();
        let namespaces = links.iter().filter(|l| l.starts_with("net:[")).count();
        (taps, namespaces, links.len() - taps - namespaces)
    };
    let (_, _, others_before) = fds();
    for _ in 0..cycles {
        let (code, body) = http(&s, "POST", "/functions/web/acquire", None);
        assert_eq!(code, 200, "{body}");
        let h = json_of(&body);
        let path = format!("/vms/{}/release", h["id"]);
        let (code, body) = http(&s, "POST", &path, Some(&json!({"lease": h["lease"], "destroy": true}).to_string()));
        assert_eq!(code, 200, "{body}");
    }
    let info = wait_ready(&s, "web", 1);
    let spare = info["network"]["ready_namespaces"].as_u64().unwrap() as usize;
    let live = |f: &str| {
        let v = json_of(&http(&s, "GET", &format!("/functions/{f}"), None).1);
        (v["ready"].as_u64().unwrap() + v["busy"].as_u64().unwrap() + v["warming"].as_u64().unwrap()) as usize
    };
    wait_for("namespaces and their descriptors to settle after the cycles", Duration::from_secs(60), || {
        let clones: usize = ["web", "pinned", "private"].iter().map(|f| live(f)).sum();
        let (taps, namespaces, _) = fds();
        let bound = clones + spare + 3 * 4;
        ember_links(&host).iter().filter(|l| l.starts_with("em")).count() <= bound
            && taps <= bound
            && namespaces <= bound
    });
    let (_, _, others_after) = fds();
    assert!(others_after <= others_before + 16, "daemon fds {others_before} -> {others_after} after {cycles} cycles");

    // DELETE takes the function's tunnel and namespaces; SIGTERM the rest.
    assert_eq!(http(&s, "DELETE", "/functions/private", None).0, 204);
    wait_for("the tunnel to go", Duration::from_secs(120), || !ember_links(&host).iter().any(|l| l.starts_with("et")));
    daemon.signal(libc::SIGTERM);
    wait_for("every namespace to go", Duration::from_secs(120), || ember_links(&host).is_empty());
    assert!(!tables(&host).contains("ember_"), "{}", tables(&host));
}

/// An address in the transit range, and the host's end of its /30.
struct Ipv4<'a>(&'a str);

impl Ipv4<'_> {
    fn host_end(&self) -> std::net::Ipv4Addr {
        let a: std::net::Ipv4Addr = self.0.parse().unwrap();
        std::net::Ipv4Addr::from((u32::from(a) & !3) + 1)
    }
}
