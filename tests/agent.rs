//! The agent as its clients and its attackers meet it: a real `tokenguard serve`
//! process on a real SoftHSM2 token, clients running as other uids (`setpriv`), bad
//! frames, floods, kills, lockdown, and the CLI through it.
#![allow(clippy::unwrap_used, clippy::unwrap_in_result, clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestEnv, code, run_cmd, stderr};

/// The uid and gid the "other user" clients run as (nobody/nogroup on Debian), and a
/// uid no rule names.
const CLIENT: u32 = 65534;
const STRANGER: u32 = 4242;

/// A store with an agent serving it.
struct Agent {
    env: TestEnv,
    /// A config for clients: world-readable, naming only the socket.
    client_config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// A store (with `tokens` put directly), then `[agent]` with `settings` and
    /// `rules` appended to its config, and the agent started.
    fn start(name: &str, settings: &str, rules: &str, tokens: &[(&str, &str)]) -> Agent {
        let mut a = Agent::prepare(name, settings, rules, tokens);
        a.spawn();
        a
    }

    /// As `start`, without starting the agent.
    fn prepare(name: &str, settings: &str, rules: &str, tokens: &[(&str, &str)]) -> Agent {
        Agent::prepare_in(TestEnv::new(name), settings, rules, tokens)
    }

    /// As `prepare`, on a SoftHSM2 token of the agent's own ([`common::own_token`]).
    fn prepare_own_token(name: &str, settings: &str, rules: &str, tokens: &[(&str, &str)]) -> (Agent, PathBuf) {
        let env = TestEnv::new(name);
        let hsm = common::own_token(&env);
        (Agent::prepare_in(env, settings, rules, tokens), hsm)
    }

    fn prepare_in(env: TestEnv, settings: &str, rules: &str, tokens: &[(&str, &str)]) -> Agent {
        assert_eq!(code(&env.run(&["init"], b"")), 0);
        for (t, v) in tokens {
            let o = env.run(&["put", t], v.as_bytes());
            assert_eq!(code(&o), 0, "{}", stderr(&o));
        }
        // The socket lives where other uids can reach it: its own directory, 0755,
        // the socket itself in group nogroup.
        let sock_dir = env.dir.join("run");
        std::fs::create_dir(&sock_dir).unwrap();
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&env.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let socket = sock_dir.join("agent.sock");
        let agent =
            format!("\n[agent]\nsocket = \"{}\"\nsocket_group = \"nogroup\"\n{settings}\n{rules}\n", socket.display());
        let mut text = std::fs::read_to_string(&env.config_path).unwrap();
        text.push_str(&agent);
        std::fs::write(&env.config_path, &text).unwrap();
        let client_config = sock_dir.join("client.toml");
        std::fs::write(&client_config, format!("[store]\npath = \"/nonexistent\"\n{agent}")).unwrap();
        std::fs::set_permissions(&client_config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = env.dir.join("agent.log");
        Agent { env, client_config, socket, log, child: None }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = self
            .env
            .cli()
            .arg("serve")
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if self.ping().is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent exited with {status} at start:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the agent did not answer within 20 s:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ping(&self) -> std::io::Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        request(&mut s, &serde_json::json!({"v": 1, "op": "ping"}))
    }

    /// The CLI as `uid` (gid nogroup, no other groups), through the agent.
    fn cli_as(&self, uid: u32, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let uid = uid.to_string();
        let gid = CLIENT.to_string();
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &uid, "--regid", &gid, "--clear-groups", env!("CARGO_BIN_EXE_tokenguard")])
            .args(args)
            .env("TOKENGUARD_CONFIG", &self.client_config)
            .env_remove("RUST_LOG");
        run_cmd(&mut c, stdin)
    }

    /// The CLI as root with the full config (through the agent unless `--direct`).
    fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        self.env.run(args, stdin)
    }

    /// SIGTERM, and wait for the exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGTERM);
        wait_for(&mut child, Duration::from_secs(20))
    }

    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(&child, libc::SIGKILL);
        wait_for(&mut child, Duration::from_secs(20));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill sends a signal to our own child; it touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, sig)
    };
}

fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < until, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request, one response, on a raw connection.
fn request(s: &mut UnixStream, v: &serde_json::Value) -> std::io::Result<serde_json::Value> {
    let body = serde_json::to_vec(v).unwrap();
    send_frame(s, &body)?;
    read_response(s)
}

