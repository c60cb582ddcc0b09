"""Twisted echo, TCP and UDP, on Twisted's epoll reactor.

Run with --port P (0: the kernel picks); prints "ready TCPPORT UDPPORT" once
listening on 127.0.0.1; Twisted stops on SIGTERM/SIGINT itself.
"""

from __future__ import annotations

import argparse
import resource

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402  (after the reactor choice)


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class EchoFactory(protocol.Factory):
    protocol = Echo


class EchoDatagram(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tcp = reactor.listenTCP(args.port, EchoFactory(), backlog=1024, interface="127.0.0.1")
    udp = reactor.listenUDP(args.port, EchoDatagram(), interface="127.0.0.1")
    print("ready", tcp.getHost().port, udp.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
