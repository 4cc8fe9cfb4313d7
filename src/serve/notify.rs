//! systemd's service notification protocol (sd_notify(3)) for `Type=notify` units: `READY=1` once
//! the API socket accepts (restored functions' pools are loading then), `WATCHDOG=1` from the
//! API's runtime at half the unit's watchdog interval when it has one (a runtime that stops
//! answering stops the pings), `STOPPING=1` when the daemon is told to stop. Without
//! `NOTIFY_SOCKET` in the environment, nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

struct Notifier {
    sock: UnixDatagram,
    to: SocketAddr,
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

/// Where notifications go: a socket path, or `@name` for an abstract socket.
fn address(spec: &str) -> std::io::Result<SocketAddr> {
    match spec.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(spec),
    }
}

/// Reads `NOTIFY_SOCKET` and makes the socket notifications go through (before the daemon
/// confines itself); a bad value is reported and ignored.
pub fn init() {
    NOTIFIER.get_or_init(|| {
        let spec = std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty())?;
        match address(&spec).and_then(|to| Ok(Notifier { sock: UnixDatagram::unbound()?, to })) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={spec}: {e}; no service notifications");
                None
            }
        }
    });
}

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one.
pub fn notify(state: &str) {
    if let Some(Some(n)) = NOTIFIER.get() {
        if let Err(e) = n.sock.send_to_addr(state.as_bytes(), &n.to) {
            crate::log_limited!(warn, "service notification {state:?}: {e}");
        }
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` absent or ours) and notifications go somewhere.
pub fn watchdog_every() -> Option<Duration> {
    NOTIFIER.get()?.as_ref()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let a = address("/run/systemd/notify").unwrap();
        assert_eq!(a.as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
        let b = address("@ember-test").unwrap();
        assert_eq!(b.as_abstract_name(), Some(&b"ember-test"[..]));
    }
}
