//! The `age` root: every data key and the integrity key encrypted to one age X25519
//! recipient (the `age` crate, age-encryption.org/v1), so a root whose private half is
//! offline — a custodian's key, or an identity split among custodians — still wraps
//! every new key.
//!
//! Wrapping needs the public recipient and the root's *authentication key*, a one-way
//! hash of the identity that decrypts nothing (`auth_key_source`): each wrap carries
//! an HMAC tag under it, so a recovery can tell the service's wraps from wraps anyone
//! could make to the recipient. Unwrapping needs the identity: from `identity_file`
//! (plain, or passphrase-protected with the passphrase from `passphrase_source`), or
//! rebuilt in memory from custodians' shares (`tokenguard recovery combine`,
//! [`crate::recovery`]). Without one the root is *wrap-only* ([`RootKey::can_unwrap`]
//! is false): the guard never asks it to unwrap, and `doctor` reports it as expected.
//! An age root is never hardware: under `require_hardware = true` it may wrap, never
//! open (docs/DESIGN-NOTES.md §"Escrow roots").
//!
//! A wrapped key is a binary age file of the 32 key bytes and their 32-byte tag:
//! `age -d -i IDENTITY` decrypts it (docs/FORMAT.md §"age wrap").

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use age::secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Check, RootIdentity, RootKey, WrapMechanism, Wrapped};
use crate::error::{Error, Result};
use crate::secret::DekMaterial;

/// An age X25519 identity (the private half), held in memory only: zeroized on drop
/// (x25519-dalek's `StaticSecret`), never printed.
#[derive(Clone)]
pub struct AgeIdentity(age::x25519::Identity);

impl fmt::Debug for AgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AgeIdentity").field(&self.recipient()).finish()
    }
}

impl AgeIdentity {
    /// A fresh identity from the operating system's CSPRNG.
    pub fn generate() -> Self {
        AgeIdentity(age::x25519::Identity::generate())
    }

    /// Its public recipient, `age1…`.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }

    /// Parses `AGE-SECRET-KEY-1…`. The error never quotes the text.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        age::x25519::Identity::from_str(text.trim()).ok().map(AgeIdentity)
    }

    /// The identity's Bech32 text, `AGE-SECRET-KEY-1…`, in a zeroizing string.
    pub(crate) fn secret_text(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.to_string().expose_secret().to_string())
    }

    /// Writes the identity as an age identity file (the form `age-keygen` writes and
    /// `age -d -i` reads) at `path`: mode 0600, never overwriting.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let header = format!(
            "# created by tokenguard at {}\n# public key: {}\n",
            crate::clock::rfc3339(crate::clock::now()),
            self.recipient()
        );
        let secret = self.secret_text();
        // Allocated at its final size: no growing buffer leaves an unwiped copy.
        let mut text = Zeroizing::new(String::with_capacity(header.len() + secret.len() + 1));
        text.push_str(&header);
        text.push_str(&secret);
        text.push('\n');
        crate::files::write_new_private(path, text.as_bytes())
    }

    /// Reads the identities of an age identity file. A passphrase-protected file (an
    /// age file encrypted with a passphrase, binary or armored) needs
    /// `passphrase_source`. Only X25519 identities are supported; no line of the file
    /// is ever quoted in an error.
    pub fn load(path: &Path, passphrase_source: Option<&str>, base: &Path) -> Result<Vec<Self>> {
        crate::files::check_private(path, "age identity file")?;
        let raw = Zeroizing::new(std::fs::read(path).map_err(Error::io("reading", path))?);
        let text = if is_age_file(&raw) {
            let Some(source) = passphrase_source else {
                return Err(Error::Config(format!(
                    "age identity file {} is passphrase-protected: set passphrase_source (env:VAR, file:PATH or prompt)",
                    path.display()
                )));
            };
            let passphrase = crate::pin::resolve_pin(source, base)?;
            let identity = age::scrypt::Identity::new(passphrase);
            let bad = |what: &str| Error::Config(format!("age identity file {}: {what}", path.display()));
            let armored = age::armor::ArmoredReader::new(&raw[..]);
            let d = age::Decryptor::new(armored).map_err(|_| bad("not a readable age file"))?;
            // The plaintext is shorter than the file: no reallocation while reading.
            let mut plain = Zeroizing::new(Vec::with_capacity(raw.len()));
            d.decrypt(std::iter::once(&identity as &dyn age::Identity))
                .and_then(|mut r| r.read_to_end(&mut plain).map_err(age::DecryptError::from))
                .map_err(|_| bad("the passphrase does not open it (or it is damaged)"))?;
            plain
        } else {
            raw
        };
        let text = std::str::from_utf8(&text)
            .map_err(|_| Error::Config(format!("age identity file {} is not UTF-8 text", path.display())))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(Self::parse(line).ok_or_else(|| {
                Error::Config(format!(
                    "age identity file {}, line {}: not an age X25519 identity (AGE-SECRET-KEY-1…); plugin and \
                     SSH identities are not supported",
                    path.display(),
                    n + 1
                ))
            })?);
        }
        if out.is_empty() {
            return Err(Error::Config(format!("age identity file {} holds no identity", path.display())));
        }
        Ok(out)
    }
}

