"""Where the board's heap goes: the heap profiler's dump (tools/board/cmodules/heapprof), summed up.

The emulated board's image has a C module `heapprof` (a board never runs it) whose `dump()` prints
one line per allocation of the GC heap; the control command `heapprof` runs it on a running board
(boards/unix.py). This module reads those lines and attributes each allocation to what holds it:

- a function object to its module (`fun`: 16 B, 32 B with default arguments);
- a class's type object and its method table to the class;
- a module's object, globals dict and table to the module;
- an instance and its attribute table to its class;
- a coroutine's frame to the function it runs;
- a list's items, a bytearray's or array's bytes to the list or buffer;
- qstr pools and their strings (the names MicroPython makes at run time);
- the rest by the name of its type, or `raw` (what has no header: a table whose owner is not
  reachable as above, a C module's buffer, LittleFS's caches).

`python -m tools.board.footprint --profile` prints it at the scenario's measuring point.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

_H = re.compile(r"^H ([0-9a-f]+) (\d+) (\S+)(?: (\S+))?(?: (\S+))?$")
_O = re.compile(r"^O ([0-9a-f]+) (\S+)(?: (\S+))?$")


@dataclass
class Alloc:
    off: int
    size: int
    kind: str  # fun, type, module, dict, inst, gen, raw, qstrpool, qstrdata, or a type's name
    name: str = ""
    module: str = ""
    owner: tuple[str, str] | None = None  # (what it is for, whose): ("classtable", "Link") …
    words: list[int] = field(default_factory=list)  # its content, when dumped with the words


@dataclass
class Profile:
    allocs: list[Alloc] = field(default_factory=list)
    base: int = 0  # the heap's address: a word equal to base + an allocation's offset points to it

    @property
    def total(self) -> int:
        return sum(a.size for a in self.allocs)

    def category(self, a: Alloc) -> tuple[str, str]:
        """(category, holder) of one allocation."""
        if a.owner is not None:
            what, whose = a.owner
            cat = {
                "classdict": "classes (type, method dict and table)",
                "classtable": "classes (type, method dict and table)",
                "globdict": "modules (object, globals dict and table)",
                "globtable": "modules (object, globals dict and table)",
                "members": "instances (object and attribute table)",
                "items": "buffers, lists and arrays (their items)",
                "dicttable": "dicts (object and table)",
            }[what]
            return cat, whose
        if a.kind == "fun":
            return "function objects", a.module
        if a.kind == "type":
            return "classes (type, method dict and table)", a.name
        if a.kind == "module":
            return "modules (object, globals dict and table)", a.name
        if a.kind == "inst":
            return "instances (object and attribute table)", a.name
        if a.kind == "gen":
            return "coroutine frames", f"{a.module}.{a.name}"
        if a.kind in ("qstrpool", "qstrdata"):
            return "qstrs made at run time", a.kind
        if a.kind == "dict":
            return "dicts (object and table)", ""
        if a.kind in ("list", "bytearray", "array", "memoryview"):
            return "buffers, lists and arrays (their items)", a.kind
        if a.kind == "raw":
            return "raw (no header, owner not found)", ""
        return "other objects", a.kind

    def by_category(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for a in self.allocs:
            cat, holder = self.category(a)
            out[cat][holder] += a.size
        return out


GROUPS = (
    ("csc", "the firmware (csc)"),
    ("boards.esp32", "the firmware (csc)"),
    ("asyncio", "MicroPython's asyncio"),
    ("__main__", "the emulated board (boards.unix, boards.sim)"),
    ("boards", "the emulated board (boards.unix, boards.sim)"),
)
_C_TYPES = {  # objects of C types, by whose they are
    "Task": "MicroPython's asyncio",
    "TaskQueue": "MicroPython's asyncio",
    "poll": "MicroPython's asyncio",  # the I/O queue's poller
    "VfsLfs2": "the file system (the flash's mount)",
    "VfsPosix": "the file system (the flash's mount)",
    "FileIO": "the file system (the flash's mount)",
}
DATA = "data the objects above hold (buffers, lists, strings, numbers, dicts)"
INTERPRETER = "the interpreter's own (no heap object holds it: sys.modules, sys.path, the C stack)"


def _group(module: str) -> str:
    for prefix, g in GROUPS:
        if module == prefix or module.startswith(prefix + "."):
            return g
    return f"module {module}"


def groups(p: Profile) -> dict[str, int]:
    """Bytes by whose they are: the firmware's modules, asyncio, the emulated board's harness (its
    functions, classes, instances, coroutines and modules, by the module that defines them; C
    objects by their type), qstrs, and the data those objects hold (a buffer or a list does not
    say whose it is: the largest are listed by `largest`)."""
    class_module = {a.name: a.module for a in p.allocs if a.kind == "type"}
    out: dict[str, int] = defaultdict(int)
    for a in p.allocs:
        g: str
        if a.owner is not None and a.owner[0] in ("classdict", "classtable", "members"):
            g = _group(class_module.get(a.owner[1], "?"))
        elif a.owner is not None and a.owner[0] in ("globdict", "globtable"):
            g = _group(a.owner[1])
        elif a.kind == "module":
            g = _group(a.name)
        elif a.kind in ("fun", "type", "inst", "gen"):
            g = _group(a.module)
        elif a.kind in ("qstrpool", "qstrdata"):
            g = "MicroPython's qstrs made at run time (module names …)"
        else:
            g = _C_TYPES.get(a.kind, DATA)
        out[g] += a.size
    return dict(out)


_NAMED = ("fun", "type", "inst", "gen", "module")
_NO_POINTERS = ("str", "bytes", "qstrdata", "float")  # their words are data, not pointers


def holder(a: Alloc, class_module: dict[str, str]) -> str | None:
    """`Class (module)` or `module` for an allocation that names itself or is owned by one that does."""
    if a.owner is not None and a.owner[0] in ("classdict", "classtable", "members"):
        cls = a.owner[1]
        return f"{cls} ({class_module.get(cls, '?')})" if a.owner[0] == "members" else f"class {cls}"
    if a.owner is not None and a.owner[0] in ("globdict", "globtable"):
        return f"module {a.owner[1]}"
    if a.kind == "inst":
        return f"{a.name} ({a.module})"
    if a.kind == "type":
        return f"class {a.name}"
    if a.kind in ("module", "fun", "gen"):
        return f"module {a.name if a.kind == 'module' else a.module}"
    if a.kind in _C_TYPES:
        return a.kind
    return None


def held(p: Profile) -> dict[str, int]:
    """The data (what names no holder: buffers, lists, tables, strings) by the nearest object that
    does, through the pointers in the dump's words (as the GC follows them): an instance (`Link
    (csc.link)`), a class or a module. What no object of the heap reaches is the interpreter's own
    (`INTERPRETER`: sys.modules' table, sys.path, what only the C stack holds); qstrs are left out
    (`groups` counts them)."""
    by_off = {a.off: a for a in p.allocs}
    class_module = {a.name: a.module for a in p.allocs if a.kind == "type"}
    items = {a.off for a in p.allocs if a.owner is not None and a.owner[0] == "items" and a.owner[1] != "list"}

    def targets(a: Alloc) -> list[Alloc]:
        if a.kind in _NO_POINTERS or a.off in items:  # a buffer's bytes are not pointers
            return []
        out = []
        for w in a.words:
            t = by_off.get(w - p.base)
            if t is not None and t is not a:
                out.append(t)
        return out

    whose: dict[int, str] = {}
    frontier = []
    for a in p.allocs:
        h = holder(a, class_module)
        if h is not None:
            whose[a.off] = h
            frontier.append(a)
    while frontier:  # breadth first: each data allocation goes to the nearest named holder
        nxt = []
        for a in frontier:
            for t in targets(a):
                if t.off not in whose:
                    whose[t.off] = whose[a.off]
                    nxt.append(t)
        frontier = nxt
    out: dict[str, int] = defaultdict(int)
    for a in p.allocs:
        if holder(a, class_module) is None and a.kind not in ("qstrpool", "qstrdata"):
            out[whose.get(a.off, INTERPRETER)] += a.size
    return dict(out)


def largest(p: Profile, n: int = 6) -> list[Alloc]:
    """The largest allocations that do not say whose they are (buffers, tables, lists)."""
    data = [
        a
        for a in p.allocs
        if a.kind not in ("fun", "type", "inst", "gen", "module") and (a.owner is None or a.owner[0] == "items")
    ]
    return sorted(data, key=lambda a: -a.size)[:n]


def parse(lines: list[str]) -> Profile:
    """The profile from the dump's lines (those between `heapprof begin` and `heapprof end`)."""
    allocs: dict[int, Alloc] = {}
    owned: dict[int, tuple[str, str]] = {}
    inside = False
    base = 0
    last: Alloc | None = None
    for raw in lines:
        line = raw.strip()
        if line.startswith("heapprof begin"):
            inside = True
            allocs.clear()
            owned.clear()
            w = line.split()
            base = int(w[3], 16) if len(w) > 3 else 0
            continue
        if line == "heapprof end":
            inside = False
            continue
        if not inside:
            continue
        if line.startswith("W") and last is not None:
            last.words = [int(x, 16) for x in line.split()[1:]]
            continue
        m = _H.match(line)
        if m:
            off = int(m.group(1), 16)
            last = allocs[off] = Alloc(off, int(m.group(2)), m.group(3), m.group(4) or "", m.group(5) or "")
            continue
        m = _O.match(line)
        if m:
            what, whose = m.group(2), m.group(3) or ""
            off = int(m.group(1), 16)
            # a class's and a module's dict objects are named by them; their tables too
            if what != "dicttable" or off not in owned:
                owned[off] = (what, whose)
    for off, a in allocs.items():
        if off in owned and (a.kind in ("raw", "dict") or owned[off][0] in ("classdict", "globdict")):
            a.owner = owned[off]
    return Profile(sorted(allocs.values(), key=lambda a: a.off), base)


def report(p: Profile, top: int = 8) -> list[str]:
    """The profile as text: each category's total, and its largest holders."""
    out = [f"heap profile: {p.total} B in {len(p.allocs)} allocations; whose:"]
    for g, b in sorted(groups(p).items(), key=lambda kv: -kv[1]):
        out.append(f"  {g:70} {b:6} B")
    big = ", ".join(f"{a.size} B ({a.owner[1] + ' items' if a.owner else a.kind})" for a in largest(p))
    out.append(f"    the largest data allocations: {big}")
    if any(a.words for a in p.allocs):
        h = sorted(held(p).items(), key=lambda kv: -kv[1])
        out.append("  the data, by the nearest object that holds it: " + ", ".join(f"{n} {b}" for n, b in h[: top * 2]))
    out.append("by kind:")
    cats = p.by_category()
    for cat, holders in sorted(cats.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(holders.values())
        out.append(f"  {cat:44} {total:6} B")
        named = sorted(((n, b) for n, b in holders.items() if n), key=lambda nb: -nb[1])
        if named:
            shown = ", ".join(f"{n} {b}" for n, b in named[:top])
            more = f", … ({len(named) - top} more)" if len(named) > top else ""
            out.append(f"      {shown}{more}")
    return out
