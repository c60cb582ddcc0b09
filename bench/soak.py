"""The soak: evd under everything at once for --minutes (not part of the suite).

    .venv/bin/python bench/soak.py --minutes 60 --workers 2
    .venv/bin/python bench/soak.py --minutes 60 --workers 1

One `evd run` (log to a file, control socket, metrics, TLS) and, all the
time: --idle idle connections from four loopback sources; short `evd bench`
rounds of tcp, udp, framed and TLS traffic (a few connections each, a round
every 15 s: a moderate rate on a shared machine); a framed command
every 5 s; a scrape of /metrics every second, `promtool check metrics` on
every 60th; `evd ctl info|services|conns|sources` every 10 s; a reload every
10 s, alternating between adding and removing a listener (with workers:
a new generation every time); a logrotate (rename, SIGUSR1) every 5 minutes
with `evd logs show -f` reading along; a new TLS certificate every 15
minutes.

Pass: no `error` event in the log, no failed request, no failed control
call or reload, RSS and descriptors flat after warm-up (the curve is
printed), every line the daemon wrote seen exactly once by `show -f`, every
counter of /metrics monotonic.  Exit 0 on pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
workers = {workers}
shutdown_timeout = 5.0

[log]
file = "{tmp}/evd.log"

[control]
unix = "{tmp}/ctl.sock"

[metrics]
tcp = ["127.0.0.1:0"]

[limits]
max_connections = 20000
per_source = 5000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
tls = ["127.0.0.1:0"]
idle_timeout = 0.0  # the idle connections are held the whole run
tls_cert = "{tmp}/cert.pem"
tls_key = "{tmp}/key.pem"

[services.daytime]
tcp = ["127.0.0.1:0"{extra}]
udp = []

[services.time]
enabled = false

[services.timefmt]
enabled = false

[services.framed]
tcp = ["127.0.0.1:0"]

[commands.greet]
argv = ["echo", "hello"]
args = true
"""


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="evd-soak-"))
        self.failures: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.samples: list[tuple[float, int, int, int]] = []  # (t, processes, rss KiB, fds)
        self.stop = threading.Event()
        self.extra = False
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(self.tmp / "ca.pem"))
        self.write_cert()
        self.write_config()

    # -- set-up ------------------------------------------------------------------

    def write_cert(self) -> None:
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(self.tmp / "key.pem"))
        os.chmod(self.tmp / "key.pem", 0o600)
        leaf.cert_chain_pems[0].write_to_path(str(self.tmp / "cert.pem"))

    def write_config(self) -> None:
        extra = ', "127.0.0.2:0"' if self.extra else ""
        text = CONFIG.format(tmp=self.tmp, workers=self.args.workers, extra=extra)
        # Atomically: `evd ctl` reads the file for the socket meanwhile.
        (self.tmp / "evd.toml.new").write_text(text)
        os.replace(self.tmp / "evd.toml.new", self.tmp / "evd.toml")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "evd", "run", "-c", str(self.tmp / "evd.toml")],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "stderr", "wb"),
        )
        deadline = time.monotonic() + 30
        while "daemon.ready" not in self.read_log():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"evd did not start; see {self.tmp}")
            time.sleep(0.1)
        self.addresses = {}
        for line in self.read_log().splitlines():
            event = json.loads(line)
            if event["event"] == "listener.open":
                self.addresses.setdefault((event["service"], event["proto"]), event["address"])
        self.metrics = self.find_metrics()

    def read_log(self) -> str:
        try:
            return (self.tmp / "evd.log").read_text()
        except FileNotFoundError:
            return ""

    def find_metrics(self) -> str:
        for line in self.read_log().splitlines():
            event = json.loads(line)
            if event["event"] == "listener.open" and event.get("service") == "metrics":
                return str(event["address"])
        raise SystemExit("no metrics address in the log")

    # -- the loads ---------------------------------------------------------------

    def every(self, period: float, what, name: str, first: float = 0.0) -> threading.Thread:
        """`what` every `period` seconds, the first time after `first`."""

        def run() -> None:
            next_at = time.monotonic() + first
            self.stop.wait(first)
            while not self.stop.is_set():
                try:
                    what()
                except Exception as exc:  # a failure of the soak's own making counts too
                    self.fail(name, f"{type(exc).__name__}: {exc}")
                next_at += period
                self.stop.wait(max(0.0, next_at - time.monotonic()))

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def fail(self, what: str, detail: str) -> None:
        self.failures[what] += 1
        if self.failures[what] <= 3:
            print(f"FAIL {what}: {detail}", flush=True)

    def run_tool(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", "evd", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def bench_round(self) -> None:
        mode = ["tcp", "udp", "framed", "tls"][self.counts["bench"] % 4]
        self.counts["bench"] += 1
        service_proto = {"tcp": ("echo", "tcp"), "udp": ("echo", "udp"), "framed": ("framed", "tcp")}
        if mode == "tls":
            argv = [
                "tcp",
                "--tls",
                "--cafile",
                str(self.tmp / "ca.pem"),
                "--address",
                self.addresses[("echo", "tls")],
            ]
        else:
            argv = [mode, "--address", self.addresses[service_proto[mode]]]
        out = self.run_tool("bench", *argv, "-n", "2", "-d", "2", "-w", "0", "--json")
        if out.returncode != 0:
            self.fail(f"bench {mode}", out.stderr.strip()[-300:])
            return
        result = json.loads(out.stdout.strip().splitlines()[-1])
        self.counts[f"requests {mode}"] += result["requests"]
        if result["errors"] or result["lost"]:
            self.fail(f"bench {mode}", f"errors={result['errors']} lost={result['lost']}")

    def command(self) -> None:
        out = self.run_tool("call", "--address", self.addresses[("framed", "tcp")], "command", "greet", "x")
        self.counts["commands"] += 1
        if out.returncode != 0 or out.stdout.strip() != "hello x":
            self.fail("command", f"rc={out.returncode} {out.stdout!r} {out.stderr.strip()[-200:]}")

    def ctl(self) -> None:
        verb = ["info", "services", "conns", "sources"][self.counts["ctl"] % 4]
        self.counts["ctl"] += 1
        out = self.run_tool("ctl", "-c", str(self.tmp / "evd.toml"), "--json", verb)
        if out.returncode != 0:
            self.fail(f"ctl {verb}", out.stderr.strip()[-300:])

    def reload(self) -> None:
        self.extra = not self.extra
        self.write_config()
        out = self.run_tool("ctl", "-c", str(self.tmp / "evd.toml"), "--json", "reload")
        self.counts["reloads"] += 1
        if out.returncode != 0:
            self.fail("reload", (out.stdout + out.stderr).strip()[-300:])

    def rotate_log(self) -> None:
        self.counts["rotations"] += 1
        os.rename(self.tmp / "evd.log", self.tmp / f"evd.log.{self.counts['rotations']}")
        self.proc.send_signal(signal.SIGUSR1)

    def rotate_cert(self) -> None:
        self.write_cert()
        self.counts["certificates"] += 1
        self.reload_only()

    def reload_only(self) -> None:
        out = self.run_tool("ctl", "-c", str(self.tmp / "evd.toml"), "--json", "reload")
        if out.returncode != 0:
            self.fail("reload", (out.stdout + out.stderr).strip()[-300:])

    # -- watching ------------------------------------------------------------------

    def scrape(self) -> None:
        self.counts["scrapes"] += 1
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        if self.counts["scrapes"] % 60 == 1 and shutil.which("promtool"):
            check = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
            )
            self.counts["promtool"] += 1
            if check.returncode != 0 and "error" in (check.stdout + check.stderr).lower():
                self.fail("promtool", (check.stdout + check.stderr)[-300:])
        current = {}
        for line in text.splitlines():
            match = re.match(r"^(\w+_total(?:\{[^}]*\})?) (\S+)$", line)
            if match:
                current[match.group(1)] = float(match.group(2))
        for key, value in current.items():
            before = self.totals.get(key)
            if before is not None and value < before:
                self.fail("monotonic", f"{key}: {before} -> {value}")
        self.totals = current

    def sample(self) -> None:
        pids = [self.proc.pid, *children(self.proc.pid)]
        rss = fds = 0
        for pid in pids:
            try:
                rss += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, AttributeError):
                pass
        self.samples.append((time.monotonic() - self.began, len(pids), rss, fds))

    def hold_idle(self) -> list[socket.socket]:
        held = []
        address = self.addresses[("echo", "tcp")]
        host, _, port = address.rpartition(":")
        for i in range(self.args.idle):
            sock = socket.create_connection((host, int(port)), timeout=30, source_address=(SOURCES[i % 4], 0))
            held.append(sock)
        return held

    def check_idle(self, held: list[socket.socket]) -> None:
        for sock in held:  # every one still open: nothing to read, no EOF
            sock.setblocking(False)
            try:
                closed = sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            finally:
                sock.settimeout(30)
            if closed:
                self.fail("idle", "an idle connection was closed")
                return
        for sock in held[:: max(1, len(held) // 20)]:  # a sample of them still answer
            try:
                sock.sendall(b"i")
                if sock.recv(1) != b"i":
                    self.fail("idle", "closed")
            except OSError as exc:
                self.fail("idle", str(exc))

    # -- the whole run ---------------------------------------------------------------

    def run(self) -> int:
        self.start()
        self.began = time.monotonic()
        self.totals: dict[str, float] = {}
        follower = subprocess.Popen(
            [PY, "-m", "evd", "logs", "show", "-f", "--json", "--since", "1d", str(self.tmp / "evd.log")],
            cwd=ROOT,
            stdout=open(self.tmp / "shown", "wb"),
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        # show -f must have the file open before anything can rotate it:
        # wait for the first line it shows (daemon.start).
        deadline = time.monotonic() + 60
        while not (self.tmp / "shown").stat().st_size:
            if time.monotonic() > deadline or follower.poll() is not None:
                raise SystemExit("evd logs show -f did not start following")
            time.sleep(0.1)
        held = self.hold_idle()
        for signum in (signal.SIGINT, signal.SIGTERM):  # cut it short: still a report
            signal.signal(signum, lambda *_: self.stop.set())
        minutes = self.args.minutes
        threads = [
            self.every(15.0, self.bench_round, "bench"),
            self.every(5.0, self.command, "command"),
            self.every(1.0, self.scrape, "scrape"),
            self.every(10.0, self.ctl, "ctl"),
            self.every(10.0, self.reload, "reload"),
            self.every(300.0, self.rotate_log, "logrotate", first=300.0) if minutes >= 5 else None,
            self.every(900.0, self.rotate_cert, "certificate", first=900.0) if minutes >= 15 else None,
            self.every(10.0, self.sample, "sample"),
            self.every(30.0, lambda: self.check_idle(held), "idle"),
        ]
        try:
            self.stop.wait(self.args.minutes * 60)
        finally:
            self.stop.set()
            for thread in threads:
                if thread is not None:
                    thread.join(120)
            for sock in held:
                sock.close()
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(60)
            time.sleep(3)  # show -f's backstop: it reads the last lines
            # SIGTERM: a background job started without job control ignores
            # SIGINT, and the follower would never see it (the first hour lost
            # its report so).
            follower.terminate()
            try:
                follower.wait(30)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait(30)
        return self.report(code)

    def report(self, code: int) -> int:
        written = []
        for path in sorted(self.tmp.glob("evd.log.*"), key=lambda p: int(p.suffix[1:])) + [
            self.tmp / "evd.log"
        ]:
            written += path.read_text().splitlines()
        shown = Counter(canonical(line) for line in (self.tmp / "shown").read_text().splitlines())
        wrote = Counter(canonical(line) for line in written)
        unseen = sum((wrote - shown).values())
        twice = sum((shown - wrote).values())  # shown more often than written (a line may repeat)
        errors = [line for line in written if '"level": "error"' in line]
        if code != 0:
            self.fail("exit", f"evd exited {code}")
        if unseen or twice:
            self.fail("show -f", f"{unseen} lines never shown, {twice} shown more than once")
        for line in errors[:3]:
            self.fail("error event", line[:300])
        self.failures["error event"] = len(errors)
        print(
            f"\nsoak: workers={self.args.workers} minutes={self.args.minutes} "
            f"idle={self.args.idle} dir={self.tmp}"
        )
        print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        print(f"log lines written {len(written)}, shown by show -f {sum(shown.values())}, unseen {unseen}")
        print("minute  processes  rss_kib  fds")
        for minute in range(int(self.args.minutes) + 1):
            row = [s for s in self.samples if minute * 60 <= s[0] < (minute + 1) * 60]
            if row:
                _, n, rss, fds = row[-1]
                print(f"{minute:6d}  {n:9d}  {rss:7d}  {fds:4d}")
        flat = self.flat()
        failures = {k: v for k, v in self.failures.items() if v}
        print(f"failures: {failures or 'none'}; rss/fds flat after warm-up: {flat}")
        return 0 if not failures and flat else 1

    def flat(self) -> bool:
        """After the first fifth: the last quarter's mean within 10% (RSS)
        and 5% + 8 (descriptors) of the second quarter's."""
        rest = self.samples[len(self.samples) // 5 :]
        if len(rest) < 8:
            return True
        quarter = len(rest) // 4
        early, late = rest[quarter : 2 * quarter], rest[-quarter:]

        def mean(rows, i):
            return sum(r[i] for r in rows) / len(rows)

        return mean(late, 2) <= mean(early, 2) * 1.10 and mean(late, 3) <= mean(early, 3) * 1.05 + 8


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def canonical(line: str) -> str:
    try:
        return json.dumps(json.loads(line), sort_keys=True)
    except ValueError:
        return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=int, default=1000)
    return Soak(parser.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
