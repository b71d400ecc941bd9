//! What escrow costs: an age root's wrap and unwrap of a data key, tag included
//! (beside the soft root's AES-KW, the same operation in a key file), and a recovery
//! split and combine. `cargo bench --bench escrow`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::io::Read;

use criterion::{Criterion, criterion_group, criterion_main};
use tokenguard::recovery::{self, Custodian, Share};
use tokenguard::root::RootKey;
use tokenguard::root::age::{AgeIdentity, AgeRoot};
use tokenguard::secret::DekMaterial;

fn roots(c: &mut Criterion) {
    let id = AgeIdentity::generate();
    let one = AgeRoot::new(&id.recipient(), vec![id.clone()], Some("bench".into()), None).unwrap();
    let dek = DekMaterial::random().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let soft = tokenguard::root::soft::SoftRoot::create(&dir.path().join("k")).unwrap();

    let mut g = c.benchmark_group("escrow");
    g.bench_function("age_wrap_1_recipient", |b| b.iter(|| black_box(one.wrap(&dek).unwrap())));
    let w = one.wrap(&dek).unwrap();
    g.bench_function("age_unwrap", |b| b.iter(|| black_box(one.unwrap(&w).unwrap())));
    g.bench_function("soft_aes_kw_wrap", |b| b.iter(|| black_box(soft.wrap(&dek).unwrap())));
    let ws = soft.wrap(&dek).unwrap();
    g.bench_function("soft_aes_kw_unwrap", |b| b.iter(|| black_box(soft.unwrap(&ws).unwrap())));
    println!("age wrap of one data key: {} bytes", w.blob.len());

    // Recovery: 3 of 5 custodians.
    let keys: Vec<age::x25519::Identity> = (0..5).map(|_| age::x25519::Identity::generate()).collect();
    let custodians: Vec<Custodian> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Custodian { name: format!("c{i}"), recipient: k.to_public().to_string() })
        .collect();
    g.sample_size(20);
    g.bench_function("split_3_of_5", |b| b.iter(|| black_box(recovery::split(3, &custodians).unwrap())));
    let s = recovery::split(3, &custodians).unwrap();
    let plain: Vec<Vec<u8>> = s
        .shares
        .iter()
        .zip(&keys)
        .map(|(sh, k)| {
            let d = age::Decryptor::new(age::armor::ArmoredReader::new(&sh.file[..])).unwrap();
            let mut out = Vec::new();
            d.decrypt(std::iter::once(k as &dyn age::Identity)).unwrap().read_to_end(&mut out).unwrap();
            out
        })
        .collect();
    g.bench_function("combine_3", |b| {
        b.iter(|| {
            let shares: Vec<Share> = plain[..3].iter().map(|p| Share::parse(p).unwrap()).collect();
            black_box(recovery::combine(&shares).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, roots);
criterion_main!(benches);
