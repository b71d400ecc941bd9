//! The fleet log in PostgreSQL: one store shared by several hosts
//! (docs/FLEET-DESIGN.md; cargo feature `postgres`).
//!
//! Reached through `[store] backend = "postgres"` (`crate::compose`'s `join_fleet`,
//! hsm-config/postgres-fleet.toml), or [`attach`] from the library.
//!
//! PostgreSQL holds an append-only log of write batches, one per committed write of
//! any host, keyed by the generation the batch ends on. Each host keeps its own redb
//! store as its copy of the log (`store::redb_store::link` holds the rules):
//! - a write runs on the local copy as it is and offers its sealed batch at `gen =
//!   after` in one statement ([`INSERT_ALONE`]), taken only where the log ends at
//!   the generation and head it was built on and no writer holds the log's lock;
//!   otherwise it runs again under the lock (a transaction holding an advisory lock
//!   of this store), after applying what other hosts appended since. Either way the
//!   log has the batch before the copy commits, and the primary key forbids a fork
//!   even to a writer that skipped the lock;
//! - a read catches up first when the copy's last look at the log is older than the
//!   staleness bound: every batch MAC-checked under the state key before it is
//!   decoded, in generation order with none left out, and only a state that verifies
//!   in full is committed.
//!
//! What PostgreSQL (or its administrator) can do to the log is therefore bounded by
//! what a writer of the redb file can do to a single store: an edited, reordered,
//! left-out or foreign batch is refused (exit 4); deleting the newest batches is a
//! rollback that a host which had read them refuses, and that only a witness (the
//! design's next steps) catches on a host that had not.
//!
//! The database is reached through a Unix socket, or over TCP with TLS only
//! (rustls, verified against the configured CA alone, host name checked, channel
//! binding where the server offers it).
//!
//! A store moves in and out of a fleet with `migrate` ([`start`] begins the log of
//! its copy; `crate::compose`'s `migrate_to`).
//!
//! Every batch's insert notifies the store's channel; a long-running process keeps
//! a listener ([`LogConfig::listen`]) that makes a read look as soon as another
//! host's batch is committed, and vouches for the copy between looks while its
//! heartbeats come back (`store::redb_store::link`'s `Watch` holds the rule).
//!
//! Not yet here (docs/FLEET-DESIGN.md, "Status"): snapshots in the database (a new
//! host starts from a copy of a host's store file).

use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls};

use crate::error::{Error, Result};
use crate::guard::TokenGuard;
use crate::secret::SecretBytes;
use crate::store::redb_store::Watch;
use crate::store::redb_store::txn::Batch;

/// The schema versions this build applies, in order. A database at a later version
/// than this build knows is refused.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE tg_store (
         store_id     bytea  PRIMARY KEY,
         snapshot_gen bigint NOT NULL,   -- the generation the log starts from
         created      timestamptz NOT NULL DEFAULT now());
     CREATE TABLE tg_batches (
         store_id bytea  NOT NULL REFERENCES tg_store,
         gen      bigint NOT NULL,       -- the generation the batch ends on (MAC'd inside it)
         batch    bytea  NOT NULL,       -- the sealed batch (docs/FORMAT.md, the fleet log)
         written  timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (store_id, gen));",
    ),
    (
        2,
        // Each batch's state head beside it, and the head the log starts from: an
        // append goes only on top of the very state it was built on, and a host
        // checks that the log holds its own head at its generation.
        // A log written before (a development build's) has no heads to match:
        // refused, to be started again, rather than left failing every look.
        "DO $$ BEGIN
             IF EXISTS (SELECT 1 FROM tg_store) THEN
                 RAISE EXCEPTION 'this database holds a fleet log of schema 1 (no state heads): start the fleet \
                                  again in a new database';
             END IF;
         END $$;
         ALTER TABLE tg_store ADD COLUMN start_head bytea;
         ALTER TABLE tg_batches ADD COLUMN head bytea;",
    ),
];

/// The advisory-lock classes of tokenguard ("tg", "th" in ASCII): a store's log (the
/// second key from its id), and the schema. The two-integer form never meets another
/// application's one-integer lock.
const LOCK_CLASS: i32 = 0x7467;
const LOCK_SCHEMA: (i32, i32) = (0x7468, 0);

/// The most batches one catch-up round reads (and holds in memory) at once.
const PAGE: i64 = 512;

/// Where the log's database is and how to reach it.
pub struct LogConfig<'a> {
    /// A libpq connection string or URL (`host=/run/postgresql dbname=tokenguard
    /// user=tokenguard`, or `host=db.internal …` with `ca_file`). A password in it
    /// is refused.
    pub url: &'a str,
    /// The password (from a PIN-style source: `env:` or `file:`).
    pub password: Option<&'a SecretBytes>,
    /// The CA certificates (PEM) that sign the database's certificate: required
    /// when the URL names a TCP host, refused with a Unix socket.
    pub ca_file: Option<&'a std::path::Path>,
    /// Bounds the connection, every statement and every lock wait.
    pub timeout: Duration,
    /// A read answers from the local copy while its last look at the log is younger
    /// than this; otherwise it looks first (one round trip), or fails.
    pub staleness: Duration,
    /// Keep a second connection that `LISTEN`s for other hosts' batches, so that a
    /// read sees them one notification after their commit instead of at the bound
    /// (and the bound runs from the listener's last heartbeat, not the last look).
    /// For a process that lives longer than the bound; a one-shot command (the
    /// CLI's) has no use for it.
    pub listen: bool,
}