fn send_frame(s: &mut UnixStream, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&(body.len() as u32).to_be_bytes())?;
    s.write_all(body)
}

fn read_response(s: &mut UnixStream) -> std::io::Result<serde_json::Value> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body).unwrap())
}

fn audit_events(a: &Agent) -> Vec<serde_json::Value> {
    let o = a.cli(&["--direct", "audit", "list", "--json"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

fn has_event(events: &[serde_json::Value], op: &str, outcome: &str, actor_part: &str) -> bool {
    events
        .iter()
        .any(|e| e["op"] == op && e["outcome"] == outcome && e["actor"].as_str().unwrap_or("").contains(actor_part))
}

const ADMIN_RULE: &str = "[[agent.allow]]\nuid = 0\ntokens = [\"*/*\"]\nops = [\"get\", \"get_fresh\", \"list\", \"status\", \"put\", \"delete\", \"revoke\", \"refresh\", \"admin\"]\n";

#[test]
fn each_caller_gets_what_its_rule_allows_and_every_outcome_is_audited() {
    let rules = format!(
        "{ADMIN_RULE}[[agent.allow]]\nuser = \"nobody\"\ntokens = [\"stripe/*\"]\nops = [\"get\", \"list\"]\nrate = \"2/s\"\n"
    );
    let mut a = Agent::start(
        "agent-policy",
        "",
        &rules,
        &[("stripe/live", "sk_live_abc123"), ("github/ci-bot", "ghp_secret456")],
    );
    // Allowed provider: served, through the agent, with no PIN and no store access.
    let o = a.cli_as(CLIENT, &["get", "stripe/live"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(o.stdout, b"sk_live_abc123");
    // Disallowed provider, disallowed op: refused (9).
    let o = a.cli_as(CLIENT, &["get", "github/ci-bot"], b"");
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ghp_"), "a refused read printed something");
    let o = a.cli_as(CLIENT, &["put", "stripe/new"], b"x");
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    // `list` shows only what the caller may see.
    std::thread::sleep(Duration::from_millis(1100));
    let o = a.cli_as(CLIENT, &["list"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("stripe/live") && !out.contains("github"), "{out}");
    // With only TOKENGUARD_SOCKET (no configuration file at all), the same.
    let uid = CLIENT.to_string();
    let o = run_cmd(
        Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups", env!("CARGO_BIN_EXE_tokenguard"), "get"])
            .arg("stripe/live")
            .env_remove("TOKENGUARD_CONFIG")
            .env("HOME", "/nonexistent")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .env("TOKENGUARD_SOCKET", &a.socket),
        b"",
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(o.stdout, b"sk_live_abc123");
    // Outside the policy: refused.
    let o = a.cli_as(STRANGER, &["get", "stripe/live"], b"");
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    // Over its rate (2/s, burst 4): limited (10), with a retry hint.
    let mut limited = false;
    for _ in 0..20 {
        let o = a.cli_as(CLIENT, &["get", "stripe/live"], b"");
        match code(&o) {
            0 => {}
            10 => {
                limited = true;
                assert!(stderr(&o).contains("retry"), "{}", stderr(&o));
                break;
            }
            c => panic!("exit {c}: {}", stderr(&o)),
        }
    }
    assert!(limited, "20 gets in a row were never rate limited at 2/s");
    assert!(a.stop().success(), "{}", a.log_text());
    let events = audit_events(&a);
    let me = format!("uid={CLIENT}");
    let stranger = format!("uid={STRANGER}");
    assert!(has_event(&events, "agent-get", "ok", &me), "{events:#?}");
    assert!(has_event(&events, "agent-get", "refused", &me), "{events:#?}");
    assert!(has_event(&events, "agent-put", "refused", &me), "{events:#?}");
    assert!(has_event(&events, "agent-get", "refused", &stranger), "{events:#?}");
    assert!(has_event(&events, "agent-get", "rate-limited", &me), "{events:#?}");
    // The executable is named where /proc shows it.
    assert!(events.iter().any(|e| e["actor"].as_str().unwrap_or("").contains("exe=")), "{events:#?}");
    let o = a.cli(&["--direct", "audit", "verify"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn bad_clients_never_stop_the_agent_from_serving_others() {
    let settings = "max_connections = 64\nrequest_timeout_ms = 500\n";
    let a = Agent::start("agent-bad", settings, ADMIN_RULE, &[("p/t", "secret-value-789")]);
    // Not JSON: an error frame, and the connection goes on.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send_frame(&mut s, b"{not json").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["kind"], "invalid");
    let r = request(&mut s, &serde_json::json!({"v": 1, "op": "get", "provider": "p", "name": "t"})).unwrap();
    assert_eq!(r["result"]["value"], "secret-value-789");
    // Pipelined: three requests in one write, a large one between two small ones,
    // and the last split in two writes; three answers, in order.
    let frame = |v: serde_json::Value| {
        let body = serde_json::to_vec(&v).unwrap();
        let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    };
    let mut wire = frame(serde_json::json!({"v": 1, "id": 11, "op": "get", "provider": "p", "name": "t"}));
    let padding = "x".repeat(40_000);
    wire.extend(frame(serde_json::json!({"v": 1, "id": 12, "op": "ping", "padding": padding})));
    wire.extend(frame(serde_json::json!({"v": 1, "id": 13, "op": "get", "provider": "p", "name": "t"})));
    let (first, last) = wire.split_at(wire.len() - 5);
    s.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(last).unwrap();
    for id in [11, 12, 13] {
        let r = read_response(&mut s).unwrap();
        assert_eq!(r["id"], id, "{r}");
        assert_eq!(r["ok"], true, "{r}");
    }
    // Unknown version and unknown op: clear errors.
    let r = request(&mut s, &serde_json::json!({"v": 99, "op": "get"})).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("version"), "{r}");
    let r = request(&mut s, &serde_json::json!({"v": 1, "op": "steal"})).unwrap();
    assert_eq!(r["error"]["kind"], "invalid");
    // Oversized: an error frame, then the connection is closed.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    let r = read_response(&mut s).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("limit"), "{r}");
    assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0);
    // Half a frame, then a stall: dropped after request_timeout_ms; others are served
    // meanwhile.
    let mut stall = UnixStream::connect(&a.socket).unwrap();
    stall.write_all(&[0, 0, 0, 50, b'{']).unwrap();
    assert_eq!(a.ping().unwrap()["ok"], true);
    stall.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    assert_eq!(stall.read(&mut [0u8; 1]).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(4), "a stalled half frame was held {:?}", t.elapsed());
    // A frame that trickles in, one byte every 200 ms: each read succeeds, but the
    // whole request must arrive within request_timeout_ms.
    let mut slow = UnixStream::connect(&a.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    slow.write_all(&[0, 0, 0, 100]).unwrap();
    let t = Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(4) {
        if slow.write_all(b" ").is_err() || matches!(slow.read(&mut [0u8; 1]), Ok(0)) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed, "a trickling request held its connection for {:?}", t.elapsed());
    // A client that goes away in the middle of a request.
    for _ in 0..20 {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        let _ = s.write_all(&[0, 0, 0, 40, b'{', b'"']);
    }
    // 1000 connections at once: 64 are served, the rest get an error frame, and
    // the agent goes on.
    let mut conns = Vec::new();
    for _ in 0..1000 {
        match UnixStream::connect(&a.socket) {
            Ok(c) => conns.push(c),
            Err(e) => assert!(matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ECONNREFUSED)), "{e}"),
        }
    }
    let mut refused = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut len = [0u8; 4];
        if c.read_exact(&mut len).is_ok() {
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            c.read_exact(&mut body).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["kind"], "unavailable", "{v}");
            refused += 1;
        }
    }
    assert!(refused >= 900, "only {refused} of 1000 connections were turned away");
    drop(conns);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match a.ping() {
            Ok(v) if v["ok"] == true => break,
            other => assert!(Instant::now() < until, "the agent does not serve after the flood: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a.log_text();
    assert!(!log.contains("panicked") && !log.contains("internal error"), "{log}");
    assert!(!log.contains("secret-value-789"), "a secret reached the agent's log at trace level");
}

#[test]
fn a_killed_agent_loses_no_acknowledged_write_and_its_clients_say_unavailable() {
    let mut a = Agent::start("agent-kill", "", ADMIN_RULE, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (socket, stop) = (a.socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut acked, mut read) = (Vec::new(), Vec::new());
                let mut c = tokenguard::agent::Client::connect(&socket, Duration::from_secs(5)).unwrap();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let mut r = tokenguard::agent::protocol::Request::token("put", "load", &format!("w{w}-{i}"));
                    r.value = Some(tokenguard::agent::protocol::WireSecret(tokenguard::SecretBytes::from_slice(
                        format!("v{w}-{i}").as_bytes(),
                    )));
                    match c.call::<serde_json::Value>(r) {
                        Ok(_) => acked.push(i),
                        Err(e) => {
                            assert_eq!(e.exit_code(), 11, "{e}");
                            break;
                        }
                    }
                    // A read answered is a read whose audit event is on disk.
                    if c.get("load", &format!("w{w}-{i}"), None, false).is_ok() {
                        read.push(i);
                    }
                }
                (w, acked, read)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    a.kill();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked: Vec<_> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(acked.iter().map(|(_, v, _)| v.len()).sum::<usize>() > 0, "nothing was written before the kill");
    // The CLI says "agent unavailable" (11).
    let o = a.cli(&["get", "load/w0-0"], b"");
    assert_eq!(code(&o), 11, "{}", stderr(&o));
    // A restart serves every acknowledged write, and the audit chain verifies.
    a.spawn();
    for (w, is, _) in &acked {
        for i in is {
            let o = a.cli(&["get", &format!("load/w{w}-{i}")], b"");
            assert_eq!(code(&o), 0, "acknowledged write w{w}-{i} lost: {}", stderr(&o));
            assert_eq!(o.stdout, format!("v{w}-{i}").as_bytes());
        }
    }
    assert!(a.stop().success());
    let o = a.cli(&["--direct", "audit", "verify"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Every read answered before the kill is in the trail, whether its event was
    // folded into the store before the kill or was still in the read journal.
    let events = audit_events(&a);
    let mut reads = 0;
    for (w, _, read) in &acked {
        for i in read {
            let name = format!("w{w}-{i}");
            reads += 1;
            assert!(
                events.iter().any(|e| e["op"] == "agent-get" && e["outcome"] == "ok" && e["name"] == name.as_str()),
                "the answered read of load/{name} is not in the trail"
            );
        }
    }
    assert!(reads > 0, "no read was answered before the kill");
}

/// Reads only, no write to fold them, a fold interval longer than the test: the
/// events of the answered reads are in the read journal alone when the agent is
/// SIGKILLed. The next open (a direct CLI here) folds them, says so in the trail, and
/// the chain verifies; the agent's `stats` showed them pending before.
#[test]
fn reads_answered_before_a_sigkill_reach_the_trail_from_the_read_journal() {
    let mut a = Agent::start("agent-journal", "audit_fold_interval_ms = 600000", ADMIN_RULE, &[("p/t", "v")]);
    let mut c = tokenguard::agent::Client::connect(&a.socket, Duration::from_secs(5)).unwrap();
    for _ in 0..25 {
        assert_eq!(c.get("p", "t", None, false).unwrap().value.0.expose(), b"v");
    }
    let stats: serde_json::Value = c.call(tokenguard::agent::protocol::Request::new("stats")).unwrap();
    let pending = stats["agent"]["audit_journal"]["pending"].as_u64().unwrap();
    assert!(pending >= 25, "{stats}");
    a.kill();
    let o = a.cli(&["--direct", "audit", "verify"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let events = audit_events(&a);
    let reads = events.iter().filter(|e| e["op"] == "agent-get" && e["name"] == "t" && e["outcome"] == "ok").count();
    assert_eq!(reads, 25, "{events:#?}");
    let fold = events.iter().find(|e| e["op"] == "audit-journal").expect("the fold after the crash is recorded");
    assert_eq!(fold["outcome"], "ok", "{fold}");
    assert!(fold["detail"].as_str().unwrap().starts_with(&format!("{pending} events folded")), "{fold}");
}

#[test]
fn lockdown_closes_the_store_and_unlock_opens_it_again() {
    let mut a = Agent::start("agent-lockdown", "", ADMIN_RULE, &[("p/t", "v-lock")]);
    assert_eq!(a.cli(&["get", "p/t"], b"").stdout, b"v-lock");
    let o = a.cli(&["lockdown"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Nothing opens: a get is refused as locked (5), the agent says so.
    let o = a.cli(&["get", "p/t"], b"");
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("lockdown"), "{}", stderr(&o));
    assert_eq!(a.ping().unwrap()["result"]["locked"], true);
    // The agent dropped the store and its hardware session: another process can
    // open the store file, which the agent held exclusively.
    let o = a.cli(&["--direct", "list"], b"");
    assert_eq!(code(&o), 0, "the store is still held in lockdown: {}", stderr(&o));
    // Someone no rule allows tries meanwhile: refused, and (no key to extend the
    // chain with) kept for the trail until the unlock.
    let o = a.cli_as(STRANGER, &["get", "p/t"], b"");
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    let o = a.cli(&["unlock"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(a.cli(&["get", "p/t"], b"").stdout, b"v-lock");
    assert!(a.stop().success());
    let events = audit_events(&a);
    assert!(has_event(&events, "agent-lockdown", "ok", "uid=0"), "{events:#?}");
    assert!(has_event(&events, "agent-unlock", "ok", "uid=0"), "{events:#?}");
    let during = events
        .iter()
        .find(|e| e["op"] == "agent-get" && e["outcome"] == "refused")
        .unwrap_or_else(|| panic!("the refusal during the lockdown is not in the trail: {events:#?}"));
    assert!(during["actor"].as_str().unwrap().contains(&format!("uid={STRANGER}")), "{during}");
    assert!(during["detail"].as_str().unwrap().starts_with("in lockdown, at "), "{during}");
}

/// The CLI gives the same answers, output and exit codes through the agent as
/// directly (times aside).
#[test]
fn the_cli_answers_the_same_through_the_agent() {
    let cases: &[(&[&str], &[u8])] = &[
        (&["put", "github/ci-bot", "--label", "owner=alice"], b"ghp_value"),
        (&["put", "github/ci-bot", "--no-overwrite"], b"other"),
        (&["get", "github/ci-bot"], b""),
        (&["get", "github/ci-bot", "--json"], b""),
        (&["get", "github/nope"], b""),
        (&["get", "github/ci-bot", "--field", "refresh_token"], b""),
        (&["list"], b""),
        (&["list", "--json"], b""),
        (&["status", "github/ci-bot"], b""),
        (&["status", "github/ci-bot", "--json"], b""),
        (&["refresh", "github/ci-bot"], b""),
        (&["refresh", "github/nope"], b""),
        (&["revoke", "github/ci-bot", "--reason", "leaked"], b""),
        (&["get", "github/ci-bot"], b""),
        (&["status", "github/ci-bot"], b""),
        (&["put", "slack/bot"], b"xoxb-1"),
        (&["delete", "slack/bot", "--dry-run"], b""),
        (&["delete", "slack/bot"], b""),
        (&["delete", "slack/bot"], b""),
        (&["list", "--json"], b""),
    ];
    let direct = TestEnv::new("agent-cli-direct");
    assert_eq!(code(&direct.run(&["init"], b"")), 0);
    let a = Agent::start("agent-cli", "", ADMIN_RULE, &[]);
    let times = regex_lite_times();
    for (args, stdin) in cases {
        let d = direct.run(args, stdin);
        let g = a.cli(args, stdin);
        assert_eq!(
            code(&g),
            code(&d),
            "{args:?}: exit {} through the agent, {} directly\n{}",
            code(&g),
            code(&d),
            stderr(&g)
        );
        let norm = |b: &[u8]| times(&String::from_utf8_lossy(b));
        assert_eq!(norm(&g.stdout), norm(&d.stdout), "{args:?}: stdout differs");
        assert_eq!(norm(&g.stderr), norm(&d.stderr), "{args:?}: stderr differs");
    }
    // `audit verify` through the agent (which holds the store): its chain, with every
    // read above in it.
    let g = a.cli(&["audit", "verify", "--json"], b"");
    assert_eq!(code(&g), 0, "{}", stderr(&g));
    let r: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
    assert!(r["events"].as_u64().unwrap() > cases.len() as u64 / 2, "{r}");
    assert!(r["first_bad"].is_null(), "{r}");
}

/// Replaces RFC 3339 times, unix seconds and audit actors (which name the process)
/// with placeholders.
fn regex_lite_times() -> impl Fn(&str) -> String {
    |s: &str| {
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_ascii_digit() {
                let mut run = c.to_string();
                while let Some(d) = chars.peek().copied().filter(|d| d.is_ascii_digit() || "-:TZ".contains(*d)) {
                    run.push(d);
                    chars.next();
                }
                out.push_str(if run.len() >= 9 { "<T>" } else { &run });
            } else {
                out.push(c);
            }
        }
        // "revoked at … by ACTOR: reason": the actor names the process.
        match out.find(" by ") {
            Some(i) => match out[i..].find(": ") {
                Some(j) => format!("{} by <actor>{}", &out[..i], &out[i + j..]),
                None => out,
            },
            None => out,
        }
    }
}

/// The agent never makes its socket where another user could replace it: a
/// directory writable by others, or owned by another user, is a configuration error.
#[test]
fn the_socket_directory_must_be_the_agents_own() {
    let env = TestEnv::new("agent-sockdir");
    assert_eq!(code(&env.run(&["init"], b"")), 0);
    let base = std::fs::read_to_string(&env.config_path).unwrap();
    let open = env.dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let theirs = env.dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(CLIENT), Some(CLIENT)).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in [&open, &theirs] {
        let agent = format!("\n[agent]\nsocket = \"{}\"\n{ADMIN_RULE}", dir.join("agent.sock").display());
        std::fs::write(&env.config_path, format!("{base}{agent}")).unwrap();
        let o = env.run(&["serve"], b"");
        assert_eq!(code(&o), 8, "{}: {}", dir.display(), stderr(&o));
        assert!(stderr(&o).contains("socket directory"), "{}", stderr(&o));
        assert!(!dir.join("agent.sock").exists());
    }
}

/// SIGHUP reads the rules again: a rule added to the file serves its caller without a
/// restart, and a broken file keeps the rules in force.
#[test]
fn sighup_reloads_the_rules_and_a_broken_file_keeps_the_old_ones() {
    let a = Agent::start("agent-reload", "", ADMIN_RULE, &[("stripe/live", "sk_reload")]);
    let o = a.cli_as(CLIENT, &["get", "stripe/live"], b"");
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    let hup = |a: &Agent| signal(a.child.as_ref().unwrap(), libc::SIGHUP);
    let served_within = |a: &Agent, want: i32| {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let o = a.cli_as(CLIENT, &["get", "stripe/live"], b"");
            if code(&o) == want {
                return o;
            }
            assert!(Instant::now() < until, "still exit {} after SIGHUP: {}", code(&o), stderr(&o));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let text = std::fs::read_to_string(&a.env.config_path).unwrap();
    let rule = "[[agent.allow]]\nuser = \"nobody\"\ntokens = [\"stripe/*\"]\nops = [\"get\"]\n";
    std::fs::write(&a.env.config_path, format!("{text}{rule}")).unwrap();
    hup(&a);
    assert_eq!(served_within(&a, 0).stdout, b"sk_reload");
    // A file that does not parse: the agent keeps the rules it has (and keeps running).
    std::fs::write(&a.env.config_path, format!("{text}{rule}[[agent.allow\n")).unwrap();
    hup(&a);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(served_within(&a, 0).stdout, b"sk_reload");
    assert!(a.log_text().contains("reloading the access rules failed"), "{}", a.log_text());
    // The rule removed again: refused.
    std::fs::write(&a.env.config_path, &text).unwrap();
    hup(&a);
    served_within(&a, 9);
}

/// systemd socket activation, as `deploy/systemd/tokenguard.socket` sets it up:
/// `systemd-socket-activate` (systemd's own tool for it) binds the socket, waits for a
/// first connection and only then starts the agent with the socket as descriptor 3.
#[test]
fn a_socket_passed_by_systemd_serves_its_first_client_and_stays_systemds() {
    let mut a = Agent::prepare("agent-activated", "", ADMIN_RULE, &[("p/t", "activated-value-321")]);
    let config = a.env.config_path.clone();
    let activate = |socket: &std::path::Path, log: &std::path::Path| {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        // It passes only the variables named with -E (the SoftHSM2 configuration is
        // this test binary's).
        Command::new("systemd-socket-activate")
            .args(["-E", "TOKENGUARD_CONFIG", "-E", "RUST_LOG", "-E", "SOFTHSM2_CONF", "-l"])
            .arg(socket)
            .arg(env!("CARGO_BIN_EXE_tokenguard"))
            .arg("serve")
            .env("TOKENGUARD_CONFIG", &config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("systemd-socket-activate (package systemd) is needed for this test")
    };
    let wait_socket = |p: &std::path::Path| {
        let until = Instant::now() + Duration::from_secs(10);
        while !p.exists() {
            assert!(Instant::now() < until, "systemd-socket-activate did not bind {}", p.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    a.child = Some(activate(&a.socket, &a.log));
    wait_socket(&a.socket);
    // The first client connects while no agent runs yet: its request waits in the
    // socket's backlog and is answered once the agent has opened the store.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let r = request(&mut s, &serde_json::json!({"v": 1, "op": "get", "provider": "p", "name": "t"})).unwrap();
    assert_eq!(r["result"]["value"], "activated-value-321", "{r}\n{}", a.log_text());
    assert!(a.log_text().contains("socket_activated=true"), "{}", a.log_text());
    // The CLI finds it as any agent.
    let o = a.cli(&["get", "p/t"], b"");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "activated-value-321", "{}", stderr(&o));
    // Stopped, it leaves the socket to systemd (which would start it again on the
    // next connection).
    assert!(a.stop().success(), "{}", a.log_text());
    assert!(a.socket.exists(), "the agent removed a socket systemd owns");
    // A socket at another path than [agent] socket: clients would never find the
    // agent, so it refuses to start (exit 8) and says both paths.
    let other = a.socket.with_file_name("other.sock");
    let log = a.env.dir.join("mismatch.log");
    let mut child = activate(&other, &log);
    wait_socket(&other);
    let _ = UnixStream::connect(&other).unwrap();
    let status = wait_for(&mut child, Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(8), "{text}");
    assert!(text.contains("systemd listens at") && text.contains("other.sock"), "{text}");
}

/// SIGKILL at random moments of the agent's start (opening the store, logging in to
/// the token, binding): every later start serves, nothing acknowledged is lost, and
/// the audit chain verifies. A kill inside SoftHSM2's login rewrite empties its
/// token file; the test then does what `doctor` says (`softhsm-setup.sh --repair`),
/// as the kill campaign does, on the agent's own token.
#[test]
fn an_agent_killed_while_starting_starts_again_and_loses_nothing() {
    let (mut a, hsm) = Agent::prepare_own_token("agent-startkill", "", ADMIN_RULE, &[("p/t", "start-value-1")]);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..8 {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&a.log).unwrap();
        let mut child =
            a.env.cli().arg("serve").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        // xorshift: 0..=120 ms, spread over the whole start.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 121));
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
        common::repair_if_emptied(&hsm, &format!("round {round}"));
        // A start after the kill serves, and the token written before is there.
        a.spawn();
        let o = a.cli(&["get", "p/t"], b"");
        assert_eq!(o.stdout, b"start-value-1", "round {round}: {}\n{}", stderr(&o), a.log_text());
        let o = a.cli(&["put", &format!("p/r{round}")], format!("round-{round}").as_bytes());
        assert_eq!(code(&o), 0, "round {round}: {}", stderr(&o));
        assert!(a.stop().success(), "{}", a.log_text());
    }
    for round in 0..8 {
        let o = a.cli(&["--direct", "get", &format!("p/r{round}")], b"");
        assert_eq!(o.stdout, format!("round-{round}").as_bytes(), "{}", stderr(&o));
    }
    let o = a.cli(&["--direct", "audit", "verify"], b"");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Three CLI processes at once, through one agent, on one token: every call
/// succeeds (no PIN, no login, no store access in the clients), and every write is
/// read back by the others.
#[test]
fn three_cli_processes_at_once_share_one_agent() {
    let a = Agent::start("agent-three-cli", "", ADMIN_RULE, &[]);
    std::thread::scope(|s| {
        for w in 0..3 {
            let a = &a;
            s.spawn(move || {
                for i in 0..15 {
                    let o = a.cli(&["put", &format!("p/w{w}-{i}")], format!("v{w}-{i}").as_bytes());
                    assert_eq!(code(&o), 0, "put w{w}-{i}: {}", stderr(&o));
                    let peer = (w + 1) % 3;
                    let o = a.cli(&["get", &format!("p/w{peer}-{i}"), "--allow-expired"], b"");
                    assert!(matches!(code(&o), 0 | 3), "get w{peer}-{i}: {}", stderr(&o));
                    let o = a.cli(&["list", "--json"], b"");
                    assert_eq!(code(&o), 0, "{}", stderr(&o));
                }
            });
        }
    });
    for w in 0..3 {
        for i in 0..15 {
            let o = a.cli(&["get", &format!("p/w{w}-{i}")], b"");
            assert_eq!(o.stdout, format!("v{w}-{i}").as_bytes(), "{}", stderr(&o));
        }
    }
}
