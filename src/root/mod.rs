//! The root-key seam: one narrow trait that every backend implements entirely.
//!
//! A root key (KEK) never leaves its hardware. The guard asks it for four things only:
//! who it is ([`RootKey::identity`]), a fresh wrapped DEK ([`RootKey::generate_dek`]),
//! to wrap an existing DEK ([`RootKey::wrap`], for a second root or a root rotation)
//! and to unwrap one ([`RootKey::unwrap`]); plus a health report for `doctor`. There
//! are no "not supported" defaults: a backend that cannot do one of these is not a
//! root. The one exception is explicit: an `age` escrow root whose identity is offline
//! wraps but cannot unwrap, and says so ([`RootKey::can_unwrap`]). Every wrapped blob
//! records the mechanism that produced it ([`WrapMechanism`]), so a store says how to
//! open each key.

use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::secret::DekMaterial;

pub mod age;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod soft;
#[cfg(feature = "tpm")]
pub mod tpm;

/// How a DEK was wrapped; stored with every wrapped blob (docs/FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum WrapMechanism {
    /// AES Key Wrap, RFC 3394 (PKCS#11 `CKM_AES_KEY_WRAP`, 0x2109; software: aes-kw).
    AesKw,
    /// SoftHSM2's `CKM_AES_KEY_WRAP_PAD` (0x210A); equals RFC 5649 for 32-byte keys.
    AesKwPadSofthsm,
    /// AES Key Wrap with Padding, RFC 5649 (`CKM_AES_KEY_WRAP_KWP`, 0x210B).
    AesKwp,
    /// AES-256-GCM encryption of the key bytes in the token (`CKM_AES_GCM`); blob is
    /// `iv(12) ‖ ciphertext ‖ tag(16)`. Last resort for tokens without key wrap.
    AesGcm,
    /// A TPM 2.0 sealed data object (public ‖ private parts), no authorisation value.
    TpmSealed,
    /// A TPM 2.0 sealed data object whose authorisation value is derived from the
    /// root's PIN (docs/FORMAT.md §"TPM authorisation value"): unsealing needs it.
    TpmSealedAuth,
    /// An age v1 file (age-encryption.org/v1, binary) to the root's one X25519
    /// recipient, of the key bytes and their 32-byte tag under the root's
    /// authentication key: `age -d -i IDENTITY` opens it (docs/FORMAT.md).
    Age,
}

impl WrapMechanism {
    /// Code stored in the wrapped-key encoding.
    pub fn code(self) -> u16 {
        match self {
            WrapMechanism::AesKw => 1,
            WrapMechanism::AesKwPadSofthsm => 2,
            WrapMechanism::AesKwp => 3,
            WrapMechanism::AesGcm => 4,
            WrapMechanism::TpmSealed => 5,
            WrapMechanism::TpmSealedAuth => 6,
            WrapMechanism::Age => 7,
        }
    }

    /// Inverse of [`WrapMechanism::code`].
    pub fn from_code(c: u16) -> Option<Self> {
        Some(match c {
            1 => WrapMechanism::AesKw,
            2 => WrapMechanism::AesKwPadSofthsm,
            3 => WrapMechanism::AesKwp,
            4 => WrapMechanism::AesGcm,
            5 => WrapMechanism::TpmSealed,
            6 => WrapMechanism::TpmSealedAuth,
            7 => WrapMechanism::Age,
            _ => return None,
        })
    }
}

impl fmt::Display for WrapMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WrapMechanism::AesKw => "AES-KW (RFC 3394)",
            WrapMechanism::AesKwPadSofthsm => "AES-KW-PAD (SoftHSM 0x210A)",
            WrapMechanism::AesKwp => "AES-KWP (RFC 5649)",
            WrapMechanism::AesGcm => "AES-GCM encrypt",
            WrapMechanism::TpmSealed => "TPM2 sealed object",
            WrapMechanism::TpmSealedAuth => "TPM2 sealed object with authorisation value",
            WrapMechanism::Age => "age X25519 (age-encryption.org/v1)",
        })
    }
}

/// A DEK wrapped by one root.
#[derive(Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// How it was wrapped.
    pub mechanism: WrapMechanism,
    /// The wrapped bytes (not secret without the root).
    pub blob: Vec<u8>,
}

impl fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wrapped").field("mechanism", &self.mechanism).field("blob_len", &self.blob.len()).finish()
    }
}

