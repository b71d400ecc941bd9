//! Three "hosts" — each its own config, its own copy of the store and its own
//! processes — on one fleet log in a real PostgreSQL server (the fixture of
//! `tests/common/postgres.rs`; one host over TCP with TLS), through the CLI, with one shared SoftHSM2 token as
//! the root (a network HSM, simulated: docs/FLEET-DESIGN.md, "Roots across hosts").
//! What a fleet promises, attacked from outside the processes: concurrent writes on
//! every host, a revocation final everywhere, one provider call for nine refreshers
//! and for two `refresh --watch` processes (each with a notification listener),
//! the database going away and coming back, a log edited in the database, a host
//! killed in a refresh, and processes on every host killed at random moments.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::endpoint::{Endpoint, Reply, counting_rotating, rotating};
use common::postgres::{PgServer, TestCa};
use common::{TestEnv, code, stderr};

/// The server and three hosts' environments, host 0 the first (it ran `init`).
struct Fleet {
    pg: PgServer,
    hosts: Vec<TestEnv>,
    /// The SoftHSM2 token of this fleet alone, when a test kills its processes.
    hsm: Option<std::path::PathBuf>,
}

impl Fleet {
    /// A server with a database `tg`, on a Unix socket and on loopback with TLS under
    /// a test CA; three hosts whose `[store]` is the fleet's, with `tail` appended to
    /// each config; host 0 made the store, and the others start from a copy of its
    /// file (how a host joins until snapshots exist). Hosts 0 and 1 reach the
    /// database through the socket, host 2 over TCP with TLS (`ca_file` relative to
    /// its config).
    fn new(name: &str, tail: &str) -> Fleet {
        Self::make(name, tail, false)
    }

    /// As [`Fleet::new`], with a SoftHSM2 token of the fleet's own (`common::own_token`):
    /// for tests that SIGKILL processes at moments that can fall in a login.
    fn with_own_token(name: &str, tail: &str) -> Fleet {
        Self::make(name, tail, true)
    }

    fn make(name: &str, tail: &str, own_token: bool) -> Fleet {
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
        std::fs::write(&first.config_path, text).unwrap();
        let hsm = own_token.then(|| common::own_token(&first));
        let text = std::fs::read_to_string(&first.config_path).unwrap();
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
        Fleet { pg, hosts, hsm }
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
    // doctor on a fleet host: the log reached, no listener in a one-shot command,
    // the server's notification queue.
    let o = f.run(0, &["doctor"], b"");
    ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("fleet log") && said.contains("log's newest") && said.contains("notification queue"),
        "{said}"
    );
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

