"""What the command line does outside the daemon: clients of a running daemon
(the framed client, stop/reload/status and the answer of a reload, `evd ctl`,
the load generator) and tools that need no daemon at all (reading logs back,
`evd explain`, writing a drop-in).  cli/ parses and reports; the work is
here.  The daemon never imports them."""
