"""Primitives every layer uses: the reactor, the configuration, the log."""
