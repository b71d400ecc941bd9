//! The fleet log against a real PostgreSQL server (the test fixture of
//! `tests/common/postgres.rs`): hosts that share one log see each other's writes,
//! a writer that does not see the newest batch cannot fork the log, reads keep the
//! staleness bound, and a log edited in the database is refused without changing a
//! host's store.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tests/common/postgres.rs"]
mod pg;

/// What `tests/common/refresher.rs` needs, by this crate's paths.
mod tokenguard_refresher_api {
    pub use crate::guard::refresh::{RefreshError, RefreshedTokens, Refresher};
    pub use crate::secret::{SecretBytes, TokenSet};
}

#[path = "../../tests/common/refresher.rs"]
mod refresher;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{LogConfig, PgLog};
use crate::error::{Error, exit};
use crate::guard::revoke::RevokeTarget;
use crate::guard::{GetOptions, GuardOptions, PutOptions, TokenGuard};
use crate::root::RootKey;
use crate::root::soft::SoftRoot;
use crate::secret::{Secret, SecretBytes};
use crate::store::StoreOptions;
use crate::store::redb_store::{Log, txn::Batch};
use postgres::Client;

/// Reads never look at the log by themselves: the tests say when a host catches up.
const NEVER: Duration = Duration::MAX;

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
        LogConfig {
            url: &self.url,
            password: Some(&self.password),
            ca_file: None,
            timeout: Duration::from_secs(5),
            staleness: NEVER,
            listen: false,
        }
    }

    /// Host `name`'s guard on its own copy of the store, not joined yet.
    fn open(&self, name: &str) -> TokenGuard {
        let path = self.path(name);
        if !path.exists() {
            std::fs::copy(self.dir.path().join("start.redb"), &path).unwrap();
        }
        TokenGuard::open(&path, StoreOptions::default(), vec![root(self.dir.path())], opts()).unwrap()
    }

    /// Host `name`, joined to the log; its reads look at the log after `staleness`.
    fn host_with(&self, name: &str, staleness: Duration) -> TokenGuard {
        let g = self.open(name);
        super::attach(&g, &LogConfig { staleness, ..self.config() }).unwrap();
        g
    }

    fn host(&self, name: &str) -> TokenGuard {
        self.host_with(name, NEVER)
    }

    /// Host `name` joined with a notification listener and staleness bound `bound`.
    fn listening_host(&self, name: &str, bound: Duration) -> TokenGuard {
        let g = self.open(name);
        super::attach(&g, &LogConfig { staleness: bound, listen: true, ..self.config() }).unwrap();
        g
    }

    /// A connection to the log of the rig's store, for a host built by hand.
    fn log(&self, g: &TokenGuard) -> PgLog {
        PgLog::connect(&self.config(), &g.store_id()).unwrap()
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

fn put(g: &TokenGuard, provider: &str, name: &str, value: &str) {
    g.put(provider, name, raw(value), PutOptions::default()).unwrap();
}

fn get(g: &TokenGuard, provider: &str, name: &str) -> crate::Result<Vec<u8>> {
    g.get_field(provider, name, None, GetOptions::default()).map(|(s, _)| s.expose().to_vec())
}

/// The generation of a host's store, MAC-checked.
fn generation(g: &TokenGuard) -> u64 {
    g.generation().unwrap()
}

/// A log that shows a host none of the batches after its own (a replica that lags,
/// a host that skipped the lock): what the primary key must stop. With `true`, it
/// also says that a full page follows (a broken or hostile server): refused, rather
/// than asked again forever.
struct Blind(PgLog, bool);

impl Log for Blind {
    fn lock(&mut self) -> crate::Result<()> {
        Ok(())
    }
    fn since(&mut self, _: u64, _: &[u8]) -> crate::Result<(Vec<Vec<u8>>, bool)> {
        Ok((Vec::new(), self.1))
    }
    fn append(&mut self, batch: &Batch) -> crate::Result<()> {
        self.0.insert(batch)
    }
    fn release(&mut self) {}
}

/// A log whose host dies right after the log took its batch: the append succeeds in
/// the database, the host hears an error and does not commit. With `true`, every
/// optimistic insert loses first, so the batch goes in under the lock.
struct DiesAfterAppend(PgLog, bool);

impl Log for DiesAfterAppend {
    fn lock(&mut self) -> crate::Result<()> {
        self.0.lock()
    }
    fn since(&mut self, g: u64, head: &[u8]) -> crate::Result<(Vec<Vec<u8>>, bool)> {
        self.0.since(g, head)
    }
    fn append(&mut self, batch: &Batch) -> crate::Result<()> {
        self.0.append(batch)?;
        Err(Error::Interrupted)
    }
    fn append_alone(&mut self, batch: &Batch) -> crate::Result<bool> {
        if self.1 || !self.0.append_alone(batch)? {
            return Ok(false);
        }
        Err(Error::Interrupted)
    }
    fn release(&mut self) {
        self.0.release();
    }
}

#[test]
fn a_log_that_promises_batches_it_never_gives_is_refused() {
    let rig = Rig::new("fleet-endless");
    let b = rig.open("b");
    b.attach_log(Box::new(Blind(rig.log(&b), true)), NEVER, None).unwrap();
    let at = generation(&b);
    assert_eq!(b.sync().unwrap_err().exit_code(), exit::INTEGRITY);
    let err = b.put("github", "ci", raw("x"), PutOptions::default()).unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
    assert_eq!(generation(&b), at);
}

#[test]
fn hosts_on_one_log_see_each_others_writes_revocations_and_shreds() {
    let rig = Rig::new("fleet-hosts");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "ghp_from_a");
    assert!(matches!(get(&b, "github", "ci"), Err(Error::NotFound { .. })), "b has not looked at the log yet");
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"ghp_from_a");

    // A write that finds another host was first runs again under the log's lock,
    // caught up: hosts that never sync still write one after the other without a
    // conflict, each on top of the others'.
    put(&b, "slack", "bot", "xoxb_from_b");
    put(&a, "jira", "t", "from_a");
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"xoxb_from_b", "a's write caught up with b's first");
    put(&b, "jira", "u", "from_b");
    assert_eq!(get(&b, "jira", "t").unwrap(), b"from_a");

    // A revocation on one host is final on the other; a shred on one host drops the
    // data key the other had cached.
    a.revoke(RevokeTarget::One { provider: "github", name: "ci" }, "leaked").unwrap();
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"xoxb_from_b", "a's slack key is now cached");
    b.shred("slack").unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    assert!(matches!(get(&b, "github", "ci"), Err(Error::Revoked { .. })));
    let err = get(&a, "slack", "bot").unwrap_err();
    assert!(matches!(err, Error::Shredded { .. } | Error::NotFound { .. }), "{err}");

    // A third host, joining late, catches up on everything at attach; a clone of its
    // guard writes through the log too (the link belongs to the store).
    let c = rig.host("c");
    assert_eq!(generation(&c), generation(&a));
    assert_eq!(get(&c, "jira", "t").unwrap(), b"from_a");
    assert!(matches!(get(&c, "github", "ci"), Err(Error::Revoked { .. })));
    c.audit_verify().unwrap();
    let clone = c.clone();
    drop(c);
    put(&clone, "github", "deploy", "from_c");
    a.sync().unwrap();
    assert_eq!(get(&a, "github", "deploy").unwrap(), b"from_c");
    a.audit_verify().unwrap();
}

