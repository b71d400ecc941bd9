//! Criterion benchmarks of tokenguard against its own floors, measured in the same
//! run: each group has a `floor/…` benchmark built from the raw parts (redb read +
//! AES-GCM open, a raw SoftHSM2 unwrap through cryptoki, a raw redb batch commit), so
//! the overhead of tokenguard reads as a ratio. Runs on the same SoftHSM2 set-up as
//! the tests (a per-run token directory). `TG_BENCH_SKIP_1M=1` leaves out the 1M-token
//! scale point (it takes a minute to build).
#![allow(missing_docs, clippy::unwrap_used, clippy::cast_possible_truncation)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use common::TestEnv;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokenguard::seal::{RecordHeader, RecordKey};
use tokenguard::{Metadata, PutItem, PutOptions, Secret, SecretKind, TokenGuard, TokenSet, TokenState};

const FLOOR: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");

fn header(name: &str) -> RecordHeader {
    RecordHeader {
        provider: "github".into(),
        name: name.into(),
        dek_version: 1,
        meta: Metadata {
            created: 1_700_000_000,
            updated: 1_700_000_000,
            expires_at: Some(4_000_000_000),
            state: TokenState::Active,
            kind: SecretKind::Raw,
            token_type: None,
            scopes: vec![],
            labels: Default::default(),
        },
    }
}

fn secret(len: usize, i: usize) -> Secret {
    let mut v = format!("ghp_{i:08}_").into_bytes();
    v.resize(len, b'x');
    Secret::raw(v)
}

fn populate(g: &TokenGuard, provider: &str, n: usize, len: usize) {
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 1000).min(n))
            .map(|j| PutItem {
                provider: provider.into(),
                name: format!("t{j:08}"),
                secret: secret(len, j),
                options: PutOptions::default(),
            })
            .collect();
        i += batch.len();
        g.put_many(batch).unwrap();
    }
}

/// A redb file holding the same records, for the floor of a read.
fn floor_db(env: &TestEnv, mode: redb::ConcurrencyMode, records: &[(String, Vec<u8>)]) -> redb::Database {
    let path = env.dir.join(format!("floor-{mode:?}.redb"));
    let _ = std::fs::remove_file(&path);
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(mode);
    let db = b.create(&path).unwrap();
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(FLOOR).unwrap();
        for (n, v) in records {
            t.insert(("github", n.as_str()), v.as_slice()).unwrap();
        }
    }
    w.commit().unwrap();
    db
}

