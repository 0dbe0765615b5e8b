"""The board image (tools/board/image.py): MicroPython's unix port built 32-bit with the firmware
frozen in. It builds (or is cached), freezes what firmware/manifest.py freezes plus the emulated
board's own modules, a board on it boots on a 32-bit heap, and a build that fails or is cut short
leaves nothing that could be taken for an image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fwpeer import Rig
from test_fw_layout import frozen

from tools.board import heapprof, image
from tools.board.runner import DEFAULT_HEAP, Board

pytestmark = pytest.mark.timeout(600)  # the first use builds the image (about a minute on 2 cores)


@pytest.fixture(scope="module")
def exe() -> Path:
    return image.built()


def test_the_image_is_built_once_and_cached_by_its_inputs(exe: Path) -> None:
    h = image.image_hash()
    assert exe == image.cache_dir() / h / "micropython" and image.cached(h) == exe
    assert image.built() == exe  # cached: the same file, not built again
    info = image.info(exe)
    assert info["hash"] == h and info["inputs"] == image.inputs()
    fw = info["frozen"]["firmware"]  # what goes to a real board's flash
    # and the build's csc/_names, frozen for its qstrs (tools/board/build.py, names_module)
    assert fw["modules"] == len(frozen()) + 1 and 0 < fw["bytecode_bytes"] < fw["total_bytes"]
    assert info["frozen"]["image"]["total_bytes"] > fw["total_bytes"]  # asyncio, boards.unix and boards.sim too


def test_the_image_freezes_what_a_board_freezes_and_the_emulated_boards_modules(exe: Path) -> None:
    # boards.unix and main run a board when imported: main is tried last, and gets as far as the ESP32's flash
    names = [*sorted(frozen() - {"main"} | {"boards.sim", "asyncio", "asyncio.stream"}), "main"]
    probe = f"import sys\nprint(sys.maxsize)\nfor n in {names!r}:\n    __import__(n)\n    print(n)"
    env = {**os.environ, "MICROPYPATH": ".frozen"}  # nothing from the file system
    r = subprocess.run([str(exe), "-c", probe], check=False, capture_output=True, text=True, env=env, cwd="/")
    out = r.stdout.split("Traceback")[0].split()
    assert out[0] == str(2**31 - 1) and out[1:] == names[:-1], r.stdout
    assert 'boards/esp32.py", line' in r.stdout and "no module named 'esp32'" in r.stdout  # main ran boards.esp32


@pytest.fixture
def image_rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    r.board = Board(tmp_path, r.peer.port, "evse-1", r.board.factory_key, kind="image")
    yield r
    r.close()


def test_a_board_on_the_image_boots_on_a_32_bit_heap(exe: Path, image_rig: Rig) -> None:
    b = image_rig.board
    assert (b.exe, b.heap, b.code_dir) == (str(exe), DEFAULT_HEAP["image"], None)
    assert b.describe() == f"32-bit frozen board image {exe.parent.name}"
    image_rig.up()
    boot = b.all("boot")[0]
    assert boot["maxsize"] == 2**31 - 1  # 32-bit pointers and small ints
    st = b.status()
    assert st["registered"] is True and st["mem_alloc"] + st["mem_free"] <= 64 * 1024


def test_a_failed_build_leaves_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVEDGE_BOARD_IMAGE_CACHE", str(tmp_path))
    (tmp_path / ".build-left-by-a-kill").mkdir()  # what an interrupted build leaves

    def broken(tmp: Path, ins: dict[str, str], h: str, quiet: bool) -> Path:
        (tmp / "out").mkdir()
        (tmp / "out" / "micropython").write_text("half an image")
        raise KeyboardInterrupt  # the build cut short

    monkeypatch.setattr(image, "_build", broken)
    with pytest.raises(KeyboardInterrupt):
        image.built(quiet=True)
    assert image.cached() is None
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the leftovers removed, no image


PROFILED = """
import gc, heapprof
class Meter:
    def __init__(self):
        self.wh = 0
        self.buf = bytearray(1000)
    def read(self):
        return self.wh
m = Meter()
gc.collect()
print("alloc", gc.mem_alloc())
heapprof.dump(True)
"""


def test_the_heap_profiler_accounts_for_every_byte_and_names_its_holders(exe: Path) -> None:
    # the image's heap profiler (tools/board/heapprof.py): every allocation of the heap is in its dump,
    # and a class, its instance, its buffer and its methods are attributed to them
    r = subprocess.run([str(exe), "-c", PROFILED], check=True, capture_output=True, text=True, cwd="/")
    lines = r.stdout.splitlines()
    alloc = int(lines[0].split()[1])
    p = heapprof.parse(lines)
    assert p.total == alloc  # gc.mem_alloc() counts the same blocks
    cats = p.by_category()
    assert cats["instances (object and attribute table)"]["Meter"] >= 32  # the object and its 2 attributes
    assert cats["classes (type, method dict and table)"]["Meter"] >= 64 + 16 + 16
    funs = {a.name for a in p.allocs if a.kind == "fun" and a.module == "__main__"}
    assert {"__init__", "read"} <= funs and cats["function objects"]["__main__"] == 16 * len(funs)
    assert cats["buffers, lists and arrays (their items)"]["bytearray"] >= 1000
    assert [a.module for a in p.allocs if a.kind in ("type", "inst") and a.name == "Meter"] == ["__main__"] * 2
    assert heapprof.held(p)["Meter (__main__)"] >= 1000  # its buffer, found through the pointers
    assert any(a.kind == "module" and a.name == "heapprof" for a in p.allocs) is False  # a C module: no heap


def test_importing_the_firmware_makes_no_qstr_of_its_module_names(exe: Path) -> None:
    # a module imports under its dotted name, a qstr: the frozen build's csc/_names.py holds them all
    # (tools/board/build.py, names_module), so importing the firmware finds them in flash and makes
    # none in the heap (before it, the boot made a qstr pool and ~0.5 KiB of strings of them)
    names = [*sorted(n for n in frozen() if n.startswith("csc.")), "asyncio"]
    probe = "import gc, heapprof\n" + "".join(f"import {n}\n" for n in names) + "gc.collect()\nheapprof.dump(True)\n"
    env = {**os.environ, "MICROPYPATH": ".frozen"}
    r = subprocess.run([str(exe), "-c", probe], check=True, capture_output=True, text=True, env=env, cwd="/")
    made = b"".join(
        b"".join(w.to_bytes(4, "little") for w in a.words)
        for a in heapprof.parse(r.stdout.splitlines()).allocs
        if a.kind == "qstrdata"
    )
    leaked = sorted(n for n in [*names, "asyncio.core"] if n.encode() + b"\0" in made)
    assert not leaked, f"module names made in the heap at import: {leaked}"
