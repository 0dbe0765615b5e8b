"""Secrets are created private: a first run of every program that keeps them (the CSMS, the
gateway and its devices CLI, a roaming endpoint and its --init) leaves no file that another
local user could read, except certificates and public keys, and no folder they could enter."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from programs import Program

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = (".pem", ".pub")


def exposed(root: Path) -> list[str]:
    """Everything under `root` that group or others may read, write or enter, public files aside."""
    out = []
    for p in sorted(root.rglob("*")):
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o077 and not (p.is_file() and p.suffix in PUBLIC):
            out.append(f"{p.relative_to(root)}: {mode:o}")
    return out


def test_a_first_run_of_every_program_creates_its_secrets_private(tmp_path: Path, programs: list[Program]) -> None:
    csms = Program("evedge_csms", "--data", str(tmp_path / "csms"), "--port", "0")
    programs.append(csms)
    csms.wait_for(r"csms listening")
    admin = [sys.executable, "-m", "evedge_csms.admin", "--data", str(tmp_path / "csms")]
    subprocess.run([*admin, "add-token", "CARD-1"], cwd=ROOT, check=True, capture_output=True)

    gw_toml = tmp_path / "gw.toml"
    gw_toml.write_text(
        f'[site]\ndata_dir = "{tmp_path / "gw"}"\n[lan]\nlisten = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    gw = Program("gateway", "--config", str(gw_toml))
    programs.append(gw)
    gw.wait_for(r"READY lan=\d+")
    key = "11" * 32
    devices = [sys.executable, "-m", "gateway", "--config", str(gw_toml), "devices", "provision", "ev-0009"]
    subprocess.run([*devices, "--key", key], cwd=ROOT, check=True, capture_output=True)

    subprocess.run([sys.executable, "-m", "evedge_roaming", "--init", str(tmp_path / "roaming")], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    csp = Program("evedge_roaming", "--role", "csp", "--config", str(tmp_path / "roaming" / "csp.toml"))
    programs.append(csp)
    csp.wait_for(r"listening on")
    for p in reversed(programs):
        p.stop()

    made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    secrets = ["csms/csms.sqlite", "csms/signing.key", "csms/pki/ca.key", "gw/devices.sqlite", "gw/outbox.sqlite",
               "gw/factory_seed", "gw/pki/ca.key", "roaming/csp.toml", "roaming/csp.sqlite"]  # fmt: skip
    for secret in secrets:
        assert secret in made, f"{secret} was not made by the first run (made: {sorted(made)})"
    assert (tmp_path / "gw" / "devices.sqlite").stat().st_size > 0
    assert exposed(tmp_path / "csms") == []
    assert exposed(tmp_path / "gw") == []
    assert exposed(tmp_path / "roaming") == []
