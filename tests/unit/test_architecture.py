"""Imports point one way (STYLE.md habit 4), checked with `ast`.

The package's folders are its layers, from the command line down to the
primitives; within a folder, modules have a finer order.  A module may
import only modules of deeper layers (larger numbers).  A new module must be
given a layer here, which is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "evd"

# fmt: off
LAYERS = {
    # cli/ -- the command line: one module per group of subcommands
    "__main__": 0, "cli": 1,
    "cli.lifecycle": 2, "cli.configure": 2, "cli.switch": 2, "cli.call": 2, "cli.bench": 2, "cli.logs": 2,
    "cli.ctl": 2, "cli.manual": 2, "cli.completion": 2,
    "cli.targets": 3, "cli.failures": 3,
    # tools/ -- what the command line does outside the daemon: clients of a
    # running daemon and offline readers (the daemon never imports them)
    "tools.bench.runner": 4,
    "tools.lifecycle": 5, "tools.bench.modes": 5, "tools.explain": 5, "tools.dropin": 5,
    "tools.reload_answer": 5,
    "tools.client": 6, "tools.bench.framed": 6, "tools.bench.report": 6, "tools.ctl": 6,
    "tools.bench.loop": 7,
    "tools.bench.target": 8, "tools.bench.probes": 8, "tools.bench.measure": 8,
    "tools.bench.options": 9,
    "tools.logs.show": 5, "tools.logs.report": 5,
    "tools.logs.runner": 6, "tools.logs.follow": 6,
    "tools.logs.summary": 7, "tools.logs.journalctl": 7,
    "tools.logs.stats": 8, "tools.logs.reading": 8, "tools.logs.events": 8,
    "tools.logs.jsonform": 9, "tools.logs.entries": 9,
    # server/ -- the daemon process: start-up, workers, one daemon
    "server.launch": 10,
    "server.supervisor": 11,
    "server.daemon": 12,
    # server/control/ -- the daemon's own listeners, the drivers of the verb
    # table (single process, worker end, supervisor), the control
    # connection, the table, what each verb does in a supervisor and in one
    # daemon process, the supervisor-worker link
    "server.control.endpoints": 13, "server.control.fanout": 13, "server.control.drivers": 13,
    "server.control.connection": 14,
    "server.control.verbs": 15, "server.control.link": 15, "server.control.slices": 15,
    "server.control.supervisor_verbs": 16,
    "server.control.daemon_verbs": 17,
    # server/metrics/ -- GET /metrics: the HTTP side, the exposition, the counts
    "server.metrics.http": 14,
    "server.metrics.exposition": 15,
    "server.metrics.snapshot": 18,
    # server/ -- the reload (shared steps, pure plan), signals, sockets, preflight
    "server.reload_steps": 15, "server.signals": 15, "server.rotation": 15,
    "server.sockets": 16,
    "server.reload_plan": 19, "server.preflight": 19,
    # net/ -- sockets: listening and connected
    "net.listeners": 20, "net.tls_service": 20,
    "net.tls": 21, "net.proxied": 21,
    "net.transport": 22, "net.tls_records": 22,
    # handlers/ -- what a connection means, and a service's running state
    "handlers.framed": 30,
    "handlers.raw": 31, "handlers.program": 31, "handlers.service": 31,
    "handlers.base": 32,
    # commands/ -- running programs: the runner and one child's life
    "commands.runner": 35,
    "commands.process": 36,
    "commands.spawner": 37,  # starts what a child.Launch says
    "commands.child": 38,
    # proto/ -- sans-IO protocol and service logic, bookkeeping
    "proto.session": 40,
    "proto.rules": 41,
    "proto.framing": 41, "proto.classic": 41, "proto.admission": 41, "proto.control": 41,
    "proto.access": 42, "proto.allowlist": 42, "proto.proxy": 42,
    # system/ -- the operating system: systemd, privileges, the pidfile, key
    # files, a child's processes
    "system.systemd": 50, "system.privileges": 50, "system.pidfile": 50, "system.secrets": 50,
    "system.children": 50,
    "system.certificates": 49,  # reads the TLS key as system.secrets reads keys
    # log/ -- what callers use, the queue in front of the target, how a line
    # looks, journald's protocol
    "log.logger": 56, "log.sink": 57, "log.targets": 58, "log.render": 58, "log.journal": 59,
    # config/ -- found, validated, written back; the addresses it names
    "config.loader": 61, "config.tomlout": 61,
    "config.dropins": 62, "config.validate": 62,
    "config.schema": 63,
    "config.model": 64,
    "config.addresses": 65,
    # loop/ -- the reactor (imports nothing of evd) and the interfaces between
    # the layers above it (they name configuration types, so they sit above
    # config/)
    "loop.seams": 60,
    "config.reference": 60,  # the manual's view of the configuration: above the loader it reads
    "loop.reactor": 67,
    "__init__": 70,
}
# fmt: on


def module_name(path: Path) -> str:
    """ "cli", "server.daemon", "__init__" (a package is named by its folder)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    """The layer of a module, or of the deepest listed package holding it."""
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def evd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name[4:] for a in node.names if a.name.startswith("evd."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "evd":
                found.update(
                    a.name if layer_of(a.name) is not None and a.name != "__version__" else "__init__"
                    for a in node.names
                )
            elif node.module.startswith("evd."):
                base = node.module[4:]
                for alias in node.names:  # `from evd.net import transport` names a module
                    found.add(
                        f"{base}.{alias.name}"
                        if layer_of(f"{base}.{alias.name}") is not None and f"{base}.{alias.name}" in MODULES
                        else base
                    )
    return found


PATHS = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# A layer's folder (its __init__.py) only describes the layer: it imports
# nothing, so it needs no layer of its own.  `cli` is a module that happens
# to be a package.
FOLDERS = {m for m, p in PATHS.items() if p.name == "__init__.py" and m not in ("cli", "__init__")}
MODULES = sorted(set(PATHS) - FOLDERS)


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_layer_folders_import_nothing(folder):
    assert not evd_imports(PATHS[folder]), f"evd/{folder}/__init__.py should only describe its layer"


def test_every_module_has_a_layer():
    missing = {m for m in MODULES if layer_of(m) is None}
    assert not missing, f"give these a layer: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    layer = layer_of(module)
    if layer is None:
        pytest.fail(f"evd/{module} has no layer in LAYERS")
    upward = {m for m in evd_imports(PATHS[module]) if (layer_of(m) or -1) <= layer and m != module}
    assert not upward, f"evd/{module} (layer {layer}) imports {upward} from its own layer or above"


def test_the_checker_sees_imports():
    """The checker itself can fail: the daemon imports listeners, the framed
    handler the codec, and a deeper module importing a higher one is seen."""
    assert "net.listeners" in evd_imports(PATHS["server.daemon"])
    assert "proto.framing" in evd_imports(PATHS["handlers.framed"])
    assert layer_of("log.logger") > layer_of("server.daemon")