/// Whether `raw` is an age file (binary or ASCII-armored) rather than identity text.
pub(crate) fn is_age_file(raw: &[u8]) -> bool {
    raw.starts_with(b"age-encryption.org/") || raw.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----")
}

/// Parses an `age1…` X25519 recipient; the error names it (it is public).
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(text.trim()).map_err(|e| {
        if text.trim_start().to_ascii_uppercase().starts_with("AGE-SECRET-KEY") {
            // Never echoed: this is an identity, given where its public key belongs.
            return Error::Config(
                "an age identity (AGE-SECRET-KEY-1…) was given where a recipient belongs; give its public key \
                 (`age-keygen -y KEY`), and treat that identity as exposed"
                    .into(),
            );
        }
        Error::Config(format!(
            "{text:?} is not an age X25519 recipient (age1…): {e}; plugin recipients are not supported"
        ))
    })
}

/// Encrypts `plain` to `recipients` as one age file; `armor` writes the ASCII form.
pub(crate) fn encrypt_to(recipients: &[age::x25519::Recipient], plain: &[u8], armor: bool) -> Result<Vec<u8>> {
    let failed = |_| Error::integrity("encrypting to age recipients");
    let e = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|_| Error::Config("no age recipient to encrypt to".into()))?;
    let mut out = Vec::new();
    let format = if armor { age::armor::Format::AsciiArmor } else { age::armor::Format::Binary };
    let armored = age::armor::ArmoredWriter::wrap_output(&mut out, format).map_err(failed)?;
    let mut w = e.wrap_output(armored).map_err(failed)?;
    w.write_all(plain).map_err(failed)?;
    w.finish().and_then(|a| a.finish()).map_err(failed)?;
    Ok(out)
}

/// Decrypts an age file (binary or armored) with `identities`, reading at most
/// `limit` bytes of plaintext. `None` when none of them opens it or it is damaged.
pub(crate) fn decrypt_with(identities: &[AgeIdentity], file: &[u8], limit: usize) -> Option<Zeroizing<Vec<u8>>> {
    let d = age::Decryptor::new(age::armor::ArmoredReader::new(file)).ok()?;
    let mut r = d.decrypt(identities.iter().map(|i| &i.0 as &dyn age::Identity)).ok()?;
    let mut out = Zeroizing::new(Vec::with_capacity(limit + 1));
    // One byte past the limit tells an over-long plaintext from one that fits.
    r.by_ref().take(u64::try_from(limit).unwrap_or(u64::MAX) + 1).read_to_end(&mut out).ok()?;
    (out.len() <= limit).then_some(out)
}

