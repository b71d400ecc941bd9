//! The fleet log against a real PostgreSQL server (the test fixture of
//! `tests/common/postgres.rs`): hosts that share one log see each other's writes,
//! a second writer of one generation loses cleanly, and a log edited in the database
//! is refused without changing a host's store.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/postgres.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Fleet, LogConfig};
use crate::error::{Error, exit};
use crate::guard::revoke::RevokeTarget;
use crate::guard::{GetOptions, GuardOptions, PutOptions, TokenGuard};
use crate::root::RootKey;
use crate::root::soft::SoftRoot;
use crate::secret::{Secret, SecretBytes};
use crate::store::StoreOptions;

struct Rig {
    pg: pg::PgServer,
    dir: tempfile::TempDir,
    password: SecretBytes,
    url: String,
}

impl Rig {
    /// A server with a database `tg`, and a store made by the first "host" whose file
    /// is the start of every other host's copy (snapshots are a later step).
    fn new(name: &str) -> Rig {
        let pg = pg::PgServer::start(name);
        pg.sql("postgres", "CREATE DATABASE tg");
        let dir = tempfile::tempdir().unwrap();
        drop(
            TokenGuard::create(&dir.path().join("start.redb"), StoreOptions::default(), vec![root(dir.path())], opts())
                .unwrap(),
        );
        let url = format!("host={} dbname=tg user={}", pg.socket_dir().display(), pg::USER);
        let password = SecretBytes::from_slice(pg.password.as_bytes());
        Rig { pg, dir, password, url }
    }

    fn config(&self) -> LogConfig<'_> {
        LogConfig { url: &self.url, password: Some(&self.password), timeout: Duration::from_secs(5) }
    }

    /// Host `name`: its own copy of the store, joined to the log.
    fn host(&self, name: &str) -> Fleet {
        let path = self.path(name);
        if !path.exists() {
            std::fs::copy(self.dir.path().join("start.redb"), &path).unwrap();
        }
        let g = TokenGuard::open(&path, StoreOptions::default(), vec![root(self.dir.path())], opts()).unwrap();
        Fleet::attach(g, &self.config()).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.redb"))
    }
}

fn root(dir: &Path) -> Box<dyn RootKey> {
    Box::new(SoftRoot::open_or_create(&dir.join("root.key")).unwrap())
}

fn opts() -> GuardOptions {
    GuardOptions { require_hardware: false, ..Default::default() }
}

fn raw(s: &str) -> Secret {
    Secret::raw(s.as_bytes().to_vec())
}

fn put(f: &Fleet, provider: &str, name: &str, value: &str) {
    f.write(|g| g.put(provider, name, raw(value), PutOptions::default())).unwrap();
}

fn get(f: &Fleet, provider: &str, name: &str) -> crate::Result<Vec<u8>> {
    f.guard().get_field(provider, name, None, GetOptions::default()).map(|(s, _)| s.expose().to_vec())
}

/// The generation of a host's store, MAC-checked.
fn generation(f: &Fleet) -> u64 {
    f.guard().generation().unwrap()
}

