//! A typed client of the daemon's API on its Unix socket: HTTP/1.1 on a kept-open connection
//! ([`Client`], the API's reference) and the lean protocol ([`LeanClient`]). The one client that
//! ember's tests and benchmarks use, and one a Rust scheduler can embed.
//!
//! ```no_run
//! use ember::serve::client::Client;
//!
//! # fn main() -> Result<(), ember::serve::client::ClientError> {
//! let mut c = Client::connect(std::path::Path::new("/run/ember/api.sock"))?;
//! let h = c.acquire("hello")?;
//! // ... the scheduler uses h.mailbox ...
//! c.release(h.id, &h.lease, false)?;
//! # Ok(())
//! # }
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::command::Released;
use super::lean::HELLO;
use super::model::Handoff;

/// The largest response head and body a client reads.
const MAX_HEAD: usize = 64 << 10;
const MAX_BODY: usize = 512 << 20;

/// Why a call did not get its reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The daemon refused the request: its status and `{"error": ...}` message.
    #[error("the daemon answered {status}: {message}")]
    Refused { status: u16, message: String, retry_after_s: Option<u64> },
    /// The answer is not what the API says it is.
    #[error("the daemon's answer is out of protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One response, as read.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    /// The body (chunks joined).
    pub body: Vec<u8>,
    /// Request written -> response read.
    pub round_trip: Duration,
}

impl Response {
    /// A header's value (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The daemon's own time for the request (its `server-timing` header).
    pub fn server_time(&self) -> Option<Duration> {
        let ms: f64 = self.header("server-timing")?.split("dur=").nth(1)?.parse().ok()?;
        Some(Duration::from_secs_f64(ms / 1e3))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as `T`, for a 2xx response; a refusal otherwise.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        if !(200..300).contains(&self.status) {
            let v: Value = serde_json::from_slice(&self.body).unwrap_or_default();
            let message = v["error"].as_str().map_or_else(|| self.text(), str::to_string);
            let retry_after_s = self.header("retry-after").and_then(|s| s.parse().ok());
            return Err(ClientError::Refused { status: self.status, message, retry_after_s });
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(format!("{e}: {}", self.text())))
    }

    /// Nothing expected back but success.
    fn ok(&self) -> Result<(), ClientError> {
        if (200..300).contains(&self.status) {
            Ok(())
        } else {
            self.json::<Value>().map(drop)
        }
    }
}

/// An HTTP/1.1 connection to the API, kept open across requests.
pub struct Client {
    conn: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> std::io::Result<Self> {
        Ok(Self { conn: BufReader::new(UnixStream::connect(socket)?) })
    }

    /// How long a read or write may wait (none: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.conn.get_ref().set_read_timeout(t)?;
        self.conn.get_ref().set_write_timeout(t)
    }

    /// One request with a body of `content_type` (written in one piece: one system call, one
    /// wake-up of the daemon), and its response.
    pub fn request(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) -> std::io::Result<Response> {
        let t = Instant::now();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: ember\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.conn.get_mut().write_all(&req)?;
        let (status, head) = self.read_head()?;
        // (No body at all: 1xx, 204 and 304 answers, and any answer to HEAD.)
        let bodiless = status < 200 || status == 204 || status == 304 || method.eq_ignore_ascii_case("HEAD");
        let body = if bodiless { Vec::new() } else { self.read_body(&head)? };
        Ok(Response { status, head, body, round_trip: t.elapsed() })
    }

    /// A request with a JSON body (or none).
    pub fn json_request(&mut self, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Response> {
        let body = body.map(Value::to_string).unwrap_or_default();
        self.request(method, path, "application/json", body.as_bytes())
    }

    fn read_head(&mut self) -> std::io::Result<(u16, String)> {
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            if self.conn.read_line(&mut head)? == 0 || head.len() > MAX_HEAD {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the connection closed mid-answer"));
            }
        }
        let status = head
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {:?}", head.lines().next())))?;
        Ok((status, head.trim_end().to_string()))
    }

    fn read_body(&mut self, head: &str) -> std::io::Result<Vec<u8>> {
        let lower = head.to_ascii_lowercase();
        let header = |name: &str| lower.lines().find_map(|l| l.strip_prefix(name).map(str::trim));
        if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                self.conn.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
                if body.len() + n > MAX_BODY {
                    return Err(std::io::Error::other("the body is too large"));
                }
                let at = body.len();
                body.resize(at + n, 0);
                self.conn.read_exact(&mut body[at..])?;
                let mut crlf = String::new();
                self.conn.read_line(&mut crlf)?;
                if n == 0 {
                    return Ok(body);
                }
            }
        }
        match header("content-length:") {
            Some(v) => {
                let n: usize = v.parse().map_err(|_| std::io::Error::other(format!("bad content-length {v:?}")))?;
                if n > MAX_BODY {
                    return Err(std::io::Error::other("the body is too large"));
                }
                let mut body = vec![0u8; n];
                self.conn.read_exact(&mut body)?;
                Ok(body)
            }
            // Neither: the body runs to the connection's end.
            None => {
                let mut body = Vec::new();
                self.conn.by_ref().take(MAX_BODY as u64).read_to_end(&mut body)?;
                Ok(body)
            }
        }
    }

    /// Registers `name` (`spec`: the registration's JSON); the function as the daemon shows it.
    pub fn register(&mut self, name: &str, spec: &Value) -> Result<Value, ClientError> {
        self.json_request("PUT", &format!("/functions/{name}"), Some(spec))?.json()
    }

    /// `GET /functions/{name}`.
    pub fn function(&mut self, name: &str) -> Result<Value, ClientError> {
        self.json_request("GET", &format!("/functions/{name}"), None)?.json()
    }

    pub fn delete(&mut self, name: &str) -> Result<(), ClientError> {
        self.json_request("DELETE", &format!("/functions/{name}"), None)?.ok()
    }

    pub fn acquire(&mut self, name: &str) -> Result<Handoff, ClientError> {
        self.json_request("POST", &format!("/functions/{name}/acquire"), None)?.json()
    }

    pub fn release(&mut self, id: u64, lease: &str, destroy: bool) -> Result<Released, ClientError> {
        let body = serde_json::json!({"lease": lease, "destroy": destroy});
        self.json_request("POST", &format!("/vms/{id}/release"), Some(&body))?.json()
    }

    /// `POST /functions/{name}/invoke` with a JSON body (`payload`, `function`, `timeout_s`).
    pub fn invoke(&mut self, name: &str, body: &Value) -> Result<Value, ClientError> {
        self.json_request("POST", &format!("/functions/{name}/invoke"), Some(body))?.json()
    }
}

