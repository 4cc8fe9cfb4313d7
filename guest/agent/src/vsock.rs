//! The agent's vsock listener: invocation frames (ember_abi::frame) on AF_VSOCK port
//! AGENT_VSOCK_PORT, one thread per connection. Every byte crosses the guest kernel; the mailbox is
//! the fast path, this one carries any size and needs nothing but a vsock device.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ember_abi::frame::{parse_request, response_header, AGENT_VSOCK_PORT, MAX_STREAM_PAYLOAD};
use ember_abi::Status;

use crate::functions::Functions;
use crate::vsock_socket::{socket, vsock_addr, ADDR_LEN};

/// Starts the listener thread. It re-listens if the socket fails (e.g. after a transport reset).
pub fn start(functions: Arc<Mutex<Functions>>) -> io::Result<()> {
    std::thread::Builder::new().name("vsock".into()).spawn(move || loop {
        match listen() {
            Ok(l) => accept_loop(&l, &functions),
            Err(e) => eprintln!("ember-agent: vsock listen: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    })?;
    Ok(())
}

fn listen() -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let sock = socket()?;
    let fd = sock.as_raw_fd();
    let addr = vsock_addr(libc::VMADDR_CID_ANY, AGENT_VSOCK_PORT);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd, 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn accept_loop(listener: &OwnedFd, functions: &Arc<Mutex<Functions>>) {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: accept4 on our listening socket; no address wanted.
        let fd = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("ember-agent: vsock accept: {e}");
            return;
        }
        // SAFETY: `fd` is the accepted connection, owned by nothing else.
        let conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let functions = functions.clone();
        let _ = std::thread::Builder::new().name("vsock-conn".into()).spawn(move || serve(conn, &functions));
    }
}

/// Serves one connection until the host closes it or sends a malformed frame.
fn serve(mut conn: std::fs::File, functions: &Mutex<Functions>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    loop {
        match parse_request(&buf) {
            Ok(Some((req, used))) => {
                out.clear();
                let status =
                    functions.lock().unwrap_or_else(|p| p.into_inner()).call(req.function, req.payload, &mut out);
                let (status, body): (Status, &[u8]) = if out.len() > MAX_STREAM_PAYLOAD {
                    (Status::TooLarge, b"response exceeds the frame limit")
                } else {
                    (status, &out)
                };
                let Ok(header) = response_header(req.id, status, body.len()) else { return };
                if conn.write_all(&header).and_then(|_| conn.write_all(body)).is_err() {
                    return;
                }
                buf.drain(..used);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                // A malformed frame: say why (id 0) and close.
                let msg = e.to_string();
                if let Ok(h) = response_header(0, Status::BadRequest, msg.len()) {
                    let _ = conn.write_all(&h).and_then(|_| conn.write_all(msg.as_bytes()));
                }
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                // E.g. reset by the transport after a restore: worth a line on the console.
                println!("ember-agent: vsock connection ended: {e}");
                return;
            }
        }
    }
}
