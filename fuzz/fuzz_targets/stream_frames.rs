//! Invocation frames on a stream (vsock): whatever arrives, the parsers never read past the buffer,
//! never accept a length over the limit, and a frame they accept re-encodes to the same bytes.
#![no_main]

use ember_abi::frame::{parse_request, parse_response, request_header, response_header, MAX_STREAM_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((r, used))) = parse_request(data) {
        assert!(used <= data.len() && r.payload.len() <= MAX_STREAM_PAYLOAD);
        let mut again = request_header(r.id, r.function, r.payload.len()).unwrap();
        again.extend_from_slice(r.payload);
        assert_eq!(&again[..], &data[..used]);
    }
    if let Ok(Some((r, used))) = parse_response(data) {
        assert!(used <= data.len() && r.payload.len() <= MAX_STREAM_PAYLOAD);
        let mut again = response_header(r.id, r.status, r.payload.len()).unwrap().to_vec();
        again.extend_from_slice(r.payload);
        assert_eq!(&again[..], &data[..used]);
    }
});
