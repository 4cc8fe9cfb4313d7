//! The mailbox: a region of guest-physical memory that the host also maps, for invocations that
//! never enter the guest kernel. The agent maps it once (through /dev/mem, before the snapshot) and
//! polls it from user space; the host writes a request, the agent answers in place.
//!
//! ```text
//! 0x0000  u32  magic "EMBX" (host)          0x0004  u32  version (host)
//! 0x0008  u64  epoch (host): random, new for every mailbox; an agent that finds it changed (a
//!              restored clone, whose memory remembers its template's mailbox) takes the request
//!              seq it has seen from 0x00c8 again
//! 0x0040  u64  request seq (host; the last field the host writes for a request, release order)
//! 0x0048  u64  request id       0x0050  u32  request length    0x0054  u32  request flags
//! 0x0058  [u8; 32]  function name, NUL-padded
//! 0x0080  u64  response seq (agent; = the request seq it answers, written last)
//! 0x0088  u64  response id      0x0090  u32  response length   0x0094  u32  status
//! 0x00c0  u32  agent state (agent: AGENT_*)   0x00c8  u64  the request seq the agent last saw
//! 0x00d0  u32  host waiting (host: nonzero while a caller sleeps on the response doorbell)
//! 0x00d4  u32  agent features (agent: FEATURE_*, written when it starts serving)
//! 0x0100  u32  host wake word (host only: a futex the host's idle vCPU waits on)
//! 0x1000  request payload  (up to MAX_PAYLOAD)
//! 0x80000 response payload (up to MAX_PAYLOAD)
//! ```
//!
//! A request is posted by writing the payload and the header fields, then the request seq
//! (incremented by one per request). The agent handles a request when the seq differs from the one
//! it last saw, and answers by writing the payload, length, status and id, then the response seq.
//! With [`FLAG_DOORBELL`] it then also writes the control page's response doorbell (an exit the
//! host sees); without it the host polls the response seq. With [`FLAG_RING_IF_WAITING`] as well
//! (sent only to an agent whose features have [`FEATURE_RING_IF_WAITING`]) it rings only if the
//! host-waiting word is set once the response seq is written: a caller that polls first and finds
//! the answer costs the guest no exit. The caller sets that word before it last looks at the
//! response seq and sleeps, so one of the two always sees the other (both use sequentially
//! consistent order).

use crate::{check_function, AbiError, Status, MAX_FUNCTION_LEN};

/// Guest-physical address and size of the mailbox (in the 32-bit MMIO gap, reserved in the e820
/// map so that the guest kernel never uses it as RAM).
pub const MAILBOX_ADDR: u64 = 0xd010_0000;
pub const MAILBOX_SIZE: u64 = 0x10_0000;

pub const MAGIC: u32 = u32::from_le_bytes(*b"EMBX");
pub const VERSION: u32 = 1;

pub const MAGIC_OFF: usize = 0x00;
pub const VERSION_OFF: usize = 0x04;
pub const EPOCH_OFF: usize = 0x08;
pub const REQ_SEQ_OFF: usize = 0x40;
pub const REQ_ID_OFF: usize = 0x48;
pub const REQ_LEN_OFF: usize = 0x50;
pub const REQ_FLAGS_OFF: usize = 0x54;
pub const REQ_FUNCTION_OFF: usize = 0x58;
pub const RESP_SEQ_OFF: usize = 0x80;
pub const RESP_ID_OFF: usize = 0x88;
pub const RESP_LEN_OFF: usize = 0x90;
pub const RESP_STATUS_OFF: usize = 0x94;
pub const AGENT_STATE_OFF: usize = 0xc0;
pub const AGENT_SEEN_OFF: usize = 0xc8;
pub const HOST_WAITING_OFF: usize = 0xd0;
pub const AGENT_FEATURES_OFF: usize = 0xd4;
pub const HOST_WAKE_OFF: usize = 0x100;
pub const REQ_DATA_OFF: usize = 0x1000;
pub const RESP_DATA_OFF: usize = 0x8_0000;
/// Largest request or response payload.
pub const MAX_PAYLOAD: usize = RESP_DATA_OFF - REQ_DATA_OFF;