/// Writers on two hosts at once, two threads each: the log orders them (a write
/// that loses alone runs again under the lock), so none fails and none is lost;
/// every host ends with every write.
#[test]
fn concurrent_writers_on_two_hosts_all_commit_in_one_order() {
    let rig = Rig::new("fleet-concurrent");
    let (a, b) = (rig.host("a"), rig.host("b"));
    let start = generation(&a);
    std::thread::scope(|s| {
        for (h, g) in [("a", &a), ("a2", &a), ("b", &b), ("b2", &b)] {
            s.spawn(move || {
                for i in 0..15 {
                    put(g, "github", &format!("{h}-{i}"), &format!("{h}{i}"));
                }
            });
        }
    });
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(generation(&a), start + 60);
    assert_eq!(generation(&b), start + 60);
    for g in [&a, &b] {
        for h in ["a", "a2", "b", "b2"] {
            assert_eq!(get(g, "github", &format!("{h}-14")).unwrap(), format!("{h}14").as_bytes());
        }
        g.audit_verify().unwrap();
    }
}

/// A host more than a page of batches behind catches up page by page, under one
/// look at the log, and its next write goes on top.
#[test]
fn a_host_more_than_a_page_behind_catches_up_page_by_page() {
    let rig = Rig::new("fleet-pages");
    let (a, b) = (rig.host("a"), rig.host("b"));
    let n = usize::try_from(super::PAGE).unwrap() + 20;
    for i in 0..n {
        a.store().write(|t| a.audit_in(t, "note", format!("note {i}"))).unwrap();
    }
    put(&a, "github", "last", "v");
    // From the log's start (where b is), a page is `PAGE` batches, in order, then the
    // rest.
    let (g, head) = b.state_head().unwrap();
    let mut log = rig.log(&b);
    let (page, full) = log.since(g, &head).unwrap();
    assert!(full);
    assert_eq!(page.len(), n - 20);
    assert_eq!(generation(&b), g);
    assert_eq!(b.sync().unwrap(), generation(&a));
    assert_eq!(get(&b, "github", "last").unwrap(), b"v");
    put(&b, "github", "after", "w");
    a.sync().unwrap();
    assert_eq!(get(&a, "github", "after").unwrap(), b"w");
    a.audit_verify().unwrap();
}

/// A host's copy written outside the log (opened without it, as a restore or a
/// stray process would) is refused at its next look at the log — which holds
/// another state at that generation — and cannot append on top of it.
#[test]
fn a_copy_written_outside_the_log_is_refused_and_cannot_fork_it() {
    let rig = Rig::new("fleet-diverged");
    let a = rig.host("a");
    drop(rig.host("b"));
    // A handle of b's copy that is not joined to the log reads and writes nothing.
    let stray = rig.open("b");
    let refused = stray.put("github", "outside", raw("x"), PutOptions::default()).unwrap_err();
    assert_eq!(refused.exit_code(), exit::CONFIG, "{refused}");
    assert!(refused.to_string().contains("fleet host's copy"), "{refused}");
    assert_eq!(get(&stray, "github", "anything").unwrap_err().exit_code(), exit::CONFIG);
    drop(stray);
    // A writer of the file that removes the mark and writes outside the log: the
    // log's own checks refuse the copy at its next look.
    {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::MultiWriter);
        let db = b.open(rig.path("b")).unwrap();
        let w = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
            assert!(w.open_table(def).unwrap().remove("fleet_member").unwrap().is_some(), "b's copy was not marked");
        }
        w.commit().unwrap();
    }
    let stray = rig.open("b");
    put(&stray, "github", "outside", "x");
    drop(stray);
    put(&a, "github", "inside", "y");
    let b = rig.open("b");
    let err = super::attach(&b, &rig.config()).unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
    // Ahead of the log instead: refused as well, and its write never reaches it.
    let c = rig.open("c");
    put(&c, "github", "c1", "1");
    put(&c, "github", "c2", "2");
    let top = rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches");
    assert_eq!(super::attach(&c, &rig.config()).unwrap_err().exit_code(), exit::INTEGRITY);
    assert_eq!(rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches"), top);
    a.sync().unwrap();
    assert!(matches!(get(&a, "github", "outside"), Err(Error::NotFound { .. })));
}

