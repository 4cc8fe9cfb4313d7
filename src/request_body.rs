//! Request bodies as ember's HTTP APIs (the daemon's and the Firecracker door's) take them: read
//! whole before the request is routed, so that every answer, those of routes that ignore the body
//! included (a refused path, a wrong method), comes after the body. An answer written while the
//! client is still sending is lost: the connection closes with unread bytes, and the client (or a
//! bridge in front of the socket) sees it close without an answer.

use std::time::Duration;

use axum::extract::Request;
use http_body_util::BodyExt;

/// How far over its limit a declared body is still read through (and dropped) before the refusal.
const DRAIN_OVER_LIMIT: u64 = 32 << 20;
/// How long an over-limit body is read for at most: a client that stops sending gets the refusal
/// after this.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Why a body was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over `limit` bytes: `declared` is its Content-Length, when it had one.
    TooLarge { declared: Option<u64>, limit: usize },
    /// The connection failed while the body was read.
    Unreadable(String),
}

/// `req` with its whole body read (at most `limit` bytes). A request without a body passes as it
/// is. A body declared over the limit is read through for a while (see [`DRAIN_OVER_LIMIT`]) and
/// refused; a chunked one (no declared length) is refused once it passes the limit, its rest
/// unread.
pub async fn read_whole(req: Request, limit: usize) -> Result<Request, Refused> {
    let declared: Option<u64> = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if let Some(size) = declared.filter(|&d| d > limit as u64) {
        if size <= limit as u64 + DRAIN_OVER_LIMIT {
            let mut body = req.into_body();
            let drain = async { while let Some(Ok(_)) = body.frame().await {} };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        }
        return Err(Refused::TooLarge { declared, limit });
    }
    if axum::body::HttpBody::is_end_stream(req.body()) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, axum::body::Body::from(collected.to_bytes()))),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Refused::TooLarge { declared, limit })
        }
        Err(e) => Err(Refused::Unreadable(e.to_string())),
    }
}
