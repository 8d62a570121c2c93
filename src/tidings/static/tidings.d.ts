// Type declarations of tidings.js, the browser client of tidings (served at /tidings.d.ts,
// shipped beside the module in the Python package and in its package.json's `exports`).
//
// Written by hand beside the JavaScript, which stays a plain ES module with no build step;
// tests/test_typescript.py keeps the two in step: `tsc --noEmit` (strict) on a typed example
// that uses every part of the API, a mistyped one that must be rejected, and a comparison of
// these declarations with the module's exports at run time.

/** A transport, in the order the client prefers them. */
export type Transport = "websocket" | "sse" | "longpoll" | "poll";

/** A subscription's state: `"closed"` is final (unsubscribed, or the server said stop). */
export type SubscriptionState = "connecting" | "connected" | "closed";

/**
 * A channel's position: the epoch of its history and the offset of the last publication
 * delivered. `(epoch, offset)` is what a reconnect resumes from, on any transport.
 */
export interface Position {
  epoch: string;
  offset: number;
}

/** A present client, as `presence()` reports it (Centrifugo's `ClientInfo`). */
export interface ClientInfo {
  /** The user id of the connection token; `""` for an anonymous user. */
  user: string;
  /** The client (connection) id the server gave it. */
  client: string;
  /** The token's `info` claim (connection info), when it has one. */
  conn_info?: unknown;
  /** The subscription token's `info` claim (channel info), when it has one. */
  chan_info?: unknown;
}

/**
 * Who published, when a client did: fields the server has no value for are absent
 * (an anonymous publisher has no `user`).
 */
export interface PublisherInfo {
  user?: string;
  client?: string;
  conn_info?: unknown;
  chan_info?: unknown;
}

/** A publication as a subscription delivers it, whatever the transport. */
export interface Publication<T = unknown> {
  /** The channel it was published to. */
  channel: string;
  /** The JSON value that was published. */
  data: T;
  /** Its place in the channel's history: strictly increasing within one epoch. */
  offset: number;
  /** The epoch of the channel's history it belongs to. */
  epoch: string;
  /** The publisher, when a client published it. */
  info?: PublisherInfo;
  /** Tags given by the publisher. */
  tags?: Record<string, string>;
  /** Milliseconds since the Unix epoch when the server accepted it, when it says. */
  time?: number;
}

/** A publication of a history result: the channel and epoch are the result's. */
export interface HistoryPublication<T = unknown> {
  data: T;
  offset: number;
  info?: PublisherInfo;
  tags?: Record<string, string>;
  time?: number;
}

/** What `history()` resolves with. */
export interface HistoryResult<T = unknown> {
  /** The publications asked for, oldest first unless `reverse`. */
  publications: HistoryPublication<T>[];
  /** The epoch of the channel's history. */
  epoch: string;
  /** The offset of the channel's latest publication. */
  offset: number;
}

/** Options of `history()`. */
export interface HistoryOptions {
  /** How many publications: `-1` (the default) all the history keeps, `0` only the position. */
  limit?: number;
  /** Only publications after this position. */
  since?: Position | null;
  /** Newest first. */
  reverse?: boolean;
}

/** What `presenceStats()` resolves with. */
export interface PresenceStats {
  num_clients: number;
  num_users: number;
}

/** What `publish()` resolves with: an empty object (the server acknowledges, nothing more). */
export type PublishResult = Record<string, never>;

/** What `health()` resolves with. */
export interface Health {
  /** Whether `GET /ready` answered 200. */
  ok: boolean;
  /** Seconds a 503 asked the client to wait (its `Retry-After`), or null. */
  retryAfter: number | null;
}

/** A function that returns a token, at once or later; `null` when there is none. */
export type TokenSource<Args extends unknown[] = []> = (
  ...args: Args
) => string | null | Promise<string | null>;

