"""The daemon process: start-up, the worker supervisor, one daemon's
services and listeners on a reactor, and how a reload is planned."""