/// A write that changes nothing (a lease another host holds, a compare-and-set that
/// lost) makes no batch: waiting never becomes a fleet write.
#[test]
fn a_write_that_changes_nothing_makes_no_batch() {
    let rig = Rig::new("fleet-empty");
    let a = rig.host("a");
    put(&a, "github", "ci", "v");
    let (at, top) = (generation(&a), rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches"));
    for _ in 0..5 {
        a.store().write(|_| Ok(())).unwrap();
    }
    assert_eq!(generation(&a), at);
    assert_eq!(rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches"), top);
}

fn fleet_writes(g: &TokenGuard) -> crate::guard::FleetWrites {
    g.stats().unwrap().fleet_writes.unwrap()
}

/// The log holds one batch per generation, none missing: how many.
fn one_batch_per_generation(rig: &Rig) -> u64 {
    let counts = rig
        .pg
        .sql("tg", "SELECT count(*) || ' ' || count(DISTINCT gen) || ' ' || (max(gen) - min(gen) + 1) FROM tg_batches");
    let n: Vec<u64> = counts.split_whitespace().map(|c| c.parse().unwrap()).collect();
    assert!(n.len() == 3 && n[0] == n[1] && n[1] == n[2], "batches, generations, span: {counts}");
    n[0]
}

/// A write runs on the copy as it is and offers its batch without the log's lock:
/// one statement, taken when the copy is the log's newest. A copy that is behind
/// (another host was first) writes nothing anywhere on that try, and the write runs
/// again under the lock, on top of the other host's batches.
#[test]
fn a_host_writes_without_the_lock_until_another_host_was_first() {
    let rig = Rig::new("fleet-alone");
    let (a, b) = (rig.host("a"), rig.host("b"));
    for i in 0..10 {
        put(&a, "github", &format!("a{i}"), "from_a");
    }
    assert_eq!(fleet_writes(&a), crate::guard::FleetWrites { alone: 10, lost: 0 });
    // b has not looked since: its try (which made its own first data key for
    // github) loses, and the write runs on top of a's, under a's data key.
    put(&b, "github", "bot", "from_b");
    assert_eq!(fleet_writes(&b), crate::guard::FleetWrites { alone: 0, lost: 1 });
    assert_eq!(get(&b, "github", "a9").unwrap(), b"from_a", "b caught up under the lock");
    assert_eq!(get(&b, "github", "bot").unwrap(), b"from_b");
    let versions = |g: &TokenGuard| g.stats().unwrap().deks.iter().filter(|d| d.provider == "github").count();
    assert_eq!((versions(&a), versions(&b)), (1, 1), "one first data key across the hosts");
    put(&b, "slack", "bot2", "from_b");
    assert_eq!(fleet_writes(&b), crate::guard::FleetWrites { alone: 1, lost: 1 });
    put(&a, "jira", "t", "from_a");
    assert_eq!(fleet_writes(&a), crate::guard::FleetWrites { alone: 10, lost: 1 });
    assert_eq!(get(&a, "slack", "bot2").unwrap(), b"from_b");
    assert_eq!(get(&a, "github", "bot").unwrap(), b"from_b");
    b.sync().unwrap();
    assert_eq!(generation(&a), generation(&b));
    // One batch per generation, none missing: nothing of a lost try reached the log.
    assert_eq!(one_batch_per_generation(&rig), 13);
    for g in [&a, &b] {
        g.audit_verify().unwrap();
        assert_eq!(g.open_every_record().unwrap().bad, Vec::<String>::new());
    }
}

/// A write that changed nothing, or failed, answered from the copy as it was: the
/// answer stands only once a look finds nothing newer in the log: a create-only
/// put is not refused for a token another host deleted, nor a delete for a token
/// another host stored, and a write that changes nothing catches the copy up.
#[test]
fn an_answer_from_a_copy_behind_the_log_does_not_stand() {
    let rig = Rig::new("fleet-confirm");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "one");
    put(&a, "github", "gone", "one");
    b.sync().unwrap();
    a.delete("github", "ci").unwrap();
    a.delete("github", "gone").unwrap();
    // Refused on b's copy (the token is there), then looked, caught up, and run
    // again under the lock: stored.
    let (_, replaced) = b.put_checked("github", "ci", raw("two"), PutOptions::default(), false).unwrap();
    assert!(!replaced);
    a.sync().unwrap();
    assert_eq!(get(&a, "github", "ci").unwrap(), b"two");
    // The other way: b's copy lacks a token a stored since ("not found" there);
    // the look finds it, and the delete runs under the lock.
    put(&a, "jira", "new", "x");
    b.delete("jira", "new").unwrap();
    a.sync().unwrap();
    assert!(matches!(get(&a, "jira", "new"), Err(Error::NotFound { .. })));
    // A failure that stands: the look finds nothing newer.
    let err = b.delete("github", "gone").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    // A write that changes nothing on a copy behind the log catches it up, and adds
    // no batch.
    put(&a, "slack", "bot", "y");
    let top = rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches");
    b.store().write(|_| Ok(())).unwrap();
    assert_eq!(generation(&b), generation(&a));
    assert_eq!(rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches"), top);
    one_batch_per_generation(&rig);
}

/// A run of a write dropped to run again is reported before the catch-up commits
/// anything in its place: the guard forgets the data keys that run made there, so
/// that no reader of the process meets one on the batches that replace it.
#[test]
fn a_dropped_run_is_reported_before_anything_replaces_it() {
    let rig = Rig::new("fleet-abandon");
    let (a, b) = (rig.host("a"), rig.host("b"));
    // Another handle of b's file (another process on the host), quick to give up.
    let quick = StoreOptions { busy_timeout: Duration::from_millis(100), ..StoreOptions::default() };
    let b2 = TokenGuard::open(&rig.path("b"), quick, vec![root(rig.dir.path())], opts()).unwrap();
    super::attach(&b2, &rig.config()).unwrap();
    put(&a, "github", "ci", "one");
    let behind = generation(&b);
    let runs = std::cell::Cell::new(0);
    let seen = std::cell::Cell::new(None);
    b.store()
        .write_abandoning(
            &mut |t| {
                runs.set(runs.get() + 1);
                b.audit_in(t, "note", "run".into())
            },
            &|| {
                // Still inside the dropped run's transaction: the file's write lock
                // is held, so nothing can have been committed in its place.
                let other = b2.store().write(|_| Ok(()));
                seen.set(Some((b.store().head_generation().unwrap(), other.map_err(|e| e.exit_code()))));
            },
        )
        .unwrap();
    assert_eq!(runs.get(), 2, "the first run lost");
    assert_eq!(seen.get(), Some((behind, Err(exit::BUSY))), "reported after the transaction ended");
    assert_eq!(generation(&b), generation(&a) + 1);
}

/// A log through which another handle of the same copy catches up just before this
/// handle's next look (another process sharing the file, made deterministic).
struct OtherCatchesUpFirst {
    log: PgLog,
    other: std::sync::Arc<std::sync::Mutex<Option<TokenGuard>>>,
}

impl Log for OtherCatchesUpFirst {
    fn lock(&mut self) -> crate::Result<()> {
        self.log.lock()
    }
    fn since(&mut self, g: u64, head: &[u8]) -> crate::Result<(Vec<Vec<u8>>, bool)> {
        let other = crate::sync::lock(&self.other).take();
        if let Some(other) = other {
            std::thread::scope(|s| s.spawn(|| other.sync().map(drop)).join())
                .map_err(|_| Error::integrity("the other handle's catch-up panicked"))??;
        }
        self.log.since(g, head)
    }
    fn append(&mut self, batch: &Batch) -> crate::Result<()> {
        self.log.append(batch)
    }
    fn release(&mut self) {
        self.log.release();
    }
    fn append_alone(&mut self, batch: &Batch) -> crate::Result<bool> {
        self.log.append_alone(batch)
    }
}

/// An answer given without a batch stands only if the copy is still at the
/// generation the write read: another handle of the same file (another process on
/// the host) may have caught it up in between, and the look then finds nothing
/// newer in the log although the answer was read from before.
#[test]
fn an_answer_stands_only_if_the_copy_did_not_move_under_it() {
    let rig = Rig::new("fleet-moved");
    let a = rig.host("a");
    let b1 = rig.open("b");
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    b1.attach_log(Box::new(OtherCatchesUpFirst { log: rig.log(&b1), other: slot.clone() }), NEVER, None).unwrap();
    let b2 = rig.host("b");
    put(&a, "jira", "new", "x");
    *slot.lock().unwrap() = Some(b2);
    // b1 reads "not found" at the old generation; b2 catches the file up before
    // b1's look, which then finds nothing newer: the answer must not stand.
    b1.delete("jira", "new").unwrap();
    a.sync().unwrap();
    assert!(matches!(get(&a, "jira", "new"), Err(Error::NotFound { .. })));
}

/// What the log's rules stand on is pinned per connection, whatever the database's
/// defaults: read committed (under repeatable read, a write that lost alone would
/// catch up from a snapshot older than the lock and fail) and synchronous commit.
#[test]
fn the_log_pins_its_isolation_and_durability_whatever_the_defaults() {
    let rig = Rig::new("fleet-pinned");
    rig.pg.sql(
        "tg",
        "ALTER DATABASE tg SET default_transaction_isolation = 'repeatable read'; \
         ALTER DATABASE tg SET synchronous_commit = off",
    );
    let (a, b) = (rig.host("a"), rig.host("b"));
    let mut log = rig.log(&a);
    let c = log.client().unwrap();
    let show = |c: &mut Client, what: &str| c.query_one(&format!("SHOW {what}"), &[]).unwrap().get::<_, String>(0);
    assert_eq!(show(c, "transaction_isolation"), "read committed");
    assert_eq!(show(c, "synchronous_commit"), "on");
    put(&a, "github", "ci", "from_a");
    put(&b, "slack", "bot", "from_b");
    assert_eq!(fleet_writes(&b), crate::guard::FleetWrites { alone: 0, lost: 1 });
    assert_eq!(get(&b, "github", "ci").unwrap(), b"from_a");
}

/// An optimistic insert never passes a writer holding the log's lock (it may be
/// between its look and its insert): it runs under the lock once that is free.
#[test]
fn a_write_without_the_lock_waits_for_a_writer_holding_it() {
    let rig = Rig::new("fleet-alone-lock");
    let (a, b) = (rig.host("a"), rig.host("b"));
    put(&a, "github", "ci", "one");
    b.sync().unwrap();
    let top = rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches");
    let mut held = rig.log(&a);
    held.lock().unwrap();
    let writer = std::thread::spawn(move || {
        put(&b, "slack", "bot", "from_b");
        b
    });
    std::thread::sleep(Duration::from_millis(400));
    assert!(!writer.is_finished(), "b's write did not wait for the lock");
    assert_eq!(rig.pg.sql("tg", "SELECT max(gen) FROM tg_batches"), top, "b inserted past the lock");
    held.release();
    let b = writer.join().unwrap();
    assert_eq!(fleet_writes(&b), crate::guard::FleetWrites { alone: 0, lost: 1 });
    a.sync().unwrap();
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"from_b");
}

/// With the log's primary key dropped (a database administrator), hosts whose
/// copies are behind do not fork the log: every write goes under the lock.
#[test]
fn without_the_primary_key_a_copy_behind_still_does_not_fork_the_log() {
    let rig = Rig::new("fleet-alone-nopk");
    let (a, b) = (rig.host("a"), rig.host("b"));
    rig.pg.sql("tg", "ALTER TABLE tg_batches DROP CONSTRAINT tg_batches_pkey");
    for i in 0..3 {
        put(&a, "github", &format!("a{i}"), "from_a");
        put(&b, "slack", &format!("b{i}"), "from_b");
    }
    assert_eq!(one_batch_per_generation(&rig), 6);
    // Without the key, no write goes alone: only the lock's look comes after the
    // lock.
    assert_eq!(fleet_writes(&a).alone + fleet_writes(&b).alone, 0);
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(generation(&a), generation(&b));
    assert_eq!(get(&a, "slack", "b2").unwrap(), b"from_b");
}

/// A host whose database role may only read and insert (what the design gives
/// hosts, so that none can rewrite the log) attaches, writes and catches up once
/// the schema exists; a second store in the fleet's database is refused.
#[test]
fn a_host_role_that_may_only_read_and_insert_is_enough_and_one_database_holds_one_store() {
    let rig = Rig::new("fleet-roles");
    let a = rig.host("a");
    rig.pg.sql(
        "tg",
        "CREATE ROLE host_b LOGIN PASSWORD 'host-b-pw';
         GRANT SELECT, INSERT ON tg_store, tg_batches TO host_b; GRANT SELECT ON tg_migrations TO host_b;",
    );
    let url = format!("host={} dbname=tg user=host_b", rig.pg.socket_dir().display());
    let pw = SecretBytes::from_slice(b"host-b-pw");
    let b = rig.open("b");
    super::attach(&b, &LogConfig { url: &url, password: Some(&pw), ..rig.config() }).unwrap();
    put(&b, "github", "from-b", "1");
    put(&a, "github", "from-a", "2");
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "from-a").unwrap(), b"2");
    a.sync().unwrap();
    assert_eq!(get(&a, "github", "from-b").unwrap(), b"1");

    // A schema newer than this build: refused as such, not as an outage.
    rig.pg.sql("tg", "INSERT INTO tg_migrations VALUES (99, now())");
    let err = super::attach(&rig.open("c"), &rig.config()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedVersion { found: 99, .. }), "{err}");
    rig.pg.sql("tg", "DELETE FROM tg_migrations WHERE version = 99");

    let other = rig.dir.path().join("other.redb");
    let g = TokenGuard::create(&other, StoreOptions::default(), vec![root(rig.dir.path())], opts()).unwrap();
    let err = super::attach(&g, &rig.config()).unwrap_err();
    assert!(matches!(&err, Error::Config(m) if m.contains("another store")), "{err}");
}

