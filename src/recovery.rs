//! k-of-n custodians of an age escrow root.
//!
//! [`split`] makes a fresh age identity, splits its secret text among custodians with
//! Shamir's scheme over GF(256) (`vsss-rs`), and encrypts each share to its custodian's
//! own age recipient. The identity is never written anywhere; the caller gets its
//! public recipient, to configure as an `age` root. [`combine`] takes the shares the
//! custodians decrypted, checks that they belong together, and rebuilds the identity
//! in memory.
//!
//! A share is a short text (docs/FORMAT.md §"Recovery shares"): the split's id, the
//! threshold, the number of shares, its index, its custodian, the split's recipient,
//! the share value, and a MAC over all of them under a key derived from the identity.
//! Fewer than K shares reveal nothing about the identity (Shamir), so they cannot
//! check the MAC either: it is checked once K shares rebuilt an identity whose
//! public key is the recipient every share names, and it then names any share whose
//! other fields were altered. A share whose value was altered rebuilds a different
//! identity, which the recipient check catches.

use std::fmt;
use std::fmt::Write as _;

use rand_chacha::rand_core::SeedableRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::root::age::{AgeIdentity, encrypt_to, parse_recipient};

/// First line of every share.
pub const SHARE_MAGIC: &str = "tokenguard recovery share v1";

/// Most custodians of one split (GF(256) has 255 non-zero points).
pub const MAX_SHARES: usize = 255;

/// Larger than any share file (a share is about 450 bytes).
const MAX_SHARE_BYTES: usize = 4096;

/// One custodian: a name (for the share file and messages) and their own age
/// recipient, to which their share is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custodian {
    /// `[A-Za-z0-9._-]`, 1 to 64 characters, not starting with a dot.
    pub name: String,
    /// `age1…`.
    pub recipient: String,
}

impl Custodian {
    /// Parses `NAME=age1…`.
    pub fn parse(arg: &str) -> Result<Self> {
        let (name, recipient) = arg
            .split_once('=')
            // Not shown: without `=` it may be a pasted identity.
            .ok_or_else(|| Error::InvalidInput("a custodian is NAME=age1… (the argument given is not shown)".into()))?;
        let c = Custodian { name: name.to_string(), recipient: recipient.trim().to_string() };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 64
            && !self.name.starts_with('.')
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(Error::InvalidInput(format!(
                "custodian name {:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot); it names the share file",
                self.name
            )));
        }
        parse_recipient(&self.recipient).map_err(|e| match e {
            Error::Config(m) => Error::InvalidInput(format!("custodian {}: {m}", self.name)),
            other => other,
        })?;
        Ok(())
    }
}

/// The result of [`split`]: what to configure, and one encrypted share per custodian.
pub struct Split {
    /// The new identity's recipient: configure it as an `age` root.
    pub recipient: String,
    /// The split's id (hex), in every share.
    pub split_id: String,
    /// Shares needed to rebuild the identity.
    pub threshold: u8,
    /// One per custodian, in the order given.
    pub shares: Vec<EncryptedShare>,
    /// The age root's authentication key (derived from the identity): the service
    /// needs it to wrap (`auth_key_source`); it cannot decrypt anything.
    pub auth_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("recipient", &self.recipient)
            .field("split_id", &self.split_id)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares.len())
            .finish()
    }
}

/// A share encrypted to its custodian's recipient (an ASCII-armored age file): only
/// that custodian's identity opens it.
#[derive(Debug, Clone)]
pub struct EncryptedShare {
    /// The custodian's name.
    pub custodian: String,
    /// The share's index (1..=n).
    pub index: u8,
    /// The armored age file.
    pub file: Vec<u8>,
}

/// A decrypted share, parsed. Its value is secret (K of them rebuild the identity):
/// zeroized on drop, never printed.
pub struct Share {
    split_id: [u8; 16],
    threshold: u8,
    count: u8,
    index: u8,
    custodian: String,
    recipient: String,
    value: Zeroizing<Vec<u8>>,
    /// The text the MAC covers (everything before the `mac:` line).
    signed: Zeroizing<String>,
    mac: [u8; 32],
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("split", &self.split_id())
            .field("threshold", &self.threshold)
            .field("count", &self.count)
            .field("index", &self.index)
            .field("custodian", &self.custodian)
            .finish_non_exhaustive()
    }
}

impl Share {
    /// The custodian named in the share.
    pub fn custodian(&self) -> &str {
        &self.custodian
    }

    /// The split's id, hex.
    pub fn split_id(&self) -> String {
        hex(&self.split_id).to_string()
    }

