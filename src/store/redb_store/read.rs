//! [`StoreRead`] for both redb transaction kinds, written once over [`Tables`].

#[allow(clippy::wildcard_imports)]
use super::*;

impl<T: Tables> StoreRead for T {
    fn meta(&self) -> Result<StoreMeta> {
        engine(|| {
            let missing = |what| move || Error::integrity(what);
            let t = self.table(META)?.ok_or_else(missing("reading the store metadata"))?;
            let schema_bytes = meta_value(&t, META_SCHEMA)?.ok_or_else(missing("reading the store schema version"))?;
            let schema_version = u32::from_be_bytes(
                schema_bytes.as_slice().try_into().map_err(|_| Error::integrity("reading the store schema version"))?,
            );
            if !(super::super::MIN_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&schema_version) {
                return Err(Error::UnsupportedVersion { found: schema_version, supported: SCHEMA_VERSION });
            }
            let store_id: [u8; STORE_ID_LEN] = meta_value(&t, META_STORE_ID)?
                .and_then(|v| v.try_into().ok())
                .ok_or_else(missing("reading the store id"))?;
            let roots =
                schema::decode_roots(&meta_value(&t, META_ROOTS)?.ok_or_else(missing("reading the pinned roots"))?)?;
            let integrity_key = schema::decode_wrapped_key(
                &meta_value(&t, META_INTEGRITY_KEY)?.ok_or_else(missing("reading the integrity key"))?,
            )?;
            Ok(StoreMeta { schema: schema_version, store_id, roots, integrity_key })
        })
    }

    fn roots(&self) -> Result<Vec<RootPin>> {
        engine(|| {
            let t = self.table(META)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?;
            schema::decode_roots(
                &meta_value(&t, META_ROOTS)?.ok_or_else(|| Error::integrity("reading the pinned roots"))?,
            )
        })
    }

