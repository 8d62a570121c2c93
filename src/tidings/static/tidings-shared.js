// tidings-shared.js — one server connection per browser, shared by every tab of an origin.
//
//   import { Tidings } from "/tidings-shared.js";   // the same API as /tidings.js
//   const t = new Tidings(location.origin);
//   t.subscribe(["news"], (pub) => show(pub), { onState, onTransport, onUnrecovered });
//   t.sharing   // "worker" | "leader" | "follower" | "off": which mode this tab is in
//
// Why: every tab of /tidings.js holds its own connection; ten tabs of one app hold ten, and
// HTTP/1.1's six connections per origin leave SSE and long-poll tabs beyond the sixth waiting.
//
// How: one real client (tidings.js) runs in a hub, and every tab talks to the hub:
// - a SharedWorker (module worker, /tidings-worker.js) where the browser has one;
// - otherwise (Chrome on Android, some Safari; or `sharedWorker: false`) the tabs elect a
//   leader with a Web Lock per origin and base URL; the leader's tab runs the hub and the
//   others reach it over a BroadcastChannel. When the leader tab closes, its lock is released,
//   the next tab takes it, announces itself, and every tab registers again with the positions
//   it has seen, so the new hub resumes from the oldest of them: nothing is lost, and each
//   tab drops what it has already seen (the same (channel, epoch, offset) dedupe as tidings.js).
// Without SharedWorker nor Web Locks, or with `shared: false`, this is plain tidings.js.
//
// The hub follows the union of all tabs' channels with ONE subscription. When the union
// changes it opens a new subscription from the current positions (`since`) while the old one
// keeps delivering, and closes the old one once the new one is connected; the hub forwards a
// publication to a tab's subscription only past that subscription's position, so the switch
// neither loses nor repeats. Callbacks stay in the tab; getToken / getSubscriptionToken are
// asked of a tab that has them. A subscription that asks for its own `transports` gets its own
// connection (a shared one cannot be on two transports at once).
//
// A tab that closes without unsubscribing must not leave its channels in the hub; a
// MessagePort has no close event. Each tab holds a Web Lock named after itself for its whole
// life and the hub queues for it: the browser grants it to the hub when the tab is gone
// (crash and background freezing included, no timer). Where Web Locks are missing (insecure
// origins), the hub pings its tabs every `pingInterval` ms and forgets those silent for three.
// `pagehide` says goodbye at once, and a tab the hub does not know (e.g. back from the
// back/forward cache) is asked to register again.

import { Tidings as DirectTidings, TidingsError, encodeCursor, decodeCursor } from "./tidings.js";

export * from "./tidings.js";

/** The client calls a tab may ask the hub to make (each a method of tidings.js' Tidings). */
const CALLS = ["publish", "history", "presence", "presenceStats", "rpc"];

const SHARE_DEFAULTS = {
  shared: true, // false: one connection per tab, as /tidings.js
  sharedWorker: true, // false: skip SharedWorker, elect a leader tab (Web Locks + BroadcastChannel)
  pingInterval: 10000, // ms between the hub's pings, only where Web Locks are missing
  // Channels the shared connection may follow: the server's limits.max_channels_per_connection
  // (default 128). All tabs' channels travel on one connection; past the server's limit a
  // merged stream could never be established, so the hub refuses the subscription instead.
  maxChannels: 128,
  workerTimeout: 10000, // ms for the SharedWorker to answer at all before the tab does without it
};

function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function locksAvailable() {
  return typeof navigator !== "undefined" && !!navigator.locks && typeof navigator.locks.request === "function";
}

/** Positions Map -> [[channel, epoch, offset]] (what crosses a MessagePort). */
function positionsToList(positions) {
  const out = [];
  for (const [ch, pos] of positions) out.push([ch, pos.epoch, pos.offset]);
  return out;
}

function positionsFromList(list) {
  const out = new Map();
  for (const [ch, epoch, offset] of list || []) out.set(ch, { epoch, offset });
  return out;
}

