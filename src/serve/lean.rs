//! The lean protocol: acquire and release on a kept-open connection to the API socket, one line
//! each way, for schedulers that count microseconds (the HTTP API stays the reference; this
//! carries the same two calls with the same answers, without HTTP or a runtime hop).
//!
//! A connection whose first bytes are [`HELLO`] (`EMBER/1` and a newline) speaks it; any other
//! connection is HTTP. Then, one request per line, answered in order with one JSON line:
//!
//! ```text
//! acquire NAME                 -> the handoff, as POST /functions/NAME/acquire answers it
//! release ID LEASE [destroy]   -> {"id": ID, "recycled": BOOL}, as POST /vms/ID/release
//! (anything refused)           -> {"error": "...", "status": CODE}  (CODE: the HTTP API's status)
//! ```
//!
//! Each such connection has a thread of its own (blocking reads and writes, under the daemon's
//! seccomp filter), at most [`MAX_CONNECTIONS`] at once; a line longer than [`MAX_LINE`] bytes ends
//! its connection after the error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::command;
use super::model::Error;
use super::supervisor::Supervisor;

/// What a lean connection opens with.
pub const HELLO: &[u8] = b"EMBER/1\n";
/// The longest request line (a function name and a lease fit many times over).
pub const MAX_LINE: usize = 512;
/// Lean connections served at once; more are refused with an error line.
pub const MAX_CONNECTIONS: usize = 64;

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// What a new connection's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    Lean,
    Http,
}

/// Looks at (without taking) the first bytes of `stream`: [`Opening::Lean`] once they are
/// [`HELLO`], HTTP as soon as they cannot be (or the peer sent nothing and closed).
pub async fn opening(stream: &tokio::net::UnixStream) -> Opening {
    let mut buf = [0u8; HELLO.len()];
    let mut partial_waits = 0u32;
    loop {
        if stream.readable().await.is_err() {
            return Opening::Http;
        }
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: peeks at most buf.len() bytes into `buf`, a live buffer of that size.
            let n = unsafe {
                libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match peeked {
            Ok(0) => return Opening::Http,
            Ok(n) if buf[..n] != HELLO[..n] => return Opening::Http,
            Ok(n) if n == HELLO.len() => return Opening::Lean,
            // The start of the hello so far: wait for the rest (briefly; then it is not one).
            Ok(_) => {
                partial_waits += 1;
                if partial_waits > 1000 {
                    return Opening::Http;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Opening::Http,
        }
    }
}

/// Serves a lean connection on a thread of its own.
/// `slot`: whatever the caller counts the connection by, held until the connection ends.
pub fn serve<S: Send + 'static>(stream: tokio::net::UnixStream, sup: Arc<Supervisor>, slot: S) {
    let stream = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            crate::log_limited!(warn, "lean connection: {e}");
            return;
        }
    };
    if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        OPEN.fetch_sub(1, Ordering::SeqCst);
        let msg = format!("{MAX_CONNECTIONS} lean connections are open; try again");
        let _ = (&stream).write_all(&error_line(&Error::busy(msg)));
        return;
    }
    let spawned = std::thread::Builder::new().name("ember-lean".into()).spawn(move || {
        if let Err(e) = converse(stream, &sup) {
            tracing::debug!("lean connection ended: {e}");
        }
        drop(slot);
        OPEN.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        OPEN.fetch_sub(1, Ordering::SeqCst);
        crate::log_limited!(warn, "cannot start a lean connection's thread: {e}");
    }
}

/// Answers a connection's requests until it closes.
fn converse(stream: std::os::unix::net::UnixStream, sup: &Arc<Supervisor>) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut lines = BufReader::with_capacity(4096, stream);
    let mut hello = [0u8; HELLO.len()];
    lines.read_exact(&mut hello)?;
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        line.clear();
        if lines.buffer().is_empty() {
            wait_briefly(lines.get_ref());
        }
        let n = (&mut lines).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let too_long = Error::bad_request(format!("a request line is at most {MAX_LINE} bytes"));
            out.write_all(&error_line(&too_long))?;
            return Ok(());
        }
        line.pop();
        out.write_all(&answer(sup, &line))?;
    }
}

