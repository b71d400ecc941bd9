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
//!   (`0x210B`) cannot be expressed through cryptoki 0.12 (docs/DECISIONS.md).
//! - **DEKs are generated in the token** as session objects, wrapped, their value read
//!   once into zeroizing memory, and the object destroyed.
//! - **Tampered blobs**: SoftHSM2 reports `CKR_GENERAL_ERROR` and kryoptic
//!   `CKR_DEVICE_ERROR` instead of `CKR_WRAPPED_KEY_INVALID`; all map to the opaque
//!   integrity error.

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

/// Which wrap mechanism to use for new wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MechanismPreference {
    /// Probe: AES-KW, then 0x210A, then AES-GCM.
    #[default]
    Auto,
    /// Only `CKM_AES_KEY_WRAP`.
    AesKw,
    /// Only `CKM_AES_KEY_WRAP_PAD` (0x210A).
    AesKwPad,
    /// Only `CKM_AES_GCM` encryption of the key bytes.
    AesGcm,
}

/// Everything needed to reach the KEK. The PIN is already resolved from its source.
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, the HSM vendor's library).
    pub module: PathBuf,
    /// Token label to find the token by.
    pub token_label: Option<String>,
    /// Token serial to find the token by (checked too when both are given).
    pub token_serial: Option<String>,
    /// CKA_LABEL of the KEK.
    pub key_label: String,
    /// CKA_ID of the KEK, when the label alone is ambiguous.
    pub key_id: Option<Vec<u8>>,
    /// User PIN.
    pub pin: SecretString,
    /// Mechanism for new wraps.
    pub mechanism: MechanismPreference,
    /// Upper bound on open sessions.
    pub max_sessions: usize,
}

impl std::fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("token_serial", &self.token_serial)
            .field("key_label", &self.key_label)
            .field("key_id", &self.key_id.as_ref().map(|i| hex(i)))
            .field("mechanism", &self.mechanism)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// One loaded PKCS#11 module, shared by every root in the process.
struct Module {
    ctx: Pkcs11,
    /// Bumped on every re-initialisation; sessions from an older generation are dead.
    generation: AtomicU64,
    reinit: Mutex<()>,
}

fn module(path: &Path) -> Result<Arc<Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    let mut map = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = map.get(path) {
        return Ok(m.clone());
    }
    if !path.exists() {
        return Err(Error::Hardware {
            backend: BACKEND,
            operation: "loading module",
            detail: format!("PKCS#11 module not found at {}", path.display()),
        });
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::Hardware {
        backend: BACKEND,
        operation: "loading module",
        detail: format!("{}: {e}", path.display()),
    })?;
    initialize(&ctx)?;
    let m = Arc::new(Module { ctx, generation: AtomicU64::new(0), reinit: Mutex::new(()) });
    map.insert(path.to_owned(), m.clone());
    Ok(m)
}

fn initialize(ctx: &Pkcs11) -> Result<()> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(hw("C_Initialize", e)),
    }
}

impl Module {
    /// Finalises and re-initialises the module, once per observed generation.
    fn reinitialize(&self, seen: u64) -> Result<()> {
        let _g = self.reinit.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(()); // someone else already did
        }
        tracing::warn!(backend = BACKEND, "re-initialising the PKCS#11 module after a device error");
        // C_Finalize may fail if the library was already finalised underneath us.
        let _ = self.ctx.clone().finalize();
        initialize(&self.ctx)?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

fn hw(operation: &'static str, e: CkError) -> Error {
    Error::Hardware { backend: BACKEND, operation, detail: ck_detail(&e) }
}

fn ck_detail(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f:?} returned CKR_{}", rv_name(*rv)),
        other => other.to_string(),
    }
}

fn rv_name(rv: RvError) -> String {
    // "PinIncorrect" -> "PIN_INCORRECT"
    let s = format!("{rv:?}");
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out.replace("P_I_N", "PIN")
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// What to do after a failed call.
enum Recovery {
    /// Drop pooled sessions, retry with a fresh one.
    Session,
    /// Re-initialise the module, find token and key again, retry.
    Device,
    /// Give up.
    None,
}

fn recovery_for(e: &CkError) -> Recovery {
    match rv(e) {
        Some(RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::UserNotLoggedIn) => Recovery::Session,
        Some(
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid,
        ) => Recovery::Device,
        _ => Recovery::None,
    }
}

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

impl std::fmt::Debug for Pkcs11Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Root")
            .field("settings", &self.settings)
            .field("mechanism", &self.mechanism)
            .field("token_serial", &self.token_serial)
            .finish_non_exhaustive()
    }
}

fn key_template_find(label: &str, id: Option<&[u8]>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    if let Some(id) = id {
        t.push(Attribute::Id(id.to_vec()));
    }
    t
}

