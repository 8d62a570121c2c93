// tidings.js — the browser client of tidings. An ES module, no build step, no dependencies.
//
//   import { Tidings } from "/tidings.js";
//   const t = new Tidings("http://localhost:8000");
//   const sub = t.subscribe(["news"], (pub) => console.log(pub.channel, pub.data), {
//     onUnrecovered: (channels) => reloadState(channels),
//     onTransport: (name) => console.log("now on", name),
//   });
//   await t.publish("news", { text: "hi" });      // the page's WebSocket, else POST /call/publish
//   const sum = await t.rpc("add", { a: 1, b: 2 }); // a server RPC handler's result
//   sub.unsubscribe();
//
// Transports, in order of preference: WebSocket (Centrifugo client protocol v2, JSON),
// SSE (EventSource), long-poll and poll (fetch). A transport that cannot be established
// while the server answers /ready is considered blocked and the next one is tried; the
// per-channel position (epoch, offset) is carried over, so nothing is missed within the
// server's history window, and a channel that cannot be recovered is reported.
//
// Self-healing. A connection that goes silent is dead even when the browser still calls it
// open (a proxy that stops forwarding without closing): the WebSocket's connect reply says
// how often the server pings (`ping`, seconds), SSE's `subscribed` event how often it sends
// `event: ping`; no message within that interval (twice it on SSE) plus `pingMargin` ms and
// the connection is closed and reopened from the last delivered position. A long-poll is
// bounded by requestTimeout already. After falling back, a probe (first after about
// `probeMinDelay` ms, then backing off with jitter up to `probeMaxDelay`) opens each better
// transport from the current position while the current one keeps delivering; the first
// one established takes over (onTransport) and the old one is closed. Both feed the same
// dedupe by (channel, epoch, offset), so the switch loses and repeats nothing.
//
// Calls (publish, history, presence, presenceStats, rpc) go over the page's live WebSocket
// when it has one, else as one `POST <callUrl>/<method>` with the connection token as a
// Bearer credential: a network that blocks WebSocket does not block calls. Either way a
// failure rejects with the same TidingsError(code, message, temporary).
//
// Back-off: a server at capacity answers 503 with Retry-After (a WebSocket handshake too,
// whose status a browser hides; /ready then says the same). The client waits that long,
// times 1 to 1.5 so that refused clients do not all come back at once, and does not take
// the refusal for a blocked transport. Other failures back off exponentially with jitter.
//
// Options of new Tidings(baseUrl, options) (milliseconds unless said otherwise):
//   token                  string | null      a connection token (JWT)
//   getToken               async () => token  called to connect and before the token expires
//   getSubscriptionToken   async (channel) => token | null
//   transports             string[]           allowed, in order: websocket, sse, longpoll, poll
//   wsUrl, sseUrl, pollUrl, healthUrl, callUrl   override one endpoint (default: from baseUrl)
//   openTimeout     5000   a WebSocket to connect and subscribe / SSE to say "subscribed"
//   requestTimeout  10000  one HTTP request (beyond the long-poll hold), and one call
//   longPollTimeout 25     seconds the server may hold a long-poll
//   pollInterval    2000   between polls
//   minBackoff, maxBackoff 250, 20000   reconnect delays (exponential, jitter)
//   pingMargin      10000  silence tolerated beyond the server's announced ping interval
//   probe           true   look for a better transport after falling back
//   probeMinDelay, probeMaxDelay 5000, 120000   delays between probes (exponential, jitter)
//   refreshMargin   0.2    refresh tokens when this fraction of their lifetime remains
//   debug           false  log to console.debug
//
// API (docs/clients.md lists the types):
//   client.subscribe(channels, onPublication(pub), handlers) -> Subscription
//     handlers: onUnrecovered(channels), onTransport(name), onState(state), onError(err),
//               transports (this subscription's list)
//     sub.channels, sub.positions, sub.transport, sub.state, sub.cursor(),
//     sub.useTransport(name) (and stay there), sub.unsubscribe()
//   client.rpc(method, data), publish(channel, data), history(channel, {limit, since, reverse}),
//   presence(channel), presenceStats(channel): Promise, rejecting with TidingsError
//   client.close()

const ALL_TRANSPORTS = ["websocket", "sse", "longpoll", "poll"];
const TERMINAL = (code) => (code >= 3500 && code < 4000) || (code >= 4500 && code < 5000);