/// The connection lost while a write holds the log's lock (the server restarted,
/// the session killed): the write fails with exit 12, and the next one connects
/// again and goes through.
#[test]
fn a_connection_lost_under_the_lock_fails_that_write_only() {
    let rig = Rig::new("fleet-lost");
    let a = rig.host("a");
    let mut log = rig.log(&a);
    log.lock().unwrap();
    let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tokenguard' AND \
                pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'";
    rig.pg.sql("tg", kill);
    let (g, head) = a.state_head().unwrap();
    let err = log.since(g, &head).unwrap_err();
    assert_eq!(err.exit_code(), exit::DATABASE, "{err}");
    log.release(); // as the store's write does on every way out but the append
    log.lock().unwrap();
    assert!(log.since(g, &head).unwrap().0.is_empty());
    log.release();
    put(&a, "github", "after", "v");
    // Lost at the append: the same, and the log is not left believing it is locked.
    let (g, head) = a.state_head().unwrap();
    log.lock().unwrap();
    log.since(g, &head).unwrap();
    rig.pg.sql("tg", kill);
    let batch = crate::store::redb_store::txn::Batch {
        before: g,
        after: g + 1,
        bytes: vec![0; 8],
        prev_head: head.clone(),
        head: head.clone(),
    };
    assert_eq!(log.append(&batch).unwrap_err().exit_code(), exit::DATABASE);
    log.lock().unwrap();
    log.release();
    put(&a, "github", "after", "w");
    assert_eq!(get(&a, "github", "after").unwrap(), b"w");
}

