//! The agent against its floors, in one run (`cargo bench --bench agent`):
//!
//! - a `get` from the Rust client, against a raw Unix-socket echo server answering
//!   frames of the same sizes (the floor of any agent: two syscalls each way);
//! - reads with the durable group-commit audit against unaudited reads, from 1, 32
//!   and 64 concurrent clients, with the CPU time per read (agent, its audit writer,
//!   clients) over the 32-client rounds;
//! - the CLI's `get` through the agent against the direct CLI `get`.
//!
//! Besides criterion's figures, it prints p50/p99 latencies measured over plain loops.
#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;
use criterion::{Criterion, criterion_group};
use tokenguard::agent::Client;

const RULE: &str = "[[agent.allow]]\nuid = 0\ntokens = [\"*/*\"]\nops = [\"get\", \"list\", \"put\", \"admin\"]\n";

/// A store with 100 tokens and an agent on it (`read_audit` as given).
struct Served {
    env: TestEnv,
    socket: PathBuf,
    child: Child,
}

impl Served {
    fn start(name: &str, read_audit: &str) -> Served {
        let env = TestEnv::new(name);
        let g = env.init();
        for i in 0..100 {
            g.put(
                "github",
                &format!("t{i:03}"),
                tokenguard::Secret::raw(format!("ghp_{i:040}").into_bytes()),
                Default::default(),
            )
            .unwrap();
        }
        drop(g);
        let socket = env.dir.join("agent.sock");
        let mut text = std::fs::read_to_string(&env.config_path).unwrap();
        text.push_str(&format!(
            "\n[agent]\nsocket = \"{}\"\nread_audit = \"{read_audit}\"\nmax_connections = 512\nmax_connections_per_uid = 512\n{RULE}",
            socket.display()
        ));
        std::fs::write(&env.config_path, text).unwrap();
        let child =
            env.cli().arg("serve").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while Client::connect(&socket, Duration::from_secs(1)).and_then(|mut c| c.ping()).is_err() {
            assert!(Instant::now() < until, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served { env, socket, child }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(30)).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server in a process of its own (this binary, started again), as the
/// agent is: reads a frame, answers a frame of `answer` bytes. With `peek`, it reads
/// as the agent does: peeks the request, answers, then takes it off the socket.
fn echo_server(path: &Path, answer: usize, peek: bool) -> Reaped {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TG_BENCH_ECHO", format!("{}:{answer}:{peek}", path.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < until, "the echo server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Reaped(child)
}

/// A child process killed when dropped (a panicking bench leaves none behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_echo_server(spec: &str) {
    let (rest, peek) = spec.rsplit_once(':').unwrap();
    let (path, answer) = rest.rsplit_once(':').unwrap();
    let (answer, peek): (usize, bool) = (answer.parse().unwrap(), peek.parse().unwrap());
    let listener = UnixListener::bind(path).unwrap();
    for s in listener.incoming() {
        let mut s = s.unwrap();
        std::thread::spawn(move || {
            let mut reply = (answer as u32).to_be_bytes().to_vec();
            reply.resize(4 + answer, b'x');
            if peek {
                let mut frames = tokenguard::agent::protocol::FrameReader::new(1 << 20);
                loop {
                    if frames.peek(&s).unwrap_or(0) == 0
                        || !matches!(frames.next(&mut s), Ok(Some(_)))
                        || s.write_all(&reply).is_err()
                        || frames.settle(&mut s).is_err()
                    {
                        return;
                    }
                }
            }
            let mut len = [0u8; 4];
            let mut body = Vec::new();
            while s.read_exact(&mut len).is_ok() {
                body.resize(u32::from_be_bytes(len) as usize, 0);
                if s.read_exact(&mut body).is_err() || s.write_all(&reply).is_err() {
                    return;
                }
            }
        });
    }
}

/// The exact frames a client `get` sends and receives, for the echo floor.
fn get_sizes(c: &mut Client) -> (usize, usize) {
    let req = tokenguard::agent::protocol::Request::token("get", "github", "t042");
    let mut req = req;
    req.id = Some(1);
    let req_len = serde_json::to_vec(&req).unwrap().len();
    let v: serde_json::Value = c.call(tokenguard::agent::protocol::Request::token("get", "github", "t042")).unwrap();
    let resp_len = serde_json::to_vec(&serde_json::json!({"v": 1, "id": 2, "ok": true, "result": v})).unwrap().len();
    (req_len, resp_len)
}

fn echo_call(s: &mut UnixStream, req: &[u8]) -> usize {
    s.write_all(req).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    body.len()
}

/// p50 and p99 of `n` calls of `f`, in µs.
fn percentiles(n: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    let mut t: Vec<Duration> = (0..n)
        .map(|i| {
            let s = Instant::now();
            f(i);
            s.elapsed()
        })
        .collect();
    t.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(t[n / 2]), us(t[n * 99 / 100]))
}

/// CPU time used so far by process `pid` (user and system, all its threads), in
/// microseconds, from /proc (clock ticks of 10 ms: read over runs of a second or more).
fn cpu_us(pid: u32) -> f64 {
    stat_cpu_us(&format!("/proc/{pid}/stat"))
}

/// CPU time of the threads of `pid` named `name`, as [`cpu_us`].
fn threads_cpu_us(pid: u32, name: &str) -> f64 {
    let mut sum = 0.0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            sum += stat_cpu_us(&t.path().join("stat").to_string_lossy());
        }
    }
    sum
}

