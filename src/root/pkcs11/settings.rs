//! The PKCS#11 backend's own settings: parsed from its config entry (RFC 7512 URI,
//! key id in hex, PIN source), so the config file's schema knows nothing of them.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::module::hex;
use crate::config::{Pkcs11Config, resolve_path};
use crate::error::{Error, Result};

/// Which wrap mechanism to use for new wraps (the config's `mechanism`).
pub use crate::config::Mechanism as MechanismPreference;

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
    /// Label of the store's rollback counter (a data object in the token); `None`:
    /// no counter from this root.
    pub counter_label: Option<String>,
    /// Whether `init`/`root add` may adopt an imported key (`CKA_LOCAL` false).
    pub allow_imported_key: bool,
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

/// The key label used when the config names none.
pub const DEFAULT_KEY_LABEL: &str = "tokenguard-root";
/// Sessions open at once when the config says nothing.
pub const DEFAULT_MAX_SESSIONS: usize = 4;

impl Pkcs11Settings {
    /// Settings from a `[[roots]]` pkcs11 entry: the URI and the separate keys (keys
    /// override the URI), paths resolved against `base_dir`, and the PIN read from
    /// its source.
    pub fn from_config(p: &Pkcs11Config, base_dir: &Path) -> Result<Self> {
        let uri = p.uri.as_deref().map(Pkcs11Uri::parse).transpose()?.unwrap_or_default();
        let module = p
            .module
            .clone()
            .or(uri.module_path.map(PathBuf::from))
            .ok_or_else(|| Error::Config("pkcs11 root needs module (or module-path in the uri)".into()))?;
        let pin_source = p
            .pin_source
            .clone()
            .or(uri.pin_source)
            .ok_or_else(|| Error::Config("pkcs11 root needs pin_source (env:VAR, file:PATH or prompt)".into()))?;
        let token_label = p.token_label.clone().or(uri.token);
        let token_serial = p.token_serial.clone().or(uri.serial);
        if token_label.is_none() && token_serial.is_none() {
            return Err(Error::Config(
                "pkcs11 root needs token_label or token_serial: tokens are never chosen by slot number".into(),
            ));
        }
        let key_id = match &p.key_id {
            Some(h) => Some(hex_decode(h)?),
            None => uri.id,
        };
        Ok(Pkcs11Settings {
            module: resolve_path(base_dir, &module),
            token_label,
            token_serial,
            key_label: p.key_label.clone().or(uri.object).unwrap_or_else(|| DEFAULT_KEY_LABEL.into()),
            key_id,
            pin: crate::pin::resolve_pin(&pin_source, base_dir)?,
            mechanism: p.mechanism,
            max_sessions: p.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            counter_label: p.counter_label.clone(),
            allow_imported_key: p.allow_imported_key,
        })
    }
}

/// Decodes a hex key id. Works on bytes, so no input (multi-byte characters
/// included) can make it slice a string inside a character.
fn hex_decode(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::Config(format!("key_id must be hex digits, two per byte: {s:?}"));
    let digit = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(bad());
    }
    b.chunks_exact(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(bad()),
        })
        .collect()
}

/// A parsed RFC 7512 PKCS#11 URI (the parts tokenguard uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`.
    pub token: Option<String>,
    /// `serial=`.
    pub serial: Option<String>,
    /// `object=`.
    pub object: Option<String>,
    /// `id=` (raw bytes).
    pub id: Option<Vec<u8>>,
    /// `type=`.
    pub object_type: Option<String>,
    /// `module-path=`.
    pub module_path: Option<String>,
    /// `pin-source=`.
    pub pin_source: Option<String>,
}

fn pct_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex =
                s.get(i + 1..i + 3).ok_or_else(|| Error::Config(format!("bad percent-escape in pkcs11 URI: {s:?}")))?;
            let v = u8::from_str_radix(hex, 16)
                .map_err(|_| Error::Config(format!("bad percent-escape in pkcs11 URI: {s:?}")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_str(s: &str) -> Result<String> {
    String::from_utf8(pct_decode(s)?).map_err(|_| Error::Config("pkcs11 URI attribute is not UTF-8".into()))
}

impl Pkcs11Uri {
    /// Parses `pkcs11:path-attrs?query-attrs`. Unknown attributes are rejected, and so
    /// is `pin-value`: a PIN never goes in a URI.
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri.strip_prefix("pkcs11:").ok_or_else(|| Error::Config(format!("not a pkcs11: URI: {uri:?}")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut u = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("pkcs11 URI attribute without '=': {attr:?}")))?;
            match k {
                "token" => u.token = Some(pct_str(v)?),
                "serial" => u.serial = Some(pct_str(v)?),
                "object" => u.object = Some(pct_str(v)?),
                "id" => u.id = Some(pct_decode(v)?),
                "type" => u.object_type = Some(pct_str(v)?),
                "manufacturer"
                | "model"
                | "library-description"
                | "library-manufacturer"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => {
                    return Err(Error::Config(format!("unsupported pkcs11 URI path attribute {other:?}")));
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("pkcs11 URI query attribute without '=': {attr:?}")))?;
            match k {
                "module-path" => u.module_path = Some(pct_str(v)?),
                "pin-source" => u.pin_source = Some(pct_str(v)?),
                "pin-value" => {
                    return Err(Error::Config(
                        "pin-value in a pkcs11 URI is refused: put the PIN in a 0600 file or an environment variable and use pin-source".into(),
                    ));
                }
                "module-name" => {}
                other => {
                    return Err(Error::Config(format!("unsupported pkcs11 URI query attribute {other:?}")));
                }
            }
        }
        if let Some(t) = &u.object_type
            && t != "secret-key"
        {
            return Err(Error::Config(format!("the root key must be type=secret-key, not {t:?}")));
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc7512_uri() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=my%20token;object=tokenguard-root;id=%01%ff;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin",
        )
        .expect("parse");
        assert_eq!(u.token.as_deref(), Some("my token"));
        assert_eq!(u.object.as_deref(), Some("tokenguard-root"));
        assert_eq!(u.id, Some(vec![0x01, 0xff]));
        assert_eq!(u.module_path.as_deref(), Some("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.pin_source.as_deref(), Some("file:/etc/pin"));
    }

    #[test]
    fn refuses_pin_value_and_wrong_type() {
        let e = Pkcs11Uri::parse("pkcs11:token=t?pin-value=1234").expect_err("must refuse");
        assert!(!e.to_string().contains("1234"), "{e}");
        assert!(Pkcs11Uri::parse("pkcs11:token=t;type=private").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=%zz").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:id=%e9").is_ok(), "raw bytes are fine in an id");
        assert!(Pkcs11Uri::parse("pkcs11:token=%e9").is_err(), "but not in a label");
        assert!(Pkcs11Uri::parse("https://x").is_err());
    }

    #[test]
    fn key_id_hex_never_panics() {
        assert_eq!(hex_decode("01ff").expect("hex"), vec![0x01, 0xff]);
        // A multi-byte character used to make the decoder slice inside it and panic.
        for bad in ["aéb", "é", "0", "zz", "0x01", "+1"] {
            assert!(hex_decode(bad).is_err(), "{bad:?}");
        }
    }
}
