//! The two primitives every part of the guard shares besides AES: HMAC-SHA256 (sub-key
//! derivation, the audit chain, backup MACs) and the operating system's CSPRNG. One
//! place each, so no caller can swallow a randomness failure or forget a domain label.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag.
pub(crate) const MAC_LEN: usize = 32;

fn keyed(key: &[u8; 32]) -> HmacSha256 {
    // RFC 2104 pads a key shorter than the hash block (64 bytes) with zeros: keying
    // with the padded block is the same HMAC, and infallible (no `expect`).
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(key);
    <HmacSha256 as KeyInit>::new(&(*block).into())
}

/// `HMAC-SHA256(key, part₁ ‖ part₂ ‖ …)`.
pub(crate) fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = keyed(key);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks `tag` against `HMAC-SHA256(key, data)` in constant time.
pub(crate) fn hmac_verify(key: &[u8; 32], data: &[u8], tag: &[u8]) -> bool {
    let mut m = keyed(key);
    m.update(data);
    m.verify_slice(tag).is_ok()
}

/// Sub-key derivation: `HMAC-SHA256(key, label)`, zeroized on drop.
pub(crate) fn derive(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac(key, &[label]))
}

const IK_MARKER_LABEL: &[u8] = b"tokenguard/integrity-key-marker/v1";

/// Whether `ik` carries the marker of an integrity key made by a build with the
/// authenticated store state: `HMAC-SHA256(ik, label)` begins with 12 zero bits.
/// Keyed, so it can be neither removed nor faked without the key: a store whose key
/// carries it and whose state head is gone was tampered with, not made by 0.1 (a
/// 0.1 store's random key carries it by chance once in 4,096; such a store then
/// needs `upgrade --accept-current-state`).
pub(crate) fn is_marked_integrity_key(ik: &[u8; 32]) -> bool {
    let m = hmac(ik, &[IK_MARKER_LABEL]);
    m[0] == 0 && m[1] & 0xf0 == 0
}

/// A new integrity key carrying the marker: candidates derived from one random seed
/// (each as random as the seed) until one does, 4,096 tries on average (a few ms).
pub(crate) fn new_integrity_key() -> Result<crate::secret::DekMaterial> {
    let seed = Zeroizing::new(random_array::<32>()?);
    for i in 0u64..(1 << 24) {
        let candidate = Zeroizing::new(hmac(&seed, &[b"tokenguard/integrity-key-candidate/v1", &i.to_be_bytes()]));
        if is_marked_integrity_key(&candidate) {
            return crate::secret::DekMaterial::from_slice(&candidate[..]);
        }
    }
    Err(Error::Hardware { backend: "os", operation: "drawing an integrity key", detail: "no candidate found".into() })
}

/// Fills `buf` from the OS CSPRNG. A failure is an error, never a zero buffer.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Hardware { backend: "os", operation: "getrandom", detail: e.to_string() })
}

/// `N` random bytes from the OS CSPRNG.
pub(crate) fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut a = [0u8; N];
    fill_random(&mut a)?;
    Ok(a)
}
