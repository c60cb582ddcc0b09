"""Client side: tools that talk to a running daemon (the framed client,
stop/reload/status, the load generator).  The daemon never imports them."""
