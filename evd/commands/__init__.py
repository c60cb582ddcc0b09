"""Running programs: the allow-listed command runner and one child
process's life from spawn to reaping, shared by every service that starts a
program."""