fn stat_cpu_us(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return 0.0 };
    // The fields after the command (which may hold spaces) start after its ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks * 1e6 / 100.0
}

/// Gets per second from `clients` concurrent connections, `per` gets each.
fn throughput(s: &Served, clients: usize, per: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|sc| {
        for k in 0..clients {
            sc.spawn(move || {
                let mut c = s.client();
                for i in 0..per {
                    c.get("github", &format!("t{:03}", (i * 7 + k) % 100), None, false).unwrap();
                }
            });
        }
    });
    (clients * per) as f64 / start.elapsed().as_secs_f64()
}

fn agent(c: &mut Criterion) {
    let off = Served::start("bench-agent-off", "off");
    let durable = Served::start("bench-agent-durable", "durable");
    let mut oc = off.client();
    let (req_len, resp_len) = get_sizes(&mut oc);
    let echo_path = off.env.dir.join("echo.sock");
    let echo_child = echo_server(&echo_path, resp_len, false);
    let mut echo = UnixStream::connect(&echo_path).unwrap();
    let peek_path = off.env.dir.join("echo-peek.sock");
    let peek_child = echo_server(&peek_path, resp_len, true);
    let mut peek_echo = UnixStream::connect(&peek_path).unwrap();
    let mut req = (req_len as u32).to_be_bytes().to_vec();
    req.resize(4 + req_len, b'{');
    let mut dc = durable.client();

    let mut g = c.benchmark_group("agent");
    g.bench_function("get (read audit off)", |b| b.iter(|| oc.get("github", "t042", None, false).unwrap()));
    g.bench_function("floor/unix echo, same sizes", |b| b.iter(|| echo_call(&mut echo, &req)));
    g.bench_function("floor/unix echo, same sizes, reading as the agent does", |b| {
        b.iter(|| echo_call(&mut peek_echo, &req))
    });
    g.bench_function("get (durable read audit, 1 client)", |b| {
        b.iter(|| dc.get("github", "t042", None, false).unwrap())
    });
    g.finish();

    let (o50, o99) = percentiles(20_000, |_| drop(oc.get("github", "t042", None, false).unwrap()));
    let (e50, e99) = percentiles(20_000, |_| {
        echo_call(&mut echo, &req);
    });
    let (d50, d99) = percentiles(2_000, |_| drop(dc.get("github", "t042", None, false).unwrap()));
    eprintln!(
        "agent/latency: get (audit off) p50 {o50:.1} µs p99 {o99:.1} µs; echo p50 {e50:.1} µs p99 {e99:.1} µs \
         (ratio p50 {:.2}x); get (durable, 1 client) p50 {d50:.1} µs p99 {d99:.1} µs; frames {req_len} B / {resp_len} B",
        o50 / e50
    );
    drop((echo_child, peek_child));
    let asynchronous = Served::start("bench-agent-async", "async");
    let group = |s: &Served| -> [u64; 3] {
        let v: serde_json::Value = s.client().call(tokenguard::agent::protocol::Request::new("stats")).unwrap();
        let g = &v["agent"]["audit_group_commit"];
        ["commits", "events", "commit_us"].map(|k| g[k].as_u64().unwrap())
    };
    // Five rounds, each an unaudited run then a durable one: this machine's speed
    // drifts by ±20 % within a minute, so a ratio is only fair between neighbours;
    // the median round is reported.
    let before = group(&durable);
    // CPU per get, agent and clients apart: [off agent, off clients, durable agent,
    // durable clients], summed over the rounds.
    let mut cpu = [0.0f64; 4];
    let me = std::process::id();
    let mut timed = |s: &Served, at: usize| {
        let (a, c) = (cpu_us(s.child.id()), cpu_us(me));
        let t = throughput(s, 32, 500);
        cpu[at] += cpu_us(s.child.id()) - a;
        cpu[at + 1] += cpu_us(me) - c;
        t
    };
    let writer0 = threads_cpu_us(durable.child.id(), "agent-audit");
    let mut rounds: Vec<(f64, f64)> = (0..5).map(|_| (timed(&off, 0), timed(&durable, 2))).collect();
    let writer = threads_cpu_us(durable.child.id(), "agent-audit") - writer0;
    let after = group(&durable);
    let per_get = |x: f64| x / (5.0 * 32.0 * 500.0);
    eprintln!(
        "agent/cpu per get, 32 clients: audit off {:.1} µs in the agent + {:.1} µs in the clients; \
         durable {:.1} µs + {:.1} µs, of which {:.1} µs in the audit writer",
        per_get(cpu[0]),
        per_get(cpu[1]),
        per_get(cpu[2]),
        per_get(cpu[3]),
        per_get(writer)
    );
    rounds.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    let ratios: Vec<String> = rounds.iter().map(|(o, d)| format!("{:.0}", 100.0 * d / o)).collect();
    let (t_off, t_dur) = rounds[2];
    let (commits, events, us) = (after[0] - before[0], after[1] - before[1], after[2] - before[2]);
    eprintln!(
        "agent/group commit, 32 clients: {commits} commits of {:.1} events on average, {:.0} µs each",
        events as f64 / commits as f64,
        us as f64 / commits as f64
    );
    let t_async = throughput(&asynchronous, 32, 500);
    let (t_off1, t_dur1) = (throughput(&off, 1, 5_000), throughput(&durable, 1, 500));
    eprintln!(
        "agent/throughput: 32 clients (median of 5 rounds): audit off {t_off:.0}/s, durable {t_dur:.0}/s ({:.0} %; \
         rounds {} %), async {t_async:.0}/s ({:.0} %); 1 client: off {t_off1:.0}/s, durable {t_dur1:.0}/s",
        100.0 * t_dur / t_off,
        ratios.join("/"),
        100.0 * t_async / t_off
    );
    drop(asynchronous);
    // More clients than the pipeline of commits holds at 32: how far the ratio is a
    // matter of latency (a read waits for up to two commits) rather than of work.
    let mut wide: Vec<(f64, f64)> =
        (0..3).map(|_| (throughput(&off, 64, 250), throughput(&durable, 64, 250))).collect();
    wide.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    eprintln!(
        "agent/throughput: 64 clients (median of 3 rounds): audit off {:.0}/s, durable {:.0}/s ({:.0} %)",
        wide[1].0,
        wide[1].1,
        100.0 * wide[1].1 / wide[1].0
    );

    // The CLI: through the agent, and directly on a store of its own (an agent holds
    // its store exclusively).
    let direct = TestEnv::new("bench-agent-direct");
    let gd = direct.init();
    gd.put("github", "t042", tokenguard::Secret::raw(b"ghp_direct".to_vec()), Default::default()).unwrap();
    drop(gd);
    let cli = |env: &TestEnv, direct_flag: bool| {
        let mut cmd = env.cli();
        if direct_flag {
            cmd.arg("--direct");
        }
        let o = cmd.args(["get", "github/t042"]).stdin(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let mut g = c.benchmark_group("cli");
    g.sample_size(20);
    g.bench_function("get through the agent (durable)", |b| b.iter(|| cli(&durable.env, false)));
    g.bench_function("get direct", |b| b.iter(|| cli(&direct, true)));
    g.finish();
    let (a50, a99) = percentiles(100, |_| cli(&durable.env, false));
    let (x50, x99) = percentiles(100, |_| cli(&direct, true));
    eprintln!(
        "cli/latency: get through the agent p50 {:.2} ms p99 {:.2} ms; direct p50 {:.2} ms p99 {:.2} ms",
        a50 / 1e3,
        a99 / 1e3,
        x50 / 1e3,
        x99 / 1e3
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = agent
}

fn main() {
    // Started again as the echo floor's server process.
    if let Ok(spec) = std::env::var("TG_BENCH_ECHO") {
        run_echo_server(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
