// admin.js — the admin page of tidings (docs/admin.md). An ES module, no build step.
//
// Every action is a call of the server API through POST /admin/api/<method>, which the
// server authorizes by the session cookie of the login (HttpOnly: this script never sees
// it). The live tail is tidings' own client (tidings.js) over SSE, pointed at /admin/tail,
// where the session is the credential. Everything a client or publisher chose (channel
// names, data, user ids) is written with textContent, never parsed as HTML.

import { Tidings } from "/tidings.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// How often the nodes and channels are refreshed (ms); ?refresh= overrides, at least 250.
const REFRESH_MS = Math.max(250, Number(params.get("refresh")) || 2000);
// Rows kept in the tail: the oldest go first, so a busy channel cannot grow the page.
const MAX_TAIL_ROWS = 200;
// Channel rows shown at once; the search narrows the rest.
const MAX_CHANNEL_ROWS = 500;

class LoginRequired extends Error {}

/** Call a server API method; its result, or an Error carrying the API's message. */
async function call(method, body = {}) {
  const resp = await fetch(`/admin/api/${method}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (resp.status === 401) throw new LoginRequired("login required");
  let reply = null;
  try { reply = await resp.json(); } catch (e) { /* not JSON: the status says it */ }
  if (reply && reply.error) throw new Error(`${reply.error.message} (code ${reply.error.code})`);
  if (!resp.ok || !reply) throw new Error(`HTTP ${resp.status}`);
  return reply.result;
}

/** An element with text children only (never HTML). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function say(id, text, cls = "muted") {
  const node = $(id);
  node.textContent = text;
  node.className = cls;
}

function uptime(seconds) {
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size) { parts.push(Math.floor(seconds / size) + unit); seconds %= size; }
  }
  parts.push(seconds + "s");
  return parts.join(" ");
}

function json(value) {
  return JSON.stringify(value);
}

// -- login ------------------------------------------------------------------------

function showLogin(message = "") {
  stopTail();
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  say("login-error", message, "error");
  $("password").focus();
}

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = false;
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resp = await fetch("/admin/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ password: $("password").value }),
    credentials: "same-origin",
  });
  $("password").value = "";
  if (resp.ok) {
    showDashboard();
    refresh();
  } else if (resp.status === 429) {
    showLogin(`Too many failed logins: try again in ${resp.headers.get("Retry-After") || "a few"} s.`);
  } else {
    showLogin(resp.status === 401 ? "Wrong password." : `Login failed (HTTP ${resp.status}).`);
  }
});

$("logout").addEventListener("click", async () => {
  await fetch("/admin/logout", { method: "POST", credentials: "same-origin" });
  showLogin("Logged out.");
});

// -- nodes and channels, refreshed ---------------------------------------------------

const KNOWN = new Set([
  "uid", "name", "version", "uptime", "num_clients", "num_channels", "clients_by_transport",
]);

/** "websocket 3 · sse 1 · ...": each transport's clients, each in an element of its own. */
function byTransport(counts = {}) {
  const parts = [];
  for (const [transport, n] of Object.entries(counts)) {
    if (parts.length) parts.push(" · ");
    parts.push(el("span", { dataset: { transport } }, `${transport} ${n}`));
  }
  return parts;
}

/** Whatever else a node reports (per-transport counts...), as "key: value" lines. */
function extras(node) {
  const lines = [];
  for (const [key, value] of Object.entries(node)) {
    if (KNOWN.has(key)) continue;
    if (value && typeof value === "object") {
      for (const [k, v] of Object.entries(value)) lines.push(`${key}.${k}: ${json(v)}`);
    } else {
      lines.push(`${key}: ${json(value)}`);
    }
  }
  return lines.join("\n");
}

function renderNodes(nodes) {
  const rows = nodes.map((node) =>
    el("tr", { dataset: { node: node.name } },
      el("td", {}, node.name),
      el("td", {}, node.version),
      el("td", { className: "num", dataset: { field: "uptime" } }, uptime(node.uptime)),
      el("td", { className: "num", dataset: { field: "num_clients" } }, node.num_clients),
      el("td", { dataset: { field: "clients_by_transport" } }, ...byTransport(node.clients_by_transport)),
      el("td", { className: "num", dataset: { field: "num_channels" } }, node.num_channels),
      el("td", { className: "muted", dataset: { field: "more" } }, extras(node))));
  $("nodes").tBodies[0].replaceChildren(...rows);
}

/** The search text as a pattern for the API's channels method: a substring, unless globbed. */
function channelPattern() {
  const text = $("channel-search").value.trim();
  if (!text) return "";
  return /[*?[]/.test(text) ? text : `*${text}*`;
}

function renderChannels(channels) {
  const names = Object.keys(channels).sort();
  const selected = $("channel").value;
  const rows = names.slice(0, MAX_CHANNEL_ROWS).map((name) => {
    const row = el("tr", { dataset: { channel: name } },
      el("td", {}, name),
      el("td", { className: "num", dataset: { field: "num_clients" } }, channels[name].num_clients));
    if (name === selected) row.classList.add("selected");
    row.addEventListener("click", () => selectChannel(name));
    return row;
  });
  $("channels").tBodies[0].replaceChildren(...rows);
  const hidden = names.length - rows.length;
  say("channels-note", names.length === 0 ? "no channel has subscribers"
    : hidden > 0 ? `${hidden} more: narrow the search` : `${names.length} channel(s)`);
}

let refreshing = false;

async function refresh() {
  if (refreshing || $("dashboard").hidden) return;
  refreshing = true;
  try {
    const [info, channels] = await Promise.all([
      call("info"),
      call("channels", { pattern: channelPattern() }),
    ]);
    renderNodes(info.nodes);
    renderChannels(channels.channels);
    say("refreshed", `updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    if (err instanceof LoginRequired) showLogin("Your session ended: log in again.");
    else say("refreshed", `refresh failed: ${err.message}`);
  } finally {
    refreshing = false;
  }
}

