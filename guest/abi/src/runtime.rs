//! The runtime protocol: how the agent talks to a function's runtime process inside the guest.
//!
//! There are two, chosen by the registration's `runtime`:
//!
//! **Protocol 1** (a custom runtime, `runtime: "NAME COMMAND [ARGS...]"` or an image's
//! `/etc/ember/runtime`): requests on the runtime's stdin, responses on its stdout, nothing else.
//!
//! ```text
//! request:  u32 payload length, payload                 (little-endian)
//! response: u32 status (a Status code), u32 payload length, payload
//! ```
//!
//! **Protocol 2** (ember's runtimes: `python3`, and `exec` for any executable that speaks it):
//! the runtime reads requests from fd 3 and writes replies to fd 4; its stdout and stderr are the
//! function's log, collected by the agent per invocation. Every message is a frame:
//!
//! ```text
//! u32 kind, u32 body length, body                       (little-endian)
//!
//! agent -> runtime (fd 3)
//!   INVOKE   u64 deadline (guest CLOCK_MONOTONIC, nanoseconds), u32 context length,
//!            context (JSON), event (the payload, as the caller sent it)
//!   RESTORED context-free notice: this process now runs in a clone restored from a snapshot
//!            (body: JSON {"clone_id": N}); the kernel's RNG has been reseeded with the clone's
//!            own seed, so the runtime must reseed whatever it derived from randomness before
//!            the snapshot. Sent before the clone's first INVOKE.
//! runtime -> agent (fd 4)
//!   READY    once, when the handler is loaded (body: a short description of the runtime). The
//!            template is taken after it: every clone starts with the handler imported.
//!   RESULT   the invocation's result (for python3: the handler's return value as JSON)
//!   ERROR    the invocation failed: JSON {"type", "message", "traceback"}. Before READY it means
//!            the runtime could not load the handler; the boot then fails with its message.
//! ```
//!
//! The context is a JSON object: `request_id`, `function`, `version`, `clone_id`, `memory_mib`
//! and `timeout_ms` (fields the host does not know are absent). Runtime environment: `EMBER_RUNTIME_PROTOCOL=2`,
//! `EMBER_HANDLER` (the registration's handler). One invocation at a time; the runtime answers
//! each INVOKE with exactly one RESULT or ERROR, flushing its stdout and stderr first (lines
//! written after the answer count towards the next invocation).

/// Frame kinds, agent -> runtime.
pub const INVOKE: u32 = 1;
pub const RESTORED: u32 = 2;
/// Frame kinds, runtime -> agent.
pub const READY: u32 = 16;
pub const RESULT: u32 = 17;
pub const ERROR: u32 = 18;

/// The fds a protocol-2 runtime reads requests from and writes replies to.
pub const REQUEST_FD: i32 = 3;
pub const REPLY_FD: i32 = 4;

/// The largest frame body either side sends.
pub const MAX_FRAME: usize = 16 << 20;
/// A frame header: kind and length.
pub const FRAME_HEADER: usize = 8;

/// ember's own runtimes: a registration whose `runtime` is one of these names alone selects it.
pub const KNOWN_RUNTIMES: [&str; 2] = ["python3", "exec"];

/// Whether `runtime` names one of ember's runtimes.
pub fn is_known(runtime: &str) -> bool {
    KNOWN_RUNTIMES.contains(&runtime)
}

/// Checks a known runtime's handler: for `python3` a dotted `module.function` of Python
/// identifiers; for `exec` the executable's path (absolute, or relative to the code directory),
/// without `..`. At most 256 bytes.
pub fn check_handler(runtime: &str, handler: &str) -> Result<(), String> {
    if handler.is_empty() || handler.len() > 256 {
        return Err("handler: 1 to 256 characters".into());
    }
    match runtime {
        "python3" => {
            let ident = |w: &str| {
                let mut c = w.chars();
                c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                    && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            let parts: Vec<&str> = handler.split('.').collect();
            if parts.len() < 2 || !parts.iter().all(|p| ident(p)) {
                return Err(format!("handler {handler:?}: expected `module.function` (Python identifiers)"));
            }
            Ok(())
        }
        "exec" => {
            let ok = handler.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'))
                && !handler.split('/').any(|c| c == "..");
            if !ok {
                return Err(format!("handler {handler:?}: expected a path of [A-Za-z0-9_./-] without `..`"));
            }
            Ok(())
        }
        other => Err(format!("{other:?} is not one of ember's runtimes")),
    }
}

/// Encodes a frame header.
pub fn header(kind: u32, len: usize) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Decodes a frame header: the kind and the body's length, refused over [`MAX_FRAME`].
pub fn parse_header(h: &[u8; FRAME_HEADER]) -> Result<(u32, usize), crate::AbiError> {
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_FRAME {
        return Err(crate::AbiError::TooLong { len: len as u64, max: MAX_FRAME as u64 });
    }
    Ok((kind, len))
}

/// Appends `s` to `out` as a JSON string literal (quotes included): the agent writes its small
/// JSON objects without a JSON library. Invalid UTF-8 becomes U+FFFD.
pub fn json_string(out: &mut String, s: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(s).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_are_bounded() {
        assert_eq!(parse_header(&header(RESULT, 5)), Ok((RESULT, 5)));
        assert!(parse_header(&header(RESULT, MAX_FRAME + 1)).is_err());
        let mut h = header(ERROR, 0);
        h[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&h).is_err());
    }

    #[test]
    fn handlers_are_checked_per_runtime() {
        assert!(check_handler("python3", "app.handler").is_ok());
        assert!(check_handler("python3", "pkg.mod._h2").is_ok());
        for bad in ["handler", "app.", ".h", "app.1x", "a-b.c", "a.b c", ""] {
            assert!(check_handler("python3", bad).is_err(), "{bad:?}");
        }
        assert!(check_handler("exec", "bin/fn").is_ok());
        assert!(check_handler("exec", "/usr/bin/fn").is_ok());
        for bad in ["../x", "a/../b", "a b", "a;b", ""] {
            assert!(check_handler("exec", bad).is_err(), "{bad:?}");
        }
        assert!(check_handler("node", "x.y").is_err());
        assert!(is_known("python3") && is_known("exec") && !is_known("flip"));
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        json_string(&mut s, b"a\"b\\c\nd\te\x01\xff");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\te\\u0001\u{fffd}\"");
    }
}