/// A host the log hides the newest batch from (a lagging replica, a writer that
/// skipped the lock) cannot fork the log: its append collides on the primary key,
/// commits nothing here, and the write runs again once it sees the log.
#[test]
fn a_host_that_does_not_see_the_newest_batch_cannot_fork_the_log() {
    let rig = Rig::new("fleet-fork");
    let a = rig.host("a");
    let b = rig.open("b");
    let blind = Blind(rig.log(&b), false);
    b.attach_log(Box::new(blind), NEVER, None).unwrap();
    put(&a, "github", "ci", "from_a");
    let at = generation(&b);
    let err = b.put("slack", "bot", raw("from_b"), PutOptions::default()).unwrap_err();
    assert!(matches!(err, Error::FleetConflict { .. }), "{err}");
    assert_eq!(err.exit_code(), exit::BUSY);
    assert_eq!(generation(&b), at, "the losing write committed locally");
    assert!(matches!(get(&b, "slack", "bot"), Err(Error::NotFound { .. })));
    drop(b);
    let b = rig.host("b");
    put(&b, "slack", "bot", "from_b");
    a.sync().unwrap();
    assert_eq!(get(&a, "slack", "bot").unwrap(), b"from_b");
    assert_eq!(get(&b, "github", "ci").unwrap(), b"from_a");
}

/// A read answers from the local copy only while its last look at the log is
/// younger than the staleness bound: past it, the read looks first.
#[test]
fn a_read_older_than_the_staleness_bound_looks_at_the_log_first() {
    let rig = Rig::new("fleet-bound");
    let a = rig.host("a");
    let now = rig.host_with("now", Duration::ZERO);
    let bounded = rig.host_with("bounded", Duration::from_millis(300));
    put(&a, "github", "ci", "one");
    assert_eq!(get(&now, "github", "ci").unwrap(), b"one", "a zero bound reads the log every time");
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(get(&bounded, "github", "ci").unwrap(), b"one", "past the bound the read looked");
    put(&a, "github", "ci", "two");
    assert_eq!(get(&now, "github", "ci").unwrap(), b"two");
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(get(&bounded, "github", "ci").unwrap(), b"two");
}

/// A listener keeps its one connection across its heartbeats (each a round trip that
/// proves the backend still listens), and the heartbeats vouch for the copy: past
/// the staleness bound, reads answer without looking at the log. `doctor` says so.
/// A heartbeat that failed would drop the connection every half bound, writes would
/// be seen only when it came back, and reads past the bound would look.
#[test]
fn a_listener_keeps_its_connection_and_vouches_across_heartbeats() {
    let rig = Rig::new("fleet-heartbeat");
    let a = rig.host("a");
    let bound = Duration::from_secs(4);
    let b = rig.listening_host("b", bound);
    let backends = |app: &str| {
        rig.pg.sql("tg", &format!("SELECT pid, query_start FROM pg_stat_activity WHERE application_name = '{app}'"))
    };
    let t = std::time::Instant::now();
    while backends("tokenguard-listen").trim().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "no listener connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let listener = backends("tokenguard-listen");
    put(&a, "github", "ci", "one");
    let t = std::time::Instant::now();
    while get(&b, "github", "ci").ok().as_deref() != Some(b"one".as_slice()) {
        assert!(t.elapsed() < Duration::from_secs(5), "never seen");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Only b's log connection is left under the name: its last statement is b's
    // last look.
    drop(a);
    while backends("tokenguard").lines().count() != 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "a's connection did not close");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A quarter bound past the bound since that look: two heartbeats, the newer
    // at most half a bound old (a heartbeat may come back a half bound late).
    std::thread::sleep(bound * 5 / 4);
    let looked = backends("tokenguard");
    for _ in 0..10 {
        assert_eq!(get(&b, "github", "ci").unwrap(), b"one");
    }
    assert_eq!(backends("tokenguard"), looked, "a read past the bound looked: the heartbeats did not vouch");
    let pid = |rows: &str| rows.split('|').next().map(str::to_owned);
    assert_eq!(pid(&backends("tokenguard-listen")), pid(&listener), "the listener connected again");
    let checks = b.doctor();
    let check = checks.iter().find(|c| c.name == "fleet listener").unwrap();
    assert_eq!(check.status, crate::root::Status::Ok, "{}", check.detail);
    assert!(check.detail.contains("one connection since it started"), "{}", check.detail);
}

