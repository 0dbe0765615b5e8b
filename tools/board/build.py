"""Build the firmware as a board would freeze it: `python -m tools.board.build OUT_DIR`.

MicroPython inlines a `const()` name only inside the module that defines it; a public
constant imported by another module (`from .schema import A_HEARTBEAT`) stays a module
global there: a qstr, a dict entry in both modules and a dict lookup at every use. The
generated schema alone has ~400 of them (~45 KiB of heap). Before compiling, this build
does across modules what `const()` does within one:

- every module-level `NAME = const(<int>)` of the firmware is collected;
- each use of an imported one (`from .schema import NAME`, `from . import link as L` …
  `L.NAME`) is replaced by its value, and the name is dropped from the import;
- `from micropython import const` is dropped where `const` only wraps such definitions (the
  compiler folds them without it; the import would cost a global);
- the public definitions are dropped (the private `_NAME` ones cost nothing already), so
  `csc/schema` keeps only its tables (FTYPE…, KEYS, ACT_*: bytes and tuples), and of those
  only the ones a firmware module imports (ACT_REQ… are for the host tools).

The rewrite is done on the text, so line numbers stay those of the source, and it is
checked against the same transformation done on the syntax tree (any difference fails the
build). Then every module is compiled by mpy-cross into OUT_DIR (`csc/…`, `boards/…` with the
emulated board's `boards/unix` and `boards/sim`, `main.mpy`); with `--py` the rewritten sources
are written instead, for a board's frozen manifest (`package("csc", base_path=OUT_DIR)`, which
takes from `boards/` only what that board runs). The source stays readable and runs as it
is (CPython, `Board(source=True)`); `built()` keeps one build per source state in a cache
directory for the emulated board (tools/board/runner.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools import executables

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
# what a board freezes (manifest.py: csc, boards/esp32.py and boards/drivers/) and the emulated board's own
# modules (boards/unix.py, its simulated hardware boards/sim.py); not the CPython stub micropython.py
PACKAGES = ("csc", "boards")
MODULES = ("main.py",)
KEEP = 8  # builds kept in the cache
TABLES = "csc.schema"  # generated data: its tables that no firmware module imports are left out


class BuildError(Exception):
    pass


@dataclass
class Module:
    name: str  # dotted: csc.services.auth
    path: Path
    rel: Path  # relative to the firmware root
    text: str
    tree: ast.Module
    is_pkg: bool
    consts: dict[str, int] = field(default_factory=dict)  # module-level NAME = const(int)


def _is_const_assign(node: ast.stmt) -> tuple[str, ast.expr] | None:
    if (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "const"
        and len(node.value.args) == 1
        and not node.value.keywords
    ):
        return node.targets[0].id, node.value.args[0]
    return None


def sources(root: Path = FIRMWARE) -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    return files + [root / m for m in MODULES if (root / m).exists()]


def load(root: Path = FIRMWARE, extra: tuple[Path, ...] = ()) -> dict[str, Module]:
    """Parse the firmware (and `extra` top-level scripts) and collect their integer constants."""
    mods: dict[str, Module] = {}
    for path in [*sources(root), *extra]:
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        parts = list(rel.with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        text = path.read_text()
        m = Module(".".join(parts), path, rel, text, ast.parse(text, str(path)), is_pkg)
        for node in m.tree.body:
            c = _is_const_assign(node)
            if c is None:
                continue
            code = compile(ast.Expression(c[1]), str(path), "eval")
            value = eval(code, {"__builtins__": {}}, dict(m.consts))
            if not isinstance(value, int) or isinstance(value, bool):
                raise BuildError(f"{path}:{node.lineno}: const() of a non-integer")
            m.consts[c[0]] = value
        mods[m.name] = m
    return mods


def _absolute(m: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = m.name.split(".")
    if not m.is_pkg:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_from(name: str, mods: dict[str, Module]) -> set[str]:
    """The names of module `name` that other firmware modules use (imported or as attributes)."""
    used: set[str] = set()
    for m in mods.values():
        aliases = set()
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                src = _absolute(m, node)
                for a in node.names:
                    if src == name:
                        used.add(a.name)
                    elif f"{src}.{a.name}" == name:
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname for a in node.names if a.name == name and a.asname)
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.add(node.attr)
    return used


class _Plan:
    """What to change in one module: names to inline, module aliases, import and
    definition statements to drop."""

    def __init__(self, m: Module, mods: dict[str, Module]) -> None:
        self.names: dict[str, int] = {k: v for k, v in m.consts.items()}  # own constants, used by name
        self.aliases: dict[str, str] = {}  # local name -> firmware module
        self.imports: dict[int, list[ast.alias]] = {}  # id(ImportFrom) -> aliases to keep
        self.drop_defs = {id(n) for n in m.tree.body if (c := _is_const_assign(n)) and not c[0].startswith("_")}
        if m.name == TABLES:
            used = _imported_from(m.name, mods)
            for n in m.tree.body:
                if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id not in used for t in n.targets):
                    self.drop_defs.add(id(n))
        # `const` itself: MicroPython's compiler folds `NAME = const(…)` at module level whether or not
        # the name is imported (the import is for CPython), so where that is its only use the import
        # goes, and with it a global (8 B of heap a module on a board)
        folded = {id(n.value.func) for n in m.tree.body if _is_const_assign(n)}  # type: ignore[attr-defined]
        const_only_folded = all(
            id(n) in folded for n in ast.walk(m.tree) if isinstance(n, ast.Name) and n.id == "const"
        )
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom) and node.module == "micropython" and node.level == 0:
                kept = [a for a in node.names if not (a.name == "const" and not a.asname and const_only_folded)]
                if len(kept) != len(node.names):
                    self.imports[id(node)] = kept
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(m, node)
                keep = []
                for a in node.names:
                    local = a.asname or a.name
                    target = mods.get(src)
                    if target is not None and a.name in target.consts:
                        self._bind(m, node, local, target.consts[a.name])
                        continue
                    if f"{src}.{a.name}" in mods:
                        self.aliases[local] = f"{src}.{a.name}"
                    keep.append(a)
                if len(keep) != len(node.names):
                    self.imports[id(node)] = keep
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in mods:
                        self.aliases[a.asname] = a.name
                    elif a.name in mods:
                        self.aliases[a.name] = a.name
        self.mods = mods
        self.m = m

    def _bind(self, m: Module, node: ast.stmt, local: str, value: int) -> None:
        if self.names.get(local, value) != value:
            raise BuildError(f"{m.path}:{node.lineno}: {local} imported with two values")
        self.names[local] = value

    def check_no_rebinding(self) -> None:
        """An inlined name must mean one value everywhere in the module."""
        own = {id(n.targets[0]) for n in self.m.tree.body if isinstance(n, ast.Assign) and _is_const_assign(n)}
        inlined_via = {  # module aliases through which a constant is inlined (`L.NAME`)
            n.value.id
            for n in ast.walk(self.m.tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and self.const_of(n) is not None
        }
        for node in ast.walk(self.m.tree):
            bound: str | None = None
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound = node.id
            elif isinstance(node, ast.arg):
                bound = node.arg
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler)):
                bound = node.name
            if bound is not None and (bound in self.names or bound in inlined_via) and id(node) not in own:
                raise BuildError(f"{self.m.path}:{getattr(node, 'lineno', 0)}: constant or module {bound} is rebound")
            if bound is not None and bound in self.names and bound in self.aliases:
                raise BuildError(f"{self.m.path}: {bound} is both a constant and a module")

    def const_of(self, node: ast.expr) -> int | None:
        """The value that replaces this expression, if it is an inlined constant."""
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            return self.names.get(node.id)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.value, ast.Name)
            and node.value.id in self.aliases
        ):
            return self.mods[self.aliases[node.value.id]].consts.get(node.attr)
        return None


def _literal(v: int) -> str:
    return repr(v) if v >= 0 else f"({v})"


class _Transform(ast.NodeTransformer):
    """The reference transformation on the tree, to check the text rewrite against."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def visit_Name(self, node: ast.Name) -> ast.expr:
        v = self.plan.const_of(node)
        return ast.Constant(v) if v is not None else node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        v = self.plan.const_of(node)
        return ast.Constant(v) if v is not None else self.generic_visit(node)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if id(node) in self.plan.imports:
            keep = self.plan.imports[id(node)]
            assert isinstance(node, ast.ImportFrom)
            return ast.ImportFrom(node.module, keep, node.level) if keep else ast.Pass()
        if id(node) in self.plan.drop_defs:
            return ast.Pass()
        return super().generic_visit(node)


