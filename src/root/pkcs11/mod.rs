//! PKCS#11 root: an AES-256 KEK that never leaves the token (SoftHSM2, kryoptic, a
//! network or PCIe HSM), driven through cryptoki.
//!
//! Shape, and why:
//! - **One `Pkcs11` context per module per process** ([`module`]): PKCS#11 state
//!   (initialisation, login) is per application, so two guards in one process share
//!   the loaded module instead of fighting over `C_Initialize`.
//! - **A bounded session pool.** `Session` is `Send` but not `Sync`, so each operation
//!   borrows a session exclusively; at most `max_sessions` exist, because SoftHSM2 and
//!   many HSMs degrade (or refuse) under many parallel sessions. Every new session logs
//!   in; `CKR_USER_ALREADY_LOGGED_IN` just means another session did.
//! - **Recovery instead of staying dead.** A session error (`SESSION_HANDLE_INVALID`,
//!   `SESSION_CLOSED`, `USER_NOT_LOGGED_IN`) drops the pooled sessions and retries once;
//!   a device error (`DEVICE_REMOVED`, `TOKEN_NOT_PRESENT`, `CRYPTOKI_NOT_INITIALIZED`)
//!   re-initialises the module, finds the token again by label or serial (never by slot
//!   number, which can change) and the key by its label and id, and retries once.
//! - **Mechanism probing.** For a 32-byte DEK no padding is needed, so the preferred
//!   mechanism is `CKM_AES_KEY_WRAP` (RFC 3394): it is defined identically by every
//!   vendor, whereas `0x210A` means RFC 5649 on SoftHSM2 but PKCS#7-padded KW in the
//!   PKCS#11 2.40 text. Then `0x210A`, then AES-GCM `C_Encrypt` as a last resort. KWP
//!   (`0x210B`) cannot be expressed through cryptoki 0.12 (docs/DESIGN-NOTES.md, "Wrap mechanism order").
//! - **DEKs are generated in the token** as session objects, wrapped, their value read
//!   once into zeroizing memory, and the object destroyed.
//! - **Tampered blobs**: SoftHSM2 reports `CKR_GENERAL_ERROR` and kryoptic
//!   `CKR_DEVICE_ERROR` instead of `CKR_WRAPPED_KEY_INVALID`; all map to the opaque
//!   integrity error.

mod counter;
mod lock;
mod module;
mod settings;
mod token;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use zeroize::{Zeroize, Zeroizing};

use super::{Check, RootIdentity, RootKey, WrapMechanism, Wrapped};
use crate::error::{Error, Result};
use crate::secret::DekMaterial;

const BACKEND: &str = "pkcs11";

use lock::TokenLock;
pub use module::softhsm_empty_token_files;
#[allow(clippy::wildcard_imports)]
use module::*;
pub use settings::{DEFAULT_KEY_LABEL, MechanismPreference, Pkcs11Settings, Pkcs11Uri};
pub use token::init_token;
#[allow(clippy::wildcard_imports)]
use token::*;

/// Where the token and key are now; refreshed after a device error.
struct Location {
    generation: u64,
    slot: Slot,
    key: ObjectHandle,
}

/// A pooled session, tagged with the module generation it was opened in.
struct PooledSession {
    generation: u64,
    session: Session,
}

/// The PKCS#11 root key.
pub struct Pkcs11Root {
    settings: Pkcs11Settings,
    module: Arc<Module>,
    location: Mutex<Location>,
    pool: Mutex<Vec<PooledSession>>,
    /// Number of sessions in existence (pooled or borrowed), bounded by max_sessions.
    open: Mutex<usize>,
    open_cv: Condvar,
    mechanism: WrapMechanism,
    token_serial: String,
    token_label: String,
    key_id: Vec<u8>,
}

impl Drop for Pkcs11Root {
    /// The pooled sessions are closed as every other one is, under the shared token
    /// lock (see `discard`).
    fn drop(&mut self) {
        self.drain_pool();
    }
}

