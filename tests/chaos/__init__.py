"""The chaos harness: real tidings nodes, real clients, faults at random, one invariant.

"Every subscriber gets every publication of a channel in order exactly once, or is
told plainly that it cannot" (issue 12). :mod:`chaos.harness` wires the parts:

* :mod:`chaos.proxy` -- a TCP proxy per client, so a connection can be cut without
  the client's cooperation, and each reconnect goes to the next node;
* :mod:`chaos.clients` -- SSE, long-poll, poll and WebSocket (centrifuge-python)
  clients that record what they receive, per channel;
* :mod:`chaos.cluster` -- the processes (tidings nodes, redis-server) and the faults
  done to them;
* :mod:`chaos.invariants` -- the check of the recordings against what the API
  acknowledged, and the report.

Entry points: ``tests/chaos/test_chaos.py`` (short, in the suite) and
``bench/chaos.py`` (long runs). See ``docs/chaos.md``.
"""
