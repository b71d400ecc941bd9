//! TPM 2.0 root (feature `tpm`): each DEK is a TPM2 sealed data object under a
//! storage primary key that never leaves the TPM, through tss-esapi 7 and the system
//! libtss2.
//!
//! - **Storage key**: ECC P-256 (a simulator creates it ~40x faster than RSA-2048),
//!   restricted decrypt, under the owner hierarchy, made persistent at a configurable
//!   handle so a process start does not pay CreatePrimary. The guard never evicts or
//!   overwrites a persistent object it did not create: an occupied handle is adopted
//!   only if recreating our template gives the same Name.
//! - **Identity**: the storage key's Name (a digest of its public area), pinned in the
//!   store. A cleared or different TPM has a different owner seed, so a different
//!   Name: the store refuses it (exit 4) and changes nothing.
//! - **Seal / unseal**: TPM2_Create of a keyed-hash object holding the DEK; Load +
//!   Unseal + FlushContext. TPM2_EncryptDecrypt is not used (optional on real TPMs).
//!   Every transient object is flushed: a TPM without a resource manager has ~3 slots.
//! - **Parameter encryption** (default on): commands that carry a DEK run in an HMAC
//!   session salted with the storage key, AES-128-CFB, so the DEK never crosses the
//!   bus in the clear. Its cost is measured in the README.
//! - **Optional PCR policy**: the sealed object's auth policy is PolicyPCR over the
//!   configured bank and PCRs, computed at seal time. Unsealing after the PCRs changed
//!   fails with a clear error (exit 5). A PCR-bound root is never the only root.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{NvIndexType, SessionType};
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Digest, EccParameter, EccPoint, KeyedHashScheme, NvPublicBuilder, PcrSelectionList, PcrSelectionListBuilder,
    PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

use super::{Check, MonotonicCounter, RootIdentity, RootKey, WrapMechanism, Wrapped};
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};
use crate::secret::DekMaterial;

const BACKEND: &str = "tpm";

/// Default persistent handle: deliberately not 0x81000001, the default of other TPM
/// tools.
pub const DEFAULT_PERSISTENT_HANDLE: u32 = 0x8100_0A10;

/// The authorisation value of the sealed objects, derived from the root's PIN
/// (docs/FORMAT.md §"TPM authorisation value"). Zeroized on drop; `Debug` shows nothing.
#[derive(Clone)]
pub struct TpmAuth(Zeroizing<[u8; 32]>);

impl TpmAuth {
    /// `SHA-256("tokenguard/tpm-auth/v1" ‖ pin)`: a fixed-size value (a TPM limits an
    /// authorisation value to its name-hash size), whatever the PIN's length.
    pub fn from_pin(pin: &secrecy::SecretString) -> Self {
        use secrecy::ExposeSecret;
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"tokenguard/tpm-auth/v1");
        h.update(pin.expose_secret().as_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&h.finalize());
        TpmAuth(out)
    }

    fn auth(&self) -> Result<Auth> {
        Auth::try_from(self.0.to_vec()).map_err(|e| hw("authorisation value", e))
    }

    /// The rollback counter's own value, `HMAC-SHA256(auth, "tokenguard/tpm-nv-auth/v1")`,
    /// so that the counter's authorisation reveals nothing about the sealed keys'.
    fn nv_auth(&self) -> Result<Auth> {
        use hmac::Mac;
        let mut m = <hmac::Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(self.0.as_slice())
            .map_err(|_| nv_error_text("deriving the counter's authorisation value"))?;
        m.update(b"tokenguard/tpm-nv-auth/v1");
        Auth::try_from(m.finalize().into_bytes().to_vec()).map_err(|e| hw("authorisation value", e))
    }
}

impl fmt::Debug for TpmAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TpmAuth(..)")
    }
}

/// Settings of a TPM root.
#[derive(Debug, Clone)]
pub struct TpmSettings {
    /// TCTI as tpm2-tools spell it (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`).
    pub tcti: String,
    /// Persistent handle of the storage key.
    pub persistent_handle: u32,
    /// Salted, encrypted sessions for commands that carry a DEK.
    pub parameter_encryption: bool,
    /// PCR policy: bank and PCR indices; `None` for no policy.
    pub pcrs: Option<(HashingAlgorithm, Vec<u8>)>,
    /// The sealed objects' authorisation value (from `pin_source`); `None`: none.
    pub auth: Option<TpmAuth>,
    /// NV index of the store's rollback counter (`nv_counter`); `None`: none.
    pub nv_counter: Option<u32>,
}

