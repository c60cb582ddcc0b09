"""Sans-IO protocol and service logic: bytes and values in, bytes and
decisions out.  Nothing here touches a socket, a clock or a log."""