    /// Reads and parses the decrypted share at `path`: refused when others can read
    /// it (as a PIN file is: `umask 077` before decrypting) or when it is larger than
    /// any share. Errors name the file.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        use std::io::Read;
        crate::files::check_private(path, "recovery share").map_err(|e| match e {
            Error::Config(m) => Error::InvalidInput(m),
            other => other,
        })?;
        let f = std::fs::File::open(path).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
        let mut raw = Zeroizing::new(Vec::with_capacity(MAX_SHARE_BYTES + 1));
        f.take(u64::try_from(MAX_SHARE_BYTES + 1).unwrap_or(u64::MAX))
            .read_to_end(&mut raw)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
        if raw.len() > MAX_SHARE_BYTES {
            return Err(Error::InvalidInput(format!("{}: larger than any share", path.display())));
        }
        Self::parse(&raw).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a decrypted share. Strict: the nine lines of docs/FORMAT.md, in order.
    /// Errors name the line, never its value.
    pub fn parse(text: &[u8]) -> Result<Self> {
        if crate::root::age::is_age_file(text) {
            return Err(Error::InvalidInput(
                "this is the encrypted share file: its custodian decrypts it first (`age -d -i THEIR-KEY FILE > \
                 share.txt`) and brings the output"
                    .into(),
            ));
        }
        let text = std::str::from_utf8(text).map_err(|_| Error::InvalidInput("a share is UTF-8 text".into()))?;
        let body = text.strip_suffix('\n').unwrap_or(text);
        let lines: Vec<&str> = body.split('\n').collect();
        const KEYS: [&str; 8] = ["split", "threshold", "shares", "index", "custodian", "recipient", "value", "mac"];
        if lines.first() != Some(&SHARE_MAGIC) {
            return Err(Error::InvalidInput(format!(
                "not a tokenguard recovery share (first line is not {SHARE_MAGIC:?})"
            )));
        }
        if lines.len() != KEYS.len() + 1 {
            return Err(Error::InvalidInput(format!(
                "a share has {} lines, this one {}: it was cut or added to",
                KEYS.len() + 1,
                lines.len()
            )));
        }
        let mut values = Vec::new();
        for (n, (line, key)) in lines[1..].iter().zip(KEYS).enumerate() {
            let v = line
                .strip_prefix(key)
                .and_then(|r| r.strip_prefix(": "))
                .ok_or_else(|| Error::InvalidInput(format!("share line {} should start with {key:?}", n + 2)))?;
            values.push(v);
        }
        let bad = |key: &str| Error::InvalidInput(format!("share line {key:?} is malformed"));
        let number = |i: usize| values[i].parse::<u8>().map_err(|_| bad(KEYS[i]));
        let split_id: [u8; 16] = unhex(values[0]).and_then(|v| v.try_into().ok()).ok_or_else(|| bad("split"))?;
        let (threshold, count, index) = (number(1)?, number(2)?, number(3)?);
        if threshold < 2 || threshold > count || index == 0 || index > count {
            return Err(Error::InvalidInput(format!(
                "share numbers are inconsistent: threshold {threshold}, shares {count}, index {index}"
            )));
        }
        let custodian = Custodian { name: values[4].to_string(), recipient: values[5].to_string() };
        custodian.check()?;
        let value = Zeroizing::new(unhex(values[6]).ok_or_else(|| bad("value"))?);
        let mac: [u8; 32] = unhex(values[7]).and_then(|v| v.try_into().ok()).ok_or_else(|| bad("mac"))?;
        let mac_at = text.rfind("\nmac: ").ok_or_else(|| bad("mac"))? + 1;
        Ok(Share {
            split_id,
            threshold,
            count,
            index,
            custodian: custodian.name,
            recipient: custodian.recipient,
            value,
            signed: Zeroizing::new(text[..mac_at].to_string()),
            mac,
        })
    }
}