/// Request flag: ring the control page's response doorbell after answering.
pub const FLAG_DOORBELL: u32 = 1;
/// Request flag: the request payload is an envelope (`u32 timeout_ms, u32 context length,
/// context (JSON), event`) and so is the response (`u32 meta length, meta (JSON), result`): how
/// the host hands a protocol-2 runtime its invocation context (see [`crate::runtime`]) and gets
/// back the invocation's logs and error. Meta: `{"logs": TEXT, "logs_truncated": BOOL,
/// "error": {"type", "message", "traceback"}}`, each field optional.
pub const FLAG_ENVELOPE: u32 = 2;
/// Request flag, with [`FLAG_DOORBELL`]: ring only if the host-waiting word is set.
pub const FLAG_RING_IF_WAITING: u32 = 4;
const KNOWN_FLAGS: u32 = FLAG_DOORBELL | FLAG_ENVELOPE | FLAG_RING_IF_WAITING;

/// Agent feature: it understands [`FLAG_RING_IF_WAITING`].
pub const FEATURE_RING_IF_WAITING: u32 = 1;

/// Agent states.
pub const AGENT_ABSENT: u32 = 0;
/// Polling the request seq: a request is seen without any exit.
pub const AGENT_POLLING: u32 = 1;
/// About to ring (or has rung) the idle doorbell: the host must wake the vCPU for a new request.
pub const AGENT_IDLE: u32 = 2;

// The header fields and the two payload areas fit the region and do not overlap.
const _: () = assert!(HOST_WAKE_OFF + 4 <= REQ_DATA_OFF);
const _: () = assert!(RESP_DATA_OFF + MAX_PAYLOAD <= MAILBOX_SIZE as usize);
const _: () = assert!(REQ_FUNCTION_OFF + MAX_FUNCTION_LEN <= RESP_SEQ_OFF);
const _: () = assert!(AGENT_SEEN_OFF + 8 <= HOST_WAITING_OFF && AGENT_FEATURES_OFF + 4 <= HOST_WAKE_OFF);

/// A request header as the agent read it, before it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRequest {
    pub id: u64,
    pub len: u32,
    pub flags: u32,
    pub function: [u8; MAX_FUNCTION_LEN],
}

/// A checked request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: u64,
    pub len: usize,
    pub doorbell: bool,
    /// With `doorbell`: only if the host is waiting ([`FLAG_RING_IF_WAITING`]).
    pub ring_if_waiting: bool,
    pub envelope: bool,
    pub function: &'a str,
}

/// An envelope request's parts (see [`FLAG_ENVELOPE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub timeout_ms: u32,
    pub context: &'a [u8],
    pub event: &'a [u8],
}

/// Wraps an invocation's context and event in an envelope request.
pub fn envelope_request(timeout_ms: u32, context: &[u8], event: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + context.len() + event.len());
    b.extend_from_slice(&timeout_ms.to_le_bytes());
    b.extend_from_slice(&(context.len() as u32).to_le_bytes());
    b.extend_from_slice(context);
    b.extend_from_slice(event);
    b
}

/// Splits an envelope request; the context's length is checked against the payload.
pub fn parse_envelope_request(b: &[u8]) -> Result<Envelope<'_>, AbiError> {
    let (timeout_ms, rest) = split_u32(b)?;
    let (context, event) = split_len(rest)?;
    Ok(Envelope { timeout_ms, context, event })
}

/// Splits an envelope response into its meta and its result.
pub fn parse_envelope_response(b: &[u8]) -> Result<(&[u8], &[u8]), AbiError> {
    split_len(b)
}

/// The first 4 bytes as a u32 and the rest.
fn split_u32(b: &[u8]) -> Result<(u32, &[u8]), AbiError> {
    if b.len() < 4 {
        return Err(AbiError::TooLong { len: 4, max: b.len() as u64 });
    }
    Ok((u32::from_le_bytes([b[0], b[1], b[2], b[3]]), &b[4..]))
}

/// A u32 length, that many bytes, and the rest.
fn split_len(b: &[u8]) -> Result<(&[u8], &[u8]), AbiError> {
    let (len, rest) = split_u32(b)?;
    let len = len as usize;
    if len > rest.len() {
        return Err(AbiError::TooLong { len: len as u64, max: rest.len() as u64 });
    }
    Ok(rest.split_at(len))
}

impl RawRequest {
    /// Checks the header: a known function name, a length within [`MAX_PAYLOAD`], known flags.
    pub fn check(&self) -> Result<Request<'_>, AbiError> {
        let name_len = self.function.iter().position(|&b| b == 0).unwrap_or(MAX_FUNCTION_LEN);
        let function = check_function(&self.function[..name_len])?;
        if self.function[name_len..].iter().any(|&b| b != 0) {
            return Err(AbiError::BadFunction);
        }
        let len = self.len as usize;
        if len > MAX_PAYLOAD {
            return Err(AbiError::TooLong { len: u64::from(self.len), max: MAX_PAYLOAD as u64 });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(AbiError::BadFlags(self.flags));
        }
        Ok(Request {
            id: self.id,
            len,
            doorbell: self.flags & FLAG_DOORBELL != 0,
            ring_if_waiting: self.flags & FLAG_RING_IF_WAITING != 0,
            envelope: self.flags & FLAG_ENVELOPE != 0,
            function,
        })
    }
}