fn primitives(c: &mut Criterion) {
    let key = [7u8; 32];
    let sid = [1u8; 16];
    let rk = RecordKey::new(&key);
    let raw = Aes256Gcm::new(&key.into());
    let mut g = c.benchmark_group("primitives");
    for size in [64usize, 512, 4096] {
        g.throughput(Throughput::Bytes(size as u64));
        let h = header("ci-bot");
        let s = secret(size, 1);
        let rec = rk.seal(&sid, &h, &s).unwrap();
        g.bench_with_input(BenchmarkId::new("seal", size), &size, |b, _| b.iter(|| rk.seal(&sid, &h, &s).unwrap()));
        g.bench_with_input(BenchmarkId::new("open", size), &size, |b, _| {
            b.iter(|| rk.open(&sid, black_box(&rec)).unwrap())
        });
        // Floors: nonce from the OS + encrypt; decrypt of the same ciphertext.
        let aad = vec![0u8; 90];
        let pt = vec![b'x'; size + 1];
        let nonce = Nonce::from([9u8; 12]);
        let ct = raw.encrypt(&nonce, Payload { msg: &pt, aad: &aad }).unwrap();
        g.bench_with_input(BenchmarkId::new("floor/seal", size), &size, |b, _| {
            b.iter(|| {
                let mut n = [0u8; 12];
                getrandom::fill(&mut n).unwrap();
                raw.encrypt(&Nonce::from(n), Payload { msg: &pt, aad: &aad }).unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("floor/open", size), &size, |b, _| {
            b.iter(|| raw.decrypt(&nonce, Payload { msg: black_box(&ct), aad: &aad }).unwrap())
        });
    }
    g.finish();
}

/// Floor values: `aad_len:u32 ‖ aad ‖ nonce ‖ ciphertext`, built from records sealed
/// exactly as the guard seals them, so the floor decrypts the same bytes with the
/// same AAD — only without parsing, AAD assembly or the DEK lookup.
fn floor_records(n: usize, len: usize) -> (Aes256Gcm, Vec<(String, Vec<u8>)>) {
    let key = [3u8; 32];
    let sid = [1u8; 16];
    let rk = RecordKey::new(&key);
    let recs = (0..n)
        .map(|i| {
            let name = format!("t{i:08}");
            let r = rk.seal(&sid, &header(&name), &secret(len, i)).unwrap();
            let ct_len = len + 1 + 16;
            let ct_start = r.len() - ct_len;
            let nonce_start = ct_start - 4 - 12;
            let aad = tokenguard::seal::record_aad(&sid, &r[..nonce_start]);
            let mut v = (aad.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&aad);
            v.extend_from_slice(&r[nonce_start..nonce_start + 12]);
            v.extend_from_slice(&r[ct_start..]);
            (name, v)
        })
        .collect();
    (Aes256Gcm::new(&key.into()), recs)
}

/// The floor of a warm get: a fresh read transaction, one lookup, one AES-GCM open.
fn floor_get(db: &redb::Database, cipher: &Aes256Gcm, name: &str) -> usize {
    let r = db.begin_read().unwrap();
    let t = r.open_table(FLOOR).unwrap();
    floor_lookup(&t, cipher, name)
}

/// The floor of a warm get from a snapshot kept open (as the guard keeps one per
/// thread in exclusive mode): one lookup, one AES-GCM open.
fn floor_lookup(
    t: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    cipher: &Aes256Gcm,
    name: &str,
) -> usize {
    let v = t.get(("github", name)).unwrap().unwrap();
    let b = v.value();
    let aad_len = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
    let aad = &b[4..4 + aad_len];
    let nonce = Nonce::from(<[u8; 12]>::try_from(&b[4 + aad_len..16 + aad_len]).unwrap());
    let pt = cipher.decrypt(&nonce, Payload { msg: &b[16 + aad_len..], aad }).unwrap();
    pt.len()
}

fn warm(c: &mut Criterion) {
    for (mode_name, extra, redb_mode) in [
        ("shared", "", redb::ConcurrencyMode::MultiWriter),
        ("exclusive", "mode = \"exclusive\"", redb::ConcurrencyMode::ExclusiveWriter),
    ] {
        let env = TestEnv::with_config(&format!("bench-warm-{mode_name}"), extra);
        let g = env.init();
        populate(&g, "github", 1000, 64);
        let set = TokenSet::new().with("access_token", "ya29.x".repeat(10)).with("refresh_token", "1//r".repeat(10));
        g.put("google", "svc", Secret::TokenSet(set), PutOptions::default()).unwrap();
        let (cipher, recs) = floor_records(1000, 64);
        let db = floor_db(&env, redb_mode, &recs);
        let names: Vec<String> = (0..1000).map(|i| format!("t{i:08}")).collect();
        let mut grp = c.benchmark_group(format!("warm_get_{mode_name}"));
        let mut i = 0;
        grp.bench_function("get", |b| {
            b.iter(|| {
                i = (i + 7919) % 1000;
                g.get("github", &names[i]).unwrap()
            })
        });
        grp.bench_function("get_field", |b| {
            b.iter(|| {
                let s = g.get("google", "svc").unwrap();
                black_box(s.field(Some("refresh_token")).unwrap().len())
            })
        });
        grp.bench_function("floor/redb_read+gcm_open", |b| {
            b.iter(|| {
                i = (i + 7919) % 1000;
                floor_get(&db, &cipher, &names[i])
            })
        });
        // The guard keeps its snapshots in exclusive mode only; a live snapshot also
        // changes what a shared-mode `begin_read` costs, so none is kept there.
        let kept = (redb_mode == redb::ConcurrencyMode::ExclusiveWriter)
            .then(|| db.begin_read().unwrap().open_table(FLOOR).unwrap());
        if let Some(kept) = &kept {
            grp.bench_function("floor/kept_snapshot+gcm_open", |b| {
                b.iter(|| {
                    i = (i + 7919) % 1000;
                    floor_lookup(kept, &cipher, &names[i])
                })
            });
        }
        grp.bench_function("list_1000", |b| b.iter(|| g.list(Some("github")).unwrap().len()));
        grp.finish();
        // Criterion measures get and floor one after the other; on a shared machine the
        // neighbours' load moves between the two. The ratio the budget is about is also
        // measured interleaved: 41 rounds of 20,000 of each, alternating; medians.
        let round = |f: &mut dyn FnMut(usize)| {
            let t = std::time::Instant::now();
            for k in 0..20_000 {
                f((k * 7919) % 1000);
            }
            t.elapsed() / 20_000
        };
        let (mut ours, mut floor, mut floor_kept) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..41 {
            ours.push(round(&mut |k| drop(black_box(g.get("github", &names[k]).unwrap()))));
            floor.push(round(&mut |k| {
                black_box(floor_get(&db, &cipher, &names[k]));
            }));
            if let Some(kept) = &kept {
                floor_kept.push(round(&mut |k| {
                    black_box(floor_lookup(kept, &cipher, &names[k]));
                }));
            }
        }
        let median = |v: &mut Vec<std::time::Duration>| {
            v.sort();
            v.get(v.len() / 2).map(|d| d.as_secs_f64() * 1e6)
        };
        let (o, f) = (median(&mut ours).unwrap_or(f64::NAN), median(&mut floor).unwrap_or(f64::NAN));
        let kept = median(&mut floor_kept)
            .map(|fk| format!(", floor on a kept snapshot {fk:.2} µs (ratio {:.2}x)", o / fk))
            .unwrap_or_default();
        eprintln!("warm_get_{mode_name}/interleaved: get {o:.2} µs, floor {f:.2} µs (ratio {:.2}x){kept}", o / f);
    }
}

/// Raw SoftHSM2 unwrap through cryptoki: C_UnwrapKey + C_GetAttributeValue(CKA_VALUE)
/// + C_DestroyObject with the same KEK the guard uses.
fn cold(c: &mut Criterion) {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    let env = TestEnv::with_config("bench-cold", "mode = \"exclusive\"");
    let g = env.init();
    g.put("github", "a", secret(64, 1), PutOptions::default()).unwrap();
    let session = common::user_session();
    let kek = common::find_key(&session, &env.key_label)[0];
    let tmpl = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let mut gen_t = tmpl.to_vec();
    gen_t.push(Attribute::ValueLen(32.into()));
    let dek = session.generate_key(&Mechanism::AesKeyGen, &gen_t).unwrap();
    let blob = session.wrap_key(&Mechanism::AesKeyWrap, kek, dek).unwrap();
    let mut grp = c.benchmark_group("cold_get_softhsm");
    grp.sample_size(50);
    grp.bench_function("get_first_of_provider", |b| {
        b.iter(|| {
            g.clear_dek_cache();
            g.get("github", "a").unwrap()
        })
    });
    grp.bench_function("floor/cryptoki_unwrap", |b| {
        b.iter(|| {
            let h = session.unwrap_key(&Mechanism::AesKeyWrap, kek, &blob, &tmpl).unwrap();
            let v = session.get_attributes(h, &[AttributeType::Value]).unwrap();
            session.destroy_object(h).unwrap();
            v
        })
    });
    grp.finish();
}

fn writes(c: &mut Criterion) {
    let env = TestEnv::new("bench-writes");
    let g = env.init();
    g.put("github", "warm", secret(64, 0), PutOptions::default()).unwrap();
    let (_c, recs) = floor_records(1000, 64);
    let db = floor_db(&env, redb::ConcurrencyMode::MultiWriter, &[]);
    let mut grp = c.benchmark_group("writes");
    grp.sample_size(20);
    let mut n = 0u64;
    grp.bench_function("put_durable", |b| {
        b.iter(|| {
            n += 1;
            g.put("github", &format!("p{}", n % 5000), secret(64, n as usize), PutOptions::default()).unwrap()
        })
    });
    // The same with the store bound to a rollback counter in the token (a counter
    // read, and an increment under the exclusive token lock, per commit).
    let counted = TestEnv::new("bench-writes-counter");
    let text = std::fs::read_to_string(&counted.config_path).unwrap();
    let key_line = format!("key_label = \"{}\"\n", counted.key_label);
    let text = text.replace(&key_line, &format!("{key_line}counter_label = \"ctr-{}\"\n", counted.key_label));
    std::fs::write(&counted.config_path, text).unwrap();
    let gc = counted.init();
    grp.bench_function("put_durable_counter", |b| {
        b.iter(|| {
            n += 1;
            gc.put("github", &format!("p{}", n % 5000), secret(64, n as usize), PutOptions::default()).unwrap()
        })
    });
    grp.bench_function("floor/redb_put_durable", |b| {
        b.iter(|| {
            n += 1;
            let w = db.begin_write().unwrap();
            w.open_table(FLOOR)
                .unwrap()
                .insert(("github", format!("p{}", n % 5000).as_str()), recs[0].1.as_slice())
                .unwrap();
            w.commit().unwrap();
        })
    });
    // An agent's group commit of read events: one durable commit for 1 and for 32.
    for k in [1usize, 32] {
        let events: Vec<tokenguard::audit::AuditRecord> = (0..k)
            .map(|i| tokenguard::audit::AuditRecord {
                actor: format!("agent-client uid=1000 gid=1000 pid={i} exe=\"/usr/bin/python3.11\""),
                op: "agent-get".into(),
                provider: "github".into(),
                name: format!("t{i:03}"),
                outcome: "ok".into(),
                detail: String::new(),
            })
            .collect();
        grp.bench_function(format!("audit_batch_{k}"), |b| b.iter(|| g.audit_batch(&events).unwrap()));
    }
    grp.throughput(Throughput::Elements(1000));
    grp.bench_function("put_many_1000", |b| {
        b.iter(|| {
            n += 1;
            let items = (0..1000)
                .map(|j| PutItem {
                    provider: "jira".into(),
                    name: format!("m{j}"),
                    secret: secret(64, j + n as usize),
                    options: PutOptions::default(),
                })
                .collect();
            g.put_many(items).unwrap()
        })
    });
    grp.bench_function("floor/redb_batch_1000", |b| {
        b.iter(|| {
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(FLOOR).unwrap();
                for (name, v) in &recs {
                    t.insert(("jira", name.as_str()), v.as_slice()).unwrap();
                }
            }
            w.commit().unwrap();
        })
    });
    // The same B-tree work as put_many: look up the old record, drop its index
    // entry, insert the record and its index entry — without sealing, AAD, DEK
    // selection, counters or audit.
    const IDX: TableDefinition<(&str, u32, &str), ()> = TableDefinition::new("by_dek");
    grp.bench_function("floor/redb_batch_1000_same_ops", |b| {
        b.iter(|| {
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(FLOOR).unwrap();
                let mut idx = w.open_table(IDX).unwrap();
                for (name, v) in &recs {
                    if t.get(("jira", name.as_str())).unwrap().is_some() {
                        idx.remove(("jira", 1, name.as_str())).unwrap();
                    }
                    t.insert(("jira", name.as_str()), v.as_slice()).unwrap();
                    idx.insert(("jira", 1, name.as_str()), ()).unwrap();
                }
            }
            w.commit().unwrap();
        })
    });
    grp.finish();
}

fn scale(c: &mut Criterion) {
    let mut points = vec![10_000usize, 100_000, 1_000_000];
    if std::env::var("TG_BENCH_SKIP_1M").is_ok() {
        points.pop();
    }
    let mut grp = c.benchmark_group("scale_warm_get");
    for n in points {
        let env = TestEnv::with_config(&format!("bench-scale-{n}"), "mode = \"exclusive\"");
        let g = env.init();
        let t = Instant::now();
        populate(&g, "github", n, 64);
        eprintln!("populated {n} tokens in {:.1?}", t.elapsed());
        let names: Vec<String> = (0..n).map(|i| format!("t{i:08}")).collect();
        let mut i = 0usize;
        grp.bench_with_input(BenchmarkId::new("get", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 104_729) % n;
                g.get("github", &names[i]).unwrap()
            })
        });
        // The floor at the same scale: raw redb read + AES-GCM open over n records.
        let (cipher, recs) = floor_records(n, 64);
        let db = floor_db(&env, redb::ConcurrencyMode::ExclusiveWriter, &recs);
        drop(recs);
        grp.bench_with_input(BenchmarkId::new("floor", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 104_729) % n;
                floor_get(&db, &cipher, &names[i])
            })
        });
    }
    grp.finish();
}

