"""The operating system: systemd's protocols, privilege dropping, the
pidfile."""
