//! Sealed backups: the store's ciphertexts and wrapped keys, never a plaintext.
//!
//! A backup is one file (docs/FORMAT.md §backup): a magic and version, the store id,
//! the pinned roots, the wrapped integrity key, every DEK entry, every sealed record,
//! the tombstones and the audit chain, then an HMAC-SHA256 over all of it under a key
//! derived from the store's integrity key. Only a configured root can unwrap that key,
//! so only the owner of a root can verify — or forge — a backup. Restoring checks the
//! MAC before writing anything, and restores into a new store file with the same store
//! id, so every record's AAD still matches. The file is written 0600 to a temporary
//! name, synced and renamed: a crash leaves either no backup or a whole one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use redb::{ReadableTable, ReadableTableMetadata};
use sha2::Sha256;

use crate::codec::{Malformed, Reader, Writer};
use crate::error::{Error, Result};
use crate::guard::{GuardOptions, TokenGuard};
use crate::root::RootKey;
use crate::seal::STORE_ID_LEN;
use crate::store::{self as st, Store, StoreOptions, schema};

/// First bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 8] = b"TGBACKUP";
/// Backup format version written by this build.
pub const BACKUP_FORMAT_V1: u8 = 1;
const MAC_LABEL: &[u8] = b"tokenguard/backup-mac/v1";
const MAC_LEN: usize = 32;

/// What a backup held.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BackupSummary {
    /// DEK versions.
    pub deks: u64,
    /// Sealed records.
    pub tokens: u64,
    /// Tombstones.
    pub tombstones: u64,
    /// Audit events.
    pub audit_events: u64,
}

fn mac_of(key: &[u8; 32], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Serialises the whole store (one read snapshot) into backup bytes.
pub fn export(guard: &TokenGuard) -> Result<(Vec<u8>, BackupSummary)> {
    let txn = guard.store().read()?;
    let mut s = BackupSummary::default();
    let mut w = Writer::with_capacity(4096);
    w.raw(BACKUP_MAGIC).u8(BACKUP_FORMAT_V1).raw(&guard.store_id()).u32(st::SCHEMA_VERSION);
    let meta = |k| st::meta_get(&txn, k).and_then(|v| v.ok_or_else(|| Error::integrity("reading store metadata")));
    w.bytes(&meta(st::META_ROOTS)?).bytes(&meta(st::META_INTEGRITY_KEY)?);

    let deks = txn.open_table(st::DEKS)?;
    w.u32(deks.len()? as u32);
    for item in deks.iter()? {
        let (k, v) = item?;
        let (p, ver) = k.value();
        w.str(p).u32(ver).bytes(v.value());
        s.deks += 1;
    }
    let tokens = txn.open_table(st::TOKENS)?;
    w.u32(tokens.len()? as u32);
    for item in tokens.iter()? {
        let (k, v) = item?;
        let (p, n) = k.value();
        w.str(p).str(n).bytes(v.value());
        s.tokens += 1;
    }
    let tombs = txn.open_table(st::TOMBSTONES)?;
    w.u32(tombs.len()? as u32);
    for item in tombs.iter()? {
        let (k, v) = item?;
        let (p, n) = k.value();
        w.str(p).str(n).bytes(v.value());
        s.tombstones += 1;
    }
    let audit = txn.open_table(st::AUDIT)?;
    w.u32(audit.len()? as u32);
    for item in audit.iter()? {
        let (k, v) = item?;
        w.u64(k.value()).bytes(v.value());
        s.audit_events += 1;
    }
    w.bytes(&st::meta_get(&txn, crate::audit::META_AUDIT_HEAD)?.unwrap_or_default());
    let mut out = w.finish();
    let key = guard.integrity_subkey(MAC_LABEL);
    let tag = mac_of(&key, &out);
    out.extend_from_slice(&tag);
    Ok((out, s))
}

/// Writes a backup of `guard` to `path` (0600, atomically; refuses to overwrite).
pub fn write_backup(guard: &TokenGuard, path: &Path) -> Result<BackupSummary> {
    if path.exists() {
        return Err(Error::InvalidInput(format!("{} exists; choose a new backup file name", path.display())));
    }
    let (bytes, summary) = export(guard)?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io("creating backup", &tmp))?;
    let res = f.write_all(&bytes).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io { operation: "writing backup", path: tmp, source: e });
    }
    fs::rename(&tmp, path).map_err(Error::io("renaming backup into place", path))?;
    guard
        .store()
        .write(|txn| guard.audit_in(txn, "backup", format!("{} tokens to {}", summary.tokens, path.display())))?;
    Ok(summary)
}

