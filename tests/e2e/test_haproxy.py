"""The shipped etc/haproxy.cfg in front of two real evd instances: connections
reach both, and stopping one with SIGTERM loses no client request."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time

from support.daemon import BASE_CONFIG, ROOT, WAIT, EvdProcess, need, recv_all


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_config(instances, echo_port: int, framed_port: int) -> str:
    """etc/haproxy.cfg with its example addresses replaced by the real ones."""
    text = (ROOT / "etc" / "haproxy.cfg").read_text()
    text = text.replace("bind 127.0.0.1:7007", f"bind 127.0.0.1:{echo_port}")
    text = text.replace("bind 127.0.0.1:7070", f"bind 127.0.0.1:{framed_port}")
    for n, evd in enumerate(instances, start=1):
        echo, framed = evd.addr("echo")[1], evd.addr("framed")[1]
        text = re.sub(
            rf"server evd{n} 127\.0\.0\.1:\d+7007 check port \d+",
            f"server evd{n} 127.0.0.1:{echo} check port {framed}",
            text,
        )
        text = re.sub(
            rf"server evd{n} 127\.0\.0\.1:\d+7070 check", f"server evd{n} 127.0.0.1:{framed} check", text
        )
    assert "17007" not in text and "27070" not in text, "etc/haproxy.cfg changed shape"
    return text


def echo_once(port: int, payload: bytes, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(payload[:4])
        if pause:
            time.sleep(pause)  # keeps a request in flight across the SIGTERM
        sock.sendall(payload[4:])
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_two_instances_behind_haproxy_survive_a_sigterm(tmp_path):
    haproxy = need("haproxy")
    instances = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        instances.append(EvdProcess(home, BASE_CONFIG).ready())
    echo_port, framed_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(instances, echo_port, framed_port))
    proxy = subprocess.Popen(
        [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Both instances get traffic (round robin once both are up).
        deadline = time.monotonic() + WAIT
        served = set()
        while served != {0, 1}:
            assert time.monotonic() < deadline, "haproxy did not reach both instances"
            try:
                assert echo_once(echo_port, b"warm") == b"warm"
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # haproxy still starting
            for i, evd in enumerate(instances):
                if any(e["event"] == "conn.open" and e["service"] == "echo" for e in evd.drain_events()):
                    served.add(i)

        results, stop = [], threading.Event()

        def client(k: int):
            n = 0
            while not stop.is_set():
                payload = b"client %d request %d" % (k, n)
                try:
                    results.append(echo_once(echo_port, payload, pause=0.02) == payload)
                except OSError as exc:
                    results.append(exc)
                n += 1

        workers = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for worker in workers:
            worker.start()
        try:
            while len(results) < 100:
                time.sleep(0.01)  # letting the client threads work
            instances[0].send(signal.SIGTERM)
            assert instances[0].proc.wait(WAIT) == 0
            before = len(results)
            while len(results) < before + 100:
                time.sleep(0.01)
        finally:
            stop.set()
            for worker in workers:
                worker.join(WAIT)
        failures = [r for r in results if r is not True]
        assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
        instances[1].drain_events()
        after_stop = [e for e in instances[1].events if e["event"] == "conn.close"]
        assert len(after_stop) > 100
    finally:
        proxy.terminate()
        proxy.wait(WAIT)
        for evd in instances:
            evd.stop()


def test_shipped_haproxy_cfg_is_valid():
    haproxy = need("haproxy")
    out = subprocess.run(
        [haproxy, "-c", "-f", str(ROOT / "etc" / "haproxy.cfg")], capture_output=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