/** Is pub at or before pos (already seen)? The one dedupe rule of the shared client. */
function alreadySeen(pos, pub) {
  return !!pos && pos.epoch === pub.epoch && pub.offset <= pos.offset;
}

function errorToWire(err) {
  return {
    code: (err && err.code) || 0,
    message: String((err && err.message) || err),
    temporary: !!(err && err.temporary),
    retryAfter: (err && err.retryAfter) ?? null,
  };
}

function errorFromWire(e) {
  return new TidingsError(e.code, e.message, e.temporary, e.retryAfter);
}

// -- the hub: one real client, the union of the tabs' channels --------------------------

/**
 * Runs in the SharedWorker or in the leader tab. `handle(tabId, message, send)` takes each
 * message of a tab; `send(message)` reaches that tab. Holds no socket itself: the tidings.js
 * client it makes does.
 */
export class ShareHub {
  constructor() {
    this.client = null; // tidings.js' Tidings, made on the first hello
    // tabId -> {id, send, subs: Map(subId -> {channels, positions}), callbacks, lastSeen,
    //           pingInterval (null when the tab's Web Lock tells us it is gone), lockAbort}
    this.tabs = new Map();
    this.stream = null; // the newest subscription, following the union of the tabs' channels
    this.live = null; // the connected one the tabs are served from (stream once it connects)
    this.streamKey = "";
    this.status = { state: "connecting", transport: null, channels: [] };
    this._asks = new Map(); // id -> resolve, for token requests to tabs
    this._nextAsk = 1;
    this._resyncTimer = null;
    this._pinger = null;
    this._pingEvery = Infinity;
    this._restream = false; // a tab saw less than the live stream: restart it from there
    this._retired = new WeakSet(); // streams we closed ourselves (their "closed" is no failure)
    this._lastError = new WeakMap(); // stream -> the error it reported last
  }

  handle(tabId, msg, send) {
    if (!msg || typeof msg !== "object") return;
    if (msg.t === "hello") return this._hello(tabId, msg, send);
    const tab = this.tabs.get(tabId);
    if (!tab) {
      if (msg.t !== "bye") send({ t: "who" }); // forgotten (timed out, bfcache): register again
      return;
    }
    tab.lastSeen = Date.now();
    switch (msg.t) {
      case "sub": return this._subscribe(tab, msg);
      case "unsub":
        tab.subs.delete(msg.sub);
        return this._scheduleResync();
      case "call": return this._call(tab, msg);
      case "use":
        if (this.live) {
          try { this.live.useTransport(msg.transport); } catch (e) { /* not enabled: ignored */ }
        }
        return;
      case "answer": {
        const resolve = this._asks.get(msg.id);
        this._asks.delete(msg.id);
        if (resolve) resolve(msg.value ?? null);
        return;
      }
      case "bye": return this._drop(tabId);
      default: return; // pong, or unknown: lastSeen is all
    }
  }

  _hello(tabId, msg, send) {
    if (!this.client) this.client = this._makeClient(msg.baseUrl, msg.options || {});
    const old = this.tabs.get(tabId);
    if (old && old.lockAbort) old.lockAbort.abort();
    const watched = !!msg.lock && locksAvailable();
    const tab = {
      id: tabId,
      send,
      subs: new Map(),
      callbacks: new Set(msg.callbacks || []),
      lastSeen: Date.now(),
      pingInterval: watched ? null : Math.max(1000, msg.pingInterval || SHARE_DEFAULTS.pingInterval),
      lockAbort: null,
    };
    this.tabs.set(tabId, tab);
    if (watched) {
      // Granted once the tab's document is gone: the tab held it for its whole life.
      tab.lockAbort = new AbortController();
      navigator.locks
        .request(msg.lock, { signal: tab.lockAbort.signal }, () => {
          if (this.tabs.get(tabId) === tab) this._drop(tabId);
        })
        .catch(() => {}); // aborted: the tab said bye or registered again
    } else {
      this._startPinger();
    }
    if (old && old.subs.size) this._scheduleResync();
    send({ t: "status", ...this.status });
  }

