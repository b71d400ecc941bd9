//! Steady-state memory of a process doing warm gets on a large store: builds a store
//! of N tokens (default 1,000,000) on SoftHSM2, then does M gets (default 10,000,000)
//! and prints the resident set size every M/10 gets. Run by `benches/memory.sh`.
//! `TG_SOAK_TOKENS` and `TG_SOAK_GETS` override N and M.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use tokenguard::{PutItem, PutOptions, Secret};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let n = env_or("TG_SOAK_TOKENS", 1_000_000);
    let m = env_or("TG_SOAK_GETS", 10_000_000);
    let env = common::TestEnv::with_config("soak", "mode = \"exclusive\"");
    let g = env.init();
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 1000).min(n))
            .map(|j| PutItem {
                provider: "github".into(),
                name: format!("t{j:08}"),
                secret: Secret::raw(
                    format!("ghp_{j:08}_soak_secret_value_padding_to_64_bytes_xxxxxxxxxxxx").into_bytes(),
                ),
                options: PutOptions::default(),
            })
            .collect();
        i += batch.len();
        g.put_many(batch).unwrap();
    }
    println!("populated tokens={n} secs={:.1} rss_kib={}", t.elapsed().as_secs_f64(), rss_kib());
    let names: Vec<String> = (0..n).map(|j| format!("t{j:08}")).collect();
    let step = (m / 10).max(1);
    let t = Instant::now();
    let mut k = 0usize;
    for done in 1..=m {
        k = (k + 104_729) % n;
        std::hint::black_box(g.get("github", &names[k]).unwrap());
        if done % step == 0 {
            println!(
                "gets={done} rss_kib={} mean_ns_per_get={:.0}",
                rss_kib(),
                t.elapsed().as_nanos() as f64 / done as f64
            );
        }
    }
}