/// The identity of a root key, pinned in the store at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootIdentity {
    /// Backend: `pkcs11`, `tpm`, `soft` or `age`.
    pub backend: String,
    /// Stable identifier compared at open (token serial and key id/label; TPM key
    /// Name; soft key fingerprint). Not secret.
    pub fingerprint: String,
    /// Human description for messages.
    pub description: String,
}

impl RootIdentity {
    /// `"backend:fingerprint"`, the form stored and compared.
    pub fn pin(&self) -> String {
        format!("{}:{}", self.backend, self.fingerprint)
    }
}

/// Marker in a pin of a root that depends on platform state (see
/// [`RootKey::is_policy_bound`]).
pub const POLICY_BOUND_MARKER: &str = ";pcr=";

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Passed.
    Ok,
    /// Works, but not as production should (e.g. a soft root).
    Warn,
    /// Failed: `doctor` exits non-zero.
    Fail,
}

/// What kind of failure a failed check reports: it decides `doctor`'s exit code
/// (the most serious class among the failures wins), never the check's name. The
/// order of the variants is that seriousness, least first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    /// Anything else (permissions, I/O): exit 1.
    Other,
    /// Invalid input: exit 2.
    Usage,
    /// Something named does not exist (e.g. no store): exit 3.
    NotFound,
    /// Expired or revoked: exit 7.
    Expired,
    /// The store is held by another process: exit 6.
    Busy,
    /// Configuration: exit 8.
    Config,
    /// Hardware or authentication: exit 5.
    Hardware,
    /// Tampering, corruption or a wrong root: exit 4.
    Integrity,
}

impl FailureClass {
    const CODES: [(FailureClass, i32); 8] = {
        use crate::error::exit;
        [
            (FailureClass::Other, exit::OTHER),
            (FailureClass::Usage, exit::USAGE),
            (FailureClass::NotFound, exit::NOT_FOUND),
            (FailureClass::Expired, exit::EXPIRED),
            (FailureClass::Busy, exit::BUSY),
            (FailureClass::Config, exit::CONFIG),
            (FailureClass::Hardware, exit::HARDWARE),
            (FailureClass::Integrity, exit::INTEGRITY),
        ]
    };

    /// The class of a library error.
    pub fn of(e: &Error) -> Self {
        let code = e.exit_code();
        Self::CODES.iter().find(|(_, c)| *c == code).map_or(FailureClass::Other, |(f, _)| *f)
    }

    /// The CLI exit code of this class.
    pub fn exit_code(self) -> i32 {
        Self::CODES.iter().find(|(f, _)| *f == self).map_or(crate::error::exit::OTHER, |(_, c)| *c)
    }
}

/// One line of a health report.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Pass, warning or failure.
    pub status: Status,
    /// Detail or advice.
    pub detail: String,
    /// For a failure, what kind of failure it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureClass>,
}

impl Check {
    /// A passed (`ok = true`) or failed check; a failure of class
    /// [`FailureClass::Other`].
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        if ok { Self::pass(name, detail) } else { Self::fail(name, FailureClass::Other, detail) }
    }

    /// A passed check.
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Ok, detail: detail.into(), failure: None }
    }

    /// A failed check of class `class`.
    pub fn fail(name: impl Into<String>, class: FailureClass, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Fail, detail: detail.into(), failure: Some(class) }
    }

    /// A failed check reporting `e`, classed by the error.
    pub fn error(name: impl Into<String>, e: &Error) -> Self {
        Self::fail(name, FailureClass::of(e), e.to_string())
    }

    /// A warning.
    pub fn warn(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Warn, detail: detail.into(), failure: None }
    }
}

/// The exit code of a report: 0 with no failure, else that of its most serious one.
pub fn report_exit_code(checks: &[Check]) -> i32 {
    checks.iter().filter_map(|c| c.failure).max().map_or(crate::error::exit::OK, FailureClass::exit_code)
}

/// A root key-encryption key. Implemented by every backend, entirely.
pub trait RootKey: Send + Sync + fmt::Debug {
    /// Backend name (`pkcs11`, `tpm`, `soft`, `age`).
    fn backend(&self) -> &'static str;

    /// Whether the key lives in hardware (false for `soft` and `age`).
    fn is_hardware(&self) -> bool;

    /// Whether this process can unwrap with it. False only for a *wrap-only* root: an
    /// `age` root whose identity is offline, which wraps every new key for a later
    /// recovery. The guard never asks such a root to unwrap (nor to check a fresh
    /// wrap), and never opens a store with it.
    fn can_unwrap(&self) -> bool;

    /// The identity pinned in the store.
    fn identity(&self) -> Result<RootIdentity>;

