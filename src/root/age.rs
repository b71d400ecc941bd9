//! The `age` root: every data key and the integrity key encrypted to age X25519
//! recipients (the `age` crate, age-encryption.org/v1), so a root whose private half is
//! offline — a custodian's key, or an identity split among custodians — still wraps
//! every new key.
//!
//! Wrapping needs only the public recipients. Unwrapping needs an identity: from
//! `identity_file` (plain, or passphrase-protected with the passphrase from
//! `passphrase_source`), or rebuilt in memory from custodians' shares
//! (`tokenguard recovery combine`, [`crate::recovery`]). Without one the root is
//! *wrap-only* ([`RootKey::can_unwrap`] is false): the guard never asks it to unwrap,
//! and `doctor` reports it as expected. An age root is never hardware: under
//! `require_hardware = true` it may wrap, never open (docs/DESIGN-NOTES.md
//! §"Escrow roots").
//!
//! A wrapped key is a binary age file of the 32 key bytes, one X25519 stanza per
//! recipient: `age -d -i IDENTITY` decrypts it (docs/FORMAT.md §"age wrap").

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

/// The `age` root.
pub struct AgeRoot {
    /// Sorted and deduplicated: the pin does not depend on their order in the config.
    recipients: Vec<age::x25519::Recipient>,
    identities: Vec<AgeIdentity>,
    /// Where the identities came from, for `doctor`.
    identity_from: Option<String>,
    /// Every identity was rebuilt from shares in this process (none from a file).
    recovered_only: bool,
}

