//! Three "hosts" — each its own config, its own copy of the store and its own
//! processes — on one fleet log in a real PostgreSQL server (the fixture of
//! `tests/common/postgres.rs`; one host over TCP with TLS), through the CLI, with one shared SoftHSM2 token as
//! the root (a network HSM, simulated: docs/FLEET-DESIGN.md, "Roots across hosts").
//! What a fleet promises, attacked from outside the processes: concurrent writes on
//! every host, a revocation final everywhere, one provider call for nine refreshers,
//! the database going away and coming back, and a log edited in the database.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::endpoint::counting_rotating;
use common::postgres::{PgServer, TestCa};
use common::{TestEnv, code, stderr};

/// The server and three hosts' environments, host 0 the first (it ran `init`).
struct Fleet {
    pg: PgServer,
    hosts: Vec<TestEnv>,
}

impl Fleet {
    /// A server with a database `tg`, on a Unix socket and on loopback with TLS under
    /// a test CA; three hosts whose `[store]` is the fleet's, with `tail` appended to
    /// each config; host 0 made the store, and the others start from a copy of its
    /// file (how a host joins until snapshots exist). Hosts 0 and 1 reach the
    /// database through the socket, host 2 over TCP with TLS (`ca_file` relative to
    /// its config).
    fn new(name: &str, tail: &str) -> Fleet {
        let ca = TestCa::new(&["localhost"]);
        let pg = PgServer::start_tcp(name, Some(&ca));
        pg.sql("postgres", "CREATE DATABASE tg");
        let first = TestEnv::new(name);
        let pw = first.dir.join("pg-password");
        common::write_0600(&pw, pg.password.as_bytes());
        let fleet = format!(
            "backend = \"postgres\"\nurl = \"host={} port={} dbname=tg user={}\"\npassword_source = \"file:{}\"\n\
             fleet_staleness_ms = 0\n",
            pg.socket_dir().display(),
            pg.port,
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
            let mut text = text.replace(&first.store_path.display().to_string(), &store_path.display().to_string());
            if h == 2 {
                std::fs::write(dir.join("db-ca.pem"), &ca.ca_pem).unwrap();
                text = text
                    .replace(&format!("host={} ", pg.socket_dir().display()), "host=localhost ")
                    .replace("fleet_staleness_ms = 0\n", "fleet_staleness_ms = 0\nca_file = \"db-ca.pem\"\n");
            }
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

/// `text` with the line that starts with `start` made to start with `with` instead.
fn with_line_prefixed(text: &str, start: &str, with: &str) -> String {
    text.lines()
        .map(|l| if l.starts_with(start) { format!("{with}{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The config lines of provider `acme` at `url`, with a refresh lease of `lease_secs`.
fn provider(url: &str, lease_secs: u64) -> String {
    format!(
        "\n[providers.acme]\ntoken_url = \"{url}\"\nclient_id = \"fleet\"\ntimeout_ms = 5000\n[refresh]\nlease_secs = \
         {lease_secs}\n"
    )
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
    assert!(f.pg.log_text().contains("SSL enabled"), "host 2 did not use TLS:\n{}", f.pg.log_text());

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

    // A password is never typed at a prompt on a fleet host.
    let host = &f.hosts[1];
    let text = std::fs::read_to_string(&host.config_path).unwrap();
    let prompt = with_line_prefixed(&text, "password_source = ", "password_source = \"prompt\"\n#");
    std::fs::write(&host.config_path, prompt).unwrap();
    let o = host.run(&["get", "github", "h1-1"], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("password_source must be"), "{}", stderr(&o));
    std::fs::write(&host.config_path, text).unwrap();

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
    // Slow enough that every process arrives while the first one holds the lease.
    let (ep, invalid) = counting_rotating(Duration::from_millis(600));
    let tail = provider(&ep.url, 10);
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

/// The database goes away while a host waits for the provider: the answer — a
/// rotated refresh token the provider will not take back — is committed when the
/// database is back (within the lease), not dropped; the next refresh anywhere
/// uses it, with no `invalid_grant`.
#[test]
fn a_refresh_answer_outlives_a_database_restart() {
    let (ep, invalid) = counting_rotating(Duration::from_millis(1500));
    let tail = provider(&ep.url, 20);
    let Fleet { mut pg, hosts } = Fleet::new("fleet-rf-down", &tail);
    let set = r#"{"access_token": "at-0", "refresh_token": "rt-0"}"#;
    ok(&hosts[0].run(&["put", "acme", "svc", "--expires-in", "20s"], set.as_bytes()));
    ok(&hosts[0].run(&["put", "oauth-client", "acme"], b"client-secret"));
    let out = std::thread::scope(|s| {
        let refresher = s.spawn(|| hosts[0].run(&["refresh", "acme", "svc"], b""));
        // Down while the provider answers; back a moment later.
        std::thread::sleep(Duration::from_millis(500));
        pg.stop();
        std::thread::sleep(Duration::from_millis(2000));
        pg.restart();
        refresher.join().unwrap()
    });
    ok(&out);
    assert_eq!(ep.count(), 1);
    let o = hosts[1].run(&["get", "acme", "svc"], b"");
    ok(&o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "at-1");
    ok(&hosts[2].run(&["refresh", "acme", "svc"], b""));
    assert_eq!(ep.count(), 2);
    assert_eq!(invalid.load(Ordering::Relaxed), 0, "the rotated refresh token was lost");
    ok(&hosts[2].run(&["audit", "verify"], b""));
}
