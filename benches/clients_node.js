'use strict';
// The Node client in one run beside the floor of the design it replaces: an
// in-process AES-256-GCM decrypt of one token under a key from the environment (no
// hardware root, no audit, no policy). benches/clients.sh starts the agents.
//
// Prints a Markdown table. Usage: node clients_node.js DURABLE_SOCKET OFF_SOCKET

const crypto = require('node:crypto');
const path = require('node:path');
const { Client } = require(path.join(__dirname, '..', 'clients', 'node'));

async function percentiles(f, n) {
  const t = [];
  for (let i = 0; i < n; i += 1) {
    const s = process.hrtime.bigint();
    await f(i);
    t.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  t.sort((a, b) => a - b);
  return [t[Math.floor(n / 2)], t[Math.floor((n * 99) / 100)]];
}

// `concurrency` calls in flight at once (the Node counterpart of threads).
async function throughput(f, concurrency, perWorker) {
  const s = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: concurrency }, async (_, k) => {
      for (let i = 0; i < perWorker; i += 1) await f(k * perWorker + i);
    }),
  );
  return (concurrency * perWorker) / (Number(process.hrtime.bigint() - s) / 1e9);
}

const fmt = (x) => Math.round(x).toLocaleString('en-US');
const row = (what, [p50, p99], t1, t8) => console.log(`| ${what} | ${fmt(p50)} | ${fmt(p99)} | ${fmt(t1)} | ${fmt(t8)} |`);

async function main() {
  const [durable, off] = process.argv.slice(2);
  console.log('| what | get p50 µs | get p99 µs | gets/s, 1 in flight | gets/s, 8 in flight |');
  console.log('|---|---|---|---|---|');
  for (const [label, socket] of [['Node client, durable read audit', durable], ['Node client, read audit off', off]]) {
    const c = new Client({ socket });
    const get = (i) => c.get('bench', `t${String(i % 100).padStart(3, '0')}`);
    for (let i = 0; i < 200; i += 1) await get(i);
    row(label, await percentiles(get, 3000), await throughput(get, 1, 2000), await throughput(get, 8, 500));
    c.close();
  }
  // The floor: one token sealed with AES-256-GCM under an environment key, decrypted
  // in process on every read.
  const key = crypto.randomBytes(32);
  const iv = crypto.randomBytes(12);
  const e = crypto.createCipheriv('aes-256-gcm', key, iv);
  const data = Buffer.concat([e.update('ghp_00000042_compare_secret_value_padding_to_64_bytes_xxxxxxxxx'), e.final()]);
  const tag = e.getAuthTag();
  const decrypt = () => {
    const d = crypto.createDecipheriv('aes-256-gcm', key, iv);
    d.setAuthTag(tag);
    return Buffer.concat([d.update(data), d.final()]).toString('utf8');
  };
  row('in-process AES-256-GCM decrypt, key from the environment', await percentiles(decrypt, 20000), await throughput(decrypt, 1, 20000), await throughput(decrypt, 8, 2500));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