impl std::fmt::Debug for LogConfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogConfig")
            // A URL may hold a password (refused at connect, but not printed before).
            .field("url", &"<not shown>")
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("staleness", &self.staleness)
            .field("listen", &self.listen)
            .finish()
    }
}

fn db(operation: &'static str) -> impl Fn(postgres::Error) -> Error {
    move |e| {
        // The server's own message where there is one; never the connection string.
        let detail = match e.as_db_error() {
            Some(d) => format!("{} ({})", d.message(), d.code().code()),
            None => e.to_string(),
        };
        Error::Database { operation, detail }
    }
}

/// One connection to the log of one store, made again when it was lost (a server
/// restart, a network failure) — but never inside a write's transaction: a host
/// recovers without being restarted, and no write runs half under the lock.
struct PgLog {
    dialer: Dialer,
    client: Option<Client>,
    store_id: Vec<u8>,
    /// The second key of this store's advisory lock.
    lock_key: i32,
    /// A write's transaction (and the lock) is open on `client`.
    locked: bool,
    /// The statements of the hot paths, prepared once per connection (an
    /// unprepared statement costs a second round trip).
    stmts: Option<Stmts>,
    /// Which log this is, once registered (see `register`).
    identity: Vec<u8>,
}

struct Stmts {
    since: postgres::Statement,
    insert: postgres::Statement,
    insert_alone: postgres::Statement,
}

/// The rows of the log from `$2` on, in one statement (one round trip, one snapshot,
/// two index probes): at most `$3` rows of `tg_batches` from `$2` (the batch at `$2`
/// with the head it holds there, its bytes not fetched, then the batches after), and
/// the log's start if it is at `$2` (its head; `start` true). The order and the limit
/// are inside the first branch so that a generic plan walks the primary key from
/// `$2` rather than scanning the log (tested); the caller puts the rows in order.
const SINCE: &str = "(SELECT gen, head, CASE WHEN gen = $2 THEN NULL ELSE batch END, false AS start FROM tg_batches
       WHERE store_id = $1 AND gen >= $2 ORDER BY gen LIMIT $3)
     UNION ALL
     (SELECT snapshot_gen, start_head, NULL, true FROM tg_store WHERE store_id = $1 AND snapshot_gen = $2)";

/// A batch at `$2` with its head `$6`, only where the log holds head `$5` at `$4`
/// (the batch there, or where it starts); and, in the same statement, a
/// notification on channel `$7` naming the generation, delivered to every listening
/// host when the write's transaction commits. One row when inserted.
const INSERT: &str = "WITH ins AS (
         INSERT INTO tg_batches (store_id, gen, batch, head)
         SELECT $1, $2, $3, $6
          WHERE EXISTS (SELECT 1 FROM tg_batches WHERE store_id = $1 AND gen = $4 AND head = $5)
             OR EXISTS (SELECT 1 FROM tg_store WHERE store_id = $1 AND snapshot_gen = $4 AND start_head = $5)
         RETURNING gen)
     SELECT pg_notify($7, gen::text) FROM ins";

/// [`INSERT`] without the write's transaction (docs/FLEET-DESIGN.md, "A write"): one
/// statement that is its own transaction, the optimistic write's only arbiter. It
/// inserts only if it takes the store's advisory lock at once (`$8`, `$9`: no
/// locked writer is between its look and its insert, and no other optimistic
/// insert runs beside it), the log holds head `$5` at `$4` and nothing at `$2` or
/// after, and the log still has its primary key: that key refuses a second batch
/// at `$2` committed after this statement's snapshot was taken (the snapshot is
/// taken before the try takes the lock), so without it (an administrator dropped
/// it) writes go under the lock, whose look comes after the lock. One row: whether
/// it had the lock and the key, whether the log holds `$5` at `$4`, whether it
/// holds anything at `$2` or after, and the generation inserted (`NULL`: none).
const INSERT_ALONE: &str = "WITH l AS (
         SELECT pg_try_advisory_xact_lock($8, $9) AS got,
                (EXISTS (SELECT 1 FROM tg_batches WHERE store_id = $1 AND gen = $4 AND head = $5)
                 OR EXISTS (SELECT 1 FROM tg_store WHERE store_id = $1 AND snapshot_gen = $4 AND start_head = $5))
                    AS held,
                EXISTS (SELECT 1 FROM tg_batches WHERE store_id = $1 AND gen >= $2) AS newer,
                EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                         WHERE conrelid = 'tg_batches'::regclass AND contype = 'p'
                           AND pg_catalog.pg_get_constraintdef(oid) = 'PRIMARY KEY (store_id, gen)') AS keyed),
     ins AS (
         INSERT INTO tg_batches (store_id, gen, batch, head)
         SELECT $1, $2, $3, $6 FROM l WHERE l.got AND l.keyed AND l.held AND NOT l.newer
         RETURNING gen)
     SELECT l.got AND l.keyed, l.held, l.newer, n.gen
       FROM l LEFT JOIN (SELECT gen, pg_notify($7, gen::text) AS notified FROM ins) n ON true";

