//! What ember (the host) and ember-agent (the guest) agree on, in one place: the control page's
//! layout, the mailbox's layout and its header rules, and the frames an invocation travels in over a
//! byte stream (vsock). No dependencies: the agent is a small static binary, and the parsers here
//! are the ones fuzzed (`fuzz/`).
//!
//! Every value in guest-visible memory or on a stream comes from the other side and is checked
//! here before it is used: lengths against the space they claim, function names against
//! [`MAX_FUNCTION_LEN`] and their alphabet, status codes against the known ones.

pub mod control;
pub mod frame;
pub mod mailbox;
pub mod runtime;

/// Longest function name, in bytes.
pub const MAX_FUNCTION_LEN: usize = 32;

/// Checks a function name: 1 to [`MAX_FUNCTION_LEN`] bytes of `[A-Za-z0-9_.-]`.
pub fn check_function(name: &[u8]) -> Result<&str, AbiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_FUNCTION_LEN
        && name.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(AbiError::BadFunction);
    }
    // Checked ASCII above.
    std::str::from_utf8(name).map_err(|_| AbiError::BadFunction)
}

/// How an invocation ended, as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// The function ran; the payload is its response.
    Ok = 0,
    /// No function of that name in this guest.
    UnknownFunction = 1,
    /// The request was malformed (the payload says how).
    BadRequest = 2,
    /// The function ran and failed (the payload says how).
    Failed = 3,
    /// The response did not fit the channel.
    TooLarge = 4,
    /// The handler raised an error (a protocol-2 runtime's ERROR: the payload is its JSON
    /// `{"type", "message", "traceback"}`); the runtime goes on serving.
    Error = 5,
}

impl Status {
    pub fn from_u32(v: u32) -> Result<Self, AbiError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::UnknownFunction,
            2 => Status::BadRequest,
            3 => Status::Failed,
            4 => Status::TooLarge,
            5 => Status::Error,
            other => return Err(AbiError::BadStatus(other)),
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::UnknownFunction => "unknown function",
            Status::BadRequest => "bad request",
            Status::Failed => "function failed",
            Status::TooLarge => "response too large",
            Status::Error => "error",
        }
    }
}

/// Something the other side wrote that breaks the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// A length larger than the space it describes (or than the channel allows).
    TooLong { len: u64, max: u64 },
    /// A function name that is empty, too long or has bytes outside `[A-Za-z0-9_.-]`.
    BadFunction,
    /// A status code that is not one of [`Status`].
    BadStatus(u32),
    /// Request flags this version does not know.
    BadFlags(u32),
    /// A response to another request than the one in flight.
    WrongId { got: u64, want: u64 },
    /// A frame that does not start with its magic.
    BadMagic(u32),
}

impl std::fmt::Display for AbiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbiError::TooLong { len, max } => write!(f, "length {len} exceeds the limit of {max} bytes"),
            AbiError::BadFunction => {
                write!(f, "function names are 1 to {MAX_FUNCTION_LEN} characters of [A-Za-z0-9_.-]")
            }
            AbiError::BadStatus(s) => write!(f, "unknown status code {s}"),
            AbiError::BadFlags(x) => write!(f, "unknown request flags {x:#x}"),
            AbiError::WrongId { got, want } => write!(f, "response to request {got}, expected {want}"),
            AbiError::BadMagic(m) => write!(f, "bad frame magic {m:#010x}"),
        }
    }
}

impl std::error::Error for AbiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names() {
        assert_eq!(check_function(b"echo"), Ok("echo"));
        assert_eq!(check_function(b"my-fn_2.v1"), Ok("my-fn_2.v1"));
        for bad in [&b""[..], b"a b", b"\0", b"caf\xc3\xa9", &[b'a'; 33]] {
            assert_eq!(check_function(bad), Err(AbiError::BadFunction), "{bad:?}");
        }
        assert!(check_function(&[b'a'; 32]).is_ok());
    }

    #[test]
    fn statuses_round_trip() {
        for s in
            [Status::Ok, Status::UnknownFunction, Status::BadRequest, Status::Failed, Status::TooLarge, Status::Error]
        {
            assert_eq!(Status::from_u32(s as u32), Ok(s));
        }
        assert_eq!(Status::from_u32(6), Err(AbiError::BadStatus(6)));
    }
}