impl TpmSettings {
    /// Settings from a `[[roots]]` tpm entry. The TCTI defaults to `TPM2TOOLS_TCTI`,
    /// then `device:/dev/tpmrm0`; PCR indices must name real PCRs (0–23). A
    /// `pin_source` is read now (relative `file:` paths against `base_dir`).
    pub fn from_config(t: &crate::config::TpmConfig, base_dir: &std::path::Path) -> Result<Self> {
        let tcti = t
            .tcti
            .clone()
            .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
            .unwrap_or_else(|| "device:/dev/tpmrm0".into());
        let persistent_handle = match &t.persistent_handle {
            Some(h) => u32::from_str_radix(h.trim_start_matches("0x"), 16)
                .map_err(|_| Error::Config(format!("persistent_handle {h:?} must be hex, e.g. \"0x81000a10\"")))?,
            None => DEFAULT_PERSISTENT_HANDLE,
        };
        if let Some(p) = t.pcrs.iter().find(|p| **p >= PCR_COUNT) {
            return Err(Error::Config(format!(
                "pcrs: PCR {p} does not exist (a TPM 2.0 has PCRs 0-{})",
                PCR_COUNT - 1
            )));
        }
        let bank = match t.pcr_bank {
            crate::config::PcrBank::Sha256 => HashingAlgorithm::Sha256,
            crate::config::PcrBank::Sha1 => HashingAlgorithm::Sha1,
        };
        Ok(TpmSettings {
            tcti,
            persistent_handle,
            parameter_encryption: t.parameter_encryption.unwrap_or(true),
            pcrs: (!t.pcrs.is_empty()).then(|| (bank, t.pcrs.clone())),
            nv_counter: match &t.nv_counter {
                Some(h) => Some(
                    u32::from_str_radix(h.trim_start_matches("0x"), 16)
                        .ok()
                        .filter(|v| (NV_OWNER_FIRST..=NV_OWNER_LAST).contains(v))
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "nv_counter {h:?} must be an owner NV index in hex, {NV_OWNER_FIRST:#x}-{NV_OWNER_LAST:#x}"
                            ))
                        })?,
                ),
                None => None,
            },
            auth: match &t.pin_source {
                // In the clear, the value would cross the bus at every unseal, and a
                // PolicyAuthValue HMAC in an unsalted session lets a listener guess
                // the PIN offline.
                Some(_) if t.parameter_encryption == Some(false) => {
                    return Err(Error::Config(
                        "pin_source needs parameter_encryption = true (the authorisation value would cross the TPM \
                         bus in the clear)"
                            .into(),
                    ));
                }
                Some(src) => Some(TpmAuth::from_pin(&crate::pin::resolve_pin(src, base_dir)?)),
                None => None,
            },
        })
    }
}

/// PCRs a TPM 2.0 has (PC Client profile).
const PCR_COUNT: u8 = 24;

/// The NV index range the TCG registry leaves to the owner.
const NV_OWNER_FIRST: u32 = 0x0180_0000;
const NV_OWNER_LAST: u32 = 0x01BF_FFFF;

/// The TPM root key.
pub struct TpmRoot {
    settings: TpmSettings,
    ctx: Mutex<Context>,
    srk: Mutex<KeyHandle>,
    name: Vec<u8>,
    /// The storage key is a transient object of ours (nothing was persisted): flushed on drop.
    transient: bool,
    /// The kept parameter-encryption session (see `session`).
    hmac: Mutex<Option<AuthSession>>,
}

impl Drop for TpmRoot {
    fn drop(&mut self) {
        if let Some(s @ AuthSession::HmacSession(_)) = self.hmac.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let h: tss_esapi::handles::SessionHandle = s.into();
            let _ = self.ctx.lock().unwrap_or_else(|p| p.into_inner()).flush_context(ObjectHandle::from(h));
        }
        if self.transient {
            let srk = *self.srk.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self.ctx.lock().unwrap_or_else(|p| p.into_inner()).flush_context(srk.into());
        }
    }
}

impl fmt::Debug for TpmRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmRoot").field("settings", &self.settings).field("name", &hex(&self.name)).finish()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hw(operation: &'static str, e: tss_esapi::Error) -> Error {
    Error::Hardware { backend: BACKEND, operation, detail: e.to_string() }
}

fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        _ => None,
    }
}

/// Errors of Load/Unseal that mean "this blob is not ours or was modified".
fn unseal_error(e: tss_esapi::Error) -> Error {
    use Tss2ResponseCodeKind as K;
    match kind(&e) {
        Some(K::AuthFail | K::BadAuth) => Error::Auth {
            backend: BACKEND,
            detail: "the TPM refused the authorisation value of a sealed data key: check the PIN named by \
                     pin_source; every failure counts towards the TPM's dictionary-attack lockout"
                .into(),
        },
        Some(K::Lockout) => Error::Auth {
            backend: BACKEND,
            detail: "the TPM is in dictionary-attack lockout after failed authorisations; wait for its recovery \
                     time or reset it with the lockout authorisation (tpm2_dictionarylockout)"
                .into(),
        },
        Some(K::PolicyFail | K::Pcr | K::PcrChanged) => Error::Hardware {
            backend: BACKEND,
            operation: "unsealing a data key",
            detail: "the PCR values differ from the policy the key was sealed to (firmware or boot change?); \
                     open the store with another root and re-seal (README: TPM 2.0 root)"
                .into(),
        },
        Some(
            K::Integrity
            | K::Size
            | K::Value
            | K::Key
            | K::Hash
            | K::Asymmetric
            | K::Symmetric
            | K::KeySize
            | K::Type
            | K::Mode
            | K::Attributes
            | K::Binding
            | K::Insufficient
            | K::Sensitive
            | K::Scheme,
        ) => Error::integrity("unsealing a data key"),
        _ => hw("unsealing a data key", e),
    }
}

