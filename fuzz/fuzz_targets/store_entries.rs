//! Every other decoder of bytes read from the store: DEK entries, pinned roots, the
//! wrapped integrity key, tombstones, audit entries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tokenguard::store::DekEntry::decode(data);
    let _ = tokenguard::store::decode_roots(data);
    let _ = tokenguard::store::decode_wrapped_key(data);
    let _ = tokenguard::store::Tombstone::decode(data);
    let _ = tokenguard::audit::decode_entry(data);
});
