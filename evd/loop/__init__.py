"""The event loop: the reactor, and the interfaces between layers (typing.Protocols).

Imports nothing of evd but itself."""