/// The storage key template: ECC P-256, restricted decrypt, AES-128-CFB for children.
fn srk_template() -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .with_no_da(true)
        .build()
        .map_err(|e| hw("building the storage key template", e))?;
    // A unique value of our own: our template yields a key of our own under the same
    // seed, distinct from other tools' default SRKs.
    let marker = EccParameter::try_from(b"tokenguard-storage-key-v1".to_vec()).map_err(|e| hw("template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| hw("template", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::new(marker, EccParameter::default()))
        .build()
        .map_err(|e| hw("building the storage key template", e))
}

/// The template of a sealed DEK. With an authorisation value the object is subject to
/// the TPM's dictionary-attack protection (the PIN-retry limit a PKCS#11 token has);
/// without one there is nothing to guess.
fn sealed_template(policy: Option<Digest>, with_auth: bool) -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(!with_auth)
        // With a PCR policy, the policy is the only way in.
        .with_user_with_auth(policy.is_none())
        .build()
        .map_err(|e| hw("building the sealed-object template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| hw("building the sealed-object template", e))
}

fn pcr_selection(bank: HashingAlgorithm, pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots: Vec<PcrSlot> = pcrs
        .iter()
        .map(|p| {
            // A shift past 31 would wrap; PCRs past 23 do not exist.
            (*p < PCR_COUNT)
                .then(|| 1u32.checked_shl(u32::from(*p)))
                .flatten()
                .and_then(|bit| PcrSlot::try_from(bit).ok())
                .ok_or_else(|| Error::Config(format!("PCR {p} is not a valid PCR index (0-23)")))
        })
        .collect::<Result<_>>()?;
    PcrSelectionListBuilder::new().with_selection(bank, &slots).build().map_err(|e| hw("PCR selection", e))
}

fn connect(tcti: &str) -> Result<Context> {
    let conf = TctiNameConf::from_str(tcti).map_err(|_| {
        Error::Config(format!("TCTI {tcti:?} is not valid (device:/dev/tpmrm0, swtpm:host=H,port=P, tabrmd:)"))
    })?;
    Context::new(conf).map_err(|e| Error::Hardware {
        backend: BACKEND,
        operation: "connecting to the TPM",
        detail: format!("{tcti}: {e}"),
    })
}

/// A connection with the storage key found (or derived transiently).
struct Attached {
    ctx: Context,
    srk: KeyHandle,
    name: Vec<u8>,
    transient: bool,
}

/// Connects and finds the persisted storage key (`create`: makes it if absent).
fn attach(settings: &TpmSettings, create: bool) -> Result<Attached> {
    let mut ctx = connect(&settings.tcti)?;
    let handle = PersistentTpmHandle::new(settings.persistent_handle).map_err(|_| {
        Error::Config(format!("{:#x} is not a persistent handle (0x81xxxxxx)", settings.persistent_handle))
    })?;
    let template = srk_template()?;
    let existing = ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(handle)));
    let srk: KeyHandle = match existing {
        Ok(obj) => {
            let key = KeyHandle::from(obj);
            if create {
                // Adopt only a key that is ours: same template, same seed, same Name.
                let (_, name, _) =
                    ctx.execute_without_session(|c| c.read_public(key)).map_err(|e| hw("TPM2_ReadPublic", e))?;
                let primary = ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.create_primary(Hierarchy::Owner, template.clone(), None, None, None, None)
                    })
                    .map_err(|e| hw("TPM2_CreatePrimary", e))?;
                let (_, ours, _) = ctx
                    .execute_without_session(|c| c.read_public(primary.key_handle))
                    .map_err(|e| hw("TPM2_ReadPublic", e))?;
                let _ = ctx.flush_context(primary.key_handle.into());
                if ours.value() != name.value() {
                    return Err(Error::Config(format!(
                        "persistent handle {:#x} holds an object tokenguard did not create; it is left untouched. \
                             Choose another persistent_handle in the config",
                        settings.persistent_handle
                    )));
                }
            }
            key
        }
        Err(_) if create => {
            let primary = ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                })
                .map_err(|e| hw("TPM2_CreatePrimary", e))?;
            let persisted = ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(Provision::Owner, primary.key_handle.into(), Persistent::Persistent(handle))
                })
                .map_err(|e| hw("TPM2_EvictControl (persisting the storage key)", e))?;
            let _ = ctx.flush_context(primary.key_handle.into());
            tracing::info!(
                backend = BACKEND,
                handle = settings.persistent_handle,
                "created and persisted the storage key"
            );
            KeyHandle::from(persisted)
        }
        Err(_) => {
            // Nothing persisted: a cleared TPM, or another TPM. Derive our key
            // transiently (nothing is written to the TPM) so that its Name can be
            // compared with the store's pin, which then reports "wrong root"
            // naming both, rather than a bare "not found".
            tracing::warn!(
                backend = BACKEND,
                handle = settings.persistent_handle,
                "no storage key at the persistent handle; the TPM was cleared or is another TPM"
            );
            let primary = ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                })
                .map_err(|e| hw("TPM2_CreatePrimary", e))?;
            let (_, name, _) = ctx
                .execute_without_session(|c| c.read_public(primary.key_handle))
                .map_err(|e| hw("TPM2_ReadPublic", e))?;
            return Ok(Attached { name: name.value().to_vec(), ctx, srk: primary.key_handle, transient: true });
        }
    };
    let (_, name, _) = ctx.execute_without_session(|c| c.read_public(srk)).map_err(|e| hw("TPM2_ReadPublic", e))?;
    Ok(Attached { name: name.value().to_vec(), ctx, srk, transient: false })
}

