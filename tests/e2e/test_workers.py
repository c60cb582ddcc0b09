"""workers = N: a supervisor and N worker processes on shared ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from support.daemon import BASE_CONFIG, WAIT, connect, process_gone, recv_all, recv_exactly

from evd.proto.framing import Decoder, encode
from evd.server.sockets import worker_for
from evd.server.supervisor import RESTART_DELAY, Worker, missing
from evd.tools.client import Client

WORKERS = BASE_CONFIG.replace("shutdown_timeout = 5.0", "shutdown_timeout = 5.0\nworkers = 2")

# These tests set `workers` themselves (tests/conftest.py).
pytestmark = pytest.mark.no_workers_variant("sets workers itself")


def stats(address: str, source: str = "127.0.0.1") -> dict:
    """The framed `stats` answer to a client at `source`: the kernel steers
    each client IP to one worker (server/sockets.py `steer`)."""
    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(WAIT)
        sock.bind((source, 0))
        sock.connect((host, int(port)))
        sock.sendall(encode({"svc": "stats"}))
        decoder = Decoder(1 << 20, 1 << 24)
        frames: list = []
        while len(frames) < 2:  # the hello, then the answer
            data = sock.recv(65536)
            assert data, "closed before the stats answer"
            decoder.feed(data)
            frames.extend(decoder.frames())
        return json.loads(frames[1].body)


def worker_pids(evd) -> dict[int, int]:
    """index -> pid of the first worker.start of each index."""
    return {i: evd.wait_for("worker.start", worker=i)["worker_pid"] for i in (0, 1)}


def echo(address, payload: bytes = b"hi") -> bytes:
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_workers_share_every_port_and_stats_say_who_answered(start_evd, tmp_path):
    evd = start_evd(WORKERS)
    ready = evd.wait_for("daemon.ready")
    assert ready["pid"] == evd.proc.pid and ready["workers"] == 2
    pids = worker_pids(evd)
    framed = "{}:{}".format(*evd.addr("framed"))
    seen = {}
    for source in (f"127.0.0.{i}" for i in range(1, 10)):  # worker_for spreads these over both
        worker = stats(framed, source)["worker"]
        assert worker["index"] == worker_for(source, 2)
        seen[worker["index"]] = worker["pid"]
    assert seen == pids
    # UDP and UNIX are served too; every worker listens at the same address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(b"datagram", evd.addr("echo", "udp"))
        assert sock.recv(100) == b"datagram"
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        assert client.call("echo", b"unix").body == b"unix"
    for pid in pids.values():
        evd.wait_for(
            "listener.open", pid=pid, service="echo", proto="udp", address=evd.addresses[("echo", "udp")]
        )
    assert evd.stop() == 0
    assert all(process_gone(pid) for pid in pids.values())
    assert not (tmp_path / "framed.sock").exists() and not (tmp_path / "evd.pid").exists()


def test_a_killed_worker_is_restarted(start_evd):
    evd = start_evd(WORKERS)
    victim = worker_pids(evd)[0]
    mark = len(evd.drain_events())
    os.kill(victim, signal.SIGKILL)
    exited = evd.wait_for_since(mark, "worker.exit", worker_pid=victim)
    assert exited["worker"] == 0 and exited["signal"] == signal.SIGKILL and exited["level"] == "warning"
    successor = evd.wait_for_since(mark, "worker.start", worker=0)["worker_pid"]
    assert successor != victim and not process_gone(successor, 0)
    framed = "{}:{}".format(*evd.addr("framed"))
    # Slot 0's socket was kept: the new worker serves its clients.
    assert worker_for("127.0.0.1", 2) == 0
    assert stats(framed, "127.0.0.1")["worker"] == {"index": 0, "pid": successor}
    assert echo(evd.addr("echo")) == b"hi"
    assert evd.stop() == 0


def test_reload_passes_on_or_replaces_workers_without_dropping_anyone(start_evd, tmp_path):
    evd = start_evd(WORKERS)
    old = worker_pids(evd)
    steady = connect(evd.addr("echo"))
    steady.sendall(b"one")
    assert recv_exactly(steady, 3) == b"one"

    # The same listeners: SIGHUP is passed on, each worker applies it in place.
    tighter = WORKERS.replace("per_source = 5000", "per_source = 4000")
    evd.config_path.write_text(tighter.format(tmp=tmp_path))
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    assert evd.wait_for_since(mark, "config.reload", pid=evd.proc.pid)["ok"] is True
    for pid in old.values():
        assert "echo" in evd.wait_for_since(mark, "worker.reload", pid=pid)["changed"]
    steady.sendall(b"two")
    assert recv_exactly(steady, 3) == b"two"

    # Listeners removed: new workers take over, the old ones retire.
    fewer = tighter.replace("[services.discard]\nenabled = true", "[services.discard]\nenabled = false")
    evd.config_path.write_text(fewer.format(tmp=tmp_path))
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload", pid=evd.proc.pid)
    assert reload["ok"] is True and sorted(reload["removed"]) == [
        "discard tcp 127.0.0.1:0",
        "discard udp 127.0.0.1:0",
    ]
    new = {i: evd.wait_for_since(mark, "worker.start", worker=i, generation=1)["worker_pid"] for i in (0, 1)}
    assert not set(new.values()) & set(old.values())
    steady.sendall(b"three")  # on a retiring worker, still served
    assert recv_exactly(steady, 5) == b"three"
    steady.close()
    for pid in old.values():  # each leaves once its connections are done
        assert evd.wait_for_since(mark, "worker.stop", pid=pid)["reason"] == "retired"
        evd.wait_for_since(mark, "worker.exit", worker_pid=pid, exit=0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(evd.addr("discard"), timeout=WAIT)
    assert echo(evd.addr("echo")) == b"hi"
    assert evd.stop() == 0


def test_under_systemd_the_main_process_supervises(start_evd, notify_socket):
    notify, address = notify_socket
    evd = start_evd(WORKERS, env={"NOTIFY_SOCKET": address, "INVOCATION_ID": "0123456789abcdef"})
    fields, sender = notify.expect("READY=1")
    assert sender == evd.proc.pid and "2 workers" in fields["STATUS"]
    for pid in worker_pids(evd).values():
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(evd.proc.pid)
    evd.send(signal.SIGTERM)
    notify.expect("STOPPING=1")
    assert evd.proc.wait(WAIT) == 0


# -- reconciling: one live worker of the current generation per slot ------------------


def workers(*spec: tuple[int, int]) -> list[Worker]:
    """Workers from (slot, generation) pairs."""
    return [Worker(index, 1000 + n, generation, 0.0) for n, (index, generation) in enumerate(spec)]


@pytest.mark.parametrize(
    ("live", "generation", "held", "now", "start"),
    [
        ((), 0, {}, 10.0, [0, 1]),  # at start
        (((0, 0), (1, 0)), 0, {}, 10.0, []),  # all there
        (((1, 0),), 0, {}, 10.0, [0]),  # slot 0 died
        (((1, 0),), 0, {0: 11.0}, 10.0, []),  # ... young: held back
        (((1, 0),), 0, {0: 11.0}, 11.0, [0]),  # ... until the hold is over
        (((0, 0), (1, 0)), 1, {}, 10.0, [0, 1]),  # a reload: the old generation does not count
        (((0, 0), (1, 0), (0, 1)), 1, {}, 10.0, [1]),
        (((0, 1), (1, 1)), 1, {0: 11.0}, 10.0, []),  # a hold of a filled slot starts nothing
    ],
)
def test_missing_slots(live, generation, held, now, start):
    assert missing(workers(*live), generation, 2, held, now) == start


def test_a_young_death_then_a_reload_never_leaves_two_workers_on_a_slot(start_evd, tmp_path):
    """Issue 9 #6: the delayed restart of a worker that died young did not
    know its generation; a reload that changed the listeners within the
    delay got a new generation of 2 workers, and then the delayed restart
    added a third, for good."""
    evd = start_evd(WORKERS)
    victim = worker_pids(evd)[0]
    for _ in range(5):  # a machine slow enough makes the victim live past the delay
        mark = len(evd.drain_events())
        os.kill(victim, signal.SIGKILL)
        exited = evd.wait_for_since(mark, "worker.exit", worker_pid=victim)
        if exited["restart_in"]:
            break
        victim = evd.wait_for_since(mark, "worker.start", worker=0)["worker_pid"]
    else:
        pytest.skip("no worker could be killed young enough on this machine")
    held_until = time.monotonic() + RESTART_DELAY
    fewer = WORKERS.replace("[services.discard]\nenabled = true", "[services.discard]\nenabled = false")
    evd.config_path.write_text(fewer.format(tmp=tmp_path))
    evd.send(signal.SIGHUP)
    assert evd.wait_for_since(mark, "config.reload", pid=evd.proc.pid)["ok"] is True
    # Watch past the end of the hold: what the old code started then was
    # the extra worker.
    while True:
        by_slot: dict[int, list[int]] = {}
        for event in evd.drain_events()[mark:]:
            if event["event"] == "worker.start" and event["generation"] == 1:
                by_slot.setdefault(event["worker"], []).append(event["worker_pid"])
        assert all(len(pids) == 1 for pids in by_slot.values()), by_slot
        if time.monotonic() > held_until + 1.0:
            break
        time.sleep(0.05)
    assert sorted(by_slot) == [0, 1]
    assert evd.stop() == 0
