"""docs/quickstart.md as an operator follows it: `python -m tools.siteinit` makes one PKI for
the site, and the CSMS, the gateway and a board — each started as its own program from the
files it wrote — trust each other, onboard the board and bill its session. Ports are
ephemeral (read back from each program), so the test shares the machine with anything."""

from __future__ import annotations

import asyncio
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from programs import Program

from tools import siteinit

ROOT = Path(__file__).resolve().parent.parent


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_siteinit_creates_every_secret_private_and_refuses_to_overwrite_a_site(tmp_path: Path) -> None:
    site = tmp_path / "site"
    made = siteinit.init(site, "DE*ABC*LS1")
    secrets_ = [*sorted((site / "pki").glob("*.key")), site / "csms" / "signing.key", made.gateway_toml]
    assert len(secrets_) == 6
    for f in secrets_:
        assert mode(f) == 0o600, f
    for d in (site, site / "pki", site / "csms"):
        assert mode(d) == 0o700, d
    assert made.factory_seed.hex() in made.gateway_toml.read_text()
    with pytest.raises(siteinit.InitError, match="already holds a site"):
        siteinit.init(site, "DE*ABC*LS1")
    key = (site / "pki" / "ca.key").read_bytes()
    again = siteinit.init(site, "DE*ABC*LS1", "127.0.0.1:5000", force=True)
    assert (site / "pki" / "ca.key").read_bytes() == key  # --force keeps the PKI, rewrites the TOMLs
    assert '"127.0.0.1:5000"' in again.gateway_toml.read_text()
    assert again.factory_seed == made.factory_seed  # boards made for the site still onboard


def test_siteinit_refuses_a_bad_site_id_and_address(tmp_path: Path) -> None:
    with pytest.raises(siteinit.InitError, match="--site"):
        siteinit.init(tmp_path / "a", "not a site id")
    with pytest.raises(siteinit.InitError, match="--csms-address"):
        siteinit.init(tmp_path / "b", csms_address="nowhere")
    assert not (tmp_path / "a" / "csms.toml").exists() and not (tmp_path / "b").exists()


def test_parts_started_on_their_own_from_siteinit_trust_each_other_and_charge(
    tmp_path: Path, programs: list[Program]
) -> None:
    site = tmp_path / "site"
    env_python = [sys.executable, "-m"]
    subprocess.run([*env_python, "tools.siteinit", str(site)], cwd=ROOT, check=True, capture_output=True)
    csms = Program("evedge_csms", "--config", str(site / "csms.toml"), "--port", "0")
    programs.append(csms)
    csms_port = csms.wait_for(r"csms listening on 127\.0\.0\.1:(\d+)").group(1)
    # the gateway learns where the CSMS really listens; the PKI made above is kept
    subprocess.run(
        [*env_python, "tools.siteinit", str(site), "--force", "--csms-address", f"127.0.0.1:{csms_port}",
         "--lan-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    gw = Program("gateway", "--config", str(site / "gateway.toml"))
    programs.append(gw)
    lan = gw.wait_for(r"READY lan=(\d+)").group(1)
    gw.wait_for(r"upstream up")  # the CSMS accepted the gateway's certificate, and it the CSMS's
    # the operator CLI as installed by evedge-peers (tools/setup.sh), beside this interpreter
    admin = [str(Path(sys.executable).with_name("evedge-csms-admin")), "--data", str(site / "csms")]
    subprocess.run([*admin, "add-token", "CARD-1"], cwd=ROOT, check=True, capture_output=True)
    board = Program(
        "tools.board", "--gw", f"127.0.0.1:{lan}", "--id", "ev-0001", "--dir", str(tmp_path / "b1"),
        "--gateway-config", str(site / "gateway.toml"), stdin=True,
    )  # fmt: skip
    programs.append(board)
    board.wait_for(r'"ev": "registration"')  # onboarded by the factory key derived from the seed
    board.send('{"cmd": "card", "token": "CARD-1"}')
    board.send('{"cmd": "plug"}')
    board.wait_for(r'"ev": "tx_started"')
    board.send('{"cmd": "step", "ms": 600000}')
    board.send('{"cmd": "unplug"}')
    board.wait_for(r'"ev": "tx_ended"')

    def sessions() -> str:
        r = subprocess.run([*admin, "list-sessions"], cwd=ROOT, check=True, capture_output=True, text=True)
        return r.stdout

    # the ended transaction reaches the CSMS once its events are relayed: poll its store
    end = time.monotonic() + 30
    while not re.search(r"ev-0001\t\d+\t\d+\tended\tCARD-1", out := sessions()):
        assert time.monotonic() < end, f"the session never ended at the CSMS:\n{out}"
        time.sleep(0.2)


def test_siteinit_roaming_endpoints_and_the_gateway_trust_one_site_ca(tmp_path: Path) -> None:
    """The roaming network siteinit writes: the endpoints load their files (paths relative to
    them, passwords and keys 0600), and the gateway's [roaming] credentials and certificate
    log in at the CSO endpoint, as a CSP's log in there too: one CA for every part."""

    from evedge_roaming.config import load

    site = tmp_path / "site"
    siteinit.init(site, "DE*ABC*LS1", roaming="mixed")
    files = {k: site / "roaming" / f"{k}.toml" for k in ("cso", "csp", "ch")}
    assert all(mode(f) == 0o600 for f in files.values())
    moved = tmp_path / "moved"  # relative paths: the folder can be moved as a whole
    site.rename(moved)
    cfgs = {k: load(moved / "roaming" / f"{k}.toml") for k in files}
    assert cfgs["cso"].party_id == "DE*ABC*O" and cfgs["cso"].ca.resolve() == (moved / "pki" / "ca.pem").resolve()
    asyncio.run(_log_in_everywhere(moved, cfgs))


async def _log_in_everywhere(moved: Path, cfgs: dict[str, Any]) -> None:
    from evedge_roaming.__main__ import build
    from evedge_roaming.testbed import start_endpoints, with_ports
    from gateway.protocol.roaming.client import Peer, RoamingClient
    from gateway.protocol.roaming.http3 import TlsFiles

    eps = {k: build(k, c) for k, c in with_ports(cfgs, dict.fromkeys(cfgs, 0)).items()}
    try:
        cfgs = await start_endpoints(eps)
        roaming = tomllib.loads((moved / "gateway.toml").read_text())["roaming"]
        tls = TlsFiles(moved / roaming["ca"], moved / roaming["cert"], moved / roaming["key"])
        me = roaming["party_id"]
        peer = Peer(roaming["cso_party"], "127.0.0.1", cfgs["cso"].port, tls, username=me,
                    password=roaming["password"], secret=bytes.fromhex(roaming["secret"]))  # fmt: skip
        async with RoamingClient(me, peer) as c:
            assert await c.login()
        csp = cfgs["csp"]
        at_cso = csp.party(cfgs["cso"].party_id)
        assert at_cso is not None
        csp_tls = TlsFiles(csp.ca, csp.cert, csp.key)
        peer = Peer(at_cso.party_id, "127.0.0.1", cfgs["cso"].port, csp_tls, username=csp.party_id,
                    password=at_cso.password, secret=at_cso.secret_bytes)  # fmt: skip
        async with RoamingClient(csp.party_id, peer) as c:
            assert await c.login()
    finally:
        for ep in eps.values():
            await ep.stop()