/// Encodes a function name for the header (the name must pass [`check_function`]).
pub fn function_field(name: &str) -> Result<[u8; MAX_FUNCTION_LEN], AbiError> {
    check_function(name.as_bytes())?;
    let mut f = [0u8; MAX_FUNCTION_LEN];
    f[..name.len()].copy_from_slice(name.as_bytes());
    Ok(f)
}

/// A response header as the host read it, before it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawResponse {
    pub id: u64,
    pub len: u32,
    pub status: u32,
}

impl RawResponse {
    /// Checks the header against the request it should answer.
    pub fn check(&self, request_id: u64) -> Result<(Status, usize), AbiError> {
        let status = Status::from_u32(self.status)?;
        let len = self.len as usize;
        if len > MAX_PAYLOAD {
            return Err(AbiError::TooLong { len: u64::from(self.len), max: MAX_PAYLOAD as u64 });
        }
        if self.id != request_id {
            return Err(AbiError::WrongId { got: self.id, want: request_id });
        }
        Ok((status, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(function: &str, len: u32, flags: u32) -> RawRequest {
        let mut f = [0u8; MAX_FUNCTION_LEN];
        f[..function.len()].copy_from_slice(function.as_bytes());
        RawRequest { id: 7, len, flags, function: f }
    }

    #[test]
    fn requests_are_checked() {
        let r = raw("echo", 5, FLAG_DOORBELL);
        assert_eq!(
            r.check(),
            Ok(Request { id: 7, len: 5, doorbell: true, ring_if_waiting: false, envelope: false, function: "echo" })
        );
        assert!(raw("echo", 5, FLAG_ENVELOPE).check().unwrap().envelope);
        assert!(raw("echo", MAX_PAYLOAD as u32, 0).check().is_ok());
        assert!(matches!(raw("echo", MAX_PAYLOAD as u32 + 1, 0).check(), Err(AbiError::TooLong { .. })));
        assert!(raw("echo", 0, FLAG_DOORBELL | FLAG_RING_IF_WAITING).check().unwrap().ring_if_waiting);
        assert_eq!(raw("echo", 0, 8).check(), Err(AbiError::BadFlags(8)));
        assert_eq!(raw("", 0, 0).check(), Err(AbiError::BadFunction));
        let mut r = raw("echo", 0, 0);
        r.function[10] = b'x'; // bytes after the terminating NUL
        assert_eq!(r.check(), Err(AbiError::BadFunction));
    }

    #[test]
    fn responses_are_checked() {
        let ok = RawResponse { id: 3, len: 10, status: 0 };
        assert_eq!(ok.check(3), Ok((Status::Ok, 10)));
        assert_eq!(ok.check(4), Err(AbiError::WrongId { got: 3, want: 4 }));
        assert!(matches!(RawResponse { len: u32::MAX, ..ok }.check(3), Err(AbiError::TooLong { .. })));
        assert_eq!(RawResponse { status: 99, ..ok }.check(3), Err(AbiError::BadStatus(99)));
    }

    #[test]
    fn envelopes_round_trip_and_lengths_are_checked() {
        let b = envelope_request(1500, br#"{"request_id":"r"}"#, b"event");
        let e = parse_envelope_request(&b).unwrap();
        assert_eq!((e.timeout_ms, e.context, e.event), (1500, &br#"{"request_id":"r"}"#[..], &b"event"[..]));
        assert!(parse_envelope_request(&b[..3]).is_err());
        assert!(parse_envelope_request(&b[..10]).is_err(), "context longer than the payload");
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_envelope_request(&bad).is_err());
        let mut r = 2u32.to_le_bytes().to_vec();
        r.extend_from_slice(b"{}result");
        assert_eq!(parse_envelope_response(&r), Ok((&b"{}"[..], &b"result"[..])));
        assert_eq!(parse_envelope_response(&r[..5]).map(|_| ()), Err(AbiError::TooLong { len: 2, max: 1 }));
    }

    #[test]
    fn function_field_round_trips() {
        let f = function_field("sha256").unwrap();
        let r = RawRequest { id: 1, len: 0, flags: 0, function: f };
        assert_eq!(r.check().unwrap().function, "sha256");
        assert!(function_field("no spaces").is_err());
    }
}
