'use strict';
// The Node client against a real agent on a real SoftHSM2 token, started by
// clients/testing/agent-fixture.sh (TOKENGUARD_BIN, default target/debug/tokenguard).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const tg = require('..');

const REPO = path.resolve(__dirname, '..', '..', '..');
const FIXTURE = path.join(REPO, 'clients', 'testing', 'agent-fixture.sh');
let dir;
let socket;
let client;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-node-'));
  const out = execFileSync(FIXTURE, ['start', dir], { encoding: 'utf8', timeout: 120000 });
  socket = out.trim().split('\n').pop();
  client = new tg.Client({ socket });
});

after(() => {
  client.close();
  execFileSync(FIXTURE, ['stop', dir], { timeout: 30000 });
  const log = fs.readFileSync(path.join(dir, 'agent.log'), 'utf8');
  assert.ok(!log.includes('panicked'), log);
  fs.rmSync(dir, { recursive: true, force: true });
});

test('a raw secret round-trips as text and bytes, with its metadata on request', async () => {
  const stored = await client.put('github', 'node-ci', 'ghp_node_0123456789', { labels: { team: 'web' } });
  assert.equal(stored.name, 'node-ci');
  assert.equal(await client.get('github', 'node-ci'), 'ghp_node_0123456789');
  assert.deepEqual(await client.getBytes('github', 'node-ci'), Buffer.from('ghp_node_0123456789'));
  const got = await client.getWithMeta('github', 'node-ci');
  assert.equal(got.value, 'ghp_node_0123456789');
  assert.deepEqual(got.meta.labels, { team: 'web' });
  assert.equal(got.meta.kind, 'raw');
  assert.ok((await client.list('github')).some((t) => t.name === 'node-ci'));
  assert.equal((await client.status('github', 'node-ci')).status, 'active');
});

test('binary secrets travel in base64; get says to use getBytes', async () => {
  const blob = Buffer.from([...Array(256).keys()]);
  await client.put('jira', 'node-binary', blob);
  assert.deepEqual(await client.getBytes('jira', 'node-binary'), blob);
  await assert.rejects(client.get('jira', 'node-binary'), (e) => e instanceof tg.InvalidRequest && /getBytes/.test(e.message));
});

test('token sets give every field, or one on request', async () => {
  const fields = { access_token: 'ya29.node', refresh_token: '1//node-refresh' };
  await client.put('google', 'node-svc', null, { tokenSet: fields, scopes: ['email'], tokenType: 'Bearer' });
  assert.deepEqual(await client.tokenSet('google', 'node-svc'), fields);
  assert.equal(await client.get('google', 'node-svc'), 'ya29.node');
  assert.equal(await client.get('google', 'node-svc', { field: 'refresh_token' }), '1//node-refresh');
  assert.equal(await client.getFresh('google', 'node-svc'), 'ya29.node');
});

test('each error kind rejects with its class and exit code, and never holds a secret', async () => {
  await assert.rejects(client.get('github', 'node-missing'), (e) => e instanceof tg.NotFound && e.exitCode === 3);
  await assert.rejects(client.get('stripe', 'live'), (e) => e instanceof tg.Refused && e.exitCode === 9);
  await assert.rejects(client.get('github', 'not a name'), tg.InvalidRequest);
  await client.put('slack', 'node-old', 'xoxb-node-old', { expiresAt: new Date(Date.now() - 60000) });
  await assert.rejects(client.get('slack', 'node-old'), (e) => e instanceof tg.ExpiredOrRevoked && e.kind === 'expired');
  assert.equal(await client.get('slack', 'node-old', { allowExpired: true }), 'xoxb-node-old');
  await client.put('slack', 'node-bot', 'xoxb-node-live');
  await client.revoke('slack', 'node-bot', 'rotated by the node test');
  await assert.rejects(client.get('slack', 'node-bot'), (e) => {
    assert.ok(e instanceof tg.ExpiredOrRevoked && e.kind === 'revoked' && e.exitCode === 7);
    assert.ok(!e.message.includes('xoxb') && !String(e.stack).includes('xoxb'));
    return true;
  });
});

test('over its rate a caller is limited and told when to retry', async () => {
  await client.put('limited', 'node-rate', 'value-rate');
  let limited;
  for (let i = 0; i < 5 && !limited; i += 1) {
    try {
      await client.get('limited', 'node-rate');
    } catch (e) {
      limited = e;
    }
  }
  assert.ok(limited instanceof tg.RateLimited, String(limited));
  assert.equal(limited.exitCode, 10);
  assert.ok(limited.retryAfter > 0 && limited.retryAfter <= 2);
  await new Promise((r) => setTimeout(r, limited.retryAfter * 1000 + 50));
  assert.equal(await client.get('limited', 'node-rate'), 'value-rate');
});