/// The authentication key of an age root whose identity is `identity`:
/// `SHA-256("tokenguard/age-escrow-auth-key/v1" ‖ identity text)`. It cannot decrypt
/// anything; it lets the service make wraps a recovery can tell from wraps anyone
/// could make to the public recipient (docs/FORMAT.md §"age wrap").
pub fn auth_key_of(identity: &AgeIdentity) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"tokenguard/age-escrow-auth-key/v1");
    h.update(identity.secret_text().as_bytes());
    Zeroizing::new(h.finalize().into())
}

/// Parses an authentication key as `recovery split` and `recovery auth-key` write
/// it: the recipient it belongs to and 64 hex digits, `age1… <hex>`. A key for another
/// recipient (files of two splits mixed up) is refused here, not found out in a
/// recovery. The error never quotes the key.
pub fn parse_auth_key(text: &str, recipient: &str) -> Result<Zeroizing<[u8; 32]>> {
    let bad = || {
        Error::Config(
            "an age root's authentication key is its recipient and 64 hex digits (`age1… <hex>`), as `tokenguard \
             recovery auth-key` writes it"
                .into(),
        )
    };
    let (named, hex) = text.trim().split_once(' ').ok_or_else(bad)?;
    let hex = hex.trim();
    let mut key = Zeroizing::new([0u8; 32]);
    let ok = hex.len() == 64
        && hex.as_bytes().chunks(2).zip(key.iter_mut()).all(|(pair, out)| {
            let digit = |c: u8| char::from(c).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => {
                    *out = u8::try_from(h * 16 + l).unwrap_or(0);
                    true
                }
                _ => false,
            }
        });
    if !ok {
        return Err(bad());
    }
    if named != recipient {
        return Err(Error::Config(format!(
            "the authentication key given for the age root {recipient} belongs to {}: the files of two escrow \
             roots (or splits) are mixed up",
            short(named)
        )));
    }
    Ok(key)
}

/// The authentication key as the file `recovery split` and `recovery auth-key`
/// write: the recipient, a space, 64 lowercase hex digits and a newline, in a
/// zeroizing string allocated at its final size.
pub fn auth_key_text(recipient: &str, key: &[u8; 32]) -> Zeroizing<String> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Zeroizing::new(String::with_capacity(recipient.len() + 66));
    out.push_str(recipient);
    out.push(' ');
    for b in key {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out.push('\n');
    out
}

/// Length of a wrap's plaintext: the key and its tag.
const WRAP_PLAIN_LEN: usize = 64;

/// The `age` root: one recipient, whose wraps carry a tag under the root's
/// authentication key.
pub struct AgeRoot {
    recipient: age::x25519::Recipient,
    /// Its `age1…` text, encoded once.
    name: String,
    /// The identity of `recipient`, when this process has it.
    identity: Option<AgeIdentity>,
    /// The authentication key: from the identity when there is one, else from
    /// `auth_key_source`.
    auth: Zeroizing<[u8; 32]>,
    /// Where the identity came from, for `doctor`.
    identity_from: Option<String>,
    /// The identity was rebuilt from shares in this process (none from a file).
    recovered_only: bool,
}