const DEFAULTS = {
  token: null, // connection token (JWT), or use getToken
  getToken: null, // async () => token: called on connect and before the token expires
  getSubscriptionToken: null, // async (channel) => token or null
  transports: ALL_TRANSPORTS,
  wsUrl: null, // default: baseUrl with ws(s): + /connection/websocket
  sseUrl: null, // default: baseUrl + /sse
  pollUrl: null, // default: baseUrl + /poll
  healthUrl: null, // default: baseUrl + /ready (503 while the server cannot take clients)
  callUrl: null, // default: baseUrl + /call (POST /call/<method> when no WebSocket is live)
  openTimeout: 5000, // ms for a WebSocket to connect / an SSE stream to say "subscribed"
  requestTimeout: 10000, // ms for one HTTP request (beyond the long-poll hold)
  longPollTimeout: 25, // seconds the server may hold a long-poll
  pollInterval: 2000, // ms between polls
  minBackoff: 250, // ms, doubled per failed attempt, with jitter
  maxBackoff: 20000,
  pingMargin: 10000, // ms of silence beyond the server's ping interval before a reconnect
  probe: true, // after a fallback, try the better transports in the background
  probeMinDelay: 5000, // ms before the first probe (with jitter), doubled per failed probe
  probeMaxDelay: 120000,
  refreshMargin: 0.2, // refresh tokens when this fraction of their lifetime remains
  debug: false,
};

// -- small helpers --------------------------------------------------------

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

function b64urlEncode(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function b64urlDecode(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}

/** A cursor (as used by /sse and /poll) from positions: Map channel -> {epoch, offset}. */
export function encodeCursor(positions) {
  const entries = [];
  for (const [channel, pos] of positions) entries.push([channel, pos.epoch, pos.offset]);
  return b64urlEncode(JSON.stringify(entries));
}

/** Positions (Map channel -> {epoch, offset}) from a cursor; null when it cannot be read. */
export function decodeCursor(cursor) {
  try {
    const out = new Map();
    for (const [channel, epoch, offset] of JSON.parse(b64urlDecode(cursor))) {
      out.set(channel, { epoch, offset });
    }
    return out;
  } catch (e) {
    return null;
  }
}

/** Seconds until a JWT expires (from its exp claim), or null when it has none. */
function tokenTtl(token) {
  if (!token) return null;
  try {
    const claims = JSON.parse(b64urlDecode(token.split(".")[1]));
    return typeof claims.exp === "number" ? claims.exp - Date.now() / 1000 : null;
  } catch (e) {
    return null;
  }
}

/** The delay before the next attempt: exponential with full jitter over the upper half. */
export function backoff(attempt, min, max) {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 16));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** Seconds a Retry-After header asks for (delay-seconds or an HTTP date); null without one. */
export function parseRetryAfter(value) {
  if (value === null || value === undefined || value === "") return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
}

/** The delay (ms) after a refusal with Retry-After: at least what the server asked, plus jitter. */
export function retryAfterDelay(seconds) {
  return seconds * 1000 * (1 + Math.random() / 2);
}

class TidingsError extends Error {
  constructor(code, message, temporary = false, retryAfter = null) {
    super(message || `error ${code}`);
    this.code = code;
    this.temporary = temporary;
    this.retryAfter = retryAfter; // seconds the server asked us to wait (503), or null
  }
}
export { TidingsError };

// An attempt that ends this way was never established: maybe the transport is blocked,
// unless the server said when to come back (retryAfter, seconds).
class NotEstablished extends Error {
  constructor(message, retryAfter = null) {
    super(message);
    this.retryAfter = retryAfter;
  }
}
// The server said stop (terminal disconnect code or permanent refusal).
class Terminal extends Error {
  constructor(code, reason) {
    super(reason || `terminal disconnect ${code}`);
    this.code = code;
  }
}

// -- the client ------------------------------------------------------------

export class Tidings {
  constructor(baseUrl, options = {}) {
    this.baseUrl = (baseUrl || (typeof location !== "undefined" ? location.origin : "")).replace(/\/+$/, "");
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    const ws = this.baseUrl.replace(/^http/, "ws");
    this.urls = {
      websocket: o.wsUrl || `${ws}/connection/websocket`,
      sse: o.sseUrl || `${this.baseUrl}/sse`,
      poll: o.pollUrl || `${this.baseUrl}/poll`,
      health: o.healthUrl || `${this.baseUrl}/ready`,
      call: (o.callUrl || `${this.baseUrl}/call`).replace(/\/+$/, ""),
    };
    this._token = o.token || null;
    this._subs = new Set();
  }

  _log(...args) {
    if (this.options.debug) console.debug("[tidings]", ...args);
  }

  /** The connection token: the last one, or a fresh one from getToken when due. */
  async connectionToken(force = false) {
    const o = this.options;
    if (o.getToken) {
      const ttl = tokenTtl(this._token);
      if (force || !this._token || (ttl !== null && ttl < 5)) {
        this._token = (await o.getToken()) || null;
      }
    }
    return this._token;
  }