impl std::fmt::Debug for Pkcs11Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Root")
            .field("settings", &self.settings)
            .field("mechanism", &self.mechanism)
            .field("token_serial", &self.token_serial)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Root {
    /// Connects to the token and finds the KEK; with `generate`, generates it in the
    /// token if no key carries the label yet. An existing key is adopted only if it is
    /// sensitive and not extractable.
    pub fn connect(settings: Pkcs11Settings, generate: bool) -> Result<Self> {
        let _lock = TokenLock::exclusive(&settings.module)?;
        let module = module(&settings.module)?;
        let generation = module.generation.load(Ordering::Acquire);
        let (slot, token_serial, token_label, session) = retry_transient(|| {
            let (slot, serial, label) = find_slot(&module.ctx, &settings)?;
            let session = module.ctx.open_rw_session(slot).map_err(|e| hw("C_OpenSession", e))?;
            login(&session, &settings.pin)?;
            Ok((slot, serial, label, session))
        })?;

        let (key, key_id, mechanism) = match find_key(&session, &settings)? {
            Some((key, id)) => {
                check_adoptable(&session, key, &settings.key_label)?;
                // Finding 18: a key made outside the token may have copies outside it.
                // Pinning one into a new store is refused unless asked for; a store
                // that already pins it keeps opening (`doctor` reports CKA_LOCAL).
                if generate
                    && !settings.allow_imported_key
                    && bool_attr(&session, key, AttributeType::Local)? == Some(false)
                {
                    return Err(Error::Config(format!(
                        "refusing root key {:?}: CKA_LOCAL is false, so its value was imported and has existed \
                         outside the token (copies may exist). Choose a new key_label to have the token generate \
                         one, or set allow_imported_key = true for a deliberate key ceremony",
                        settings.key_label
                    )));
                }
                let mech = key_mechanism(&module.ctx, slot, &session, key, settings.mechanism)?;
                (key, id, mech)
            }
            None if generate => {
                let mech = probe_mechanism(&module.ctx, slot, settings.mechanism)?;
                let (key, id) = generate_kek(&session, &settings, mech)?;
                (key, id, mech)
            }
            None => {
                return Err(Error::Hardware {
                    backend: BACKEND,
                    operation: "finding the root key",
                    detail: format!(
                        "no AES key labelled {:?} in token {token_label:?} (serial {token_serial})",
                        settings.key_label
                    ),
                });
            }
        };
        let root = Pkcs11Root {
            module,
            location: Mutex::new(Location { generation, slot, key }),
            pool: Mutex::new(vec![PooledSession { generation, session }]),
            open: Mutex::new(1),
            open_cv: Condvar::new(),
            mechanism,
            token_serial,
            token_label,
            key_id,
            settings,
        };
        Ok(root)
    }

    /// The mechanism used for new wraps.
    pub fn mechanism(&self) -> WrapMechanism {
        self.mechanism
    }

    /// Runs `f` with a logged-in session and the KEK handle, recovering once from a
    /// session or device failure.
    fn with_session<T>(
        &self,
        mut f: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, CkError>,
        classify: impl Fn(CkError) -> Error,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            let (pooled, key) = self.checkout()?;
            let result = match TokenLock::shared(&self.settings.module) {
                Ok(_lock) => f(&pooled.session, key),
                Err(e) => {
                    self.checkin(pooled);
                    return Err(e);
                }
            };
            match result {
                Ok(v) => {
                    self.checkin(pooled);
                    return Ok(v);
                }
                Err(e) => {
                    let recovery = recovery_for(&e);
                    let generation = pooled.generation;
                    self.discard(pooled);
                    if attempt > 0 {
                        return Err(classify(e));
                    }
                    attempt += 1;
                    match recovery {
                        Recovery::None => return Err(classify(e)),
                        Recovery::Session => {
                            tracing::warn!(backend = BACKEND, error = %ck_detail(&e), "session lost; retrying on a new session");
                            self.drain_pool();
                        }
                        Recovery::Device => {
                            tracing::warn!(backend = BACKEND, error = %ck_detail(&e), "device error; re-initialising");
                            self.drain_pool();
                            let _lock = TokenLock::exclusive(&self.settings.module)?;
                            self.module.reinitialize(generation)?;
                            self.relocate()?;
                        }
                    }
                }
            }
        }
    }

    fn checkout(&self) -> Result<(PooledSession, ObjectHandle)> {
        let (generation, slot, key) = {
            let loc = self.location.lock().unwrap_or_else(|p| p.into_inner());
            (loc.generation, loc.slot, loc.key)
        };
        if generation != self.module.generation.load(Ordering::Acquire) {
            // Another root in this process re-initialised the module.
            self.drain_pool();
            {
                let _lock = TokenLock::exclusive(&self.settings.module)?;
                self.relocate()?;
            }
            return self.checkout();
        }
        loop {
            if let Some(s) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                if s.generation == generation {
                    return Ok((s, key));
                }
                self.discard(s);
                continue;
            }
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if *open < self.settings.max_sessions.max(1) {
                *open += 1;
                drop(open);
                let opened = TokenLock::exclusive(&self.settings.module).and_then(|_lock| {
                    retry_transient(|| {
                        let session = self.module.ctx.open_rw_session(slot).map_err(|e| hw("C_OpenSession", e))?;
                        login(&session, &self.settings.pin)?;
                        Ok(session)
                    })
                });
                return match opened {
                    Ok(session) => Ok((PooledSession { generation, session }, key)),
                    Err(e) => {
                        self.release_slot();
                        Err(e)
                    }
                };
            }
            // All sessions are borrowed: wait for one to come back.
            let _unused = self
                .open_cv
                .wait_timeout(open, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn checkin(&self, s: PooledSession) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        self.open_cv.notify_one();
    }

    fn release_slot(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        *open = open.saturating_sub(1);
        self.open_cv.notify_one();
    }

    /// Closes a session. C_CloseSession is a call into the module like any other, so
    /// it runs under the shared token lock: a re-initialisation (C_Finalize under the
    /// exclusive lock) never runs beside it (security issue, finding 18). Never called
    /// while this thread holds the lock.
    fn discard(&self, s: PooledSession) {
        let lock = TokenLock::shared(&self.settings.module);
        drop(s); // C_CloseSession; an error on a dead handle is irrelevant
        drop(lock);
        self.release_slot();
    }

    fn drain_pool(&self) {
        let sessions: Vec<_> = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|p| p.into_inner()));
        for s in sessions {
            self.discard(s);
        }
    }

    /// Finds the token and key again (after a re-initialisation slot ids and object
    /// handles may have changed). Refuses a token whose serial changed.
    /// Finds the token and the key again after a re-initialisation. The caller holds
    /// the exclusive token lock.
    fn relocate(&self) -> Result<()> {
        let generation = self.module.generation.load(Ordering::Acquire);
        let (slot, serial, _) = find_slot(&self.module.ctx, &self.settings)?;
        if serial != self.token_serial {
            return Err(Error::WrongRoot {
                pinned: format!("token serial {}", self.token_serial),
                found: format!("token serial {serial}"),
            });
        }
        let session = self.module.ctx.open_rw_session(slot).map_err(|e| hw("C_OpenSession", e))?;
        login(&session, &self.settings.pin)?;
        let mut s = Pkcs11Settings { key_id: Some(self.key_id.clone()), ..self.settings_clone() };
        if self.key_id.is_empty() {
            s.key_id = None;
        }
        let (key, _) = find_key(&session, &s)?.ok_or_else(|| Error::Hardware {
            backend: BACKEND,
            operation: "finding the root key",
            detail: format!("the root key {:?} is no longer in the token", self.settings.key_label),
        })?;
        *self.location.lock().unwrap_or_else(|p| p.into_inner()) = Location { generation, slot, key };
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.checkin(PooledSession { generation, session });
        Ok(())
    }

    fn settings_clone(&self) -> Pkcs11Settings {
        Pkcs11Settings {
            module: self.settings.module.clone(),
            token_label: self.settings.token_label.clone(),
            token_serial: self.settings.token_serial.clone(),
            key_label: self.settings.key_label.clone(),
            key_id: self.settings.key_id.clone(),
            pin: self.settings.pin.clone(),
            mechanism: self.settings.mechanism,
            max_sessions: self.settings.max_sessions,
            counter_label: self.settings.counter_label.clone(),
            allow_imported_key: self.settings.allow_imported_key,
        }
    }

    fn gcm_wrap(&self, dek: &[u8; 32]) -> Result<Wrapped> {
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| Error::Hardware {
            backend: "os",
            operation: "getrandom",
            detail: e.to_string(),
        })?;
        // The IV goes to the token in a buffer it may write to: a token that makes its
        // own IV (some do in FIPS mode) writes it back there, and that IV is the one
        // stored (finding 11). The fresh-wrap check then unwraps the blob again.
        let (iv, ct) = self.with_session(
            |s, kek| {
                let mut iv = iv;
                let ct = {
                    let params = GcmParams::new(&mut iv, GCM_WRAP_AAD, 128.into())?;
                    s.encrypt(&Mechanism::AesGcm(params), kek, dek)?
                };
                Ok((iv, ct))
            },
            |e| hw("C_Encrypt", e),
        )?;
        let mut blob = iv.to_vec();
        blob.extend_from_slice(&ct);
        Ok(Wrapped { mechanism: WrapMechanism::AesGcm, blob })
    }
}

