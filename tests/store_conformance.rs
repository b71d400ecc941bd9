//! The store's guarantees, one suite run against both backends (issue 16: "the same
//! tests, parameterised, not copies"):
//! - `redb`: one store file, two handles of one guard;
//! - `fleet`: two hosts, each its own copy of the store, on one fleet log in a real
//!   PostgreSQL server (the fixture of `tests/common/postgres.rs`), with a zero
//!   staleness bound so that every read looks at the log.
//!
//! Each test is written once against "two handles on one store" and must hold the
//! same on both: writes seen by every handle, compare-and-set, a provider's first
//! data key made once, revocation and shredding final, key rotation, one audit
//! chain, batches in one transaction, purges.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::postgres::PgServer;
use tokenguard::fleet::{LogConfig, attach};
use tokenguard::guard::revoke::{PurgeOptions, RevokeTarget};
use tokenguard::root::soft::SoftRoot;
use tokenguard::secret::SecretBytes;
use tokenguard::store::StoreOptions;
use tokenguard::{Error, GetOptions, GuardOptions, PutItem, PutOptions, Secret, TokenGuard};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Redb,
    Fleet,
}

/// Two handles on one store, and what keeps them alive.
struct Store {
    handles: [TokenGuard; 2],
    _pg: Option<PgServer>,
    _dir: tempfile::TempDir,
}

fn opts() -> GuardOptions {
    GuardOptions { require_hardware: false, ..Default::default() }
}

impl Store {
    fn new(backend: Backend, name: &str) -> Store {
        let dir = tempfile::Builder::new().prefix(&format!("tg-conf-{name}-")).tempdir_in(common::tmp_base()).unwrap();
        let root = || Box::new(SoftRoot::open_or_create(&dir.path().join("root.key")).unwrap()) as _;
        let first = dir.path().join("h0.redb");
        let g = TokenGuard::create(&first, StoreOptions::default(), vec![root()], opts()).unwrap();
        match backend {
            Backend::Redb => Store { handles: [g.clone(), g], _pg: None, _dir: dir },
            Backend::Fleet => {
                drop(g);
                let pg = PgServer::start(&format!("conf-{name}"));
                pg.sql("postgres", "CREATE DATABASE tg");
                std::fs::copy(&first, dir.path().join("h1.redb")).unwrap();
                let url = format!("host={} dbname=tg user={}", pg.socket_dir().display(), common::postgres::USER);
                let password = SecretBytes::from_slice(pg.password.as_bytes());
                let cfg = LogConfig {
                    url: &url,
                    password: Some(&password),
                    ca_file: None,
                    timeout: Duration::from_secs(10),
                    staleness: Duration::ZERO,
                    listen: false,
                };
                let host = |h: usize| {
                    let path = dir.path().join(format!("h{h}.redb"));
                    let g = TokenGuard::open(&path, StoreOptions::default(), vec![root()], opts()).unwrap();
                    attach(&g, &cfg).unwrap();
                    g
                };
                let handles = [host(0), host(1)];
                Store { handles, _pg: Some(pg), _dir: dir }
            }
        }
    }
}

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

fn get(g: &TokenGuard, provider: &str, name: &str) -> tokenguard::Result<String> {
    g.get_field(provider, name, None, GetOptions::default())
        .map(|(s, _)| String::from_utf8(s.expose().to_vec()).unwrap())
}

/// A `put`; one that a fleet's catch-up made fail (`FleetConflict`: keys rotated by
/// another host under it) is run again, as its error says.
fn put(g: &TokenGuard, provider: &str, name: &str, value: &str) {
    loop {
        match g.put(provider, name, raw(value), PutOptions::default()) {
            Err(Error::FleetConflict { .. }) => continue,
            other => break drop(other.unwrap()),
        }
    }
}

/// Each suite function, as one test per backend.
macro_rules! both {
    ($($suite:ident),* $(,)?) => {
        $(mod $suite {
            #[test]
            fn redb() {
                super::$suite(super::Backend::Redb);
            }
            #[test]
            fn fleet() {
                super::$suite(super::Backend::Fleet);
            }
        })*
    };
}