/// Splits a fresh age identity among `custodians`, any `threshold` of whom rebuild it.
/// Returns its recipient and one share per custodian, encrypted to them. Before
/// returning, rebuilds the identity from the first `threshold` shares, to be sure.
pub fn split(threshold: u8, custodians: &[Custodian]) -> Result<Split> {
    let identity = AgeIdentity::generate();
    let split_id = crate::crypto::random_array::<16>()?;
    let plain = split_identity(&identity, split_id, threshold, custodians)?;
    let parsed = plain.iter().map(|t| Share::parse(t.as_bytes())).collect::<Result<Vec<_>>>()?;
    let back = combine(&parsed[..usize::from(threshold)])?;
    if back.recipient() != identity.recipient() {
        return Err(Error::integrity("checking a fresh split"));
    }
    let mut shares = Vec::new();
    for ((c, text), share) in custodians.iter().zip(&plain).zip(&parsed) {
        let to = parse_recipient(&c.recipient)?;
        shares.push(EncryptedShare {
            custodian: c.name.clone(),
            index: share.index,
            file: encrypt_to(&[to], text.as_bytes(), true)?,
        });
    }
    Ok(Split {
        recipient: identity.recipient(),
        split_id: hex(&split_id).to_string(),
        threshold,
        shares,
        auth_key: crate::root::age::auth_key_of(&identity),
    })
}

/// Writes an encrypted share file for its custodian: mode 0600, never overwriting.
pub fn write_share_file(path: &std::path::Path, file: &[u8]) -> Result<()> {
    crate::files::write_new_private(path, file)
}

/// The plaintext shares of `identity` for `custodians` (in their order; index i+1 for
/// the i-th), under split id `split_id`.
pub(crate) fn split_identity(
    identity: &AgeIdentity,
    split_id: [u8; 16],
    threshold: u8,
    custodians: &[Custodian],
) -> Result<Vec<Zeroizing<String>>> {
    let n = custodians.len();
    if n > MAX_SHARES || threshold < 2 || usize::from(threshold) > n {
        return Err(Error::InvalidInput(format!(
            "threshold {threshold} of {n} custodians: the threshold must be 2 to the number of custodians (at most {MAX_SHARES})"
        )));
    }
    for (i, c) in custodians.iter().enumerate() {
        c.check()?;
        if let Some(d) = custodians[..i].iter().find(|d| d.name == c.name) {
            return Err(Error::InvalidInput(format!("custodian {} is named twice", d.name)));
        }
        let r = parse_recipient(&c.recipient)?.to_string();
        if let Some(d) =
            custodians[..i].iter().find(|d| parse_recipient(&d.recipient).is_ok_and(|x| x.to_string() == r))
        {
            return Err(Error::InvalidInput(format!(
                "custodians {} and {} have the same recipient: one person would hold two shares",
                d.name, c.name
            )));
        }
    }
    let secret = identity.secret_text();
    let key = mac_key(&secret);
    // A ChaCha20 generator seeded from the OS draws the polynomials' coefficients
    // (vsss-rs asks for an infallible generator; the OS call that can fail is here).
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(crate::crypto::random_array::<32>()?);
    let ids = (1..=u8::try_from(n).unwrap_or(u8::MAX)).map(|i| vsss_rs::IdentifierGf256(vsss_rs::Gf256(i)));
    let raw = vsss_rs::Gf256::split_bytes_with_participant_ids_iter(
        usize::from(threshold),
        n,
        secret.as_bytes(),
        &mut rng,
        ids,
    )
    .map_err(|e| Error::InvalidInput(format!("splitting: {e}")))?;
    let raw: Vec<Zeroizing<Vec<u8>>> = raw.into_iter().map(Zeroizing::new).collect();
    let count = u8::try_from(n).unwrap_or(u8::MAX);
    let mut out = Vec::new();
    for (c, share) in custodians.iter().zip(&raw) {
        let (index, value) = share.split_first().ok_or_else(|| Error::integrity("splitting the identity"))?;
        // Allocated at its final size, so no growing buffer leaves an unwiped copy.
        let mut text = Zeroizing::new(String::with_capacity(MAX_SHARE_BYTES));
        let _ = write!(
            text,
            "{SHARE_MAGIC}\nsplit: {}\nthreshold: {threshold}\nshares: {count}\nindex: {index}\ncustodian: {}\n\
             recipient: {}\nvalue: {}\n",
            hex(&split_id).as_str(),
            c.name,
            identity.recipient(),
            hex(value).as_str(),
        );
        let mac = crate::crypto::hmac(&key, &[text.as_bytes()]);
        let _ = writeln!(text, "mac: {}", hex(&mac).as_str());
        out.push(text);
    }
    Ok(out)
}