    fn with_record<R>(
        &self,
        provider: &str,
        name: &str,
        f: impl FnOnce(&RecordView<'_>) -> Result<R>,
    ) -> Result<Option<R>> {
        record_in(self, provider, name, false, f)
    }

    fn with_record_meta<R>(
        &self,
        provider: &str,
        name: &str,
        f: impl FnOnce(&RecordView<'_>) -> Result<R>,
    ) -> Result<Option<R>> {
        record_in(self, provider, name, true, f)
    }

    fn scan_records(&self, provider: Option<&str>, f: &mut RecordVisitor<'_>) -> Result<()> {
        engine(|| {
            let Some(t) = self.table(TOKENS)? else { return Ok(()) };
            let iter = match provider {
                Some(p) => t.range((p, "")..)?,
                None => t.range::<(&str, &str)>(..)?,
            };
            for item in iter {
                let (k, v) = item?;
                let (p, n) = k.value();
                if provider.is_some_and(|want| want != p) {
                    break;
                }
                let view = RecordView::parse(v.value()).and_then(|view| {
                    if view.provider != p || view.name != n {
                        return Err(Error::integrity("checking a record's place"));
                    }
                    check_record(self, p, n, Some(v.value()), true)?;
                    Ok(view)
                });
                if f(p, n, view)?.is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    fn dek(&self, provider: &str, version: u32) -> Result<Option<DekEntry>> {
        engine(|| {
            let v = match self.table(DEKS)? {
                Some(t) => t.get((provider, version))?.map(|g| g.value().to_vec()),
                None => return Ok(None),
            };
            check_row(self, Row::Dek, RowKey::Version(provider, version), v.as_deref())?;
            let Some(v) = v else { return Ok(None) };
            let e = DekEntry::decode(&v)?;
            if e.version != version {
                return Err(Error::integrity("checking a data key's version"));
            }
            Ok(Some(e))
        })
    }

    fn deks(&self, provider: Option<&str>, below: Option<u32>) -> Result<Vec<(String, DekEntry)>> {
        engine(|| {
            let Some(t) = self.table(DEKS)? else { return Ok(Vec::new()) };
            type DekKey<'k> = (&'k str, u32);
            let range: (Bound<DekKey<'_>>, Bound<DekKey<'_>>) = match (provider, below) {
                (Some(p), Some(b)) => (Bound::Included((p, 0)), Bound::Excluded((p, b))),
                (Some(p), None) => (Bound::Included((p, 0)), Bound::Included((p, u32::MAX))),
                (None, _) => (Bound::Unbounded, Bound::Unbounded),
            };
            let mut out = Vec::new();
            for item in t.range(range)? {
                let (k, v) = item?;
                let (p, ver) = k.value();
                if provider.is_none() && below.is_some_and(|b| ver >= b) {
                    continue;
                }
                check_row(self, Row::Dek, RowKey::Version(p, ver), Some(v.value()))?;
                let e = DekEntry::decode(v.value())?;
                if e.version != ver {
                    return Err(Error::integrity("checking a data key's version"));
                }
                out.push((p.to_string(), e));
            }
            Ok(out)
        })
    }

    fn indexed_under(&self, provider: &str, from: u32, to: u32, limit: usize) -> Result<Vec<(u32, String)>> {
        engine(|| {
            let Some(t) = self.table(BY_DEK)? else { return Ok(Vec::new()) };
            let mut out = Vec::new();
            for item in t.range((provider, from, "")..(provider, to, ""))?.take(limit) {
                let (k, _) = item?;
                let (_, ver, name) = k.value();
                out.push((ver, name.to_string()));
            }
            Ok(out)
        })
    }

    fn count_indexed(&self, provider: &str, version: u32) -> Result<u64> {
        engine(|| {
            let Some(t) = self.table(BY_DEK)? else { return Ok(0) };
            let mut n = 0;
            for item in t.range((provider, version, "")..)? {
                let (k, _) = item?;
                let (p, v, _) = k.value();
                if p != provider || v != version {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
    }

    fn expiring_before(&self, until: u64, limit: usize) -> Result<Vec<(u64, String, String)>> {
        engine(|| {
            let Some(t) = self.table(BY_EXPIRY)? else { return Ok(Vec::new()) };
            let mut out = Vec::new();
            for item in t.range((0u64, "", "")..(until, "", ""))?.take(limit) {
                let (k, _) = item?;
                let (at, p, n) = k.value();
                out.push((at, p.to_string(), n.to_string()));
            }
            Ok(out)
        })
    }

    fn tombstone(&self, provider: &str, name: &str) -> Result<Option<Tombstone>> {
        engine(|| {
            let v = match self.table(TOMBSTONES)? {
                Some(t) => t.get((provider, name))?.map(|g| g.value().to_vec()),
                None => return Ok(None),
            };
            check_row(self, Row::Tombstone, RowKey::Name(provider, name), v.as_deref())?;
            let Some(v) = v else { return Ok(None) };
            Tombstone::decode(&v).map(Some)
        })
    }

    fn tombstones(&self) -> Result<Vec<(String, String, Tombstone)>> {
        engine(|| {
            let Some(t) = self.table(TOMBSTONES)? else { return Ok(Vec::new()) };
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let (p, n) = k.value();
                check_row(self, Row::Tombstone, RowKey::Name(p, n), Some(v.value()))?;
                out.push((p.to_string(), n.to_string(), Tombstone::decode(v.value())?));
            }
            Ok(out)
        })
    }

    fn lease(&self, provider: &str, name: &str) -> Result<Option<Lease>> {
        engine(|| {
            let Some(t) = self.table(REFRESH_LEASES)? else { return Ok(None) };
            Ok(t.get((provider, name))?.and_then(|v| schema::decode_lease(v.value())))
        })
    }

    fn audit_entries(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        engine(|| {
            let Some(t) = self.table(AUDIT)? else { return Ok(Vec::new()) };
            let mut out = Vec::new();
            for item in t.range(from..)? {
                let (k, v) = item?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn audit_count(&self) -> Result<u64> {
        engine(|| {
            Ok(match self.table(AUDIT)? {
                Some(t) => t.len()?,
                None => 0,
            })
        })
    }

    fn audit_head(&self) -> Result<Option<Vec<u8>>> {
        single_row(self, META_AUDIT_HEAD, Row::AuditHead)
    }

    fn audit_archive(&self) -> Result<Option<Vec<u8>>> {
        single_row(self, META_AUDIT_ARCHIVE, Row::AuditArchive)
    }

    fn anchor(&self) -> Result<Option<Anchor>> {
        single_row(self, META_ANCHOR, Row::Anchor)?.map(|b| Anchor::decode(&b)).transpose()
    }

    fn state_head(&self) -> Result<Option<Vec<u8>>> {
        engine(|| {
            let Some(t) = self.table(META)? else { return Ok(None) };
            meta_value(&t, META_STATE_HEAD)
        })
    }

    fn visit_covered(&self, f: &mut CoveredVisitor<'_>) -> Result<()> {
        engine(|| {
            let meta = self.table(META)?.ok_or_else(|| Error::integrity("reading the store metadata"))?;
            for (row, key) in [
                (Row::Roots, META_ROOTS),
                (Row::IntegrityKey, META_INTEGRITY_KEY),
                (Row::AuditHead, META_AUDIT_HEAD),
                (Row::AuditArchive, META_AUDIT_ARCHIVE),
                (Row::Anchor, META_ANCHOR),
            ] {
                if let Some(v) = meta.get(key)? {
                    f(row, RowKey::Single, v.value())?;
                }
            }
            if let Some(t) = self.table(TOKENS)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, n) = k.value();
                    f(Row::Record, RowKey::Name(p, n), v.value())?;
                }
            }
            if let Some(t) = self.table(TOMBSTONES)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, n) = k.value();
                    f(Row::Tombstone, RowKey::Name(p, n), v.value())?;
                }
            }
            if let Some(t) = self.table(DEKS)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, ver) = k.value();
                    f(Row::Dek, RowKey::Version(p, ver), v.value())?;
                }
            }
            Ok(())
        })
    }

    fn dump(&self) -> Result<Dump> {
        engine(|| {
            let meta_t = self.table(META)?.ok_or_else(|| Error::integrity("reading store metadata"))?;
            let need = |k| meta_value(&meta_t, k)?.ok_or_else(|| Error::integrity("reading store metadata"));
            let mut d = Dump {
                store_id: self.meta()?.store_id,
                roots: need(META_ROOTS)?,
                integrity_key: need(META_INTEGRITY_KEY)?,
                audit_head: meta_value(&meta_t, META_AUDIT_HEAD)?.unwrap_or_default(),
                audit_archive: meta_value(&meta_t, META_AUDIT_ARCHIVE)?.unwrap_or_default(),
                ..Dump::default()
            };
            if let Some(t) = self.table(DEKS)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, ver) = k.value();
                    d.deks.push((p.into(), ver, v.value().to_vec()));
                }
            }
            if let Some(t) = self.table(TOKENS)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, n) = k.value();
                    d.tokens.push((p.into(), n.into(), v.value().to_vec()));
                }
            }
            if let Some(t) = self.table(TOMBSTONES)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    let (p, n) = k.value();
                    d.tombstones.push((p.into(), n.into(), v.value().to_vec()));
                }
            }
            d.audit = self.audit_entries(0)?;
            Ok(d)
        })
    }
}

