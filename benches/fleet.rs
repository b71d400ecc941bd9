//! The fleet log against a real PostgreSQL server (the test fixture, on a Unix
//! socket), each figure beside its floor in the same run:
//! - `put/redb`: a durable `put` on a store with no log (the single-host figure);
//! - `put/fleet`: the same `put` through `Fleet::write` (the batch inserted into the
//!   log, then the local commit);
//! - `insert/raw`: the floor of the log's part: one autocommit `INSERT` of the same
//!   number of bytes as a `put`'s sealed batch, on the same socket;
//! - `catch_up/1`: a second host applying one such batch (fetch, MAC, apply, the
//!   state verified in full, commit), the writing host's `put` untimed.
#![allow(missing_docs, clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod pg;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenguard::fleet::{Fleet, LogConfig};
use tokenguard::root::RootKey;
use tokenguard::root::soft::SoftRoot;
use tokenguard::secret::SecretBytes;
use tokenguard::store::StoreOptions;
use tokenguard::{GuardOptions, PutOptions, Secret, TokenGuard};

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
    for h in ["plain", "a", "b"] {
        std::fs::copy(&start, dir.path().join(format!("{h}.redb"))).unwrap();
    }
    let open = |h: &str| {
        TokenGuard::open(&dir.path().join(format!("{h}.redb")), StoreOptions::default(), vec![root(dir.path())], opts())
            .unwrap()
    };
    let url = format!("host={} dbname=tg user={}", server.socket_dir().display(), pg::USER);
    let password = SecretBytes::from_slice(server.password.as_bytes());
    let cfg = LogConfig { url: &url, password: Some(&password), timeout: Duration::from_secs(10) };
    let plain = open("plain");
    let a = Fleet::attach(open("a"), &cfg).unwrap();
    let b = Fleet::attach(open("b"), &cfg).unwrap();

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
            a.write(|g| g.put("github", &format!("t{}", i % 64), secret(), PutOptions::default())).unwrap();
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
    g.bench_function("insert/raw", |bn| {
        bn.iter(|| {
            k += 1;
            client.execute("INSERT INTO floor (k, v) VALUES ($1, $2)", &[&k, &bytes]).unwrap();
        })
    });
    b.catch_up().unwrap();
    g.bench_function("catch_up/1", |bn| {
        bn.iter_custom(|n| {
            let mut spent = Duration::ZERO;
            for _ in 0..n {
                i += 1;
                a.write(|g| g.put("github", &format!("t{}", i % 64), secret(), PutOptions::default())).unwrap();
                let t = Instant::now();
                b.catch_up().unwrap();
                spent += t.elapsed();
            }
            spent
        })
    });
    g.finish();
    eprintln!("fleet: one put's sealed batch is {size} bytes");
}

criterion_group!(benches, bench);
criterion_main!(benches);
