//! The strict body parser on arbitrary text: never panics, accepts only what serde_json
//! accepts and reads it the same way, and never accepts an object with a key twice.
#![no_main]

use authz_sidecar::authz::strict_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(strict) = strict_json::parse(text) {
        let plain: serde_json::Value =
            serde_json::from_str(text).expect("strict accepted what serde_json refuses");
        assert_eq!(strict, plain, "{text:?} read two ways");
    }
});
