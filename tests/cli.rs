//! Bad input to `ember run`: a one-line error naming the problem and a non-zero exit, never a panic
//! or a hang. These need no KVM: inputs are checked before KVM is touched.

mod common;

use common::{ember, text};

/// Asserts a failed run: exit status `code`, one `ember: error:` line containing `needle`, no panic.
fn assert_fails(args: &[&str], code: i32, needle: &str) {
    let out = ember(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "ember {args:?}: {err}");
    assert!(err.contains(needle), "ember {args:?}: expected {needle:?} in {err:?}");
    assert!(!err.contains("panicked"), "ember {args:?} panicked: {err}");
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn missing_kernel() {
    assert_fails(&["run", "--kernel", "/nonexistent/vmlinux"], 1, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let d = tmp();
    let k = d.path().join("kernel");
    std::fs::write(&k, b"this is not a kernel at all, just some text").unwrap();
    assert_fails(&["run", "--kernel", k.to_str().unwrap()], 1, "is neither an ELF vmlinux nor a bzImage");
    std::fs::write(&k, b"").unwrap();
    assert_fails(&["run", "--kernel", k.to_str().unwrap()], 1, "is neither an ELF vmlinux nor a bzImage");
}

#[test]
fn truncated_elf_kernel() {
    let d = tmp();
    let k = d.path().join("vmlinux");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(80, 0);
    std::fs::write(&k, &elf).unwrap();
    assert_fails(&["run", "--kernel", k.to_str().unwrap()], 1, "cannot load kernel");
}

#[test]
fn kernel_is_a_directory() {
    assert_fails(&["run", "--kernel", "/"], 1, "cannot read kernel /");
}

#[test]
fn zero_and_too_many_vcpus() {
    assert_fails(&["run", "--kernel", "/k", "--vcpus", "0"], 1, "must be between 1 and 32, got 0");
    assert_fails(&["run", "--kernel", "/k", "--vcpus", "33"], 1, "must be between 1 and 32, got 33");
}

#[test]
fn too_little_memory() {
    assert_fails(&["run", "--kernel", "/k", "--mem-mib", "1"], 1, "guest memory (mem_size_mib, --mem-mib)");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(3000);
    assert_fails(&["run", "--kernel", "/k", "--cmdline", &long], 1, "kernel command line is 3000 bytes");
}

#[test]
fn config_file_errors() {
    assert_fails(&["run", "--config", "/nonexistent.json"], 1, "cannot read config file /nonexistent.json");
    let d = tmp();
    let c = d.path().join("vm.json");
    std::fs::write(&c, r#"{"boot-source": {"kernel_image_path": "/k"}, "network-interface": []}"#).unwrap();
    assert_fails(&["run", "--config", c.to_str().unwrap()], 1, "unknown field `network-interface`");
    for (ifaces, why) in [
        (r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}]"#, "bad guest_mac"),
        (r#"[{"iface_id": "eth0", "host_dev_name": "tap/0"}]"#, "bad host_dev_name"),
        (r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "guest_ip": "10.0.0.2"}]"#, "bad guest_ip"),
        (r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "gateway": "10.0.0.1"}]"#, "a gateway needs a guest_ip"),
        (r#"[{"iface_id": "a", "host_dev_name": "t0"}, {"iface_id": "b", "host_dev_name": "t1"}]"#, "at most 1"),
        (r#"[{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 9000}]"#, "unknown field `mtu`"),
    ] {
        let text = format!(r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "network-interfaces": {ifaces}}}"#);
        std::fs::write(&c, text).unwrap();
        assert_fails(&["run", "--config", c.to_str().unwrap()], 1, why);
    }
    assert_fails(&["run", "--kernel", "/k", "--net", "tap0,speed=10"], 1, "unknown option \"speed=10\"");
    assert_fails(&["run", "--kernel", "/k", "--net", "tap0,ip=10.0.0.2/40"], 1, "bad guest_ip");
    std::fs::write(&c, r#"{"boot-source": {"kernel_image_path": "/k", "initrd": "/i"}}"#).unwrap();
    assert_fails(&["run", "--config", c.to_str().unwrap()], 1, "unknown field `initrd`");
    std::fs::write(&c, "{").unwrap();
    assert_fails(&["run", "--config", c.to_str().unwrap()], 1, "invalid config file");
}

#[test]
fn usage_errors() {
    assert_fails(&["run"], 2, "--kernel");
    assert_fails(&["run", "--kernel", "/k", "--config", "/c"], 2, "cannot be used with");
    assert_fails(&["run", "--kernel", "/k", "--vcpus", "many"], 2, "invalid value 'many'");
    assert_fails(&["restore"], 2, "--snapshot");
    assert_fails(&["restore", "--snapshot", "/s", "--clones", "0"], 2, "invalid value '0'");
    assert_fails(&["restore", "--snapshot", "/s", "--clones", "5000"], 2, "invalid value '5000'");
    assert_fails(&["restore", "--snapshot", "/s", "--clones", "4", "--processes", "0"], 2, "invalid value '0'");
    assert_fails(&["restore", "--snapshot", "/s", "--clones", "4", "--processes", "65"], 2, "invalid value '65'");
    // A bad snapshot is refused once, before any process is started.
    assert_fails(
        &["restore", "--snapshot", "/nonexistent-snapshot", "--clones", "4", "--processes", "2"],
        1,
        "/nonexistent-snapshot/state",
    );
    assert_fails(&["bench", "restore", "--kernel", "/k", "--processes", "0"], 2, "invalid value '0'");
    assert_fails(&["restore", "--snapshot", "/nonexistent-snapshot"], 1, "/nonexistent-snapshot/state");
    assert_fails(&["bench", "restore", "--kernel", "/k", "--runs", "x"], 2, "invalid value 'x'");
}

#[test]
fn bad_console_and_timeout() {
    assert_fails(&["run", "--kernel", "/k", "--console", "/nonexistent/dir/log"], 1, "cannot open console file");
    assert_fails(&["run", "--kernel", "/k", "--timeout=-1"], 1, "invalid timeout");
}

#[test]
fn missing_initrd_and_no_room() {
    let Some((kernel, _)) = common::images("missing_initrd_and_no_room") else { return };
    let k = kernel.to_str().unwrap();
    assert_fails(
        &["run", "--kernel", k, "--initrd", "/nonexistent.cpio"],
        1,
        "cannot read initramfs /nonexistent.cpio",
    );
    // The kernel loads at 16 MiB: a 16 MiB guest cannot hold it.
    assert_fails(&["run", "--kernel", k, "--mem-mib", "16"], 1, "into 16 MiB of guest memory");
    // A 40 MiB initramfs does not fit a 48 MiB guest beside the kernel.
    let d = tmp();
    let big = d.path().join("big.cpio");
    std::fs::File::create(&big).unwrap().set_len(40 << 20).unwrap();
    assert_fails(
        &["run", "--kernel", k, "--initrd", big.to_str().unwrap(), "--mem-mib", "48"],
        1,
        "too small for the kernel",
    );
}

#[test]
fn help_explains_the_commands() {
    let out = ember(&["run", "--help"]);
    let help = text(&out.stdout);
    assert!(out.status.success());
    for flag in ["--kernel", "--initrd", "--cmdline", "--vcpus", "--mem-mib", "--console", "--config", "--timeout"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn invoke_and_channel_usage_errors() {
    assert_fails(&["invoke", "echo"], 2, "--mailbox");
    assert_fails(&["invoke", "--mailbox", "/a", "--vsock", "/b", "echo"], 2, "cannot be used with");
    let d = tmp();
    let not_a_mailbox = d.path().join("file");
    std::fs::write(&not_a_mailbox, b"some user data").unwrap();
    assert_fails(&["invoke", "--mailbox", not_a_mailbox.to_str().unwrap(), "echo"], 1, "is not an ember mailbox");
    assert_eq!(std::fs::read(&not_a_mailbox).unwrap(), b"some user data", "ember changed a file it was given");
    let missing = d.path().join("missing.sock");
    assert_fails(&["invoke", "--vsock", missing.to_str().unwrap(), "echo"], 1, "vsock socket");
    // Several clones need a path per clone; checked before the snapshot is read.
    assert_fails(&["restore", "--snapshot", "/nonexistent", "--clones", "2", "--mailbox", "/tmp/m"], 1, "{id}");
    assert_fails(&["restore", "--snapshot", "/nonexistent", "--clones", "2", "--vsock", "/tmp/v"], 1, "{id}");
    // An existing file is never taken over as a mailbox.
    if let Some((kernel, initrd)) = common::images("invoke_and_channel_usage_errors") {
        let args = ["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()];
        let mut a = args.to_vec();
        a.extend(["--mailbox", not_a_mailbox.to_str().unwrap()]);
        assert_fails(&a, 1, "already exists");
        assert_eq!(std::fs::read(&not_a_mailbox).unwrap(), b"some user data", "ember changed a file it was given");
    }
}

#[test]
fn serve_bench_and_simulate_usage_errors() {
    assert_fails(&["bench", "handoff", "--snapshot", "/nonexistent"], 1, "/nonexistent/state");
    assert_fails(&["bench", "handoff", "--snapshot", "/tmp", "--requests", "0"], 2, "--requests");
    assert_fails(&["bench", "handoff", "--snapshot", "/tmp", "--api-threads", "0"], 2, "--api-threads");
    assert_fails(&["serve", "--socket", "/nonexistent/api.sock", "--api-threads", "0"], 2, "--api-threads");
    assert_fails(&["serve", "--socket", "/nonexistent/api.sock", "--api-threads", "65"], 2, "1..=64");
}

#[test]
fn serve_takes_its_settings_from_a_file_the_flags_win_and_unknown_keys_are_errors() {
    let d = tmp();
    let conf = d.path().join("ember.toml");
    let state = d.path().join("state");
    let file = format!(
        "socket = \"/run/ember-a.sock\"\nstate_dir = {:?}\nimages = [\"/srv/images\"]\napi_threads = 2\n\
         isolation = \"none\"\negress_nat = \"routed\"\nlog_format = \"json\"\n",
        state.display().to_string()
    );
    std::fs::write(&conf, file).unwrap();
    let c = conf.to_str().unwrap();
    let out = ember(&["serve", "--config", c, "--socket", "/tmp/ember-b.sock", "--print-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    for line in [
        "socket = \"/tmp/ember-b.sock\"",
        "api_threads = 2",
        "isolation = \"none\"",
        "egress_nat = \"routed\"",
        "log_format = \"json\"",
        "images = [\"/srv/images\"]",
        "worker_uid_base = 7143424",
    ] {
        assert!(printed.lines().any(|l| l == line), "{line:?} not in\n{printed}");
    }
    // Nothing was started: no state directory was made.
    assert!(!state.exists());
    std::fs::write(&conf, "socket = \"/run/ember.sock\"\napi_thread = 2\n").unwrap();
    let out = ember(&["serve", "--config", c]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("api_thread") && err.trim().lines().count() == 1, "{err}");
    assert_fails(&["serve", "--config", "/nonexistent/ember.toml"], 1, "/nonexistent/ember.toml");
    assert_fails(&["serve"], 1, "--socket");
    assert_fails(&["serve", "--socket", "/nonexistent/api.sock", "--log-format", "xml"], 2, "--log-format");
    assert_fails(&["serve", "--socket", "/nonexistent/api.sock", "--worker-uid-base", "lots"], 2, "--worker-uid-base");
    // Output paths are checked before minutes of measuring; a template that is not there is named.
    assert_fails(
        &["bench", "restore", "--kernel", "/k", "--json", "/nonexistent/r.json"],
        1,
        "no directory /nonexistent",
    );
    assert_fails(
        &["bench", "restore", "--kernel", "/k", "--plot", "/nonexistent/r.svg"],
        1,
        "no directory /nonexistent",
    );
    assert_fails(
        &["bench", "restore", "--kernel", "/k", "--template", "/a", "--snapshot-dir", "/b"],
        2,
        "cannot be used",
    );
    let trace = common::repo().join("benches/traces/bursty.csv");
    let trace = trace.to_str().unwrap();
    assert_fails(&["simulate", "--trace", trace, "--policy", r#"{"max_uses": 0}"#], 1, "max_uses");
    assert_fails(&["simulate", "--trace", trace, "--policy", r#"{"burst_window_s": -1}"#], 1, "burst_window_s");
    assert_fails(&["simulate", "--trace", trace, "--policy", r#"{"recycle": true}"#], 1, "unknown field");
    assert_fails(&["simulate", "--trace", trace, "--policy", r#"{"cold_start_cost_s": 0}"#], 1, "cold_start_cost_s");
    assert_fails(&["simulate", "--trace", trace, "--policy", r#"{"max": 0}"#], 1, "pool.max");
    assert_fails(&["simulate", "--trace", trace, "--host-mib", "0"], 1, "--host-mib");
    assert_fails(&["simulate", "--trace", trace, "--restore-cpu-ms=-1"], 1, "--restore-cpu-ms");
    assert_fails(&["simulate", "--trace", trace, "--core-mib", "NaN"], 1, "--core-mib");
    assert_fails(&["simulate", "--trace", trace, "--json", "/nonexistent/dir/r.json"], 1, "/nonexistent/dir/r.json");
    assert_fails(&["simulate", "--generate", "fleet", "--functions", "0"], 1, "--functions");
    assert_fails(&["simulate", "--generate", "fleet", "--rate-spread", "NaN"], 1, "--rate-spread");
    assert_fails(&["simulate", "--generate", "steady", "--max-rate", "5"], 1, "for --generate fleet");
    assert_fails(&["simulate", "--azure-invocations", "/nonexistent.csv"], 1, "/nonexistent.csv");
    assert_fails(&["simulate", "--azure-invocations", trace, "--minutes", "5"], 1, "--minutes");
    assert_fails(&["simulate", "--azure-invocations", trace], 1, "header lacks");
    // A file that is not a socket is never taken for a stale socket and removed.
    let dir = tmp();
    let precious = dir.path().join("api.sock");
    std::fs::write(&precious, b"user data").unwrap();
    let (sock, state) = (precious.to_str().unwrap(), dir.path().join("state"));
    assert_fails(&["serve", "--socket", sock, "--state-dir", state.to_str().unwrap()], 1, "not a socket");
    assert_eq!(std::fs::read(&precious).unwrap(), b"user data");
}
