//! The loaded PKCS#11 module (one per path per process), its re-initialisation after a
//! device error, and the mapping of PKCS#11 return values to errors and recovery.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One loaded PKCS#11 module, shared by every root in the process.
pub(super) struct Module {
    pub(super) ctx: Pkcs11,
    /// Bumped on every re-initialisation; sessions from an older generation are dead.
    pub(super) generation: AtomicU64,
    pub(super) reinit: Mutex<()>,
}

pub(super) fn module(path: &Path) -> Result<Arc<Module>> {
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

pub(super) fn initialize(ctx: &Pkcs11) -> Result<()> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(hw("C_Initialize", e)),
    }
}

impl Module {
    /// Finalises and re-initialises the module, once per observed generation.
    pub(super) fn reinitialize(&self, seen: u64) -> Result<()> {
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

pub(super) fn hw(operation: &'static str, e: CkError) -> Error {
    Error::Hardware { backend: BACKEND, operation, detail: ck_detail(&e) }
}

pub(super) fn ck_detail(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f:?} returned CKR_{}", rv_name(*rv)),
        other => other.to_string(),
    }
}

pub(super) fn rv_name(rv: RvError) -> String {
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

pub(super) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// What to do after a failed call.
pub(super) enum Recovery {
    /// Drop pooled sessions, retry with a fresh one.
    Session,
    /// Re-initialise the module, find token and key again, retry.
    Device,
    /// Give up.
    None,
}

pub(super) fn recovery_for(e: &CkError) -> Recovery {
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

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn unwrap_error(e: CkError) -> Error {
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

/// SoftHSM2's token directory, read from the file `SOFTHSM2_CONF` names; `None`
/// when that is not set (another module).
pub(super) fn softhsm_token_dir() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(std::env::var_os("SOFTHSM2_CONF")?).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "directories.tokendir").then(|| std::path::PathBuf::from(v.trim()))
    })
}

/// SoftHSM2 token files left empty: the sign of a process killed while it logged in
/// (SoftHSM2 truncates `token.object` and writes it again on every login). Empty
/// when the module is not SoftHSM2.
pub fn softhsm_empty_token_files() -> Vec<std::path::PathBuf> {
    let Some(Ok(entries)) = softhsm_token_dir().map(std::fs::read_dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path().join("token.object"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == 0))
        .collect()
}
