"""The firmware's layout (docs/firmware.md, "Modules"), checked from its source: no module imports
a module that imports it back; every name a service gives for a command loaded on demand is a real
module and function, named after its feature; a real board freezes what it runs and nothing of the
emulated board.

Only the source is read (`ast`), except where said: no MicroPython needed, so these run first."""

from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tools.board import build

FIRMWARE = build.FIRMWARE
MANIFEST = FIRMWARE / "manifest.py"
SERVICES = FIRMWARE / "csc" / "services"


def _resolve(m: build.Module, node: ast.ImportFrom, mods: dict[str, build.Module]) -> set[str]:
    src = node.module or ""
    if node.level:  # relative: from the module's package, one level up per dot after the first
        base = m.name.split(".")[: None if m.is_pkg else -1]
        base = base[: len(base) - (node.level - 1)]
        src = ".".join([*base, node.module] if node.module else base)
    out = set()
    for a in node.names:
        if f"{src}.{a.name}" in mods:  # a module of the package (`from . import link`)
            out.add(f"{src}.{a.name}")
        elif src in mods:  # a name of the module (`from .msgpack import Map`, `from . import Service`)
            out.add(src)
    return out


def imports(m: build.Module, mods: dict[str, build.Module]) -> set[str]:
    """The firmware modules `m` imports: every import statement, at module level or in a
    function (an import deferred to save RAM runs all the same)."""
    out: set[str] = set()
    for node in ast.walk(m.tree):
        if isinstance(node, ast.ImportFrom):
            out |= _resolve(m, node, mods)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
    out.discard(m.name)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (its modules in import order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return [*path[path.index(t) :], t]
            if t not in state and (c := visit(t)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


@pytest.fixture(scope="module")
def mods() -> dict[str, build.Module]:
    return build.load()  # firmware/csc, firmware/boards and main.py, as the build sees them


def test_no_firmware_module_imports_a_module_that_imports_it_back(mods: dict[str, build.Module]) -> None:
    graph = {name: imports(m, mods) for name, m in mods.items()}
    assert "csc.outbox" in graph["csc.app"]  # the graph sees the imports (Outbox) …
    assert "csc.services.security" in graph["csc.app"]  # … and the ones in functions (App.security)
    assert "csc.services" in graph["csc.services.transactions"]  # (Service)
    assert _cycle(graph) is None, " → ".join(_cycle(graph) or ())


def test_the_cycle_finder_finds_a_loop() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# ---------------------------------------------------------------- commands loaded on demand


def _commands() -> list[tuple[str, str, list[Any]]]:
    """(feature module, class, its COMMANDS entries) of every service of csc/services, read from
    the source: the entries alternate an action (a name of csc.schema) and a method name or
    ".function" (a function of the feature's cold half)."""
    out = []
    for path in sorted(SERVICES.glob("[!_]*.py")):  # not __init__.py: the base class, no commands
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if not isinstance(stmt, ast.Assign) or not isinstance(stmt.value, ast.Tuple):
                    continue
                if [ast.unparse(t) for t in stmt.targets] == ["COMMANDS"]:
                    items = [e.value if isinstance(e, ast.Constant) else ast.unparse(e) for e in stmt.value.elts]
                    out.append((path.stem, node.name, items))
    return out


def test_every_command_names_a_method_or_a_function_of_its_features_cold_half() -> None:
    """The names are strings, looked up only when the command comes (Service.command,
    services.on_demand): a rename that misses one would fail only when that rare command comes.
    A method name is a method of the service; ".fn" a function fn(service, body, seq) of the
    feature's cold half, the module named after the service's own (`<feature>_cmds`): both
    resolved here under CPython, as on the board. Each action has one service, and every cold
    half is some service's."""
    from csc import schema, services

    cold_used = set()
    actions: dict[int, str] = {}
    found = _commands()
    assert {s[1] for s in found} >= {"Config", "Auth", "SmartCharging", "Transactions", "Station", "Admin"}
    for feature, cls, items in found:
        assert len(items) % 2 == 0, (cls, items)
        service = getattr(importlib.import_module(f"csc.services.{feature}"), cls)
        assert issubclass(service, services.Service) and service.__module__ == f"csc.services.{feature}"
        for action, name in zip(items[::2], items[1::2], strict=True):
            code = getattr(schema, action)  # a name of the generated schema: A_…
            assert action.startswith("A_") and isinstance(code, int), (cls, action)
            assert code not in actions, f"{action} answered by {actions.get(code)} and {cls}"
            actions[code] = cls
            assert isinstance(name, str), (cls, action, name)
            if not name.startswith("."):
                assert callable(getattr(service, name, None)), f"{cls}.{name} ({action})"
                continue
            module = f"{feature}_cmds"  # what Service.command loads: the service's module + "_cmds"
            assert (SERVICES / f"{module}.py").is_file(), f"{cls}: {name} but no {module}.py"
            f: Callable[..., Any] | None = getattr(importlib.import_module(f"csc.services.{module}"), name[1:], None)
            assert callable(f) and f.__code__.co_argcount == 3, f"{module}{name}: no function (service, body, seq)"
            cold_used.add(module)
    cold = {p.stem for p in SERVICES.glob("*_cmds.py")}
    assert cold == cold_used, f"cold halves no service names: {sorted(cold - cold_used)}"


# ---------------------------------------------------------------- what a real board freezes


def frozen(fw: Path | None = None) -> set[str]:
    """The modules firmware/manifest.py freezes (dotted names), with EVEDGE_FW=fw: its
    `package()` and `module()` run as MicroPython's manifest tool runs them (files relative to
    the package, all its .py files when none are given); the port's own manifest is left out."""
    out: set[str] = set()

    def package(path: str, files: list[str] | None = None, base_path: str = ".", opt: int = 0) -> None:
        pkg = MANIFEST.parent / base_path / path
        names = files if files is not None else [str(p.relative_to(pkg)) for p in sorted(pkg.rglob("*.py"))]
        for f in names:
            assert (pkg / f).is_file(), f"manifest.py freezes {pkg / f}: no such file"
            out.add(".".join(Path(path, f).with_suffix("").parts).removesuffix(".__init__"))

    def module(path: str, base_path: str = ".", opt: int = 0) -> None:
        assert (MANIFEST.parent / base_path / path).is_file(), path
        out.add(Path(path).stem)

    saved = os.environ.get("EVEDGE_FW")
    os.environ.pop("EVEDGE_FW", None)
    if fw is not None:
        os.environ["EVEDGE_FW"] = str(fw)
    try:
        code = compile(MANIFEST.read_text(), str(MANIFEST), "exec")
        options = SimpleNamespace(defaults=lambda **kw: None, port_manifest=None)  # the port's manifest: left out
        exec(code, {"include": lambda path: None, "package": package, "module": module, "options": options})
    finally:
        os.environ.pop("EVEDGE_FW", None)
        if saved is not None:
            os.environ["EVEDGE_FW"] = saved
    return out


def test_a_real_board_freezes_what_it_runs_and_not_the_simulated_hal(mods: dict[str, build.Module]) -> None:
    f = frozen()
    assert {"main", "csc", "csc.app", "csc.services.station_cmds", "boards.esp32", "boards.drivers.pilot"} <= f
    assert "boards.sim" not in f and "boards.unix" not in f  # the emulated board's hardware and entry
    assert not [m for m in f if "SimHal" in mods[m].text]
    # everything a frozen module imports is frozen too (the drivers the board wires, …), and
    # every firmware module is either frozen or the emulated board's
    missing = {(m, i) for m in f for i in imports(mods[m], mods) if i not in f}
    assert not missing, sorted(missing)
    assert set(mods) - f == {"boards.sim", "boards.unix"}


def test_the_manifest_freezes_the_same_modules_from_the_build(tmp_path: Path) -> None:
    """`EVEDGE_FW=DIR` after `python -m tools.board.build DIR --py`: the files it names exist. The
    build has the emulated board's modules too (tools.board runs them), the manifest leaves them."""
    build.build(tmp_path, py=True)
    assert frozen(tmp_path) == frozen() | {"csc._names"}  # the build's module of names (build.names_module)
    assert (tmp_path / "boards" / "sim.py").is_file() and (tmp_path / "boards" / "unix.py").is_file()


def _members(path: Path, cls: str) -> dict[str, list[str]]:
    """A class's methods (their parameters) and class attributes (no parameters), from the source."""
    node = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls)
    out: dict[str, list[str]] = {}
    for n in node.body:
        if isinstance(n, ast.FunctionDef):
            out[n.name] = [a.arg for a in n.args.args]
        elif isinstance(n, ast.Assign):
            out.update((t.id, []) for t in n.targets if isinstance(t, ast.Name))
    return out


def test_the_simulated_hal_has_every_input_and_output_of_hal() -> None:
    # SimHal implements Hal's interface without subclassing it (the base's defaults would cost the
    # emulated board heap a real board spends on its own HAL): every name, with the same parameters
    hal = _members(FIRMWARE / "csc" / "hal.py", "Hal")
    sim = _members(FIRMWARE / "boards" / "sim.py", "SimHal")
    assert not [k for k in hal if k != "__init__" and sim.get(k) != hal[k]]
    init = ast.parse((FIRMWARE / "boards" / "sim.py").read_text())
    assigned = {t.attr for t in ast.walk(init) if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)}
    assert {"flags", "card"} <= assigned  # Hal.__init__'s