  _makeClient(baseUrl, options) {
    const callbacks = {};
    for (const name of ["getToken", "getSubscriptionToken"]) {
      callbacks[name] = (...args) => this._ask(name, args);
    }
    const opts = { ...options, shared: false };
    for (const name of Object.keys(callbacks)) if (options[`has_${name}`]) opts[name] = callbacks[name];
    return new DirectTidings(baseUrl, opts);
  }

  /** Ask a tab that has the callback (getToken...) for its answer; null after requestTimeout. */
  _ask(name, args) {
    const tab = [...this.tabs.values()].find((t) => t.callbacks.has(name));
    if (!tab) return Promise.resolve(null);
    const id = this._nextAsk++;
    const timeout = (this.client && this.client.options.requestTimeout) || 10000;
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this._asks.delete(id); resolve(null); }, timeout);
      this._asks.set(id, (value) => { clearTimeout(timer); resolve(value); });
      tab.send({ t: "ask", id, name, args });
    });
  }

  _subscribe(tab, msg) {
    if (!Array.isArray(msg.channels) || !msg.channels.every((ch) => typeof ch === "string")) return;
    const positions = positionsFromList(msg.positions);
    const live = this.live;
    for (const ch of msg.channels) {
      const streamed = live && live.channels.includes(ch) ? live.positions.get(ch) : null;
      const reported = positions.get(ch);
      if (!reported) {
        // A new follower of a channel already streamed starts where the stream is now.
        if (streamed) positions.set(ch, { ...streamed });
      } else if (streamed && streamed.epoch === reported.epoch && reported.offset < streamed.offset) {
        // The tab saw less than the stream has delivered (it came from another hub):
        // restart the stream from its position so that it gets what it missed.
        this._restream = true;
      }
    }
    const union = new Set([...this._union(), ...msg.channels]);
    const most = this.client.options.maxChannels || SHARE_DEFAULTS.maxChannels;
    if (union.size > most) {
      const error = new TidingsError(106, `limit exceeded: the tabs' shared connection follows at most ${most} channels`);
      tab.send({ t: "closed", sub: msg.sub, error: errorToWire(error) });
      return;
    }
    tab.subs.set(msg.sub, { channels: [...msg.channels], positions });
    this._scheduleResync();
    // The tab's subscription counts as connected from this answer on, not before.
    tab.send({ t: "status", ...this.status, ack: msg.sub });
  }

  async _call(tab, msg) {
    try {
      if (!CALLS.includes(msg.method) || typeof this.client[msg.method] !== "function") {
        throw new TidingsError(0, `${msg.method} is not a call of this client`);
      }
      const value = await this.client[msg.method](...(msg.args || []));
      tab.send({ t: "result", id: msg.id, value });
    } catch (err) {
      tab.send({ t: "result", id: msg.id, error: errorToWire(err) });
    }
  }

  _drop(tabId) {
    const tab = this.tabs.get(tabId);
    if (!tab) return;
    this.tabs.delete(tabId);
    if (tab.lockAbort) tab.lockAbort.abort();
    this._scheduleResync();
  }

  /** Pings at the shortest interval a tab without a Web Lock asked for. */
  _startPinger() {
    const every = Math.min(...[...this.tabs.values()].map((t) => t.pingInterval || Infinity));
    if (this._pinger && every >= this._pingEvery) return;
    clearInterval(this._pinger);
    this._pingEvery = every;
    this._pinger = setInterval(() => {
      const now = Date.now();
      for (const tab of [...this.tabs.values()]) {
        if (!tab.pingInterval) continue;
        if (now - tab.lastSeen > 3 * tab.pingInterval) this._drop(tab.id);
        else tab.send({ t: "ping" });
      }
    }, every);
  }

  _scheduleResync() {
    if (this._resyncTimer !== null) return;
    // Coalesce the registrations that arrive together (all tabs after a leader change).
    this._resyncTimer = setTimeout(() => {
      this._resyncTimer = null;
      this._resync();
    }, 0);
  }

  /** The union of the tabs' channels, sorted. */
  _union() {
    const union = new Set();
    for (const tab of this.tabs.values()) for (const sub of tab.subs.values()) for (const ch of sub.channels) union.add(ch);
    return [...union].sort();
  }

  /**
   * Where a new stream starts for a channel: the oldest position a tab's subscription has
   * (in the live stream's epoch when it has one), so every tab gets all it has not seen.
   */
  _seed(ch) {
    const streamed = this.live && this.live.positions.get(ch);
    let best = null;
    for (const tab of this.tabs.values()) {
      for (const sub of tab.subs.values()) {
        const pos = sub.channels.includes(ch) ? sub.positions.get(ch) : null;
        if (!pos || (streamed && pos.epoch !== streamed.epoch)) continue;
        if (!best || (pos.epoch === best.epoch && pos.offset < best.offset)) best = pos;
      }
    }
    return best || streamed || null;
  }

  _resync() {
    const union = this._union();
    const key = union.join("\n");
    if (key === this.streamKey && !this._restream) return;
    if (!this._restream && this.live && key === [...this.live.channels].sort().join("\n")) {
      // Back to what the live stream follows (a change undone, a refused channel dropped).
      if (this.stream && this.stream !== this.live) this._retire(this.stream);
      this.stream = this.live;
      this.streamKey = key;
      return;
    }
    this._restream = false;
    this.streamKey = key;
    if (this.stream && this.stream !== this.live) this._retire(this.stream); // never connected: replaced
    this.stream = null;
    if (!union.length) {
      if (this.live) this._retire(this.live);
      this.live = null;
      this.status = { state: "connecting", transport: null, channels: [] };
      return;
    }
    const since = new Map();
    for (const ch of union) {
      const pos = this._seed(ch);
      if (pos) since.set(ch, pos);
    }
    const stream = this.client.subscribe(union, (pub) => this._deliver(pub), {
      since,
      onState: (state) => this._onState(stream, state),
      onTransport: () => this._onState(stream, stream.state),
      onUnrecovered: (channels) => this._onUnrecovered(channels),
      onError: (err) => this._onError(stream, err),
    });
    this.stream = stream;
  }

  _retire(stream) {
    this._retired.add(stream);
    stream.unsubscribe();
  }

  _onState(stream, state) {
    if (state === "closed") {
      if (!this._retired.has(stream)) this._failed(stream, this._lastError.get(stream));
      return;
    }
    if (stream === this.stream && state === "connected" && this.live !== stream) {
      const old = this.live;
      this.live = stream;
      if (old) this._retire(old);
      // Followers that registered before their channel was streamed start here.
      for (const tab of this.tabs.values()) {
        for (const sub of tab.subs.values()) {
          for (const ch of sub.channels) {
            const pos = stream.positions.get(ch);
            if (!sub.positions.has(ch) && pos) sub.positions.set(ch, { ...pos });
          }
        }
      }
    }
    if (stream !== this.live) return;
    this.status = { state: stream.state, transport: stream.transport, channels: [...stream.channels] };
    for (const tab of this.tabs.values()) tab.send({ t: "status", ...this.status });
  }

  _deliver(pub) {
    for (const tab of this.tabs.values()) {
      const subs = [];
      for (const [id, sub] of tab.subs) {
        if (!sub.channels.includes(pub.channel) || alreadySeen(sub.positions.get(pub.channel), pub)) continue;
        sub.positions.set(pub.channel, { epoch: pub.epoch, offset: pub.offset });
        subs.push(id);
      }
      if (subs.length) tab.send({ t: "pub", subs, pub });
    }
  }

  _onUnrecovered(channels) {
    for (const tab of this.tabs.values()) {
      for (const [id, sub] of tab.subs) {
        const mine = channels.filter((ch) => sub.channels.includes(ch));
        if (!mine.length) continue;
        for (const ch of mine) sub.positions.delete(ch); // continues from "now"
        tab.send({ t: "unrecovered", sub: id, channels: mine });
      }
    }
  }

  /** An error of a stream, told to the tab subscriptions it serves (tidings.js' onError). */
  _onError(stream, err) {
    this._lastError.set(stream, err);
    if (stream !== this.live && stream !== this.stream) return;
    for (const tab of this.tabs.values()) {
      for (const [id, sub] of tab.subs) {
        if (sub.channels.some((ch) => stream.channels.includes(ch))) tab.send({ t: "error", sub: id, error: errorToWire(err) });
      }
    }
  }

  /**
   * A stream that the server ended for good (a denied channel, a terminal disconnect) closes
   * only the tab subscriptions it must: when a new stream fails before it connects, those
   * that brought the channels the live stream lacks (one tab's denied channel must not stop
   * the others); when the live stream fails, all of them.
   */
  _failed(stream, err) {
    const isLive = stream === this.live;
    const before = isLive || !this.live ? [] : this.live.channels;
    const error = errorToWire(err || new TidingsError(0, "subscription closed"));
    for (const tab of this.tabs.values()) {
      for (const [id, sub] of [...tab.subs]) {
        if (!sub.channels.some((ch) => stream.channels.includes(ch) && !before.includes(ch))) continue;
        tab.subs.delete(id);
        tab.send({ t: "closed", sub: id, error });
      }
    }
    if (isLive) this.live = null;
    if (stream === this.stream) this.stream = null;
    this.streamKey = "";
    this._scheduleResync();
  }

  /** Stop everything (the leader tab is closing its client). */
  close() {
    for (const tab of this.tabs.values()) if (tab.lockAbort) tab.lockAbort.abort();
    this.tabs.clear();
    clearInterval(this._pinger);
    clearTimeout(this._resyncTimer);
    if (this.stream) this._retire(this.stream);
    if (this.live) this._retire(this.live);
    if (this.client) this.client.close();
  }
}

