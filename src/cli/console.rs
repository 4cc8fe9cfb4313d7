//! Where guest consoles go: stdout, nowhere, a file, or one output shared by several clones.

use std::io::Write;
use std::sync::{Arc, Mutex};

use ember::devices::serial::ConsoleOut;
use ember::sys::Locked;

pub(crate) fn console(spec: &str) -> Result<ConsoleOut, String> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "off" => Box::new(std::io::sink()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open console file {path}: {e}"))?,
        ),
    })
}

/// One clone's console on an output shared by several clones. With a prefix, output is written a
/// whole line at a time (each line prefixed with the clone's name), so that clones' lines never mix.
pub(crate) struct SharedConsole {
    inner: Arc<Mutex<ConsoleOut>>,
    prefix: Option<String>,
    line: Vec<u8>,
}

impl SharedConsole {
    /// A clone's console on `inner`, its lines prefixed with `prefix` if there is one.
    pub(crate) fn new(inner: Arc<Mutex<ConsoleOut>>, prefix: Option<String>) -> Self {
        Self { inner, prefix, line: Vec::new() }
    }
}

impl SharedConsole {
    fn write_line(&mut self) -> std::io::Result<()> {
        let mut out = self.inner.locked();
        if let Some(prefix) = &self.prefix {
            out.write_all(prefix.as_bytes())?;
        }
        out.write_all(&self.line)?;
        self.line.clear();
        Ok(())
    }
}

impl Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.prefix.is_none() {
            return self.inner.locked().write(buf);
        }
        for part in buf.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(part);
            if part.ends_with(b"\n") {
                self.write_line()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.locked().flush()
    }
}

impl Drop for SharedConsole {
    fn drop(&mut self) {
        // A last line without its newline.
        if !self.line.is_empty() {
            self.line.push(b'\n');
            let _ = self.write_line();
        }
    }
}