$("channel-search").addEventListener("input", () => refresh());

// -- one channel: tail, publish, history, presence ------------------------------------

function channel() {
  return $("channel").value.trim();
}

function selectChannel(name) {
  $("channel").value = name;
  for (const row of $("channels").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.channel === name);
  }
}

/** A log line: the publication's offset, then its data as JSON text. */
function publicationRow(pub) {
  return el("li", { dataset: { offset: pub.offset } },
    el("span", { className: "offset" }, `#${pub.offset}`), json(pub.data));
}

const tailClient = new Tidings(location.origin, {
  sseUrl: `${location.origin}/admin/tail`,
  transports: ["sse"],
});
let tail = null;

function stopTail() {
  if (tail) tail.unsubscribe();
  tail = null;
  say("tail-state", "not tailing");
}

$("tail-start").addEventListener("click", () => {
  const name = channel();
  if (!name) return say("tail-state", "name a channel first", "error");
  stopTail();
  $("tail").replaceChildren();
  say("tail-state", `connecting to ${name}…`);
  tail = tailClient.subscribe([name], (pub) => {
    const list = $("tail");
    list.append(publicationRow(pub));
    while (list.childElementCount > MAX_TAIL_ROWS) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }, {
    transports: ["sse"],
    onState: (state) => say("tail-state", `${name}: ${state === "connected" ? "tailing" : state}`,
      state === "connected" ? "ok" : "muted"),
    onError: (err) => {
      say("tail-state", `${name}: ${err.message}`, "error");
      refresh(); // a session that ended shows the login form
    },
  });
  $("tail").dataset.channel = name;
});

$("tail-stop").addEventListener("click", stopTail);

async function action(resultId, fn) {
  say(resultId, "…");
  try {
    await fn();
  } catch (err) {
    if (err instanceof LoginRequired) showLogin("Your session ended: log in again.");
    else say(resultId, err.message, "error");
  }
}

$("publish").addEventListener("click", () => action("publish-result", async () => {
  let data;
  try { data = JSON.parse($("publish-data").value); } catch (e) {
    throw new Error(`not JSON: ${e.message}`);
  }
  const result = await call("publish", { channel: channel(), data });
  say("publish-result", `published at offset ${result.offset}`, "ok");
}));

$("history-load").addEventListener("click", () => action("history-result", async () => {
  const result = await call("history", { channel: channel(), limit: 50, reverse: true });
  $("history").replaceChildren(...result.publications.map(publicationRow));
  say("history-result", `${result.publications.length} publication(s); stream at offset ${result.offset}, epoch ${result.epoch}`, "ok");
}));

$("presence-load").addEventListener("click", () => action("presence-result", async () => {
  const result = await call("presence", { channel: channel() });
  const entries = Object.values(result.presence || {});
  $("presence").tBodies[0].replaceChildren(...entries.map((entry) =>
    el("tr", { dataset: { user: entry.user, client: entry.client } },
      el("td", {}, entry.user),
      el("td", {}, entry.client),
      el("td", { className: "muted" }, entry.conn_info === undefined ? "" : json(entry.conn_info)))));
  say("presence-result", `${entries.length} client(s)`, "ok");
}));

$("disconnect").addEventListener("click", () => action("disconnect-result", async () => {
  const user = $("disconnect-user").value.trim();
  if (!user) throw new Error("name a user first");
  const body = { user };
  const client = $("disconnect-client").value.trim();
  if (client) body.client = client;
  await call("disconnect", body);
  say("disconnect-result", `disconnected ${user}${client ? ` (client ${client})` : ""}`, "ok");
}));

// -- start --------------------------------------------------------------------------

async function start() {
  try {
    await call("info");
  } catch (err) {
    return showLogin(err instanceof LoginRequired ? "" : `The server did not answer: ${err.message}`);
  }
  showDashboard();
  refresh();
}

setInterval(refresh, REFRESH_MS);
start();