// -- links from a tab to the hub ---------------------------------------------------------

/** The tab's port to the SharedWorker. */
class WorkerLink {
  constructor(client) {
    this.mode = "worker";
    this.client = client;
    this._gone = null;
    const worker = new SharedWorker(new URL("./tidings-worker.js", import.meta.url), {
      type: "module",
      name: `tidings ${client.baseUrl}`,
    });
    this.port = worker.port;
    const withoutWorker = () => client._replaceLink(this, electionPossible() ? ElectionLink : LocalLink);
    // The worker script cannot run (not served, a CSP): share by election, or not at all. The
    // error event is not always delivered (seen in Chromium with a 404), hence the timeout too.
    worker.onerror = withoutWorker;
    this._silent = setTimeout(withoutWorker, client.options.workerTimeout);
    this.port.onmessage = (ev) => {
      clearTimeout(this._silent);
      client._receive(ev.data);
    };
    this.port.start();
    client._register();
  }

  send(msg) {
    this.port.postMessage(msg);
  }

  /** The worker's life lock: granted to us once the worker is gone; then start another. */
  watch(lock) {
    if (this._gone || !locksAvailable()) return;
    this._gone = new AbortController();
    navigator.locks
      .request(lock, { signal: this._gone.signal }, () => this.client._replaceLink(this, WorkerLink))
      .catch(() => {}); // aborted: this link was closed
  }