/// A host with a notification listener sees another host's write one notification
/// after its commit, long before its staleness bound; a listener whose connection
/// is cut connects again and the host looks before it answers; a listener whose
/// server stops answering (the socket open: a partition) stops vouching after the
/// bound, so the read looks; a forged notification changes no answer.
#[test]
fn a_listening_host_sees_writes_at_once_and_keeps_the_bound_when_cut_off() {
    let rig = Rig::new("fleet-listen");
    let a = rig.host("a");
    let bound = Duration::from_secs(4);
    let b = rig.listening_host("b", bound);
    let listener = |not: &str| {
        let t = std::time::Instant::now();
        loop {
            let pid = rig
                .pg
                .sql("tg", "SELECT pid FROM pg_stat_activity WHERE application_name = 'tokenguard-listen'")
                .trim()
                .to_string();
            if !pid.is_empty() && pid != not {
                return pid;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no listener connected");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Seen by `b` within half the bound, or never by the notification.
    let seen = |value: &str| {
        let t = std::time::Instant::now();
        while get(&b, "github", "ci").unwrap() != value.as_bytes() {
            assert!(t.elapsed() < bound / 2, "{value} not seen within half the bound");
            std::thread::sleep(Duration::from_millis(2));
        }
        t.elapsed()
    };
    put(&a, "github", "ci", "zero");
    let first = listener("");
    assert_eq!(get(&b, "github", "ci").unwrap(), b"zero");
    let checks = b.doctor();
    let check = |name: &str| checks.iter().find(|c| c.name == name).map(|c| format!("{:?} {}", c.status, c.detail));
    assert!(check("fleet listener").is_some_and(|c| c.contains("listening:")), "{:?}", check("fleet listener"));
    assert!(check("fleet log").is_some_and(|c| c.contains("newest")), "{:?}", check("fleet log"));
    assert!(check("notification queue").is_some_and(|c| c.contains("% of the server's queue")));
    put(&a, "github", "ci", "one");
    eprintln!("seen through the listener after {:?}", seen("one"));

    // The listening connection cut: the listener connects again, and the host looks
    // before it answers (what was committed meanwhile was heard by nobody).
    rig.pg.sql("tg", &format!("SELECT pg_terminate_backend({first})"));
    put(&a, "github", "ci", "two");
    seen("two");
    let second = listener(&first);

    // The listener's server stops answering with its socket open: its heartbeat does
    // not come back, and past the bound the host looks at every read again.
    let stop = |signal: &str| {
        let ok = std::process::Command::new("kill").args([signal, &second]).status().unwrap().success();
        assert!(ok, "kill {signal} {second}");
    };
    stop("-STOP");
    struct Cont<F: Fn(&str)>(F);
    impl<F: Fn(&str)> Drop for Cont<F> {
        fn drop(&mut self) {
            (self.0)("-CONT");
        }
    }
    let _cont = Cont(stop);
    std::thread::sleep(bound + Duration::from_millis(300));
    put(&a, "github", "ci", "three");
    assert_eq!(get(&b, "github", "ci").unwrap(), b"three", "a silent listener vouched past the bound");
    drop(_cont);

    // Forged notifications (any role that may connect can send them): no answer
    // changes, and the host goes on reading and writing.
    let channel = super::channel(&b.store_id());
    rig.pg.sql("tg", &format!("SELECT pg_notify('{channel}', '999999999'), pg_notify('{channel}', 'junk')"));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(get(&b, "github", "ci").unwrap(), b"three");
    put(&b, "github", "ci", "four");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"three", "a reads within its own bound (never)");
    a.sync().unwrap();
    assert_eq!(get(&a, "github", "ci").unwrap(), b"four");
    put(&a, "github", "ci", "five");
    seen("five");
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
    // Each edit is refused, and leaves `b` where it was, without `unseen`.
    let refused = |attacks: &[(&str, String)], at: u64, unseen: &str, restore: &str| {
        for (what, sql) in attacks {
            rig.pg.sql("tg", sql);
            let err = b.sync().unwrap_err();
            assert_eq!(err.exit_code(), exit::INTEGRITY, "{what}: {err}");
            assert_eq!(generation(&b), at, "{what}: b's store moved");
            assert!(matches!(get(&b, "github", unseen), Err(Error::NotFound { .. })), "{what}");
            rig.pg.sql("tg", restore);
        }
    };
    refused(&attacks, here, "t0", restore);
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "t3").unwrap(), b"v3");

    // What the log holds at the host's own generation, which every look checks: the
    // head there changed or emptied, the batch there deleted, and a second row there
    // (the log's start moved onto it) that disagrees.
    let mid = generation(&b);
    put(&a, "github", "t4", "v4");
    let restore = format!(
        "{restore}; UPDATE tg_store SET snapshot_gen = (SELECT snapshot_gen FROM saved_store), \
                           start_head = (SELECT start_head FROM saved_store)"
    );
    rig.pg.sql("tg", "DROP TABLE saved; CREATE TABLE saved AS SELECT * FROM tg_batches");
    rig.pg.sql("tg", "CREATE TABLE saved_store AS SELECT * FROM tg_store");
    let attacks = [
        (
            "the head at the host's generation changed",
            format!("UPDATE tg_batches SET head = set_byte(head, 0, get_byte(head, 0) # 1) WHERE gen = {mid}"),
        ),
        ("the head at the host's generation emptied", format!("UPDATE tg_batches SET head = NULL WHERE gen = {mid}")),
        ("the batch at the host's generation deleted", format!("DELETE FROM tg_batches WHERE gen = {mid}")),
        (
            "the log's start moved onto the host's generation",
            format!("UPDATE tg_store SET snapshot_gen = {mid}, start_head = '\\x00'"),
        ),
    ];
    refused(&attacks, mid, "t4", &restore);
    // With the schema changed too: the primary key dropped and the batch at the
    // host's generation copied 600 times (its head right; the copies would fill a
    // page and hide the batches after it), or a batch's bytes emptied.
    let pkey = "ALTER TABLE tg_batches ADD PRIMARY KEY (store_id, gen)";
    refused(
        &[(
            "the batch at the host's generation repeated",
            format!(
                "ALTER TABLE tg_batches DROP CONSTRAINT tg_batches_pkey; INSERT INTO tg_batches SELECT t.* FROM \
                 tg_batches t, generate_series(1, 600) WHERE t.gen = {mid}"
            ),
        )],
        mid,
        "t4",
        &format!("{restore}; {pkey}"),
    );
    refused(
        &[(
            "a batch's bytes emptied",
            format!(
                "ALTER TABLE tg_batches ALTER batch DROP NOT NULL; UPDATE tg_batches SET batch = NULL WHERE gen = {}",
                mid + 1
            ),
        )],
        mid,
        "t4",
        &format!("{restore}; ALTER TABLE tg_batches ALTER batch SET NOT NULL"),
    );
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "t4").unwrap(), b"v4");
    let top = top + 1;

    // The newest batch deleted: a host that read it keeps it (no rollback) and says
    // the log lost it; the host that wrote it refuses to build on that log.
    rig.pg.sql("tg", &format!("DELETE FROM tg_batches WHERE gen = {top}"));
    let err = b.sync().unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
    assert_eq!(get(&b, "github", "t3").unwrap(), b"v3");
    let err = a.put("github", "t9", raw("v9"), PutOptions::default()).unwrap_err();
    assert_eq!(err.exit_code(), exit::INTEGRITY, "{err}");
}

