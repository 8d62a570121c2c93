// centrifuge-js (from npm, unmodified) under node with the `ws` package.
//
// Driven by tests/test_websocket_js.py:
//   node client.mjs <ws-url> <channel> [<channel>...]
// Connects, subscribes to every channel, and prints one JSON object per line
// for each event (connected, disconnected, subscribed, publication, error...).
// Lines on stdin are commands: {"cmd": "publish", "channel": c, "data": d},
// {"cmd": "history", "channel": c}, {"cmd": "presence", "channel": c},
// {"cmd": "presence_stats", "channel": c}, {"cmd": "disconnect"}, {"cmd": "connect"},
// {"cmd": "rpc", "method": m, "data": d}, {"cmd": "exit"}. The process also exits
// when stdin closes.
// Environment: TIDINGS_JS_TOKEN (connection token), TIDINGS_JS_SUB_TOKENS (JSON:
// subscription tokens by channel), TIDINGS_JS_JOIN_LEAVE=1 (the joinLeave
// subscription option), TIDINGS_JS_DELTA=fossil (the delta subscription option; the
// command {"cmd": "delta_stats", "channel": c} prints the SDK's deltaStats()), TIDINGS_JS_PROTOBUF=1 (the SDK's Protobuf build,
// centrifuge/build/protobuf: publication data travels as bytes, here the UTF-8
// of its JSON both ways, so events and commands look the same in both modes).
// TIDINGS_JS_TRANSPORT=http_stream|sse: the SDK's bidirectional emulation only
// (WebSocket left out of its `transports` list); <ws-url> is then the server's
// http:// base URL; TIDINGS_JS_EMULATION_URL another node's, which the
// commands after connect are posted to.
// Server-side subscriptions (token channels, the personal channel) print
// server_subscribed and server_publication events.
import { createInterface } from "node:readline";
import WebSocket from "ws";

const protobuf = Boolean(process.env.TIDINGS_JS_PROTOBUF);
const { Centrifuge } = await import(protobuf ? "centrifuge/build/protobuf" : "centrifuge");
const fromWire = (data) => (protobuf ? JSON.parse(new TextDecoder().decode(data)) : data);
const toWire = (data) => (protobuf ? new TextEncoder().encode(JSON.stringify(data)) : data);
// The Protobuf build hands out uint64 offsets as protobufjs longs ({low, high, unsigned}).
// Absent data: undefined in JSON, empty bytes in Protobuf; null in the events.
const dataOf = (d) => (d === undefined || d === null || d.length === 0 ? null : fromWire(d));
const num = (v) => (v !== null && typeof v === "object" ? v.high * 4294967296 + v.low : v);

const [url, ...channels] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const options = {
  websocket: WebSocket,
  minReconnectDelay: 100,
  maxReconnectDelay: 500,
  timeout: 5000,
};
if (process.env.TIDINGS_JS_TOKEN) options.token = process.env.TIDINGS_JS_TOKEN;
// TIDINGS_JS_DATA: JSON sent as the connect command's data (the connect hook sees it).
if (process.env.TIDINGS_JS_DATA) options.data = toWire(JSON.parse(process.env.TIDINGS_JS_DATA));
const emulated = process.env.TIDINGS_JS_TRANSPORT;
let endpoint = url;
if (emulated) {
  const { EventSource } = await import("eventsource");
  Object.assign(options, { fetch, readableStream: ReadableStream, eventsource: EventSource });
  options.emulationEndpoint = (process.env.TIDINGS_JS_EMULATION_URL || url) + "/emulation";
  endpoint = [{ transport: emulated, endpoint: url + "/connection/" + emulated }];
}
const client = new Centrifuge(endpoint, options);
client.on("connected", (ctx) =>
  out({
    event: "connected",
    client: ctx.client,
    transport: ctx.transport,
    data: dataOf(ctx.data),
  }),
);
client.on("disconnected", (ctx) => out({ event: "disconnected", code: ctx.code, reason: ctx.reason }));
client.on("connecting", (ctx) => out({ event: "connecting", code: ctx.code, reason: ctx.reason }));
client.on("error", (ctx) => out({ event: "client_error", error: String(ctx.error && ctx.error.message) }));
client.on("subscribed", (ctx) => out({ event: "server_subscribed", channel: ctx.channel }));
client.on("publication", (ctx) =>
  out({ event: "server_publication", channel: ctx.channel, data: fromWire(ctx.data), offset: num(ctx.offset) }),
);

