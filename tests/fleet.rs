//! Three "hosts" — each its own config, its own copy of the store and its own
//! processes — on one fleet log in a real PostgreSQL server (the fixture of
//! `tests/common/postgres.rs`), through the CLI, with one shared SoftHSM2 token as
//! the root (a network HSM, simulated: docs/FLEET-DESIGN.md, "Roots across hosts").
//! What a fleet promises, attacked from outside the processes: concurrent writes on
//! every host, a revocation final everywhere, one provider call for nine refreshers,
//! the database going away and coming back, and a log edited in the database.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::endpoint::{Endpoint, Reply, rotating};
use common::postgres::PgServer;
use common::{TestEnv, code, stderr};

/// The server and three hosts' environments, host 0 the first (it ran `init`).
struct Fleet {
    pg: PgServer,
    hosts: Vec<TestEnv>,
}

impl Fleet {
    /// A server with a database `tg`; three hosts whose `[store]` is the fleet's,
    /// with `tail` appended to each config; host 0 made the store, and the others
    /// start from a copy of its file (how a host joins until snapshots exist).
    fn new(name: &str, tail: &str) -> Fleet {
        let pg = PgServer::start(name);
        pg.sql("postgres", "CREATE DATABASE tg");
        let first = TestEnv::new(name);
        let pw = first.dir.join("pg-password");
        common::write_0600(&pw, pg.password.as_bytes());
        let fleet = format!(
            "backend = \"postgres\"\nurl = \"host={} dbname=tg user={}\"\npassword_source = \"file:{}\"\n\
             fleet_staleness_ms = 0\n",
            pg.socket_dir().display(),
            common::postgres::USER,
            pw.display()
        );
        let text = std::fs::read_to_string(&first.config_path)
            .unwrap()
            .replace("busy_timeout_ms = 2000\n", &format!("busy_timeout_ms = 10000\n{fleet}"));
        std::fs::write(&first.config_path, format!("{text}{tail}")).unwrap();
        let o = first.run(&["init"], b"");
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let mut hosts = vec![];
        for h in 1..3 {
            let dir = first.dir.join(format!("host{h}"));
            let store_path = dir.join("store").join("tokens.redb");
            std::fs::create_dir_all(store_path.parent().unwrap()).unwrap();
            std::fs::copy(&first.store_path, &store_path).unwrap();
            let config_path = dir.join("tokenguard.toml");
            let text = std::fs::read_to_string(&first.config_path).unwrap();
            let text = text.replace(&first.store_path.display().to_string(), &store_path.display().to_string());
            std::fs::write(&config_path, text).unwrap();
            hosts.push(TestEnv { dir, key_label: first.key_label.clone(), config_path, store_path });
        }
        hosts.insert(0, first);
        Fleet { pg, hosts }
    }

    fn run(&self, host: usize, args: &[&str], stdin: &[u8]) -> Output {
        self.hosts[host].run(args, stdin)
    }

    /// `get` on `host`: the secret, or the exit code and stderr.
    fn get(&self, host: usize, provider: &str, name: &str) -> Result<String, (i32, String)> {
        let o = self.run(host, &["get", provider, name], b"");
        match code(&o) {
            0 => Ok(String::from_utf8_lossy(&o.stdout).trim_end().to_string()),
            c => Err((c, stderr(&o))),
        }
    }
}

fn ok(o: &Output) {
    assert_eq!(code(o), 0, "{}", stderr(o));
}

