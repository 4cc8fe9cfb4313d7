//! Mailbox headers as either side may find them: a header that passes its check is within bounds.
#![no_main]

use ember_abi::mailbox::{RawRequest, RawResponse, MAX_PAYLOAD};
use ember_abi::MAX_FUNCTION_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 + 8 + MAX_FUNCTION_LEN {
        return;
    }
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let mut function = [0u8; MAX_FUNCTION_LEN];
    function.copy_from_slice(&data[24..24 + MAX_FUNCTION_LEN]);
    let raw = RawRequest { id: u64_at(0), len: u32_at(8), flags: u32_at(12), function };
    if let Ok(r) = raw.check() {
        assert!(r.len <= MAX_PAYLOAD);
        assert!(!r.function.is_empty() && r.function.len() <= MAX_FUNCTION_LEN);
    }
    let resp = RawResponse { id: u64_at(0), len: u32_at(8), status: u32_at(12) };
    if let Ok((_, len)) = resp.check(u64_at(16)) {
        assert!(len <= MAX_PAYLOAD);
    }
});
