"""asyncio Protocol echo, TCP and UDP: the peer evd is measured against.

Run with --port P (0: the kernel picks); prints "ready TCPPORT UDPPORT" once
listening on 127.0.0.1, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class EchoDatagram(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.cancel)
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=1024)
    udp, _ = await loop.create_datagram_endpoint(EchoDatagram, local_addr=("127.0.0.1", port))
    print("ready", server.sockets[0].getsockname()[1], udp.get_extra_info("sockname")[1], flush=True)
    try:
        await stop
    except asyncio.CancelledError:
        pass
    udp.close()
    server.close()


def main(loop_factory=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    # 10,000 idle connections need 10,000 descriptors (evd raises its limit too).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
