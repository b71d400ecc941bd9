//! `doctor` and `stats`: what an operator asks of an open store. Each check is a
//! typed [`Check`] whose failure class, not its name, decides the exit code.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde::Serialize;

use super::{Counters, Inner, TokenGuard};
use crate::error::{Error, Result};
use crate::root::{Check, FailureClass};
use crate::seal::TokenState;
use crate::store::{CounterStatus, DekState, StoreRead};

/// Counters and totals for `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Tokens per provider.
    pub tokens_per_provider: BTreeMap<String, u64>,
    /// Tokens per provider and state (`active`, `expired`, `needs_reauth`), plus
    /// `revoked` from the tombstones.
    pub states_per_provider: BTreeMap<String, BTreeMap<String, u64>>,
    /// Total tokens.
    pub tokens: u64,
    /// DEK versions per provider, with state and encryption count.
    pub deks: Vec<DekInfo>,
    /// Hardware calls made by this process.
    pub hardware: HardwareCalls,
    /// DEK cache misses in this process (each one a lookup of the store's DEK entry,
    /// and an unwrap unless another thread just did it).
    pub cache_misses: u64,
    /// DEKs cached now.
    pub cache_entries: usize,
    /// Audit events stored.
    pub audit_events: u64,
    /// How this process's writes reached the fleet log; `None`: not a fleet copy.
    pub fleet_writes: Option<FleetWrites>,
}

/// How a process's writes reached the fleet log (docs/FLEET-DESIGN.md, "A write").
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct FleetWrites {
    /// Taken by the log without its lock: one statement each (optimistic).
    pub alone: u64,
    /// Tried without the lock and run again under it (nothing of the first try was
    /// written anywhere): another writer was first, or the write changed nothing
    /// (or failed) and a look found the copy behind the log.
    pub lost: u64,
}

/// One DEK version as `stats` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DekInfo {
    /// Provider the data key belongs to.
    pub provider: String,
    /// Its version number (1, 2, …; never reused).
    pub version: u32,
    /// Lifecycle state (active, decrypt-only, retired, destroyed).
    pub state: DekState,
    /// Records sealed under it so far.
    pub encryptions: u64,
    /// Records that use it now.
    pub records: u64,
}

/// Hardware calls of this process, by kind.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct HardwareCalls {
    /// DEK (and integrity-key) unwraps.
    pub unwraps: u64,
    /// Wraps of existing DEKs.
    pub wraps: u64,
    /// DEK generations.
    pub generates: u64,
    /// Unwraps that check a fresh wrap round-trips (a new DEK, a new root, a new
    /// integrity key), counted apart from the unwraps that serve reads.
    pub verifies: u64,
}

impl Counters {
    fn snapshot(&self) -> HardwareCalls {
        use std::sync::atomic::Ordering::Relaxed;
        HardwareCalls {
            unwraps: self.unwraps.load(Relaxed),
            wraps: self.wraps.load(Relaxed),
            generates: self.generates.load(Relaxed),
            verifies: self.verifies.load(Relaxed),
        }
    }
}

/// What opening every record found ([`TokenGuard::open_every_record`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordScan {
    /// Records in the store.
    pub records: usize,
    /// Records under a provider's destroyed DEKs (`shred`): unrecoverable by design.
    pub shredded: usize,
    /// Records that do not open (`provider/name`).
    pub bad: Vec<String>,
}

type Scan = RecordScan;

impl TokenGuard {
    /// Opens every record (and drops what it opened): the `doctor` scan, and
    /// `migrate`'s check of its copy. Each record's plaintext lives only while it is
    /// checked; none is returned.
    pub fn open_every_record(&self) -> Result<RecordScan> {
        self.inner.scan_records()
    }

    /// Hardware calls made by this process so far.
    pub fn hardware_calls(&self) -> HardwareCalls {
        self.inner.counters.snapshot()
    }

    /// Counts, DEK versions and this process's hardware calls.
    pub fn stats(&self) -> Result<Stats> {
        let inner = &*self.inner;
        let txn = inner.store.read()?;
        let mut per = BTreeMap::new();
        let mut states: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut total = 0;
        let t = crate::clock::now();
        txn.scan_records(None, &mut |p, _, rec| {
            let state = match rec {
                Ok(r) if r.state == TokenState::NeedsReauth => "needs_reauth",
                Ok(r) if r.expires_at.is_some_and(|e| t >= e) => "expired",
                Ok(_) => "active",
                Err(_) => "damaged",
            };
            *states.entry(p.to_string()).or_default().entry(state.into()).or_insert(0) += 1;
            *per.entry(p.to_string()).or_insert(0u64) += 1;
            total += 1;
            Ok(ControlFlow::Continue(()))
        })?;
        for (p, _, _) in txn.tombstones()? {
            *states.entry(p).or_default().entry("revoked".into()).or_insert(0) += 1;
        }
        let mut deks = Vec::new();
        for (p, e) in txn.deks(None, None)? {
            let records = txn.count_indexed(&p, e.version)?;
            deks.push(DekInfo { provider: p, version: e.version, state: e.state, encryptions: e.encryptions, records });
        }
        Ok(Stats {
            tokens_per_provider: per,
            states_per_provider: states,
            tokens: total,
            deks,
            hardware: inner.counters.snapshot(),
            cache_misses: inner.cache.misses(),
            cache_entries: inner.cache.len(),
            audit_events: txn.audit_count()?,
            fleet_writes: inner.store.fleet_writes(),
        })
    }