impl TpmRoot {
    /// Connects and finds the persisted storage key (`create`: makes it if absent).
    pub fn open(settings: TpmSettings, create: bool) -> Result<Self> {
        let a = attach(&settings, create)?;
        Ok(TpmRoot {
            name: a.name,
            ctx: Mutex::new(a.ctx),
            srk: Mutex::new(a.srk),
            transient: a.transient,
            hmac: Mutex::new(None),
            settings,
        })
    }

    /// Runs `f` with the context; reconnects once if the TPM went away.
    fn with_ctx<T>(&self, mut f: impl FnMut(&mut Context, KeyHandle) -> Result<T>) -> Result<T> {
        let mut ctx = self.ctx.lock().unwrap_or_else(|p| p.into_inner());
        let srk = *self.srk.lock().unwrap_or_else(|p| p.into_inner());
        match f(&mut ctx, srk) {
            Err(Error::Hardware { .. }) => {
                // A TCTI failure (swtpm restarted, resource manager bounced):
                // reconnect, find the persisted key again, retry once.
                tracing::warn!(backend = BACKEND, "TPM command failed; reconnecting");
                let fresh = attach(&self.settings, false)?;
                if fresh.name != self.name || fresh.transient {
                    return Err(Error::Hardware {
                        backend: BACKEND,
                        operation: "reconnecting",
                        detail: "the TPM came back without this store's storage key (cleared, or another TPM)".into(),
                    });
                }
                *ctx = fresh.ctx;
                // The old session died with the old connection.
                *self.hmac.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let new_srk = fresh.srk;
                *self.srk.lock().unwrap_or_else(|p| p.into_inner()) = new_srk;
                f(&mut ctx, new_srk)
            }
            other => other,
        }
    }

    /// The salted HMAC session with parameter encryption (or a password session when
    /// that is off). Started once and kept (continueSession): its set-up — an ECDH
    /// salt and a KDF on the client — costs ~6 ms, ten times the unseal itself.
    fn session(&self, ctx: &mut Context, srk: KeyHandle) -> Result<Option<AuthSession>> {
        if !self.settings.parameter_encryption {
            return Ok(Some(AuthSession::Password));
        }
        let mut cached = self.hmac.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = *cached {
            return Ok(Some(s));
        }
        let s = ctx
            .start_auth_session(
                Some(srk),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| hw("TPM2_StartAuthSession", e))?
            .ok_or_else(|| Error::Hardware {
                backend: BACKEND,
                operation: "TPM2_StartAuthSession",
                detail: "no session".into(),
            })?;
        let (attrs, mask) =
            SessionAttributesBuilder::new().with_decrypt(true).with_encrypt(true).with_continue_session(true).build();
        ctx.tr_sess_set_attributes(s, attrs, mask).map_err(|e| hw("setting session attributes", e))?;
        *cached = Some(s);
        Ok(Some(s))
    }

