'use strict';
// Client for the tokenguard agent (`tokenguard serve`), written from docs/PROTOCOL.md:
// frames of a 4-byte big-endian length and one JSON object, over a Unix socket.
// No runtime dependencies. Nothing here logs, and error messages never hold a secret.

const net = require('node:net');
const fs = require('node:fs');
const path = require('node:path');

const VERSION = 1;
const DEFAULT_SOCKET = '/run/tokenguard/agent.sock';
const MAX_RESPONSE = 16 << 20;
const MAX_REQUEST = 512 << 10;
// Requests that change nothing: sent once more on a fresh connection when a pooled
// one turns out to have been closed by the agent (its idle timeout).
const IDEMPOTENT = new Set(['ping', 'get', 'get_fresh', 'token_set', 'list', 'status', 'stats']);

class TokenguardError extends Error {
  constructor(kind, message, { hint = null, exitCode = 1, retryAfterMs = null } = {}) {
    super(hint ? `${message} (hint: ${hint})` : message);
    this.name = this.constructor.name;
    this.kind = kind;
    this.hint = hint;
    this.exitCode = exitCode;
    this.retryAfterMs = retryAfterMs;
  }
}
class NotFound extends TokenguardError {}
class ExpiredOrRevoked extends TokenguardError {}
class Refused extends TokenguardError {}
class RateLimited extends TokenguardError {
  get retryAfter() {
    return (this.retryAfterMs || 0) / 1000;
  }
}
class Unavailable extends TokenguardError {}
class IntegrityError extends TokenguardError {}
class InvalidRequest extends TokenguardError {}

const KINDS = {
  not_found: NotFound,
  expired: ExpiredOrRevoked,
  revoked: ExpiredOrRevoked,
  shredded: ExpiredOrRevoked,
  needs_reauth: ExpiredOrRevoked,
  refused: Refused,
  rate_limited: RateLimited,
  unavailable: Unavailable,
  locked: Unavailable,
  integrity: IntegrityError,
  invalid: InvalidRequest,
};

function errorFromWire(e) {
  const Cls = KINDS[e.kind] || TokenguardError;
  return new Cls(String(e.kind || 'other'), String(e.message || 'the agent reported an error'), {
    hint: e.hint || null,
    exitCode: Number.isInteger(e.exit_code) ? e.exit_code : 1,
    retryAfterMs: Number.isInteger(e.retry_after_ms) ? e.retry_after_ms : null,
  });
}

function unavailable(socketPath, detail) {
  return new Unavailable('unavailable', `the tokenguard agent at ${socketPath} is unavailable: ${detail}`, {
    hint: "is `tokenguard serve` running? (see docs/PROTOCOL.md, 'Finding the socket')",
    exitCode: 11,
  });
}

