"""`evd bench [MODE]`: the bounded load generator (tools/bench)."""

from __future__ import annotations

import argparse

from evd.cli.failures import EX_FAIL, EX_OK, error, load_config
from evd.cli.targets import echo_address, framed_address
from evd.tools.bench.options import MODES


def _address(args: argparse.Namespace) -> str | None:
    """`evd bench`'s target: --address, else the config's echo (tcp, udp,
    connect, idle) or framed listener, as `evd call` finds its own."""
    if args.address:
        return str(args.address)
    config = load_config(args)
    if config is None:
        return None
    if args.mode == "framed":
        return framed_address(config, tls=args.tls)
    return echo_address(config, udp=args.mode == "udp", tls=args.tls)


def cmd_bench(args: argparse.Namespace) -> int:
    from evd.tools.bench import options, report, runner

    address = _address(args)
    if address is None:
        error(f"no {args.mode}{' tls' if args.tls else ''} target in the configuration; give --address")
        return EX_FAIL
    opts = options.Options(
        mode=args.mode,
        address=address,
        connections=args.connections,
        size=args.size,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.processes,
        depth=args.depth,
        server_pid=args.server_pid,
        allow_remote=args.allow_remote,
        sources=args.sources,
        tls=args.tls,
        cafile=args.cafile or "",
        proxy_v2=args.proxy_v2,
    )
    try:
        result = runner.run(opts)
    except options.BenchError as exc:
        error(str(exc))
        return EX_FAIL
    print(report.to_json(result) if args.json else report.describe(result), flush=True)
    return EX_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`evd bench`: like every subcommand, -c is --config (SPEC section 2);
    connections are -n (redis-benchmark's -c would break that rule)."""
    bench = sub.add_parser(
        "bench",
        help="a bounded load generator against an evd address",
        description="tcp: ping-pong; udp: one datagram in flight per slot; "
        "connect: a connection per request; framed: pipelined echo "
        "frames; idle: hold connections, then check them",
    )
    bench.add_argument("mode", nargs="?", default="tcp", choices=MODES, help="the load")
    bench.add_argument("-c", "--config", metavar="PATH", help="configuration to find the default address in")
    bench.add_argument(
        "--address",
        help="HOST:PORT, [V6]:PORT or unix:PATH (default: the config's "
        "echo listener, or its framed one for framed)",
    )
    bench.add_argument(
        "-n",
        "--connections",
        type=int,
        default=0,
        metavar="N",
        help="connections/sockets (in flight for connect; held for idle); "
        "default 50 tcp/framed, 20 udp/connect, 1000 idle",
    )
    bench.add_argument("-s", "--size", type=int, default=64, metavar="S", help="payload bytes (default 64)")
    bench.add_argument(
        "-d",
        "--duration",
        type=float,
        default=5.0,
        metavar="S",
        help="measured seconds, at most 300 (idle: the hold) (default 5)",
    )
    bench.add_argument(
        "-w", "--warmup", type=float, default=1.0, metavar="S", help="warm-up seconds (default 1)"
    )
    bench.add_argument(
        "-D",
        "--depth",
        type=int,
        default=1,
        metavar="D",
        help="framed: requests in flight per connection (default 1)",
    )
    bench.add_argument(
        "-P",
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="spread the connections over P processes (default 1)",
    )
    bench.add_argument(
        "--server-pid",
        type=int,
        default=0,
        metavar="PID",
        help="report this server's CPU per request (and RSS for idle) from /proc",
    )
    bench.add_argument(
        "--sources",
        type=int,
        default=0,
        metavar="N",
        help="spread connections and datagrams over N loopback source addresses "
        "(127.64.0.0/10), so that per-client limits see N modest clients "
        "(default: 127.0.0.2-5 for streams, the kernel's choice for udp)",
    )
    bench.add_argument(
        "--tls",
        action="store_true",
        help="TLS over every connection (tcp, connect: a handshake per request, framed, idle); "
        "default address: the config's tls listener",
    )
    bench.add_argument(
        "--cafile", metavar="PATH", help="--tls: CA bundle to verify the server (default: the system's)"
    )
    bench.add_argument(
        "--proxy-v2",
        action="store_true",
        help="tcp, connect: begin each connection with a PROXY protocol v2 header naming its own "
        "source, as HAProxy's send-proxy-v2 does (for a service with proxy_protocol = true)",
    )
    bench.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.set_defaults(func=cmd_bench)
