"""Initialise a site's PKI and the starting configuration of each part, so that the parts
started on their own — on one machine or several — trust each other:

    python -m tools.siteinit DIR [--site ID] [--csms-address HOST:PORT] [--lan-listen HOST:PORT]

writes (refusing to overwrite a DIR that already holds a site, unless `--force`, which
writes the two TOML files anew and keeps the keys, certificates and factory seed):

    DIR/pki/ca.pem, ca.key            the site's CA: the trust anchor of every part
    DIR/pki/csms.pem, csms.key        the CSMS's TLS identity (server and client)
    DIR/pki/gateway.pem, gateway.key  the gateway's uplink identity (client; CN = the site id)
    DIR/pki/localcsms.pem, .key       the gateway's certificate as the site's local CSMS (M17)
    DIR/csms/signing.key, signing.pub the CSMS's Ed25519 key for signed commands and manifests
    DIR/csms.toml                     `evedge-csms --config DIR/csms.toml`
    DIR/gateway.toml                  `python -m gateway --config DIR/gateway.toml`

Every private key, the factory seed and gateway.toml (which holds the seed) are created
0600 under 0700 folders. The CA is a development CA (docs/quickstart.md): an operator with a
real PKI points `[tls]` of csms.toml and `[upstream]` of gateway.toml at its files instead.
With `--roaming MODE` also the IEC 63119 endpoints — the site operator's CSO, a home CSP, a
clearing house — in DIR/roaming/{cso,csp,ch}.toml (0600: they hold the pairs' passwords and
HMAC keys), certified by the same CA, on UDP ports from `--roaming-port` (4434) up, and the
gateway a `site` party of its CSO's endpoint (a `[roaming]` section in gateway.toml).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from evedge_csms import config as csms_config
from evedge_csms.pki import load_or_create_signer
from evedge_roaming.config import MODES
from evedge_roaming.testbed import write_network
from gateway import config as gwconfig
from gateway.protocol import devpki, gid

DEFAULT_SITE = "DE*EVE*LSITE1"


class InitError(Exception):
    """The site cannot be initialised as asked; the message says why."""


@dataclass(frozen=True)
class SiteFiles:
    """What `init` wrote."""

    root: Path
    csms_toml: Path
    gateway_toml: Path
    factory_seed: bytes


def _toml_str(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def _split(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InitError(f"{what}: expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def _roaming(root: Path, ca: tuple[Path, Path], mode: str | None, port: int, cso: str, site_party: str) -> str:
    """With a mode: the IEC 63119 endpoints (the site operator's CSO, a home CSP, a clearing
    house) in root/roaming, certified by the site's CA, the gateway a `site` party of the CSO;
    returns the gateway's [roaming] section."""
    if mode is None:
        return ""
    keys = {"cso": cso, "csp": "DE*HCP*O", "ch": "DE*CHX*O"}
    devpki.issue(root / "pki", "gateway-roaming", ca=ca, server=False, subject=site_party)
    cfgs = write_network(
        root / "roaming", mode, party_ids=keys, sites=(site_party,), ca=ca,
        ports={k: port + i for i, k in enumerate(keys)},
    )  # fmt: skip
    me = cfgs["cso"].party(site_party)
    assert me is not None
    return f"""
[roaming]                     # online identification through the CSO's IEC 63119 endpoint
party_id = {_toml_str(site_party)}
cso_party = {_toml_str(cso)}
address = "127.0.0.1:{cfgs["cso"].port}"
ca = "pki/ca.pem"
cert = "pki/gateway-roaming.pem"  # a client certificate of the endpoints' CA naming this party
key = "pki/gateway-roaming.key"
password = {_toml_str(me.password)}
secret = "{me.secret}"
"""


