//! Creating and opening a store: which configured roots are pinned in it, and the
//! unwrap of the store's integrity key that proves one of them is the right key.

use std::path::Path;
use std::sync::Arc;

use super::{ActiveRoot, Counters, GuardOptions, Inner, TokenGuard};
use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::root::RootKey;
use crate::secret::DekMaterial;
use crate::store::state::StateKey;
use crate::store::{
    AnchorWrite, CounterStatus, RootPin, RootWrapped, StateCheck, Store, StoreMeta, StoreOptions, StoreRead,
};

/// Under `require_hardware`, no software key may be able to open the store: a
/// wrap-only root (an age escrow root without its identity) is allowed, as it only
/// wraps. And some configured root must be able to open it at all.
pub(crate) fn check_hardware(roots: &[Box<dyn RootKey>], require: bool) -> Result<()> {
    if require && let Some(r) = roots.iter().find(|r| !r.is_hardware() && r.can_unwrap()) {
        let fix = if r.backend() == "age" {
            "the age root's identity is in this process (identity_file, or rebuilt from shares), so it could open \
             the store: drop identity_file from this config (the root then wraps only, as an escrow root should), \
             or recover with a config without require_hardware"
        } else {
            "remove it or set require_hardware = false (development only)"
        };
        return Err(Error::Config(format!(
            "require_hardware = true, but a {} root that can open the store is configured: {fix}",
            r.backend()
        )));
    }
    if roots.is_empty() {
        return Err(Error::Config("no root is configured: add a [[roots]] section".into()));
    }
    if !roots.iter().any(|r| r.can_unwrap()) {
        return Err(Error::Config(
            "every configured root is wrap-only (age recipients without an identity): none can open the store; \
             configure a hardware root, or the age identity (identity_file, or `tokenguard recovery combine`)"
                .into(),
        ));
    }
    Ok(())
}

/// A root that depends on PCR values is never the only way in: a firmware update
/// would lock the store.
fn check_not_only_policy_bound(roots: &[Box<dyn RootKey>]) -> Result<()> {
    if !roots.is_empty() && roots.iter().all(|r| r.is_policy_bound()) {
        return Err(Error::Config(
            "a PCR-bound TPM root cannot be the only root (a firmware or boot change would lock the store): \
             add a second root, e.g. an HSM or an offline recovery key"
                .into(),
        ));
    }
    Ok(())
}

impl TokenGuard {
    /// Creates a new store at `path` pinned to `roots`; every root wraps the store's
    /// integrity key (and later every DEK).
    pub fn create(
        path: &Path,
        store_opts: StoreOptions,
        roots: Vec<Box<dyn RootKey>>,
        opts: GuardOptions,
    ) -> Result<Self> {
        check_hardware(&roots, opts.require_hardware)?;
        check_not_only_policy_bound(&roots)?;
        let mut pins = Vec::new();
        for (i, r) in roots.iter().enumerate() {
            let root_id = u16::try_from(i + 1).map_err(|_| Error::Config("too many roots".into()))?;
            let id = r.identity()?;
            pins.push(RootPin { root_id, pin: id.pin(), description: id.description });
        }
        let ik = crate::crypto::new_integrity_key()?;
        let mut wrapped = Vec::new();
        for (r, p) in roots.iter().zip(&pins) {
            wrapped.push(RootWrapped { root_id: p.root_id, wrapped: r.wrap(&ik)? });
        }
        let meta = StoreMeta {
            schema: crate::store::SCHEMA_VERSION,
            store_id: crate::crypto::random_array()?,
            roots: pins.clone(),
            integrity_key: wrapped,
        };
        let active: Vec<ActiveRoot> =
            roots.into_iter().zip(&pins).map(|(key, p)| ActiveRoot { root_id: p.root_id, key: key.into() }).collect();
        // The guard's audit key is needed inside the creating transaction; build the
        // state first, then the store with the first event in the same commit.
        let detail = pins.iter().map(|p| p.description.as_str()).collect::<Vec<_>>().join("; ");
        let audit_keys = crate::audit::AuditKeys::load(ik.expose(), None)?;
        let store =
            Store::create(path, store_opts, &meta, StateKey::derive(ik.expose()), crate::clock::now(), |txn| {
                crate::audit::append(
                    txn,
                    &audit_keys,
                    &opts.actor,
                    NewEvent { op: "init", outcome: "ok", detail, ..Default::default() },
                )
                .map(drop)
            })?;
        // The new store's state, known to this guard from the start (and its recheck
        // interval set), as an open would.
        store.verify_state(StateKey::derive(ik.expose()), meta.store_id, opts.state_recheck, opts.state_check)?;
        if let Err(e) = attach_counter(&store, counter_root(&active), opts.state_check, Some(AnchorWrite::BindNew)) {
            // No half-made store: `init` can be run again once the counter is sorted.
            drop(store);
            let lock = crate::store::anchor::lock_path(path);
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(lock);
            return Err(e);
        }
        let inner = Inner::new(store, meta.store_id, active, pins, &ik, opts)?;
        Counters::add(&inner.counters.wraps, inner.roots.len() as u64);
        tracing::info!(path = %path.display(), roots = inner.pins.len(), "created store");
        Ok(TokenGuard { inner: Arc::new(inner) })
    }