#[test]
fn hosts_on_one_log_see_each_others_writes_revocations_and_shreds() {
    let rig = Rig::new("fleet-hosts");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "ghp_from_a");
    assert!(matches!(get(&b, "github", "ci"), Err(Error::NotFound { .. })), "b has not caught up yet");
    b.catch_up().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"ghp_from_a");

    // A second writer of one generation loses: its write fails and commits nothing
    // here; through `Fleet::write` it catches up and runs again.
    put(&b, "slack", "bot", "xoxb_from_b");
    let err = a.guard().put("jira", "t", raw("from_a"), PutOptions::default()).unwrap_err();
    assert!(matches!(err, Error::FleetConflict { .. }), "{err}");
    assert_eq!(err.exit_code(), exit::BUSY);
    assert!(matches!(get(&a, "jira", "t"), Err(Error::NotFound { .. })), "the losing write committed locally");
    put(&a, "jira", "t", "from_a");
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"xoxb_from_b");
    b.catch_up().unwrap();
    assert_eq!(get(&b, "jira", "t").unwrap(), b"from_a");

    // A revocation on one host is final on the other; a shred on one host drops the
    // data key the other had cached.
    a.write(|g| g.revoke(RevokeTarget::One { provider: "github", name: "ci" }, "leaked")).unwrap();
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"xoxb_from_b", "a's slack key is now cached");
    b.write(|g| g.shred("slack")).unwrap();
    b.catch_up().unwrap();
    a.catch_up().unwrap();
    assert!(matches!(get(&b, "github", "ci"), Err(Error::Revoked { .. })));
    let err = get(&a, "slack", "bot").unwrap_err();
    assert!(matches!(err, Error::Shredded { .. } | Error::NotFound { .. }), "{err}");

    // A third host, joining late, catches up on everything at attach.
    let c = rig.host("c");
    assert_eq!(c.guard().generation().unwrap(), a.guard().generation().unwrap());
    assert_eq!(get(&c, "jira", "t").unwrap(), b"from_a");
    assert!(matches!(get(&c, "github", "ci"), Err(Error::Revoked { .. })));
    c.guard().audit_verify().unwrap();

    // A clone of the guard that outlives its `Fleet` reads, but writes nothing: a
    // write there would reach this host's store and not the log.
    let kept = c.guard().clone();
    let at = kept.generation().unwrap();
    drop(c);
    let err = kept.put("github", "after", raw("x"), PutOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Config(m) if m.contains("detached")), "{err}");
    assert_eq!(kept.generation().unwrap(), at);
    assert_eq!(kept.get_field("jira", "t", None, GetOptions::default()).unwrap().0.expose(), b"from_a");
}

#[test]
fn a_log_edited_in_the_database_is_refused_and_changes_no_host() {
    let rig = Rig::new("fleet-tamper");
    let (a, b) = (rig.host("a"), rig.host("b"));
    for i in 0..4 {
        put(&a, "github", &format!("t{i}"), &format!("v{i}"));
    }
    let top: u64 = rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches").trim().parse().unwrap();
    rig.pg.sql("tg", "CREATE TABLE saved AS SELECT * FROM tg_batches");
    let restore = "DELETE FROM tg_batches; INSERT INTO tg_batches SELECT * FROM saved";
    let here = generation(&b);
    let attacks = [
        (
            "a byte of a batch flipped",
            format!(
                "UPDATE tg_batches SET batch = set_byte(batch, 40, get_byte(batch, 40) # 1) WHERE gen = {}",
                top - 1
            ),
        ),
        ("a batch deleted", format!("DELETE FROM tg_batches WHERE gen = {}", top - 2)),
        (
            "two batches swapped",
            format!(
                "UPDATE tg_batches t SET batch = s.batch FROM saved s WHERE (t.gen, s.gen) IN (({x}, {y}), ({y}, {x}))",
                x = top - 1,
                y = top
            ),
        ),
        (
            "an older batch copied over a newer",
            format!("UPDATE tg_batches t SET batch = s.batch FROM saved s WHERE t.gen = {top} AND s.gen = {}", top - 3),
        ),
        (
            "a batch cut short",
            format!("UPDATE tg_batches SET batch = substring(batch FROM 1 FOR 60) WHERE gen = {top}"),
        ),
    ];
    for (what, sql) in &attacks {
        rig.pg.sql("tg", sql);
        let err = b.catch_up().unwrap_err();
        assert_eq!(err.exit_code(), exit::INTEGRITY, "{what}: {err}");
        assert_eq!(generation(&b), here, "{what}: b's store moved");
        assert!(matches!(get(&b, "github", "t0"), Err(Error::NotFound { .. })), "{what}");
        rig.pg.sql("tg", restore);
    }
    b.catch_up().unwrap();
    assert_eq!(get(&b, "github", "t3").unwrap(), b"v3");

    // The newest batch deleted: a host that read it keeps it (no rollback) and says
    // the log lost it; the host that wrote it refuses to build on that log.
    rig.pg.sql("tg", &format!("DELETE FROM tg_batches WHERE gen = {top}"));
    let err = b.catch_up().unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
    assert_eq!(get(&b, "github", "t3").unwrap(), b"v3");
    let err = a.write(|g| g.put("github", "t9", raw("v9"), PutOptions::default())).unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
}

