//! The autoscaler and what it is measured against: pure, deterministic computation (no KVM, no
//! processes, no clock of its own), shared by the daemon's pools and `ember simulate`.
//!
//! - [`scaler`]: one function's policy (its pool's target from the arrivals it saw), over
//!   [`arrivals`], the model of those arrivals;
//! - [`fleet`]: the host's idle budget, shared out among every function's scaler;
//! - [`trace`]: invocation traces and what a policy did over one; [`traces`] generated fleets
//!   and the Azure trace; [`simulate`] the replay of a trace against the autoscaler and a
//!   keep-alive policy, with [`hybrid`] the hybrid-histogram baseline.

pub mod arrivals;
pub mod fleet;
pub mod hybrid;
pub mod scaler;
pub mod simulate;
pub mod trace;
pub mod traces;

/// How often the daemon's background loop scales pools (it also refills them after every
/// handoff); the simulator ticks its scalers as often.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);
