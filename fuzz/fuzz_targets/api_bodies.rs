//! API request bodies: a registration (with its pool policy) parses and validates without a
//! panic, and what validates keeps the policy's invariants.
#![no_main]

use ember::serve::model::FunctionSpec;
use ember::scale::scaler::PoolPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<FunctionSpec>(data) {
        if spec.validate().is_ok() {
            assert!(spec.pool.max.is_none_or(|m| m >= spec.pool.min_ready) && spec.pool.lease_s > 0.0);
        }
    }
    if let Ok(p) = serde_json::from_slice::<PoolPolicy>(data) {
        let _ = p.validate();
    }
});