/// `t` threads, each making `iters` reads through the reader `setup` gives it
/// (called on the thread: a kept snapshot is the thread's own); the wall time.
fn on_threads<R: FnMut(&str)>(t: usize, iters: u64, setup: impl Fn() -> R + Sync) -> std::time::Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for k in 0..t {
            let setup = &setup;
            s.spawn(move || {
                let mut read = setup();
                let mut i = k * 500;
                for _ in 0..iters {
                    i = (i + 7919) % 1000;
                    read(&format!("t{i:08}"));
                }
            });
        }
    });
    start.elapsed()
}

fn threads(c: &mut Criterion) {
    let env = TestEnv::with_config("bench-threads", "mode = \"exclusive\"");
    let g = env.init();
    populate(&g, "github", 1000, 64);
    let (cipher, recs) = floor_records(1000, 64);
    let db = floor_db(&env, redb::ConcurrencyMode::ExclusiveWriter, &recs);
    let (db, cipher) = (&db, &cipher);
    let mut grp = c.benchmark_group("warm_get_threads");
    for t in [1usize, 2] {
        grp.throughput(Throughput::Elements(t as u64));
        grp.bench_with_input(BenchmarkId::new("floor_per_thread", t), &t, |b, &t| {
            b.iter_custom(|iters| {
                on_threads(t, iters, || {
                    |name: &str| {
                        black_box(floor_get(db, cipher, name));
                    }
                })
            })
        });
    }
    // The same floor on a snapshot each thread keeps open, as the guard's threads
    // do in exclusive mode: what the machine gives two threads with no shared lock.
    for t in [1usize, 2] {
        grp.throughput(Throughput::Elements(t as u64));
        grp.bench_with_input(BenchmarkId::new("floor_kept_per_thread", t), &t, |b, &t| {
            b.iter_custom(|iters| {
                on_threads(t, iters, || {
                    let table = db.begin_read().unwrap().open_table(FLOOR).unwrap();
                    move |name: &str| {
                        black_box(floor_lookup(&table, cipher, name));
                    }
                })
            })
        });
    }
    for t in [1usize, 2] {
        grp.throughput(Throughput::Elements(t as u64));
        grp.bench_with_input(BenchmarkId::new("get_per_thread", t), &t, |b, &t| {
            b.iter_custom(|iters| {
                on_threads(t, iters, || {
                    let g = g.clone();
                    move |name: &str| {
                        black_box(g.get("github", name).unwrap());
                    }
                })
            })
        });
    }
    grp.finish();
}

