// tidings-worker.js — the SharedWorker of tidings-shared.js: one hub, one server connection,
// for every tab of the origin that uses the same base URL (the worker's name carries it).
// Each tab's MessagePort is bound to the tab id of its first message (hello).

import { ShareHub } from "./tidings-shared.js";

const hub = new ShareHub();

self.onconnect = (event) => {
  const port = event.ports[0];
  let tabId = null;
  const send = (message) => port.postMessage(message);
  port.onmessage = (ev) => {
    const message = ev.data;
    if (message && message.t === "hello" && typeof message.tab === "string") tabId = message.tab;
    if (tabId !== null) hub.handle(tabId, message, send);
  };
  port.start();
};