/// Looks for the next request for up to [`SPIN`] before the thread sleeps in its read: a
/// scheduler's requests often come back to back, and waking a sleeping thread costs more than
/// the request (tens of microseconds on some hosts). One connection's thread looks at a time (more
/// would take the cores that the clients and the guests need).
fn wait_briefly(stream: &std::os::unix::net::UnixStream) {
    static LOOKING: AtomicUsize = AtomicUsize::new(0);
    if LOOKING.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return;
    }
    let start = std::time::Instant::now();
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while start.elapsed() < SPIN {
        // SAFETY: polls one live pollfd, without waiting.
        if unsafe { libc::poll(&mut fd, 1, 0) } != 0 {
            break;
        }
        std::hint::spin_loop();
    }
    LOOKING.store(0, Ordering::Release);
}

/// How long a lean connection's thread looks for the next request before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The answer line to one request line (without its newline).
pub fn answer(sup: &Arc<Supervisor>, line: &[u8]) -> Vec<u8> {
    let reply = std::str::from_utf8(line)
        .map_err(|_| Error::bad_request("a request line must be UTF-8"))
        .and_then(|text| request(sup, text));
    match reply {
        Ok(mut v) => {
            v.push(b'\n');
            v
        }
        Err(r) => error_line(&r),
    }
}

fn request(sup: &Arc<Supervisor>, text: &str) -> Result<Vec<u8>, Error> {
    let internal = |e: serde_json::Error| Error::internal(e.to_string());
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        // (What blocks, a cold start, blocks this connection's thread only.)
        ["acquire", name] => {
            let handoff = command::call(sup, command::Acquire { name: (*name).into() })?.wait()?;
            serde_json::to_vec(&handoff).map_err(internal)
        }
        ["release", id, lease, rest @ ..] => {
            let destroy = match rest {
                [] => false,
                ["destroy"] => true,
                _ => return Err(Error::bad_request("release takes ID LEASE and, optionally, destroy")),
            };
            let id: u64 = id.parse().map_err(|_| Error::bad_request(format!("bad VM id {id:?}")))?;
            let release = command::Release { id, lease: lease.to_string(), destroy };
            serde_json::to_vec(&command::call(sup, release)?.wait()?).map_err(internal)
        }
        [verb, ..] => Err(Error::bad_request(format!(
            "unknown request {:?}: acquire NAME, or release ID LEASE [destroy]",
            verb.chars().take(32).collect::<String>()
        ))),
        [] => Err(Error::bad_request("an empty request")),
    }
}

fn error_line(r: &Error) -> Vec<u8> {
    let mut v = serde_json::json!({"error": r.to_string(), "status": super::api::status(r.kind()).as_u16()});
    if let Some(s) = r.retry_after_s() {
        v["retry_after_s"] = s.into();
    }
    let mut v = v.to_string().into_bytes();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_one_line_with_the_http_status_and_when_to_come_back() {
        let line = error_line(&Error::busy("at max"));
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            (v["error"].as_str(), v["status"].as_u64(), v.get("retry_after_s")),
            (Some("at max"), Some(429), None)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&error_line(&Error::restarting("later", std::time::Duration::from_secs(2))))
                .unwrap();
        assert_eq!((v["status"].as_u64(), v["retry_after_s"].as_u64()), (Some(503), Some(2)));
    }

    #[test]
    fn no_http_request_opens_like_the_hello() {
        // HTTP/1.x methods and the HTTP/2 preface: none shares the hello's first byte, so an
        // HTTP connection is told apart from its first byte.
        for m in ["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "HEAD", "TRACE", "CONNECT", "PRI"] {
            assert_ne!(m.as_bytes()[0], HELLO[0], "{m}");
        }
        assert_eq!(HELLO.last(), Some(&b'\n'));
    }
}