#[test]
fn the_database_going_away_is_exit_12_and_hosts_recover_without_a_restart() {
    let mut rig = Rig::new("fleet-restart");
    let (a, b) = (rig.host("a"), rig.host("b"));
    let bounded = rig.host_with("bounded", Duration::ZERO);
    put(&a, "github", "ci", "one");
    let at = generation(&a);
    rig.pg.stop();
    let err = a.put("github", "ci", raw("two"), PutOptions::default()).unwrap_err();
    assert_eq!(err.exit_code(), exit::DATABASE, "{err}");
    assert_eq!(generation(&a), at, "a write the log did not take committed here");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"one", "reads within the bound go on from the local copy");
    assert_eq!(b.sync().unwrap_err().exit_code(), exit::DATABASE);
    // Past its bound, a read fails rather than answer from a copy it cannot vouch for.
    let err = get(&bounded, "github", "ci").unwrap_err();
    assert_eq!(err.exit_code(), exit::DATABASE, "{err}");
    rig.pg.restart();
    put(&a, "github", "ci", "two");
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"two");
    assert_eq!(get(&bounded, "github", "ci").unwrap(), b"two");
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
    assert!(matches!(super::attach(&g(), &cfg), Err(Error::Config(m)) if m.contains("password")));
    let tcp = "host=db.internal dbname=tg user=tokenguard";
    let cfg = LogConfig { url: tcp, ..rig.config() };
    assert!(matches!(super::attach(&g(), &cfg), Err(Error::Config(m)) if m.contains("ca_file")));
    // `hostaddr` would take the connection over TCP whatever `host` says: beside a
    // socket, or without a host name to check the certificate against, refused.
    let addr = format!("{} hostaddr=127.0.0.1", rig.url);
    let cfg = LogConfig { url: &addr, ..rig.config() };
    assert!(matches!(super::attach(&g(), &cfg), Err(Error::Config(m)) if m.contains("mixes")));
    let cfg = LogConfig { url: "hostaddr=127.0.0.1 dbname=tg", ..rig.config() };
    assert!(matches!(super::attach(&g(), &cfg), Err(Error::Config(m)) if m.contains("without a host name")));
    let cfg = LogConfig { url: &with_pw, ..rig.config() };
    assert!(!format!("{cfg:?}").contains("password=x"), "a URL's password in Debug");
    let wrong = SecretBytes::from_slice(b"not-it");
    let cfg = LogConfig { password: Some(&wrong), ..rig.config() };
    let err = super::attach(&g(), &cfg).unwrap_err();
    assert_eq!(err.exit_code(), exit::CONFIG, "{err}");
    assert!(!err.to_string().contains(&rig.pg.password), "the password in an error: {err}");
    assert!(!format!("{cfg:?}").contains("not-it"));
}

/// Over TCP, TLS only: verified against the configured CA alone, the host name
/// checked, never plaintext; a TLS host and a Unix-socket host share one log.
#[test]
fn over_tcp_the_log_is_reached_with_verified_tls_only() {
    let ca = pg::TestCa::new(&["localhost"]);
    let server = pg::PgServer::start_tcp("fleet-tls", Some(&ca));
    server.sql("postgres", "CREATE DATABASE tg");
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start.redb");
    drop(TokenGuard::create(&start, StoreOptions::default(), vec![root(dir.path())], opts()).unwrap());
    let host = |name: &str| {
        let p = dir.path().join(format!("{name}.redb"));
        std::fs::copy(&start, &p).unwrap();
        TokenGuard::open(&p, StoreOptions::default(), vec![root(dir.path())], opts()).unwrap()
    };
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let password = SecretBytes::from_slice(server.password.as_bytes());
    let url = |h: &str| format!("host={h} port={} dbname=tg user={}", server.port, pg::USER);
    let (socket_dir, port) = (server.socket_dir().display().to_string(), server.port);
    // `sslmode=disable` in the URL changes nothing: TLS is required over TCP.
    let tcp = format!("{} sslmode=disable", url("localhost"));
    let socket = url(&socket_dir);
    fn tls_cfg<'a>(url: &'a str, ca_file: Option<&'a Path>, password: &'a SecretBytes) -> LogConfig<'a> {
        LogConfig {
            url,
            password: Some(password),
            ca_file,
            timeout: Duration::from_secs(5),
            staleness: NEVER,
            listen: false,
        }
    }
    let cfg = |url, ca| tls_cfg(url, ca, &password);
    let a = host("a");
    super::attach(&a, &cfg(&tcp, Some(&ca_file))).unwrap();
    let b = host("b");
    super::attach(&b, &cfg(&socket, None)).unwrap();
    put(&a, "github", "over-tls", "1");
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "over-tls").unwrap(), b"1");
    let mut log = PgLog::connect(&cfg(&tcp, Some(&ca_file)), &a.store_id()).unwrap();
    let ssl: bool = log
        .client()
        .unwrap()
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert!(ssl, "the TCP connection is not TLS");

    let refused = |c: LogConfig<'_>, what: &str, says: &str| {
        let err = super::attach(&host("x"), &c).unwrap_err();
        assert_eq!(err.exit_code(), exit::CONFIG, "{what}: {err}");
        assert!(err.to_string().contains(says), "{what}: {err}");
        assert!(!err.to_string().contains(&server.password), "{what}: the password in {err}");
    };
    refused(cfg(&tcp, None), "TCP without a CA", "ca_file");
    refused(cfg(&socket, Some(&ca_file)), "a CA with a Unix socket", "ca_file is for");
    let other = pg::TestCa::new(&["localhost"]);
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, &other.ca_pem).unwrap();
    refused(cfg(&tcp, Some(&other_file)), "another CA", "invalid peer certificate");
    // The certificate names localhost, not the address.
    let by_ip = url("127.0.0.1");
    refused(cfg(&by_ip, Some(&ca_file)), "a host name the certificate does not name", "not valid for name");
    let mixed = format!("host={socket_dir},localhost port={port},{port} dbname=tg user={}", pg::USER);
    refused(cfg(&mixed, Some(&ca_file)), "a socket and a TCP host in one URL", "mixes");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, b"not a certificate").unwrap();
    refused(cfg(&tcp, Some(&garbage)), "a CA file without a certificate", "no CA certificate");
    let with_key = dir.path().join("with-key.pem");
    std::fs::write(&with_key, format!("{}{}", ca.ca_pem, ca.key_pem)).unwrap();
    refused(cfg(&tcp, Some(&with_key)), "a CA file with a private key", "private key");
    // A server that offers no TLS is never used in plaintext.
    let plain = pg::PgServer::start_tcp("fleet-plain", None);
    let plain_url = format!("host=localhost port={} dbname=postgres user={}", plain.port, pg::USER);
    let plain_pw = SecretBytes::from_slice(plain.password.as_bytes());
    refused(tls_cfg(&plain_url, Some(&ca_file), &plain_pw), "a server without TLS", "does not support TLS");
}

