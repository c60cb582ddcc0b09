"""`GET /metrics`: what one process counts, the Prometheus exposition, and
the HTTP side that serves it."""