/// The one record read: `full` checks the whole row (metadata readers), otherwise
/// the tag (the `get` path, which opens the record).
/// A covered `meta` row of its own kind (the audit head, the audit-key archive, the
/// rollback anchor), checked against the verified state.
fn single_row<T: Tables + StoreRead>(t: &T, key: &str, row: Row) -> Result<Option<Vec<u8>>> {
    engine(|| {
        let v = match t.table(META)? {
            Some(m) => meta_value(&m, key)?,
            None => return Ok(None),
        };
        // (The table is closed first: a check may read the state head in it.)
        check_row(t, row, RowKey::Single, v.as_deref())?;
        Ok(v)
    })
}

fn record_in<T: Tables + StoreRead, R>(
    t: &T,
    provider: &str,
    name: &str,
    full: bool,
    f: impl FnOnce(&RecordView<'_>) -> Result<R>,
) -> Result<Option<R>> {
    engine(|| {
        t.with_token_row(provider, name, |row| {
            // The newest verified version of the record, or its verified absence: an
            // older copy of the row (a revoked or overwritten token) fails here.
            check_record(t, provider, name, row, full)?;
            let Some(row) = row else { return Ok(None) };
            let view = RecordView::parse(row)?;
            // The AAD binds the header to the ciphertext; this binds the header to the key
            // the record is stored under, so a record copied to another slot fails.
            if view.provider != provider || view.name != name {
                return Err(Error::integrity("checking a record's place"));
            }
            f(&view).map(Some)
        })
    })
}
