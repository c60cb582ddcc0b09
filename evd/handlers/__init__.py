"""Connection handlers (what a connection means) and each service's running
state; the command runner."""
