//! Why the daemon refused a request, without a transport: an [`ErrorKind`] and a message for
//! the caller. Each door maps the kind to its own code (the HTTP API and the lean protocol to an
//! HTTP status, `serve::api::status`); nothing below the doors knows of HTTP.

use std::time::Duration;

/// What went wrong, as far as a caller can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or asks for what cannot be (fix the request).
    BadRequest,
    /// What it names does not exist.
    NotFound,
    /// The caller does not hold what it acts on (a release with another handoff's lease), or
    /// asks for a file outside the daemon's image directories.
    Forbidden,
    /// It conflicts with the state of what it names (registered already, still being made, in
    /// use).
    Conflict,
    /// At capacity now (the function's `max` clones are out, too many invocations in flight):
    /// try again later.
    Busy,
    /// Unavailable for a known time (the function's worker is being restarted): come back after
    /// [`Error::retry_after`].
    Restarting,
    /// The guest or its agent failed, or answered out of protocol.
    GuestFailed,
    /// The guest did not answer in time.
    GuestTimeout,
    /// The daemon failed (its disk, a thread, the host's resources).
    Internal,
}

/// A refusal: its kind, a message for the caller, and when to come back where that is known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }

    pub fn guest_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::GuestFailed, message)
    }

    pub fn guest_timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::GuestTimeout, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Unavailable for `after` (at least a second, as callers count in whole seconds).
    pub fn restarting(message: impl Into<String>, after: Duration) -> Self {
        let after = after.max(Duration::from_secs(1));
        Self { kind: ErrorKind::Restarting, message: message.into(), retry_after: Some(after) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// When to come back, for a refusal that knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// [`Error::retry_after`] in whole seconds, rounded up.
    pub fn retry_after_s(&self) -> Option<u64> {
        self.retry_after.map(|d| d.as_secs_f64().ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_its_kind_and_message_and_when_to_come_back() {
        let e = Error::conflict("function \"f\" is already registered");
        assert_eq!((e.kind(), e.to_string().as_str()), (ErrorKind::Conflict, "function \"f\" is already registered"));
        assert_eq!(e.retry_after(), None);
        let r = Error::restarting("later", Duration::from_millis(200));
        assert_eq!((r.kind(), r.retry_after_s()), (ErrorKind::Restarting, Some(1)), "at least a second");
        assert_eq!(Error::restarting("later", Duration::from_millis(2100)).retry_after_s(), Some(3));
    }
}
