"""A loopback roaming network: one CSO, one home CSP, one clearing house (or more endpoints
of a role: `party_ids` keys `csp2`, `csp3` …), with a dev CA, certificates and fresh secrets.
The endpoints bind ephemeral ports (`start_endpoints`: port 0, then each one is told the
ports the others bound), so that any number of networks and other programs share a machine.
Used by the tests, `--init` and the whole-site harness (tools/site).
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.protocol import devpki
from gateway.protocol.roaming import auth
from gateway.protocol.roaming.client import PREFIX, Peer, RoamingClient
from gateway.protocol.roaming.http3 import ConnectFailed, H3Client, H3Error, Response, TlsFiles

from .ch import ClearingHouse
from .config import ROLES, EndpointConfig, PartyConfig, dump
from .cso import CsoEndpoint
from .csp import CspEndpoint
from .endpoint import Endpoint
from .operator import MemoryOperator

CSO, CSP, CH = "DE*CSO*O", "DE*CSP*O", "DE*CHX*O"
PARTIES = {"cso": CSO, "csp": CSP, "ch": CH}


def free_udp_port() -> int:
    """A port free now (`--init` only: it writes configurations for processes started later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def role_of(key: str) -> str:
    """The role of a `network` key: the key without its trailing digits (`csp2` → `csp`)."""
    role = key.rstrip("0123456789")
    if role not in ROLES:
        raise ValueError(f"network key {key!r}: a role of {ROLES}, optionally numbered (csp2)")
    return role


def network(
    folder: Path,
    mode: str,
    *,
    token_lifetime_s: int = 1200,
    retention_s: int = 30 * 86400,
    party_ids: dict[str, str] | None = None,
    sites: tuple[str, ...] = (),
    ca: tuple[Path, Path] | None = None,
    visited: tuple[tuple[str, str], ...] = (),
) -> dict[str, EndpointConfig]:
    """Configurations of the endpoints (key → config), certificates issued in folder/pki.
    `party_ids` overrides the party ids (key → id) and adds endpoints: a key is a role,
    optionally numbered (`csp2`: a second service provider with its own party id,
    credentials, HMAC key, certificate `pki/csp2.pem` and store `csp2.sqlite`); endpoints of
    the same role get no agreement with each other. `sites` are party ids of the CSO's site
    gateways (role `site`, known to the CSO endpoint only; their credentials are the CSO
    configuration's `party(site)`). Every port is 0: `start_endpoints` binds ephemeral ones and
    fills them in (`with_ports` fills in given ones). `ca`: the CA (certificate, key) that
    issues the endpoints' certificates, e.g. a site's (tools.siteinit); by default one of the
    network's own in folder/pki. `visited`: CSP↔CSP agreements, (home key, visited key) pairs
    such as `("csp3", "csp")`: the home CSP roams through the visited CSP only (no agreement
    with any CSO or the CH: peer to peer only), its party entry at the visited CSP is a
    `partner`, the visited CSP's at the home is `visited`, and each CSO's entry of the
    visited CSP `serves` the home (docs/roaming.md "CSP↔CSP roaming"). A home may have
    several visited CSPs (one pair each)."""
    pki = devpki.private_dir(folder / "pki")
    ca = ca or devpki.ensure_ca(pki)
    ids = {**PARTIES, **(party_ids or {})}
    roles = list(ids)
    homes: dict[str, set[str]] = {}  # home key → its visited CSPs' keys
    for h, v in visited:
        homes.setdefault(h, set()).add(v)
    for h, v in visited:
        if role_of(h) != "csp" or role_of(v) != "csp" or h not in ids or v not in ids or v in homes:
            raise ValueError(f"visited pair {(h, v)}: two CSP keys of the network, the visited one no home itself")
    if visited and mode != "peer_to_peer":
        raise ValueError("CSP↔CSP roaming is peer to peer (in CH modes a home CSP reaches the CSO through the CH)")

    def agreed(a: str, b: str) -> bool:
        """Whether keys a and b have a roaming agreement (a pair's credentials)."""
        if a in homes or b in homes:
            return b in homes.get(a, ()) or a in homes.get(b, ())
        return role_of(a) != role_of(b)

    pair = {
        frozenset((a, b)): (secrets.token_urlsafe(12), secrets.token_hex(32))
        for i, a in enumerate(roles)
        for b in roles[i + 1 :]
    }
    out = {}
    for key, party in ids.items():
        role = role_of(key)
        issued = devpki.issue(pki, key, ca=ca, subject=party)  # the endpoints bind the CN to the party
        parties = tuple(
            PartyConfig(ids[r], role_of(r), *pair[frozenset((key, r))], host="127.0.0.1", port=0,
                        visited=r in homes.get(key, ()), partner=key in homes.get(r, ()),
                        serves=tuple(ids[h] for h, v in visited if v == r) if role == "cso" else ())
            for r in roles
            if r != key and agreed(key, r)
        )  # fmt: skip
        if role == "cso":
            parties += tuple(PartyConfig(s, "site", secrets.token_urlsafe(12), secrets.token_hex(32)) for s in sites)
        out[key] = EndpointConfig(
            party_id=party,
            role=role,
            db=folder / f"{key}.sqlite",
            cert=issued.cert,
            key=issued.key,
            ca=issued.ca,
            mode=mode,
            clearing_house=ids["ch"],
            port=0,
            token_lifetime_s=token_lifetime_s,
            retention_s=retention_s,
            parties=parties,
        )
    return out


def with_ports(cfgs: dict[str, EndpointConfig], ports: dict[str, int]) -> dict[str, EndpointConfig]:
    """The configurations with the endpoints' ports (key → port) filled in: each endpoint's own,
    and in the party entries of the others."""
    by_party = {cfgs[k].party_id: port for k, port in ports.items()}
    return {
        key: replace(
            cfg,
            port=ports.get(key, cfg.port),
            parties=tuple(replace(p, port=by_party.get(p.party_id, p.port)) for p in cfg.parties),
        )
        for key, cfg in cfgs.items()
    }


async def start_endpoints(endpoints: dict[str, Endpoint]) -> dict[str, EndpointConfig]:
    """Starts endpoints of one `network` (key → endpoint): each binds the port of its
    configuration (0: an ephemeral one); then each is given the configuration with the ports
    the others bound (before any traffic: an endpoint reads its peers' addresses when it first
    calls them). Returns those configurations (a restart binds the same port again)."""
    for ep in endpoints.values():
        await ep.start()
    cfgs = with_ports({k: ep.cfg for k, ep in endpoints.items()}, {k: ep.port for k, ep in endpoints.items()})
    for key, ep in endpoints.items():
        ep.cfg = cfgs[key]
        for c in ep.clients.values():  # none yet; one made before this would hold a port 0
            await c.close()
        ep.clients.clear()
    return cfgs


async def restart_on_port(ep: Endpoint, timeout: float = 3.0) -> Endpoint:
    """`ep.start()` on the port its configuration names, read back from an earlier start: the
    other endpoints know it. Safe enough: the kernel hands out ephemeral ports at random across
    the local range, so another program takes the one just freed, in the short time it is free,
    only by rare chance; then the start is retried while the port is in use."""
    end = time.monotonic() + timeout
    while True:
        try:
            return await ep.start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > end:
                raise
        await asyncio.sleep(0.1)


def write_network(
    folder: Path,
    mode: str,
    *,
    party_ids: dict[str, str] | None = None,
    sites: tuple[str, ...] = (),
    ca: tuple[Path, Path] | None = None,
    ports: dict[str, int] | None = None,
) -> dict[str, EndpointConfig]:
    """TOML files `folder/<key>.toml` of a network whose endpoints run as processes of their
    own, started later (returns the configurations written). Without `ports`, ports free now
    are written into them (the one place that picks ports ahead). Paths in the files are
    relative to the files, so the folder can be moved; the files hold the pairs' passwords
    and HMAC keys, so they are created 0600."""
    devpki.private_dir(folder)
    cfgs = network(folder, mode, party_ids=party_ids, sites=sites, ca=ca)
    cfgs = with_ports(cfgs, ports or {k: free_udp_port() for k in cfgs})
    for key, cfg in cfgs.items():
        devpki.write_private(folder / f"{key}.toml", dump(cfg, relative_to=folder).encode())
    return cfgs


class FakeClock:
    """A clock the tests move by hand (shared by the endpoints and test clients)."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


EVSES = ["DE*CSO*E1-1", "DE*CSO*E1-2"]
LOCATION = "DE*CSO*L1"


@dataclass
class Net:
    cfgs: dict[str, EndpointConfig]
    operator: MemoryOperator
    clock: FakeClock
    cso: CsoEndpoint
    csp: CspEndpoint
    ch: ClearingHouse

    def endpoints(self) -> dict[str, Endpoint]:
        return {"cso": self.cso, "csp": self.csp, "ch": self.ch}

    async def restart(self, role: str) -> Endpoint:
        """Stop one endpoint and start a new one on the same SQLite file and port."""
        old = self.endpoints()[role]
        await old.stop()
        new: Endpoint
        if role == "cso":
            new = self.cso = CsoEndpoint(self.cfgs[role], self.operator, clock=self.clock)
        elif role == "csp":
            new = self.csp = CspEndpoint(self.cfgs[role], clock=self.clock)
        else:
            new = self.ch = ClearingHouse(self.cfgs[role], clock=self.clock)
        return await restart_on_port(new)


@asynccontextmanager
async def running(folder: Path, mode: str, **kw: int) -> AsyncIterator[Net]:
    """The three endpoints up on loopback; stopped on exit."""
    cfgs = network(folder, mode, token_lifetime_s=kw.get("token_lifetime_s", 1200),
                   retention_s=kw.get("retention_s", 30 * 86400))  # fmt: skip
    clock = FakeClock()
    op = MemoryOperator.one_site(CSO, LOCATION, list(EVSES))
    net = Net(
        cfgs,
        op,
        clock,
        CsoEndpoint(cfgs["cso"], op, clock=clock),
        CspEndpoint(cfgs["csp"], clock=clock),
        ClearingHouse(cfgs["ch"], clock=clock),
    )
    net.cfgs = await start_endpoints(net.endpoints())
    try:
        yield net
    finally:
        for ep in net.endpoints().values():
            if ep.server is not None:
                await ep.stop()


LOCATION_BODY: dict[str, Any] = {
    "location_id": LOCATION,
    "operator_id": CSO,
    "name": "Depot",
    "latitude": 48.1,
    "longitude": 11.5,
    "evses": [{"evse_gid": EVSES[0], "evse_status": "available", "max_power_w": 22000}],
}


class Raw:
    """Hand-made requests from the CSO to a peer (the CSP by default), to break one rule at a time."""

    def __init__(self, net: Net, to: str = CSP) -> None:
        self.net = net
        party = net.cfgs["cso"].party(to)
        assert party is not None
        self.party = party
        cfg = net.cfgs["cso"]
        tls = TlsFiles(cfg.ca, cfg.cert, cfg.key)
        self.http = H3Client("127.0.0.1", self.party.port, tls)
        peer = Peer(to, "127.0.0.1", self.party.port, tls, CSO, self.party.password, self.party.secret_bytes)
        self.login = RoamingClient(CSO, peer, clock=net.clock, http=self.http)

    async def post(
        self,
        message: str,
        body: bytes | dict[str, Any],
        *,
        token: str | None = "login",
        secret: bytes | None = None,
        nonce: str | None = None,
        ts: float | None = None,
        drop: str | None = None,
    ) -> tuple[Response, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        path = PREFIX + message
        now = self.net.clock() if ts is None else ts
        h = auth.sign(secret or self.party.secret_bytes, "POST", path, auth.Route(CSO), data, now=now, nonce=nonce)
        if token == "login":
            token = await self.login.login()
        if token is not None:
            h[auth.H_AUTH] = f"Bearer {token}"
        if drop:
            del h[drop]
        r = await self.http.request("POST", path, h, data)
        return r, json.loads(r.body)


def lose_answer(ep: Endpoint, peer: str, lost: str) -> None:
    """Fault injection: `ep`'s next `lost` request to `peer` is delivered and carried out there,
    but its answer is lost with the connection, and the RoamingClient's automatic retry cannot
    connect any more: below the client, so that its retry runs as it would (the sender cannot
    know what was carried out)."""
    http = ep.client(peer).http
    real, calls = http.request, 0

    async def request(method: str, path: str, headers: dict[str, str], body: bytes = b"", *,
                      timeout: float | None = None) -> Response:  # fmt: skip
        nonlocal calls
        if not path.endswith("/" + lost):
            return await real(method, path, headers, body, timeout=timeout)
        calls += 1
        if calls == 1:
            await real(method, path, headers, body, timeout=timeout)  # carried out there
            raise H3Error(f"connection lost before the answer to {lost}")
        http.request = real  # type: ignore[method-assign]
        raise ConnectFailed(f"cannot connect to {peer} again")

    http.request = request  # type: ignore[method-assign]
