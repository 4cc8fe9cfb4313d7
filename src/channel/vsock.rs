//! Invocations over vsock, from the host: a connection to the guest agent's port through a VM's
//! vsock socket (`CONNECT <port>\n` / `OK <host port>\n`, Firecracker's hybrid vsock), then request
//! and response frames (`ember_abi::frame`). Every step crosses the guest kernel, so this channel
//! is for payloads the mailbox does not carry and for guests without one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ember_abi::frame::{parse_response, request_header, AGENT_VSOCK_PORT, MAX_STREAM_PAYLOAD};
use thiserror::Error;

use crate::channel::mailbox::Response;

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("vsock socket {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("the guest refused the connection to vsock port {0} (is the agent serving?)")]
    Refused(u32),
    #[error("vsock: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("bad function name or payload: {0}")]
    BadRequest(ember_abi::AbiError),
    #[error("the guest agent sent a malformed frame: {0}")]
    Malformed(ember_abi::AbiError),
}

/// A connection to the guest agent, for any number of sequential invocations.
pub struct AgentConnection {
    stream: UnixStream,
    next_id: u64,
    buf: Vec<u8>,
}

fn timeout_or_io(e: std::io::Error) -> VsockError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => VsockError::Timeout,
        _ => VsockError::Io(e),
    }
}

impl AgentConnection {
    /// Connects to the agent's port through the VM's vsock socket at `path`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VsockError> {
        Self::connect_port(path, AGENT_VSOCK_PORT, timeout)
    }

    pub fn connect_port(path: &Path, port: u32, timeout: Duration) -> Result<Self, VsockError> {
        let mut stream = UnixStream::connect(path).map_err(|e| VsockError::Connect(path.display().to_string(), e))?;
        let t = Some(timeout.max(Duration::from_millis(1)));
        stream.set_read_timeout(t)?;
        stream.set_write_timeout(t)?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // "OK <host port>\n", read byte by byte: what follows belongs to the connection.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 32 {
            match stream.read(&mut b) {
                Ok(0) => return Err(VsockError::Refused(port)),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
                Err(e) => return Err(timeout_or_io(e)),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(VsockError::Refused(port));
        }
        Ok(Self { stream, next_id: 1, buf: Vec::new() })
    }

    /// Invokes `function` with `payload` and waits for the response.
    pub fn call(&mut self, function: &str, payload: &[u8]) -> Result<Response, VsockError> {
        let id = self.next_id;
        self.next_id += 1;
        let header = request_header(id, function, payload.len()).map_err(VsockError::BadRequest)?;
        self.stream.write_all(&header).map_err(timeout_or_io)?;
        self.stream.write_all(payload).map_err(timeout_or_io)?;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match parse_response(&self.buf).map_err(VsockError::Malformed)? {
                Some((r, used)) if r.id == id => {
                    let out = Response { status: r.status, payload: r.payload.to_vec() };
                    self.buf.drain(..used);
                    return Ok(out);
                }
                Some((r, _)) => {
                    return Err(VsockError::Malformed(ember_abi::AbiError::WrongId { got: r.id, want: id }));
                }
                // parse_response refuses a length over MAX_STREAM_PAYLOAD, so this buffer is bounded.
                None => debug_assert!(self.buf.len() <= MAX_STREAM_PAYLOAD + 64),
            }
            let n = self.stream.read(&mut chunk).map_err(timeout_or_io)?;
            if n == 0 {
                return Err(VsockError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the guest closed the connection",
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
