//! [`StoreWrite`] on a redb write transaction, and a restore's bulk load. Every change
//! to a covered row goes through [`WriteTxn::moved`], so the state head moves with it.

#[allow(clippy::wildcard_imports)]
use super::*;

impl StoreWrite for WriteTxn {
    fn put_records(&self, keys: &[(&str, &str)], build: &mut RecordBuilder<'_>) -> Result<usize> {
        engine(|| {
            let mut tokens = self.write_table(TOKENS)?;
            let mut by_dek = self.write_table(BY_DEK)?;
            let mut by_exp = self.write_table(BY_EXPIRY)?;
            let mut written = 0;
            for (i, &(provider, name)) in keys.iter().enumerate() {
                let (new, old_bytes, old_idx) = {
                    let guard = tokens.get((provider, name))?;
                    let old_bytes = guard.as_ref().map(|g| g.value().to_vec());
                    // What the builder sees (the compare-and-set of a refresh, the
                    // re-encryption's input) is the verified record, or nothing.
                    check_record(self, provider, name, old_bytes.as_deref(), true)?;
                    // A damaged old record is replaced; its index entries cannot be known,
                    // so stale ones stay for the index users to skip.
                    let old = guard.as_ref().and_then(|g| RecordView::parse(g.value()).ok());
                    let old = old.filter(|v| v.provider == provider && v.name == name);
                    (build(i, old.as_ref())?, old_bytes, old.as_ref().map(index_keys))
                };
                let Some(new) = new else { continue };
                let view = RecordView::parse(&new)?;
                if view.provider != provider || view.name != name {
                    return Err(Error::integrity("checking a record's place"));
                }
                let idx = index_keys(&view);
                tokens.insert((provider, name), new.as_slice())?;
                self.moved(Row::Record, RowKey::Name(provider, name), old_bytes.as_deref(), Some(&new))?;
                if let Some(old) = old_idx {
                    by_dek.remove((provider, old.dek_version, name))?;
                    if let Some(e) = old.expires_at {
                        by_exp.remove((e, provider, name))?;
                    }
                }
                by_dek.insert((provider, idx.dek_version, name), ())?;
                if let Some(e) = idx.expires_at {
                    by_exp.insert((e, provider, name), ())?;
                }
                written += 1;
            }
            Ok(written)
        })
    }

    fn delete_record(&self, provider: &str, name: &str) -> Result<Option<Vec<u8>>> {
        engine(|| {
            let old = self.write_table(TOKENS)?.remove((provider, name))?.map(|g| g.value().to_vec());
            self.moved(Row::Record, RowKey::Name(provider, name), old.as_deref(), None)?;
            if let Some(view) = old.as_deref().and_then(|b| RecordView::parse(b).ok()) {
                self.write_table(BY_DEK)?.remove((provider, view.dek_version, name))?;
                if let Some(e) = view.expires_at {
                    self.write_table(BY_EXPIRY)?.remove((e, provider, name))?;
                }
            }
            Ok(old)
        })
    }