  close() {
    clearTimeout(this._silent);
    if (this._gone) this._gone.abort();
    this.port.close();
  }
}

/** No sharing: the hub runs in this tab for this tab alone (the fallback of a failed worker). */
class LocalLink {
  constructor(client) {
    this.mode = "off";
    this.client = client;
    this.hub = new ShareHub();
    client._register();
  }

  send(msg) {
    const hub = this.hub;
    queueMicrotask(() => hub.handle(this.client._tabId, msg, (m) => queueMicrotask(() => this.client._receive(m))));
  }

  close() {
    this.hub.close();
  }
}

/** Leader election among the tabs (Web Locks), the leader's hub reached over a BroadcastChannel. */
class ElectionLink {
  constructor(client) {
    this.mode = "follower";
    this.client = client;
    this.tabId = client._tabId;
    this.hub = null; // while this tab leads
    this.bc = new BroadcastChannel(`tidings ${client.baseUrl}`);
    this.bc.onmessage = (ev) => this._onBroadcast(ev.data);
    this._stop = new AbortController();
    this._release = null;
    navigator.locks
      .request(`tidings-leader ${client.baseUrl}`, { signal: this._stop.signal }, () => this._lead())
      .catch(() => {}); // aborted by close()
    client._register(); // to the leader, if there is one; else again when one is elected
  }

