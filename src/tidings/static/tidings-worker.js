// tidings-worker.js — the SharedWorker of tidings-shared.js: one hub, one server connection,
// for every tab of the origin that uses the same base URL (the worker's name carries it).
// Each tab's MessagePort is bound to the tab id of its first message (hello).
//
// A tab cannot see this worker die (a crash, the browser ending it): the worker holds a Web
// Lock named for this instance for its whole life and tells each tab the name; the tab queues
// for it, and being granted it means the worker is gone: it starts a new one and registers
// again with its positions.

import { ShareHub } from "./tidings-shared.js";

const hub = new ShareHub();
const locks = self.navigator && self.navigator.locks;
const aliveLock = `tidings-worker ${Date.now().toString(36)}${Math.random().toString(36).slice(2)}`;
const held = locks
  ? new Promise((granted) => {
      locks.request(aliveLock, () => {
        granted(aliveLock);
        return new Promise(() => {}); // held until the worker ends
      });
    })
  : Promise.resolve(null);

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
  held.then((lock) => { if (lock) send({ t: "worker", lock }); });
};