/// Rebuilds the identity from decrypted shares (at least the threshold's number, all
/// of one split). Fewer shares, or shares of different splits: [`Error::InvalidInput`]
/// (exit 2). Shares that do not rebuild the identity their split names, or one whose
/// fields were altered: [`Error::BadShare`] (exit 4). Nothing is written.
pub fn combine(shares: &[Share]) -> Result<AgeIdentity> {
    let Some(first) = shares.first() else {
        return Err(Error::InvalidInput("no share given".into()));
    };
    for s in shares {
        if s.split_id != first.split_id {
            return Err(Error::InvalidInput(format!(
                "the shares come from different splits: {} ({}) and {} ({})",
                first.split_id(),
                first.custodian,
                s.split_id(),
                s.custodian
            )));
        }
        if (s.threshold, s.count, &s.recipient) != (first.threshold, first.count, &first.recipient) {
            return Err(Error::BadShare(format!(
                "the shares of {} and {} disagree on the split's threshold, size or recipient: one was altered",
                first.custodian, s.custodian
            )));
        }
    }
    for (i, s) in shares.iter().enumerate() {
        if let Some(d) = shares[..i].iter().find(|d| d.index == s.index) {
            return Err(Error::InvalidInput(format!(
                "two shares have index {} ({} and {}): the same share was given twice",
                s.index, d.custodian, s.custodian
            )));
        }
    }
    if shares.len() < usize::from(first.threshold) {
        return Err(Error::InvalidInput(format!(
            "this split needs {} shares of {}; {} given",
            first.threshold,
            first.count,
            shares.len()
        )));
    }
    let points: Vec<Zeroizing<Vec<u8>>> = shares
        .iter()
        .map(|s| {
            let mut p = Zeroizing::new(Vec::with_capacity(s.value.len() + 1));
            p.push(s.index);
            p.extend_from_slice(&s.value);
            p
        })
        .collect();
    let rejected = || {
        Error::BadShare(format!(
            "these {} shares do not rebuild the identity of split {} (recipient {}): a share value was altered",
            shares.len(),
            first.split_id(),
            first.recipient
        ))
    };
    let plain: Vec<Vec<u8>> = points.iter().map(|p| p.to_vec()).collect();
    let plain = Zeroizing::new(plain);
    let secret = Zeroizing::new(vsss_rs::Gf256::combine_bytes(&plain[..]).map_err(|_| rejected())?);
    let text = std::str::from_utf8(&secret).map_err(|_| rejected())?;
    let identity = AgeIdentity::parse(text).ok_or_else(rejected)?;
    if identity.recipient() != first.recipient {
        return Err(rejected());
    }
    let key = mac_key(&identity.secret_text());
    for s in shares {
        if !crate::crypto::hmac_verify(&key, s.signed.as_bytes(), &s.mac) {
            return Err(Error::BadShare(format!(
                "the share of {} (index {}) fails its authentication: its fields were altered",
                s.custodian, s.index
            )));
        }
    }
    Ok(identity)
}