/// A connection speaking the lean protocol (`serve::lean`).
pub struct LeanClient {
    conn: BufReader<UnixStream>,
    /// The request line being written (kept: no allocation per request).
    out: Vec<u8>,
}

impl LeanClient {
    /// Connects and says the protocol's hello.
    pub fn connect(socket: &Path) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(socket)?;
        s.write_all(HELLO)?;
        Ok(Self { conn: BufReader::new(s), out: Vec::with_capacity(256) })
    }

    /// The connection, for a caller that waits on it itself (polls it, say).
    pub fn stream(&self) -> &UnixStream {
        self.conn.get_ref()
    }

    /// Whether an answer is already read and buffered.
    pub fn buffered(&self) -> bool {
        !self.conn.buffer().is_empty()
    }

    /// Sends one request line (without its newline).
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.out.clear();
        self.out.extend_from_slice(line.as_bytes());
        self.out.push(b'\n');
        self.conn.get_mut().write_all(&self.out)
    }

    /// Reads one answer line, as it came (with its newline), into `line`.
    pub fn read_line(&mut self, line: &mut Vec<u8>) -> std::io::Result<()> {
        line.clear();
        if self.conn.read_until(b'\n', line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Reads one answer line: its JSON, or the refusal it carries.
    pub fn answer<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        let mut line = Vec::new();
        self.read_line(&mut line)?;
        Self::parse(&line)
    }

    /// An answer line's JSON, or the refusal it carries.
    pub fn parse<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
        let v: Value = serde_json::from_slice(line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let (Some(message), Some(status)) = (v["error"].as_str(), v["status"].as_u64()) {
            let retry_after_s = v["retry_after_s"].as_u64();
            return Err(ClientError::Refused { status: status as u16, message: message.into(), retry_after_s });
        }
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn acquire(&mut self, name: &str) -> Result<Handoff, ClientError> {
        self.send(&format!("acquire {name}"))?;
        self.answer()
    }

    pub fn release(&mut self, id: u64, lease: &str, destroy: bool) -> Result<Released, ClientError> {
        self.send(&format!("release {id} {lease}{}", if destroy { " destroy" } else { "" }))?;
        self.answer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-connection server that answers each request with the next of `answers`.
    fn server(answers: Vec<&'static [u8]>) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s);
            for a in answers {
                let mut head = String::new();
                while !head.ends_with("\r\n\r\n") {
                    if r.read_line(&mut head).unwrap() == 0 {
                        return;
                    }
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                r.get_mut().write_all(a).unwrap();
            }
        });
        (dir, path, h)
    }

    #[test]
    fn answers_are_read_by_length_in_chunks_and_refusals_are_typed() {
        let (_d, path, h) = server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 27\r\nserver-timing: ember;dur=0.0125\r\n\r\n{\"id\": 3, \"recycled\": true}",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"i\r\n6\r\nd\": 4}\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 19\r\n\r\n{\"error\": \"later\"}\n",
        ]);
        let mut c = Client::connect(&path).unwrap();
        let r = c.json_request("POST", "/vms/3/release", Some(&serde_json::json!({"lease": "x"}))).unwrap();
        assert_eq!(r.json::<Released>().unwrap(), Released { id: 3, recycled: true });
        assert_eq!(r.server_time(), Some(Duration::from_nanos(12_500)));
        let r = c.json_request("GET", "/x", None).unwrap();
        assert_eq!(r.json::<Value>().unwrap()["id"], 4);
        // A 204 has no body and no length: the next answer on the connection is read whole.
        c.delete("f").unwrap();
        match c.acquire("f") {
            Err(ClientError::Refused { status: 503, message, retry_after_s: Some(2) }) => assert_eq!(message, "later"),
            other => panic!("{other:?}"),
        }
        drop(c);
        h.join().unwrap();
    }
}
