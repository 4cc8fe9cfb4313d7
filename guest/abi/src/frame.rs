//! Invocation frames on a byte stream (the vsock channel): a fixed little-endian header, then the
//! function name (requests) and the payload.
//!
//! ```text
//! request:  "EMRQ"  u32 payload length  u64 id  u8 name length  name  payload
//! response: "EMRS"  u32 payload length  u64 id  u32 status            payload
//! ```
//!
//! The parsers take what has arrived so far and say whether a whole frame is there; they never
//! read past the buffer and refuse a length over [`MAX_STREAM_PAYLOAD`] before any of it arrives.

use crate::{check_function, AbiError, Status};

/// The vsock port the agent serves invocations on.
pub const AGENT_VSOCK_PORT: u32 = 52;

pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"EMRQ");
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"EMRS");
/// Largest payload of a stream frame.
pub const MAX_STREAM_PAYLOAD: usize = 16 << 20;
pub const REQUEST_HEADER: usize = 17;
pub const RESPONSE_HEADER: usize = 20;

/// A whole request frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamRequest<'a> {
    pub id: u64,
    pub function: &'a str,
    pub payload: &'a [u8],
}

/// A whole response frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamResponse<'a> {
    pub id: u64,
    pub status: Status,
    pub payload: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

fn payload_len(b: &[u8], magic: u32) -> Result<usize, AbiError> {
    let m = u32_at(b, 0);
    if m != magic {
        return Err(AbiError::BadMagic(m));
    }
    let len = u32_at(b, 4) as usize;
    if len > MAX_STREAM_PAYLOAD {
        return Err(AbiError::TooLong { len: len as u64, max: MAX_STREAM_PAYLOAD as u64 });
    }
    Ok(len)
}

/// The request frame at the start of `buf` and its size; `None` while it is incomplete.
pub fn parse_request(buf: &[u8]) -> Result<Option<(StreamRequest<'_>, usize)>, AbiError> {
    if buf.len() < REQUEST_HEADER {
        return Ok(None);
    }
    let len = payload_len(buf, REQUEST_MAGIC)?;
    let id = u64_at(buf, 8);
    let name_len = usize::from(buf[16]);
    if name_len == 0 || name_len > crate::MAX_FUNCTION_LEN {
        return Err(AbiError::BadFunction);
    }
    let total = REQUEST_HEADER + name_len + len;
    if buf.len() < total {
        return Ok(None);
    }
    let function = check_function(&buf[REQUEST_HEADER..REQUEST_HEADER + name_len])?;
    Ok(Some((StreamRequest { id, function, payload: &buf[REQUEST_HEADER + name_len..total] }, total)))
}

/// The response frame at the start of `buf` and its size; `None` while it is incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<(StreamResponse<'_>, usize)>, AbiError> {
    if buf.len() < RESPONSE_HEADER {
        return Ok(None);
    }
    let len = payload_len(buf, RESPONSE_MAGIC)?;
    let id = u64_at(buf, 8);
    let status = Status::from_u32(u32_at(buf, 16))?;
    let total = RESPONSE_HEADER + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((StreamResponse { id, status, payload: &buf[RESPONSE_HEADER..total] }, total)))
}

/// The header (with the name) of a request frame; the payload follows it on the stream.
pub fn request_header(id: u64, function: &str, payload_len: usize) -> Result<Vec<u8>, AbiError> {
    check_function(function.as_bytes())?;
    if payload_len > MAX_STREAM_PAYLOAD {
        return Err(AbiError::TooLong { len: payload_len as u64, max: MAX_STREAM_PAYLOAD as u64 });
    }
    let mut h = Vec::with_capacity(REQUEST_HEADER + function.len());
    h.extend_from_slice(&REQUEST_MAGIC.to_le_bytes());
    h.extend_from_slice(&(payload_len as u32).to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    h.push(function.len() as u8);
    h.extend_from_slice(function.as_bytes());
    Ok(h)
}

/// The header of a response frame; the payload follows it on the stream.
pub fn response_header(id: u64, status: Status, payload_len: usize) -> Result<[u8; RESPONSE_HEADER], AbiError> {
    if payload_len > MAX_STREAM_PAYLOAD {
        return Err(AbiError::TooLong { len: payload_len as u64, max: MAX_STREAM_PAYLOAD as u64 });
    }
    let mut h = [0u8; RESPONSE_HEADER];
    h[..4].copy_from_slice(&RESPONSE_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..20].copy_from_slice(&(status as u32).to_le_bytes());
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_partial_frames() {
        let mut f = request_header(9, "echo", 3).unwrap();
        f.extend_from_slice(b"abc");
        for cut in 0..f.len() {
            assert_eq!(parse_request(&f[..cut]), Ok(None), "cut at {cut}");
        }
        f.extend_from_slice(b"next");
        let (r, n) = parse_request(&f).unwrap().unwrap();
        assert_eq!(r, StreamRequest { id: 9, function: "echo", payload: b"abc" });
        assert_eq!(n, f.len() - 4);
    }

    #[test]
    fn response_round_trip() {
        let mut f = response_header(5, Status::Failed, 2).unwrap().to_vec();
        f.extend_from_slice(b"no");
        let (r, n) = parse_response(&f).unwrap().unwrap();
        assert_eq!(r, StreamResponse { id: 5, status: Status::Failed, payload: b"no" });
        assert_eq!(n, f.len());
    }

    #[test]
    fn bad_frames_are_refused_early() {
        let mut f = request_header(1, "echo", 0).unwrap();
        f[0] = b'X';
        assert!(matches!(parse_request(&f), Err(AbiError::BadMagic(_))));
        let mut f = request_header(1, "echo", 0).unwrap();
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_request(&f), Err(AbiError::TooLong { .. })));
        let mut f = request_header(1, "echo", 0).unwrap();
        f[16] = 0;
        assert_eq!(parse_request(&f), Err(AbiError::BadFunction));
        let mut f = response_header(1, Status::Ok, 0).unwrap();
        f[16] = 77;
        assert_eq!(parse_response(&f), Err(AbiError::BadStatus(77)));
        assert!(request_header(1, "bad name", 0).is_err());
        assert!(request_header(1, "echo", MAX_STREAM_PAYLOAD + 1).is_err());
    }
}
