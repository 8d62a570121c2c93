// A TypeScript page using every part of tidings.js' API, imported as a bundler user would:
// `tidings-client` (node_modules, package.json "exports"). tests/test_typescript.py runs
// `tsc --noEmit` on it in strict mode; it is checked, not run.
//
// Besides compiling, it asserts the types it gets (`exactly<Expected>()(value)`): a
// declaration that decayed to `any` or lost a field would fail here, not only in mistyped.ts.

import Default, {
  TRANSPORTS,
  Tidings,
  TidingsError,
  backoff,
  decodeCursor,
  encodeCursor,
  parseRetryAfter,
  retryAfterDelay,
} from "tidings-client";
import type {
  ClientInfo,
  Endpoints,
  Health,
  HistoryOptions,
  HistoryPublication,
  HistoryResult,
  Options,
  Position,
  PresenceStats,
  Publication,
  PublisherInfo,
  PublishResult,
  ResolvedOptions,
  SubscribeHandlers,
  Subscription,
  SubscriptionError,
  SubscriptionState,
  TokenSource,
  Transport,
} from "tidings-client";
import SharedDefault, { ShareHub, Tidings as SharedTidings } from "tidings-client/shared";
import type { SharedOptions, Sharing } from "tidings-client/shared";
// The shared module re-exports the rest of tidings.js.
import { TidingsError as SharedTidingsError, encodeCursor as sharedEncodeCursor } from "tidings-client/shared";

// -- type assertions ------------------------------------------------------------------

type Equal<A, B> = (<X>() => X extends A ? 1 : 2) extends <X>() => X extends B ? 1 : 2 ? true : false;
/** exactly<T>()(value) compiles only when value's type is T itself (not any, not wider). */
function exactly<Expected>() {
  return <Actual>(value: Actual & (Equal<Actual, Expected> extends true ? unknown : never)): Actual => value;
}

// -- the app's own types ------------------------------------------------------------

interface ChatMessage {
  user: string;
  text: string;
}
interface Sum {
  sum: number;
}

declare function render(message: ChatMessage, at: Date | null): void;
declare function reloadFromBackend(channels: string[]): Promise<void>;
declare function fetchToken(channel?: string): Promise<string | null>;

// -- options: every one ---------------------------------------------------------------

const getToken: TokenSource = () => fetchToken();
const options: Options = {
  token: null,
  getToken,
  getSubscriptionToken: async (channel: string) => fetchToken(channel),
  transports: ["websocket", "sse", "longpoll", "poll"],
  wsUrl: "wss://example.org/connection/websocket",
  sseUrl: "https://example.org/sse",
  pollUrl: "https://example.org/poll",
  healthUrl: "https://example.org/ready",
  callUrl: "https://example.org/call",
  openTimeout: 5000,
  requestTimeout: 10000,
  longPollTimeout: 25,
  pollInterval: 2000,
  minBackoff: 250,
  maxBackoff: 20000,
  pingMargin: 10000,
  probe: true,
  probeMinDelay: 5000,
  probeMaxDelay: 120000,
  refreshMargin: 0.2,
  debug: false,
};

const client = new Tidings("https://example.org", options);
const byDefault: Tidings = new Default(); // the page's origin
const sameClass: typeof Tidings = Default;
exactly<string>()(client.baseUrl);
exactly<ResolvedOptions>()(client.options);
exactly<number>()(client.options.openTimeout);
exactly<readonly Transport[]>()(client.options.transports);
exactly<Endpoints>()(client.urls);
exactly<string>()(client.urls.call);

// -- a subscription: generic publications, every handler --------------------------------

const states: SubscriptionState[] = [];
const handlers: SubscribeHandlers = {
  onUnrecovered: (channels) => void reloadFromBackend(channels),
  onTransport: (name) => {
    exactly<Transport>()(name);
  },
  onState: (state) => states.push(state),
  onError: (err: SubscriptionError) => {
    if (err.code !== undefined && err.code >= 3500) console.warn("refused:", err.code, err.message);
  },
  transports: TRANSPORTS,
  since: null,
};

const sub: Subscription = client.subscribe<ChatMessage>(
  ["chat:room42", "news"],
  (pub) => {
    exactly<Publication<ChatMessage>>()(pub);
    exactly<ChatMessage>()(pub.data);
    exactly<number>()(pub.offset);
    exactly<string>()(pub.epoch);
    const publisher: PublisherInfo | undefined = pub.info;
    const tags: Record<string, string> | undefined = pub.tags;
    render(pub.data, pub.time === undefined ? null : new Date(pub.time));
    console.log(pub.channel, publisher?.user ?? "anonymous", tags?.["source"]);
  },
  handlers,
);

// Inferred from the callback's annotation, and a single channel as a string.
const typedByCallback = client.subscribe("alerts", (pub: Publication<{ level: number }>) => {
  exactly<number>()(pub.data.level);
});
// Without a type argument, data is unknown: narrow before use.
client.subscribe("raw", (pub) => {
  exactly<unknown>()(pub.data);
  if (typeof pub.data === "string") console.log(pub.data.toUpperCase());
});

exactly<readonly string[]>()(sub.channels);
exactly<ReadonlyMap<string, Position>>()(sub.positions);
exactly<Transport | null>()(sub.transport);
exactly<SubscriptionState>()(sub.state);
const cursor: string | null = sub.cursor();
sub.useTransport("sse");
typedByCallback.unsubscribe();