  _lead() {
    this.hub = new ShareHub();
    this.mode = "leader";
    this.bc.postMessage({ t: "leader", from: this.tabId });
    this.client._hubChanged();
    return new Promise((resolve) => { this._release = resolve; });
  }

  send(msg) {
    if (this.hub) {
      const hub = this.hub;
      queueMicrotask(() => hub.handle(this.tabId, msg, (m) => queueMicrotask(() => this.client._receive(m))));
    } else {
      this.bc.postMessage({ to: "hub", from: this.tabId, msg });
    }
  }

  _onBroadcast(data) {
    if (!data || typeof data !== "object") return;
    if (data.t === "leader") {
      if (data.from !== this.tabId && !this.hub) this.client._hubChanged();
    } else if (data.to === "hub") {
      if (this.hub) this.hub.handle(data.from, data.msg, (m) => this.bc.postMessage({ to: data.from, msg: m }));
    } else if (data.to === this.tabId) {
      this.client._receive(data.msg);
    }
  }

  close() {
    this._stop.abort();
    if (this.hub) this.hub.close();
    this.hub = null;
    if (this._release) this._release();
    this.bc.close();
  }
}

// -- the tab's client: tidings.js' API over the hub --------------------------------------

function electionPossible() {
  return typeof BroadcastChannel === "function" && locksAvailable();
}

function chooseLink(options) {
  if (options.shared === false) return null;
  if (options.sharedWorker !== false && typeof SharedWorker === "function") return WorkerLink;
  return electionPossible() ? ElectionLink : null;
}

export class Tidings {
  constructor(baseUrl, options = {}) {
    this.options = { ...SHARE_DEFAULTS, ...options };
    this._direct = new DirectTidings(baseUrl, options); // opens nothing until used
    this.baseUrl = this._direct.baseUrl;
    this._tabId = randomId();
    this._subs = new Map(); // id -> SharedSubscription
    this._nextSub = 1;
    this._calls = new Map(); // id -> {resolve, reject}
    this._nextCall = 1;
    this._outbox = []; // calls made before the tab is registered
    this._registered = false;
    this._status = { state: "connecting", transport: null, channels: [] };
    this._tabLock = null;
    this._closed = false;
    this._link = null;
    let Link = chooseLink(this.options);
    if (Link) {
      this._tabLock = this._holdTabLock();
      try {
        this._link = new Link(this);
      } catch (e) {
        // A SharedWorker from another origin (the page is not served by tidings) or a CSP.
        Link = Link === WorkerLink && electionPossible() ? ElectionLink : null;
        this._link = Link ? new Link(this) : null;
      }
    }
    if (this._link && typeof addEventListener === "function") {
      addEventListener("pagehide", () => this._bye());
      addEventListener("pageshow", (ev) => { if (ev.persisted) this._register(); });
    }
  }

