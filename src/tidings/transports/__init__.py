"""Transports: how publications leave the hub, one module each."""