    /// A new random 256-bit DEK (generated by the hardware where it can), and its
    /// wrapping under this root.
    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)>;

    /// Wraps an existing DEK under this root.
    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped>;

    /// Unwraps a DEK. Any failure that could mean a wrong key or a modified blob is
    /// [`Error::Integrity`].
    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial>;

    /// Checks for `doctor`: key attributes, reachability, policy.
    fn health(&self) -> Vec<Check>;

    /// Whether only the holder of this root's secret can make a wrap that it opens:
    /// true for key-wrap and sealing roots; false for a public-key root (`age`), whose
    /// wraps anyone who knows the recipient can make. The guard never lets such a
    /// root open a store whose authenticated roots refused it.
    fn wraps_authenticate(&self) -> bool {
        true
    }

    /// Whether this root can unwrap only for now, with an identity rebuilt from
    /// custodians' shares in this process (`recovery combine … -- COMMAND`): it does
    /// not count as a way into the store for the configurations that run afterwards
    /// (`root remove` never leaves only such roots). False unless so.
    fn recovery_only(&self) -> bool {
        false
    }

    /// Whether opening depends on volatile platform state (TPM PCRs): such a root
    /// can be locked out by a firmware update and is never allowed to be the only one.
    fn is_policy_bound(&self) -> bool;

    /// The hardware monotonic counter this root offers the store (a TPM NV counter, a
    /// PKCS#11 data object), when one is configured: the one thing that lets a store
    /// see that a whole older copy of itself was put back. A capability, not part of
    /// being a root: `None` unless configured.
    fn counter(&self) -> Option<&dyn MonotonicCounter> {
        None
    }
}

/// A counter in hardware that only moves forward (for those who cannot use the root
/// key), read and advanced by the store around every commit (docs/DESIGN-NOTES.md
/// §"Whole-store rollback").
pub trait MonotonicCounter: Send + Sync {
    /// The counter's identity, stored in the store and compared at every open (a
    /// different TPM or token, or another index, is another counter).
    fn counter_id(&self) -> Result<String>;

    /// The counter's value; `None` when it does not exist (yet).
    fn read_counter(&self) -> Result<Option<u64>>;

    /// Makes the counter when it does not exist; returns its value.
    fn create_counter(&self) -> Result<u64>;

    /// Adds one if the counter is at `from`, and returns the value it has now: a
    /// retry after a lost response finds it at `from + 1` and adds nothing, so an
    /// increment is never applied twice.
    fn increment_counter(&self, from: u64) -> Result<u64>;
}

/// A DEK for a root that wraps in software (soft, age): drawn from the OS CSPRNG,
/// then wrapped by `wrap`.
pub(crate) fn generate_and_wrap(wrap: impl FnOnce(&DekMaterial) -> Result<Wrapped>) -> Result<(DekMaterial, Wrapped)> {
    let dek = DekMaterial::random()?;
    let wrapped = wrap(&dek)?;
    Ok((dek, wrapped))
}

/// The software AES-KW unwrap shared by the soft root and the conformance tests.
pub(crate) fn kw_unwrap(kek: &[u8; 32], mechanism: WrapMechanism, blob: &[u8]) -> Result<DekMaterial> {
    use aes_kw::KeyInit;
    let mut out = zeroize::Zeroizing::new([0u8; 40]);
    let bad = |_| Error::integrity("unwrapping a data key");
    let key = match mechanism {
        WrapMechanism::AesKw => {
            let kw = aes_kw::KwAes256::new(kek.into());
            kw.unwrap_key(blob, &mut out[..]).map_err(bad)?
        }
        WrapMechanism::AesKwp | WrapMechanism::AesKwPadSofthsm => {
            let kw = aes_kw::KwpAes256::new(kek.into());
            kw.unwrap_key(blob, &mut out[..]).map_err(bad)?
        }
        _ => return Err(Error::integrity("unwrapping a data key")),
    };
    DekMaterial::from_slice(key)
}

/// Software AES-KW wrap (RFC 3394) of a 32-byte key.
pub(crate) fn kw_wrap(kek: &[u8; 32], dek: &DekMaterial) -> Result<Wrapped> {
    use aes_kw::KeyInit;
    let kw = aes_kw::KwAes256::new(kek.into());
    let mut out = [0u8; 40];
    let blob = kw.wrap_key(dek.expose(), &mut out).map_err(|_| Error::integrity("wrapping a data key"))?;
    Ok(Wrapped { mechanism: WrapMechanism::AesKw, blob: blob.to_vec() })
}