    /// Opens an existing store. At least one of `roots` must be pinned in it and must
    /// unwrap the store's integrity key; otherwise [`Error::WrongRoot`].
    pub fn open(
        path: &Path,
        store_opts: StoreOptions,
        roots: Vec<Box<dyn RootKey>>,
        opts: GuardOptions,
    ) -> Result<Self> {
        Self::open_inner(path, store_opts, roots, opts, false)
    }

    /// [`TokenGuard::open`]; `bind`: a store just made from a backup or a salvage,
    /// bound to the configured rollback counter at its current value instead of
    /// checked against it.
    pub(crate) fn open_inner(
        path: &Path,
        store_opts: StoreOptions,
        roots: Vec<Box<dyn RootKey>>,
        opts: GuardOptions,
        bind: bool,
    ) -> Result<Self> {
        check_hardware(&roots, opts.require_hardware)?;
        let store = Store::open(path, store_opts)?;
        let meta = store.read()?.meta()?;
        let matched = match_pins(&meta.roots, &roots)?;
        let (ik, opened_by) = unwrap_integrity_key(&meta.roots, &meta.integrity_key, &matched, &roots)?;
        // Every other configured root must open the same integrity key. One that
        // carries a pinned identity but does not (a key replaced under the same label
        // and id) is not used: it would otherwise wrap every new data key.
        let mut rejected = Vec::new();
        let matched: Vec<(usize, u16)> = matched
            .into_iter()
            .filter(|&(i, root_id)| {
                // A wrap-only root cannot be checked, and needs no check: its pin is
                // its recipient, so it wraps to exactly what is pinned.
                let opens = i == opened_by
                    || !roots[i].can_unwrap()
                    || meta
                        .integrity_key
                        .iter()
                        .find(|w| w.root_id == root_id)
                        .is_some_and(|w| roots[i].unwrap(&w.wrapped).is_ok_and(|k| k.expose() == ik.expose()));
                if !opens {
                    tracing::warn!(
                        root_id,
                        "a configured root has the pinned identity but does not open the store; not used"
                    );
                    rejected.push(root_id);
                }
                opens
            })
            .collect();
        // The rollback counter may be offered by any configured root, pinned or not: it
        // needs no key material (a TPM root just removed for re-sealing still keeps it).
        let mut counter: Option<Arc<dyn RootKey>> = None;
        let active: Vec<ActiveRoot> = roots
            .into_iter()
            .enumerate()
            .filter_map(|(i, key)| {
                let key: Arc<dyn RootKey> = key.into();
                if counter.is_none() && key.counter().is_some() {
                    counter = Some(key.clone());
                }
                matched.iter().find(|(j, _)| *j == i).map(|(_, id)| ActiveRoot { root_id: *id, key })
            })
            .collect();
        // Every covered row against the head: a replayed, edited or deleted row
        // refuses the open (or, for inspection, is reported).
        let state =
            store.verify_state(StateKey::derive(ik.expose()), meta.store_id, opts.state_recheck, opts.state_check)?;
        tracing::debug!(
            generation = state.generation,
            rows = state.rows,
            verified = state.verified,
            "store state checked"
        );
        attach_counter(&store, counter, opts.state_check, bind.then_some(AnchorWrite::Rebind))?;
        let mut inner = Inner::new(store, meta.store_id, active, meta.roots, &ik, opts)?;
        inner.rejected_roots = rejected;
        // Audit events a crashed owner left in its read journal join the chain before
        // anything else is written (opened for inspection: reported, not fatal).
        if let Err(e) = super::journal::fold_leftover_journal(&inner) {
            if inner.opts.state_check == StateCheck::Enforce {
                return Err(e);
            }
            tracing::warn!(error = %e, "the read journal could not be folded; this handle will not write");
            inner.store.block_writes_unfolded(e.to_string());
        }
        Counters::add(&inner.counters.unwraps, 1);
        // From here on, a fleet host's copy reads and writes only once joined to its
        // log (`crate::fleet::attach`).
        inner.store.arm_member_check()?;
        tracing::debug!(path = %path.display(), "opened store; integrity key unwrapped");
        Ok(TokenGuard { inner: Arc::new(inner) })
    }
}

/// The first active root that offers a rollback counter.
pub(super) fn counter_root(roots: &[ActiveRoot]) -> Option<Arc<dyn RootKey>> {
    roots.iter().find(|r| r.key.counter().is_some()).map(|r| r.key.clone())
}

