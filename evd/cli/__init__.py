"""The `evd` command line (SPEC section 2)."""

from __future__ import annotations

import argparse
import json
import sys

from evd import __version__
from evd.core import config as config_mod
from evd.core import loader, tomlout
from evd.core.addresses import Address
from evd.core.log import LEVELS

EX_OK = 0
EX_FAIL = 1
EX_SERVER = 2
EX_CONFIG = 78  # sysexits.h EX_CONFIG: what service managers expect


def _error(message: str) -> None:
    print(f"evd: {message}", file=sys.stderr)


def load_config(args) -> config_mod.Config | None:
    """The configuration, or None after printing every error."""
    try:
        return loader.load(args.config)
    except config_mod.ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    from evd.server import preflight

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    try:  # refuse everything `run` would
        preflight.check(config)
    except config_mod.ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(tomlout.dump(config))
    return EX_OK


def _prepare(args, pidfile_required: bool):
    """Steps 1-5 of server/launch.py: (Launch, None) or (None, exit status)."""
    from evd.server import launch

    config = load_config(args)
    if config is None:
        return None, EX_CONFIG
    overrides = {"level": args.log_level, "format": args.log_format}
    try:
        return launch.prepare(config, overrides, pidfile_required), None
    except launch.StartError as exc:
        if exc.config_error:
            print(exc, file=sys.stderr)
            return None, EX_CONFIG
        _error(str(exc))
        return None, EX_FAIL


def cmd_run(args) -> int:
    from evd.server import launch

    prepared, status = _prepare(args, pidfile_required=False)
    if prepared is None:
        return status
    try:
        return launch.serve(prepared)
    except launch.StartError as exc:
        _error(str(exc))
        return EX_CONFIG if exc.config_error else EX_FAIL


def cmd_start(args) -> int:
    from evd.server import launch

    prepared, status = _prepare(args, pidfile_required=True)
    if prepared is None:
        return status
    if not prepared.config.log.file:
        _error("note: log.file is not set, so the daemon's log goes to /dev/null")
    try:
        pid = launch.start(prepared)
    except launch.StartError as exc:
        _error(str(exc))
        return EX_FAIL
    print(f"evd started, pid {pid}", flush=True)
    return EX_OK


def cmd_stop(args) -> int:
    from evd.tools import lifecycle as control

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    timeout = args.timeout if args.timeout is not None else config.daemon.shutdown_timeout + 5
    status, message = control.stop(config.daemon.pidfile, timeout)
    print(message, file=sys.stdout if status == EX_OK else sys.stderr)
    return status


def cmd_reload(args) -> int:
    from evd.tools import lifecycle as control

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    status, message = control.reload(config.daemon.pidfile)
    print(message, file=sys.stdout if status == EX_OK else sys.stderr)
    return status


def cmd_status(args) -> int:
    from evd.tools import lifecycle as control

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    key = None
    if config.services["framed"].key_file:
        key = _read_key(config.services["framed"].key_file, explicit=False)
    status, lines = control.status(config.daemon.pidfile, status_address(config), key)
    print("\n".join(lines))
    return status


def _dialable(address: Address) -> str:
    if address.proto == "unix":
        return f"unix:{address.host}"
    host = {"*": "127.0.0.1"}.get(address.host, address.host)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def default_address(config: config_mod.Config) -> str | None:
    """The first framed listener, as a client would dial it."""
    framed = config.services["framed"]
    addresses = framed.tcp + framed.unix
    return _dialable(addresses[0]) if addresses else None


def status_address(config: config_mod.Config) -> str | None:
    """Where `evd status` asks for figures: the first framed listener whose
    address is known without asking the daemon (port 0 is not)."""
    framed = config.services["framed"]
    if not framed.enabled or not config.services["stats"].enabled:
        return None
    known = [a for a in framed.tcp + framed.unix if a.proto == "unix" or a.port]
    return _dialable(known[0]) if known else None


def _call_request(args) -> tuple[dict, bytes]:
    """(header fields, body) for `evd call SERVICE ARGS...`."""
    if args.service == "echo":
        return {}, " ".join(args.args).encode()
    if args.service == "time":
        fields = {"tz": args.tz}
        if args.fmt is not None:
            fields["fmt"] = args.fmt
        return fields, b""
    if args.service == "command":
        if not args.args:
            raise ValueError("usage: evd call command NAME [ARG...]")
        body = b""
        if args.input == "-":
            body = sys.stdin.buffer.read()
        elif args.input:
            with open(args.input, "rb") as f:
                body = f.read()
        return {"name": args.args[0], "args": args.args[1:]}, body
    return {}, b""


def _read_key(path: str, explicit: bool) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read().rstrip(b"\r\n")
    except OSError:
        if explicit:
            raise
        return None  # the server's key file is not ours to read: go without