def init(
    root: Path,
    site_id: str = DEFAULT_SITE,
    csms_address: str = "127.0.0.1:4433",
    lan_listen: str = "127.0.0.1:7700",
    metrics_listen: str = "127.0.0.1:9700",
    *,
    force: bool = False,
    roaming: str | None = None,
    roaming_port: int = 4434,
    site_party: str | None = None,
) -> SiteFiles:
    csms_host, csms_port = _split(csms_address, "--csms-address")
    _split(lan_listen, "--lan-listen")
    _split(metrics_listen, "--metrics-listen")
    try:
        gwconfig.parse({"site": {"id": site_id}})
    except gwconfig.ConfigError as e:
        raise InitError(f"--site: {e}") from None
    if roaming is not None and roaming not in MODES:
        raise InitError(f"--roaming: a mode of {', '.join(MODES)}, not {roaming!r}")
    site = gid.parse(site_id, expect="L")
    site_party = site_party or f"{site.country}*ST1*O"
    try:
        gid.parse(site_party, expect="O")
    except ValueError as e:
        raise InitError(f"--site-party: {e}") from None
    if not 1 <= roaming_port <= 65535 - 2:
        raise InitError(f"--roaming-port: a UDP port, not {roaming_port}")
    csms_toml, gateway_toml = root / "csms.toml", root / "gateway.toml"
    if not force and (csms_toml.exists() or gateway_toml.exists()):
        raise InitError(f"{root} already holds a site (csms.toml, gateway.toml); --force writes them anew")
    devpki.private_dir(root)
    pki = devpki.private_dir(root / "pki")
    ca = devpki.ensure_ca(pki, org=f"evedge site {site_id}")
    devpki.issue(pki, "csms", ca=ca, server=True, client=True)
    devpki.issue(pki, "gateway", ca=ca, server=False, client=True, subject=site_id)
    devpki.issue(pki, "localcsms", ca=ca, server=True, client=False, subject=f"localcsms.{site_id}")
    signer = load_or_create_signer(devpki.private_dir(root / "csms") / "signing.key")

    csms_toml.write_text(
        f"""# The CSMS (docs/csms.md), written by `python -m tools.siteinit`.
[csms]
listen = {_toml_str(csms_host if csms_host not in ("localhost",) else "127.0.0.1")}
port = {csms_port}
data = "csms"                 # relative to this file

[tls]                         # relative to the data folder
ca = "../pki/ca.pem"          # trust anchor of the gateways' client certificates
ca_key = "../pki/ca.key"      # signs the boards' CSRs (M16)
cert = "../pki/csms.pem"
key = "../pki/csms.key"

[signing]
key = "signing.key"           # Ed25519: the gateway trusts it as `{signer.name}`
"""
    )
    # --force rewrites the files but keeps the seed: boards made with it must still onboard
    held = gwconfig.load(gateway_toml).devices.factory_seed if gateway_toml.exists() else None
    seed = held or secrets.token_bytes(32)
    devpki.write_private(
        gateway_toml,
        f"""# The site gateway (docs/gateway.md), written by `python -m tools.siteinit`.
# Holds the factory seed: keep it 0600.
[site]
id = {_toml_str(site_id)}
data_dir = "gateway"          # relative to this file
local_csms_cert = "pki/localcsms.pem"

[lan]
listen = {_toml_str(lan_listen)}

[metrics]
listen = {_toml_str(metrics_listen)}

[upstream]
address = {_toml_str(csms_address)}
server_name = "csms"          # the name in the CSMS's certificate
ca = "pki/ca.pem"
cert = "pki/gateway.pem"
key = "pki/gateway.key"
signers = {{ {_toml_str(signer.name)} = "{signer.public.hex()}" }}

[devices]
# Boards onboard with HMAC-SHA256(factory_seed, device id as UTF-8): the key a board maker
# puts on each board (`python -m tools.board --factory-seed ...` derives it).
factory_seed = "{seed.hex()}"
# M13: who may onboard with a factory key. "registered" (the safe default): only devices the
# operator registered (at the CSMS, or `python -m gateway devices register ID`); this
# development site lets any board holding a factory key onboard.
onboarding = "any"
{_roaming(root, ca, roaming, roaming_port, f"{site.country}*{site.party}*O", site_party)}""".encode(),
    )
    # the files must be what the parts accept: a wrong one fails here, not at first start
    cfg = csms_config.load(csms_toml)
    if not (cfg.ca.exists() and cfg.ca_key.exists() and cfg.cert.exists() and cfg.key.exists()):
        raise InitError("csms.toml names PKI files that were not written")
    gwconfig.load(gateway_toml)
    return SiteFiles(root, csms_toml, gateway_toml, seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.siteinit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("dir", type=Path, help="folder of the site's files (made if absent)")
    ap.add_argument("--site", default=DEFAULT_SITE, help=f"the site's global id (default {DEFAULT_SITE})")
    ap.add_argument("--csms-address", default="127.0.0.1:4433", help="where the CSMS listens (UDP)")
    ap.add_argument("--lan-listen", default="127.0.0.1:7700", help="where the gateway listens for boards (TCP)")
    ap.add_argument("--metrics-listen", default="127.0.0.1:9700", help="the gateway's /status and /metrics")
    ap.add_argument("--force", action="store_true", help="write csms.toml and gateway.toml anew")
    ap.add_argument("--roaming", choices=MODES, help="also the IEC 63119 endpoints (CSO, home CSP, clearing house)")
    ap.add_argument("--roaming-port", type=int, default=4434, help="UDP ports of the CSO, CSP, CH from here")
    ap.add_argument("--site-party", help="the gateway's party id at its CSO's endpoint (default CC*ST1*O)")
    a = ap.parse_args(argv)
    try:
        made = init(a.dir, a.site, a.csms_address, a.lan_listen, a.metrics_listen, force=a.force,
                    roaming=a.roaming, roaming_port=a.roaming_port, site_party=a.site_party)  # fmt: skip
    except (InitError, OSError) as e:
        print(f"siteinit: {e}", file=sys.stderr)
        return 2
    print(f"site {a.site} initialised in {made.root}")
    print(f"  CSMS:    evedge-csms --config {made.csms_toml}")
    print(f"  gateway: python -m gateway --config {made.gateway_toml}")
    print(f"  a board: python -m tools.board --gw {a.lan_listen} --id DEVICE-ID --gateway-config {made.gateway_toml}")
    if a.roaming:
        for key in ("cso", "csp", "ch"):
            print(f"  roaming {key}: evedge-roaming --role {key} --config {made.root / 'roaming' / f'{key}.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