#[test]
fn three_hosts_write_at_once_read_everywhere_and_survive_the_database_and_its_administrator() {
    let mut f = Fleet::new("fleet3", "");
    // Every host writes at the same time, from one process after another.
    std::thread::scope(|s| {
        for h in 0..3 {
            let f = &f;
            s.spawn(move || {
                for k in 0..4 {
                    let secret = format!("secret-{h}-{k}");
                    ok(&f.run(h, &["put", "github", &format!("h{h}-{k}")], secret.as_bytes()));
                }
            });
        }
    });
    for reader in 0..3 {
        for h in 0..3 {
            for k in 0..4 {
                assert_eq!(f.get(reader, "github", &format!("h{h}-{k}")).unwrap(), format!("secret-{h}-{k}"));
            }
        }
    }

    // A revocation on one host is final on every host.
    ok(&f.run(1, &["revoke", "github", "h0-0", "--reason", "leaked"], b""));
    assert_eq!(f.get(2, "github", "h0-0").unwrap_err().0, 7);
    assert_eq!(f.get(0, "github", "h0-0").unwrap_err().0, 7);
    for h in 0..3 {
        ok(&f.run(h, &["audit", "verify"], b""));
    }

    // The database goes away: a clear error (exit 12), never the password, nothing
    // written; back, and every host goes on without anything lost.
    f.pg.stop();
    let (c, err) = f.get(2, "github", "h1-1").unwrap_err();
    assert_eq!(c, 12, "{err}");
    assert!(err.contains("database"), "{err}");
    assert!(!err.contains(&f.pg.password), "the password in an error: {err}");
    assert_eq!(code(&f.run(0, &["put", "github", "while-down"], b"lost?")), 12);
    f.pg.restart();
    assert_eq!(f.get(2, "github", "h1-1").unwrap(), "secret-1-1");
    assert_eq!(f.get(1, "github", "while-down").unwrap_err().0, 3, "a failed write reached no host");

    // The log edited in the database: the host that has not read the newest batch
    // refuses it (exit 4) and keeps what it had; the batch put back, it goes on.
    ok(&f.run(0, &["put", "github", "h0-1"], b"rewritten"));
    let top = f.pg.sql("tg", "SELECT max(gen) FROM tg_batches").trim().to_string();
    let saved = f.pg.sql("tg", &format!("SELECT encode(batch, 'hex') FROM tg_batches WHERE gen = {top}"));
    f.pg.sql(
        "tg",
        &format!("UPDATE tg_batches SET batch = set_byte(batch, 50, get_byte(batch, 50) # 1) WHERE gen = {top}"),
    );
    let (c, err) = f.get(2, "github", "h0-1").unwrap_err();
    assert_eq!(c, 4, "{err}");
    f.pg.sql("tg", &format!("UPDATE tg_batches SET batch = decode('{}', 'hex') WHERE gen = {top}", saved.trim()));
    assert_eq!(f.get(2, "github", "h0-1").unwrap(), "rewritten");
    ok(&f.run(2, &["audit", "verify"], b""));

    // The agent does not serve a fleet store yet: refused with a clear error.
    let host = &f.hosts[2];
    let mut text = std::fs::read_to_string(&host.config_path).unwrap();
    text.push_str(&format!("\n[agent]\nsocket = \"{}\"\n", host.dir.join("agent.sock").display()));
    std::fs::write(&host.config_path, text).unwrap();
    let o = host.run(&["serve"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not serve a fleet store"), "{}", stderr(&o));
}

/// Nine refreshers of one due token, three processes on each host, against a
/// provider that rotates refresh tokens strictly: one provider call, every process
/// gets the new token, no `invalid_grant` (the lease is a row of the log, taken by a
/// write that caught up first).
#[test]
fn nine_refreshers_on_three_hosts_call_the_provider_once() {
    let invalid = Arc::new(AtomicUsize::new(0));
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let answer = rotating(valid);
    let inv = invalid.clone();
    let ep = Endpoint::start(Box::new(move |req, n| {
        let r = answer(req, n);
        if r.status == 400 {
            inv.fetch_add(1, Ordering::Relaxed);
        }
        // Slow enough that every process arrives while the first one holds the lease.
        Reply { delay: Duration::from_millis(600), ..r }
    }));
    let tail = format!(
        "\n[providers.acme]\ntoken_url = \"{}\"\nclient_id = \"fleet\"\ntimeout_ms = 5000\n[refresh]\nlease_secs = 10\n",
        ep.url
    );
    let f = Fleet::new("fleet-rf", &tail);
    let set = r#"{"access_token": "at-0", "refresh_token": "rt-0"}"#;
    ok(&f.run(0, &["put", "acme", "svc", "--expires-in", "20s"], set.as_bytes()));
    ok(&f.run(1, &["put", "oauth-client", "acme"], b"client-secret"));
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..9)
            .map(|i| {
                s.spawn({
                    let f = &f;
                    move || f.run(i % 3, &["refresh", "--due"], b"")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs {
        ok(o);
    }
    assert_eq!(ep.count(), 1, "one provider call across the fleet");
    assert_eq!(invalid.load(Ordering::Relaxed), 0);
    for h in 0..3 {
        let o = f.run(h, &["get", "acme", "svc"], b"");
        ok(&o);
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "at-1");
    }
}