/// How to reach the database: the parsed and checked connection settings, and TLS
/// for a host reached over TCP. Cloned for the notification listener.
#[derive(Clone)]
struct Dialer {
    config: postgres::Config,
    /// `None` for a Unix socket.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Dialer {
    /// Checks `cfg` (no password in the URL, TLS for TCP, …) and prepares it.
    fn new(cfg: &LogConfig<'_>) -> Result<Dialer> {
        let mut pg: postgres::Config =
            cfg.url.parse().map_err(|e| Error::Config(format!("the fleet database URL does not parse: {e}")))?;
        if pg.get_password().is_some() {
            return Err(Error::Config(
                "the fleet database URL holds a password: give it through password_source (env: or file:) instead"
                    .into(),
            ));
        }
        // `hostaddr` connects over TCP whatever `host` says.
        let tcp = pg.get_hosts().iter().any(|h| !matches!(h, postgres::config::Host::Unix(_)))
            || !pg.get_hostaddrs().is_empty();
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(Error::Config(
                "the fleet database URL names no host: give a Unix socket directory (host=/run/postgresql) or a \
                 host name with ca_file"
                    .into(),
            ));
        }
        let named_tcp = pg.get_hosts().iter().any(|h| !matches!(h, postgres::config::Host::Unix(_)));
        let unix = pg.get_hosts().iter().any(|h| matches!(h, postgres::config::Host::Unix(_)));
        if tcp && unix {
            // Every host of a URL is tried with one TLS setting: a socket (no TLS
            // there) beside a TCP host would never work, and hide the TCP host's error.
            return Err(Error::Config(
                "the fleet database URL mixes a Unix socket and TCP hosts: give one or the other".into(),
            ));
        }
        if !pg.get_hostaddrs().is_empty() && !named_tcp {
            return Err(Error::Config(
                "the fleet database URL gives hostaddr without a host name: TLS checks the certificate against host="
                    .into(),
            ));
        }
        let tls = match (tcp, cfg.ca_file) {
            (true, Some(ca)) => {
                // Verified against `ca_file` alone, host name included; never a
                // fallback to plaintext (libpq's `prefer` would).
                pg.ssl_mode(postgres::config::SslMode::Require);
                Some(tls_connector(ca)?)
            }
            (true, None) => {
                return Err(Error::Config(
                    "the fleet database is reached over TCP: give ca_file (the CA that signed the server's \
                     certificate); a token's log never crosses a network in plaintext"
                        .into(),
                ));
            }
            (false, Some(_)) => {
                return Err(Error::Config(
                    "ca_file is for a database reached over TCP; this URL names a Unix socket (no TLS there)".into(),
                ));
            }
            (false, None) => None,
        };
        if let Some(p) = cfg.password {
            pg.password(p.expose());
        }
        // The log lives on the primary: a standby (a URL listing several hosts)
        // would show a lagging log, and take no insert.
        pg.target_session_attrs(postgres::config::TargetSessionAttrs::ReadWrite);
        let ms = cfg.timeout.as_millis().max(1);
        // A peer that stops answering (a partition) fails the connection's writes
        // after the timeout, not after the kernel's fifteen minutes. What the log's
        // rules stand on is pinned, whatever the role's or the database's defaults:
        // read committed (each statement of a locked write sees what was committed
        // before it, the look after the lock; a lost race is a unique violation,
        // not a serialization failure) and a batch durable before it is answered
        // (a copy must never be ahead of the log).
        pg.connect_timeout(cfg.timeout).tcp_user_timeout(cfg.timeout).application_name("tokenguard").options(&format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={} \
             -c default_transaction_isolation=read\\ committed -c synchronous_commit=on",
            ms * 2
        ));
        Ok(Dialer { config: pg, tls })
    }

    /// A new connection.
    fn dial(&self) -> Result<Client> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        connected.map_err(|e| match e.code() {
            // A wrong password or user is the configuration's fault, not an outage.
            Some(c) if c.code().starts_with("28") => Error::Config(format!(
                "the fleet database refused the credentials: {}",
                e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
            )),
            // So is a certificate that does not verify, or a server without TLS.
            None if tls_failure(&e) => Error::Config(format!("TLS to the fleet database failed: {}", chain(&e))),
            _ => db("connecting")(e),
        })
    }
}

impl PgLog {
    fn connect(cfg: &LogConfig<'_>, store_id: &[u8]) -> Result<PgLog> {
        Self::on(Dialer::new(cfg)?, store_id)
    }

    fn on(dialer: Dialer, store_id: &[u8]) -> Result<PgLog> {
        let lock_key = store_id.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map_or(0, i32::from_be_bytes);
        let mut log = PgLog {
            dialer,
            client: None,
            store_id: store_id.to_vec(),
            lock_key,
            locked: false,
            stmts: None,
            identity: Vec::new(),
        };
        log.migrate()?;
        Ok(log)
    }