// Resume elsewhere from where this one stopped: a cursor, or positions.
const resumed = client.subscribe<ChatMessage>("chat:room42", (pub) => render(pub.data, null), {
  since: cursor,
  transports: ["longpoll"],
});
const positions: ReadonlyMap<string, Position> = resumed.positions;
client.subscribe("news", () => {}, { since: positions });

// -- calls: rpc, publish, history, presence ----------------------------------------------

async function calls(): Promise<void> {
  const answer = await client.rpc<Sum>("add", { a: 1, b: 2 });
  exactly<Sum>()(answer);
  const total: number = answer.sum;
  exactly<unknown>()(await client.rpc("ping")); // no data, no type argument

  exactly<PublishResult>()(await client.publish("chat:room42", { user: "me", text: `sum ${total}` }));

  const historyOptions: HistoryOptions = { limit: 10, since: { epoch: "e1", offset: 3 }, reverse: true };
  const history = await client.history<ChatMessage>("chat:room42", historyOptions);
  exactly<HistoryResult<ChatMessage>>()(history);
  for (const p of history.publications) {
    exactly<HistoryPublication<ChatMessage>>()(p);
    render(p.data, p.time === undefined ? null : new Date(p.time));
  }
  const latest: Position = { epoch: history.epoch, offset: history.offset };
  await client.history("chat:room42", { limit: 0 });
  await client.history("chat:room42");

  const present = await client.presence("chat:room42");
  exactly<Record<string, ClientInfo>>()(present);
  for (const [id, info] of Object.entries(present)) console.log(id, info.user, info.client, info.conn_info, info.chan_info);
  const stats = await client.presenceStats("chat:room42");
  exactly<PresenceStats>()(stats);
  console.log(stats.num_clients, stats.num_users, latest);

  try {
    await client.rpc("forbidden");
  } catch (err) {
    if (err instanceof TidingsError) {
      exactly<number>()(err.code);
      exactly<boolean>()(err.temporary);
      exactly<number | null>()(err.retryAfter);
      const asError: Error = err;
      console.warn(asError.message);
    }
  }
  const made = new TidingsError(103, "permission denied", false, null);
  console.log(made.code, new TidingsError(0).temporary);

  exactly<string | null>()(await client.connectionToken());
  exactly<string | null>()(await client.connectionToken(true));
  exactly<string | null>()(await client.subscriptionToken("chat:room42"));
  const health: Health = await client.health();
  exactly<number | null>()(health.retryAfter);
  exactly<boolean>()(await client.healthy());
  client.close();
  byDefault.close();
}

// -- cursor and retry helpers ------------------------------------------------------------

const encoded: string = encodeCursor(new Map([["news", { epoch: "e1", offset: 7 }]]));
encodeCursor([["news", { epoch: "e1", offset: 7 }]]); // any iterable of entries
encodeCursor(sub.positions);
const decoded = decodeCursor(encoded);
exactly<Map<string, Position> | null>()(decoded);
const delay: number = backoff(3, 250, 20000) + retryAfterDelay(parseRetryAfter("5") ?? 0);
exactly<number | null>()(parseRetryAfter(null));
exactly<readonly ["websocket", "sse", "longpoll", "poll"]>()(TRANSPORTS);
const best: Transport = TRANSPORTS[0];

// -- tidings-client/shared: the same API over one connection per browser --------------

const sharedOptions: SharedOptions = {
  ...options,
  shared: true,
  sharedWorker: false,
  pingInterval: 10000,
  maxChannels: 128,
  workerTimeout: 10000,
};
const shared = new SharedTidings(undefined, sharedOptions);
const sharedByDefault: SharedTidings = new SharedDefault("https://example.org");
exactly<Sharing>()(shared.sharing);
exactly<boolean>()(shared.options.sharedWorker);
exactly<number>()(shared.options.maxChannels);
exactly<number>()(shared.options.workerTimeout);
const sharedSub = shared.subscribe<ChatMessage>("chat:room42", (pub) => render(pub.data, null), {
  onState: (state) => states.push(state),
});
sharedSub.useTransport("websocket");

async function sharedCalls(): Promise<void> {
  exactly<Sum>()(await shared.rpc<Sum>("add", { a: 2, b: 3 }));
  exactly<PublishResult>()(await shared.publish("chat:room42", { user: "me", text: "hi" }));
  exactly<HistoryResult<ChatMessage>>()(await shared.history<ChatMessage>("chat:room42", { limit: -1 }));
  exactly<Record<string, ClientInfo>>()(await shared.presence("chat:room42"));
  exactly<PresenceStats>()(await shared.presenceStats("chat:room42"));
  exactly<Health>()(await shared.health());
  exactly<boolean>()(await shared.healthy());
  const err: TidingsError = new SharedTidingsError(108, "not available");
  console.log(err.code, sharedEncodeCursor(sharedSub.positions));
  sharedSub.unsubscribe();
  shared.close();
  sharedByDefault.close();
}

// What tidings-worker.js runs; exported for it.
const hub = new ShareHub();
hub.handle("tab-1", { t: "bye" }, (message: unknown) => console.log(message));
hub.close();

void calls();
void sharedCalls();
console.log(sameClass, delay, best);
