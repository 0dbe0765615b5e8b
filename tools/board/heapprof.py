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


@dataclass
class Profile:
    allocs: list[Alloc] = field(default_factory=list)

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
    for raw in lines:
        line = raw.strip()
        if line.startswith("heapprof begin"):
            inside = True
            allocs.clear()
            owned.clear()
            continue
        if line == "heapprof end":
            inside = False
            continue
        if not inside:
            continue
        m = _H.match(line)
        if m:
            off = int(m.group(1), 16)
            allocs[off] = Alloc(off, int(m.group(2)), m.group(3), m.group(4) or "", m.group(5) or "")
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
    return Profile(sorted(allocs.values(), key=lambda a: a.off))


def report(p: Profile, top: int = 8) -> list[str]:
    """The profile as text: each category's total, and its largest holders."""
    out = [f"heap profile: {p.total} B in {len(p.allocs)} allocations; whose:"]
    for g, b in sorted(groups(p).items(), key=lambda kv: -kv[1]):
        out.append(f"  {g:70} {b:6} B")
    big = ", ".join(f"{a.size} B ({a.owner[1] + ' items' if a.owner else a.kind})" for a in largest(p))
    out.append(f"    the largest data allocations: {big}")
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