  async subscriptionToken(channel) {
    return this.options.getSubscriptionToken ? (await this.options.getSubscriptionToken(channel)) || null : null;
  }

  /** Does the server answer? Tells a blocked transport from a server that is down. */
  async healthy() {
    return (await this.health()).ok;
  }

  /** {ok, retryAfter}: whether /ready answers 200, and the seconds a 503 asks us to wait. */
  async health() {
    try {
      const ctl = new AbortController();
      const t = setTimeout(() => ctl.abort(), this.options.requestTimeout);
      const resp = await fetch(this.urls.health, { cache: "no-store", signal: ctl.signal });
      clearTimeout(t);
      return { ok: resp.ok, retryAfter: parseRetryAfter(resp.headers.get("Retry-After")) };
    } catch (e) {
      return { ok: false, retryAfter: null };
    }
  }

  /**
   * Follow channels. onPublication({channel, data, offset, epoch, info, tags, time}) is called
   * once per publication, in order per channel, whatever the transport.
   * handlers: onUnrecovered(channels), onTransport(name), onState(state), onError(err),
   * transports (overrides the client's list for this subscription).
   */
  subscribe(channels, onPublication, handlers = {}) {
    if (typeof channels === "string") channels = [channels];
    const sub = new Subscription(this, [...new Set(channels)], onPublication, handlers);
    this._subs.add(sub);
    sub._start();
    return sub;
  }

  /** Publish data to a channel (the namespace must allow client publishing): resolves with {}. */
  async publish(channel, data) {
    return this._call(channel, "publish", { channel, data });
  }

  /** A channel's history: {publications, epoch, offset}; since is {epoch, offset}. */
  async history(channel, { limit = -1, since = null, reverse = false } = {}) {
    const req = { channel, limit };
    if (since) req.since = since;
    if (reverse) req.reverse = true;
    return this._call(channel, "history", req);
  }

  /** Who is subscribed to a channel: {clientId: {user, client, conn_info?, chan_info?}}. */
  async presence(channel) {
    return (await this._call(channel, "presence", { channel })).presence || {};
  }

  /** {num_clients, num_users} of a channel. */
  async presenceStats(channel) {
    return this._call(channel, "presence_stats", { channel });
  }

  /** Call the server's RPC handler of `method` with `data`: resolves with its result. */
  async rpc(method, data = null) {
    return (await this._call(null, "rpc", { method, data })).data;
  }

  /**
   * One call over the page's live WebSocket when one follows the channel (any, for rpc),
   * else over HTTP. The server grants an HTTP caller that may subscribe what it grants a
   * subscriber, so both paths answer alike; a WebSocket that does not follow the channel
   * would not (it is no subscriber there). Never a WebSocket of its own: a network that
   * blocks WebSocket must not block calls.
   */
  async _call(channel, method, body) {
    for (const sub of this._subs) {
      const session = sub._session;
      if (!session || session.kind !== "websocket" || !session.ready) continue;
      if (channel === null || session.channels.includes(channel)) return session.call(method, body);
    }
    return this._httpCall(method, body);
  }

  /**
   * POST <callUrl>/<method> with the request object; the result, or a TidingsError. A
   * channel's subscription token rides as ?sub_token=: the server counts a caller that may
   * subscribe as a subscriber (namespaces that let only subscribers publish or read).
   */
  async _httpCall(method, body, retried = false) {
    const o = this.options;
    const token = await this.connectionToken();
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    let url = `${this.urls.call}/${method}`;
    const subToken = body.channel ? await this.subscriptionToken(body.channel) : null;
    if (subToken) url += `?${new URLSearchParams({ sub_token: subToken })}`;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), o.requestTimeout);
    let resp;
    let answer;
    try {
      resp = await fetch(url, {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        cache: "no-store",
        signal: ctl.signal,
      });
      answer = await resp.json().catch(() => ({}));
    } catch (e) {
      throw new TidingsError(0, `${method}: ${e && e.name === "AbortError" ? "timed out" : "network error"}`, true);
    } finally {
      clearTimeout(timer);
    }
    if (resp.ok && !(answer && answer.error)) return answer || {};
    const err = (answer && answer.error) || {};
    if (err.code === 109 && o.getToken && !retried) {
      await this.connectionToken(true); // expired: refresh once
      return this._httpCall(method, body, true);
    }
    const retryAfter = resp.status === 503 ? parseRetryAfter(resp.headers.get("Retry-After")) : null;
    const temporary = Boolean(err.temporary) || resp.status === 503;
    throw new TidingsError(err.code || resp.status, err.message || `HTTP ${resp.status}`, temporary, retryAfter);
  }

  /** Stop every subscription. */
  close() {
    for (const sub of [...this._subs]) sub.unsubscribe();
  }
}

// -- a subscription: one stream of publications over whichever transport works ----

