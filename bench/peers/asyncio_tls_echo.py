"""asyncio Protocol echo over TLS (asyncio's own sslproto): the TLS peer
evd is measured against.

Run with --port P (0: the kernel picks) --cert F --key F; prints
"ready TCPPORT 0" once listening on 127.0.0.1 (no UDP), and stops on
SIGTERM/SIGINT.  The context is evd's: TLS 1.2 and 1.3, no renegotiation.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import ssl

from asyncio_echo import Echo


def context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.cancel)
    server = await loop.create_server(Echo, "127.0.0.1", port, ssl=context(cert, key), backlog=1024)
    print("ready", server.sockets[0].getsockname()[1], 0, flush=True)
    try:
        await stop
    except asyncio.CancelledError:
        pass
    server.close()


def main(loop_factory=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port, args.cert, args.key))


if __name__ == "__main__":
    main()
