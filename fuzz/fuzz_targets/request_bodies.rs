//! Every JSON body the routes parse, from arbitrary bytes: parsing and validation either give a
//! request or an error with a stable code and a message, never a panic. The first byte picks
//! the body's kind, the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory_sidecar::error::ApiError;
use memory_sidecar::http::wire;

const MAX_MESSAGES: usize = 256;

fn check(outcome: Result<(), ApiError>) {
    if let Err(error) = outcome {
        let (code, status) = error.code_and_status();
        assert!(!code.is_empty() && !error.to_string().is_empty());
        assert!(
            (400..500).contains(&status.0),
            "a body alone gave {code} {}",
            status.0
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    check(match kind % 5 {
        0 => wire::parse::<wire::WirePrepare>(body)
            .and_then(|w| w.into_request(MAX_MESSAGES))
            .map(|request| assert!(request.messages.len() <= MAX_MESSAGES)),
        1 => wire::parse::<wire::WireIngest>(body)
            .and_then(|w| w.into_request(MAX_MESSAGES))
            .map(|request| assert!(request.messages.len() <= MAX_MESSAGES)),
        2 => wire::parse::<wire::WireMintKey>(body)
            .and_then(|w| w.into_request())
            .map(drop),
        3 => wire::parse::<wire::WireRotate>(body)
            .and_then(|w| w.grace_days())
            .map(drop),
        _ => wire::parse::<wire::WireSearch>(body)
            .and_then(|w| w.into_request())
            .map(drop),
    });
});
