"""The daemon's log: the `log` object callers use, the bounded queue in front
of its target (stderr, a file, the journal), and how a line is rendered."""
