//! The handoff of clones to callers: acquire (a ready clone, or a cold start within the
//! function's `max`), the lease each handoff carries, release (back to the pool or destroyed) and
//! the expiry of leases that ran out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::RestoreError;
use super::error::Error;
use super::function::{Busy, Function, Handed, PooledVm};
use super::model::{FunctionState, Handoff};
use super::supervisor::Supervisor;
use crate::sys::Locked;

/// How long an acquire at `max` waits for one of the clones being restored before it is refused.
pub(super) const AT_MAX_WAIT: Duration = Duration::from_secs(5);

/// A fresh lease token: 128 bits from the host's RNG, as hex. VM ids are small integers that
/// restart after a daemon restart and survive recycling; the lease names one handoff.
pub(super) fn new_lease() -> Result<String, Error> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = [0u8; 16];
    crate::sys::getrandom(&mut b).map_err(|e| Error::internal(format!("getrandom: {e}")))?;
    let mut lease = String::with_capacity(32);
    for x in b {
        lease.push(HEX[usize::from(x >> 4)] as char);
        lease.push(HEX[usize::from(x & 15)] as char);
    }
    Ok(lease)
}

/// Compares lease tokens in time independent of where they differ.
pub(super) fn same_lease(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Supervisor {
    /// Hands a ready clone of `name` over; restores one on the spot (a cold start) when the pool is
    /// empty. No clone is ever handed out twice: it leaves the pool under the pool's lock.
    pub fn acquire(&self, name: &str) -> Result<Handoff, Error> {
        self.acquire_in(name, true)
    }

    /// [`Supervisor::acquire`] after [`Supervisor::acquire_warm`] found no clone (that request
    /// has been counted).
    pub fn acquire_cold(&self, name: &str) -> Result<Handoff, Error> {
        self.acquire_in(name, false)
    }

    pub(super) fn acquire_in(&self, name: &str, arrival: bool) -> Result<Handoff, Error> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        let deadline = t + AT_MAX_WAIT;
        let mut arrival = arrival;
        let busy = loop {
            if let Some((c, busy)) = self.take_warm(&f, arrival) {
                return self.hand_over(f, c, busy, false, t);
            }
            arrival = false;
            // (`take_warm` has already asked for a refill.)
            let mut pool = f.pool.locked();
            // A cold start adds a clone: never past `max` (in use, ready, starting and restoring).
            if pool.busy + pool.have() < f.max_clones {
                break Busy::take(&f, &mut pool);
            }
            // At `max` with clones being restored: one of them is sooner than a refusal and the
            // caller's retry (a single caller in a loop meets this while the pool refills).
            let now = Instant::now();
            if pool.restoring == 0 || now >= deadline {
                return Err(Error::busy(format!(
                    "function {name:?} is at its pool.max of {} clones; try again",
                    f.max_clones
                )));
            }
            if pool.ready.is_empty() && pool.warming.is_empty() {
                drop(f.pool_changed.wait_timeout(pool, deadline - now));
            }
        };
        // (On an error, `busy` gives its place back as it goes.)
        let c = self.restore_clone(&f).map_err(RestoreError::refusal)?;
        tracing::info!(function = %name, id = c.id, "cold start: the pool was empty");
        self.hand_over(f, c, busy, true, t)
    }

    /// The warm half of [`Supervisor::acquire`]: a ready clone if the pool has one (microseconds,
    /// no system call), `None` when a cold start would be needed.
    pub fn acquire_warm(&self, name: &str) -> Result<Option<Handoff>, Error> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        self.take_warm(&f, true).map(|(c, busy)| self.hand_over(f, c, busy, false, t)).transpose()
    }

    pub(super) fn ready_function(&self, name: &str) -> Result<Arc<Function>, Error> {
        let f = self.function(name)?;
        let state = f.state.locked().clone();
        if state != FunctionState::Ready {
            return Err(Error::conflict(format!("function {name:?} is not ready ({state:?})")));
        }
        Ok(f)
    }

    pub(super) fn hand_over(
        &self,
        f: Arc<Function>,
        mut clone: PooledVm,
        busy: Busy,
        cold_start: bool,
        t: Instant,
    ) -> Result<Handoff, Error> {
        let lease = match new_lease() {
            Ok(l) => l,
            Err(e) => {
                drop(busy);
                self.discard(vec![clone]);
                return Err(e);
            }
        };
        clone.uses += 1;
        f.counters.handoffs.fetch_add(1, Ordering::Relaxed);
        if cold_start {
            f.counters.cold_starts.fetch_add(1, Ordering::Relaxed);
        }
        let handoff = Handoff {
            id: clone.id,
            function: f.name.clone(),
            mailbox: clone.mailbox.clone(),
            vsock: clone.vsock.clone(),
            cold_start,
            lease: lease.clone(),
            address: clone.net.as_ref().map(|n| n.address),
        };
        let expires = self.clock.now() + Duration::from_secs_f64(f.spec.pool.lease_s);
        self.handed.locked().insert(clone.id, Handed { function: f, clone, busy, lease, expires });
        self.metrics.handoff.observe(t.elapsed());
        Ok(handoff)
    }

    /// Waits up to `timeout` for handed-out VM `id` to end (its guest, or the process it runs
    /// in): whether it has. Woken by the VM's end, not a poll.
    pub fn wait_ended(&self, id: u64, timeout: Duration) -> Result<bool, Error> {
        let mailbox = self.handed.locked().get(&id).map(|h| h.clone.vm.mailbox());
        let mailbox = mailbox.ok_or_else(|| Error::not_found(format!("no handed-out VM {id}")))?;
        Ok(mailbox.wait_ended(timeout))
    }

    /// The ids of every handed-out VM.
    pub fn handed_ids(&self) -> Vec<u64> {
        self.handed.locked().keys().copied().collect()
    }

    /// Takes a handed-out VM back. It goes back to the pool when the function's policy reuses
    /// clones (`max_uses`), it has uses left, `destroy` is not asked for, and it is sound: running,
    /// its agent serving, no request in flight. Otherwise it is destroyed. Returns whether it was
    /// recycled.
    pub fn release(&self, id: u64, lease: &str, destroy: bool) -> Result<bool, Error> {
        self.release_after(id, lease, destroy, false)
    }

    /// [`Supervisor::release`] after an `acquire` (`invoked` false) or an `invoke` (true): with
    /// `max_uses` unset only the latter recycles ([`PoolPolicy::uses_allowed`]).
    ///
    /// [`PoolPolicy::uses_allowed`]: crate::scale::scaler::PoolPolicy::uses_allowed
    pub(super) fn release_after(&self, id: u64, lease: &str, destroy: bool, invoked: bool) -> Result<bool, Error> {
        let h = {
            let mut handed = self.handed.locked();
            let h = handed.get(&id).ok_or_else(|| Error::not_found(format!("no handed-out VM {id}")))?;
            if !same_lease(&h.lease, lease) {
                return Err(Error::forbidden(format!("VM {id}: the lease does not match this handoff")));
            }
            let h = handed.remove(&id).ok_or_else(|| Error::not_found(format!("no handed-out VM {id}")))?;
            // A lease ends at its deadline, whether or not the scaler's tick has come round to
            // it yet: a release after it is refused as one after the tick would be.
            if h.expires <= self.clock.now() {
                drop(handed);
                self.expire(vec![h]);
                return Err(Error::not_found(format!("no handed-out VM {id} (its lease expired)")));
            }
            h
        };
        let Handed { function: f, clone, busy, .. } = h;
        let recycle = !destroy
            && clone.uses < f.spec.pool.uses_allowed(invoked)
            && !f.deleted.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
            && !clone.vm.ended()
            && clone.vm.mailbox().quiescent();
        let mut pool = f.pool.locked();
        // In one step with the clone's return: the pool never counts one clone fewer than it has.
        busy.give_back(&mut pool);
        let gone = if recycle {
            // Taken first by the next acquire: its agent is the most likely to still be polling.
            pool.ready.push_front(clone);
            pool.came_back += 1;
            None
        } else {
            Some(clone)
        };
        drop(pool);
        f.pool_changed.notify_all();
        match gone {
            None => {
                f.counters.recycled.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Some(clone) => {
                self.discard(vec![clone]);
                Ok(false)
            }
        }
    }

    /// Destroys handed-out clones whose lease ran out (`pool.lease_s`): their release is then
    /// refused as for any unknown VM.
    pub(super) fn expire_leases(&self) {
        let now = self.clock.now();
        let expired: Vec<Handed> = {
            let mut handed = self.handed.locked();
            let ids: Vec<u64> = handed.iter().filter(|(_, h)| h.expires <= now).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| handed.remove(id)).collect()
        };
        self.expire(expired);
    }

    /// Destroys the clones of leases that ended, counting them.
    pub(super) fn expire(&self, expired: Vec<Handed>) {
        let clones = expired
            .into_iter()
            .map(|h| {
                tracing::warn!(function = %h.function.name, id = h.clone.id, "lease expired; the clone is destroyed");
                h.function.counters.expired_leases.fetch_add(1, Ordering::Relaxed);
                // (Its place among the busy ones goes with `h.busy`.)
                h.clone
            })
            .collect();
        self.discard(clones);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unguessable_and_compared_whole() {
        let (a, b) = (new_lease().unwrap(), new_lease().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same_lease(&a, &a.clone()));
        assert!(!same_lease(&a, &b));
        assert!(!same_lease(&a, &a[..31]));
        assert!(!same_lease(&a, ""));
    }
}