def _norm(tree: ast.AST) -> str:
    """The tree without positions, negative literals folded (`(-1)` parses as USub(1))."""

    class Fold(ast.NodeTransformer):
        def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
            if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
                v = node.operand.value
                if isinstance(v, int) and not isinstance(v, bool):
                    return ast.Constant(-v)
            return self.generic_visit(node)  # type: ignore[return-value]

    return ast.dump(Fold().visit(tree))


def rewrite(m: Module, mods: dict[str, Module]) -> str:
    """The module's text with the constants inlined; same line numbers as the source."""
    plan = _Plan(m, mods)
    plan.check_no_rebinding()
    lines = m.text.splitlines(keepends=True)
    starts = [0]
    raw = m.text.encode()
    for ln in lines:
        starts.append(starts[-1] + len(ln.encode()))

    def off(line: int, col: int) -> int:  # ast columns are UTF-8 byte offsets
        return starts[line - 1] + col

    edits: list[tuple[int, int, str]] = []

    def statement(node: ast.stmt, text: str) -> None:
        assert node.end_lineno is not None and node.end_col_offset is not None
        line = lines[node.lineno - 1].encode()
        if line[: node.col_offset].strip():
            raise BuildError(f"{m.path}:{node.lineno}: a statement to rewrite shares its line")
        edits.append((off(node.lineno, node.col_offset), off(node.end_lineno, node.end_col_offset), text))

    class Visit(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            v = plan.const_of(node)
            if v is not None:
                assert node.end_col_offset is not None
                edits.append((off(node.lineno, node.col_offset), off(node.lineno, node.end_col_offset), _literal(v)))

        def visit_Attribute(self, node: ast.Attribute) -> None:
            v = plan.const_of(node)
            if v is None:
                self.generic_visit(node)
                return
            assert node.end_lineno is not None and node.end_col_offset is not None
            edits.append((off(node.lineno, node.col_offset), off(node.end_lineno, node.end_col_offset), _literal(v)))

        def generic_visit(self, node: ast.AST) -> None:
            if isinstance(node, ast.stmt) and id(node) in plan.drop_defs:
                statement(node, "pass")
                return
            if isinstance(node, ast.ImportFrom) and id(node) in plan.imports:
                keep = plan.imports[id(node)]
                assert node.end_lineno is not None
                pad = "\n" * (node.end_lineno - node.lineno)
                if keep:
                    names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in keep)
                    statement(node, f"from {'.' * node.level}{node.module or ''} import {names}{pad}")
                else:
                    statement(node, "pass" + pad)
                return
            super().generic_visit(node)

    Visit().visit(m.tree)
    edits.sort()
    out = bytearray()
    pos = 0
    for a, b, text in edits:
        if a < pos:
            raise BuildError(f"{m.path}: overlapping rewrites at byte {a}")
        out += raw[pos:a] + text.encode()
        pos = b
    out += raw[pos:]
    result = out.decode()
    if len(result.splitlines()) != len(lines):
        raise BuildError(f"{m.path}: the rewrite changed the line count")
    want = _Transform(plan).visit(m.tree)  # in place: the plan knows the nodes by identity
    if _norm(ast.parse(result)) != _norm(want):
        raise BuildError(f"{m.path}: the text rewrite differs from the tree transformation")
    return result