  /** "worker", "leader", "follower" (sharing a connection) or "off" (this tab's own). */
  get sharing() {
    return this._link ? this._link.mode : "off";
  }

  /** A Web Lock held for this tab's life: the hub queues for it to learn that the tab is gone. */
  _holdTabLock() {
    if (!locksAvailable()) return Promise.resolve(null);
    const name = `tidings-tab ${this._tabId}`;
    return new Promise((granted) => {
      navigator.locks
        .request(name, () => {
          granted(name);
          return new Promise((release) => { this._releaseTabLock = release; });
        })
        .catch(() => granted(null));
    });
  }

  async _register() {
    const lock = await this._tabLock;
    if (this._closed || !this._link) return;
    const options = {};
    const callbacks = [];
    for (const [key, value] of Object.entries(this.options)) {
      if (typeof value === "function") {
        callbacks.push(key);
        options[`has_${key}`] = true;
      } else if (value !== undefined) options[key] = value;
    }
    this._link.send({
      t: "hello", tab: this._tabId, baseUrl: this.baseUrl, options, callbacks, lock,
      pingInterval: this.options.pingInterval,
    });
    for (const sub of this._subs.values()) {
      sub._acked = false;
      this._link.send(sub._registration());
    }
    this._registered = true;
    for (const msg of this._outbox.splice(0)) this._link.send(msg);
  }

  /** Leave a link that cannot work for another (which registers this tab with its hub). */
  _replaceLink(failed, Link) {
    if (this._closed || this._link !== failed) return; // closed, or replaced already
    const old = this._link;
    this._registered = false;
    this._link = null;
    if (old) old.close();
    this._failCalls();
    this._link = new Link(this);
  }

  _failCalls() {
    for (const { reject } of this._calls.values()) reject(new TidingsError(0, "connection closed", true));
    this._calls.clear();
  }

  /** A new hub (a leader elected): what the old one owed us is gone; register with it. */
  _hubChanged() {
    this._failCalls();
    this._receive({ t: "status", state: "connecting", transport: this._status.transport, channels: [] });
    this._register();
  }

  _bye() {
    if (this._link && this._registered) this._link.send({ t: "bye" });
    this._registered = false;
  }

  _send(msg) {
    if (!this._link) return;
    if (this._registered) this._link.send(msg);
    else if (msg.t === "call") this._outbox.push(msg); // subscriptions are sent by _register
  }

  _receive(msg) {
    if (!msg || typeof msg !== "object") return;
    switch (msg.t) {
      case "pub":
        for (const id of msg.subs) {
          const sub = this._subs.get(id);
          if (sub) sub._deliver(msg.pub);
        }
        return;
      case "status":
        this._status = msg;
        for (const sub of this._subs.values()) {
          if (msg.ack === sub.id) sub._acked = true;
          sub._applyStatus(msg);
        }
        return;
      case "unrecovered": {
        const sub = this._subs.get(msg.sub);
        if (sub) sub._unrecovered(msg.channels);
        return;
      }
      case "error":
      case "closed": {
        const sub = this._subs.get(msg.sub);
        if (!sub) return;
        sub._emit("onError", errorFromWire(msg.error));
        if (msg.t === "closed") sub._close();
        return;
      }
      case "result": {
        const call = this._calls.get(msg.id);
        this._calls.delete(msg.id);
        if (!call) return;
        if (msg.error) call.reject(errorFromWire(msg.error));
        else call.resolve(msg.value);
        return;
      }
      case "ask":
        return void this._answer(msg);
      case "who":
        return void this._register();
      case "worker":
        if (this._link && this._link.watch) this._link.watch(msg.lock);
        return;
      case "ping":
        return this._send({ t: "pong" });
      default:
        return;
    }
  }