both!(
    writes_are_seen_by_every_handle,
    create_only_puts_race_and_one_wins,
    a_providers_first_data_key_is_made_once,
    revocation_and_shredding_are_final_everywhere,
    key_rotation_reencryption_and_retirement,
    concurrent_writers_make_one_audit_chain,
    a_batch_is_one_transaction_and_a_purge_removes_for_everyone,
);

fn writes_are_seen_by_every_handle(b: Backend) {
    let s = Store::new(b, "seen");
    let [h0, h1] = &s.handles;
    h0.put("github", "ci", raw("one"), PutOptions::default()).unwrap();
    assert_eq!(get(h1, "github", "ci").unwrap(), "one");
    h1.put("github", "ci", raw("two"), PutOptions::default()).unwrap();
    assert_eq!(get(h0, "github", "ci").unwrap(), "two");
    h0.put("slack", "bot", raw("xoxb"), PutOptions::default()).unwrap();
    let names = |g: &TokenGuard| g.list(None).unwrap().into_iter().map(|t| (t.provider, t.name)).collect::<Vec<_>>();
    assert_eq!(names(h0), names(h1));
    assert_eq!(names(h1).len(), 2);
    h1.delete("github", "ci").unwrap();
    assert!(matches!(get(h0, "github", "ci"), Err(Error::NotFound { .. })), "{b:?}");
    assert_eq!(names(h0), vec![("slack".to_string(), "bot".to_string())]);
}

