//! The JSON Lines import parser, from arbitrary bytes: never a panic, never more lines than the
//! limit, line numbers rising, and each refused line with a stable code and a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory_sidecar::http::wire;

const MAX_LINES: usize = 64;

fuzz_target!(|data: &[u8]| {
    match wire::upload_lines(data, MAX_LINES) {
        Ok(lines) => {
            assert!(lines.len() <= MAX_LINES);
            let mut last = 0;
            for (number, line) in lines {
                assert!(number > last, "line numbers must rise");
                last = number;
                if let Err(error) = line {
                    assert!(!error.code().is_empty() && !error.to_string().is_empty());
                    assert_eq!(error.status().0, 400);
                }
            }
        }
        Err(error) => assert_eq!(error.code(), "too_many_lines"),
    }
});