/// Gives the store the configured rollback counter, and binds the store to it (`bind`)
/// or checks the store against it: an older copy of the store (or a store never bound
/// to the configured counter) refuses the open, or is reported when inspecting (as is
/// a counter that cannot be read then, so `doctor` can say so).
fn attach_counter(
    store: &Store,
    counter: Option<Arc<dyn RootKey>>,
    check: StateCheck,
    bind: Option<AnchorWrite>,
) -> Result<()> {
    store.use_counter(counter);
    if let Some(how) = bind {
        store.bind_counter(how, |_| Ok(()))?;
        return Ok(());
    }
    let status = match store.check_counter() {
        Err(e) if check == StateCheck::Report => CounterStatus::Wrong(e),
        other => other?,
    };
    let problem = match status {
        CounterStatus::Unbound | CounterStatus::Current { .. } | CounterStatus::Finished { .. } => return Ok(()),
        CounterStatus::NotBound { counter_id } => Error::Config(format!(
            "the rollback counter {counter_id} is configured, but the store is not bound to it: if this is the \
             current store, run `tokenguard upgrade` to bind it (an older copy of a store made before it was \
             bound looks the same)"
        )),
        CounterStatus::Wrong(e) => e,
    };
    if check == StateCheck::Enforce {
        return Err(problem);
    }
    tracing::warn!(problem = %problem, "opened for inspection despite the rollback counter");
    store.note_counter_problem(Some(problem.to_string()));
    Ok(())
}

/// Which configured roots (by index) are pinned in the store, with their root ids.
fn match_pins(pins: &[RootPin], roots: &[Box<dyn RootKey>]) -> Result<Vec<(usize, u16)>> {
    let mut found = Vec::new();
    let mut matched = Vec::new();
    for (i, r) in roots.iter().enumerate() {
        let id = r.identity()?;
        match pins.iter().find(|p| p.pin == id.pin()) {
            Some(p) => matched.push((i, p.root_id)),
            None => found.push(id.description),
        }
    }
    if matched.is_empty() {
        return Err(Error::WrongRoot { pinned: describe_pins(pins), found: found.join(" and ") });
    }
    Ok(matched)
}

fn describe_pins(pins: &[RootPin]) -> String {
    pins.iter().map(|p| p.description.clone()).collect::<Vec<_>>().join(" or ")
}

/// Unwraps the store's integrity key: hardware roots first, then the other roots whose
/// wraps only their key can make (soft), then public-key roots (age).
///
/// Fails closed where a file writer could otherwise choose the key: a wrap to an age
/// recipient can be made by anyone who knows the recipient.
/// - A configured root pinned in the store without a wrap of the key: the file was
///   altered (roots are pinned and wrapped in one write).
/// - A root with authenticated wraps whose wrap does not open (a modified blob, or a
///   key replaced under the same label), followed by an age root that opens: refused.
///   (Another authenticated root may still open it: finding 10's replaced key.)
///
/// A root that cannot be reached (module, token, TPM errors) is no such refusal: a
/// recovery falls back to the escrow root then.
fn unwrap_integrity_key(
    pins: &[RootPin],
    wrapped_ik: &[RootWrapped],
    matched: &[(usize, u16)],
    roots: &[Box<dyn RootKey>],
) -> Result<(DekMaterial, usize)> {
    let mut order: Vec<(usize, u16)> = matched.iter().copied().filter(|(i, _)| roots[*i].can_unwrap()).collect();
    if order.is_empty() {
        return Err(Error::Config(
            "the configured roots pinned in this store are wrap-only (age recipients without an identity): \
             none can open it; configure its hardware root, or recover with the age identity"
                .into(),
        ));
    }
    order.sort_by_key(|(i, _)| (!roots[*i].is_hardware(), !roots[*i].wraps_authenticate()));
    let mut last_err = None;
    let mut refused_authenticated = None;
    for (i, root_id) in order {
        let Some(w) = wrapped_ik.iter().find(|w| w.root_id == root_id) else {
            return Err(Error::integrity("finding the integrity key wrapped for a pinned, configured root"));
        };
        let authenticated = roots[i].wraps_authenticate();
        if let (false, Some(refused)) = (authenticated, refused_authenticated) {
            tracing::error!(
                refused,
                root_id,
                "a root's own wrap of the integrity key does not open; a key wrapped to an age recipient is not \
                 taken instead (remove that root from the configuration to recover with the escrow alone)"
            );
            return Err(Error::integrity(
                "checking the integrity key (a configured root's own wrap does not open it, and a key that anyone \
                 could have wrapped to an age recipient is not taken instead)",
            ));
        }
        match roots[i].unwrap(&w.wrapped) {
            Ok(ik) => return Ok((ik, i)),
            Err(Error::Integrity { .. }) => {
                if authenticated {
                    refused_authenticated = Some(root_id);
                }
                let found = if authenticated {
                    "a key with the pinned identity that does not open this store (replaced or re-generated?)"
                } else {
                    "an age identity whose wrap of the store's key does not open this store or carries no valid tag \
                     (made without the root's authentication key: the file was altered)"
                };
                last_err = Some(Error::WrongRoot { pinned: describe_pins(pins), found: found.into() })
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| Error::integrity("finding the store's integrity key")))
}

/// The store's integrity key, unwrapped by one of `roots` (for restore).
pub(crate) fn unlock_key(
    pins: &[RootPin],
    wrapped_ik: &[RootWrapped],
    roots: &[Box<dyn RootKey>],
) -> Result<DekMaterial> {
    let matched = match_pins(pins, roots)?;
    unwrap_integrity_key(pins, wrapped_ik, &matched, roots).map(|(ik, _)| ik)
}
