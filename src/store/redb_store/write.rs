//! [`StoreWrite`] on a redb write transaction, and a restore's bulk load.

#[allow(clippy::wildcard_imports)]
use super::*;

impl StoreWrite for WriteTxn {
    fn put_records(&self, keys: &[(&str, &str)], build: &mut RecordBuilder<'_>) -> Result<usize> {
        engine(|| {
            let mut tokens = self.0.open_table(TOKENS)?;
            let mut by_dek = self.0.open_table(BY_DEK)?;
            let mut by_exp = self.0.open_table(BY_EXPIRY)?;
            let mut written = 0;
            for (i, &(provider, name)) in keys.iter().enumerate() {
                let (new, old_idx) = {
                    let guard = tokens.get((provider, name))?;
                    // A damaged old record is replaced; its index entries cannot be known,
                    // so stale ones stay for the index users to skip.
                    let old = guard.as_ref().and_then(|g| RecordView::parse(g.value()).ok());
                    let old = old.filter(|v| v.provider == provider && v.name == name);
                    (build(i, old.as_ref())?, old.as_ref().map(index_keys))
                };
                let Some(new) = new else { continue };
                let view = RecordView::parse(&new)?;
                if view.provider != provider || view.name != name {
                    return Err(Error::integrity("checking a record's place"));
                }
                let idx = index_keys(&view);
                tokens.insert((provider, name), new.as_slice())?;
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
            let old = self.0.open_table(TOKENS)?.remove((provider, name))?.map(|g| g.value().to_vec());
            if let Some(view) = old.as_deref().and_then(|b| RecordView::parse(b).ok()) {
                self.0.open_table(BY_DEK)?.remove((provider, view.dek_version, name))?;
                if let Some(e) = view.expires_at {
                    self.0.open_table(BY_EXPIRY)?.remove((e, provider, name))?;
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
            self.0.open_table(BY_DEK)?.remove((provider, version, name))?;
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
            self.0.open_table(BY_EXPIRY)?.remove((expires_at, provider, name))?;
            Ok(true)
        })
    }

    fn put_dek(&self, provider: &str, entry: &DekEntry) -> Result<()> {
        engine(|| {
            self.0.open_table(DEKS)?.insert((provider, entry.version), entry.encode().as_slice())?;
            Ok(())
        })
    }

    fn put_roots(&self, roots: &[RootPin], integrity_key: &[RootWrapped]) -> Result<()> {
        engine(|| {
            let mut m = self.0.open_table(META)?;
            m.insert(META_ROOTS, schema::encode_roots(roots).as_slice())?;
            m.insert(META_INTEGRITY_KEY, schema::encode_wrapped_key(integrity_key).as_slice())?;
            Ok(())
        })
    }

    fn put_tombstone(&self, provider: &str, name: &str, tombstone: Option<&Tombstone>) -> Result<()> {
        engine(|| {
            let mut t = self.0.open_table(TOMBSTONES)?;
            match tombstone {
                Some(ts) => t.insert((provider, name), ts.encode().as_slice())?,
                None => t.remove((provider, name))?,
            };
            Ok(())
        })
    }

    fn remove_tombstones(&self, keys: &[(&str, &str)]) -> Result<()> {
        engine(|| {
            let mut t = self.0.open_table(TOMBSTONES)?;
            for k in keys {
                t.remove(*k)?;
            }
            Ok(())
        })
    }

    fn put_lease(&self, provider: &str, name: &str, lease: Option<Lease>) -> Result<()> {
        engine(|| {
            let mut t = self.0.open_table(REFRESH_LEASES)?;
            match lease {
                Some(l) => t.insert((provider, name), schema::encode_lease(&l).as_slice())?,
                None => t.remove((provider, name))?,
            };
            Ok(())
        })
    }

    fn append_audit(&self, seq: u64, entry: &[u8], head: &[u8]) -> Result<()> {
        engine(|| {
            self.0.open_table(AUDIT)?.insert(seq, entry)?;
            self.0.open_table(META)?.insert(META_AUDIT_HEAD, head)?;
            Ok(())
        })
    }
}

impl WriteTxn {
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
        let mut audit = self.0.open_table(AUDIT)?;
        for (seq, v) in &d.audit {
            audit.insert(*seq, v.as_slice())?;
        }
        if !d.audit_head.is_empty() {
            self.0.open_table(META)?.insert(META_AUDIT_HEAD, d.audit_head.as_slice())?;
        }
        Ok(())
    }
}
