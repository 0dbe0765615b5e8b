"""The house's walls, checked from the source's imports (docs/architecture.md): the upstream
peers see only the gateway's protocol package, and the gateway ships without them."""

from __future__ import annotations

import ast
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
