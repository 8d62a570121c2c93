"""RFC 6455 / RFC 7692 conformance of the WebSocket transport, against a live server.

Modelled on the Autobahn Testsuite, adapted to a server that answers Centrifugo commands
instead of echoing: where Autobahn checks an echo, these cases send a command (fragmented,
compressed, split inside a code point) and assert its reply or the push it causes.

=====================  ==================================================================
Autobahn section       module
=====================  ==================================================================
2  ping/pong           test_ping_pong.py
3  reserved bits       test_framing.py
4  opcodes             test_framing.py
5  fragmentation       test_framing.py (control frames between fragments, order errors)
6  UTF-8               test_utf8.py (fail-fast, split code points, nothing stored)
7  close               test_close.py (codes echoed, forbidden codes, nothing after close)
9  limits              test_limits.py (judged on the announced length; RSS measured)
12-13 permessage-deflate  test_deflate.py (negotiation, honoured windows, fragments)
=====================  ==================================================================

The hostile client is :mod:`compliance.wsclient`; one server per module (``ws_server`` in
``conftest.py``) whose log must end free of tracebacks and ERROR lines.
"""
