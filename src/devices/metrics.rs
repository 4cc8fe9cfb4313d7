//! Counters a VM's devices and vCPUs keep as they work, read (and reset) by whoever reports them:
//! Firecracker's metrics (`firecracker::metrics`) count per flush, so reading a group takes its
//! counts since the last read. Each counter is one relaxed atomic add where the work happens.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

/// A group of named counters: `add`/`inc` where the work happens, `take` to report them.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: AtomicU64,)*
        }

        impl $name {
            /// Every counter's count since the last `take`, by its (Firecracker's) name.
            pub fn take(&self) -> Map<String, Value> {
                let mut m = Map::new();
                $(m.insert(stringify!($field).to_string(), self.$field.swap(0, Ordering::Relaxed).into());)*
                m
            }
        }
    };
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    add(c, 1);
}

counters!(
    /// A VM's vCPU exits, all vCPUs together.
    VcpuCounters {
        exit_io_in,
        exit_io_out,
        exit_mmio_read,
        exit_mmio_write,
        /// Exits that ended the VM with an error.
        failures,
    }
);

counters!(
    /// One virtio-blk device's work.
    BlockCounters {
        read_bytes,
        write_bytes,
        read_count,
        write_count,
        flush_count,
        /// Chains that were not requests (returned unused).
        invalid_reqs_count,
        /// Requests answered with an error status.
        execute_fails,
        queue_event_count,
        /// Backing files replaced while the VM ran, and replacements refused.
        update_count,
        update_fails,
    }
);

counters!(
    /// One virtio-net device's traffic.
    NetCounters {
        rx_bytes_count,
        rx_packets_count,
        tx_bytes_count,
        tx_packets_count,
        /// Transmit chains that were not frames, and frames the TAP did not take.
        tx_malformed_frames,
        tx_fails,
        rx_fails,
    }
);

/// Sums groups of the same counters (Firecracker reports each device and their total).
pub fn sum(groups: &[&Map<String, Value>]) -> Map<String, Value> {
    let mut total = Map::new();
    for g in groups {
        for (k, v) in g.iter() {
            let n = total.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
            total.insert(k.clone(), n.into());
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_reports_its_counts_since_the_last_take() {
        let c = BlockCounters::default();
        inc(&c.read_count);
        add(&c.read_bytes, 4096);
        let first = c.take();
        assert_eq!((first["read_count"].as_u64(), first["read_bytes"].as_u64()), (Some(1), Some(4096)));
        assert_eq!(first["write_count"], 0);
        assert_eq!(c.take()["read_bytes"], 0, "taken");
        let total = sum(&[&first, &first]);
        assert_eq!(total["read_bytes"], 8192);
    }
}