  async _answer(msg) {
    let value = null;
    try {
      const fn = this.options[msg.name];
      if (typeof fn === "function") value = (await fn(...(msg.args || []))) || null;
    } catch (e) {
      value = null;
    }
    this._send({ t: "answer", id: msg.id, value });
  }

  /** Same as tidings.js: a Subscription-like object with the same callbacks. */
  subscribe(channels, onPublication, handlers = {}) {
    if (typeof channels === "string") channels = [channels];
    if (!this._link || handlers.transports) return this._direct.subscribe(channels, onPublication, handlers);
    const sub = new SharedSubscription(this, this._nextSub++, [...new Set(channels)], onPublication, handlers);
    this._subs.set(sub.id, sub);
    this._send(sub._registration());
    return sub;
  }

  _call(method, args) {
    if (!this._link) return this._direct[method](...args);
    const id = this._nextCall++;
    return new Promise((resolve, reject) => {
      this._calls.set(id, { resolve, reject });
      this._send({ t: "call", id, method, args });
    });
  }

  publish(channel, data) { return this._call("publish", [channel, data]); }
  history(channel, options = {}) { return this._call("history", [channel, options]); }
  presence(channel) { return this._call("presence", [channel]); }
  presenceStats(channel) { return this._call("presenceStats", [channel]); }
  rpc(method, data = null) { return this._call("rpc", [method, data]); }
  health() { return this._direct.health(); }
  healthy() { return this._direct.healthy(); }

  /** Stop every subscription; a leader hands its connection to the next tab. */
  close() {
    for (const sub of [...this._subs.values()]) sub.unsubscribe();
    this._direct.close();
    this._bye();
    this._closed = true;
    if (this._link) this._link.close();
    if (this._releaseTabLock) this._releaseTabLock();
  }
}

class SharedSubscription {
  constructor(client, id, channels, onPublication, handlers) {
    this.client = client;
    this.id = id;
    this.channels = channels;
    this.onPublication = onPublication;
    this.handlers = handlers;
    this.positions = new Map(); // channel -> {epoch, offset}: what this subscription was given
    const since = typeof handlers.since === "string" ? decodeCursor(handlers.since) : handlers.since;
    if (since) for (const [ch, pos] of since) if (channels.includes(ch)) this.positions.set(ch, { ...pos });
    this.transport = null;
    this.state = "connecting";
    this._acked = false; // the hub has this subscription (its status answer came back)
  }

  _registration() {
    return { t: "sub", sub: this.id, channels: this.channels, positions: positionsToList(this.positions) };
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

  /** Connected when the hub's live stream is connected and follows all our channels. */
  _applyStatus(status) {
    if (this.state === "closed" || !this._acked) return;
    const covered = status.state === "connected" && this.channels.every((ch) => status.channels.includes(ch));
    if (covered && status.transport && status.transport !== this.transport) {
      this.transport = status.transport;
      this._emit("onTransport", status.transport);
    }
    this._setState(covered ? "connected" : "connecting");
  }

  _deliver(pub) {
    if (this.state === "closed" || alreadySeen(this.positions.get(pub.channel), pub)) return;
    this.positions.set(pub.channel, { epoch: pub.epoch, offset: pub.offset });
    try {
      this.onPublication(pub);
    } catch (e) {
      console.error(e);
    }
  }

  _unrecovered(channels) {
    for (const ch of channels) this.positions.delete(ch);
    this._emit("onUnrecovered", channels);
  }

  _close() {
    this.client._subs.delete(this.id);
    this._setState("closed");
  }

  /** Stop following the channels (the hub narrows the shared stream). */
  unsubscribe() {
    if (this.state === "closed") return;
    this.client._send({ t: "unsub", sub: this.id });
    this._close();
  }

  /** Switch the shared connection's transport (every tab's, since they share it). */
  useTransport(name) {
    this.client._send({ t: "use", transport: name });
  }

  cursor() {
    return this.positions.size ? encodeCursor(this.positions) : null;
  }
}

export default Tidings;
