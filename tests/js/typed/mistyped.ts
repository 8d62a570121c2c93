// Mistakes a TypeScript user can make with tidings.js, each on one line that ends with the
// error tsc must report there (`// TSxxxx`). tests/test_typescript.py expects exactly these
// errors: a declaration that became `any`, or lost a name, lets one through and fails it.

import { Tidings, TidingsError, decodeCursor } from "tidings-client";
import type { Publication, Subscription } from "tidings-client";
import { Tidings as SharedTidings } from "tidings-client/shared";

interface Sum {
  sum: number;
}

export async function mistakes(sub: Subscription): Promise<void> {
  const client = new Tidings("https://example.org", { openTimout: 1000 }); // TS2561
  client.subscribe("news", () => {}, { onTransport: (name: number) => console.log(name) }); // TS2322
  client.subscribe<Sum>("news", (pub: Publication<string>) => console.log(pub.data)); // TS2345
  new Tidings("https://example.org", { transports: ["websockets"] }); // TS2820
  sub.useTransport("ws"); // TS2345
  const text: string = await client.rpc<Sum>("add", { a: 1, b: 2 }); // TS2322
  client.publish("news"); // TS2554
  await client.history("news", { limit: "all" }); // TS2322
  const stats = await client.presenceStats("news");
  console.log(stats.clients); // TS2339
  const err = new TidingsError(103, "denied");
  err.code = 0; // TS2540
  const positions = decodeCursor("abc");
  console.log(positions.size); // TS18047
  const shared = new SharedTidings("https://example.org", { sharedWorkers: false }); // TS2561
  shared.connectionToken(); // TS2339
  console.log(text, sub.state === "open"); // TS2367
}
