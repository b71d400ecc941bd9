//! Known-answer vectors for every primitive tokenguard runs in software: AES-256-GCM
//! (the record seal), AES-KW / AES-KWP (the soft root, and what PKCS#11 wraps must
//! equal), HMAC-SHA256 (audit chain, backup MAC, sub-key derivation).
#![allow(clippy::unwrap_used)]

use aes_gcm::aead::{Aead, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

fn h(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 14-16 (AES-256).
#[test]
fn aes_256_gcm_nist_vectors() {
    let cases = [
        // (key, iv, pt, aad, ct, tag)
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "00000000000000000000000000000000",
            "",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
            "",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
            "cafebabefacedbaddecaf888",
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];
    for (i, (k, iv, pt, aad, ct, tag)) in cases.iter().enumerate() {
        let key: [u8; 32] = h(k).try_into().unwrap();
        let cipher = Aes256Gcm::new(&key.into());
        let nonce = Nonce::from(<[u8; 12]>::try_from(h(iv)).unwrap());
        let out = cipher.encrypt(&nonce, Payload { msg: &h(pt), aad: &h(aad) }).unwrap();
        assert_eq!(out, [h(ct), h(tag)].concat(), "case {i}");
        assert_eq!(cipher.decrypt(&nonce, Payload { msg: &out, aad: &h(aad) }).unwrap(), h(pt));
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(cipher.decrypt(&nonce, Payload { msg: &bad, aad: &h(aad) }).is_err());
    }
}

/// RFC 5649 §6: AES Key Wrap with Padding (192-bit KEK, 20- and 7-octet keys).
#[test]
fn aes_kwp_rfc5649_vectors() {
    use aes_kw::KeyInit;
    let kek: [u8; 24] = h("5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8").try_into().unwrap();
    let kw = aes_kw::KwpAes192::new(&kek.into());
    for (key, wrapped) in [
        (
            "c37b7e6492584340 bed1220780894115 5068f738",
            "138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a",
        ),
        ("466f7250617369", "afbeb0f07dfbf541 9200f2ccb50bb24f"),
    ] {
        let mut out = [0u8; 64];
        assert_eq!(kw.wrap_key(&h(key), &mut out).unwrap(), h(wrapped).as_slice());
        let mut back = [0u8; 64];
        assert_eq!(kw.unwrap_key(&h(wrapped), &mut back).unwrap(), h(key).as_slice());
    }
}

/// RFC 3394 §4.6 through the soft root's own code path: the soft root wraps a DEK
/// exactly as the RFC says.
#[test]
fn soft_root_wraps_rfc3394() {
    use tokenguard::root::RootKey;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("kek");
    std::fs::write(&key, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let root = tokenguard::root::soft::SoftRoot::open(&key).unwrap();
    let dek =
        tokenguard::DekMaterial::from_slice(&h("00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f"))
            .unwrap();
    let w = root.wrap(&dek).unwrap();
    assert_eq!(w.blob, h("28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21"));
    assert_eq!(root.unwrap(&w).unwrap().expose(), dek.expose());
    let mut bad = w.clone();
    bad.blob[3] ^= 1;
    assert!(matches!(root.unwrap(&bad), Err(tokenguard::Error::Integrity { .. })));
}

/// RFC 4231 test case 2 (HMAC-SHA256).
#[test]
fn hmac_sha256_rfc4231() {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
    m.update(b"what do ya want for nothing?");
    assert_eq!(
        m.finalize().into_bytes().to_vec(),
        h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    );
}