    fn drop_stale_index(&self, provider: &str, version: u32, name: &str) -> Result<bool> {
        engine(|| {
            let current = match self.with_record(provider, name, |v| Ok(v.dek_version)) {
                Ok(c) => c,
                // A record that does not parse: whether the entry is stale cannot be
                // told, so it stays (retire must keep counting it as a user).
                Err(Error::Integrity { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            if current == Some(version) {
                return Ok(false);
            }
            self.write_table(BY_DEK)?.remove((provider, version, name))?;
            Ok(true)
        })
    }

    fn drop_stale_expiry(&self, expires_at: u64, provider: &str, name: &str) -> Result<bool> {
        engine(|| {
            let current = match self.with_record(provider, name, |v| Ok(v.expires_at)) {
                Ok(c) => c,
                // A record that does not parse: whether the entry is stale cannot be
                // told, so it stays (retire must keep counting it as a user).
                Err(Error::Integrity { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            if current == Some(Some(expires_at)) {
                return Ok(false);
            }
            self.write_table(BY_EXPIRY)?.remove((expires_at, provider, name))?;
            Ok(true)
        })
    }

    fn put_dek(&self, provider: &str, entry: &DekEntry) -> Result<()> {
        engine(|| {
            let new = entry.encode();
            let old =
                self.write_table(DEKS)?.insert((provider, entry.version), new.as_slice())?.map(|g| g.value().to_vec());
            self.moved(Row::Dek, RowKey::Version(provider, entry.version), old.as_deref(), Some(&new))
        })
    }

    fn put_roots(&self, roots: &[RootPin], integrity_key: &[RootWrapped]) -> Result<()> {
        engine(|| {
            let mut m = self.write_table(META)?;
            let (r, k) = (schema::encode_roots(roots), schema::encode_wrapped_key(integrity_key));
            let old_r = m.insert(META_ROOTS, r.as_slice())?.map(|g| g.value().to_vec());
            let old_k = m.insert(META_INTEGRITY_KEY, k.as_slice())?.map(|g| g.value().to_vec());
            self.moved(Row::Roots, RowKey::Single, old_r.as_deref(), Some(&r))?;
            self.moved(Row::IntegrityKey, RowKey::Single, old_k.as_deref(), Some(&k))
        })
    }

    fn put_tombstone(&self, provider: &str, name: &str, tombstone: Option<&Tombstone>) -> Result<()> {
        engine(|| {
            let mut t = self.write_table(TOMBSTONES)?;
            let new = tombstone.map(Tombstone::encode);
            let old = match &new {
                Some(v) => t.insert((provider, name), v.as_slice())?,
                None => t.remove((provider, name))?,
            }
            .map(|g| g.value().to_vec());
            self.moved(Row::Tombstone, RowKey::Name(provider, name), old.as_deref(), new.as_deref())
        })
    }

    fn remove_tombstones(&self, keys: &[(&str, &str)]) -> Result<()> {
        engine(|| {
            let mut t = self.write_table(TOMBSTONES)?;
            for &(p, n) in keys {
                let old = t.remove((p, n))?.map(|g| g.value().to_vec());
                self.moved(Row::Tombstone, RowKey::Name(p, n), old.as_deref(), None)?;
            }
            Ok(())
        })
    }

    fn put_lease(&self, provider: &str, name: &str, lease: Option<Lease>) -> Result<()> {
        engine(|| {
            let mut t = self.write_table(REFRESH_LEASES)?;
            match lease {
                Some(l) => t.insert((provider, name), schema::encode_lease(&l).as_slice())?,
                None => t.remove((provider, name))?,
            };
            Ok(())
        })
    }

    fn append_audit(&self, entries: &[(u64, Vec<u8>)], head: &[u8]) -> Result<()> {
        engine(|| {
            let mut t = self.write_table(AUDIT)?;
            for (seq, entry) in entries {
                t.insert(seq, entry.as_slice())?;
            }
            drop(t);
            self.set_audit_head(head)
        })
    }

    fn put_audit_archive(&self, sealed: &[u8]) -> Result<()> {
        engine(|| self.set_audit_archive(sealed))
    }

    fn put_anchor(&self, anchor: Option<&Anchor>) -> Result<()> {
        engine(|| {
            let new = anchor.map(Anchor::encode);
            let mut meta = self.write_table(META)?;
            let old = match &new {
                Some(v) => meta.insert(META_ANCHOR, v.as_slice())?,
                None => meta.remove(META_ANCHOR)?,
            }
            .map(|g| g.value().to_vec());
            drop(meta);
            self.moved(Row::Anchor, RowKey::Single, old.as_deref(), new.as_deref())
        })
    }
}

impl WriteTxn {
    fn set_audit_archive(&self, sealed: &[u8]) -> Result<()> {
        let old = self.write_table(META)?.insert(META_AUDIT_ARCHIVE, sealed)?.map(|g| g.value().to_vec());
        self.moved(Row::AuditArchive, RowKey::Single, old.as_deref(), Some(sealed))
    }

    fn set_audit_head(&self, head: &[u8]) -> Result<()> {
        let old = self.write_table(META)?.insert(META_AUDIT_HEAD, head)?.map(|g| g.value().to_vec());
        self.moved(Row::AuditHead, RowKey::Single, old.as_deref(), Some(head))
    }

    /// Writes a backup's rows into this (new) store: DEK entries, records with their
    /// indexes rebuilt from the records themselves, tombstones, the audit chain and
    /// its head, all verbatim.
    pub(crate) fn load(&self, d: &Dump) -> Result<()> {
        for (p, _, v) in &d.deks {
            self.put_dek(p, &DekEntry::decode(v)?)?;
        }
        let keys: Vec<(&str, &str)> = d.tokens.iter().map(|(p, n, _)| (p.as_str(), n.as_str())).collect();
        self.put_records(&keys, &mut |i, _| Ok(d.tokens.get(i).map(|(_, _, v)| v.clone())))?;
        for (p, n, v) in &d.tombstones {
            self.put_tombstone(p, n, Some(&Tombstone::decode(v)?))?;
        }
        let mut audit = self.write_table(AUDIT)?;
        for (seq, v) in &d.audit {
            audit.insert(*seq, v.as_slice())?;
        }
        drop(audit);
        if !d.audit_head.is_empty() {
            self.set_audit_head(&d.audit_head)?;
        }
        if !d.audit_archive.is_empty() {
            self.set_audit_archive(&d.audit_archive)?;
        }
        Ok(())
    }
}