impl fmt::Debug for AgeRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgeRoot")
            .field("recipient", &self.name)
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl AgeRoot {
    /// A root for `recipient`. `identities` may hold its identity (others are
    /// ignored; a non-empty list without it is a mistake to report); `auth_key` is
    /// the authentication key, needed when the identity is absent and checked
    /// against it when present. `identity_from` names the identity's source.
    pub fn new(
        recipient: &str,
        identities: Vec<AgeIdentity>,
        identity_from: Option<String>,
        auth_key: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Self> {
        let parsed = parse_recipient(recipient)?;
        let name = parsed.to_string();
        let offered = identities.len();
        let identity = identities.into_iter().find(|i| i.recipient() == name);
        if offered > 0 && identity.is_none() {
            return Err(Error::Config(format!(
                "{} holds no identity for this age root's recipient {name}",
                identity_from.as_deref().unwrap_or("the identity given")
            )));
        }
        let auth = match (&identity, auth_key) {
            (Some(id), given) => {
                let derived = auth_key_of(id);
                if given.is_some_and(|g| !bool::from(subtle_eq(&g[..], &derived[..]))) {
                    return Err(Error::Config(format!(
                        "the authentication key configured for the age root {name} is not its identity's \
                         (`tokenguard recovery auth-key` derives the right one)"
                    )));
                }
                derived
            }
            (None, Some(key)) => key,
            (None, None) => {
                return Err(Error::Config(format!(
                    "the age root {name} needs auth_key_source (where its authentication key is read, as a PIN is): \
                     it lets a recovery tell this service's wraps from wraps anyone could make to the recipient. \
                     `tokenguard recovery split` writes it; `tokenguard recovery auth-key` derives it from an identity"
                )));
            }
        };
        let identity_from = identity.as_ref().and(identity_from);
        Ok(AgeRoot { recipient: parsed, name, identity, auth, identity_from, recovered_only: false })
    }

    /// The root of a `[[roots]] backend = "age"` entry, with the identity of its
    /// `identity_file`, or the one of `recovered` (rebuilt from shares in this
    /// process) that belongs to its recipient.
    pub fn from_config(c: &crate::config::AgeConfig, base: &Path, recovered: &[Arc<AgeIdentity>]) -> Result<Self> {
        let mut identities = Vec::new();
        let mut from = Vec::new();
        if let Some(path) = &c.identity_file {
            identities.extend(AgeIdentity::load(path, c.passphrase_source.as_deref(), base)?);
            from.push(format!("identity file {}", path.display()));
        }
        let name = parse_recipient(&c.recipient)?.to_string();
        let mine: Vec<AgeIdentity> =
            recovered.iter().filter(|i| i.recipient() == name).map(|i| (**i).clone()).collect();
        let recovered_only = c.identity_file.is_none() && !mine.is_empty();
        if !mine.is_empty() {
            identities.extend(mine);
            from.push("an identity rebuilt from custodians' shares".into());
        }
        // With the identity in hand the key derives from it, and a production
        // `auth_key_source` copied into a recovery config is not read (its file or
        // variable is usually not on the recovery host).
        let auth = match &c.auth_key_source {
            Some(src) if identities.is_empty() => {
                let text = crate::pin::resolve_pin(src, base)?;
                Some(parse_auth_key(age::secrecy::ExposeSecret::expose_secret(&text), &name)?)
            }
            _ => None,
        };
        let mut root = Self::new(&c.recipient, identities, (!from.is_empty()).then(|| from.join(" and ")), auth)?;
        root.recovered_only = recovered_only;
        Ok(root)
    }

    fn tag(&self, key: &[u8; 32]) -> [u8; 32] {
        crate::crypto::hmac(&self.auth, &[b"tokenguard/age-wrap/v1", self.name.as_bytes(), key])
    }

    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tokenguard/age-root/fingerprint/v1\n");
        h.update(self.name.as_bytes());
        h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Constant-time equality of two byte strings of equal length.
fn subtle_eq(a: &[u8], b: &[u8]) -> subtle::Choice {
    use subtle::ConstantTimeEq;
    a.ct_eq(b)
}

/// `age1abcdefgh…wxyz`: enough to tell recipients apart in a message.
fn short(r: &str) -> String {
    match (r.get(..12), r.get(r.len().saturating_sub(6)..)) {
        (Some(a), Some(b)) if r.len() > 20 => format!("{a}…{b}"),
        _ => r.to_string(),
    }
}

impl RootKey for AgeRoot {
    fn backend(&self) -> &'static str {
        "age"
    }

    fn is_hardware(&self) -> bool {
        false
    }

    fn can_unwrap(&self) -> bool {
        self.identity.is_some()
    }

    fn recovery_only(&self) -> bool {
        self.recovered_only
    }

    fn wraps_authenticate(&self) -> bool {
        false
    }

    fn is_policy_bound(&self) -> bool {
        false
    }

    fn identity(&self) -> Result<RootIdentity> {
        let fp = self.fingerprint();
        Ok(RootIdentity {
            backend: "age".into(),
            description: format!("age recipient {} (fingerprint {fp})", short(&self.name)),
            fingerprint: fp,
        })
    }

    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)> {
        super::generate_and_wrap(|dek| self.wrap(dek))
    }

    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped> {
        let mut plain = Zeroizing::new([0u8; WRAP_PLAIN_LEN]);
        plain[..32].copy_from_slice(dek.expose());
        plain[32..].copy_from_slice(&self.tag(dek.expose()));
        let blob = encrypt_to(std::slice::from_ref(&self.recipient), &plain[..], false)?;
        Ok(Wrapped { mechanism: WrapMechanism::Age, blob })
    }

    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial> {
        let Some(identity) = &self.identity else {
            return Err(Error::Config(
                "this age root is wrap-only (no identity configured): it cannot open a key".into(),
            ));
        };
        if wrapped.mechanism != WrapMechanism::Age {
            return Err(Error::integrity("unwrapping a data key"));
        }
        let plain = decrypt_with(std::slice::from_ref(identity), &wrapped.blob, WRAP_PLAIN_LEN)
            .filter(|p| p.len() == WRAP_PLAIN_LEN)
            .ok_or(Error::integrity("unwrapping a data key"))?;
        let (key, tag) = plain.split_at(32);
        let mut k = [0u8; 32];
        k.copy_from_slice(key);
        let expected = Zeroizing::new(self.tag(&k));
        zeroize::Zeroize::zeroize(&mut k);
        // A wrap anyone could have made to the recipient, without this root's
        // authentication key: refused.
        if !bool::from(subtle_eq(tag, &expected[..])) {
            tracing::warn!("an age wrap's tag does not verify: made without this root's authentication key");
            return Err(Error::integrity("authenticating an age-wrapped key"));
        }
        DekMaterial::from_slice(key)
    }

    fn health(&self) -> Vec<Check> {
        let name = &self.name;
        match &self.identity_from {
            None => vec![Check::pass(
                "age root",
                format!(
                    "wrap-only, as expected for an escrow root whose identity is kept offline: new data keys are \
                     wrapped to {name}; it opens the store only in a recovery, with its identity"
                ),
            )],
            Some(from) => vec![Check::warn(
                "age root",
                format!(
                    "the identity of {name} is in this process ({from}): it opens the store with a software key. \
                     Keep it for recovery; a production config names the recipient and the authentication key only"
                ),
            )],
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wraps_open_with_the_identity_only_and_carry_a_tag_only_the_auth_key_makes() {
        let id = AgeIdentity::generate();
        let r = id.recipient();
        let full = AgeRoot::new(&r, vec![id.clone()], Some("test".into()), None).unwrap();
        let wrap_only = AgeRoot::new(&r, Vec::new(), None, Some(auth_key_of(&id))).unwrap();
        assert_eq!(full.identity().unwrap().pin(), wrap_only.identity().unwrap().pin());
        assert!(full.can_unwrap() && !wrap_only.can_unwrap() && !full.wraps_authenticate());
        let dek = DekMaterial::random().unwrap();
        let w = wrap_only.wrap(&dek).unwrap();
        assert_eq!(w.mechanism, WrapMechanism::Age);
        assert_eq!(full.unwrap(&w).unwrap().expose(), dek.expose());
        assert!(matches!(wrap_only.unwrap(&w), Err(Error::Config(_))));
        let mut bad = w.clone();
        let last = bad.blob.len() - 1;
        bad.blob[last] ^= 1;
        assert!(matches!(full.unwrap(&bad), Err(Error::Integrity { .. })));
        // A wrap made to the public recipient without the authentication key (what
        // anyone can do): refused.
        let mut forged = Zeroizing::new([7u8; WRAP_PLAIN_LEN]);
        forged[..32].copy_from_slice(dek.expose());
        let to = parse_recipient(&r).unwrap();
        let blob = encrypt_to(std::slice::from_ref(&to), &forged[..], false).unwrap();
        let e = full.unwrap(&Wrapped { mechanism: WrapMechanism::Age, blob }).unwrap_err();
        assert!(matches!(e, Error::Integrity { .. }), "{e}");
        // Another root's authentication key makes wraps this identity refuses.
        let other = AgeRoot::new(&r, Vec::new(), None, Some(Zeroizing::new([1u8; 32]))).unwrap();
        assert!(full.unwrap(&other.wrap(&dek).unwrap()).is_err());
        // A wrong key beside the identity, no key and no identity, or an identity of
        // another recipient: configuration errors.
        assert!(AgeRoot::new(&r, vec![id.clone()], None, Some(Zeroizing::new([1u8; 32]))).is_err());
        assert!(AgeRoot::new(&r, Vec::new(), None, None).is_err());
        assert!(AgeRoot::new(&r, vec![AgeIdentity::generate()], Some("x".into()), None).is_err());
        // The key file form round-trips.
        let k = auth_key_of(&id);
        assert_eq!(*parse_auth_key(&auth_key_text(&r, &k), &r).unwrap(), *k);
        assert!(parse_auth_key("00", &r).is_err());
        let other = AgeIdentity::generate().recipient();
        let e = parse_auth_key(&auth_key_text(&other, &k), &r).unwrap_err().to_string();
        assert!(e.contains("mixed up") && !e.contains(auth_key_text(&r, &k).split(' ').nth(1).unwrap().trim()), "{e}");
    }

    #[test]
    fn debug_shows_no_secret() {
        let id = AgeIdentity::generate();
        let secret = id.secret_text();
        let root = AgeRoot::new(&id.recipient(), vec![id.clone()], Some("test".into()), None).unwrap();
        let auth = auth_key_text(&id.recipient(), &auth_key_of(&id));
        for text in [format!("{id:?}"), format!("{root:?}"), format!("{:?}", root.health())] {
            assert!(!text.contains(secret.as_str()) && !text.contains("AGE-SECRET-KEY"), "{text}");
            assert!(!text.contains(auth.split(' ').nth(1).unwrap().trim()), "{text}");
        }
    }

    #[test]
    fn identity_files_plain_and_passphrase_protected() {
        let dir = tempfile::tempdir().unwrap();
        let id = AgeIdentity::generate();
        let plain = dir.path().join("plain.key");
        id.write_new(&plain).unwrap();
        assert!(id.write_new(&plain).is_err(), "never overwrites");
        let loaded = AgeIdentity::load(&plain, None, dir.path()).unwrap();
        assert_eq!(loaded[0].recipient(), id.recipient());
        // Readable by others: refused.
        std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(AgeIdentity::load(&plain, None, dir.path()).is_err());
        // A line that is not an identity is named by number, never quoted.
        let odd = dir.path().join("odd.key");
        crate::files::write_new_private(&odd, b"# comment\nAGE-PLUGIN-YUBIKEY-1SECRETLOOKING\n").unwrap();
        let e = AgeIdentity::load(&odd, None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("SECRETLOOKING"), "{e}");
        // Encrypted with a passphrase: needs passphrase_source, and the right one.
        let enc = dir.path().join("enc.key");
        let e = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from("pw-1".to_string()));
        let mut out = Vec::new();
        let mut w = e.wrap_output(&mut out).unwrap();
        w.write_all(id.secret_text().as_bytes()).unwrap();
        w.finish().unwrap();
        crate::files::write_new_private(&enc, &out).unwrap();
        let pw = dir.path().join("pw");
        crate::files::write_new_private(&pw, b"pw-1\n").unwrap();
        let wrong = dir.path().join("wrong");
        crate::files::write_new_private(&wrong, b"pw-2\n").unwrap();
        assert!(AgeIdentity::load(&enc, None, dir.path()).unwrap_err().to_string().contains("passphrase_source"));
        assert!(AgeIdentity::load(&enc, Some("file:wrong"), dir.path()).is_err());
        let got = AgeIdentity::load(&enc, Some("file:pw"), dir.path()).unwrap();
        assert_eq!(got[0].recipient(), id.recipient());
    }
}