class Subscription {
  constructor(client, channels, onPublication, handlers) {
    this.client = client;
    this.channels = channels;
    this.onPublication = onPublication;
    this.handlers = handlers;
    this.transports = (handlers.transports || client.options.transports).filter((t) => ALL_TRANSPORTS.includes(t));
    if (!this.transports.length) throw new Error("no known transport in " + JSON.stringify(handlers.transports));
    this.positions = new Map(); // channel -> {epoch, offset}
    // handlers.since: where to start (a cursor, or a Map channel -> {epoch, offset}), so that a
    // stream replacing another resumes from its positions (tidings-shared.js merges tabs' channels).
    const since = typeof handlers.since === "string" ? decodeCursor(handlers.since) : handlers.since;
    if (since) for (const [ch, pos] of since) if (channels.includes(ch)) this.positions.set(ch, { epoch: pos.epoch, offset: pos.offset });
    this.transport = null; // the name of the transport in use
    this.state = "connecting";
    this._index = 0; // the transport in use (or being established), in this.transports
    this._abort = new AbortController();
    this._session = null; // the session delivering now
    this._pinned = false; // useTransport(): no probe moves it elsewhere
    this._probeTimer = null;
    this._probing = null; // the attempt a probe is establishing
    this._probeRound = 0; // failed probe rounds since the last fallback or move up
    this._promoted = null; // a probed attempt that took over: the main loop continues with it
  }

  _emit(name, ...args) {
    const fn = this.handlers[name];
    if (fn) {
      try { fn(...args); } catch (e) { console.error(e); }
    }
  }

  _setState(state) {
    if (this.state !== state) {
      this.state = state;
      this._emit("onState", state);
    }
  }

  /** Stop following the channels. */
  unsubscribe() {
    this._abort.abort();
    this._cancelProbe();
    if (this._session) this._session.close();
    this.client._subs.delete(this);
    this._setState("closed");
  }

  /** Switch to another transport now (e.g. the user forces one); no probe moves it back. */
  useTransport(name) {
    const i = this.transports.indexOf(name);
    if (i < 0) throw new Error(`transport ${name} is not enabled for this subscription`);
    this._index = i;
    this._pinned = true;
    this._cancelProbe();
    if (this._session) this._session.close();
  }

  /**
   * A publication from any transport: dropped if already delivered, else handed to the app.
   * The one dedupe of the subscription: a reconnect and a probe's overlap both rely on it.
   */
  _deliver(pub) {
    const last = this.positions.get(pub.channel);
    if (last && last.epoch === pub.epoch && pub.offset <= last.offset) return;
    this.positions.set(pub.channel, { epoch: pub.epoch, offset: pub.offset });
    try {
      this.onPublication(pub);
    } catch (e) {
      console.error(e);
    }
  }

  /**
   * A position a transport reports (a poll's cursor, a subscribe reply). Never backwards in
   * one epoch: while a probe overlaps, the slower session may report an older one.
   */
  _setPosition(channel, epoch, offset) {
    const last = this.positions.get(channel);
    if (last && last.epoch === epoch && offset <= last.offset) return;
    this.positions.set(channel, { epoch, offset });
  }

  _unrecovered(channels) {
    if (channels.length) this._emit("onUnrecovered", channels);
  }

  /** The cursor of the current positions, or null when none is known yet. */
  cursor() {
    const known = new Map();
    for (const ch of this.channels) if (this.positions.has(ch)) known.set(ch, this.positions.get(ch));
    return known.size ? encodeCursor(known) : null;
  }

  /**
   * Start a session on transports[index]. attempt.ready resolves true once it is
   * established (after onEstablished ran), false when it ended before; attempt.done is
   * the session's own end.
   */
  _open(index, onEstablished) {
    const name = this.transports[index];
    const session = new SESSIONS[name](this);
    let settle;
    const attempt = { name, index, session, established: false, ready: new Promise((r) => { settle = r; }), done: null };
    attempt.done = session.run(() => {
      attempt.established = true;
      onEstablished(attempt);
      settle(true);
    });
    attempt.done.then(() => settle(false), () => settle(false));
    return attempt;
  }

  _established(name) {
    if (this.transport !== name) {
      this.transport = name;
      this._emit("onTransport", name);
    }
    this._setState("connected");
  }