fn find_slot(ctx: &Pkcs11, s: &Pkcs11Settings) -> Result<(Slot, String, String)> {
    let slots = ctx.get_slots_with_token().map_err(|e| hw("C_GetSlotList", e))?;
    let mut seen = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(_) => continue,
        };
        let label = info.label().trim().to_string();
        let serial = info.serial_number().trim().to_string();
        let label_ok = s.token_label.as_deref().is_none_or(|l| l == label);
        let serial_ok = s.token_serial.as_deref().is_none_or(|x| x == serial);
        if label_ok && serial_ok && info.token_initialized() {
            return Ok((slot, serial, label));
        }
        seen.push(format!("{label:?} (serial {serial})"));
    }
    let wanted = match (&s.token_label, &s.token_serial) {
        (Some(l), Some(x)) => format!("label {l:?} and serial {x}"),
        (Some(l), None) => format!("label {l:?}"),
        (None, Some(x)) => format!("serial {x}"),
        (None, None) => "any initialised token".into(),
    };
    Err(Error::Hardware {
        backend: BACKEND,
        operation: "finding the token",
        detail: format!(
            "no token with {wanted} in module {}; tokens present: {}",
            s.module.display(),
            if seen.is_empty() { "none".into() } else { seen.join(", ") }
        ),
    })
}

fn login(session: &Session, pin: &SecretString) -> Result<()> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            r @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::UserPinNotInitialized),
            _,
        )) => Err(Error::Auth { backend: BACKEND, detail: format!("C_Login returned CKR_{}", rv_name(r)) }),
        Err(e) => Err(hw("C_Login", e)),
    }
}

fn find_key(session: &Session, s: &Pkcs11Settings) -> Result<Option<(ObjectHandle, Vec<u8>)>> {
    let found = session
        .find_objects(&key_template_find(&s.key_label, s.key_id.as_deref()))
        .map_err(|e| hw("C_FindObjects", e))?;
    match found.as_slice() {
        [] => Ok(None),
        [h] => {
            let id = session
                .get_attributes(*h, &[AttributeType::Id])
                .map_err(|e| hw("C_GetAttributeValue", e))?
                .into_iter()
                .find_map(|a| if let Attribute::Id(v) = a { Some(v) } else { None })
                .unwrap_or_default();
            Ok(Some((*h, id)))
        }
        many => Err(Error::Config(format!(
            "{} keys in the token are labelled {:?}; set key_id in the config to choose one",
            many.len(),
            s.key_label
        ))),
    }
}

fn probe_mechanism(ctx: &Pkcs11, slot: Slot, pref: MechanismPreference) -> Result<WrapMechanism> {
    // get_mechanism_list silently drops types cryptoki does not know; we only ask
    // about types it does.
    let listed = ctx.get_mechanism_list(slot).map_err(|e| hw("C_GetMechanismList", e))?;
    let can = |t: MechanismType, wrap: bool| {
        listed.contains(&t)
            && ctx
                .get_mechanism_info(slot, t)
                .is_ok_and(|i| if wrap { i.wrap() && i.unwrap() } else { i.encrypt() && i.decrypt() })
    };
    let kw = can(MechanismType::AES_KEY_WRAP, true);
    let kwpad = can(MechanismType::AES_KEY_WRAP_PAD, true);
    let gcm = can(MechanismType::AES_GCM, false);
    let pick = match pref {
        MechanismPreference::Auto if kw => Some(WrapMechanism::AesKw),
        MechanismPreference::Auto if kwpad => Some(WrapMechanism::AesKwPadSofthsm),
        MechanismPreference::Auto if gcm => Some(WrapMechanism::AesGcm),
        MechanismPreference::AesKw if kw => Some(WrapMechanism::AesKw),
        MechanismPreference::AesKwPad if kwpad => Some(WrapMechanism::AesKwPadSofthsm),
        MechanismPreference::AesGcm if gcm => Some(WrapMechanism::AesGcm),
        _ => None,
    };
    pick.ok_or_else(|| Error::Hardware {
        backend: BACKEND,
        operation: "probing mechanisms",
        detail: format!(
            "the token offers none of the requested wrap mechanisms ({pref:?}); it has AES-KW: {kw}, AES-KW-PAD: {kwpad}, AES-GCM: {gcm}"
        ),
    })
}

fn ck_mechanism(m: WrapMechanism) -> Option<Mechanism<'static>> {
    match m {
        WrapMechanism::AesKw => Some(Mechanism::AesKeyWrap),
        WrapMechanism::AesKwPadSofthsm => Some(Mechanism::AesKeyWrapPad),
        _ => None,
    }
}