/** Options of `new Tidings(baseUrl, options)`. Durations are in milliseconds unless said. */
export interface Options {
  /** A connection token (JWT). */
  token?: string | null;
  /** Returns a connection token: called to connect and again before the token expires. */
  getToken?: TokenSource | null;
  /** Returns the subscription token of a channel that needs one, or null. */
  getSubscriptionToken?: TokenSource<[channel: string]> | null;
  /** The transports allowed, in order of preference (default: all four, best first). */
  transports?: readonly Transport[];
  /** The WebSocket endpoint (default: `baseUrl` with `ws(s):` + `/connection/websocket`). */
  wsUrl?: string | null;
  /** The SSE endpoint (default: `baseUrl + "/sse"`). */
  sseUrl?: string | null;
  /** The long-poll and poll endpoint (default: `baseUrl + "/poll"`). */
  pollUrl?: string | null;
  /** Asked to tell a blocked transport from a server that is down (default: `baseUrl + "/ready"`). */
  healthUrl?: string | null;
  /** The prefix of `POST <callUrl>/<method>`, used when no WebSocket carries a call (default: `baseUrl + "/call"`). */
  callUrl?: string | null;
  /** For a WebSocket to be connected and subscribed, or an SSE stream to say `subscribed` (default 5000). */
  openTimeout?: number;
  /** For one HTTP request, beyond a long-poll's hold, and for one call (default 10000). */
  requestTimeout?: number;
  /** Seconds the server may hold a long-poll (default 25). */
  longPollTimeout?: number;
  /** Between two polls (default 2000). */
  pollInterval?: number;
  /** The first reconnect delay, doubled per failed attempt, with jitter (default 250). */
  minBackoff?: number;
  /** The longest reconnect delay (default 20000). */
  maxBackoff?: number;
  /** Silence tolerated beyond the server's announced ping interval (twice it on SSE) before the connection is taken for dead and reopened (default 10000). */
  pingMargin?: number;
  /** After a fallback, try the better transports in the background and move back up (default true). */
  probe?: boolean;
  /** Before the first probe, with jitter; doubled per failed probe (default 5000). */
  probeMinDelay?: number;
  /** The longest delay between probes (default 120000). */
  probeMaxDelay?: number;
  /** Tokens are refreshed when this fraction of their lifetime is left (default 0.2). */
  refreshMargin?: number;
  /** Log reconnects, fallbacks and probes to `console.debug` (default false). */
  debug?: boolean;
}

/** The options a client runs with: every option, its default where it was not given. */
export type ResolvedOptions = { readonly [K in keyof Options]-?: Exclude<Options[K], undefined> };

/** The endpoints a client uses, from `baseUrl` and the `*Url` options. */
export interface Endpoints {
  readonly websocket: string;
  readonly sse: string;
  readonly poll: string;
  readonly health: string;
  readonly call: string;
}

/** An error the server (or the network) gave the subscription, when it has a code. */
export type SubscriptionError = Error & { readonly code?: number };

/** The third argument of `subscribe()`: callbacks, and this subscription's own settings. */
export interface SubscribeHandlers {
  /**
   * History no longer reaches these channels' positions (a restart of the in-memory broker,
   * or away too long): they continue from "now"; reload their state from your backend.
   */
  onUnrecovered?: (channels: string[]) => void;
  /** The subscription now delivers over this transport. */
  onTransport?: (name: Transport) => void;
  /** The subscription's state changed. */
  onState?: (state: SubscriptionState) => void;
  /** An error: a refusal that closes the subscription (with the server's code), or one it recovers from. */
  onError?: (err: SubscriptionError) => void;
  /** The transports this subscription may use, in order (default: the client's `transports`). */
  transports?: readonly Transport[];
  /** Where to start: a cursor (`sub.cursor()` of an earlier subscription) or positions. */
  since?: string | ReadonlyMap<string, Position> | null;
}

