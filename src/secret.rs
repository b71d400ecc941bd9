//! Types that carry secrets in and out of the guard: the crate's one vocabulary for
//! secrets, built on `secrecy` (as the PINs are: [`secrecy::SecretString`]).
//!
//! None of them implements `Clone`, `Serialize` or a derived `Debug`: a secret is moved,
//! never copied by accident, and printing one shows only its length. Memory is zeroized
//! on drop (`secrecy` boxes zeroize). `Zeroizing<T>` alone is not enough for a type
//! that leaves the crate: it forwards `Debug`, so each type here writes its own.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox, SecretSlice};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// Secret bytes: zeroized on drop, redacted in `Debug`, never cloned implicitly.
pub struct SecretBytes(SecretSlice<u8>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are zeroized when this value is dropped. The
    /// bytes move into an exactly-sized box (shrinking a `Vec` in place could free its
    /// old buffer unwiped); the `Vec` itself is zeroized, spare capacity included.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self::from_slice(&Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new secret. The caller stays responsible for its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        SecretBytes(SecretSlice::from(bytes.to_vec()))
    }

    /// The secret itself. Keep the borrow short and do not copy it into plain memory.
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// The secret as UTF-8, if it is valid UTF-8.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(self.expose()).ok()
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    /// An explicit copy, for the rare caller that needs two owners.
    pub fn duplicate(&self) -> Self {
        Self::from_slice(self.expose())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl From<String> for SecretBytes {
    fn from(s: String) -> Self {
        Self::new(s.into_bytes())
    }
}

/// Well-known token-set field names.
pub mod field {
    /// OAuth 2.0 access token.
    pub const ACCESS_TOKEN: &str = "access_token";
    /// OAuth 2.0 refresh token.
    pub const REFRESH_TOKEN: &str = "refresh_token";
    /// OpenID Connect ID token.
    pub const ID_TOKEN: &str = "id_token";
    /// A bare `token` (GitHub App installation tokens): the access token of a set
    /// that has no `access_token`.
    pub const TOKEN: &str = "token";
}

/// A set of named secret fields, as an OAuth token response carries
/// (`access_token`, `refresh_token`, `id_token`, …). Field names are not secret;
/// values are. Fields keep a canonical (sorted) order.
#[derive(Default)]
pub struct TokenSet {
    fields: Vec<(String, SecretBytes)>,
}

impl TokenSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// An explicit copy, for the rare caller that needs two owners.
    pub fn duplicate(&self) -> Self {
        TokenSet { fields: self.fields.iter().map(|(k, v)| (k.clone(), v.duplicate())).collect() }
    }

    /// Sets `name` to `value`, replacing any earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: SecretBytes) {
        let name = name.into();
        match self.fields.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (name, value)),
        }
    }

    /// Builder form of [`TokenSet::insert`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<SecretBytes>) -> Self {
        self.insert(name, value.into());
        self
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&SecretBytes> {
        self.fields.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok().map(|i| &self.fields[i].1)
    }

    /// Removes and returns `name`.
    pub fn remove(&mut self, name: &str) -> Option<SecretBytes> {
        self.fields.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok().map(|i| self.fields.remove(i).1)
    }

    /// The field names, sorted.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_str())
    }

    /// Fields as (name, value), sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretBytes)> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the set has no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet").field("fields", &self.field_names().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// The secret part of a stored token.
#[derive(Debug)]
pub enum Secret {
    /// An opaque secret: an API key, a bot token, a password.
    Raw(SecretBytes),
    /// Named fields, typically an OAuth token set.
    TokenSet(TokenSet),
}

impl Secret {
    /// A raw secret from bytes.
    pub fn raw(bytes: impl Into<SecretBytes>) -> Self {
        Secret::Raw(bytes.into())
    }

    /// The field `name` of a token set, or the whole raw secret when `name` is `None`.
    /// A raw secret has no named fields; a token set without a name yields its
    /// `access_token` (or its `token`, when it has no `access_token`).
    pub fn field(&self, name: Option<&str>) -> Option<&SecretBytes> {
        match (self, name) {
            (Secret::Raw(s), None) => Some(s),
            (Secret::Raw(_), Some(_)) => None,
            (Secret::TokenSet(t), None) => t.get(field::ACCESS_TOKEN).or_else(|| t.get(field::TOKEN)),
            (Secret::TokenSet(t), Some(n)) => t.get(n),
        }
    }

