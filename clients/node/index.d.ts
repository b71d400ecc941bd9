// Types of tokenguard-client (index.js). The protocol is docs/PROTOCOL.md.

export declare const DEFAULT_SOCKET: string;

/** The socket the CLI would use: TOKENGUARD_SOCKET, the configuration's `[agent] socket`, then the default. */
export declare function findSocket(env?: NodeJS.ProcessEnv): string;

export declare class TokenguardError extends Error {
  /** The agent's stable error kind: `not_found`, `refused`, `rate_limited`, … */
  readonly kind: string;
  /** What to do next, when the agent said. */
  readonly hint: string | null;
  /** The CLI's exit code for this error. */
  readonly exitCode: number;
  readonly retryAfterMs: number | null;
}
/** No such token, field or store (exit code 3). */
export declare class NotFound extends TokenguardError {}
/** Expired, revoked, shredded, or its refresh token needs the user again (exit code 7). */
export declare class ExpiredOrRevoked extends TokenguardError {}
/** No rule of the agent's policy allows it (exit code 9). */
export declare class Refused extends TokenguardError {}
/** Over the caller's rate (exit code 10). */
export declare class RateLimited extends TokenguardError {
  /** Seconds until one more request would be allowed. */
  readonly retryAfter: number;
}
/** The agent does not answer, or is in lockdown (exit code 11, or 5 locked). */
export declare class Unavailable extends TokenguardError {}
/** Tampering, corruption or a wrong root key (exit code 4). */
export declare class IntegrityError extends TokenguardError {}
/** A malformed request or bad input (exit code 2). */
export declare class InvalidRequest extends TokenguardError {}

export interface ClientOptions {
  /** Default: findSocket(). */
  socket?: string | null;
  /** Bound on each request, ms (default 10000). */
  timeoutMs?: number;
  /** Connections open at once at most (default 8). */
  poolSize?: number;
}

export interface GetOptions {
  /** A field of a token set (default: the access token). */
  field?: string;
  /** Serve a token past its not-after. */
  allowExpired?: boolean;
}

export interface TokenMeta {
  created: string;
  created_unix: number;
  updated: string;
  updated_unix: number;
  expires_at: string | null;
  expires_at_unix: number | null;
  kind: 'raw' | 'token_set';
  token_type: string | null;
  scopes: string[];
  labels: Record<string, string>;
  [key: string]: unknown;
}

export interface PutOptions {
  tokenSet?: Record<string, string>;
  /** Unix seconds or a Date. */
  expiresAt?: number | Date;
  labels?: Record<string, string>;
  scopes?: string[];
  tokenType?: string;
  /** Replace an existing token (default true). */
  overwrite?: boolean;
}

export interface Stored {
  provider: string;
  name: string;
  replaced: boolean;
  meta: TokenMeta;
}

export type TokenStatus = 'active' | 'expired' | 'needs_reauth' | 'revoked' | 'shredded';

export declare class Client {
  constructor(options?: ClientOptions);
  readonly socketPath: string;
  /** Any operation of docs/PROTOCOL.md: resolves to its `result`. */
  call(request: { op: string; [field: string]: unknown }): Promise<any>;
  ping(): Promise<{ agent: string; protocol: number; locked: boolean; read_audit: string }>;
  get(provider: string, name: string, options?: GetOptions): Promise<string>;
  getBytes(provider: string, name: string, options?: GetOptions): Promise<Buffer>;
  getWithMeta(provider: string, name: string, options?: GetOptions): Promise<{ value: string; meta: TokenMeta }>;
  /** As get, refreshed first by the agent when it is due (one refresh for all callers). */
  getFresh(provider: string, name: string, options?: { field?: string }): Promise<string>;
  tokenSet(provider: string, name: string, options?: { allowExpired?: boolean }): Promise<Record<string, string>>;
  list(provider?: string): Promise<Array<{ provider: string; name: string; [key: string]: unknown }>>;
  status(provider: string, name: string): Promise<{ status: TokenStatus; provider: string; name: string; [key: string]: unknown }>;
  /** A raw secret (string or bytes), or `options.tokenSet` with `value` null. */
  put(provider: string, name: string, value: string | Uint8Array | null, options?: PutOptions): Promise<Stored>;
  delete(provider: string, name: string): Promise<void>;
  revoke(provider: string, name: string, reason: string): Promise<unknown>;
  /** Closes the idle connections. */
  close(): void;
}