/** A stream of publications of some channels, over whichever transport works. */
export interface Subscription {
  /** The channels it follows (a channel the server unsubscribes it from leaves the list). */
  readonly channels: readonly string[];
  /** Each channel's position: the last publication delivered, or where it started. */
  readonly positions: ReadonlyMap<string, Position>;
  /** The transport in use, null before the first one is established. */
  readonly transport: Transport | null;
  /** Its state; `onState` reports each change. */
  readonly state: SubscriptionState;
  /** The cursor of the current positions (for `since`, or the HTTP transports), null when none is known yet. */
  cursor(): string | null;
  /** Switch to this transport now and stay there (no probe moves it back up); it must be allowed. */
  useTransport(name: Transport): void;
  /** Stop following the channels; the state becomes `"closed"`. */
  unsubscribe(): void;
}

/** The client: subscriptions, and calls over the page's WebSocket or over HTTP. */
export declare class Tidings {
  /**
   * @param baseUrl The server's URL (`http(s)://host:port`); default: the page's origin.
   * @param options See {@link Options}.
   */
  constructor(baseUrl?: string | null, options?: Options);
  /** The server's URL, without a trailing slash. */
  readonly baseUrl: string;
  /** The options in force. */
  readonly options: ResolvedOptions;
  /** The endpoints in use. */
  readonly urls: Endpoints;
  /**
   * Follow channels. `onPublication` is called once per publication, in offset order per
   * channel, whatever the transport and across reconnects and switches.
   */
  subscribe<T = unknown>(
    channels: string | readonly string[],
    onPublication: (pub: Publication<T>) => void,
    handlers?: SubscribeHandlers,
  ): Subscription;
  /** Publish to a channel (the namespace must let clients publish). */
  publish(channel: string, data: unknown): Promise<PublishResult>;
  /** A channel's history. */
  history<T = unknown>(channel: string, options?: HistoryOptions): Promise<HistoryResult<T>>;
  /** Who is subscribed to a channel, by client id. */
  presence(channel: string): Promise<Record<string, ClientInfo>>;
  /** How many clients and users are subscribed to a channel. */
  presenceStats(channel: string): Promise<PresenceStats>;
  /** Call the server's RPC handler of `method` with `data`: resolves with its result. */
  rpc<T = unknown>(method: string, data?: unknown): Promise<T>;
  /** The connection token: the last one, or a fresh one from `getToken` when due (or `force`). */
  connectionToken(force?: boolean): Promise<string | null>;
  /** The subscription token of a channel, from `getSubscriptionToken`. */
  subscriptionToken(channel: string): Promise<string | null>;
  /** Whether the server answers `GET /ready`, and how long a 503 asks to wait. */
  health(): Promise<Health>;
  /** Whether the server answers `GET /ready` with 200. */
  healthy(): Promise<boolean>;
  /** Stop every subscription. */
  close(): void;
}

/**
 * Every failed call rejects with one: over WebSocket or HTTP alike.
 * `code` is the server's (103 permission denied, 108 not available, 100 internal, ...),
 * 0 for a network failure or a timeout.
 */
export declare class TidingsError extends Error {
  constructor(code: number, message?: string | null, temporary?: boolean, retryAfter?: number | null);
  readonly code: number;
  /** Worth retrying: a hook past its timeout, a 503, the network. */
  readonly temporary: boolean;
  /** Seconds a 503 asked to wait, or null. */
  readonly retryAfter: number | null;
}

/** The transports, best first. */
export declare const TRANSPORTS: readonly ["websocket", "sse", "longpoll", "poll"];

/** The cursor (as `/sse` and `/poll` take it) of positions: a `Map`, or any iterable of entries. */
export declare function encodeCursor(positions: Iterable<readonly [string, Position]>): string;

/** The positions of a cursor; null when it cannot be read. */
export declare function decodeCursor(cursor: string): Map<string, Position> | null;

/** The delay (ms) before attempt number `attempt`: exponential from `min` to `max`, drawn from the upper half. */
export declare function backoff(attempt: number, min: number, max: number): number;

/** Seconds a `Retry-After` header asks for (delay-seconds or an HTTP date); null without one. */
export declare function parseRetryAfter(value: string | null | undefined): number | null;

/** The delay (ms) after a refusal with `Retry-After`: at least what the server asked, plus jitter. */
export declare function retryAfterDelay(seconds: number): number;

export default Tidings;