// `[agent] socket` of a tokenguard configuration, read line by line (the one key
// a client needs; a TOML library would be a runtime dependency). Knows table headers,
// arrays of tables ([[agent.allow]]) and a top-level `agent.socket = …`; not inline
// tables.
function scanSocket(text) {
  const str = String.raw`("(?:[^"\\]|\\.)*"|'[^']*')`;
  const header = /^\s*\[\[?\s*([A-Za-z0-9_."-]+)\s*\]\]?\s*(#.*)?$/;
  const key = new RegExp(String.raw`^\s*socket\s*=\s*` + str + String.raw`\s*(#.*)?$`);
  const dotted = new RegExp(String.raw`^\s*agent\s*\.\s*socket\s*=\s*` + str + String.raw`\s*(#.*)?$`);
  const unquote = (v) => (v.startsWith('"') ? JSON.parse(v) : v.slice(1, -1));
  let table = '';
  for (const line of text.split(/\r?\n/)) {
    const t = header.exec(line);
    if (t) {
      table = t[1];
      continue;
    }
    const m = table === 'agent' ? key.exec(line) : table === '' ? dotted.exec(line) : null;
    if (m) return unquote(m[1]);
  }
  return null;
}

// The socket, found as the CLI finds it: TOKENGUARD_SOCKET, then `[agent] socket`
// of the configuration (TOKENGUARD_CONFIG, $XDG_CONFIG_HOME/tokenguard/tokenguard.toml
// or ~/.config/tokenguard/tokenguard.toml, /etc/tokenguard/tokenguard.toml; a relative
// path is relative to that file), then /run/tokenguard/agent.sock.
function findSocket(env = process.env) {
  if (env.TOKENGUARD_SOCKET) return env.TOKENGUARD_SOCKET;
  let candidates;
  if (env.TOKENGUARD_CONFIG) candidates = [env.TOKENGUARD_CONFIG];
  else {
    candidates = [];
    if (env.XDG_CONFIG_HOME && path.isAbsolute(env.XDG_CONFIG_HOME)) {
      candidates.push(path.join(env.XDG_CONFIG_HOME, 'tokenguard', 'tokenguard.toml'));
    } else if (env.HOME) {
      candidates.push(path.join(env.HOME, '.config', 'tokenguard', 'tokenguard.toml'));
    }
    candidates.push('/etc/tokenguard/tokenguard.toml');
  }
  for (const file of candidates) {
    let text;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    const sock = scanSocket(text);
    return sock ? path.resolve(path.dirname(path.resolve(file)), sock) : DEFAULT_SOCKET;
  }
  return DEFAULT_SOCKET;
}

function wireValue(value) {
  if (typeof value === 'string') return { value, encoding: 'utf8' };
  if (value instanceof Uint8Array) return { value: Buffer.from(value).toString('base64'), encoding: 'base64' };
  throw new TypeError('a secret is a string or a Uint8Array');
}

function textOf(v, what) {
  if (typeof v.value !== 'string') throw new Error('its answer has no value');
  if (v.encoding === 'base64') {
    throw new InvalidRequest('invalid', `${what} is binary, not text; use getBytes()`, { exitCode: 2 });
  }
  return v.value;
}

function bytesOf(v) {
  if (typeof v.value !== 'string') throw new Error('its answer has no value');
  return v.encoding === 'base64' ? Buffer.from(v.value, 'base64') : Buffer.from(v.value, 'utf8');
}

function tokenRequest(op, provider, name, fields = {}) {
  const req = { op, provider, name };
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null && v !== false) req[k] = v;
  return req;
}

// One connection: requests answered in order, one at a time. Idle, it does not keep
// the process alive (unref).
class Connection {
  constructor(sock) {
    this.sock = sock;
    this.used = false;
    this.chunks = [];
    this.buffered = 0;
    this.waiter = null;
    this.dead = null;
    sock.on('data', (chunk) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      this.deliver();
    });
    const fail = (err) => {
      this.dead = err || new Error('closed');
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = null;
        w.reject(this.dead);
      }
    };
    sock.on('error', fail);
    sock.on('close', () => fail(null));
  }

  // The first `n` buffered bytes, joined once (not on every chunk).
  peek(n) {
    if (this.chunks.length > 1 && this.chunks[0].length < n) {
      this.chunks = [Buffer.concat(this.chunks, this.buffered)];
    }
    return this.chunks[0].subarray(0, n);
  }

  take(n) {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.buffered);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  deliver() {
    if (!this.waiter || this.buffered < 4) return;
    const n = this.peek(4).readUInt32BE(0);
    if (n === 0 || n > MAX_RESPONSE) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(new Error(`an answer frame of ${n} bytes`));
      return;
    }
    if (this.buffered < 4 + n) return;
    this.take(4);
    const body = this.take(n);
    const w = this.waiter;
    this.waiter = null;
    w.resolve(body);
  }

  // Sends `frame` and resolves to the answer's body. A failure before the frame was
  // handed to the kernel is marked `notSent`: the agent cannot have acted on it.
  exchange(frame, timeoutMs) {
    const notSent = (e) => Object.assign(e, { notSent: true });
    if (this.dead) return Promise.reject(notSent(this.dead));
    if (this.sock.destroyed || !this.sock.writable) {
      return Promise.reject(notSent(Object.assign(new Error('the connection is closed'), { code: 'ECONNRESET' })));
    }
    this.sock.ref();
    return new Promise((resolve, reject) => {
      let written = false;
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(Object.assign(new Error(`no answer within ${timeoutMs} ms`), { code: 'ETIMEDOUT' }));
      }, timeoutMs);
      this.waiter = {
        resolve: (b) => {
          clearTimeout(timer);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(written ? e : notSent(e));
        },
      };
      this.sock.write(frame, (err) => {
        if (!err) written = true;
      });
      this.deliver();
    }).finally(() => {
      if (!this.sock.destroyed) this.sock.unref();
    });
  }

  close() {
    this.sock.destroy();
  }
}

