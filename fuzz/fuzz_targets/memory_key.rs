//! Memory key parsing, from arbitrary strings: a key either is refused as `invalid_key`, or it
//! is exactly a key's 57 characters (whose id and secret compose back to it with the
//! checksum) followed by nothing or one of the three mode suffixes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory_sidecar::auth::{compose_key, PresentedKey, KEY_LEN, KEY_PREFIX};

fuzz_target!(|text: &str| {
    match PresentedKey::parse(text) {
        Ok(key) => {
            assert!(text.is_char_boundary(KEY_LEN), "{text:?}");
            let (whole, suffix) = text.split_at(KEY_LEN);
            let id_end = KEY_PREFIX.len() + key.id.len();
            assert_eq!(&whole[KEY_PREFIX.len()..id_end], key.id);
            let secret = &whole[id_end..KEY_LEN - 6];
            assert_eq!(compose_key(&key.id, secret), whole);
            assert!(
                matches!(suffix, "" | ":read" | ":write" | ":off"),
                "{suffix:?}"
            );
        }
        Err(error) => assert_eq!(error.code(), "invalid_key"),
    }
});