  async _start() {
    const client = this.client;
    const o = client.options;
    const signal = this._abort.signal;
    let failures = 0;
    while (!signal.aborted) {
      let retryAfter = null; // seconds, when the server said when to come back
      let attempt = this._promoted;
      this._promoted = null;
      if (attempt) {
        failures = 0;
        this._scheduleProbe(); // moved up, maybe not to the top yet
      } else {
        attempt = this._open(this._index, (a) => {
          failures = 0;
          this._established(a.name);
          this._scheduleProbe();
        });
      }
      const { name, session } = attempt;
      this._session = session;
      try {
        await attempt.done;
      } catch (err) {
        if (err instanceof Terminal) {
          this._cancelProbe();
          this._emit("onError", err);
          this._setState("closed");
          client._subs.delete(this);
          return;
        }
        client._log(name, "ended:", err && err.message);
        retryAfter = (err && err.retryAfter) || null;
        if (!attempt.established && !signal.aborted && !session.closedByUs && retryAfter === null) {
          // Never established: blocked transport, the server down, or at capacity?
          const health = await client.health();
          if (health.ok && this._index < this.transports.length - 1) {
            client._log(name, "cannot be established while the server answers: falling back");
            this._index += 1;
            this._probeRound = 0;
            continue;
          }
          retryAfter = health.retryAfter;
        }
        if (err && !(err instanceof NotEstablished)) this._emit("onError", err);
      } finally {
        if (this._session === session) this._session = null;
        if (!this._promoted) this._cancelProbe();
      }
      if (signal.aborted) break;
      if (this._promoted) continue; // a probe's session took over: it is already delivering
      if (session.closedByUs) continue; // useTransport(): switch at once
      this._setState("connecting");
      let delay = attempt.established ? backoff(0, o.minBackoff, o.maxBackoff) : backoff(failures, o.minBackoff, o.maxBackoff);
      if (retryAfter !== null) delay = Math.max(delay, retryAfterDelay(retryAfter));
      failures += 1;
      await sleep(delay, signal);
    }
  }

  // -- moving back up: a probe of the better transports -----------------------

  _scheduleProbe() {
    const o = this.client.options;
    if (!o.probe || this._pinned || this._index === 0 || this._probeTimer || this._probing) return;
    const delay = backoff(this._probeRound, o.probeMinDelay, o.probeMaxDelay);
    this._probeTimer = setTimeout(() => {
      this._probeTimer = null;
      this._probe();
    }, delay);
  }

  _cancelProbe() {
    clearTimeout(this._probeTimer);
    this._probeTimer = null;
    if (this._probing) {
      this._probing.session.close();
      this._probing = null;
    }
  }

  /**
   * Open each better transport, best first, from the current position, while the current
   * session goes on delivering; the first established takes over (see _promote).
   */
  async _probe() {
    const current = this._session;
    const below = this._index;
    for (let i = 0; i < below; i++) {
      if (this._abort.signal.aborted || this._session !== current || !current) return;
      const attempt = this._open(i, (a) => this._promote(a, current));
      this._probing = attempt;
      const ok = await attempt.ready;
      if (this._probing === attempt) this._probing = null;
      if (ok) return;
      this.client._log("probe:", attempt.name, "still unavailable");
    }
    if (this._session !== current) return; // the current session ended: the main loop decides
    this._probeRound += 1;
    this._scheduleProbe();
  }

  /** A probed session is established: it becomes the current one, the old one is closed. */
  _promote(attempt, previous) {
    if (attempt.session.closedByUs || this._session !== previous || this._abort.signal.aborted) {
      attempt.session.close(); // the probe was cancelled meanwhile
      return;
    }
    this.client._log("probe:", attempt.name, "works: moving up from", this.transport);
    this._probing = null;
    this._promoted = attempt;
    this._index = attempt.index;
    this._probeRound = 0;
    this._session = attempt.session;
    this._established(attempt.name);
    previous.close();
  }
}

// -- WebSocket: the Centrifugo client protocol ----------------------------------

class WebSocketSession {
  constructor(sub) {
    this.kind = "websocket";
    this.sub = sub;
    this.client = sub.client;
    this.ready = false;
    this.closedByUs = false;
    this._nextId = 1;
    this._pending = new Map();
    this._epochs = new Map();
    this._timers = [];
    this._silence = 0; // ms without a message after which the connection is dead (0: no watchdog)
    this._watchdog = null;
    this._dead = null; // ends run() when the watchdog fires
  }

  get channels() {
    return this.sub.channels;
  }

