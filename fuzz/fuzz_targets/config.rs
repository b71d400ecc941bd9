//! Configuration text and pkcs11: URIs (the backend's own parser).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tokenguard::root::pkcs11::Pkcs11Uri::parse(s);
        let _ = tokenguard::Config::parse(s, std::path::Path::new("/"));
    }
});