/// A host that dies between the log taking its batch and its own commit (simulated:
/// the batch is appended, then the local commit is abandoned) loses nothing: when
/// it comes back, the catch-up applies its own batch, its next write goes on top,
/// and another host sees both.
#[test]
fn a_write_the_log_took_but_the_host_did_not_commit_is_not_lost() {
    for locked in [false, true] {
        a_write_the_log_took_is_not_lost(locked);
    }
}

fn a_write_the_log_took_is_not_lost(locked: bool) {
    let rig = Rig::new(&format!("fleet-crash-{locked}"));
    let b = rig.host("b");
    let a = rig.host("a0");
    put(&a, "github", "ci", "one");
    drop(a);
    let a = rig.open("a0");
    a.attach_log(Box::new(DiesAfterAppend(rig.log(&a), locked)), NEVER, None).unwrap();
    a.sync().unwrap();
    let at = generation(&a);
    assert!(a.put("github", "ci", raw("two"), PutOptions::default()).is_err());
    assert_eq!(fleet_writes(&a).lost, u64::from(locked), "the way the batch went in");
    assert_eq!(generation(&a), at, "the local commit was abandoned");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"one");
    // The process "restarts" with the log as it is.
    drop(a);
    let a = rig.host("a0");
    assert_eq!(get(&a, "github", "ci").unwrap(), b"two", "attach caught up with its own batch");
    put(&a, "github", "deploy", "three");
    b.sync().unwrap();
    assert_eq!(get(&b, "github", "ci").unwrap(), b"two");
    assert_eq!(get(&b, "github", "deploy").unwrap(), b"three");
    b.audit_verify().unwrap();
}

/// A log that loses the answer to its `nth` append (the batch is in the log, the
/// host is told the database failed), once.
struct LosesAnswer {
    log: PgLog,
    nth: usize,
    seen: usize,
}

impl LosesAnswer {
    /// The log took a batch: its answer is lost if it is the `nth`.
    fn took(&mut self) -> crate::Result<()> {
        self.seen += 1;
        if self.seen == self.nth {
            return Err(Error::Database { operation: "committing a batch", detail: "the answer was lost".into() });
        }
        Ok(())
    }
}

impl Log for LosesAnswer {
    fn lock(&mut self) -> crate::Result<()> {
        self.log.lock()
    }
    fn since(&mut self, g: u64, head: &[u8]) -> crate::Result<(Vec<Vec<u8>>, bool)> {
        self.log.since(g, head)
    }
    fn append(&mut self, batch: &Batch) -> crate::Result<()> {
        self.log.append(batch)?;
        self.took()
    }
    fn append_alone(&mut self, batch: &Batch) -> crate::Result<bool> {
        if !self.log.append_alone(batch)? {
            return Ok(false);
        }
        self.took().map(|()| true)
    }
    fn release(&mut self) {
        self.log.release();
    }
}

/// A refresh whose commit reached the log but whose answer was lost is committed
/// again: the retry finds its own token there and says "refreshed" (not "adopted",
/// which would blame another process), with one provider call.
#[test]
fn a_refresh_whose_commit_answer_was_lost_reports_its_own_token() {
    use crate::guard::refresh::Outcome;
    use crate::secret::TokenSet;
    let rig = Rig::new("fleet-lost-answer");
    let a = rig.host("a");
    let set = TokenSet::new()
        .with("access_token", SecretBytes::from_slice(b"at-0"))
        .with("refresh_token", SecretBytes::from_slice(b"rt-0"));
    a.put("acme", "svc", Secret::TokenSet(set), PutOptions::default()).unwrap();
    drop(a);
    let a = rig.open("a");
    // The first append is the lease; the second, the answer's commit.
    a.attach_log(Box::new(LosesAnswer { log: rig.log(&a), nth: 2, seen: 0 }), NEVER, None).unwrap();
    a.sync().unwrap();
    let calls = std::sync::Arc::new(refresher::Counting::default());
    a.set_refresher("acme", calls.clone());
    let (secret, outcome) = a.refresh_now("acme", "svc").unwrap();
    assert_eq!(outcome.outcome, Outcome::Refreshed, "{outcome:?}");
    assert_eq!(calls.calls(), 1);
    let Secret::TokenSet(t) = secret else { panic!("a token set") };
    assert_eq!(t.get("access_token").unwrap().expose(), b"at-1");
    let b = rig.host("b");
    let (s, _) = b.get_field("acme", "svc", Some("access_token"), GetOptions::default()).unwrap();
    assert_eq!(s.expose(), b"at-1");
}

#[test]
fn a_look_walks_the_log_from_the_host_generation_even_under_a_generic_plan() {
    // A prepared statement's generic plan does not know `$2`: a look that let the
    // planner scan the whole log (then sort) would cost O(log) per read. Checked on
    // a log of 20,000 batches, as the planner sees it after ANALYZE. (A custom plan
    // on a table without statistics may sort the rows from `$2` on: the rows a host
    // behind by that much reads anyway.)
    let rig = Rig::new("fleet-plan");
    drop(rig.host("a"));
    rig.pg.sql(
        "tg",
        "INSERT INTO tg_store (store_id, snapshot_gen, start_head) VALUES ('\\x01', 0, '\\x00');
         INSERT INTO tg_batches (store_id, gen, batch, head)
              SELECT '\\x01', g, convert_to(repeat('b', 600), 'UTF8'), '\\x00' FROM generate_series(1, 20000) g;
         ANALYZE",
    );
    let plan = rig.pg.sql(
        "tg",
        &format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE look(bytea, bigint, bigint) AS {};
             EXPLAIN EXECUTE look('\\x01', 19000, {})",
            super::SINCE,
            super::PAGE + 1
        ),
    );
    assert!(plan.contains("Index Scan using tg_batches_pkey on tg_batches"), "{plan}");
    assert!(!plan.contains("Seq Scan on tg_batches") && !plan.contains("Sort"), "{plan}");
}