def cmd_call(args) -> int:
    from evd.tools.client import Client, ServerError

    address, key = args.address, None
    if address is None or args.key_file is None:
        config = load_config(args)
        if config is None:
            return EX_CONFIG
        address = address or default_address(config)
        if args.key_file is None and config.services["framed"].key_file:
            key = _read_key(config.services["framed"].key_file, explicit=False)
    if address is None:
        _error("no framed listener configured; give --address")
        return EX_FAIL
    try:
        if args.key_file:
            key = _read_key(args.key_file, explicit=True)
        fields, body = _call_request(args)
    except (OSError, ValueError) as exc:
        _error(str(exc))
        return EX_FAIL
    try:
        with Client(address, timeout=args.timeout, key=key) as client:
            frame = client.call(args.service, body, **fields)
    except ServerError as exc:
        if args.json:
            print(json.dumps(exc.frame.header))
        _error(f"{exc.code}: {exc.message}")
        return EX_SERVER
    except (OSError, ValueError) as exc:
        _error(f"cannot talk to {address}: {exc}")
        return EX_FAIL
    if args.json:
        print(json.dumps(frame.header), flush=True)
    sys.stdout.buffer.write(frame.body)
    if frame.body and not frame.body.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return EX_OK


def _add_lifecycle_commands(sub, common) -> None:
    """run, start, stop, reload, status."""
    log_options = argparse.ArgumentParser(add_help=False)
    log_options.add_argument("--log-format", choices=("json", "console"), help="override log.format")
    log_options.add_argument("--log-level", choices=LEVELS, help="override log.level")
    run = sub.add_parser("run", parents=[common, log_options], help="run in the foreground")
    run.set_defaults(func=cmd_run)
    start = sub.add_parser(
        "start", parents=[common, log_options], help="start in the background; return once it listens"
    )
    start.set_defaults(func=cmd_start)
    stop = sub.add_parser("stop", parents=[common], help="stop the daemon of the pidfile")
    stop.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds to wait for it to exit (default: daemon.shutdown_timeout + 5)",
    )
    stop.set_defaults(func=cmd_stop)
    reload = sub.add_parser("reload", parents=[common], help="make the daemon re-read its configuration")
    reload.set_defaults(func=cmd_reload)
    status = sub.add_parser(
        "status", parents=[common], help="is the daemon running? (exit 0 yes, 3 no, 1 stale)"
    )
    status.set_defaults(func=cmd_status)


def _bench_address(args) -> str | None:
    """`evd bench`'s target: --address, else the config's echo (tcp, udp,
    connect, idle) or framed listener, as `evd call` finds its own."""
    if args.address:
        return args.address
    config = load_config(args)
    if config is None:
        return None
    if args.mode == "framed":
        return default_address(config)
    echo = config.services["echo"]
    addresses = echo.udp if args.mode == "udp" else echo.tcp + echo.unix
    return _dialable(addresses[0]) if echo.enabled and addresses else None


def cmd_bench(args) -> int:
    from evd.tools import bench

    address = _bench_address(args)
    if address is None:
        _error(f"no {args.mode} target in the configuration; give --address")
        return EX_FAIL
    opts = bench.Options(
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
    )
    try:
        result = bench.run(opts)
    except bench.BenchError as exc:
        _error(str(exc))
        return EX_FAIL
    print(bench.to_json(result) if args.json else bench.describe(result), flush=True)
    return EX_OK


def _add_bench_command(sub) -> None:
    """`evd bench`: like every subcommand, -c is --config (SPEC section 2);
    connections are -n (redis-benchmark's -c would break that rule)."""
    bench = sub.add_parser(
        "bench",
        help="a bounded load generator against an evd address",
        description="tcp: ping-pong; udp: one datagram in flight per socket; "
        "connect: a connection per request; framed: pipelined echo "
        "frames; idle: hold connections, then check them",
    )
    bench.add_argument("mode", nargs="?", default="tcp", choices=("tcp", "udp", "connect", "framed", "idle"))
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
    bench.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="configuration file (default: $EVD_CONFIG, then "
        f"{config_mod.DEFAULT_PATH}, then the embedded default)",
    )
    parser = argparse.ArgumentParser(prog="evd", description="evd: small network services on one event loop")
    parser.add_argument("--version", action="version", version=f"evd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_lifecycle_commands(sub, common)

    check = sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and print it as TOML"
    )
    check.set_defaults(func=cmd_check_config)

    call = sub.add_parser(
        "call",
        parents=[common],
        help="send one framed request",
        description="evd call echo TEXT | time [--fmt F] | command NAME [ARG...] | stats",
    )
    call.add_argument("service", help="echo, time, command or stats")
    call.add_argument("args", nargs="*", help="echo: the text; command: NAME and its arguments")
    call.add_argument(
        "--address", help="HOST:PORT or unix:PATH (default: the config's first framed listener)"
    )
    call.add_argument("--key-file", metavar="PATH", help="HMAC key for authentication")
    call.add_argument("--timeout", type=float, default=10.0, metavar="S")
    call.add_argument("--json", action="store_true", help="print the response header as JSON first")
    call.add_argument("--fmt", help="time: strftime format")
    call.add_argument("--tz", choices=("utc", "local"), default="utc", help="time: zone")
    call.add_argument("--input", metavar="PATH", help="command: file for its stdin ('-' = ours)")
    call.set_defaults(func=cmd_call)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
