//! The fleet log against a real PostgreSQL server (the test fixture, on a Unix
//! socket), each figure beside its floor in the same run:
//! - `put/redb`: a durable `put` on a store with no log (the single-host figure);
//! - `put/fleet`: the same `put` on a host of the log, the only writer (the write
//!   on the copy, its batch offered in one statement that is its own transaction,
//!   then the local commit: an optimistic write that never loses here);
//! - `insert/raw`: the floor of the log's part: one autocommit `INSERT` of the same
//!   number of bytes as a `put`'s sealed batch, on the same socket (prepared, as
//!   the log's statements are);
//! - `catch_up/1`: a second host applying one such batch (fetch, MAC, apply, the
//!   state checked from the verified one by the rows the batch changes, commit), the
//!   writing host's `put` untimed; `catch_up/1-of-10k-tokens`: the same on a store
//!   of some 10,000 tokens (9,000 added; last);
//! - `get/redb`, `get/fleet`: a warm `get` on the lone store, and on a host whose
//!   last look at the log is within its staleness bound (1 s);
//! - `get/fleet-cold`: a `get` on a host with a zero bound (every read looks at the
//!   log: one round trip, nothing new), against `select/raw`, one prepared `SELECT`
//!   of a batch-sized row by key;
//! - `put_many_1000/redb`, `put_many_1000/fleet`: 1,000 tokens in one `put_many`,
//!   against `insert_many_1000/raw`, one batched `INSERT … ON CONFLICT` of 1,000
//!   rows holding together as many bytes as the `put_many`'s batch;
//! - `refresh/seen-by-listening-host`: a refresh on one host (the lease and the
//!   answer each a write through the log; a provider that answers at once) until a
//!   listening host answers the new token;
//! - `get/fleet-listening`: a warm `get` on a host with a notification listener;
//! - `visible/listener`: from another host's `put` returning to the first `get` on
//!   the listening host that answers the new value (the notification's delivery,
//!   then one look).
#![allow(missing_docs, clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod pg;

/// What `tests/common/refresher.rs` needs, by the library's public paths.
mod tokenguard_refresher_api {
    pub use tokenguard::guard::refresh::{RefreshError, RefreshedTokens, Refresher};
    pub use tokenguard::secret::{SecretBytes, TokenSet};
}

#[allow(dead_code)]
#[path = "../tests/common/refresher.rs"]
mod refresher;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenguard::fleet::{LogConfig, attach};
use tokenguard::root::RootKey;
use tokenguard::root::soft::SoftRoot;
use tokenguard::secret::SecretBytes;
use tokenguard::store::StoreOptions;
use tokenguard::{GetOptions, GuardOptions, PutItem, PutOptions, Secret, TokenGuard, TokenSet};

fn opts() -> GuardOptions {
    GuardOptions { require_hardware: false, ..Default::default() }
}

fn secret() -> Secret {
    Secret::raw(b"ghp_0123456789abcdefghijklmnopqrstuvwxyz".to_vec())
}

