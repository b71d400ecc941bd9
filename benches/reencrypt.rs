//! Re-encryption throughput: a store of N tokens (default 100,000; `TG_REENC_TOKENS`)
//! on SoftHSM2, `rotate-dek`, then `reencrypt` in batches of 500 (and 5,000), timed
//! end to end. Prints tokens per second; meanwhile a reader thread checks that reads
//! keep working and reports their latency.
#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokenguard::guard::rotate::ReencryptOptions;
use tokenguard::{PutItem, PutOptions, Secret};

fn main() {
    let n: usize = std::env::var("TG_REENC_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    for (mode, extra) in [("shared", ""), ("exclusive", "mode = \"exclusive\"")] {
        for batch in [500usize, 5_000] {
            let env = common::TestEnv::with_config(&format!("reenc-{mode}-{batch}"), extra);
            let g = env.init();
            let mut i = 0;
            while i < n {
                let items: Vec<_> = (i..(i + 1000).min(n))
                    .map(|j| PutItem {
                        provider: "github".into(),
                        name: format!("t{j:08}"),
                        secret: Secret::raw(
                            format!("ghp_{j:08}_reencrypt_benchmark_secret_padding_to_64_bytes_xx").into_bytes(),
                        ),
                        options: PutOptions::default(),
                    })
                    .collect();
                i += items.len();
                g.put_many(items).unwrap();
            }
            g.rotate_dek("github").unwrap();
            let stop = AtomicBool::new(false);
            let (reads, read_ns) = (AtomicU64::new(0), AtomicU64::new(0));
            let t = Instant::now();
            let moved = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut k = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        k = (k + 7919) % n;
                        let r = Instant::now();
                        g.get("github", &format!("t{k:08}")).unwrap();
                        read_ns.fetch_add(r.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                });
                let r = g.reencrypt(
                    Some("github"),
                    ReencryptOptions { batch_size: batch, ..Default::default() },
                    |_, _, _| {},
                );
                stop.store(true, Ordering::Relaxed);
                r.unwrap()[0].moved
            });
            let secs = t.elapsed().as_secs_f64();
            let reads = reads.load(Ordering::Relaxed).max(1);
            println!(
                "mode={mode} batch={batch} tokens={moved} secs={secs:.2} tokens_per_sec={:.0} concurrent_reads={reads} mean_read_us={:.1}",
                moved as f64 / secs,
                read_ns.load(Ordering::Relaxed) as f64 / reads as f64 / 1000.0
            );
        }
    }
}
