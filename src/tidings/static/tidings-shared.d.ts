// Type declarations of tidings-shared.js: tidings.js' API over one connection per browser,
// shared by every tab of an origin (served at /tidings-shared.d.ts; `tidings-client/shared`
// in the package's `exports`). Kept in step with the module by tests/test_typescript.py.

import type {
  Health,
  HistoryOptions,
  HistoryResult,
  Options,
  PresenceStats,
  Publication,
  PublishResult,
  ClientInfo,
  SubscribeHandlers,
  Subscription,
} from "./tidings.js";

// Everything of tidings.js but its Tidings (and default), which this module replaces.
export * from "./tidings.js";

/** How this tab reaches the connection. */
export type Sharing =
  /** One client in a SharedWorker serves every tab. */
  | "worker"
  /** This tab won the election (Web Locks) and holds the connection for the others. */
  | "leader"
  /** Another tab holds the connection; this one reaches it over a BroadcastChannel. */
  | "follower"
  /** Not shared: this tab has its own connection, as with tidings.js. */
  | "off";

/** Options of the shared client: tidings.js' and how to share. */
export interface SharedOptions extends Options {
  /** Share one connection among the tabs where the browser can (default true); false: one per tab. */
  shared?: boolean;
  /** Use a SharedWorker where there is one (default true); false: elect a leader tab instead. */
  sharedWorker?: boolean;
  /** Only where Web Locks are missing: ms between the hub's pings to tell a closed tab (default 10000). */
  pingInterval?: number;
  /**
   * The most channels the shared connection follows for all tabs together: the server's
   * `limits.max_channels_per_connection` (default 128). A subscription that would pass it
   * is refused at once (`onError` with code 106, state `"closed"`).
   */
  maxChannels?: number;
  /** ms for the SharedWorker to answer at all before the tab goes on without it (a leader election, or its own connection) (default 10000). */
  workerTimeout?: number;
}

/**
 * tidings.js' client, sharing one connection among the tabs. The first tab's options
 * configure the shared client; `getToken` and `getSubscriptionToken` are asked of a tab
 * that has them. A subscription given its own `transports` gets a connection of its own.
 */
export declare class Tidings {
  /**
   * @param baseUrl The server's URL (`http(s)://host:port`); default: the page's origin.
   * @param options See {@link SharedOptions}.
   */
  constructor(baseUrl?: string | null, options?: SharedOptions);
  /** The server's URL, without a trailing slash. */
  readonly baseUrl: string;
  /** The options given, with the sharing defaults. */
  readonly options: Readonly<SharedOptions> & {
    readonly shared: boolean;
    readonly sharedWorker: boolean;
    readonly pingInterval: number;
    readonly maxChannels: number;
    readonly workerTimeout: number;
  };
  /** How this tab reaches the connection. */
  readonly sharing: Sharing;
  /**
   * Follow channels, over the shared connection: it follows the union of every tab's
   * channels, and this subscription gets exactly its own, once each, in order.
   * `sub.useTransport()` switches the shared connection, for every tab.
   */
  subscribe<T = unknown>(
    channels: string | readonly string[],
    onPublication: (pub: Publication<T>) => void,
    handlers?: SubscribeHandlers,
  ): Subscription;
  /** As tidings.js' `publish`, made by the hub. */
  publish(channel: string, data: unknown): Promise<PublishResult>;
  /** As tidings.js' `history`, made by the hub. */
  history<T = unknown>(channel: string, options?: HistoryOptions): Promise<HistoryResult<T>>;
  /** As tidings.js' `presence`, made by the hub. */
  presence(channel: string): Promise<Record<string, ClientInfo>>;
  /** As tidings.js' `presenceStats`, made by the hub. */
  presenceStats(channel: string): Promise<PresenceStats>;
  /** As tidings.js' `rpc`, made by the hub. */
  rpc<T = unknown>(method: string, data?: unknown): Promise<T>;
  /** Whether the server answers `GET /ready`, and how long a 503 asks to wait. */
  health(): Promise<Health>;
  /** Whether the server answers `GET /ready` with 200. */
  healthy(): Promise<boolean>;
  /** Stop this tab's subscriptions; a leader tab hands the connection to the next tab. */
  close(): void;
}

/**
 * The hub that holds the one connection, run by tidings-worker.js or the leader tab.
 * Exported for the worker, not for pages: its messages are internal and may change.
 */
export declare class ShareHub {
  constructor();
  /** One message of the tab `tabId`; `send` reaches that tab. */
  handle(tabId: string, message: unknown, send: (message: unknown) => void): void;
  /** Stop everything (the leader tab closes its client). */
  close(): void;
}

export default Tidings;
