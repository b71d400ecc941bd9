//! The `soft` root: AES-KW (RFC 3394, aes-kw crate) under a 256-bit key in a file.
//!
//! For development, CI of code that uses the library, and as an *offline recovery*
//! root kept on removable media next to a hardware root. It is not hardware: a config
//! with `require_hardware = true` refuses it, and `doctor` flags it. The key file must
//! be mode 0600 (or stricter) and holds 32 raw bytes or 64 hex digits.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Check, RootIdentity, RootKey, WrapMechanism, Wrapped, kw_unwrap, kw_wrap};
use crate::error::{Error, Result};
use crate::secret::DekMaterial;

/// A root key held in a file.
pub struct SoftRoot {
    path: PathBuf,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SoftRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftRoot").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SoftRoot {
    /// Loads the key from `path`, refusing a file readable by group or others.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Config(format!(
                "soft root key file {} does not exist (run `tokenguard init` to create it)",
                path.display()
            )));
        }
        crate::files::check_private(path, "soft root key file")?;
        let raw = Zeroizing::new(fs::read(path).map_err(Error::io("reading", path))?);
        let key = parse_key(&raw).ok_or_else(|| {
            Error::Config(format!("soft root key file {} must hold 32 raw bytes or 64 hex digits", path.display()))
        })?;
        Ok(SoftRoot { path: path.to_owned(), key })
    }

    /// Creates a new random key file (mode 0600, never overwriting) and opens it.
    pub fn create(path: &Path) -> Result<Self> {
        let key = DekMaterial::random()?;
        crate::files::write_new_private(path, key.expose())?;
        Self::open(path)
    }

    /// Opens the key file, creating it first when it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self> {
        if path.exists() { Self::open(path) } else { Self::create(path) }
    }
}

fn parse_key(raw: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(raw);
        return Some(key);
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        key[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(key)
}

impl RootKey for SoftRoot {
    fn backend(&self) -> &'static str {
        "soft"
    }

    fn is_policy_bound(&self) -> bool {
        false
    }

    fn is_hardware(&self) -> bool {
        false
    }

    fn can_unwrap(&self) -> bool {
        true
    }

    fn identity(&self) -> Result<RootIdentity> {
        let mut h = Sha256::new();
        h.update(b"tokenguard/soft-root/fingerprint/v1");
        h.update(*self.key);
        let fp: String = h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        Ok(RootIdentity {
            backend: "soft".into(),
            description: format!("soft key file {} (fingerprint {fp})", self.path.display()),
            fingerprint: fp,
        })
    }

    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)> {
        super::generate_and_wrap(|dek| self.wrap(dek))
    }

    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped> {
        kw_wrap(&self.key, dek)
    }

    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial> {
        if wrapped.mechanism != WrapMechanism::AesKw {
            return Err(Error::integrity("unwrapping a data key"));
        }
        kw_unwrap(&self.key, wrapped.mechanism, &wrapped.blob)
    }

    fn health(&self) -> Vec<Check> {
        vec![Check::warn(
            "soft root",
            format!(
                "root key is a file ({}), not hardware: for development or an offline recovery root only",
                self.path.display()
            ),
        )]
    }
}