#[test]
fn the_database_going_away_is_exit_12_and_hosts_recover_without_a_restart() {
    let mut rig = Rig::new("fleet-restart");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "one");
    let at = a.guard().generation().unwrap();
    rig.pg.stop();
    let err = a.write(|g| g.put("github", "ci", raw("two"), PutOptions::default())).unwrap_err();
    assert_eq!(err.exit_code(), exit::DATABASE, "{err}");
    assert_eq!(a.guard().generation().unwrap(), at, "a write the log did not take committed here");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"one", "reads go on from the local copy");
    assert_eq!(b.catch_up().unwrap_err().exit_code(), exit::DATABASE);
    rig.pg.restart();
    put(&a, "github", "ci", "two");
    b.catch_up().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"two");
}

#[test]
fn a_url_with_a_password_a_network_host_or_a_wrong_password_is_refused() {
    let rig = Rig::new("fleet-config");
    let g = || {
        TokenGuard::open(
            &rig.dir.path().join("start.redb"),
            StoreOptions::default(),
            vec![root(rig.dir.path())],
            opts(),
        )
        .unwrap()
    };
    let with_pw = format!("{} password=x", rig.url);
    let cfg = LogConfig { url: &with_pw, ..rig.config() };
    assert!(matches!(Fleet::attach(g(), &cfg), Err(Error::Config(m)) if m.contains("password")));
    let tcp = "host=db.internal dbname=tg user=tokenguard";
    let cfg = LogConfig { url: tcp, ..rig.config() };
    assert!(matches!(Fleet::attach(g(), &cfg), Err(Error::Config(m)) if m.contains("Unix socket")));
    // `hostaddr` would take the connection over TCP whatever `host` says.
    let addr = format!("{} hostaddr=127.0.0.1", rig.url);
    let cfg = LogConfig { url: &addr, ..rig.config() };
    assert!(matches!(Fleet::attach(g(), &cfg), Err(Error::Config(m)) if m.contains("Unix socket")));
    let cfg = LogConfig { url: &with_pw, ..rig.config() };
    assert!(!format!("{cfg:?}").contains("password=x"), "a URL's password in Debug");
    let wrong = SecretBytes::from_slice(b"not-it");
    let cfg = LogConfig { password: Some(&wrong), ..rig.config() };
    let err = Fleet::attach(g(), &cfg).unwrap_err();
    assert_eq!(err.exit_code(), exit::CONFIG, "{err}");
    assert!(!err.to_string().contains(&rig.pg.password), "the password in an error: {err}");
    assert!(!format!("{cfg:?}").contains("not-it"));
}

/// A host that dies between the log taking its batch and its own commit (simulated:
/// the batch is appended, then the local commit is abandoned) loses nothing: when
/// it comes back, the catch-up applies its own batch, its next write goes on top,
/// and another host sees both.
#[test]
fn a_write_the_log_took_but_the_host_did_not_commit_is_not_lost() {
    let rig = Rig::new("fleet-crash");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "one");
    let log = a.log.clone();
    a.guard().set_batch_sink(Some(Box::new(move |batch| {
        crate::sync::lock(&log).append(batch.before, batch.after, &batch.bytes)?;
        Err(Error::Interrupted)
    })));
    let at = a.guard().generation().unwrap();
    assert!(a.guard().put("github", "ci", raw("two"), PutOptions::default()).is_err());
    assert_eq!(a.guard().generation().unwrap(), at, "the local commit was abandoned");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"one");
    // The process "restarts": the fleet's own sink again.
    drop(a);
    let a = rig.host("a");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"two", "attach caught up with its own batch");
    put(&a, "github", "deploy", "three");
    b.catch_up().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"two");
    assert_eq!(get(&b, "github", "deploy").unwrap(), b"three");
    b.guard().audit_verify().unwrap();
}