test('an absent agent, or a peer that hangs up, is Unavailable (exit code 11)', async () => {
  const nowhere = new tg.Client({ socket: path.join(dir, 'none.sock'), timeoutMs: 1000 });
  await assert.rejects(nowhere.get('github', 'x'), (e) => e instanceof tg.Unavailable && e.exitCode === 11 && /no socket/.test(e.message));
  const mutePath = path.join(dir, 'mute.sock');
  const mute = net.createServer((c) => c.once('data', () => c.destroy()));
  await new Promise((r) => mute.listen(mutePath, r));
  await assert.rejects(new tg.Client({ socket: mutePath, timeoutMs: 2000 }).ping(), tg.Unavailable);
  await new Promise((r) => mute.close(r));
});

test('many concurrent calls share a bounded pool of connections', async () => {
  for (let i = 0; i < 8; i += 1) await client.put('bench', `node-t${i}`, `value-${i}`);
  const pooled = new tg.Client({ socket, poolSize: 4 });
  const calls = [];
  for (let j = 0; j < 400; j += 1) calls.push(pooled.get('bench', `node-t${j % 8}`).then((v) => [j % 8, v]));
  for (const [i, v] of await Promise.all(calls)) assert.equal(v, `value-${i}`);
  assert.ok(pooled.open <= 4 && pooled.idle.length >= 1, `${pooled.open} open`);
  pooled.close();
});

test('writes and reads after the agent closed idle connections succeed', async () => {
  // The fixture's agent closes connections idle for 1.5 s.
  await client.put('bench', 'node-idle', 'value-1');
  await new Promise((r) => setTimeout(r, 2000));
  await client.put('bench', 'node-idle', 'value-2');
  await new Promise((r) => setTimeout(r, 2000));
  assert.equal(await client.get('bench', 'node-idle'), 'value-2');
  // A close not seen yet when the request goes out: the request was never sent, so
  // even a write goes out once more on a fresh connection.
  for (const c of client.idle) {
    c.sock.removeAllListeners('close');
    c.sock.removeAllListeners('error');
    c.sock.destroy();
  }
  await client.put('bench', 'node-idle', 'value-3');
  assert.equal(await client.get('bench', 'node-idle'), 'value-3');
});

test('a request sent on a connection that then closes is retried only if it changes nothing', async () => {
  // A fake agent: answers the first request of each connection, and closes the
  // connection on the second without answering.
  const seen = [];
  const fakePath = path.join(dir, 'fake.sock');
  const fake = net.createServer((conn) => {
    let buf = Buffer.alloc(0);
    let n = 0;
    conn.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const req = JSON.parse(buf.subarray(4, 4 + buf.readUInt32BE(0)).toString());
        buf = buf.subarray(4 + buf.readUInt32BE(0));
        seen.push(req.op);
        n += 1;
        if (n === 2) {
          conn.destroy();
          return;
        }
        const body = Buffer.from(JSON.stringify({ v: 1, id: req.id, ok: true, result: { stored: {} } }));
        const head = Buffer.alloc(4);
        head.writeUInt32BE(body.length);
        conn.write(Buffer.concat([head, body]));
      }
    });
  });
  await new Promise((r) => fake.listen(fakePath, r));
  const c = new tg.Client({ socket: fakePath, timeoutMs: 2000, poolSize: 1 });
  await c.ping();
  await assert.rejects(c.put('p', 'n', 'v'), tg.Unavailable);
  assert.deepEqual(seen, ['ping', 'put'], 'the write was sent once, not again');
  await c.ping();
  await c.status('p', 'n').catch(() => {});
  // A read on a connection that closed after receiving it is sent once more.
  assert.deepEqual(seen, ['ping', 'put', 'ping', 'status', 'status']);
  c.close();
  await new Promise((r) => fake.close(r));
});

test('a request that cannot be encoded costs no connection slot', async () => {
  const c = new tg.Client({ socket, poolSize: 1, timeoutMs: 2000 });
  for (let i = 0; i < 3; i += 1) {
    await assert.rejects(c.put('bench', 'node-bigint', 'v', { labels: { n: 10n } }), TypeError);
  }
  await c.put('bench', 'node-bigint', 'v');
  c.close();
});

test('the socket is found as the CLI finds it', () => {
  assert.equal(tg.findSocket({ TOKENGUARD_SOCKET: '/run/x/env.sock' }), '/run/x/env.sock');
  assert.equal(tg.findSocket({ TOKENGUARD_CONFIG: path.join(dir, 'tokenguard.toml') }), socket);
  assert.equal(tg.findSocket({ TOKENGUARD_CONFIG: path.join(dir, 'none.toml') }), tg.DEFAULT_SOCKET);
  const text = '[store]\nsocket = "/wrong"\n[agent]\n# c\nsocket_group = "x"\nsocket = "/run/a \\"q\\".sock" # t\n';
  assert.equal(tg._scanSocket(text), '/run/a "q".sock');
  assert.equal(tg._scanSocket('[agent.allow]\nsocket = "/no"\n'), null);
});