impl fmt::Debug for AgeRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgeRoot")
            .field("recipients", &self.recipient_strings())
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl AgeRoot {
    /// A root for `recipients`, with whichever of `identities` belongs to one of them.
    /// `identity_from` names their source. Fails when `identities` is not empty but
    /// none is for these recipients (a wrong identity file is a mistake to report, not
    /// a wrap-only root).
    pub fn new(recipients: &[String], identities: Vec<AgeIdentity>, identity_from: Option<String>) -> Result<Self> {
        if recipients.is_empty() {
            return Err(Error::Config("an age root needs at least one recipient (age1…)".into()));
        }
        let mut parsed = recipients.iter().map(|r| parse_recipient(r)).collect::<Result<Vec<_>>>()?;
        parsed.sort_by_key(ToString::to_string);
        parsed.dedup_by_key(|r| r.to_string());
        let names: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        let offered = identities.len();
        let identities: Vec<AgeIdentity> = identities.into_iter().filter(|i| names.contains(&i.recipient())).collect();
        if offered > 0 && identities.is_empty() {
            return Err(Error::Config(format!(
                "{} holds no identity for this age root's recipients ({})",
                identity_from.as_deref().unwrap_or("the identity given"),
                names.join(", ")
            )));
        }
        let identity_from = if identities.is_empty() { None } else { identity_from };
        Ok(AgeRoot { recipients: parsed, identities, identity_from, recovered_only: false })
    }

    /// The root of a `[[roots]] backend = "age"` entry, with the identities of its
    /// `identity_file` and those of `recovered` (rebuilt from shares in this process)
    /// that belong to its recipients.
    pub fn from_config(c: &crate::config::AgeConfig, base: &Path, recovered: &[Arc<AgeIdentity>]) -> Result<Self> {
        let mut identities = Vec::new();
        let mut from = Vec::new();
        if let Some(path) = &c.identity_file {
            identities.extend(AgeIdentity::load(path, c.passphrase_source.as_deref(), base)?);
            from.push(format!("identity file {}", path.display()));
        }
        let names: Vec<String> =
            c.recipients.iter().filter_map(|r| parse_recipient(r).ok()).map(|r| r.to_string()).collect();
        let mine: Vec<AgeIdentity> =
            recovered.iter().filter(|i| names.contains(&i.recipient())).map(|i| (**i).clone()).collect();
        let recovered_only = c.identity_file.is_none() && !mine.is_empty();
        if !mine.is_empty() {
            identities.extend(mine);
            from.push("an identity rebuilt from custodians' shares".into());
        }
        let mut root = Self::new(&c.recipients, identities, (!from.is_empty()).then(|| from.join(" and ")))?;
        root.recovered_only = recovered_only;
        Ok(root)
    }

    fn recipient_strings(&self) -> Vec<String> {
        self.recipients.iter().map(ToString::to_string).collect()
    }

    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tokenguard/age-root/fingerprint/v1");
        for r in self.recipient_strings() {
            h.update(b"\n");
            h.update(r.as_bytes());
        }
        h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
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
        !self.identities.is_empty()
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
        let names = self.recipient_strings();
        let more = if names.len() > 1 { format!(" and {} more", names.len() - 1) } else { String::new() };
        Ok(RootIdentity {
            backend: "age".into(),
            description: format!("age recipients {}{more} (fingerprint {fp})", short(&names[0])),
            fingerprint: fp,
        })
    }

    fn generate_dek(&self) -> Result<(DekMaterial, Wrapped)> {
        super::generate_and_wrap(|dek| self.wrap(dek))
    }

    fn wrap(&self, dek: &DekMaterial) -> Result<Wrapped> {
        Ok(Wrapped { mechanism: WrapMechanism::Age, blob: encrypt_to(&self.recipients, dek.expose(), false)? })
    }

    fn unwrap(&self, wrapped: &Wrapped) -> Result<DekMaterial> {
        if self.identities.is_empty() {
            return Err(Error::Config(
                "this age root is wrap-only (no identity configured): it cannot open a key".into(),
            ));
        }
        if wrapped.mechanism != WrapMechanism::Age {
            return Err(Error::integrity("unwrapping a data key"));
        }
        let plain =
            decrypt_with(&self.identities, &wrapped.blob, 32).ok_or(Error::integrity("unwrapping a data key"))?;
        DekMaterial::from_slice(&plain)
    }

    fn health(&self) -> Vec<Check> {
        let names = self.recipient_strings().join(", ");
        match &self.identity_from {
            None => vec![Check::pass(
                "age root",
                format!(
                    "wrap-only, as expected for an escrow root whose identity is kept offline: new data keys are \
                     wrapped to {names}; it opens the store only in a recovery, with its identity"
                ),
            )],
            Some(from) => vec![Check::warn(
                "age root",
                format!(
                    "the identity of {names} is in this process ({from}): it opens the store with a software key. \
                     Keep it for recovery; a production config names the recipients only"
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
    fn wraps_open_with_the_identity_only_and_a_wrap_only_root_refuses_to_unwrap() {
        let id = AgeIdentity::generate();
        let other = AgeIdentity::generate();
        let full = AgeRoot::new(&[id.recipient(), other.recipient()], vec![id.clone()], Some("test".into())).unwrap();
        let wrap_only = AgeRoot::new(&[other.recipient(), id.recipient()], Vec::new(), None).unwrap();
        // The same recipients in another order are the same root.
        assert_eq!(full.identity().unwrap().pin(), wrap_only.identity().unwrap().pin());
        assert!(full.can_unwrap() && !wrap_only.can_unwrap());
        let dek = DekMaterial::random().unwrap();
        let w = wrap_only.wrap(&dek).unwrap();
        assert_eq!(w.mechanism, WrapMechanism::Age);
        assert_eq!(full.unwrap(&w).unwrap().expose(), dek.expose());
        assert!(matches!(wrap_only.unwrap(&w), Err(Error::Config(_))));
        let mut bad = w.clone();
        let last = bad.blob.len() - 1;
        bad.blob[last] ^= 1;
        assert!(matches!(full.unwrap(&bad), Err(Error::Integrity { .. })));
        // An identity of none of the recipients is a mistake, not a wrap-only root.
        let stranger = AgeIdentity::generate();
        assert!(AgeRoot::new(&[id.recipient()], vec![stranger], Some("x".into())).is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let id = AgeIdentity::generate();
        let secret = id.secret_text();
        let root = AgeRoot::new(&[id.recipient()], vec![id.clone()], Some("test".into())).unwrap();
        for text in [format!("{id:?}"), format!("{root:?}"), format!("{:?}", root.health())] {
            assert!(!text.contains(secret.as_str()) && !text.contains("AGE-SECRET-KEY"), "{text}");
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
