//! The credential and session headers, from arbitrary bytes in each of them: never a panic;
//! a credential found is trimmed, non-empty and bounded; a refusal is `invalid_key` or, for the
//! session, `invalid_request`.
#![no_main]

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use memory_sidecar::bounds::MAX_CREDENTIAL_LEN;
use memory_sidecar::http::{credential, session_id};

const NAMES: [&str; 4] = ["x-memory-key", "authorization", "x-api-key", "x-session-id"];

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff bytes fill the headers in order; bytes a header value may not
    // hold are refused by `HeaderValue` itself, as hyper would.
    let mut headers = HeaderMap::new();
    for (name, value) in NAMES.iter().zip(data.split(|b| *b == 0xff)) {
        if value.first() == Some(&0xfe) {
            continue; // absent
        }
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    match credential(&headers) {
        Ok(Some(found)) => {
            assert!(!found.is_empty() && found.len() <= MAX_CREDENTIAL_LEN);
            assert_eq!(found.trim(), found);
        }
        Ok(None) => {}
        Err(error) => assert_eq!(error.code(), "invalid_key"),
    }
    match session_id(&headers) {
        Ok(_) => {}
        Err(error) => assert_eq!(error.code(), "invalid_request"),
    }
});
