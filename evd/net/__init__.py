"""Sockets: listeners that accept and receive, transports that own a
connection's bytes."""