/// TPM figures on swtpm (`cargo bench --features tpm -- tpm`): process cold start with
/// and without a persisted storage key, unseal latency with and without parameter
/// encryption, and a cold `get` through the guard.
#[cfg(feature = "tpm")]
fn tpm(c: &mut Criterion) {
    use tokenguard::root::RootKey;
    use tokenguard::root::tpm::{TpmAuth, TpmRoot, TpmSettings};
    let t = common::Swtpm::start();
    let settings = |handle: u32, enc: bool| TpmSettings {
        tcti: t.tcti(),
        persistent_handle: handle,
        parameter_encryption: enc,
        pcrs: None,
        auth: None,
        nv_counter: None,
    };
    drop(TpmRoot::open(settings(0x8100_0A10, true), true).unwrap());
    let mut grp = c.benchmark_group("tpm_swtpm");
    grp.sample_size(30);
    grp.bench_function("cold_start_persisted_key", |b| {
        b.iter(|| TpmRoot::open(settings(0x8100_0A10, true), false).unwrap())
    });
    // Nothing persisted at this handle: every start pays CreatePrimary (ECC P-256).
    grp.bench_function("cold_start_create_primary", |b| {
        b.iter(|| TpmRoot::open(settings(0x8100_0A1F, true), false).unwrap())
    });
    for enc in [true, false] {
        let root = TpmRoot::open(settings(0x8100_0A10, enc), false).unwrap();
        let (_, wrapped) = root.generate_dek().unwrap();
        let name = if enc { "unseal_param_encryption" } else { "unseal_plain" };
        grp.bench_function(name, |b| b.iter(|| root.unwrap(&wrapped).unwrap()));
    }
    // With an authorisation value, and with it under a PCR policy (a salted policy
    // session per unseal, encrypting the response).
    let pin = secrecy::SecretString::from("bench-pin".to_string());
    let pcr = Some((tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256, vec![7u8]));
    for (name, pcrs) in [("unseal_auth", None), ("unseal_auth_pcr_policy", pcr)] {
        let s = TpmSettings { auth: Some(TpmAuth::from_pin(&pin)), pcrs, ..settings(0x8100_0A10, true) };
        let root = TpmRoot::open(s, false).unwrap();
        let (_, wrapped) = root.generate_dek().unwrap();
        grp.bench_function(name, |b| b.iter(|| root.unwrap(&wrapped).unwrap()));
    }
    let env = TestEnv::new("bench-tpm");
    std::fs::write(
        &env.config_path,
        format!(
            "[store]\npath = \"{}\"\nmode = \"exclusive\"\n[[roots]]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
            env.store_path.display(),
            t.tcti()
        ),
    )
    .unwrap();
    let g = env.init();
    g.put("github", "a", secret(64, 1), PutOptions::default()).unwrap();
    grp.bench_function("cold_get_first_of_provider", |b| {
        b.iter(|| {
            g.clear_dek_cache();
            g.get("github", "a").unwrap()
        })
    });
    grp.finish();
}

#[cfg(not(feature = "tpm"))]
fn tpm(_c: &mut Criterion) {}

/// The O(rows) verification of the authenticated state that every open (and every
/// CLI command) runs: HMAC-SHA256 over each covered row and a sum.
fn state(c: &mut Criterion) {
    let mut grp = c.benchmark_group("state_verify");
    for n in [1_000usize, 10_000] {
        let env = TestEnv::with_config(&format!("bench-state-{n}"), "mode = \"exclusive\"");
        let g = env.init();
        populate(&g, "github", n, 64);
        grp.throughput(Throughput::Elements(n as u64));
        grp.bench_function(BenchmarkId::from_parameter(n), |b| b.iter(|| g.verify_state().unwrap().rows));
    }
    grp.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = primitives, warm, cold, writes, scale, threads, tpm, state
}
criterion_main!(benches);