fn create_only_puts_race_and_one_wins(b: Backend) {
    let s = Store::new(b, "cas");
    for round in 0..5 {
        let name = format!("race-{round}");
        let outcomes: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = s
                .handles
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let name = name.clone();
                    sc.spawn(move || {
                        g.put_checked("github", &name, raw(&format!("from-{i}")), PutOptions::default(), false)
                            .map(|_| i)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = outcomes.iter().filter_map(|o| o.as_ref().ok().copied()).collect();
        assert_eq!(won.len(), 1, "{b:?} round {round}: {outcomes:?}");
        for o in &outcomes {
            // The loser is told the token exists, or (fleet) that another host's write
            // came first: the compare-and-set ran against the winner's state.
            if let Err(e) = o {
                assert!(matches!(e, Error::Exists { .. } | Error::FleetConflict { .. }), "{b:?}: {e:?}");
            }
        }
        let expected = format!("from-{}", won[0]);
        for g in &s.handles {
            assert_eq!(get(g, "github", &name).unwrap(), expected, "{b:?}");
        }
    }
}

fn a_providers_first_data_key_is_made_once(b: Backend) {
    let s = Store::new(b, "dek");
    std::thread::scope(|sc| {
        for (i, g) in s.handles.iter().enumerate() {
            sc.spawn(move || {
                for k in 0..8 {
                    let name = format!("h{i}-{k}");
                    put(g, "fresh", &name, &name);
                }
            });
        }
    });
    for g in &s.handles {
        let deks: Vec<_> = g.stats().unwrap().deks.into_iter().filter(|d| d.provider == "fresh").collect();
        assert_eq!(deks.len(), 1, "{b:?}: one data key version for the provider: {deks:?}");
        assert_eq!(deks[0].records, 16, "{b:?}");
        for i in 0..2 {
            for k in 0..8 {
                let name = format!("h{i}-{k}");
                assert_eq!(get(g, "fresh", &name).unwrap(), name);
            }
        }
    }
}

fn revocation_and_shredding_are_final_everywhere(b: Backend) {
    let s = Store::new(b, "final");
    let [h0, h1] = &s.handles;
    h0.put("github", "leaked", raw("old-secret"), PutOptions::default()).unwrap();
    h0.put("slack", "bot", raw("xoxb"), PutOptions::default()).unwrap();
    h1.revoke(RevokeTarget::One { provider: "github", name: "leaked" }, "leaked").unwrap();
    assert!(matches!(get(h0, "github", "leaked"), Err(Error::Revoked { .. })), "{b:?}");
    // Re-issued: a new token under the name; the old one never comes back.
    h0.put("github", "leaked", raw("new-secret"), PutOptions::default()).unwrap();
    assert_eq!(get(h1, "github", "leaked").unwrap(), "new-secret");

    h1.shred("slack").unwrap();
    assert!(matches!(get(h0, "slack", "bot"), Err(Error::Shredded { .. })), "{b:?}");
    h0.put("slack", "bot2", raw("after"), PutOptions::default()).unwrap();
    assert_eq!(get(h1, "slack", "bot2").unwrap(), "after");
    assert!(matches!(get(h1, "slack", "bot"), Err(Error::Shredded { .. })), "{b:?}");
}

fn key_rotation_reencryption_and_retirement(b: Backend) {
    let s = Store::new(b, "rotate");
    let [h0, h1] = &s.handles;
    for k in 0..4 {
        h0.put("jira", &format!("t{k}"), raw(&format!("v{k}")), PutOptions::default()).unwrap();
    }
    let v2 = h1.rotate_dek("jira").unwrap();
    assert_eq!(v2, 2);
    h0.put("jira", "t4", raw("v4"), PutOptions::default()).unwrap();
    let on = |g: &TokenGuard, v: u32| {
        g.stats().unwrap().deks.iter().find(|d| d.provider == "jira" && d.version == v).map_or(0, |d| d.records)
    };
    assert_eq!((on(h1, 1), on(h1, 2)), (4, 1), "{b:?}: the new write used the new version");
    h0.reencrypt(Some("jira"), tokenguard::guard::rotate::ReencryptOptions::default(), |_, _, _| {}).unwrap();
    assert_eq!((on(h1, 1), on(h1, 2)), (0, 5), "{b:?}");
    assert_eq!(h1.retire("jira", 2).unwrap(), vec![1]);
    for g in &s.handles {
        for k in 0..5 {
            assert_eq!(get(g, "jira", &format!("t{k}")).unwrap(), format!("v{k}"));
        }
    }
}

fn concurrent_writers_make_one_audit_chain(b: Backend) {
    let s = Store::new(b, "audit");
    std::thread::scope(|sc| {
        for (i, g) in s.handles.iter().enumerate() {
            sc.spawn(move || {
                for k in 0..10 {
                    put(g, "github", &format!("h{i}-{k}"), "x");
                }
            });
        }
    });
    let [h0, h1] = &s.handles;
    h1.sync().unwrap();
    let r0 = h0.audit_verify().unwrap();
    let r1 = h1.audit_verify().unwrap();
    assert_eq!(format!("{r0:?}"), format!("{r1:?}"), "{b:?}");
    let events = |g: &TokenGuard| {
        g.audit_list(0).unwrap().into_iter().map(|e| format!("{} {} {}", e.seq, e.op, e.name)).collect::<Vec<_>>()
    };
    let (e0, e1) = (events(h0), events(h1));
    assert_eq!(e0, e1, "{b:?}: one chain, in one order, on every handle");
    assert_eq!(e0.iter().filter(|e| e.contains(" put ")).count(), 20, "{b:?}: {e0:?}");
}

fn a_batch_is_one_transaction_and_a_purge_removes_for_everyone(b: Backend) {
    let s = Store::new(b, "batch");
    let [h0, h1] = &s.handles;
    let items = (0..100)
        .map(|k| PutItem {
            provider: "github".into(),
            name: format!("t{k}"),
            secret: raw(&format!("v{k}")),
            options: PutOptions::default(),
        })
        .collect();
    h1.put_many(items).unwrap();
    assert_eq!(h0.list(Some("github")).unwrap().len(), 100);
    // One write, one audit event.
    let puts = h0.audit_list(0).unwrap().into_iter().filter(|e| e.op == "put_many").count();
    assert_eq!(puts, 1, "{b:?}");
    let past = tokenguard::now() - 10;
    h0.put("github", "expired", raw("gone"), PutOptions { expires_at: Some(past), ..Default::default() }).unwrap();
    let report = h1.purge(PurgeOptions { expired: true, revoked: false, older_than: 0 }).unwrap();
    assert_eq!(report.expired, 1, "{b:?}: {report:?}");
    assert!(matches!(get(h0, "github", "expired"), Err(Error::NotFound { .. })), "{b:?}");
    assert_eq!(h0.list(Some("github")).unwrap().len(), 100);
}