fn dek_value(session: &Session, h: ObjectHandle) -> Result<DekMaterial> {
    let attrs = session.get_attributes(h, &[AttributeType::Value]).map_err(|e| hw("C_GetAttributeValue", e))?;
    for a in attrs {
        if let Attribute::Value(v) = a {
            // Wrap on the line it arrives: cryptoki hands back a bare Vec.
            let v = Zeroizing::new(v);
            return DekMaterial::from_slice(&v);
        }
    }
    Err(Error::Hardware {
        backend: BACKEND,
        operation: "reading a data key",
        detail: "the token did not return CKA_VALUE of a session key".into(),
    })
}

fn dek_template(value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    if let Some(v) = value {
        t.push(Attribute::Value(v));
    }
    t
}

fn scrub(template: &mut [Attribute]) {
    for a in template {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

impl Pkcs11Root {
    /// Connects to the token and finds the existing KEK.
    pub fn open(settings: Pkcs11Settings) -> Result<Self> {
        Self::connect(settings, false)
    }

    /// Connects, and generates the KEK in the token if none carries the label yet.
    /// An existing key is adopted only if it is sensitive and not extractable.
    pub fn open_or_generate(settings: Pkcs11Settings) -> Result<Self> {
        Self::connect(settings, true)
    }

    fn connect(settings: Pkcs11Settings, generate: bool) -> Result<Self> {
        let module = module(&settings.module)?;
        let generation = module.generation.load(Ordering::Acquire);
        let (slot, token_serial, token_label) = find_slot(&module.ctx, &settings)?;
        let session = module.ctx.open_rw_session(slot).map_err(|e| hw("C_OpenSession", e))?;
        login(&session, &settings.pin)?;

        let (key, key_id, mechanism) = match find_key(&session, &settings)? {
            Some((key, id)) => {
                check_adoptable(&session, key, &settings.key_label)?;
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
            let result = f(&pooled.session, key);
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
            self.relocate()?;
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
                let session = match self.module.ctx.open_rw_session(slot) {
                    Ok(s) => s,
                    Err(e) => {
                        self.release_slot();
                        return Err(hw("C_OpenSession", e));
                    }
                };
                if let Err(e) = login(&session, &self.settings.pin) {
                    drop(session);
                    self.release_slot();
                    return Err(e);
                }
                return Ok((PooledSession { generation, session }, key));
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

    fn discard(&self, s: PooledSession) {
        drop(s); // C_CloseSession; an error on a dead handle is irrelevant
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
        }
    }

    fn gcm_wrap(&self, dek: &[u8; 32]) -> Result<Wrapped> {
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| Error::Hardware {
            backend: "os",
            operation: "getrandom",
            detail: e.to_string(),
        })?;
        let ct = self.with_session(
            |s, kek| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, GCM_WRAP_AAD, 128.into())?;
                s.encrypt(&Mechanism::AesGcm(params), kek, dek)
            },
            |e| hw("C_Encrypt", e),
        )?;
        let mut blob = iv.to_vec();
        blob.extend_from_slice(&ct);
        Ok(Wrapped { mechanism: WrapMechanism::AesGcm, blob })
    }
}

/// AAD of the GCM fallback wrap, so a blob cannot be confused with other GCM output.
const GCM_WRAP_AAD: &[u8] = b"tokenguard/dek-wrap/v1";

fn generate_kek(session: &Session, s: &Pkcs11Settings, mech: WrapMechanism) -> Result<(ObjectHandle, Vec<u8>)> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| Error::Hardware {
        backend: "os",
        operation: "getrandom",
        detail: e.to_string(),
    })?;
    let id = s.key_id.clone().unwrap_or_else(|| id.to_vec());
    let kw = mech != WrapMechanism::AesGcm;
    // Only the usages the mechanism needs; nothing else.
    let template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Label(s.key_label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Wrap(kw),
        Attribute::Unwrap(kw),
        Attribute::Encrypt(!kw),
        Attribute::Decrypt(!kw),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    let h = session.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| hw("C_GenerateKey (root key)", e))?;
    tracing::info!(backend = BACKEND, label = %s.key_label, "generated a new root key in the token");
    Ok((h, id))
}

fn bool_attr(session: &Session, key: ObjectHandle, t: AttributeType) -> Result<Option<bool>> {
    let attrs = session.get_attributes(key, &[t]).map_err(|e| hw("C_GetAttributeValue", e))?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Sensitive(b)
        | Attribute::Extractable(b)
        | Attribute::NeverExtractable(b)
        | Attribute::AlwaysSensitive(b)
        | Attribute::Local(b)
        | Attribute::Wrap(b)
        | Attribute::Unwrap(b)
        | Attribute::Encrypt(b)
        | Attribute::Decrypt(b) => Some(b),
        _ => None,
    }))
}