/// Runs `f` again, a bounded number of times, while it fails with the states another
/// program can cause by rewriting the token's files (SoftHSM2: no token visible, or
/// "PIN not initialised" mid-rewrite). Other errors return at once.
fn retry_transient<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    const ATTEMPTS: u32 = 20;
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if attempt + 1 < ATTEMPTS && is_transient(&e) => {
                attempt += 1;
                tracing::debug!(backend = BACKEND, attempt, error = %e, "token not ready; retrying");
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

fn is_transient(e: &Error) -> bool {
    match e {
        Error::Hardware { operation: "finding the token", .. } => true,
        Error::Auth { detail, .. } => detail.ends_with("USER_PIN_NOT_INITIALIZED"),
        _ => false,
    }
}

impl RootKey for Pkcs11Root {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_policy_bound(&self) -> bool {
        false
    }

    fn counter(&self) -> Option<&dyn crate::root::MonotonicCounter> {
        self.settings.counter_label.as_ref().map(|_| self as &dyn crate::root::MonotonicCounter)
    }

    fn is_hardware(&self) -> bool {
        true
    }

    fn can_unwrap(&self) -> bool {
        true
    }

    fn identity(&self) -> Result<RootIdentity> {
        let fp = format!("serial={};id={};label={}", self.token_serial, hex(&self.key_id), self.settings.key_label);
        Ok(RootIdentity {
            backend: BACKEND.into(),
            description: format!(
                "PKCS#11 token {:?} (serial {}), key {:?} (id {})",
                self.token_label,
                self.token_serial,
                self.settings.key_label,
                hex(&self.key_id)
            ),
            fingerprint: fp,
        })
    }

    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)> {
        if self.mechanism == WrapMechanism::AesGcm {
            let mut v = Zeroizing::new([0u8; 32]);
            self.with_session(|s, _| s.generate_random_slice(&mut v[..]).map(|_| ()), |e| hw("C_GenerateRandom", e))?;
            let dek = DekMaterial::from_slice(&v[..])?;
            let w = self.gcm_wrap(dek.expose())?;
            return Ok((dek, w));
        }
        let mech = ck_mechanism(self.mechanism).ok_or_else(|| Error::integrity("wrapping a data key"))?;
        let (dek, blob) = self.with_session(
            |s, kek| {
                let mut t = dek_template(None);
                t.push(Attribute::ValueLen(32.into()));
                let h = s.generate_key(&Mechanism::AesKeyGen, &t)?;
                let out = (|| {
                    let blob = s.wrap_key(&mech, kek, h)?;
                    let v = s.get_attributes(h, &[AttributeType::Value])?;
                    Ok((v, blob))
                })();
                let _ = s.destroy_object(h);
                out
            },
            |e| hw("generating a data key", e),
        )?;
        let mut dek_bytes = None;
        for a in dek {
            if let Attribute::Value(v) = a {
                let v = Zeroizing::new(v);
                dek_bytes = Some(DekMaterial::from_slice(&v)?);
            }
        }
        let dek = dek_bytes.ok_or_else(|| Error::Hardware {
            backend: BACKEND,
            operation: "generating a data key",
            detail: "the token did not return the key value".into(),
        })?;
        Ok((dek, Wrapped { mechanism: self.mechanism, blob }))
    }

    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped> {
        if self.mechanism == WrapMechanism::AesGcm {
            return self.gcm_wrap(dek.expose());
        }
        let mech = ck_mechanism(self.mechanism).ok_or_else(|| Error::integrity("wrapping a data key"))?;
        let blob = self.with_session(
            |s, kek| {
                let mut t = dek_template(Some(dek.expose().to_vec()));
                let h = s.create_object(&t);
                scrub(&mut t);
                let h = h?;
                let out = s.wrap_key(&mech, kek, h);
                let _ = s.destroy_object(h);
                out
            },
            |e| hw("C_WrapKey", e),
        )?;
        Ok(Wrapped { mechanism: self.mechanism, blob })
    }

    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial> {
        match wrapped.mechanism {
            WrapMechanism::AesGcm => {
                if wrapped.blob.len() != 12 + 32 + 16 {
                    return Err(Error::integrity("unwrapping a data key"));
                }
                let (iv, ct) = wrapped.blob.split_at(12);
                let pt = self.with_session(
                    |s, kek| {
                        let mut iv_buf = [0u8; 12];
                        iv_buf.copy_from_slice(iv);
                        let params = GcmParams::new(&mut iv_buf, GCM_WRAP_AAD, 128.into())?;
                        s.decrypt(&Mechanism::AesGcm(params), kek, ct).map(Zeroizing::new)
                    },
                    unwrap_error,
                )?;
                DekMaterial::from_slice(&pt)
            }
            m => {
                let mech = ck_mechanism(m).ok_or_else(|| Error::integrity("unwrapping a data key"))?;
                self.with_session(
                    |s, kek| {
                        let h = s.unwrap_key(&mech, kek, &wrapped.blob, &dek_template(None))?;
                        let v = dek_value(s, h)
                            .map_err(|_| CkError::Pkcs11(RvError::GeneralError, Function::GetAttributeValue));
                        let _ = s.destroy_object(h);
                        v
                    },
                    unwrap_error,
                )
            }
        }
    }

    fn health(&self) -> Vec<Check> {
        let mut out = vec![Check::new(
            "pkcs11 token",
            true,
            format!("{:?} (serial {}) via {}", self.token_label, self.token_serial, self.settings.module.display()),
        )];
        let attrs = self.with_session(
            |s, kek| {
                let info = s.get_attribute_info(kek, &[AttributeType::Value])?;
                let get = |t| {
                    s.get_attributes(kek, &[t]).map(|v| {
                        v.into_iter().find_map(|a| match a {
                            Attribute::Sensitive(b)
                            | Attribute::NeverExtractable(b)
                            | Attribute::Local(b)
                            | Attribute::Extractable(b) => Some(b),
                            _ => None,
                        })
                    })
                };
                Ok((
                    info.first().cloned(),
                    get(AttributeType::Sensitive)?,
                    get(AttributeType::Extractable)?,
                    get(AttributeType::NeverExtractable)?,
                    get(AttributeType::Local)?,
                ))
            },
            |e| hw("reading key attributes", e),
        );
        match attrs {
            Ok((value, sensitive, extractable, never_ex, local)) => {
                let value_hidden = matches!(value, Some(AttributeInfo::Sensitive) | Some(AttributeInfo::Unavailable));
                out.push(Check::new(
                    "root key value unreadable",
                    value_hidden,
                    if value_hidden {
                        "CKA_VALUE access is refused by the token".into()
                    } else {
                        format!("CKA_VALUE is readable ({value:?}): replace this key")
                    },
                ));
                let attr = |v: Option<bool>| match v {
                    Some(true) => "true",
                    Some(false) => "false",
                    None => "not reported by the token",
                };
                out.push(Check::new(
                    "key is sensitive",
                    sensitive == Some(true),
                    format!("CKA_SENSITIVE {}", attr(sensitive)),
                ));
                out.push(Check::new(
                    "key is not extractable",
                    extractable == Some(false),
                    format!("CKA_EXTRACTABLE {}", attr(extractable)),
                ));
                out.push(Check::new(
                    "key was never extractable",
                    never_ex == Some(true),
                    format!(
                        "CKA_NEVER_EXTRACTABLE {}{}",
                        attr(never_ex),
                        if never_ex == Some(true) {
                            ""
                        } else {
                            " (the key was once extractable: it may exist outside the token)"
                        }
                    ),
                ));
                out.push(Check::new(
                    "key was generated in the token",
                    local == Some(true),
                    format!(
                        "CKA_LOCAL {}{}",
                        attr(local),
                        if local == Some(true) { "" } else { " (the key was imported, not generated in the token)" }
                    ),
                ));
                out.push(Check::new("wrap mechanism", true, self.mechanism.to_string()));
            }
            Err(e) => out.push(Check::new("root key attributes", false, e.to_string())),
        }
        out
    }
}