    // A host's copy opened without its log (a configuration that says redb): it
    // reads nothing (a revocation it has not seen would be served) and writes
    // nothing (the fleet would never see it); refused with what to do instead.
    let host = &f.hosts[1];
    let text = std::fs::read_to_string(&host.config_path).unwrap();
    let lone: String = text
        .lines()
        .filter(|l| {
            !["backend = \"postgres\"", "url = ", "password_source = ", "fleet_staleness_ms"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&host.config_path, lone).unwrap();
    for (args, stdin) in [(&["get", "github", "h1-1"][..], &b""[..]), (&["put", "github", "lone"][..], &b"x"[..])] {
        let o = host.run(args, stdin);
        assert_eq!(code(&o), 8, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("fleet host's copy") && stderr(&o).contains("migrate"), "{}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    std::fs::write(&host.config_path, text).unwrap();
    assert_eq!(f.get(1, "github", "h1-1").unwrap(), "secret-1-1", "the copy goes on with its log");
    for h in 0..3 {
        assert_eq!(f.get(h, "github", "lone").unwrap_err().0, 3, "the refused put reached host {h}");
    }

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

/// `refresh --watch` on two hosts, each a long-running process with a notification
/// listener: a token put on a third host is refreshed once across the fleet, every
/// host reads the new token, and both watchers stop cleanly on SIGTERM.
#[test]
fn watchers_on_two_hosts_listen_and_refresh_a_token_once() {
    let (ep, invalid) = counting_rotating(Duration::from_millis(200));
    let f = Fleet::new("fleet-watch", &provider(&ep.url, 10));
    // A bound the listener can vouch within (a zero bound keeps no listener).
    for h in &f.hosts {
        let text = std::fs::read_to_string(&h.config_path).unwrap();
        std::fs::write(&h.config_path, text.replace("fleet_staleness_ms = 0\n", "fleet_staleness_ms = 3000\n"))
            .unwrap();
    }
    ok(&f.run(0, &["put", "oauth-client", "acme"], b"client-secret"));
    let listeners = || {
        f.pg.sql("tg", "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tokenguard-listen'")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(listeners(), 0, "one-shot commands keep no listener");
    let mut watchers: Vec<_> = (1..3)
        .map(|h| {
            f.hosts[h]
                .cli()
                .args(["refresh", "--watch", "--interval", "1s"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let t = Instant::now();
    while listeners() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "the watchers did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let set = r#"{"access_token": "at-0", "refresh_token": "rt-0"}"#;
    ok(&f.run(0, &["put", "acme", "svc", "--expires-in", "20s"], set.as_bytes()));
    while ep.count() < 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "no watcher refreshed the token");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both watchers scan again (once a second) and find nothing due.
    std::thread::sleep(Duration::from_millis(2500));
    for w in &watchers {
        let status = std::process::Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
    for w in &mut watchers {
        let st = w.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(st.code(), Some(0), "{err}");
        assert!(!err.contains("panicked") && !err.contains("rt-") && !err.contains("client-secret"), "{err}");
    }
    assert_eq!(ep.count(), 1, "one provider call across the fleet");
    assert_eq!(invalid.load(Ordering::Relaxed), 0);
    for h in 0..3 {
        assert_eq!(f.get(h, "acme", "svc").unwrap(), "at-1", "host {h}");
    }
}

/// The database goes away while a host waits for the provider: the answer — a
/// rotated refresh token the provider will not take back — is committed when the
/// database is back (within the lease), not dropped; the next refresh anywhere
/// uses it, with no `invalid_grant`.
#[test]
fn a_refresh_answer_outlives_a_database_restart() {
    let (ep, invalid) = counting_rotating(Duration::from_millis(1500));
    // A commit is tried again only while it can end within the lease's 80 %: with
    // the fixture's 10 s busy timeout (the copy's locks, then the log's lock),
    // from 1.5 s to 12 s.
    let tail = provider(&ep.url, 40);
    let Fleet { mut pg, hosts, .. } = Fleet::new("fleet-rf-down", &tail);
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

/// A host SIGKILLed while it holds the refresh lease and waits for the provider: no
/// other host calls the provider while that lease holds (the killed host's request
/// may still be answered, and a second call would spend the refresh token twice);
/// once it has run out, another host takes over, and every host reads its answer.
#[test]
fn a_host_killed_mid_refresh_is_taken_over_after_its_lease() {
    let lease = Duration::from_secs(3);
    let valid = Arc::new(Mutex::new("rt-0".to_string()));
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let answer = rotating(valid);
    let seen = arrivals.clone();
    // The first request never gets an answer in time (its host dies waiting) and
    // changes nothing at the provider; the ones after it are answered at once.
    let ep = Endpoint::start(Box::new(move |req, n| {
        seen.lock().unwrap().push(Instant::now());
        if n == 1 {
            return Reply { delay: Duration::from_secs(30), ..Reply::json(503, serde_json::json!({})) };
        }
        answer(req, n)
    }));
    let f = Fleet::with_own_token("fleet-kill-rf", &provider(&ep.url, lease.as_secs()));
    let set = r#"{"access_token": "at-0", "refresh_token": "rt-0"}"#;
    ok(&f.run(0, &["put", "acme", "svc", "--expires-in", "1h"], set.as_bytes()));
    ok(&f.run(0, &["put", "oauth-client", "acme"], b"client-secret"));

    let spawned = Instant::now();
    let mut child = f.hosts[0]
        .cli()
        .args(["refresh", "acme", "svc"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waited = Instant::now();
    while ep.count() == 0 {
        assert!(waited.elapsed() < Duration::from_secs(20), "the first refresher never reached the provider");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Killed in the provider call: after its login, so the shared token is safe.
    child.kill().unwrap();
    child.wait().unwrap();

    // Two hosts at once: each waits out the dead host's lease, one calls the provider.
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs = [1, 2].map(|h| {
            s.spawn({
                let f = &f;
                move || f.run(h, &["refresh", "acme", "svc"], b"")
            })
        });
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs {
        ok(o);
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2, "one takeover call after the dead host's: {arrivals:?}");
    // The lease was taken after the dead host started, and lasts `lease` from then
    // in the clock's whole seconds (so at least `lease` less one second): the
    // takeover's call cannot have arrived before.
    assert!(
        arrivals[1] - spawned >= lease - Duration::from_millis(1100),
        "a host called the provider while the dead host's lease held: {:?} after it started",
        arrivals[1] - spawned
    );
    for h in 0..3 {
        let o = f.run(h, &["get", "acme", "svc"], b"");
        ok(&o);
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "at-2");
        ok(&f.run(h, &["audit", "verify"], b""));
    }
}

/// CLI processes on every host SIGKILLed at random moments — in start-up, in the
/// login, in the catch-up, between the log's commit and the copy's — round after
/// round: every acknowledged write is read on every host, a write killed after its
/// batch reached the log is read on every host too (the killed host's copy
/// included), the hosts never disagree, and every host's audit chain verifies.
#[test]
fn hosts_killed_at_random_moments_lose_nothing_and_never_disagree() {
    let f = Fleet::with_own_token("fleet-kill", "");
    let hsm = f.hsm.clone().unwrap();
    // Kill moments spread over a whole `put` on this machine (start-up included),
    // measured first; the seed is printed, and TG_FLEET_KILL_SEED replays a run.
    let t = Instant::now();
    std::thread::scope(|sc| {
        for h in 0..3 {
            let f = &f;
            sc.spawn(move || ok(&f.run(h, &["put", "github", &format!("timing-{h}")], b"t")));
        }
    });
    // Three at once, as in the rounds: the slowest of them, and half again.
    let mut span = u64::try_from(t.elapsed().as_millis()).unwrap().max(20) * 3 / 2;
    let mut seed = std::env::var("TG_FLEET_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id()));
    eprintln!("kill moments within {span} ms, seed {seed} (TG_FLEET_KILL_SEED replays it)");
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    // (name, value, acknowledged)
    let mut written: Vec<(String, String, bool)> = vec![];
    for round in 0..10 {
        let mut children = vec![];
        for h in 0..3 {
            let (name, value) = (format!("r{round}-h{h}"), format!("v{round}-{h}"));
            let mut child = f.hosts[h]
                .cli()
                .args(["put", "github", &name])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(value.as_bytes());
            children.push((child, name, value, Duration::from_millis(next(span))));
        }
        let start = Instant::now();
        for (mut child, name, value, at) in children {
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            let acked = match child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "round {round}: put {name} failed unkilled: {status}");
                    true
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    false
                }
            };
            written.push((name, value, acked));
        }
        // The machine's pace changes under a parallel test run: a round whose three
        // writes all finished narrows the window, and one where none did widens it.
        match written.iter().rev().take(3).filter(|w| w.2).count() {
            0 => span = span * 3 / 2,
            3 => span = (span * 2 / 3).max(10),
            _ => {}
        }
        common::repair_if_emptied(&hsm, &format!("round {round}"));
        for h in 0..3 {
            ok(&f.run(h, &["audit", "verify"], b""));
        }
    }
    let mut landed = 0;
    for (name, value, acked) in &written {
        let seen: Vec<_> = (0..3).map(|h| f.get(h, "github", name)).collect();
        match &seen[0] {
            Ok(v) => {
                assert_eq!(v, value);
                landed += usize::from(!acked);
            }
            Err((3, _)) => assert!(!acked, "{name}: acknowledged, then lost"),
            Err(e) => panic!("{name}: {e:?}"),
        }
        assert!(seen.iter().all(|s| s == &seen[0]), "{name}: the hosts disagree: {seen:?}");
    }
    let acked = written.iter().filter(|w| w.2).count();
    eprintln!("{} writes: {acked} acknowledged, {landed} killed but in the log", written.len());
    assert!(acked > 0 && acked < written.len(), "the kills missed every moment that matters: {acked} acknowledged");
}

/// `env`'s config made into one whose `[store]` is at `store` (a new path), with
/// `store_lines` added to it (a fleet's backend lines, or nothing for redb).
fn config_at(env: &TestEnv, name: &str, store: &std::path::Path, store_lines: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text = text.replace(&env.store_path.display().to_string(), &store.display().to_string());
    let text = text.replace("busy_timeout_ms = 2000\n", &format!("busy_timeout_ms = 10000\n{store_lines}"));
    let path = env.dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A redb store moves into a fleet and a fleet host's copy moves back out, with
/// `migrate`: every kind of record arrives (raw secrets, token sets, a revocation,
/// a shredded provider) and the audit chains verify on both sides; a second host
/// joins the migrated store. Refused, with nothing left behind: a destination that
/// exists, a database that already holds the store's log, roots that cannot open
/// it, and a source whose file was edited.
#[test]
fn a_store_migrates_into_a_fleet_and_back_out_with_every_record_opened() {
    let pg = PgServer::start("fleet-migrate");
    pg.sql("postgres", "CREATE DATABASE tg");
    let solo = TestEnv::new("migrate");
    ok(&solo.run(&["init"], b""));
    ok(&solo.run(&["put", "github", "ci-bot"], b"ghp-raw"));
    ok(&solo
        .run(&["put", "acme", "svc", "--expires-in", "1h"], br#"{"access_token": "at-0", "refresh_token": "rt-0"}"#));
    ok(&solo.run(&["put", "github", "leaked"], b"gone"));
    ok(&solo.run(&["revoke", "github", "leaked", "--reason", "leaked"], b""));
    ok(&solo.run(&["put", "slack", "bot"], b"xoxb"));
    ok(&solo.run(&["shred", "slack", "--yes"], b""));

    let pw = solo.dir.join("pg-password");
    common::write_0600(&pw, pg.password.as_bytes());
    let fleet_lines = format!(
        "backend = \"postgres\"\nurl = \"host={} dbname=tg user={}\"\npassword_source = \"file:{}\"\nfleet_staleness_ms = 0\n",
        pg.socket_dir().display(),
        common::postgres::USER,
        pw.display()
    );
    let host_a_store = solo.dir.join("a").join("tokens.redb");
    std::fs::create_dir_all(host_a_store.parent().unwrap()).unwrap();
    let host_a_cfg = config_at(&solo, "host-a.toml", &host_a_store, &fleet_lines);
    let host = |config_path: std::path::PathBuf, store_path: std::path::PathBuf| TestEnv {
        dir: solo.dir.clone(),
        key_label: solo.key_label.clone(),
        config_path,
        store_path,
    };

    // A source whose file was edited is refused before anything is made.
    let saved = std::fs::read(&solo.store_path).unwrap();
    {
        use redb::TableDefinition;
        const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
        let db = common::raw_db(&solo.store_path);
        let w = db.begin_write().unwrap();
        w.open_table(TOKENS).unwrap().remove(("github", "ci-bot")).unwrap();
        w.commit().unwrap();
    }
    let o = solo.run(&["migrate", "--to", host_a_cfg.to_str().unwrap()], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(!host_a_store.exists(), "an edited store was copied");
    assert_eq!(pg.sql("tg", "SELECT count(*) FROM pg_tables WHERE tablename = 'tg_store'").trim(), "0");
    std::fs::write(&solo.store_path, &saved).unwrap();

    // Roots that cannot open the store (another store's root key): refused,
    // nothing made.
    let other = TestEnv::new("migrate-other");
    ok(&other.run(&["init"], b""));
    let wrong = config_at(&solo, "wrong-root.toml", &host_a_store, &fleet_lines);
    let text = std::fs::read_to_string(&wrong).unwrap().replace(&solo.key_label, &other.key_label);
    std::fs::write(&wrong, text).unwrap();
    let o = solo.run(&["migrate", "--to", wrong.to_str().unwrap()], b"");
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong root key"), "{}", stderr(&o));
    assert!(!host_a_store.exists());

    // A fleet destination with a rollback counter: refused by its configuration,
    // before any counter is bound or any table made.
    let counted = config_at(&solo, "counted.toml", &host_a_store, &fleet_lines);
    let text = std::fs::read_to_string(&counted).unwrap();
    let text = text.replace("[roots.env]", "counter_label = \"fleet-counter\"\n[roots.env]");
    std::fs::write(&counted, text).unwrap();
    let o = solo.run(&["migrate", "--to", counted.to_str().unwrap()], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("rollback counter"), "{}", stderr(&o));
    assert!(!host_a_store.exists());
    assert_eq!(pg.sql("tg", "SELECT count(*) FROM pg_tables WHERE tablename = 'tg_store'").trim(), "0");

    // Into the fleet.
    let o = solo.run(&["migrate", "--to", host_a_cfg.to_str().unwrap()], b"");
    ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("migrated 3 tokens") && said.contains("all 2 records open there"), "{said}");
    let a = host(host_a_cfg.clone(), host_a_store.clone());
    let read = |env: &TestEnv, p: &str, n: &str| {
        let o = env.run(&["get", p, n], b"");
        (code(&o), String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    assert_eq!(read(&a, "github", "ci-bot"), (0, "ghp-raw".into()));
    assert_eq!(read(&a, "acme", "svc"), (0, "at-0".into()));
    assert_eq!(read(&a, "github", "leaked").0, 7, "a revocation survives the move");
    assert_eq!(read(&a, "slack", "bot").0, read(&solo, "slack", "bot").0, "shredded stays shredded");
    ok(&a.run(&["audit", "verify"], b""));
    ok(&solo.run(&["audit", "verify"], b""));
    let trail = String::from_utf8_lossy(&solo.run(&["audit", "list"], b"").stdout).to_string();
    assert!(trail.contains("migrate"), "the source's trail says where it went: {trail}");

    // A second host joins from a copy of the first's file; writes cross both ways.
    let host_b_store = solo.dir.join("b").join("tokens.redb");
    std::fs::create_dir_all(host_b_store.parent().unwrap()).unwrap();
    std::fs::copy(&host_a_store, &host_b_store).unwrap();
    let b = host(config_at(&solo, "host-b.toml", &host_b_store, &fleet_lines), host_b_store.clone());
    ok(&b.run(&["put", "jira", "ops"], b"jira-b"));
    assert_eq!(read(&a, "jira", "ops"), (0, "jira-b".into()));
    assert_eq!(read(&b, "github", "ci-bot"), (0, "ghp-raw".into()));

    // The same store into the same database again: a second branch beside the log.
    let again_store = solo.dir.join("again.redb");
    let again = config_at(&solo, "again.toml", &again_store, &fleet_lines);
    let o = solo.run(&["migrate", "--to", again.to_str().unwrap()], b"");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("already holds this store's log"), "{}", stderr(&o));
    assert!(!again_store.exists(), "the refused copy stayed behind");
    // Onto an existing store.
    let o = solo.run(&["migrate", "--to", host_a_cfg.to_str().unwrap()], b"");
    assert_eq!(code(&o), 1, "{}", stderr(&o));

    // Back out of the fleet, from host B's copy: host A's newest write included.
    ok(&a.run(&["put", "github", "ci-bot"], b"ghp-rotated"));
    let out_store = solo.dir.join("out").join("tokens.redb");
    std::fs::create_dir_all(out_store.parent().unwrap()).unwrap();
    let out = host(config_at(&solo, "out.toml", &out_store, ""), out_store.clone());
    let o = b.run(&["migrate", "--to", out.config_path.to_str().unwrap()], b"");
    ok(&o);
    assert_eq!(read(&out, "github", "ci-bot"), (0, "ghp-rotated".into()));
    assert_eq!(read(&out, "jira", "ops"), (0, "jira-b".into()));
    assert_eq!(read(&out, "github", "leaked").0, 7);
    ok(&out.run(&["audit", "verify"], b""));
    ok(&b.run(&["audit", "verify"], b""));

    // Host B's configuration pointed at a database without the fleet's log (a wrong
    // url, a rebuilt server): refused, and no second log is started there.
    pg.sql("postgres", "CREATE DATABASE tg_empty");
    let elsewhere =
        config_at(&solo, "elsewhere.toml", &host_b_store, &fleet_lines.replace("dbname=tg ", "dbname=tg_empty "));
    let o = tokenguard(&elsewhere, &["get", "github", "ci-bot"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("followed another log"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(pg.sql("tg_empty", "SELECT count(*) FROM tg_store").trim(), "0", "a second log was started");

    // The fleet's database lost: the fleet configuration cannot open the copy (exit
    // 12), a redb one will not read it (exit 8); `migrate --unjoined-copy` takes
    // it out, saying what it may lack.
    let mut pg = pg;
    pg.stop();
    assert_eq!(code(&b.run(&["get", "github", "ci-bot"], b"")), 12);
    let lone_b = host(config_at(&solo, "lone-b.toml", &host_b_store, ""), host_b_store.clone());
    assert_eq!(code(&lone_b.run(&["get", "github", "ci-bot"], b"")), 8);
    let rescue_store = solo.dir.join("rescue").join("tokens.redb");
    std::fs::create_dir_all(rescue_store.parent().unwrap()).unwrap();
    let rescue = host(config_at(&solo, "rescue.toml", &rescue_store, ""), rescue_store.clone());
    let o = lone_b.run(&["migrate", "--to", rescue.config_path.to_str().unwrap()], b"");
    assert_eq!(code(&o), 8, "without --unjoined-copy: {}", stderr(&o));
    assert!(!rescue_store.exists());
    let o = lone_b.run(&["migrate", "--unjoined-copy", "--to", rescue.config_path.to_str().unwrap()], b"");
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("may lack the fleet's newest writes"));
    assert_eq!(read(&rescue, "jira", "ops"), (0, "jira-b".into()));
    ok(&rescue.run(&["audit", "verify"], b""));
    let trail = String::from_utf8_lossy(&rescue.run(&["audit", "list"], b"").stdout).to_string();
    assert!(trail.contains("unjoined fleet copy"), "{trail}");
    // Not a fleet copy: the flag is refused.
    let again = config_at(&solo, "rescue-again.toml", &solo.dir.join("rescue-again.redb"), "");
    let o = rescue.run(&["migrate", "--unjoined-copy", "--to", again.to_str().unwrap()], b"");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a fleet host's copy"), "{}", stderr(&o));
}

/// The CLI with the configuration at `config`.
fn tokenguard(config: &std::path::Path, args: &[&str]) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tokenguard"));
    c.env("TOKENGUARD_CONFIG", config).env_remove("RUST_LOG");
    common::run_cmd(c.args(args), b"")
}

/// Per-host roots: a host whose own root (here its own key; its own HSM or TPM in
/// production) is enrolled with `root add` by a host that already has access, and
/// which then starts from a copy of the store file made after the enrolment, reads
/// and writes with that root alone — except what must wrap a key for every pinned
/// root (a provider's first data key, a roots change), which it refuses with the
/// missing root named and an admin host holding every root does. Removing its root
/// rotates the keys: it reads nothing after that, not even from a fresh copy of the
/// file, while the other hosts go on.
#[test]
fn a_host_with_its_own_root_joins_and_its_removal_locks_it_out() {
    let f = Fleet::new("fleet-roots", "");
    ok(&f.run(0, &["put", "github", "before"], b"ghp-before"));
    let shared = f.hosts[0].key_label.clone();
    let own_label = format!("{shared}-host1");
    let host0 = std::fs::read_to_string(&f.hosts[0].config_path).unwrap();
    let root_entry = host0[host0.find("[[roots]]").unwrap()..].to_string();
    let own_root = root_entry.replace(&shared, &own_label);
    let root_file = f.hosts[1].dir.join("own-root.toml");
    std::fs::write(&root_file, &own_root).unwrap();
    // Enrolled from host 0 (the key is made in the token): through the log. Host 0
    // is the admin host from then on: it names both roots.
    ok(&f.run(0, &["root", "add", "--root-config", root_file.to_str().unwrap()], b""));
    std::fs::write(&f.hosts[0].config_path, format!("{host0}{own_root}")).unwrap();

    // Host 1's configuration names its own root only, and it starts from a copy of
    // the store file made after the enrolment.
    let h1 = &f.hosts[1];
    let text = std::fs::read_to_string(&h1.config_path).unwrap();
    std::fs::write(&h1.config_path, format!("{}{own_root}", &text[..text.find("[[roots]]").unwrap()])).unwrap();
    std::fs::copy(&f.hosts[0].store_path, &h1.store_path).unwrap();
    assert_eq!(f.get(1, "github", "before").unwrap(), "ghp-before");
    ok(&f.run(1, &["put", "github", "from-host1"], b"ghp-1"));
    assert_eq!(f.get(2, "github", "from-host1").unwrap(), "ghp-1");
    // A provider's first data key must be wrapped for every pinned root: refused
    // here, with the missing root named; the admin host makes it.
    let o = f.run(1, &["put", "slack", "bot"], b"xoxb");
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("needs every pinned root") && stderr(&o).contains(&shared), "{}", stderr(&o));
    ok(&f.run(0, &["put", "slack", "first"], b"xoxb-0"));
    ok(&f.run(1, &["put", "slack", "bot"], b"xoxb"));
    assert_eq!(f.get(2, "slack", "bot").unwrap(), "xoxb");

    // Removed (from the admin host): every key rotates, and host 1 reads nothing.
    let roots: serde_json::Value = serde_json::from_slice(&f.run(0, &["--json", "root", "list"], b"").stdout).unwrap();
    let id = roots
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["description"].as_str().unwrap().contains(&own_label))
        .map(|r| r["root_id"].to_string())
        .unwrap();
    ok(&f.run(0, &["root", "remove", &id], b""));
    ok(&f.run(2, &["put", "github", "after"], b"ghp-after"));
    for (name, secret) in [("before", "ghp-before"), ("after", "ghp-after"), ("from-host1", "ghp-1")] {
        let o = f.run(1, &["get", "github", name], b"");
        assert_eq!(code(&o), 4, "host 1 after its root was removed, {name}: {}", stderr(&o));
        assert!(!String::from_utf8_lossy(&o.stdout).contains(secret));
    }
    std::fs::copy(&f.hosts[0].store_path, &h1.store_path).unwrap();
    let o = f.run(1, &["get", "github", "after"], b"");
    assert_eq!(code(&o), 4, "a fresh copy opened with the removed root: {}", stderr(&o));
    assert!(stderr(&o).contains("wrong root key"), "{}", stderr(&o));
    for h in [0, 2] {
        assert_eq!(f.get(h, "github", "after").unwrap(), "ghp-after");
        assert_eq!(f.get(h, "slack", "bot").unwrap(), "xoxb");
        ok(&f.run(h, &["audit", "verify"], b""));
    }
}