def mpy_cross() -> str:
    try:
        return executables.find("mpy-cross")
    except executables.MissingExecutable as e:
        raise BuildError(str(e)) from None


def build(
    out: Path, root: Path = FIRMWARE, extra: tuple[Path, ...] = (), py: bool = False, march: str = "host"
) -> dict[str, int]:
    """Rewrite and compile the firmware into `out`; the size of each .mpy by module path.
    `py`: write the rewritten sources instead (to freeze with a board's manifest). `march`: the
    CPU of the native code (mpy-cross -march: "host", "x86" for the 32-bit board image …)."""
    mods = load(root, extra)
    sizes: dict[str, int] = {}
    if py:
        for m in mods.values():
            dst = out / m.rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(rewrite(m, mods))
            sizes[str(m.rel)] = dst.stat().st_size
        names = out / NAMES
        names.write_text(names_module(mods))
        sizes[str(NAMES)] = names.stat().st_size
        return sizes
    exe = mpy_cross()
    with tempfile.TemporaryDirectory() as tmp:
        for m in mods.values():
            src = Path(tmp) / m.rel
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(rewrite(m, mods))
            dst = out / m.rel.with_suffix(".mpy")
            dst.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(
                # -march: csc/sha256.py is viper (native code) for the machine the emulated board
                # runs on; a board's own build compiles what it freezes for its CPU. -s: tracebacks
                # name the module (csc.link), a qstr the board interns anyway, not a second one
                # for its file (csc/link.py): one qstr less per module, and one too many makes
                # MicroPython allocate its next qstr pool (docs/firmware.md)
                [exe, f"-march={march}", "-o", str(dst), "-s", m.name, str(src)],
                check=False,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise BuildError(f"mpy-cross {m.rel}: {r.stderr.strip()}")
            sizes[str(m.rel.with_suffix(".mpy"))] = dst.stat().st_size
    return sizes


NAMES = Path("csc/_names.py")
"""A module of the frozen build that nothing imports (see names_module)."""
PORT_SUBMODULES = ("asyncio.core",)
"""The port's modules the firmware imports under a dotted name: asyncio's core (`import asyncio` imports
it; the package's other submodules load only for what the firmware does not use: Event, Lock, streams)."""


def names_module(mods: dict[str, Module]) -> str:
    """The text of `csc/_names.py`: an import of every dotted module name of the build (and of
    asyncio's submodules). Nothing imports it; it is there for what freezing does with its names.
    A module is imported under its dotted name (`csc.link`, reached from `from .link import …`), and
    MicroPython makes that name a qstr at the import: in the heap, unless the image already holds it.
    Freezing puts every qstr of the frozen bytecode in the image's qstr pool, in flash, so with this
    module frozen the imports find their names there: on the 32-bit image that is a heap qstr pool
    and its strings fewer (docs/firmware.md, "Footprint")."""
    dotted = sorted({m.name for m in mods.values() if "." in m.name} | set(PORT_SUBMODULES))
    head = "# Generated by tools/board/build.py (names_module): frozen for its names, never imported.\n"
    # `as`: its last component too (the import makes a qstr of each component), in case no code names it
    return head + "".join(f"import {n} as {n.rsplit('.', 1)[1]}\n" for n in dotted)


def fingerprint(root: Path = FIRMWARE) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(subprocess.run([mpy_cross(), "--version"], check=True, capture_output=True).stdout)
    for p in sources(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def built(root: Path = FIRMWARE) -> Path:
    """The built firmware for the current sources, built once into a cache directory."""
    cache = Path(tempfile.gettempdir()) / "evedge-fw"
    out = cache / fingerprint(root)
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
    try:
        build(tmp, root)
        try:
            os.rename(tmp, out)
        except OSError:  # another process built it at the same time
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    old = sorted((p for p in cache.iterdir() if p.name[0] != "."), key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP]:  # one build per source state: keep the last few
        if p != out:
            shutil.rmtree(p, ignore_errors=True)
    return out


# ---------------------------------------------------------------- the update archive (M4)

ARCHIVE_MAGIC = b"CSCIMG1\n"


def pack(built_dir: Path) -> bytes:
    """The update archive of a build: the `csc` package's .mpy files (a slot's firmware; the
    board's own module and its loader stay the factory's), read by firmware/boards/unix.py
    `Slots.install`: the magic, then per file its name (1-byte length), its size (4 bytes,
    big-endian) and its bytes; a zero length ends it. Files in name order: the same build packs
    to the same bytes."""
    out = bytearray(ARCHIVE_MAGIC)
    for p in sorted((built_dir / "csc").rglob("*.mpy")):
        name = p.relative_to(built_dir).as_posix().encode()
        data = p.read_bytes()
        if len(name) > 255:
            raise BuildError(f"{name!r}: a name in the archive is at most 255 bytes")
        out += bytes([len(name)]) + name + len(data).to_bytes(4, "big") + data
    out += b"\0"
    return bytes(out)


def update_image(version: str, march: str = "host", root: Path = FIRMWARE,
                 edit: Callable[[Path], None] | None = None) -> bytes:  # fmt: skip
    """The update archive of the firmware at `root` with `csc.FW_VERSION` = `version`, its native
    code for `march` (the board's: tools.board.Board.march). `edit(copy)` may change the copied
    sources first (a test's broken build). Cached per sources, version and CPU when not edited."""
    key = hashlib.sha256(f"{fingerprint(root)}\0{version}\0{march}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "evedge-fw-updates" / f"{key}.bin"
    if edit is None and cache.is_file():
        return cache.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        init = src / "csc" / "__init__.py"
        text = init.read_text()
        if 'FW_VERSION = "' not in text:
            raise BuildError(f"{init}: no FW_VERSION to set")
        head, rest = text.split('FW_VERSION = "', 1)
        init.write_text(head + f'FW_VERSION = "{version}"' + rest.split('"', 1)[1])
        if edit is not None:
            edit(src)
        out = Path(tmp) / "out"
        build(out, src, march=march)
        data = pack(out)
    if edit is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, cache)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory (MICROPYPATH for the unix port)")
    ap.add_argument("--py", action="store_true", help="write the rewritten .py (for a board's manifest), not .mpy")
    a = ap.parse_args()
    try:
        sizes = build(a.out, py=a.py)
    except BuildError as e:
        sys.exit(f"build failed: {e}")
    total = sum(v for k, v in sizes.items() if k.startswith("csc/"))
    kind = ".py" if a.py else ".mpy"
    print(f"{len(sizes)} modules into {a.out}; csc/: {total} bytes of {kind} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