    /// Flushes the kept session after a failure (it may be unusable); the next
    /// command starts a new one.
    fn drop_session(&self, ctx: &mut Context) {
        if let Some(s @ AuthSession::HmacSession(_)) = self.hmac.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let h: tss_esapi::handles::SessionHandle = s.into();
            let _ = ctx.flush_context(ObjectHandle::from(h));
        }
    }

    /// Runs `f` in a fresh policy session of `kind` (trial, to compute a digest;
    /// policy, to satisfy one) that has run PolicyPCR and, with `auth` (the object
    /// has an authorisation value), PolicyAuthValue; flushes the session afterwards. A real policy session
    /// with parameter encryption on is salted with the storage key and encrypts its
    /// responses (finding 8: the unsealed DEK crosses the bus encrypted).
    fn with_pcr_session<T>(
        &self,
        ctx: &mut Context,
        srk: KeyHandle,
        kind: SessionType,
        auth: bool,
        f: impl FnOnce(&mut Context, AuthSession, PolicySession) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some((bank, pcrs)) = &self.settings.pcrs else { return Ok(None) };
        let sel = pcr_selection(*bank, pcrs)?;
        let salted = kind == SessionType::Policy && self.settings.parameter_encryption;
        let s = ctx
            .start_auth_session(
                salted.then_some(srk),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| hw("starting a policy session", e))?
            .ok_or_else(|| Error::Hardware {
                backend: BACKEND,
                operation: "policy session",
                detail: "no session".into(),
            })?;
        let out = PolicySession::try_from(s).map_err(|e| hw("policy session", e)).and_then(|ps| {
            if salted {
                // Unseal has no command parameter to encrypt: only the response.
                let (attrs, mask) = SessionAttributesBuilder::new().with_encrypt(true).build();
                ctx.tr_sess_set_attributes(s, attrs, mask).map_err(|e| hw("setting session attributes", e))?;
            }
            ctx.execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel.clone())).map_err(unseal_error)?;
            if auth {
                ctx.execute_without_session(|c| c.policy_auth_value(ps)).map_err(|e| hw("TPM2_PolicyAuthValue", e))?;
            }
            f(ctx, s, ps)
        });
        let h: tss_esapi::handles::SessionHandle = s.into();
        let _ = ctx.flush_context(ObjectHandle::from(h));
        out.map(Some)
    }

    /// The PCR policy digest of the current PCR values (trial session).
    fn pcr_policy(&self, ctx: &mut Context, srk: KeyHandle) -> Result<Option<Digest>> {
        self.with_pcr_session(ctx, srk, SessionType::Trial, self.settings.auth.is_some(), |ctx, _, ps| {
            ctx.execute_without_session(|c| c.policy_get_digest(ps)).map_err(|e| hw("TPM2_PolicyGetDigest", e))
        })
    }

    fn seal(&self, dek: &DekMaterial) -> Result<Wrapped> {
        self.with_ctx(|ctx, srk| {
            let policy = self.pcr_policy(ctx, srk)?;
            let auth = self.settings.auth.as_ref().map(TpmAuth::auth).transpose()?;
            let template = sealed_template(policy, auth.is_some())?;
            let data = SensitiveData::try_from(dek.expose().to_vec()).map_err(|e| hw("sealing", e))?;
            let session = self.session(ctx, srk)?;
            let created = ctx.execute_with_session(session, |c| {
                c.create(srk, template.clone(), auth.clone(), Some(data.clone()), None, None)
            });
            if created.is_err() {
                self.drop_session(ctx);
            }
            let created = created.map_err(|e| hw("TPM2_Create (sealing a data key)", e))?;
            let public = created.out_public.marshall().map_err(|e| hw("marshalling", e))?;
            let mut w = Writer::with_capacity(public.len() + created.out_private.value().len() + 8);
            w.bytes(&public).bytes(created.out_private.value());
            let mechanism = if auth.is_some() { WrapMechanism::TpmSealedAuth } else { WrapMechanism::TpmSealed };
            Ok(Wrapped { mechanism, blob: w.finish() })
        })
    }

    /// Unseals a blob; `with_auth`: it was sealed with the authorisation value.
    fn unseal(&self, blob: &[u8], with_auth: bool) -> Result<DekMaterial> {
        let auth = match (with_auth, &self.settings.auth) {
            (false, _) => None,
            (true, Some(a)) => Some(a.auth()?),
            (true, None) => {
                return Err(Error::Config(
                    "the store's TPM data keys were sealed with an authorisation value: set pin_source for the \
                     tpm root in the config"
                        .into(),
                ));
            }
        };
        let mut r = Reader::new(blob);
        let bad = |_| Error::integrity("unsealing a data key");
        let public =
            Public::unmarshall(r.bytes().map_err(bad)?).map_err(|_| Error::integrity("unsealing a data key"))?;
        let private = Private::try_from(r.bytes().map_err(bad)?.to_vec())
            .map_err(|_| Error::integrity("unsealing a data key"))?;
        r.finish().map_err(bad)?;
        self.with_ctx(|ctx, srk| {
            // TPM2_Load carries no secret (the private part is encrypted to the storage
            // key): a password session. Only Unseal, which returns the DEK, pays for
            // parameter encryption (~2 ms of libtss2 client CPU per command).
            let loaded = ctx
                .execute_with_session(Some(AuthSession::Password), |c| c.load(srk, private.clone(), public.clone()))
                .map_err(unseal_error)?;
            if let Some(a) = &auth
                && let Err(e) = ctx.tr_set_auth(loaded.into(), a.clone())
            {
                let _ = ctx.flush_context(loaded.into());
                return Err(hw("setting the authorisation value", e));
            }
            let session = match self.session(ctx, srk) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ctx.flush_context(loaded.into());
                    return Err(e);
                }
            };
            let unsealed = if self.settings.pcrs.is_some() {
                self.unseal_with_policy(ctx, srk, loaded, auth.is_some())
            } else {
                let u = ctx.execute_with_session(session, |c| c.unseal(loaded.into())).map_err(unseal_error);
                if u.is_err() {
                    self.drop_session(ctx);
                }
                u
            };
            let _ = ctx.flush_context(loaded.into());
            let data = unsealed?;
            let v = Zeroizing::new(data.value().to_vec());
            DekMaterial::from_slice(&v)
        })
    }

    fn unseal_with_policy(
        &self,
        ctx: &mut Context,
        srk: KeyHandle,
        loaded: KeyHandle,
        auth: bool,
    ) -> Result<SensitiveData> {
        self.with_pcr_session(ctx, srk, SessionType::Policy, auth, |ctx, s, _| {
            ctx.execute_with_session(Some(s), |c| c.unseal(loaded.into())).map_err(unseal_error)
        })?
        .ok_or_else(|| Error::integrity("unsealing a data key"))
    }

    /// Whether unsealing depends on PCR values.
    pub fn is_pcr_bound(&self) -> bool {
        self.settings.pcrs.is_some()
    }
}

