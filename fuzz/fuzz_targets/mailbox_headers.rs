//! Mailbox headers as either side may find them: a header that passes its check is within bounds;
//! envelopes and runtime frame headers split only within what they were given.
#![no_main]

use ember_abi::mailbox::{parse_envelope_request, parse_envelope_response, RawRequest, RawResponse, MAX_PAYLOAD};
use ember_abi::runtime;
use ember_abi::MAX_FUNCTION_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = parse_envelope_request(data) {
        assert_eq!(8 + e.context.len() + e.event.len(), data.len());
    }
    if let Ok((meta, result)) = parse_envelope_response(data) {
        assert_eq!(4 + meta.len() + result.len(), data.len());
    }
    if let Some(h) = data.first_chunk::<{ runtime::FRAME_HEADER }>() {
        if let Ok((_, len)) = runtime::parse_header(h) {
            assert!(len <= runtime::MAX_FRAME);
        }
    }
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