    /// The connection, made again if it is closed.
    fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            if std::mem::take(&mut self.locked) {
                // The server ended the transaction with the connection; the next
                // call connects again.
                return Err(Error::Database {
                    operation: "writing",
                    detail: "the connection was lost while this write held the log's lock; nothing was written".into(),
                });
            }
            self.client = None;
            self.client = Some(self.dialer.dial()?);
            self.stmts = None;
        }
        self.client.as_mut().ok_or_else(|| Error::Database { operation: "connecting", detail: "no connection".into() })
    }

    /// Applies the schema versions the database lacks, under an advisory lock, each
    /// recorded in `tg_migrations`.
    fn migrate(&mut self) -> Result<()> {
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        // Current already: nothing that needs more than reading (a host's role may
        // only read and insert).
        let c = self.client()?;
        let exists: bool = c
            .query_one("SELECT to_regclass('tg_migrations') IS NOT NULL", &[])
            .and_then(|r| r.try_get(0))
            .map_err(db("reading the schema version"))?;
        let current: Option<i32> = match exists {
            true => c
                .query_one("SELECT max(version) FROM tg_migrations", &[])
                .and_then(|r| r.try_get(0))
                .map_err(db("reading the schema version"))?,
            false => None,
        };
        let unsupported = |have: i32| Error::UnsupportedVersion {
            found: u32::try_from(have).unwrap_or(u32::MAX),
            supported: u32::try_from(newest).unwrap_or(0),
        };
        match current {
            Some(have) if have == newest => return Ok(()),
            Some(have) if have > newest => return Err(unsupported(have)),
            _ => {}
        }
        let mut t = self.client()?.transaction().map_err(db("migrating the schema"))?;
        t.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_SCHEMA.0, &LOCK_SCHEMA.1])
            .map_err(db("locking for a schema migration"))?;
        t.batch_execute(
            "CREATE TABLE IF NOT EXISTS tg_migrations (version integer PRIMARY KEY, applied timestamptz NOT NULL)",
        )
        .map_err(db("migrating the schema"))?;
        let have: i32 = t
            .query_one("SELECT coalesce(max(version), 0) FROM tg_migrations", &[])
            .and_then(|r| r.try_get(0))
            .map_err(db("reading the schema version"))?;
        if have > newest {
            return Err(unsupported(have));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
            t.batch_execute(sql).map_err(db("migrating the schema"))?;
            t.execute("INSERT INTO tg_migrations (version, applied) VALUES ($1, now())", &[version])
                .map_err(db("migrating the schema"))?;
        }
        t.commit().map_err(db("migrating the schema"))
    }

    /// Makes this store's log start at `generation` (with state head `head`) if it
    /// has none; returns the generation it starts at, and whether this call started
    /// it. A database that holds another
    /// store's log is refused: one database per store, so that a host made with
    /// `init` by mistake does not quietly start a second store beside the fleet's.
    fn register(&mut self, generation: u64, head: &[u8]) -> Result<(u64, bool)> {
        let g = to_i64(generation)?;
        let store_id = self.store_id.clone();
        let mut t = self.client()?.transaction().map_err(db("registering the store"))?;
        // The check and the insert as one step: two stores started at once on an
        // empty database cannot both register.
        t.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_SCHEMA.0, &LOCK_SCHEMA.1])
            .map_err(db("registering the store"))?;
        let c = &mut t;
        let others: i64 = c
            .query_one("SELECT count(*) FROM tg_store WHERE store_id <> $1", &[&store_id])
            .and_then(|r| r.try_get(0))
            .map_err(db("registering the store"))?;
        if others > 0 {
            return Err(Error::Config(
                "the fleet database holds the log of another store: one database per store. To join a host to \
                 the fleet, copy the first host's store file to this host's [store] path (do not run `init` \
                 here)"
                    .into(),
            ));
        }
        let started = c
            .execute(
                "INSERT INTO tg_store (store_id, snapshot_gen, start_head) VALUES ($1, $2, $3)
                 ON CONFLICT (store_id) DO NOTHING",
                &[&store_id, &g, &head],
            )
            .map_err(db("registering the store"))?
            == 1;
        let row = c
            .query_one(
                "SELECT snapshot_gen, start_head, (extract(epoch FROM created) * 1000000)::bigint
                   FROM tg_store WHERE store_id = $1",
                &[&store_id],
            )
            .map_err(db("registering the store"))?;
        let (start, start_head, created): (i64, Option<Vec<u8>>, i64) = (
            row.try_get(0).map_err(db("registering the store"))?,
            row.try_get(1).map_err(db("registering the store"))?,
            row.try_get(2).map_err(db("registering the store"))?,
        );
        t.commit().map_err(db("registering the store"))?;
        // Which log this is: where it starts and when it was started. A log started
        // again (a database rebuilt, emptied, or put back to before the log) has
        // another, even at the same generation.
        let mut identity = Vec::with_capacity(16 + start_head.as_ref().map_or(0, Vec::len));
        identity.extend_from_slice(&created.to_be_bytes());
        identity.extend_from_slice(&start.to_be_bytes());
        identity.extend_from_slice(start_head.as_deref().unwrap_or_default());
        self.identity = identity;
        let start = u64::try_from(start).map_err(|_| Error::integrity("reading where the fleet log starts"))?;
        Ok((start, started))
    }

    /// Takes back a log this process just started ([`register`] said so) and that
    /// holds no batch yet: a `migrate` refused after it registered leaves the
    /// database as it was. Best effort (the role may not delete: then it says so).
    fn unregister(&mut self) -> Result<()> {
        let store_id = self.store_id.clone();
        self.client()?
            .execute(
                "DELETE FROM tg_store WHERE store_id = $1 AND NOT EXISTS (SELECT 1 FROM tg_batches WHERE store_id = $1)",
                &[&store_id],
            )
            .map(drop)
            .map_err(db("taking back the log this migration started"))
    }

    /// The connection and its prepared statements.
    fn ready(&mut self) -> Result<(&mut Client, &Stmts)> {
        self.client()?;
        let Some(c) = self.client.as_mut() else {
            return Err(Error::Database { operation: "connecting", detail: "no connection".into() });
        };
        if self.stmts.is_none() {
            let since = c.prepare(SINCE).map_err(db("preparing the log's statements"))?;
            let insert = c.prepare(INSERT).map_err(db("preparing the log's statements"))?;
            let insert_alone = c.prepare(INSERT_ALONE).map_err(db("preparing the log's statements"))?;
            self.stmts = Some(Stmts { since, insert, insert_alone });
        }
        match &self.stmts {
            Some(st) => Ok((c, st)),
            None => Err(Error::Database { operation: "connecting", detail: "no statements".into() }),
        }
    }

    /// Inserts a batch at its `after`, only where the log holds its `before` (the
    /// batch there, or the log's start).
    fn insert(&mut self, batch: &Batch) -> Result<()> {
        let (b, a) = (to_i64(batch.before)?, to_i64(batch.after)?);
        let store_id = self.store_id.clone();
        let (c, st) = self.ready()?;
        let after = batch.after;
        let channel = channel(&store_id);
        match c.execute(&st.insert, &[&store_id, &a, &batch.bytes, &b, &batch.prev_head, &batch.head, &channel]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(Error::integrity(
                "appending to the fleet log: it does not hold, at the generation this write built on, the state this \
                 host's copy is in (the copy was written outside the log, or the log lost batches)",
            )),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(Error::FleetConflict { generation: after }),
            Err(e) => {
                self.stmts = None;
                Err(db("appending a batch")(e))
            }
        }
    }

    /// Inserts a batch as [`INSERT_ALONE`] does, outside any transaction of this
    /// connection: `Ok(true)` once the log holds it (committed), `Ok(false)` when
    /// another writer was first (it holds the log's lock, or a batch is at `after`)
    /// and nothing was inserted.
    fn insert_alone(&mut self, batch: &Batch) -> Result<bool> {
        if self.locked {
            self.rollback();
        }
        let (b, a) = (to_i64(batch.before)?, to_i64(batch.after)?);
        let (store_id, lock_key) = (self.store_id.clone(), self.lock_key);
        let (c, st) = self.ready()?;
        let channel = channel(&store_id);
        let params: [&(dyn postgres::types::ToSql + Sync); 9] =
            [&store_id, &a, &batch.bytes, &b, &batch.prev_head, &batch.head, &channel, &LOCK_CLASS, &lock_key];
        let row = match c.query_one(&st.insert_alone, &params) {
            Ok(row) => row,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(false),
            // The statement failed and its transaction with it, nothing inserted: a
            // plan another host's migration invalidated, a serialization failure.
            // Run under the lock (prepared again).
            Err(e)
                if e.code().is_some_and(|c| {
                    *c == SqlState::FEATURE_NOT_SUPPORTED
                        || *c == SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == SqlState::T_R_DEADLOCK_DETECTED
                }) =>
            {
                self.stmts = None;
                return Ok(false);
            }
            Err(e) => {
                self.stmts = None;
                return Err(db("appending a batch")(e));
            }
        };
        let get = |i: usize| row.try_get::<_, bool>(i).map_err(db("appending a batch"));
        let (got, held, newer) = (get(0)?, get(1)?, get(2)?);
        let inserted: Option<i64> = row.try_get(3).map_err(db("appending a batch"))?;
        if !got {
            // A writer holds the lock (it may be about to append), or the log lost
            // its primary key: run under the lock.
            return Ok(false);
        }
        if !held {
            return Err(Error::integrity(
                "appending to the fleet log: it does not hold, at the generation this write built on, the state this \
                 host's copy is in (the copy was written outside the log, or the log lost batches)",
            ));
        }
        match inserted {
            Some(g) if g == a && !newer => Ok(true),
            // Another host's batch is there: this copy is behind.
            None if newer => Ok(false),
            _ => Err(Error::integrity("appending to the fleet log: its answer does not add up")),
        }
    }

    /// At most [`PAGE`] batches after `generation`, in order, in one statement (so
    /// one snapshot, inside the write's transaction or not), and whether there may be
    /// more. The log must hold this host's `generation` with this host's `head`
    /// there (the batch there, or the log's start), once: a log that ends before it
    /// lost batches this host read (the database was put back to an older backup, or
    /// rows were deleted), and one that holds another head there was rewritten or
    /// the copy written outside the log — refused, never taken as "nothing new".
    fn read_since(&mut self, generation: u64, head: &[u8]) -> Result<(Vec<Vec<u8>>, bool)> {
        let g = to_i64(generation)?;
        let store_id = self.store_id.clone();
        let (c, st) = self.ready()?;
        let limit = PAGE + 1;
        let rows = match c.query(&st.since, &[&store_id, &g, &limit]) {
            Ok(rows) => rows,
            Err(e) => {
                // Prepared again on the next call (a plan another host's migration
                // invalidated, a pooler that dropped it).
                self.stmts = None;
                return Err(db("reading the log")(e));
            }
        };
        let (mut held, mut batches_there, mut from_batches) = (false, 0usize, 0i64);
        let mut batches = Vec::with_capacity(rows.len());
        for r in &rows {
            let at: i64 = r.try_get(0).map_err(db("reading the log"))?;
            let start: bool = r.try_get(3).map_err(db("reading the log"))?;
            if !start {
                from_batches += 1;
            }
            if at == g {
                // Every row there must hold this host's head, and the log one batch
                // there at most (two: its primary key was dropped, and a copy of the
                // batch would hide the batches after it).
                let there: Option<Vec<u8>> = r.try_get(1).map_err(db("reading the log"))?;
                if there.as_deref() != Some(head) {
                    return Err(Error::integrity(
                        "reading the fleet log: at this host's generation it holds another state than this host's \
                         copy (the copy was written outside the log, or the log was rewritten)",
                    ));
                }
                batches_there += usize::from(!start);
                if batches_there > 1 {
                    return Err(Error::integrity(
                        "reading the fleet log: it holds more than one batch at this host's generation",
                    ));
                }
                held = true;
            } else {
                match r.try_get::<_, Option<Vec<u8>>>(2).map_err(db("reading the log"))? {
                    Some(b) => batches.push((at, b)),
                    None => return Err(Error::integrity("reading the fleet log: it holds a batch without its bytes")),
                }
            }
        }
        if !held {
            return Err(Error::integrity(
                "reading the fleet log: it does not hold this host's generation (the database was rolled back or lost \
                 batches this host has read, or this host's copy was written outside the log: opened without \
                 backend = \"postgres\")",
            ));
        }
        // In order, and at most a page: at the log's start, the start row comes from
        // the second branch, so the first may have brought one batch more. More may
        // follow when the first branch reached its limit.
        batches.sort_unstable_by_key(|(at, _)| *at);
        let page = usize::try_from(PAGE).unwrap_or(usize::MAX);
        let batches: Vec<Vec<u8>> = batches.into_iter().take(page).map(|(_, b)| b).collect();
        Ok((batches, from_batches >= limit))
    }
}