impl RootKey for TpmRoot {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_hardware(&self) -> bool {
        true
    }

    fn can_unwrap(&self) -> bool {
        true
    }

    fn is_policy_bound(&self) -> bool {
        self.is_pcr_bound()
    }

    fn counter(&self) -> Option<&dyn MonotonicCounter> {
        self.settings.nv_counter.map(|_| self as &dyn MonotonicCounter)
    }

    fn identity(&self) -> Result<RootIdentity> {
        let pcr = match &self.settings.pcrs {
            Some((bank, pcrs)) => format!(
                "{}{bank:?}:{}",
                super::POLICY_BOUND_MARKER,
                pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
            ),
            None => String::new(),
        };
        Ok(RootIdentity {
            backend: BACKEND.into(),
            fingerprint: format!("name={}{pcr}", hex(&self.name)),
            description: format!(
                "TPM storage key at {:#x} via {} (Name {}){}",
                self.settings.persistent_handle,
                self.settings.tcti,
                hex(&self.name),
                if self.is_pcr_bound() { ", PCR-bound" } else { "" }
            ),
        })
    }

    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)> {
        let dek = DekMaterial::random()?;
        let w = self.seal(&dek)?;
        Ok((dek, w))
    }

    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped> {
        self.seal(dek)
    }

    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial> {
        match wrapped.mechanism {
            WrapMechanism::TpmSealed => self.unseal(&wrapped.blob, false),
            WrapMechanism::TpmSealedAuth => self.unseal(&wrapped.blob, true),
            _ => Err(Error::integrity("unsealing a data key")),
        }
    }

    fn health(&self) -> Vec<Check> {
        let mut out = vec![Check::new(
            "tpm storage key",
            true,
            format!("{:#x} via {}, Name {}", self.settings.persistent_handle, self.settings.tcti, hex(&self.name)),
        )];
        out.push(match (self.settings.parameter_encryption, &self.settings.pcrs) {
            (false, _) => Check::warn("tpm parameter encryption", "off: DEKs cross the TPM bus in the clear"),
            (true, Some(_)) => Check::pass(
                "tpm parameter encryption",
                "salted AES-128-CFB sessions for commands carrying a DEK: the HMAC session to seal, a salted \
                 policy session encrypting the response to unseal under the PCR policy",
            ),
            (true, None) => {
                Check::pass("tpm parameter encryption", "salted AES-128-CFB sessions for commands carrying a DEK")
            }
        });
        out.push(match &self.settings.auth {
            Some(_) => Check::pass(
                "tpm authorisation",
                if self.settings.pcrs.is_some() {
                    "new DEKs are sealed under an authorisation value from pin_source, required with the PCR \
                     policy (PolicyPCR + PolicyAuthValue); the TPM's dictionary-attack lockout limits guesses"
                } else {
                    "new DEKs are sealed under an authorisation value from pin_source; the TPM's \
                     dictionary-attack lockout limits guesses"
                },
            ),
            None => Check::warn(
                "tpm authorisation",
                "no pin_source: DEKs are sealed without an authorisation value, so any process that can open the \
                 TPM device and read the store file can unseal them; set pin_source (README: TPM 2.0 root)",
            ),
        });
        if let Some((bank, pcrs)) = &self.settings.pcrs {
            let current = self.with_ctx(|ctx, _| {
                let sel = pcr_selection(*bank, pcrs)?;
                let (_, _, digests) =
                    ctx.execute_without_session(|c| c.pcr_read(sel)).map_err(|e| hw("TPM2_PCR_Read", e))?;
                Ok(digests.value().iter().map(|d| hex(d.value())).collect::<Vec<_>>().join(" "))
            });
            out.push(Check::new(
                "tpm PCR policy",
                current.is_ok(),
                match current {
                    Ok(v) => format!("sealed to {bank:?} PCRs {pcrs:?}; current values {v}"),
                    Err(e) => e.to_string(),
                },
            ));
        }
        out
    }
}

