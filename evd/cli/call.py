"""`evd call SERVICE [ARGS...]`: one framed request (SPEC section 5)."""

from __future__ import annotations

import argparse
import json
import sys

from evd.cli.failures import EX_CONFIG, EX_FAIL, EX_OK, EX_SERVER, error, load_config
from evd.cli.targets import framed_address, server_key
from evd.system.secrets import SecretError, read_secret

Fields = dict[str, object]


def _request(args: argparse.Namespace) -> tuple[Fields, bytes]:
    """(header fields, body) for `evd call SERVICE ARGS...`."""
    if args.service == "echo":
        return {}, " ".join(args.args).encode()
    if args.service == "time":
        fields: Fields = {"tz": args.tz}
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


def cmd_call(args: argparse.Namespace) -> int:
    import ssl

    from evd.tools.client import Client, ServerError, tls_context

    address, key = args.address, None
    if address is None or args.key_file is None:
        config = load_config(args)
        if config is None:
            return EX_CONFIG
        address = address or framed_address(config, tls=args.tls)
        if args.key_file is None:
            key = server_key(config)
    if address is None:
        error(f"no framed {'tls ' if args.tls else ''}listener configured; give --address")
        return EX_FAIL
    tls = None
    try:
        if args.key_file:
            key = read_secret(args.key_file, private=False)
        fields, body = _request(args)
        if args.tls:
            tls = tls_context(args.cafile, args.cert, args.key)
    except (OSError, ValueError, SecretError) as exc:  # ssl.SSLError is an OSError
        error(str(exc))
        return EX_FAIL
    try:
        with Client(address, timeout=args.timeout, key=key, tls=tls, key_name=args.key_name) as client:
            frame = client.call(args.service, body, **fields)
    except ServerError as exc:
        if args.json:
            print(json.dumps(exc.frame.header))
        error(f"{exc.code}: {exc.message}")
        return EX_SERVER
    except ssl.SSLError as exc:
        error(f"cannot talk to {address}: TLS: {exc.reason or exc}")
        return EX_FAIL
    except (OSError, ValueError) as exc:
        error(f"cannot talk to {address}: {exc}")
        return EX_FAIL
    if args.json:
        print(json.dumps(frame.header), flush=True)
    sys.stdout.buffer.write(frame.body)
    if frame.body and not frame.body.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return EX_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
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
    call.add_argument(
        "--key-name",
        metavar="NAME",
        help="the [keys.NAME] entry --key-file is (default: the server tries each)",
    )
    call.add_argument(
        "--tls", action="store_true", help="TLS (default address: the config's first framed tls listener)"
    )
    call.add_argument(
        "--cafile", metavar="PATH", help="--tls: CA bundle to verify the server (default: the system's)"
    )
    call.add_argument("--cert", metavar="PATH", help="--tls: client certificate (mutual TLS)")
    call.add_argument("--key", metavar="PATH", help="--tls: the client certificate's private key")
    call.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the answer"
    )
    call.add_argument("--json", action="store_true", help="print the response header as JSON first")
    call.add_argument("--fmt", help="time: strftime format")
    call.add_argument("--tz", choices=("utc", "local"), default="utc", help="time: zone")
    call.add_argument("--input", metavar="PATH", help="command: file for its stdin ('-' = ours)")
    call.set_defaults(func=cmd_call)
