"""The daemon's own listeners and the control verbs: the control socket's
connections, the one table of verbs and its drivers (single process,
supervisor, worker end), and the supervisor-worker link."""
