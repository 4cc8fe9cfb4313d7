//! Network namespaces for the tests that need root: named ones (`ip netns`), deleted when dropped,
//! with the ways into them a test needs (a thread, a child process).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn ip(args: &[&str]) {
    let s = Command::new("ip").args(args).status().expect("run ip (iproute2)");
    assert!(s.success(), "ip {}", args.join(" "));
}

pub fn ip_out(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether this process runs as root (namespaces and TAPs need it); when not, a test that needs
/// them fails under `EMBER_REQUIRE_KVM=1` and reports itself skipped otherwise.
pub fn root(test: &str) -> bool {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!super::kvm_required(), "{test} needs root");
    eprintln!("{test}: skipped (needs root)");
    false
}

/// A named network namespace, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("embt{}{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns with a namespace descriptor we hold; only this thread moves.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }

    /// Makes `cmd`'s process start inside the namespace.
    pub fn enter(&self, cmd: &mut Command) {
        let nsfile = std::fs::File::open(self.path()).unwrap();
        // SAFETY: between fork and exec the child only calls setns (async-signal-safe) on a
        // descriptor that the closure owns, which lives as long as `cmd`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
