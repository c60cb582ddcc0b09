"""The configuration: found and read (main file and drop-ins), validated
against the schema into frozen objects, and written back as TOML."""