  /** Any message proves the connection alive: the watchdog starts over. */
  _alive() {
    if (!this._silence) return;
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => {
      this.client._log(`websocket: nothing heard for ${this._silence} ms: reconnecting`);
      if (this._dead) this._dead();
    }, this._silence);
  }

  close() {
    this.closedByUs = true;
    if (this.ws) {
      try { this.ws.close(1000); } catch (e) { /* already closed */ }
    }
  }

  call(method, body) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) {
        reject(new TidingsError(0, "not connected", true));
        return;
      }
      const id = this._nextId++;
      this._pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ id, [method]: body }));
    });
  }

  _onMessage(text) {
    for (const line of text.split("\n")) {
      if (!line) continue;
      let msg;
      try { msg = JSON.parse(line); } catch (e) { continue; }
      if (msg.id) {
        const waiter = this._pending.get(msg.id);
        if (!waiter) continue;
        this._pending.delete(msg.id);
        if (msg.error) waiter.reject(new TidingsError(msg.error.code, msg.error.message, msg.error.temporary));
        else {
          const key = Object.keys(msg).find((k) => k !== "id");
          waiter.resolve(key ? msg[key] : {});
        }
      } else if (msg.push) {
        this._onPush(msg.push);
      } else if (Object.keys(msg).length === 0) {
        this.ws.send("{}"); // ping -> pong
      }
    }
  }

  _onPush(push) {
    const channel = push.channel;
    if (push.pub) {
      this.sub._deliver(toPublication(channel, this._epochs.get(channel) || "", push.pub));
    } else if (push.unsubscribe) {
      const code = push.unsubscribe.code || 0;
      if (code >= 2500) {
        this._resubscribe(channel);
      } else {
        this.sub.channels = this.sub.channels.filter((c) => c !== channel);
        if (!this.sub.channels.length) this.sub.unsubscribe();
      }
    } else if (push.disconnect) {
      this._disconnect = push.disconnect;
    }
  }

  async _subscribeChannel(channel) {
    const req = { channel };
    const token = await this.client.subscriptionToken(channel);
    if (token) req.token = token;
    const pos = this.sub.positions.get(channel);
    if (pos) {
      req.recover = true;
      req.epoch = pos.epoch;
      req.offset = pos.offset;
    }
    const res = await this.call("subscribe", req);
    this._epochs.set(channel, res.epoch || "");
    if (this.sub) {
      if (res.was_recovering && !res.recovered) this.sub._unrecovered([channel]);
      for (const p of res.publications || []) this.sub._deliver(toPublication(channel, res.epoch || "", p));
      const cur = this.sub.positions.get(channel);
      if (!cur || cur.epoch !== (res.epoch || "") || cur.offset < (res.offset || 0)) {
        this.sub._setPosition(channel, res.epoch || "", res.offset || 0);
      }
    }
    this._scheduleSubRefresh(channel, res.ttl, token);
    return res;
  }

  async _resubscribe(channel) {
    try {
      await this._subscribeChannel(channel);
    } catch (e) {
      this.close();
    }
  }

  _schedule(seconds, fn) {
    const o = this.client.options;
    const ms = Math.max(1000, seconds * 1000 * (1 - o.refreshMargin));
    this._timers.push(setTimeout(fn, ms));
  }

  _scheduleRefresh(ttl) {
    if (!ttl || !this.client.options.getToken) return;
    this._schedule(ttl, async () => {
      try {
        const token = await this.client.connectionToken(true);
        const res = await this.call("refresh", { token });
        this._scheduleRefresh(res.ttl || tokenTtl(token));
      } catch (e) {
        this.close();
      }
    });
  }

  _scheduleSubRefresh(channel, ttl, token) {
    ttl = ttl || tokenTtl(token);
    if (!ttl || !token || !this.client.options.getSubscriptionToken) return;
    this._schedule(ttl, async () => {
      try {
        const fresh = await this.client.subscriptionToken(channel);
        const res = await this.call("sub_refresh", { channel, token: fresh });
        this._scheduleSubRefresh(channel, res.ttl, fresh);
      } catch (e) {
        this.close();
      }
    });
  }

  /** Open, connect, subscribe; resolves/rejects when the connection ends. */
  run(onEstablished) {
    const client = this.client;
    const o = client.options;
    return new Promise((resolve, reject) => {
      let established = false;
      let ws;
      try {
        ws = new WebSocket(client.urls.websocket);
      } catch (e) {
        reject(new NotEstablished(e.message));
        return;
      }
      this.ws = ws;
      const openTimer = setTimeout(() => {
        if (!established) {
          try { ws.close(); } catch (e) { /* ignore */ }
          finish(new NotEstablished("WebSocket not connected in time"));
        }
      }, o.openTimeout);
      let done = false;
      const finish = (err) => {
        if (done) return;
        done = true;
        this.ready = false;
        clearTimeout(openTimer);
        clearTimeout(this._watchdog);
        this._silence = 0;
        for (const t of this._timers) clearTimeout(t);
        for (const w of this._pending.values()) w.reject(new TidingsError(0, "connection closed", true));
        this._pending.clear();
        if (err) reject(err);
        else resolve();
      };
      // A silent connection may never report its end (the close handshake cannot pass
      // a stalled path either): give up on it without waiting for onclose.
      this._dead = () => {
        try { ws.close(); } catch (e) { /* ignore */ }
        finish(established ? null : new NotEstablished("WebSocket went silent"));
      };
      ws.onmessage = (ev) => {
        this._alive();
        this._onMessage(typeof ev.data === "string" ? ev.data : "");
      };
      ws.onclose = (ev) => {
        const code = (this._disconnect && this._disconnect.code) || ev.code;
        const reason = (this._disconnect && this._disconnect.reason) || ev.reason;
        if (TERMINAL(code) && !this.closedByUs) finish(new Terminal(code, reason));
        else if (!established) finish(new NotEstablished(`WebSocket closed (${code}) before connect`));
        else finish(null);
      };
      ws.onopen = async () => {
        try {
          let token = await client.connectionToken();
          const req = { name: "tidings-js" };
          if (token) req.token = token;
          let res;
          try {
            res = await this.call("connect", req);
          } catch (e) {
            if (e.code !== 109 || !o.getToken) throw e;
            token = await client.connectionToken(true); // expired: refresh once
            res = await this.call("connect", { ...req, token });
          }
          // The server pings every res.ping seconds: silence past that (and the margin)
          // means a dead path, even if the browser still calls the socket open.
          if (res.ping > 0) {
            this._silence = res.ping * 1000 + o.pingMargin;
            this._alive();
          }
          this._scheduleRefresh(res.ttl || tokenTtl(token));
          for (const channel of this.channels) await this._subscribeChannel(channel);
          established = true;
          this.ready = true;
          clearTimeout(openTimer);
          onEstablished();
        } catch (e) {
          if (e.code === 101 || e.code === 103 || e.code === 102) finish(new Terminal(e.code, e.message));
          else finish(new NotEstablished(e.message));
          try { ws.close(); } catch (x) { /* ignore */ }
        }
      };
    });
  }
}

