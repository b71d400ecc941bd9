//! Imported backup files.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tokenguard::backup::check_structure(data);
});
