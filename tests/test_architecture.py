"""Imports point one way (STYLE.md habit 4), checked with `ast`.

Each module has a layer; a module may import only modules of deeper layers
(larger numbers). A new module must be given a layer here, which is the
moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evd"

LAYERS = {
    # the command line and the tools it drives
    "__main__": 0, "cli": 1,
    # starting a daemon (run/start); talking to a running one (stop/status/reload)
    "launch": 2, "control": 2,
    "supervisor": 3, "bench": 3, "client": 3,
    # the daemon: services and listeners on one reactor
    "daemon": 4,
    # sockets: listening and connected
    "listeners": 5, "transport": 6,
    # connection handlers
    "framed": 7, "handlers": 8, "commands": 8, "service": 8,
    # sans-IO protocol and service logic, bookkeeping
    "framing": 9, "services": 9, "admission": 9,
    # operating-system primitives that use config and log
    "systemd": 10, "privileges": 10,
    # primitives
    "reactor": 11, "config": 11, "log": 11, "pidfile": 11,
    "__init__": 12,
}


def evd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("evd."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "evd":
                found.update(alias.name if alias.name in LAYERS else "__init__" for alias in node.names)
            elif node.module.startswith("evd."):
                found.add(node.module.split(".")[1])
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(LAYERS), f"give these a layer: {set(MODULES) - set(LAYERS)}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    layer = LAYERS.get(module)
    if layer is None:
        pytest.fail(f"evd/{module}.py has no layer in LAYERS")
    upward = {m for m in evd_imports(PACKAGE / f"{module}.py") if LAYERS.get(m, -1) <= layer}
    assert not upward, f"evd/{module}.py (layer {layer}) imports {upward} from its own layer or above"


def test_the_checker_sees_imports():
    """The checker itself can fail: daemon imports listeners."""
    assert "listeners" in evd_imports(PACKAGE / "daemon.py")
    assert "framing" in evd_imports(PACKAGE / "framed.py")