function toPublication(channel, epoch, p) {
  const pub = { channel, data: p.data, offset: p.offset || 0, epoch };
  if (p.info) pub.info = p.info;
  if (p.tags) pub.tags = p.tags;
  if (p.time) pub.time = p.time;
  return pub;
}

// -- SSE: EventSource, reconnected by us so that we choose the cursor -------------

class SSESession {
  constructor(sub) {
    this.kind = "sse";
    this.sub = sub;
    this.client = sub.client;
    this.closedByUs = false;
    this._stop = null;
  }

  close() {
    this.closedByUs = true;
    if (this._stop) this._stop(null);
  }

  async run(onEstablished) {
    const sub = this.sub;
    const client = this.client;
    const o = client.options;
    const params = new URLSearchParams();
    for (const ch of sub.channels) params.append("channel", ch);
    const cursor = sub.cursor();
    if (cursor) params.set("last_event_id", cursor);
    const token = await client.connectionToken();
    if (token) params.set("token", token);
    for (const ch of sub.channels) {
      const st = await client.subscriptionToken(ch);
      if (st) params.append("sub_token", st);
    }
    if (this.closedByUs) return;
    const url = client.urls.sse + (client.urls.sse.includes("?") ? "&" : "?") + params;
    return new Promise((resolve, reject) => {
      const es = new EventSource(url);
      let established = false;
      let refreshTimer = null;
      // The server sends `event: ping` every `ping` seconds its `subscribed` event
      // announces; a stream silent for twice that (and the margin) is dead, however
      // open EventSource thinks it is (a proxy that stopped forwarding).
      let silence = 0;
      let watchdog = null;
      const alive = () => {
        if (!silence) return;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => {
          client._log(`sse: nothing heard for ${silence} ms: reconnecting`);
          finish(null);
        }, silence);
      };
      const finish = (err) => {
        es.close();
        clearTimeout(openTimer);
        clearTimeout(refreshTimer);
        clearTimeout(watchdog);
        silence = 0;
        this._stop = null;
        if (err) reject(err);
        else resolve();
      };
      this._stop = finish;
      const openTimer = setTimeout(() => {
        if (!established) finish(new NotEstablished("SSE stream delivered nothing in time"));
      }, o.openTimeout);
      es.addEventListener("subscribed", (ev) => {
        let ping = 0;
        try { ping = Number(JSON.parse(ev.data).ping) || 0; } catch (e) { /* an older server: no ping */ }
        if (ping > 0) silence = 2 * ping * 1000 + o.pingMargin;
        alive();
        const start = decodeCursor(ev.lastEventId || "");
        if (start) {
          for (const [ch, pos] of start) {
            const cur = sub.positions.get(ch);
            if (!cur || cur.epoch !== pos.epoch) sub._setPosition(ch, pos.epoch, pos.offset);
          }
        }
        established = true;
        clearTimeout(openTimer);
        onEstablished();
        // HTTP transports refresh a token by reconnecting with a new one.
        const ttl = tokenTtl(token);
        if (ttl && o.getToken) {
          refreshTimer = setTimeout(() => {
            client.connectionToken(true).then(() => finish(null), () => finish(null));
          }, Math.max(1000, ttl * 1000 * (1 - o.refreshMargin)));
        }
      });
      es.addEventListener("ping", alive);
      es.addEventListener("unrecovered", (ev) => {
        alive();
        try {
          const channels = JSON.parse(ev.data).channels || [];
          // Continue from "now" on those: forget the stale position.
          sub._unrecovered(channels);
        } catch (e) { /* ignore */ }
      });
      es.onmessage = (ev) => {
        alive();
        let pub;
        try { pub = JSON.parse(ev.data); } catch (e) { return; }
        sub._deliver(pub);
      };
      es.addEventListener("disconnect", (ev) => {
        let info = {};
        try { info = JSON.parse(ev.data); } catch (e) { /* ignore */ }
        if (TERMINAL(info.code)) finish(new Terminal(info.code, info.reason));
        else finish(null);
      });
      es.addEventListener("unsubscribed", (ev) => {
        try {
          const { channel, code } = JSON.parse(ev.data);
          if (!(code >= 2500)) sub.channels = sub.channels.filter((c) => c !== channel);
        } catch (e) { /* ignore */ }
        if (!sub.channels.length) { sub.unsubscribe(); finish(null); } else finish(null);
      });
      es.onerror = () => {
        // We reconnect ourselves (with the cursor of what we delivered), not EventSource.
        finish(established ? null : new NotEstablished("SSE stream failed"));
      };
    });
  }
}