/// A TLS connector that trusts the CA certificates in the PEM file `ca` and nothing
/// else, and checks the server's host name against its certificate.
fn tls_connector(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| Error::Config(format!("ca_file {}: {e}", ca.display()));
    // Whoever may write it may add a CA and stand in for the database.
    let meta = std::fs::metadata(ca).map_err(|e| bad(&e))?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o022 != 0 {
        return Err(bad(&"writable by group or others; chmod go-w it"));
    }
    let text = std::fs::read(ca).map_err(|e| bad(&e))?;
    if text.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(bad(&"it holds a private key: give the CA's certificate only"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&text) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no CA certificate in it"));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Whether a connection failed because TLS was refused — a certificate that does not
/// verify, a protocol rustls will not speak (its error, inside the I/O error
/// tokio-rustls reports), or a server without TLS — rather than because the network
/// or the server went away during the handshake (an outage: exit 12).
fn tls_failure(e: &postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let rustls_inside = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if rustls_inside
            || c.downcast_ref::<rustls::Error>().is_some()
            || c.to_string() == "server does not support TLS"
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error and its causes, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The notification channel of a store's log: `tg_` and its id in hex (within
/// PostgreSQL's 63-byte identifiers).
fn channel(store_id: &[u8]) -> String {
    let mut c = String::with_capacity(3 + 2 * store_id.len());
    c.push_str("tg_");
    for b in store_id {
        c.push_str(&format!("{b:02x}"));
    }
    c
}

fn to_i64(g: u64) -> Result<i64> {
    i64::try_from(g).map_err(|_| Error::integrity("a generation beyond the log's range"))
}

impl crate::store::redb_store::Log for PgLog {
    fn lock(&mut self) -> Result<()> {
        if self.locked {
            // A transaction left open (never the case through the store, which
            // releases on every way out): ended first, never joined.
            self.rollback();
        }
        let sql = format!("BEGIN; SELECT pg_advisory_xact_lock({LOCK_CLASS}, {})", self.lock_key);
        let locked = self.client()?.batch_execute(&sql);
        match locked {
            Ok(()) => {
                self.locked = true;
                Ok(())
            }
            Err(e) => {
                self.rollback();
                Err(match e.code() {
                    Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::QUERY_CANCELED => {
                        Error::StoreBusy { path: "the fleet log".into(), waited_ms: self.timeout_ms() }
                    }
                    _ => db("taking the log's write lock")(e),
                })
            }
        }
    }

    fn since(&mut self, generation: u64, head: &[u8]) -> Result<(Vec<Vec<u8>>, bool)> {
        self.read_since(generation, head)
    }

    fn append(&mut self, batch: &Batch) -> Result<()> {
        let inserted = self.insert(batch);
        if let Err(e) = inserted {
            self.rollback();
            return Err(e);
        }
        // Unknown outcome when this fails: the next catch-up finds the batch or not.
        let committed = match self.client() {
            Ok(c) => c.batch_execute("COMMIT").map_err(db("committing a batch")),
            Err(e) => Err(e),
        };
        self.locked = false;
        if committed.is_err() {
            self.client = None;
        }
        committed
    }

    fn release(&mut self) {
        self.rollback();
    }

    fn append_alone(&mut self, batch: &Batch) -> Result<bool> {
        self.insert_alone(batch)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms())
    }

    fn queue_usage(&mut self) -> Result<f64> {
        self.client()?
            .query_one("SELECT pg_notification_queue_usage()", &[])
            .and_then(|r| r.try_get(0))
            .map_err(db("reading the notification queue's use"))
    }
}

impl PgLog {
    /// Ends the write's transaction (and the lock) without a batch. A connection in
    /// doubt is dropped: the server rolls an orphaned transaction back.
    fn rollback(&mut self) {
        self.locked = false;
        if let Some(c) = self.client.as_mut()
            && c.batch_execute("ROLLBACK").is_err()
        {
            self.client = None;
        }
    }

    fn timeout_ms(&self) -> u64 {
        self.dialer.config.get_connect_timeout().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Joins `guard`'s store to the fleet log at `cfg`: applies the schema the database
/// lacks, starts the log at the store's generation if the store has none yet (the
/// first host), and catches up with it otherwise. From then on every write of the
/// guard (and of its clones) is in the log, on top of the log's newest state,
/// before it commits here (docs/FLEET-DESIGN.md, "A write"); a read older than
/// `cfg.staleness` catches up first.
/// Returns the generation reached.
///
/// If the catch-up brought a roots change made on another host (`root add`, `root
/// remove`), the guard was opened with the pins from before and refuses writes:
/// check [`TokenGuard::roots_moved`] and open the store again (`Config::
/// open_guard_with` does). A copy that followed another log of this store than the
/// database holds is refused (an integrity error), and starts no log there.
pub fn attach(guard: &TokenGuard, cfg: &LogConfig<'_>) -> Result<u64> {
    join(guard, cfg, false)
}

/// As [`attach`], for a store that must start a new log (`migrate` into a fleet):
/// refused, with nothing changed in the database, when the database already holds
/// this store's log — the copy would be a second branch of the store beside it.
pub fn start(guard: &TokenGuard, cfg: &LogConfig<'_>) -> Result<u64> {
    join(guard, cfg, true)
}

fn join(guard: &TokenGuard, cfg: &LogConfig<'_>, new_log: bool) -> Result<u64> {
    // What the store itself refuses (a read journal, a rollback counter), before
    // anything is written to the database.
    guard.check_linkable()?;
    let mut log = PgLog::connect(cfg, &guard.store_id())?;
    let (here, head) = guard.state_head()?;
    let (start, started) = log.register(here, &head)?;
    if new_log && !started {
        return Err(Error::Config(
            "the fleet database already holds this store's log: a copy started there would be a second branch of \
             the store. Migrate into a database without it, or join this host by copying a fleet host's store file"
                .into(),
        ));
    }
    // A copy that followed a log follows that log only: a database that holds
    // another (rebuilt, emptied, restored from before the log, or another server
    // by a wrong url) is refused — a log started here from this copy would be a
    // second branch of the store, serving what the fleet revoked.
    let identity = log.identity.clone();
    let followed = guard.fleet_mark()?;
    let foreign = followed.as_ref().is_some_and(|m| *m != identity);
    if start > here {
        return Err(Error::integrity(
            "joining the fleet log: it starts after this store's generation (a snapshot to load first; not built yet)",
        ));
    }
    let listener = listener_for(cfg, &log.dialer, &guard.store_id());
    let dialer = log.dialer.clone();
    let joined = if foreign {
        Err(Error::integrity(
            "joining the fleet log: this copy followed another log of this store than the database holds (the \
             database was rebuilt, emptied or restored from before its log, or the url names another server); \
             refused, nothing written. Take the store out with `tokenguard migrate --unjoined-copy` if the fleet's \
             log is lost",
        ))
    } else {
        guard
            .attach_log(Box::new(log), cfg.staleness, listener)
            .and_then(|()| guard.sync())
            // Joined: from now on the file is opened only with this log.
            .and_then(|g| guard.mark_fleet_member(&identity).map(|()| g))
    };
    if started
        && (new_log || foreign)
        && let Err(e) = &joined
    {
        // Refused after it registered: the new log is taken back.
        let back = PgLog::on(dialer, &guard.store_id()).and_then(|mut log| log.unregister());
        if let Err(b) = back {
            tracing::error!(error = %b, after = %e, "the log this join started could not be taken back");
        }
    }
    joined
}

/// The notification listener of a store with staleness bound `bound`, when `cfg`
/// asks for one; none for a bound of zero (every read looks) or none at all.
fn listener_for(cfg: &LogConfig<'_>, dialer: &Dialer, store_id: &[u8]) -> Option<crate::store::redb_store::Starter> {
    let bound = cfg.staleness;
    if !cfg.listen || bound.is_zero() || bound == Duration::MAX {
        return None;
    }
    let mut dialer = dialer.clone();
    dialer.config.application_name("tokenguard-listen");
    let channel = channel(store_id);
    Some(Box::new(move |watch| {
        let spawned = std::thread::Builder::new()
            .name("tg-fleet-listen".into())
            .spawn(move || listen(&dialer, &channel, &watch, bound));
        if let Err(e) = spawned {
            // Reads keep the staleness bound without it.
            tracing::warn!(error = %e, "the fleet listener could not start; reads keep the staleness bound");
        }
    }))
}

/// The listener's thread: `LISTEN`s on the store's channel, hears each batch's
/// generation, and proves every half bound (at most 5 s) with a round trip that its
/// backend still listens on the channel, connecting again after a loss. Ends when
/// the store is gone (within one heartbeat).
fn listen(dialer: &Dialer, channel: &str, watch: &std::sync::Weak<Watch>, bound: Duration) {
    use postgres::fallible_iterator::FallibleIterator;
    let beat = (bound / 2).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut retry = Duration::from_millis(50);
    let mut quiet = false;
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let listened = (|| -> Result<()> {
            let mut client = dialer.dial()?;
            client.batch_execute(&format!("LISTEN \"{channel}\"")).map_err(db("listening for batches"))?;
            match watch.upgrade() {
                Some(w) => w.started(crate::clock::boot_ms()),
                None => return Ok(()),
            }
            let mut beaten = std::time::Instant::now();
            loop {
                let got = client.notifications().timeout_iter(beat.saturating_sub(beaten.elapsed())).next();
                let Some(w) = watch.upgrade() else { return Ok(()) };
                match got.map_err(db("listening for batches"))? {
                    Some(n) => hear(&w, channel, &n),
                    None if client.is_closed() => {
                        return Err(Error::Database { operation: "listening for batches", detail: "closed".into() });
                    }
                    None => {}
                }
                if beaten.elapsed() >= beat {
                    let at = crate::clock::boot_ms();
                    beaten = std::time::Instant::now();
                    // Proves that this very backend still listens (a pooler that
                    // moved the session, a server that dropped it, would not).
                    let listening: bool = client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM pg_listening_channels() AS c WHERE c = $1)",
                            &[&channel],
                        )
                        .and_then(|r| r.try_get(0))
                        .map_err(db("listening for batches"))?;
                    if !listening {
                        return Err(Error::Database {
                            operation: "listening for batches",
                            detail: "the connection no longer listens".into(),
                        });
                    }
                    // What the round trip delivered is heard before it vouches.
                    let mut notifications = client.notifications();
                    let mut pending = notifications.iter();
                    while let Some(n) = pending.next().map_err(db("listening for batches"))? {
                        hear(&w, channel, &n);
                    }
                    w.alive(at);
                    // A connection that proved itself: the next loss waits the
                    // shortest time again, and is told (one that fails its first
                    // heartbeat, as behind a transaction pooler, keeps backing off).
                    retry = Duration::from_millis(50);
                    quiet = false;
                }
            }
        })();
        let Some(w) = watch.upgrade() else { return };
        w.lost();
        drop(w);
        match listened {
            // Once per loss of a working connection, at most once a minute; the
            // attempts that follow at debug.
            Err(e) if !quiet && warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) => {
                warned = Some(std::time::Instant::now());
                tracing::warn!(error = %e, "the fleet listener is not listening; reads keep the staleness bound");
            }
            Err(e) => tracing::debug!(error = %e, "the fleet listener could not listen (again) yet"),
            Ok(()) => {}
        }
        quiet = true;
        std::thread::sleep(retry);
        retry = (retry * 2).min(beat.max(Duration::from_millis(50)));
        if watch.strong_count() == 0 {
            return;
        }
    }
}

/// A notification on `channel` naming a generation; anything else is ignored (any
/// role that may connect can notify: at most it makes reads look).
fn hear(watch: &Watch, channel: &str, n: &postgres::Notification) {
    match n.payload().parse::<u64>() {
        Ok(generation) if n.channel() == channel => watch.heard(generation),
        _ => tracing::debug!("a notification that names no generation, ignored"),
    }
}

#[cfg(test)]
mod tests;
