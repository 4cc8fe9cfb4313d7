//! The state of one vsock connection: its host stream, where it is in its life, and the credit
//! each side has given the other.

use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

/// A packet with no payload, waiting for a receive buffer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Control {
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    pub(super) op: u16,
    pub(super) flags: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// (host port, guest port)
pub(super) type Key = (u32, u32);

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) state: ConnState,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: u32,
    /// Bytes from the guest delivered to the host stream.
    pub(super) fwd_cnt: u32,
    pub(super) fwd_cnt_sent: u32,
    /// Bytes from the guest the host stream has not taken yet.
    pub(super) out: Vec<u8>,
    /// The host stream ended (EOF): the guest has been told.
    pub(super) eof: bool,
    pub(super) interest: EventSet,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            out: Vec::new(),
            eof: false,
            interest: EventSet::empty(),
        }
    }

    /// How many bytes the guest can take now.
    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host stream that has connected but not yet sent its `CONNECT <port>` line.
pub(super) struct Pending {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
}