    /// The checks of `tokenguard doctor` that need an open guard: root health, every
    /// wrapped DEK under every configured root, every record opened, the audit chain,
    /// file permissions.
    pub fn doctor(&self) -> Vec<Check> {
        let inner = &*self.inner;
        let mut out = Vec::new();
        for r in &inner.roots {
            out.extend(r.key.health());
        }
        for p in &inner.pins {
            if inner.rejected_roots.contains(&p.root_id) {
                out.push(Check::fail(
                    format!("root {} pinned", p.root_id),
                    FailureClass::Integrity,
                    format!(
                        "{}: the configured key has the pinned identity but does not open this store (replaced or \
                         re-generated?); it is not used, and new providers cannot get a data key until it is fixed",
                        p.description
                    ),
                ));
                continue;
            }
            let configured = inner.roots.iter().any(|r| r.root_id == p.root_id);
            let role = if configured { " (configured, opens the store)" } else { " (not configured here)" };
            out.push(Check::pass(format!("root {} pinned", p.root_id), format!("{}{role}", p.description)));
        }
        if let Some(check) = inner.rotation_policy_check() {
            out.push(check);
        }
        out.push(match inner.store.reverify_state() {
            Ok(r) if r.verified => Check::pass(
                "authenticated state",
                format!("{} covered rows match the state head (generation {})", r.rows, r.generation),
            ),
            Ok(r) => Check::fail(
                "authenticated state",
                FailureClass::Integrity,
                r.problem.unwrap_or_else(|| "the rows do not match the state head".into()),
            ),
            Err(e) => Check::error("authenticated state", &e),
        });
        out.push(counter_check(inner.store.check_counter()));
        if let Some(h) = inner.store.fleet_health() {
            out.extend(fleet_checks(h));
        }
        let perms = inner.store.permission_problems();
        out.push(if perms.is_empty() {
            Check::pass("store permissions", "file 600, directory 700")
        } else {
            Check::fail("store permissions", FailureClass::Other, perms.join("; "))
        });
        if let Some(check) = inner.tpm_auth_check() {
            out.push(check);
        }
        out.push(match inner.check_all_deks() {
            Ok(n) => Check::pass("wrapped DEKs unwrap", format!("{n} wrapped DEKs opened under the configured roots")),
            Err(e) => Check::error("wrapped DEKs unwrap", &e),
        });
        out.push(match inner.scan_records() {
            Ok(s) if s.bad.is_empty() => Check::pass(
                "record integrity scan",
                format!(
                    "{} records open{}",
                    s.records - s.shredded,
                    if s.shredded > 0 { format!(", {} shredded", s.shredded) } else { String::new() }
                ),
            ),
            Ok(s) => Check::fail(
                "record integrity scan",
                FailureClass::Integrity,
                format!("{} of {} records fail to open: {}", s.bad.len(), s.records, s.bad.join(", ")),
            ),
            Err(e) => Check::error("record integrity scan", &e),
        });
        out.push(match self.audit_verify() {
            Ok(r) => match r.first_bad {
                None => Check::pass("audit chain", format!("{} events verified", r.events)),
                Some((seq, why)) => Check::fail("audit chain", FailureClass::Integrity, format!("event {seq}: {why}")),
            },
            Err(e) => Check::error("audit chain", &e),
        });
        out
    }
}

/// The `doctor` line of the rollback counter.
/// A fleet copy's link: the log reached now, the listener, the server's
/// notification queue (when it fills, every fleet write fails).
/// How often a listener connected: more than once means it lost connections (the
/// log at warn level says why).
fn connections(n: u64) -> String {
    match n {
        0 => "not connected yet".into(),
        1 => "one connection since it started".into(),
        n => format!("{n} connections since it started: it lost {} (see the log)", n - 1),
    }
}

