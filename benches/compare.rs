//! tokenguard side of the side-by-side with a Fernet JSON-file token manager
//! (`benches/fernet_reference.py`): per-operation get and put times at 10, 100, 1k
//! and 10k stored tokens, on SoftHSM2, in the default (shared) store mode. Prints one
//! JSON object per size; `benches/compare.sh` runs both sides and prints the ratios.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use tokenguard::{PutItem, PutOptions, Secret};

fn secret(i: usize) -> Secret {
    Secret::raw(format!("ghp_{i:08}_compare_secret_value_padding_to_64_bytes_xxxxxxxxx").into_bytes())
}

fn main() {
    for n in [10usize, 100, 1_000, 10_000] {
        let env = common::TestEnv::new(&format!("cmp{n}"));
        let g = env.init();
        let items = (0..n)
            .map(|i| PutItem {
                provider: "github".into(),
                name: format!("t{i}"),
                secret: secret(i),
                options: PutOptions::default(),
            })
            .collect();
        g.put_many(items).unwrap();
        let gets = 20_000;
        let t = Instant::now();
        for k in 0..gets {
            std::hint::black_box(g.get("github", &format!("t{}", (k * 7919) % n)).unwrap());
        }
        let get_us = t.elapsed().as_secs_f64() * 1e6 / gets as f64;
        let puts = 200;
        let t = Instant::now();
        for k in 0..puts {
            g.put("github", &format!("t{}", (k * 7919) % n), secret(k), PutOptions::default()).unwrap();
        }
        let put_us = t.elapsed().as_secs_f64() * 1e6 / puts as f64;
        println!("{{\"impl\":\"tokenguard\",\"tokens\":{n},\"get_us\":{get_us:.2},\"put_us\":{put_us:.1}}}");
    }
}
