"""tidings: a realtime event server for Python.

A backend publishes an event to a channel; tidings pushes it to every
subscriber over WebSocket, Server-Sent Events, long-polling or polling, with
history that lets a client that dropped off get exactly what it missed.
"""

__version__ = "0.1.0"