const subTokens = JSON.parse(process.env.TIDINGS_JS_SUB_TOKENS || "{}");
const subOptions = (channel) => {
  const options = {};
  if (subTokens[channel]) options.token = subTokens[channel];
  if (process.env.TIDINGS_JS_JOIN_LEAVE) options.joinLeave = true;
  if (process.env.TIDINGS_JS_DELTA) options.delta = process.env.TIDINGS_JS_DELTA;
  return options;
};

const subs = {};
for (const channel of channels) {
  const sub = client.newSubscription(channel, subOptions(channel));
  sub.on("subscribed", (ctx) =>
    out({
      event: "subscribed",
      channel,
      recoverable: ctx.recoverable,
      positioned: ctx.positioned,
      wasRecovering: ctx.wasRecovering,
      recovered: ctx.recovered,
      streamPosition: ctx.streamPosition || null,
    }),
  );
  sub.on("publication", (ctx) =>
    out({ event: "publication", channel, data: fromWire(ctx.data), offset: num(ctx.offset) }),
  );
  sub.on("error", (ctx) =>
    out({
      event: "sub_error",
      channel,
      code: ctx.error && ctx.error.code,
      error: String(ctx.error && ctx.error.message),
    }),
  );
  sub.on("unsubscribed", (ctx) => out({ event: "unsubscribed", channel, code: ctx.code, reason: ctx.reason }));
  sub.on("join", (ctx) => out({ event: "join", channel, client: ctx.info.client, user: ctx.info.user }));
  sub.on("leave", (ctx) => out({ event: "leave", channel, client: ctx.info.client, user: ctx.info.user }));
  sub.subscribe();
  subs[channel] = sub;
}
client.connect();

const rl = createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  if (!line.trim()) return;
  const msg = JSON.parse(line);
  try {
    if (msg.cmd === "publish") {
      await subs[msg.channel].publish(toWire(msg.data));
      out({ event: "published", channel: msg.channel });
    } else if (msg.cmd === "history") {
      const res = await subs[msg.channel].history({ limit: -1 });
      out({
        event: "history",
        channel: msg.channel,
        epoch: res.epoch,
        offset: res.offset,
        publications: res.publications.map((p) => ({ data: fromWire(p.data), offset: num(p.offset) })),
      });
    } else if (msg.cmd === "presence") {
      const res = await client.presence(msg.channel);
      out({ event: "presence", channel: msg.channel, clients: res.clients });
    } else if (msg.cmd === "presence_stats") {
      const res = await client.presenceStats(msg.channel);
      out({
        event: "presence_stats",
        channel: msg.channel,
        // JSON.stringify drops undefined: null stands for a field the server left out.
        numClients: res.numClients === undefined ? null : res.numClients,
        numUsers: res.numUsers === undefined ? null : res.numUsers,
      });
    } else if (msg.cmd === "rpc") {
      const res = await client.rpc(msg.method, toWire(msg.data));
      out({ event: "rpc", method: msg.method, data: dataOf(res.data) });
    } else if (msg.cmd === "delta_stats") {
      out({ event: "delta_stats", channel: msg.channel, ...subs[msg.channel].deltaStats() });
    } else if (msg.cmd === "disconnect") {
      client.disconnect();
    } else if (msg.cmd === "connect") {
      client.connect();
    } else if (msg.cmd === "exit") {
      client.disconnect();
      process.exit(0);
    }
  } catch (e) {
    out({
      event: "command_error",
      cmd: msg.cmd,
      code: e && e.code,
      error: String(e && (e.message || e.code || e)),
    });
  }
});
rl.on("close", () => {
  client.disconnect();
  process.exit(0);
});