fn bench(c: &mut Criterion) {
    let server = pg::PgServer::start("bench-fleet");
    server.sql("postgres", "CREATE DATABASE tg");
    let dir = tempfile::tempdir().unwrap();
    let root =
        |d: &std::path::Path| -> Box<dyn RootKey> { Box::new(SoftRoot::open_or_create(&d.join("root.key")).unwrap()) };
    let start = dir.path().join("start.redb");
    drop(TokenGuard::create(&start, StoreOptions::default(), vec![root(dir.path())], opts()).unwrap());
    for h in ["plain", "a", "b", "warm", "cold", "listening"] {
        std::fs::copy(&start, dir.path().join(format!("{h}.redb"))).unwrap();
    }
    let open = |h: &str| {
        TokenGuard::open(&dir.path().join(format!("{h}.redb")), StoreOptions::default(), vec![root(dir.path())], opts())
            .unwrap()
    };
    let url = format!("host={} dbname=tg user={}", server.socket_dir().display(), pg::USER);
    let password = SecretBytes::from_slice(server.password.as_bytes());
    let cfg = LogConfig {
        url: &url,
        password: Some(&password),
        ca_file: None,
        timeout: Duration::from_secs(10),
        staleness: Duration::from_secs(3600),
        listen: false,
    };
    let plain = open("plain");
    let host = |h: &str, staleness: Duration| {
        let g = open(h);
        attach(&g, &LogConfig { staleness, ..cfg }).unwrap();
        g
    };
    let a = host("a", cfg.staleness);
    let b = host("b", cfg.staleness);

    let mut g = c.benchmark_group("fleet");
    g.sample_size(50).measurement_time(Duration::from_secs(8));
    let mut i = 0u64;
    g.bench_function("put/redb", |bn| {
        bn.iter(|| {
            i += 1;
            plain.put("github", &format!("t{}", i % 64), secret(), PutOptions::default()).unwrap();
        })
    });
    g.bench_function("put/fleet", |bn| {
        bn.iter(|| {
            i += 1;
            a.put("github", &format!("t{}", i % 64), secret(), PutOptions::default()).unwrap();
        })
    });
    // The size of one put's batch, for the raw floor.
    let size: usize = server
        .sql("tg", "SELECT octet_length(batch) FROM tg_batches ORDER BY gen DESC LIMIT 1")
        .trim()
        .parse()
        .unwrap();
    server.sql("tg", "CREATE TABLE floor (k bigint PRIMARY KEY, v bytea NOT NULL)");
    let mut raw = postgres::Config::new();
    raw.host_path(server.socket_dir()).dbname("tg").user(pg::USER).password(&server.password);
    let mut client = raw.connect(postgres::NoTls).unwrap();
    let bytes = vec![0x5au8; size];
    let mut k = 0i64;
    // Prepared once, as the log's own statements are: one round trip each.
    let insert = client.prepare("INSERT INTO floor (k, v) VALUES ($1, $2)").unwrap();
    let select = client.prepare("SELECT v FROM floor WHERE k = $1").unwrap();
    g.bench_function("insert/raw", |bn| {
        bn.iter(|| {
            k += 1;
            client.execute(&insert, &[&k, &bytes]).unwrap();
        })
    });
    b.sync().unwrap();
    g.bench_function("catch_up/1", |bn| catch_up_one(bn, &a, &b, &mut i));

    let warm = host("warm", Duration::from_secs(1));
    let cold = host("cold", Duration::ZERO);
    let read = |g: &TokenGuard| {
        let (s, _) = g.get_field("github", "t1", None, GetOptions::default()).unwrap();
        assert_eq!(s.expose().len(), 40);
    };
    plain.put("github", "t1", secret(), PutOptions::default()).unwrap();
    for g in [&plain, &warm, &cold] {
        read(g);
    }
    g.bench_function("get/redb", |bn| bn.iter(|| read(&plain)));
    g.bench_function("get/fleet", |bn| bn.iter(|| read(&warm)));
    g.bench_function("get/fleet-cold", |bn| bn.iter(|| read(&cold)));
    // A host that listens: its warm `get`, and how soon it sees another host's
    // `put` (timed from the `put`'s return to the first `get` that answers it).
    let listening = open("listening");
    attach(&listening, &LogConfig { staleness: Duration::from_secs(1), listen: true, ..cfg }).unwrap();
    read(&listening);
    g.bench_function("get/fleet-listening", |bn| bn.iter(|| read(&listening)));
    let seen = |g: &TokenGuard, value: &[u8]| {
        g.get_field("github", "visible", None, GetOptions::default()).is_ok_and(|(s, _)| s.expose() == value)
    };
    g.bench_function("visible/listener", |bn| {
        bn.iter_custom(|n| {
            let mut spent = Duration::ZERO;
            for _ in 0..n {
                i += 1;
                let value = format!("v{i}");
                a.put("github", "visible", Secret::raw(value.clone().into_bytes()), PutOptions::default()).unwrap();
                let t = Instant::now();
                while !seen(&listening, value.as_bytes()) {
                    std::hint::spin_loop();
                }
                spent += t.elapsed();
            }
            spent
        })
    });
    // A refresh on host A, with a provider that answers at once (this measures the
    // fleet's part: the lease taken through the log, the answer committed through
    // it, and the listening host B applying it), until B answers the new token.
    a.set_refresher("acme", std::sync::Arc::new(refresher::Counting::default()));
    let set = TokenSet::new()
        .with("access_token", SecretBytes::from_slice(b"at-0"))
        .with("refresh_token", SecretBytes::from_slice(b"rt-0"));
    a.put("acme", "svc", Secret::TokenSet(set), PutOptions::default()).unwrap();
    g.bench_function("refresh/seen-by-listening-host", |bn| {
        bn.iter_custom(|n| {
            let mut spent = Duration::ZERO;
            for _ in 0..n {
                let t = Instant::now();
                let (fresh, _) = a.refresh_now("acme", "svc").unwrap();
                let want = fresh.field(Some("access_token")).unwrap().expose().to_vec();
                while !listening
                    .get_field("acme", "svc", Some("access_token"), GetOptions::default())
                    .is_ok_and(|(s, _)| s.expose() == want.as_slice())
                {
                    std::hint::spin_loop();
                }
                spent += t.elapsed();
            }
            spent
        })
    });
    g.bench_function("select/raw", |bn| {
        bn.iter(|| {
            let row = client.query_one(&select, &[&(k / 2)]).unwrap();
            assert_eq!(row.get::<_, Vec<u8>>(0).len(), size);
        })
    });
    // Last: the stores hold 1,000 more tokens after it.
    // 1,000 tokens in one `put_many`, on the lone store and on a host of the log,
    // against one batched `INSERT … ON CONFLICT` of 1,000 rows of a sealed record's
    // size (the floor of writing them to PostgreSQL at all).
    let many = |prefix: &str| {
        (0..1000)
            .map(|j| PutItem {
                provider: "github".into(),
                name: format!("{prefix}{j}"),
                secret: secret(),
                options: PutOptions::default(),
            })
            .collect::<Vec<_>>()
    };
    g.sample_size(10);
    g.bench_function("put_many_1000/redb", |bn| bn.iter(|| plain.put_many(many("m")).unwrap()));
    g.bench_function("put_many_1000/fleet", |bn| bn.iter(|| a.put_many(many("m")).unwrap()));
    // The same bytes as the `put_many`'s batch, in 1,000 rows.
    let many_size: usize = server
        .sql("tg", "SELECT octet_length(batch) FROM tg_batches ORDER BY gen DESC LIMIT 1")
        .trim()
        .parse()
        .unwrap();
    let record = many_size / 1000;
    server.sql("tg", "CREATE TABLE floor_many (k text PRIMARY KEY, v bytea NOT NULL)");
    let upsert = client
        .prepare(
            "INSERT INTO floor_many (k, v) SELECT * FROM unnest($1::text[], $2::bytea[])
             ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )
        .unwrap();
    let keys: Vec<String> = (0..1000).map(|j| format!("m{j}")).collect();
    let values: Vec<Vec<u8>> = (0..1000).map(|_| vec![0x5au8; record]).collect();
    g.bench_function("insert_many_1000/raw", |bn| bn.iter(|| client.execute(&upsert, &[&keys, &values]).unwrap()));
    g.sample_size(50);
    // The same one-batch catch-up as `catch_up/1`, on a store of some 10,000 tokens
    // (9,000 added): checked from the verified state, it costs what the batch
    // changes, not the store's size.
    for chunk in 0..9 {
        a.put_many(many(&format!("big{chunk}-"))).unwrap();
    }
    b.sync().unwrap();
    g.bench_function("catch_up/1-of-10k-tokens", |bn| catch_up_one(bn, &a, &b, &mut i));
    g.finish();
    eprintln!("fleet: one put's sealed batch is {size} bytes; a put_many of 1,000's is {many_size}");
}

/// A `put` on `a` (untimed), then `b` catching up with its one batch (timed).
fn catch_up_one(bn: &mut criterion::Bencher<'_>, a: &TokenGuard, b: &TokenGuard, i: &mut u64) {
    bn.iter_custom(|n| {
        let mut spent = Duration::ZERO;
        for _ in 0..n {
            *i += 1;
            a.put("github", &format!("t{}", *i % 64), secret(), PutOptions::default()).unwrap();
            let t = Instant::now();
            b.sync().unwrap();
            spent += t.elapsed();
        }
        spent
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