fn fleet_checks(h: crate::store::redb_store::FleetHealth) -> Vec<Check> {
    let mut out = vec![match h.synced {
        Ok(g) => Check::pass("fleet log", format!("reached; this copy is the log's newest (generation {g})")),
        Err(e) => Check::error("fleet log", &e),
    }];
    out.push(match h.listener {
        // A read trusts a heartbeat younger than the bound (`Link::stale`).
        Some(l) if l.listening && l.heartbeat_age_ms < l.bound_ms && (l.proven || l.connections == 1) => {
            let beat = if l.proven {
                format!("last heartbeat back {} ms ago", l.heartbeat_age_ms)
            } else {
                format!("connected {} ms ago, its first heartbeat not back yet", l.heartbeat_age_ms)
            };
            Check::pass(
                "fleet listener",
                format!(
                    "listening: other hosts' writes are seen one notification after; {beat}; {}",
                    connections(l.connections)
                ),
            )
        }
        Some(l) if l.listening && !l.proven && l.heartbeat_age_ms < l.bound_ms => Check::warn(
            "fleet listener",
            format!(
                "connected again {} ms ago, and no heartbeat has come back on this connection yet (a listener that \
                 keeps connecting without one is behind something that does not keep its session, such as a \
                 transaction pooler): reads keep the staleness bound meanwhile; {}",
                l.heartbeat_age_ms,
                connections(l.connections)
            ),
        ),
        Some(l) if l.listening => Check::warn(
            "fleet listener",
            format!(
                "connected, but its last heartbeat came back {} ms ago, past the {} ms bound (the server or the \
                 network is slow to answer): reads look at the log meanwhile; {}",
                l.heartbeat_age_ms,
                l.bound_ms,
                connections(l.connections)
            ),
        ),
        Some(l) => Check::warn(
            "fleet listener",
            format!(
                "not listening now (it connects again by itself; meanwhile reads keep the staleness bound); {}",
                connections(l.connections)
            ),
        ),
        None => {
            Check::pass("fleet listener", "none in this process (a one-shot command looks at the log when it starts)")
        }
    });
    out.push(match h.queue_usage {
        Ok(u) if u < 0.5 => Check::pass("notification queue", format!("{:.1} % of the server's queue used", u * 100.0)),
        Ok(u) => Check::warn(
            "notification queue",
            format!(
                "{:.1} % of the server's queue used: a session that listens and stays in a transaction (any \
                 database of the server) holds it; when it is full, every fleet write fails",
                u * 100.0
            ),
        ),
        Err(e) => Check::error("notification queue", &e),
    });
    out
}

fn counter_check(status: Result<CounterStatus>) -> Check {
    const NAME: &str = "rollback counter";
    match status {
        Ok(CounterStatus::Unbound) => Check::warn(
            NAME,
            "none configured: a whole older copy of the store file, put back, is not detected by a process started \
             afterwards (set nv_counter on a TPM root or counter_label on a PKCS#11 root, then `tokenguard upgrade`)",
        ),
        Ok(CounterStatus::Current { counter_id, value }) => {
            Check::pass(NAME, format!("the store is at {value}, as its counter {counter_id}"))
        }
        Ok(CounterStatus::Finished { counter_id, value }) => Check::pass(
            NAME,
            format!(
                "the store is at {value}, as its counter {counter_id} (an increment interrupted by a writer's exit was finished)"
            ),
        ),
        Ok(CounterStatus::NotBound { counter_id }) => Check::fail(
            NAME,
            FailureClass::Config,
            format!(
                "{counter_id} is configured, but the store is not bound to it: run `tokenguard upgrade` if this is the current store"
            ),
        ),
        Ok(CounterStatus::Wrong(e)) | Err(e) => Check::error(NAME, &e),
    }
}

impl Inner {
    /// Active DEKs older than the rotation policy, if one is set.
    fn rotation_policy_check(&self) -> Option<Check> {
        let max = self.opts.max_dek_age?;
        let t = crate::clock::now();
        let deks = self.store.read().and_then(|txn| txn.deks(None, None)).unwrap_or_default();
        let old: Vec<String> = deks
            .iter()
            .filter(|(_, e)| e.state == DekState::Active && t.saturating_sub(e.created) > max.as_secs())
            .map(|(p, e)| format!("{p} v{} ({} days)", e.version, t.saturating_sub(e.created) / 86_400))
            .collect();
        Some(if old.is_empty() {
            Check::pass(
                "rotation policy",
                format!("every active data key is younger than {} days", max.as_secs() / 86_400),
            )
        } else {
            Check::warn(
                "rotation policy",
                format!(
                    "older than the policy: {}; run `tokenguard rotate-dek PROVIDER` then `reencrypt`",
                    old.join(", ")
                ),
            )
        })
    }

