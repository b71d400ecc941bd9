//! Crash safety: a writer killed with SIGKILL at random points leaves a store that
//! opens, passes its integrity scan and audit verification, with every acknowledged
//! write readable.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;

/// Child: puts forever (single puts and batches), printing `ACK name value` after
/// each put returns, i.e. after its commit is durable.
#[test]
fn crash_child() {
    let (Ok(cfg), Ok(run)) = (std::env::var("TG_CRASH_CONFIG"), std::env::var("TG_CRASH_RUN")) else {
        return;
    };
    let config = tokenguard::Config::load(std::path::Path::new(&cfg)).unwrap();
    let g = config.open_guard().unwrap();
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    // Kill points start after the open (SoftHSM2's login rewrites a token file
    // non-atomically; see tests/lifecycle.rs run_child_killed).
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    for i in 0u64.. {
        let provider = ["github", "slack", "jira"][(i % 3) as usize];
        if i % 10 == 9 {
            let items: Vec<_> = (0..50)
                .map(|j| tokenguard::PutItem {
                    provider: provider.into(),
                    name: format!("r{run}-b{i}-{j}"),
                    secret: tokenguard::Secret::raw(format!("v{run}-{i}-{j}").into_bytes()),
                    options: Default::default(),
                })
                .collect();
            g.put_many(items).unwrap();
            for j in 0..50 {
                writeln!(out, "ACK {provider} r{run}-b{i}-{j} v{run}-{i}-{j}").unwrap();
            }
        } else {
            // Overwrites too: the same name is rewritten across runs.
            let name = format!("k{}", i % 40);
            // Announce the attempt first: a commit that lands just before the kill,
            // whose ACK never got out, is a legitimate newer value.
            writeln!(out, "TRY {provider} {name} v{run}-{i}").unwrap();
            out.flush().unwrap();
            g.put(provider, &name, tokenguard::Secret::raw(format!("v{run}-{i}").into_bytes()), Default::default())
                .unwrap();
            writeln!(out, "ACK {provider} {name} v{run}-{i}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_write() {
    let env = TestEnv::new("crash");
    drop(env.init());
    // Per key: the last acknowledged value, and values attempted after it.
    let mut expected: std::collections::BTreeMap<(String, String), String> = Default::default();
    let mut pending: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let iterations = 25;
    for run in 0..iterations {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(20 + seed % 250);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("TG_CRASH_CONFIG", &env.config_path)
            .env("TG_CRASH_RUN", run.to_string())
            .env("SOFTHSM2_CONF", &common::softhsm().conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        while !first.contains("READY") {
            first.clear();
            if stdout.read_line(&mut first).unwrap() == 0 {
                break;
            }
        }
        let reader = std::thread::spawn(move || stdout.lines().map_while(Result::ok).collect::<Vec<_>>());
        let start = Instant::now();
        while start.elapsed() < delay {
            std::thread::sleep(Duration::from_millis(5));
        }
        // SIGKILL: no destructor, no flush, mid-transaction or mid-commit.
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            // libtest may print "test crash_child ... " in front of the first line.
            let line = line.rsplit("... ").next().unwrap_or(&line);
            let mut parts = line.split(' ');
            let kind = parts.next();
            let (Some(p), Some(n), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let key = (p.to_string(), n.to_string());
            match kind {
                Some("TRY") => pending.entry(key).or_default().push(v.into()),
                Some("ACK") => {
                    pending.remove(&key);
                    expected.insert(key, v.into());
                }
                _ => {}
            }
        }
        // After every kill: the store opens and every acknowledged write is there.
        let g = env.open();
        let mut expected_fix = Vec::new();
        for ((p, n), v) in &expected {
            let s = g.get(p, n).unwrap_or_else(|e| panic!("run {run}: {p}/{n} lost: {e}"));
            let got = String::from_utf8(s.field(None).unwrap().expose().to_vec()).unwrap();
            let newer = pending.get(&(p.clone(), n.clone()));
            assert!(
                &got == v || newer.is_some_and(|t| t.contains(&got)),
                "run {run}: {p}/{n} holds {got}, but {v} was acknowledged (attempted since: {newer:?})"
            );
            if &got != v {
                // The unacknowledged write landed: it is now the value to keep.
                expected_fix.push(((p.clone(), n.clone()), got));
            }
        }
        for (k, v) in expected_fix.drain(..) {
            pending.remove(&k);
            expected.insert(k, v);
        }
    }
    assert!(
        expected.len() > 40,
        "the writer acknowledged too little ({}) for the test to mean anything",
        expected.len()
    );
    let g = env.open();
    for c in g.doctor() {
        assert_ne!(c.status, tokenguard::root::Status::Fail, "{c:?}");
    }
}
