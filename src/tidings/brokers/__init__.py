"""Brokers: where publications get their offsets, where history lives, and how
they reach every node. Only the in-memory broker exists so far."""

from .base import Broker
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker"]
