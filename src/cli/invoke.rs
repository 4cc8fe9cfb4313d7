//! `ember invoke`: one invocation through a VM's mailbox or vsock socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::timeout;

#[derive(Args)]
pub(crate) struct InvokeArgs {
    /// The function: a built-in of the agent (echo, sha256, sleep, cpu-stat) or the image's own.
    function: String,
    /// Invoke through the VM's mailbox (from `ember run|restore --mailbox PATH`).
    #[arg(long, value_name = "PATH", required_unless_present = "vsock", conflicts_with = "vsock")]
    mailbox: Option<PathBuf>,
    /// Invoke over vsock, through the VM's vsock socket (from `ember run|restore --vsock PATH`).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The payload, as a string.
    #[arg(long, value_name = "STR", conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload from a file (`-`: stdin).
    #[arg(long, value_name = "PATH|-")]
    payload_file: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    timeout: f64,
    /// Have the agent ring the response doorbell (an exit) and sleep until it does, instead of
    /// polling the response.
    #[arg(long)]
    doorbell: bool,
}

pub(crate) fn invoke(args: InvokeArgs) -> Result<ExitCode, String> {
    use std::io::{Read, Write};
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).map_err(|e| format!("cannot read stdin: {e}"))?;
            v
        }
        (None, Some(f)) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?,
        (None, None) => Vec::new(),
    };
    let timeout = timeout(Some(args.timeout))?.unwrap_or_default();
    let r = match (&args.mailbox, &args.vsock) {
        (Some(path), _) => {
            let mailbox = ember::channel::mailbox::Mailbox::open(path).map_err(|e| e.to_string())?;
            let opts = ember::channel::mailbox::CallOptions { timeout, doorbell: args.doorbell, ..Default::default() };
            mailbox.call(&args.function, &payload, opts).map_err(|e| e.to_string())?
        }
        (None, Some(path)) => {
            let mut conn = ember::channel::vsock::AgentConnection::connect(path, timeout).map_err(|e| e.to_string())?;
            conn.call(&args.function, &payload).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("--mailbox or --vsock is required".into()),
    };
    if r.status != ember_abi::Status::Ok {
        eprintln!("ember: {}: {}: {}", args.function, r.status.describe(), String::from_utf8_lossy(&r.payload));
        return Ok(ExitCode::from(5));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&r.payload).and_then(|_| out.flush()).map_err(|e| format!("cannot write the response: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