fn check_adoptable(session: &Session, key: ObjectHandle, label: &str) -> Result<()> {
    let sensitive = bool_attr(session, key, AttributeType::Sensitive)?;
    let extractable = bool_attr(session, key, AttributeType::Extractable)?;
    if sensitive != Some(true) || extractable != Some(false) {
        return Err(Error::Config(format!(
            "refusing root key {label:?}: it must be CKA_SENSITIVE=true and CKA_EXTRACTABLE=false \
             (found sensitive={sensitive:?}, extractable={extractable:?}); generate a new one with `tokenguard init`"
        )));
    }
    Ok(())
}

fn key_mechanism(
    ctx: &Pkcs11,
    slot: Slot,
    session: &Session,
    key: ObjectHandle,
    pref: MechanismPreference,
) -> Result<WrapMechanism> {
    let wrap = bool_attr(session, key, AttributeType::Wrap)?.unwrap_or(false);
    let encrypt = bool_attr(session, key, AttributeType::Encrypt)?.unwrap_or(false);
    let pref = match pref {
        MechanismPreference::Auto if !wrap && encrypt => MechanismPreference::AesGcm,
        p => p,
    };
    probe_mechanism(ctx, slot, pref)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unwrap_error(e: CkError) -> Error {
    match rv(&e) {
        // A blob that is not ours, was modified, or a different key: SoftHSM2 says
        // GENERAL_ERROR, kryoptic DEVICE_ERROR, others WRAPPED_KEY_INVALID.
        Some(
            RvError::GeneralError
            | RvError::DeviceError
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::MechanismParamInvalid
            | RvError::FunctionFailed,
        ) => Error::integrity("unwrapping a data key"),
        _ => hw("C_UnwrapKey", e),
    }
}

impl RootKey for Pkcs11Root {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_policy_bound(&self) -> bool {
        false
    }

    fn is_hardware(&self) -> bool {
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
                out.push(Check::new("CKA_SENSITIVE", sensitive == Some(true), format!("{sensitive:?}")));
                out.push(Check::new(
                    "CKA_EXTRACTABLE is false",
                    extractable == Some(false),
                    format!("{extractable:?}"),
                ));
                out.push(Check::new(
                    "CKA_NEVER_EXTRACTABLE",
                    never_ex == Some(true),
                    format!("{never_ex:?} (false means the key was once extractable: it may exist outside the token)"),
                ));
                out.push(Check::new(
                    "CKA_LOCAL",
                    local == Some(true),
                    format!("{local:?} (false means the key was imported, not generated in the token)"),
                ));
                out.push(Check::new("wrap mechanism", true, self.mechanism.to_string()));
            }
            Err(e) => out.push(Check::new("root key attributes", false, e.to_string())),
        }
        out
    }
}

/// Initialises a fresh token in the first free slot of `module` and sets its user
/// PIN; returns the token's serial. For development and test tokens (SoftHSM2,
/// kryoptic); production HSMs are initialised with their vendor's tools. An existing
/// token with the same label is left untouched and its serial returned.
pub fn init_token(module_path: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<String> {
    let m = module(module_path)?;
    let ctx = &m.ctx;
    let find = |label: &str| -> Result<Option<(Slot, String)>> {
        for slot in ctx.get_slots_with_token().map_err(|e| hw("C_GetSlotList", e))? {
            let info = ctx.get_token_info(slot).map_err(|e| hw("C_GetTokenInfo", e))?;
            if info.token_initialized() && info.label().trim() == label {
                return Ok(Some((slot, info.serial_number().trim().to_string())));
            }
        }
        Ok(None)
    };
    if let Some((_, serial)) = find(label)? {
        return Ok(serial);
    }
    let free = ctx
        .get_slots_with_token()
        .map_err(|e| hw("C_GetSlotList", e))?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| Error::Hardware {
            backend: BACKEND,
            operation: "initialising a token",
            detail: "no free slot in the module".into(),
        })?;
    ctx.init_token(free, so_pin, label).map_err(|e| hw("C_InitToken", e))?;
    // SoftHSM2 moves an initialised token to a new slot id: find it again by label.
    let (slot, serial) = match find(label)? {
        Some(x) => x,
        None => {
            m.reinitialize(m.generation.load(Ordering::Acquire))?;
            find(label)?.ok_or_else(|| Error::Hardware {
                backend: BACKEND,
                operation: "initialising a token",
                detail: format!("token {label:?} not found after C_InitToken"),
            })?
        }
    };
    let session = ctx.open_rw_session(slot).map_err(|e| hw("C_OpenSession", e))?;
    session.login(UserType::So, Some(so_pin)).map_err(|e| hw("C_Login (SO)", e))?;
    session.init_pin(user_pin).map_err(|e| hw("C_InitPIN", e))?;
    let _ = session.logout();
    Ok(serial)
}
