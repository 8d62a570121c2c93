// centrifuge-js (from npm, unmodified) under node with the `ws` package.
//
// Driven by tests/test_websocket_js.py:
//   node client.mjs <ws-url> <channel> [<channel>...]
// Connects, subscribes to every channel, and prints one JSON object per line
// for each event (connected, disconnected, subscribed, publication, error...).
// Lines on stdin are commands: {"cmd": "publish", "channel": c, "data": d},
// {"cmd": "history", "channel": c}, {"cmd": "disconnect"}, {"cmd": "connect"},
// {"cmd": "exit"}. The process also exits when stdin closes.
import { createInterface } from "node:readline";
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, ...channels] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const client = new Centrifuge(url, {
  websocket: WebSocket,
  minReconnectDelay: 100,
  maxReconnectDelay: 500,
  timeout: 5000,
});
client.on("connected", (ctx) => out({ event: "connected", client: ctx.client, transport: ctx.transport }));
client.on("disconnected", (ctx) => out({ event: "disconnected", code: ctx.code, reason: ctx.reason }));
client.on("connecting", (ctx) => out({ event: "connecting", code: ctx.code, reason: ctx.reason }));
client.on("error", (ctx) => out({ event: "client_error", error: String(ctx.error && ctx.error.message) }));

const subs = {};
for (const channel of channels) {
  const sub = client.newSubscription(channel);
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
  sub.on("publication", (ctx) => out({ event: "publication", channel, data: ctx.data, offset: ctx.offset }));
  sub.on("error", (ctx) => out({ event: "sub_error", channel, error: String(ctx.error && ctx.error.message) }));
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
      await subs[msg.channel].publish(msg.data);
      out({ event: "published", channel: msg.channel });
    } else if (msg.cmd === "history") {
      const res = await subs[msg.channel].history({ limit: -1 });
      out({
        event: "history",
        channel: msg.channel,
        epoch: res.epoch,
        offset: res.offset,
        publications: res.publications.map((p) => ({ data: p.data, offset: p.offset })),
      });
    } else if (msg.cmd === "disconnect") {
      client.disconnect();
    } else if (msg.cmd === "connect") {
      client.connect();
    } else if (msg.cmd === "exit") {
      client.disconnect();
      process.exit(0);
    }
  } catch (e) {
    out({ event: "command_error", cmd: msg.cmd, error: String(e && (e.message || e.code || e)) });
  }
});
rl.on("close", () => {
  client.disconnect();
  process.exit(0);
});
