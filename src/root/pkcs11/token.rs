//! Talking to the token: finding it and the key, logging in, probing mechanisms,
//! generating and vetting the KEK, DEK templates, and `init_token` for development
//! tokens.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn key_template_find(label: &str, id: Option<&[u8]>) -> Vec<Attribute> {
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

pub(super) fn find_slot(ctx: &Pkcs11, s: &Pkcs11Settings) -> Result<(Slot, String, String)> {
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

pub(super) fn login(session: &Session, pin: &SecretString) -> Result<()> {
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

pub(super) fn find_key(session: &Session, s: &Pkcs11Settings) -> Result<Option<(ObjectHandle, Vec<u8>)>> {
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

pub(super) fn probe_mechanism(ctx: &Pkcs11, slot: Slot, pref: MechanismPreference) -> Result<WrapMechanism> {
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

pub(super) fn ck_mechanism(m: WrapMechanism) -> Option<Mechanism<'static>> {
    match m {
        WrapMechanism::AesKw => Some(Mechanism::AesKeyWrap),
        WrapMechanism::AesKwPadSofthsm => Some(Mechanism::AesKeyWrapPad),
        _ => None,
    }
}

pub(super) fn dek_value(session: &Session, h: ObjectHandle) -> Result<DekMaterial> {
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

pub(super) fn dek_template(value: Option<Vec<u8>>) -> Vec<Attribute> {
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

pub(super) fn scrub(template: &mut [Attribute]) {
    for a in template {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

/// AAD of the GCM fallback wrap, so a blob cannot be confused with other GCM output.
pub(super) const GCM_WRAP_AAD: &[u8] = b"tokenguard/dek-wrap/v1";

pub(super) fn generate_kek(
    session: &Session,
    s: &Pkcs11Settings,
    mech: WrapMechanism,
) -> Result<(ObjectHandle, Vec<u8>)> {
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

pub(super) fn bool_attr(session: &Session, key: ObjectHandle, t: AttributeType) -> Result<Option<bool>> {
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

pub(super) fn check_adoptable(session: &Session, key: ObjectHandle, label: &str) -> Result<()> {
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

pub(super) fn key_mechanism(
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

/// Initialises a fresh token in the first free slot of `module` and sets its user
/// PIN; returns the token's serial. For development and test tokens (SoftHSM2,
/// kryoptic); production HSMs are initialised with their vendor's tools. An existing
/// token with the same label is left untouched and its serial returned.
pub fn init_token(module_path: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<String> {
    let _lock = super::lock::TokenLock::exclusive(module_path)?;
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