// -- long-poll and poll: fetch with the cursor --------------------------------------

class PollSession {
  constructor(sub, long) {
    this.kind = long ? "longpoll" : "poll";
    this.long = long;
    this.sub = sub;
    this.client = sub.client;
    this.closedByUs = false;
    this._ctl = null;
    this._stopped = new AbortController();
  }

  close() {
    this.closedByUs = true;
    this._stopped.abort();
    if (this._ctl) this._ctl.abort();
  }

  async _request(cursor) {
    const client = this.client;
    const o = client.options;
    const params = new URLSearchParams();
    for (const ch of this.sub.channels) params.append("channel", ch);
    if (cursor) params.set("cursor", cursor);
    params.set("timeout", this.long && cursor ? String(o.longPollTimeout) : "0");
    const token = await client.connectionToken();
    if (token) params.set("token", token);
    for (const ch of this.sub.channels) {
      const st = await client.subscriptionToken(ch);
      if (st) params.append("sub_token", st);
    }
    const ctl = new AbortController();
    this._ctl = ctl;
    const limit = o.requestTimeout + (this.long ? o.longPollTimeout * 1000 : 0);
    const timer = setTimeout(() => ctl.abort(), limit);
    try {
      const url = client.urls.poll + (client.urls.poll.includes("?") ? "&" : "?") + params;
      const resp = await fetch(url, { cache: "no-store", signal: ctl.signal });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        const err = body.error || {};
        if (err.code === 109 && o.getToken) {
          await client.connectionToken(true);
          throw new TidingsError(109, "token expired", true);
        }
        if (resp.status === 401 || resp.status === 403) throw new Terminal(err.code || resp.status, err.message);
        const retryAfter = resp.status === 503 ? parseRetryAfter(resp.headers.get("Retry-After")) : null;
        throw new TidingsError(err.code || resp.status, err.message || `HTTP ${resp.status}`, retryAfter !== null, retryAfter);
      }
      return body;
    } finally {
      clearTimeout(timer);
      this._ctl = null;
    }
  }

  async run(onEstablished) {
    const sub = this.sub;
    const o = this.client.options;
    let established = false;
    while (!this.closedByUs) {
      let body;
      try {
        body = await this._request(sub.cursor());
      } catch (e) {
        if (this.closedByUs) return;
        if (e instanceof Terminal) throw e;
        throw established ? e : new NotEstablished(e.message, e.retryAfter || null);
      }
      if (!established) {
        established = true;
        onEstablished();
      }
      if (body.unrecovered && body.unrecovered.length) sub._unrecovered(body.unrecovered);
      for (const pub of body.publications || []) sub._deliver(pub);
      const next = decodeCursor(body.cursor || "");
      if (next) for (const [ch, pos] of next) sub._setPosition(ch, pos.epoch, pos.offset);
      if (!this.long) await sleep(o.pollInterval, this._stopped.signal);
    }
  }
}

const SESSIONS = {
  websocket: WebSocketSession,
  sse: SSESession,
  longpoll: class extends PollSession { constructor(sub) { super(sub, true); } },
  poll: class extends PollSession { constructor(sub) { super(sub, false); } },
};

export { ALL_TRANSPORTS as TRANSPORTS };
export default Tidings;