class Client {
  // `socket` defaults to the one the CLI would use; `timeoutMs` bounds each request;
  // at most `poolSize` connections are open at once (the agent allows 32 per uid by
  // default), and further calls wait for one.
  constructor({ socket = null, timeoutMs = 10000, poolSize = 8 } = {}) {
    this.socketPath = socket || findSocket();
    this.timeoutMs = timeoutMs;
    this.poolSize = poolSize;
    this.idle = [];
    this.open = 0;
    this.queue = [];
    this.nextId = 1;
  }

  connect() {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(this.socketPath);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(unavailable(this.socketPath, `no connection within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new Connection(sock));
      });
      sock.once('error', (e) => {
        clearTimeout(timer);
        const detail =
          e.code === 'ENOENT'
            ? 'no socket there'
            : e.code === 'ECONNREFUSED'
              ? 'nothing listens on the socket'
              : e.code === 'EACCES'
                ? 'permission denied: this user may not connect (see [agent] socket_group)'
                : e.code || 'connection failed';
        reject(unavailable(this.socketPath, detail));
      });
    });
  }

  async acquire() {
    for (;;) {
      const c = this.idle.pop();
      if (c && !c.dead) return c;
      if (c) {
        this.open -= 1;
        continue;
      }
      if (this.open < this.poolSize) {
        this.open += 1;
        try {
          return await this.connect();
        } catch (e) {
          this.open -= 1;
          this.wake();
          throw e;
        }
      }
      await new Promise((resolve, reject) => {
        const waiter = () => {
          clearTimeout(timer);
          resolve();
        };
        const timer = setTimeout(() => {
          this.queue = this.queue.filter((w) => w !== waiter);
          reject(unavailable(this.socketPath, `no free connection within ${this.timeoutMs} ms`));
        }, this.timeoutMs);
        this.queue.push(waiter);
      });
    }
  }

  release(c, keep) {
    if (keep && !c.dead) {
      c.used = true;
      this.idle.push(c);
    } else {
      c.close();
      this.open -= 1;
    }
    this.wake();
  }

  wake() {
    const next = this.queue.shift();
    if (next) next();
  }

  // Sends one request ({op, ...fields}, docs/PROTOCOL.md) and resolves to its
  // `result`; the agent's errors reject as their TokenguardError subclass.
  async call(req) {
    const op = String(req.op);
    for (let attempt = 0; attempt < 2; attempt += 1) {
      const id = this.nextId++;
      // Built before a connection is taken: a request that cannot be encoded
      // (a BigInt, a cycle) costs no pool slot.
      const body = Buffer.from(JSON.stringify({ v: VERSION, id, ...req }), 'utf8');
      if (body.length > MAX_REQUEST) {
        throw new InvalidRequest('invalid', `a request of ${body.length} bytes (the agent takes at most ${MAX_REQUEST})`, {
          exitCode: 2,
        });
      }
      const frame = Buffer.alloc(4 + body.length);
      frame.writeUInt32BE(body.length, 0);
      body.copy(frame, 4);
      const c = await this.acquire();
      let keep = false;
      try {
        let answer;
        try {
          answer = await c.exchange(frame, this.timeoutMs);
        } catch (e) {
          // Not sent: safe to send again whatever it is. Sent, and the connection
          // closed before an answer: only requests that change nothing.
          const retry = e.code !== 'ETIMEDOUT' && attempt === 0 && (e.notSent || (c.used && IDEMPOTENT.has(op)));
          if (retry) continue;
          throw unavailable(this.socketPath, e.code === 'ETIMEDOUT' ? e.message : `the connection failed (${e.code || e.message})`);
        }
        let r;
        try {
          r = JSON.parse(answer.toString('utf8'));
        } catch {
          throw unavailable(this.socketPath, 'its answer is not JSON');
        }
        if (r === null || typeof r !== 'object' || Array.isArray(r)) {
          throw unavailable(this.socketPath, 'its answer is not a JSON object');
        }
        const untied = (r.id === undefined || r.id === null) && r.ok !== true;
        if (r.id !== id && !untied) throw unavailable(this.socketPath, 'it answered another request');
        keep = !untied;
        if (r.ok === true) return r.result;
        if (r.error && typeof r.error === 'object') throw errorFromWire(r.error);
        throw unavailable(this.socketPath, 'its answer has neither a result nor an error');
      } finally {
        this.release(c, keep);
      }
    }
    throw unavailable(this.socketPath, 'the connection failed twice');
  }

  close() {
    for (const c of this.idle.splice(0)) {
      c.close();
      this.open -= 1;
    }
  }

  ping() {
    return this.call({ op: 'ping' });
  }

  async get(provider, name, { field, allowExpired } = {}) {
    const r = await this.call(tokenRequest('get', provider, name, { field, allow_expired: allowExpired }));
    return textOf(r, `${provider}/${name}`);
  }

  async getBytes(provider, name, { field, allowExpired } = {}) {
    return bytesOf(await this.call(tokenRequest('get', provider, name, { field, allow_expired: allowExpired })));
  }

  async getWithMeta(provider, name, { field, allowExpired } = {}) {
    const r = await this.call(tokenRequest('get', provider, name, { field, allow_expired: allowExpired, meta: true }));
    return { value: textOf(r, `${provider}/${name}`), meta: r.meta };
  }

  async getFresh(provider, name, { field } = {}) {
    return textOf(await this.call(tokenRequest('get_fresh', provider, name, { field })), `${provider}/${name}`);
  }

  async tokenSet(provider, name, { allowExpired } = {}) {
    const r = await this.call(tokenRequest('token_set', provider, name, { allow_expired: allowExpired }));
    const out = {};
    for (const [k, v] of Object.entries(r.fields || {})) out[k] = textOf(v, `${provider}/${name} field ${k}`);
    return out;
  }

  async list(provider) {
    const r = await this.call(provider === undefined ? { op: 'list' } : { op: 'list', provider });
    return r.tokens || [];
  }

  status(provider, name) {
    return this.call(tokenRequest('status', provider, name));
  }

  async put(provider, name, value, { tokenSet, expiresAt, labels, scopes, tokenType, overwrite = true } = {}) {
    if ((value === undefined || value === null) === (tokenSet === undefined || tokenSet === null)) {
      throw new TypeError('put takes a value or a tokenSet, not both or neither');
    }
    const req = { op: 'put', provider, name, overwrite };
    if (value !== undefined && value !== null) Object.assign(req, wireValue(value));
    else req.token_set = { ...tokenSet };
    if (expiresAt !== undefined && expiresAt !== null) {
      req.expires_at = expiresAt instanceof Date ? Math.floor(expiresAt.getTime() / 1000) : Math.floor(expiresAt);
    }
    if (labels) req.labels = { ...labels };
    if (scopes && scopes.length) req.scopes = [...scopes];
    if (tokenType) req.token_type = tokenType;
    const r = await this.call(req);
    return r.stored || {};
  }

  async delete(provider, name) {
    await this.call(tokenRequest('delete', provider, name));
  }

  revoke(provider, name, reason) {
    return this.call(tokenRequest('revoke', provider, name, { reason }));
  }
}

module.exports = {
  Client,
  TokenguardError,
  NotFound,
  ExpiredOrRevoked,
  Refused,
  RateLimited,
  Unavailable,
  IntegrityError,
  InvalidRequest,
  findSocket,
  DEFAULT_SOCKET,
  _scanSocket: scanSocket,
};