/// The MAC key of a split's shares: derived from the identity, so only K shares
/// together can check (or make) a share's MAC.
fn mac_key(secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tokenguard/recovery-share/mac-key/v1");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Lowercase hex, in a zeroizing string allocated at its final size (share values
/// pass through here).
fn hex(bytes: &[u8]) -> Zeroizing<String> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The bytes of lowercase hex, allocated at their final size; `None` for anything else.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 2);
    for i in (0..s.len()).step_by(2) {
        out.push(u8::from_str_radix(s.get(i..i + 2)?, 16).ok()?);
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn custodians(n: usize) -> (Vec<Custodian>, Vec<AgeIdentity>) {
        let ids: Vec<AgeIdentity> = (0..n).map(|_| AgeIdentity::generate()).collect();
        let cs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Custodian { name: format!("c{i}"), recipient: id.recipient() })
            .collect();
        (cs, ids)
    }

    fn shares_of(identity: &AgeIdentity, k: u8, n: usize) -> Vec<Zeroizing<String>> {
        let (cs, _) = custodians(n);
        split_identity(identity, [7; 16], k, &cs).expect("split")
    }

    fn parse_all(texts: &[Zeroizing<String>]) -> Vec<Share> {
        texts.iter().map(|t| Share::parse(t.as_bytes()).expect("parse")).collect()
    }

    #[test]
    fn any_k_of_n_rebuild_the_identity_and_fewer_do_not() {
        let id = AgeIdentity::generate();
        let shares = parse_all(&shares_of(&id, 3, 5));
        for pick in [[0, 1, 2], [0, 2, 4], [4, 3, 1]] {
            let chosen: Vec<Share> =
                pick.iter().map(|&i| Share::parse(shares[i].signed_full().as_bytes()).unwrap()).collect();
            assert_eq!(combine(&chosen).expect("combine").recipient(), id.recipient());
        }
        let e = combine(&shares[..2]).expect_err("2 of 3");
        assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("needs 3"), "{e}");
        // All five together agree too.
        assert_eq!(combine(&shares).expect("all").recipient(), id.recipient());
    }

    #[test]
    fn encrypted_shares_open_with_their_custodians_identity_only() {
        let (cs, ids) = custodians(3);
        let s = split(2, &cs).expect("split");
        let mine = crate::root::age::decrypt_with(&ids[1..2], &s.shares[1].file, 4096).expect("own share");
        assert!(Share::parse(&mine).is_ok());
        assert!(crate::root::age::decrypt_with(&ids[0..1], &s.shares[1].file, 4096).is_none());
        let e = Share::parse(&s.shares[1].file).expect_err("encrypted");
        assert!(e.to_string().contains("decrypts it first"), "{e}");
    }

    #[test]
    fn an_altered_field_or_value_is_rejected() {
        let id = AgeIdentity::generate();
        let texts = shares_of(&id, 2, 3);
        // A changed custodian name: parses, combines, fails its MAC.
        let renamed = texts[1].replace("custodian: c1", "custodian: mallory");
        let e = combine(&[Share::parse(texts[0].as_bytes()).unwrap(), Share::parse(renamed.as_bytes()).unwrap()])
            .expect_err("renamed");
        assert!(matches!(e, Error::BadShare(_)) && e.to_string().contains("mallory"), "{e}");
        // One flipped bit of the value: rebuilds another identity.
        let mut s1 = Share::parse(texts[1].as_bytes()).unwrap();
        s1.value[0] ^= 1;
        let e = combine(&[Share::parse(texts[0].as_bytes()).unwrap(), s1]).expect_err("flipped");
        assert!(matches!(e, Error::BadShare(_)), "{e}");
        // A lowered threshold in every share: two of a 3-of-n split rebuild nothing.
        let id3 = AgeIdentity::generate();
        let t3 = shares_of(&id3, 3, 4);
        let lowered: Vec<Share> = t3[..2]
            .iter()
            .map(|t| Share::parse(t.replace("threshold: 3", "threshold: 2").as_bytes()).unwrap())
            .collect();
        assert!(matches!(combine(&lowered), Err(Error::BadShare(_))));
    }

    #[test]
    fn shares_of_another_split_or_twice_the_same_are_refused() {
        let a = parse_all(&shares_of(&AgeIdentity::generate(), 2, 3));
        let mut cs = custodians(3).0;
        cs.reverse();
        let b = split_identity(&AgeIdentity::generate(), [9; 16], 2, &cs).unwrap();
        let b0 = Share::parse(b[0].as_bytes()).unwrap();
        let e = combine(&[Share::parse(a[0].signed_full().as_bytes()).unwrap(), b0]).expect_err("mixed");
        assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("different splits"), "{e}");
        let twice = [
            Share::parse(a[0].signed_full().as_bytes()).unwrap(),
            Share::parse(a[0].signed_full().as_bytes()).unwrap(),
        ];
        assert!(combine(&twice).expect_err("twice").to_string().contains("twice"));
    }

    #[test]
    fn parsing_is_strict_and_never_quotes_a_value() {
        let texts = shares_of(&AgeIdentity::generate(), 2, 2);
        let t = texts[0].as_str();
        let value_line = t.lines().find(|l| l.starts_with("value: ")).unwrap();
        for bad in [
            t.replace("value: ", "value:  "),
            t.replace(SHARE_MAGIC, "tokenguard recovery share v2"),
            format!("{t}extra: 1\n"),
            t.replace(value_line, &format!("{}Z", value_line)),
            t[..t.len() / 2].to_string(),
        ] {
            let e = Share::parse(bad.as_bytes()).expect_err("malformed");
            assert!(!e.to_string().contains(&value_line[7..]), "{e}");
        }
        let debug = format!("{:?}", Share::parse(t.as_bytes()).unwrap());
        assert!(!debug.contains(&value_line[7..]), "{debug}");
    }

    #[test]
    fn split_checks_its_arguments() {
        let (cs, _) = custodians(3);
        assert!(split(1, &cs).is_err());
        assert!(split(4, &cs).is_err());
        let mut dup = cs.clone();
        dup[2].recipient = dup[0].recipient.clone();
        assert!(split(2, &dup).expect_err("same recipient").to_string().contains("same recipient"));
        assert!(Custodian::parse("../x=age1").is_err());
        assert!(Custodian::parse("alice").is_err());
    }

    impl Share {
        /// The whole text again (the signed part and the MAC line).
        fn signed_full(&self) -> String {
            format!("{}mac: {}\n", self.signed.as_str(), hex(&self.mac).as_str())
        }
    }
}