    /// TPM wraps in the store still sealed without an authorisation value (made before
    /// `pin_source` was set): a TPM-device user can unseal those (issue 10, finding 7).
    /// `None` when the store has no TPM wraps.
    fn tpm_auth_check(&self) -> Option<Check> {
        use crate::root::WrapMechanism::{TpmSealed, TpmSealedAuth};
        let txn = self.store.read().ok()?;
        let mut wraps: Vec<crate::root::WrapMechanism> = txn
            .deks(None, None)
            .ok()?
            .into_iter()
            .filter(|(_, e)| !matches!(e.state, DekState::Retired | DekState::Destroyed))
            .flat_map(|(_, e)| e.wrapped.into_iter().map(|w| w.wrapped.mechanism))
            .collect();
        wraps.extend(txn.meta().ok()?.integrity_key.into_iter().map(|w| w.wrapped.mechanism));
        let tpm = wraps.iter().filter(|m| matches!(m, TpmSealed | TpmSealedAuth)).count();
        let open = wraps.iter().filter(|m| **m == TpmSealed).count();
        (tpm > 0).then(|| {
            if open == 0 {
                Check::pass("tpm sealed keys", format!("all {tpm} TPM-sealed keys need the authorisation value"))
            } else {
                Check::warn(
                    "tpm sealed keys",
                    format!(
                        "{open} of {tpm} TPM-sealed keys (data keys and the integrity key) were sealed without an \
                         authorisation value: anyone who can open the TPM device and read the store can unseal \
                         them. With pin_source set, `rotate-dek` each provider and `reencrypt` re-seals the data keys; the \
                         integrity key is re-sealed when it is next replaced (`root remove`)"
                    ),
                )
            }
        })
    }

    /// Unwraps every wrapped DEK under every configured root (bypassing the cache).
    /// Retired and destroyed versions have no material left by design: nothing to
    /// check, and not a failure.
    fn check_all_deks(&self) -> Result<usize> {
        let txn = self.store.read()?;
        let mut n = 0;
        for (p, e) in txn.deks(None, None)? {
            if matches!(e.state, DekState::Retired | DekState::Destroyed) {
                continue;
            }
            for r in &self.roots {
                let w = e.for_root(r.root_id).ok_or(Error::integrity("finding a DEK wrapped for a configured root"))?;
                if !r.key.can_unwrap() {
                    // A wrap-only root: its wrap is there, which is what can be checked.
                    continue;
                }
                Counters::add(&self.counters.unwraps, 1);
                r.key.unwrap(w).map_err(|err| match err {
                    Error::Integrity { .. } => {
                        tracing::warn!(
                            provider = p,
                            version = e.version,
                            root = r.root_id,
                            "wrapped DEK does not unwrap"
                        );
                        Error::integrity("unwrapping a stored DEK")
                    }
                    other => other,
                })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Opens every record.
    fn scan_records(&self) -> Result<Scan> {
        let txn = self.store.read()?;
        let mut scan = Scan { records: 0, shredded: 0, bad: Vec::new() };
        txn.scan_records(None, &mut |p, name, rec| {
            scan.records += 1;
            let opened = rec.and_then(|rec| {
                let c = self.cipher(&txn, p, name, rec.dek_version)?;
                rec.open(&c.cipher, &self.store_id).map(drop)
            });
            match opened {
                Ok(()) => {}
                // Destroyed on purpose: unrecoverable by design, not damage.
                Err(Error::Shredded { .. }) => scan.shredded += 1,
                Err(_) => scan.bad.push(format!("{p}/{name}")),
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(scan)
    }
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    //! The "fleet listener" check against the listener states a host can be in.
    use crate::root::Status;
    use crate::store::redb_store::{FleetHealth, ListenerHealth};

    fn listener(listening: bool, connections: u64, proven: bool, heartbeat_age_ms: u64) -> (Status, String) {
        let h = FleetHealth {
            synced: Ok(1),
            listener: Some(ListenerHealth { listening, connections, proven, heartbeat_age_ms, bound_ms: 1000 }),
            queue_usage: Ok(0.0),
        };
        let checks = super::fleet_checks(h);
        let c = checks.iter().find(|c| c.name == "fleet listener").unwrap_or_else(|| unreachable!());
        (c.status, c.detail.clone())
    }

    #[test]
    fn the_listener_check_passes_only_a_listener_whose_heartbeats_vouch() {
        assert_eq!(listener(true, 1, true, 200).0, Status::Ok);
        // Just connected, its first heartbeat not due yet.
        let (status, detail) = listener(true, 1, false, 200);
        assert_eq!(status, Status::Ok, "{detail}");
        assert!(detail.contains("first heartbeat not back yet"), "{detail}");
        // Connected again and not proven: a pooler, or a loss just now.
        let (status, detail) = listener(true, 4, false, 200);
        assert_eq!(status, Status::Warn, "{detail}");
        assert!(detail.contains("it lost 3"), "{detail}");
        // Its last heartbeat as old as the bound: reads no longer trust it.
        assert_eq!(listener(true, 1, true, 1000).0, Status::Warn);
        assert_eq!(listener(false, 2, false, 10).0, Status::Warn);
    }
}
