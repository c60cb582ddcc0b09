"""`evd bench`: a bounded load generator for evd's echo and framed ports.

What it is for
--------------
An operator's tool, the way redis-benchmark is Redis's: point it at an
address, get requests per second, latency percentiles and, given the
server's pid, what each request cost the server in CPU.  It is client side
only: its own `selectors` loops, nothing from the daemon but the frame codec.
The client may block (it is not the daemon), but every socket it opens has a
timeout or is non-blocking, and every wait has a deadline.

How a run goes
--------------
The connections are spread over `processes` forked workers (one Python
process is roughly one core's worth of load).  Each worker sets up its
connections, says it is ready, and waits for one shared start time; then
every worker warms up for `warmup` seconds and measures for `duration`
seconds by the same (system-wide monotonic) clock, so the parent can sample
the server's CPU over exactly the measured window.  Requests completed in
the window are counted and their latencies kept; requests still in flight at
the end are dropped without blame.  Every run ends by itself.

Modes (each request is verified byte for byte; a wrong answer is an error):
- tcp      C connections, each sends S bytes and waits for them to come back.
- udp      C slots, one datagram outstanding each; one not answered within
           UDP_LOST seconds is lost (and a late answer is ignored).
- connect  one connection per request: connect, S-byte echo, close; C in
           flight.
- framed   C framed connections, D echo requests in flight on each.
- idle     open C connections (each checked by one echo), hold them for
           `duration`, check that none was closed, echo-check a sample.

`sources` spreads the load over that many loopback source addresses
(127.64.0.0/10), so that a server's per-client limits (rate buckets,
per_source) see many modest clients instead of one client far over them.

The modules, top down
---------------------
- `runner`   fork the workers, synchronise them, sample the server, merge.
- `modes`    one class per mode, on the loop skeleton of `loop`
             (`framed` holds the framed one).
- `report`   the merged figures, the human line, the JSON line.
- `target`   where to connect and where from (the address, source
             addresses and ports).
- `probes`   the server seen from /proc (CPU, RSS, process tree, a core's
             busy time); bench uses them too.
- `measure`  a worker's figures, the shared timeline, the payloads.
- `options`  what a run is asked to do, and its bounds.

This folder only describes the package; import its modules.
"""
