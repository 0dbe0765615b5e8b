"""The house's walls, checked from the source's imports (docs/architecture.md): the upstream
peers see only the gateway's protocol package, and the gateway ships without them."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "tools" / "peers"
GATEWAY = ROOT / "gateway"

SHARED = ("gateway.protocol", "gateway.schema", "gateway._core")
"""What the CSMS and the roaming endpoints may import of the gateway (gateway/protocol/__init__.py)."""


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in `path`, in functions and TYPE_CHECKING blocks too."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for a in node.names:  # `from gateway import gid` imports gateway.gid
                yield node.lineno, f"{node.module}.{a.name}"


def within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_the_peers_import_only_the_gateways_protocol_package_its_schema_and_its_core() -> None:
    bad = []
    for path in sorted(PEERS.rglob("*.py")):
        for line, mod in imports(path):
            if (mod == "gateway" or mod.startswith("gateway.")) and not within(mod, SHARED) and mod != "gateway":
                # `from gateway import _core` yields both "gateway" and "gateway._core"
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    assert not bad, "the peers reach into the gateway's internals:\n" + "\n".join(bad)


def test_the_gateway_never_imports_the_peers_or_the_tools() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {mod}"
        for path in sorted(GATEWAY.rglob("*.py"))
        for line, mod in imports(path)
        if mod == "tools" or mod.startswith("tools.")
    ]
    assert not bad, "\n".join(bad)


def test_the_protocol_package_needs_nothing_else_of_the_gateway() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {mod}"
        for path in sorted((GATEWAY / "protocol").rglob("*.py"))
        for line, mod in imports(path)
        if mod.startswith("gateway.") and not within(mod, SHARED)
    ]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_peers_by_their_old_path() -> None:
    """The peers are `evedge_csms` and `evedge_roaming` (tools/peers is no package): imported
    as `tools.peers.…` (a namespace package) they would load a second time, apart."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {mod}"
        for folder in (GATEWAY, ROOT / "tools", ROOT / "tests")
        for path in sorted(folder.rglob("*.py"))
        for line, mod in imports(path)
        if mod == "tools.peers" or mod.startswith("tools.peers.")
    ]
    assert not bad, "\n".join(bad)
    assert not (PEERS / "__init__.py").exists()


def test_the_peers_ship_in_their_own_distribution_and_the_gateway_without_them() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    peers = tomllib.loads((PEERS / "pyproject.toml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert root["tool"]["maturin"]["python-packages"] == ["gateway"]
    packages = sorted(p.parent.name for p in PEERS.glob("*/__init__.py"))
    assert packages == ["evedge_csms", "evedge_roaming"]
    assert sorted(peers["tool"]["setuptools"]["packages"]) == packages
    # released together: the same version, and exactly that gateway (its protocol package and core)
    version = cargo["workspace"]["package"]["version"]
    assert peers["project"]["version"] == version
    assert f"evedge=={version}" in peers["project"]["dependencies"]
    scripts = peers["project"]["scripts"]
    assert {"evedge-csms", "evedge-csms-admin", "evedge-roaming"} <= scripts.keys()
    assert not scripts.keys() & root["project"]["scripts"].keys()


GENERATED = {GATEWAY / "schema.py"}
"""Written by `python -m tools.codegen`, exempt from the size bound."""
MAX_MODULE_LINES = 600


def gateway_modules() -> dict[str, Path]:
    """Dotted name → file of every module of the gateway (a package by its __init__.py)."""
    out = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_the_gateways_imports_form_no_cycle() -> None:
    """Each module of gateway/ imports only modules below it: a part that needs the site
    declares a Protocol of what it needs instead of importing gateway.service back
    (imports under TYPE_CHECKING and inside functions count: they are loops all the same)."""
    modules = gateway_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `from gateway.schema import Key` → gateway.schema
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        mod: sorted({t for _, m in imports(path) if (t := resolve(m)) is not None and t != mod})
        for mod, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for dep in graph[mod]:
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[mod] = 2
        return None

    for mod in graph:
        if mod not in state:
            cycle = visit(mod)
            assert cycle is None, "import cycle in the gateway: " + " → ".join(cycle)


def test_no_hand_written_gateway_module_exceeds_600_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in sorted(GATEWAY.rglob("*.py"))
        if path not in GENERATED and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"split these by what they hold (at most {MAX_MODULE_LINES} lines each):\n" + "\n".join(long)