/// The store's rollback counter: an NV counter index (TPM_NT_COUNTER) in the owner
/// range, read and incremented under its own authorisation value (the root's PIN
/// value, or empty). A TPM starts a new counter at the highest value any counter on it
/// ever had, so deleting and redefining the index never moves it back.
impl TpmRoot {
    fn nv_index(&self) -> Result<NvIndexTpmHandle> {
        let idx = self.settings.nv_counter.ok_or_else(|| Error::Config("no nv_counter configured".into()))?;
        NvIndexTpmHandle::new(idx).map_err(|e| hw("NV index", e))
    }

    /// Runs `f` on the counter's ESYS handle (its authorisation set); `None` when the
    /// index is not defined.
    fn with_nv<T>(
        &self,
        ctx: &mut Context,
        srk: KeyHandle,
        f: impl FnOnce(&mut Context, NvIndexHandle, Option<AuthSession>) -> Result<T>,
    ) -> Result<Option<T>> {
        let idx = self.nv_index()?;
        let mut obj = match ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(idx))) {
            Ok(o) => o,
            Err(e) if matches!(kind(&e), Some(Tss2ResponseCodeKind::Handle)) => return Ok(None),
            Err(e) => return Err(hw("finding the rollback counter", e)),
        };
        let out = (|| {
            if let Some(a) = &self.settings.auth {
                ctx.tr_set_auth(obj, a.nv_auth()?).map_err(|e| hw("setting the counter's authorisation", e))?;
            }
            let session = self.session(ctx, srk)?;
            let r = f(ctx, NvIndexHandle::from(obj), session);
            if r.is_err() {
                self.drop_session(ctx);
            }
            r
        })();
        let _ = ctx.tr_close(&mut obj);
        out.map(Some)
    }
}

fn nv_value(b: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(b).map(u64::from_be_bytes).map_err(|_| Error::Hardware {
        backend: BACKEND,
        operation: "reading the rollback counter",
        detail: "not 8 bytes".into(),
    })
}

fn nv_error_text(detail: &str) -> Error {
    Error::Hardware { backend: BACKEND, operation: "the rollback counter", detail: detail.into() }
}

fn nv_error(operation: &'static str, e: tss_esapi::Error) -> Error {
    match kind(&e) {
        Some(Tss2ResponseCodeKind::Lockout) => Error::Auth {
            backend: BACKEND,
            detail: "the TPM is in dictionary-attack lockout; the rollback counter cannot be read until it recovers"
                .into(),
        },
        Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => Error::Auth {
            backend: BACKEND,
            detail: "the TPM refused the rollback counter's authorisation value (wrong PIN from pin_source?)".into(),
        },
        _ => hw(operation, e),
    }
}

impl MonotonicCounter for TpmRoot {
    fn counter_id(&self) -> Result<String> {
        let idx = self.settings.nv_counter.ok_or_else(|| Error::Config("no nv_counter configured".into()))?;
        Ok(format!("tpm:name={};nv={idx:#010x}", hex(&self.name)))
    }

    fn read_counter(&self) -> Result<Option<u64>> {
        self.with_ctx(|ctx, srk| {
            let read = self.with_nv(ctx, srk, |ctx, h, session| {
                match ctx.execute_with_session(session, |c| c.nv_read(NvAuth::NvIndex(h), h, 8, 0)) {
                    Ok(b) => nv_value(b.value()).map(Some),
                    // Defined but never incremented (a crash inside `create_counter`).
                    Err(e) if matches!(kind(&e), Some(Tss2ResponseCodeKind::NvUninitialized)) => Ok(None),
                    Err(e) => Err(nv_error("TPM2_NV_Read (the rollback counter)", e)),
                }
            })?;
            Ok(read.flatten())
        })
    }