    /// Plaintext encoding sealed inside a record (docs/FORMAT.md §plaintext).
    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.encoded_len()));
        match self {
            Secret::Raw(s) => {
                out.push(PLAINTEXT_RAW);
                out.extend_from_slice(s.expose());
            }
            Secret::TokenSet(t) => {
                out.push(PLAINTEXT_TOKEN_SET);
                out.extend_from_slice(&len_prefix(t.len()));
                for (name, value) in t.iter() {
                    out.extend_from_slice(&len_prefix(name.len()));
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(&len_prefix(value.len()));
                    out.extend_from_slice(value.expose());
                }
            }
        }
        out
    }

    fn encoded_len(&self) -> usize {
        1 + match self {
            Secret::Raw(s) => s.len(),
            Secret::TokenSet(t) => 4 + t.iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>(),
        }
    }

    /// Inverse of [`Secret::encode`]. Only ever called on authenticated plaintext, so a
    /// failure means a bug or a forged-but-authentic record; either way it is reported
    /// as an integrity failure.
    pub(crate) fn decode(mut bytes: Zeroizing<Vec<u8>>) -> Result<Self> {
        let bad = || Error::integrity("decoding a sealed secret");
        let kind = *bytes.first().ok_or_else(bad)?;
        match kind {
            PLAINTEXT_RAW => {
                bytes.remove(0);
                let v = std::mem::take(&mut *bytes);
                Ok(Secret::Raw(SecretBytes::new(v)))
            }
            PLAINTEXT_TOKEN_SET => {
                let mut r = crate::codec::Reader::new(&bytes[1..]);
                let n = r.u32().map_err(|_| bad())?;
                let mut set = TokenSet::new();
                for _ in 0..n {
                    let name = r.str().map_err(|_| bad())?.to_owned();
                    let value = SecretBytes::from_slice(r.bytes().map_err(|_| bad())?);
                    set.insert(name, value);
                }
                r.finish().map_err(|_| bad())?;
                bytes.zeroize();
                Ok(Secret::TokenSet(set))
            }
            _ => Err(bad()),
        }
    }
}

/// A `u32` big-endian length or count, as the codec writes them. Secrets are bounded
/// at 64 KiB long before a `u32` could overflow; a larger value saturates and the
/// strict decoder rejects the result.
fn len_prefix(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

const PLAINTEXT_RAW: u8 = 0x01;
const PLAINTEXT_TOKEN_SET: u8 = 0x02;

/// A 256-bit data-encryption key in the clear, only ever in memory: no `Clone`, no
/// `Debug` of its bytes, zeroized on drop. Public so that a [`crate::root::RootKey`]
/// can be implemented outside this crate; the guard never hands one to a caller.
pub struct DekMaterial(SecretBox<[u8; 32]>);

impl DekMaterial {
    /// Copies exactly 32 bytes; any other length is an integrity failure.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            return Err(Error::integrity("unwrapping a data key"));
        }
        Ok(DekMaterial(SecretBox::init_with_mut(|k: &mut [u8; 32]| k.copy_from_slice(bytes))))
    }

    /// A fresh key from the operating system's CSPRNG, drawn straight into the
    /// zeroizing box.
    pub fn random() -> Result<Self> {
        let mut out = Ok(());
        let k = SecretBox::init_with_mut(|k: &mut [u8; 32]| out = crate::crypto::fill_random(k));
        out.map(|()| DekMaterial(k))
    }

    /// The key bytes, for a root to wrap.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for DekMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DekMaterial([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secret_bytes() {
        let s = Secret::TokenSet(
            TokenSet::new()
                .with("access_token", "ghp_SUPERSECRET".to_string())
                .with("refresh_token", "r-SUPERSECRET".to_string()),
        );
        let dbg = format!("{s:?} {:?}", SecretBytes::from_slice(b"SUPERSECRET"));
        assert!(!dbg.contains("SUPERSECRET"), "{dbg}");
        assert!(dbg.contains("access_token"));
    }

    #[test]
    fn plaintext_round_trips() {
        let s = Secret::TokenSet(
            TokenSet::new().with("refresh_token", "r".to_string()).with("access_token", "a".to_string()),
        );
        let enc = s.encode();
        let back = Secret::decode(enc).expect("decode");
        assert_eq!(back.field(Some("refresh_token")).map(|v| v.expose()), Some(&b"r"[..]));
        assert_eq!(back.field(None).map(|v| v.expose()), Some(&b"a"[..]));

        let raw = Secret::raw(b"xyz".to_vec());
        let back = Secret::decode(raw.encode()).expect("decode");
        assert_eq!(back.field(None).map(|v| v.expose()), Some(&b"xyz"[..]));
        assert!(back.field(Some("access_token")).is_none());
    }
}