/// A parsed backup, borrowing the file bytes.
struct Parsed<'a> {
    store_id: [u8; STORE_ID_LEN],
    roots: &'a [u8],
    integrity_key: &'a [u8],
    deks: Vec<(&'a str, u32, &'a [u8])>,
    tokens: Vec<(&'a str, &'a str, &'a [u8])>,
    tombstones: Vec<(&'a str, &'a str, &'a [u8])>,
    audit: Vec<(u64, &'a [u8])>,
    audit_head: &'a [u8],
}

fn parse(body: &[u8]) -> Result<Parsed<'_>, Malformed> {
    let mut r = Reader::new(body);
    if r.raw(8)? != BACKUP_MAGIC || r.u8()? != BACKUP_FORMAT_V1 {
        return Err(Malformed);
    }
    let store_id = r.array::<STORE_ID_LEN>()?;
    if r.u32()? != st::SCHEMA_VERSION {
        return Err(Malformed);
    }
    let roots = r.bytes()?;
    let integrity_key = r.bytes()?;
    let n = r.count(12)?;
    let mut deks = Vec::with_capacity(n);
    for _ in 0..n {
        deks.push((r.str()?, r.u32()?, r.bytes()?));
    }
    let n = r.count(12)?;
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push((r.str()?, r.str()?, r.bytes()?));
    }
    let n = r.count(12)?;
    let mut tombstones = Vec::with_capacity(n);
    for _ in 0..n {
        tombstones.push((r.str()?, r.str()?, r.bytes()?));
    }
    let n = r.count(12)?;
    let mut audit = Vec::with_capacity(n);
    for _ in 0..n {
        audit.push((r.u64()?, r.bytes()?));
    }
    let audit_head = r.bytes()?;
    r.finish()?;
    Ok(Parsed { store_id, roots, integrity_key, deks, tokens, tombstones, audit, audit_head })
}

/// Checks a backup's structure (no key needed). For fuzzing and quick triage; the
/// MAC is only checked by [`restore`], which has the root.
pub fn check_structure(bytes: &[u8]) -> Result<()> {
    let body = bytes
        .len()
        .checked_sub(MAC_LEN)
        .map(|n| &bytes[..n])
        .ok_or_else(|| Error::integrity("reading a backup (truncated)"))?;
    parse(body).map(drop).map_err(|_| Error::integrity("parsing a backup"))
}

/// Restores the backup at `path` into a new store at `store_path`, under `roots`.
/// Nothing is written unless the backup's MAC verifies under the store's integrity
/// key, which one of `roots` must unwrap.
pub fn restore(
    path: &Path,
    store_path: &Path,
    store_opts: StoreOptions,
    roots: Vec<Box<dyn RootKey>>,
    opts: GuardOptions,
) -> Result<(TokenGuard, BackupSummary)> {
    if store_path.exists() {
        return Err(Error::StoreExists(store_path.into()));
    }
    let bytes = fs::read(path).map_err(Error::io("reading backup", path))?;
    let (body, tag) = bytes
        .len()
        .checked_sub(MAC_LEN)
        .map(|n| bytes.split_at(n))
        .ok_or_else(|| Error::integrity("reading a backup (truncated)"))?;
    let p = parse(body).map_err(|_| Error::integrity("parsing a backup"))?;
    let pins = schema::decode_roots(p.roots)?;
    let wrapped_ik = schema::decode_wrapped_key(p.integrity_key)?;
    let ik = crate::guard::unlock_key(&pins, &wrapped_ik, &roots)?;
    let key = crate::guard::derive_key(ik.expose(), MAC_LABEL);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&*key).expect("HMAC takes any key length");
    m.update(body);
    // verify_slice compares in constant time.
    m.verify_slice(tag).map_err(|_| Error::integrity("verifying the backup's MAC"))?;

    let store = Store::create(store_path, store_opts)?;
    let summary = BackupSummary {
        deks: p.deks.len() as u64,
        tokens: p.tokens.len() as u64,
        tombstones: p.tombstones.len() as u64,
        audit_events: p.audit.len() as u64,
    };
    let written = store.write(|txn| {
        let mut meta = txn.open_table(st::META)?;
        meta.insert(st::META_SCHEMA, st::SCHEMA_VERSION.to_be_bytes().as_slice())?;
        meta.insert(st::META_STORE_ID, p.store_id.as_slice())?;
        meta.insert(st::META_ROOTS, p.roots)?;
        meta.insert(st::META_INTEGRITY_KEY, p.integrity_key)?;
        meta.insert(st::META_CREATED, crate::guard::now().to_be_bytes().as_slice())?;
        if !p.audit_head.is_empty() {
            meta.insert(crate::audit::META_AUDIT_HEAD, p.audit_head)?;
        }
        let mut deks = txn.open_table(st::DEKS)?;
        for (prov, ver, v) in &p.deks {
            deks.insert((*prov, *ver), *v)?;
        }
        let mut tokens = txn.open_table(st::TOKENS)?;
        let mut by_dek = txn.open_table(st::BY_DEK)?;
        let mut by_exp = txn.open_table(st::BY_EXPIRY)?;
        for (prov, name, v) in &p.tokens {
            // Rebuild the indexes from the records themselves.
            let rec = crate::seal::ParsedRecord::parse(v)?;
            if rec.header.provider != *prov || rec.header.name != *name {
                return Err(Error::integrity("checking a record's place in the backup"));
            }
            tokens.insert((*prov, *name), *v)?;
            by_dek.insert((*prov, rec.header.dek_version, *name), ())?;
            if let Some(e) = rec.header.meta.expires_at {
                by_exp.insert((e, *prov, *name), ())?;
            }
        }
        let mut tombs = txn.open_table(st::TOMBSTONES)?;
        for (prov, name, v) in &p.tombstones {
            tombs.insert((*prov, *name), *v)?;
        }
        let mut audit = txn.open_table(st::AUDIT)?;
        for (seq, v) in &p.audit {
            audit.insert(*seq, *v)?;
        }
        Ok(())
    });
    drop(store);
    if let Err(e) = written {
        let _ = fs::remove_file(store_path);
        return Err(e);
    }
    let guard = TokenGuard::open(store_path, store_opts, roots, opts)?;
    guard
        .store()
        .write(|txn| guard.audit_in(txn, "restore", format!("{} tokens from {}", summary.tokens, path.display())))?;
    Ok((guard, summary))
}