    fn create_counter(&self) -> Result<u64> {
        if let Some(v) = self.read_counter()? {
            return Ok(v);
        }
        self.with_ctx(|ctx, srk| {
            let defined = self.with_nv(ctx, srk, |_, _, _| Ok(()))?.is_some();
            if !defined {
                let attrs = NvIndexAttributesBuilder::new()
                    .with_nv_index_type(NvIndexType::Counter)
                    .with_auth_read(true)
                    .with_auth_write(true)
                    .with_no_da(self.settings.auth.is_none())
                    .build()
                    .map_err(|e| hw("the rollback counter's attributes", e))?;
                let public = NvPublicBuilder::new()
                    .with_nv_index(self.nv_index()?)
                    .with_index_name_algorithm(HashingAlgorithm::Sha256)
                    .with_index_attributes(attrs)
                    .with_data_area_size(8)
                    .build()
                    .map_err(|e| hw("the rollback counter's public area", e))?;
                let auth = self.settings.auth.as_ref().map(TpmAuth::nv_auth).transpose()?;
                // The encrypting session: the authorisation value is the command's
                // first parameter, so it crosses the bus encrypted.
                let session = self.session(ctx, srk)?;
                let mut h: ObjectHandle = ctx
                    .execute_with_session(session, |c| {
                        c.nv_define_space(Provision::Owner, auth.clone(), public.clone())
                    })
                    .map_err(|e| hw("TPM2_NV_DefineSpace (the rollback counter; needs the owner hierarchy)", e))?
                    .into();
                let _ = ctx.tr_close(&mut h);
                tracing::info!(backend = BACKEND, index = self.settings.nv_counter, "defined the rollback counter");
            }
            Ok(())
        })?;
        self.bump(None)
    }

    fn increment_counter(&self, from: u64) -> Result<u64> {
        self.bump(Some(from))
    }
}

impl TpmRoot {
    /// Increments the counter if it reads `from` (`None`: never incremented), and
    /// returns its value. The read comes first inside the retried closure, so a
    /// reconnect after a lost response does not increment twice.
    fn bump(&self, from: Option<u64>) -> Result<u64> {
        self.with_ctx(|ctx, srk| {
            self.with_nv(ctx, srk, |ctx, h, session| {
                let read = |ctx: &mut Context| match ctx
                    .execute_with_session(session, |c| c.nv_read(NvAuth::NvIndex(h), h, 8, 0))
                {
                    Ok(b) => nv_value(b.value()).map(Some),
                    Err(e) if matches!(kind(&e), Some(Tss2ResponseCodeKind::NvUninitialized)) => Ok(None),
                    Err(e) => Err(nv_error("TPM2_NV_Read (the rollback counter)", e)),
                };
                let now = read(ctx)?;
                if now != from {
                    return now.ok_or_else(|| nv_error_text("the counter was never incremented"));
                }
                ctx.execute_with_session(session, |c| c.nv_increment(NvAuth::NvIndex(h), h))
                    .map_err(|e| nv_error("TPM2_NV_Increment (the rollback counter)", e))?;
                read(ctx)?.ok_or_else(|| nv_error_text("the counter reads as never incremented after an increment"))
            })?
            .ok_or_else(|| Error::Hardware {
                backend: BACKEND,
                operation: "incrementing the rollback counter",
                detail: format!("NV index {:?} is not defined", self.settings.nv_counter),
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// docs/FORMAT.md §"TPM authorisation value": the vector there is this derivation.
    #[test]
    fn auth_value_matches_the_document() {
        let doc = include_str!("../../docs/FORMAT.md");
        let start = doc.find("```hex tpm_auth\n").unwrap() + "```hex tpm_auth\n".len();
        let want = doc[start..start + 64].to_string();
        let auth = super::TpmAuth::from_pin(&secrecy::SecretString::from("123456".to_string()));
        let got: String = auth.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
        assert_eq!(format!("{auth:?}"), "TpmAuth(..)", "Debug shows nothing of the value");
    }

    /// Finding 13: a PCR index past 23 is a configuration error, never a wrapped
    /// shift or a selection of a PCR that does not exist.
    #[test]
    fn pcr_indices_past_23_are_refused() {
        use tss_esapi::interface_types::algorithm::HashingAlgorithm;
        for p in [24u8, 31, 32, 255] {
            let t = crate::config::TpmConfig { pcrs: vec![p], ..Default::default() };
            match super::TpmSettings::from_config(&t, std::path::Path::new(".")) {
                Err(crate::Error::Config(m)) => assert!(m.contains(&format!("PCR {p}")), "{m}"),
                other => panic!("PCR {p}: {other:?}"),
            }
            assert!(matches!(super::pcr_selection(HashingAlgorithm::Sha256, &[p]), Err(crate::Error::Config(_))));
        }
        assert!(super::pcr_selection(HashingAlgorithm::Sha256, &[0, 7, 23]).is_ok());
    }
}
