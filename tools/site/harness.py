"""The whole chain on loopback, in one asyncio loop: a CSMS server (evedge_csms), the
site gateway (gateway.service with its command path attached) and emulated boards (real
MicroPython processes, tools.board). With `roaming=True` also the IEC 63119 roaming
endpoints, in `roaming_mode` (mixed by default; peer_to_peer, clearing_house) — the CSO's
(backed by the CSMS: `CsmsOperator`, `CsmsRoaming`), two home CSPs' (service providers A and
B, each with its own customers) and a clearing house — and the gateway's online
identification through the CSO endpoint (`gateway.localcsms.roaming`). Shared by
`python -m tools.site` and the e2e tests (docs/site.md)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from evedge_csms import config as csms_config
from evedge_csms.server import CsmsServer
from evedge_roaming import testbed
from evedge_roaming.ch import ClearingHouse
from evedge_roaming.config import EndpointConfig
from evedge_roaming.csms_operator import CsmsOperator, CsmsRoaming
from evedge_roaming.cso import CsoEndpoint
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.visited import VisitedCspEndpoint
from gateway import config as gwconfig
from gateway.localcsms.roaming import SiteRoaming
from gateway.protocol import devpki
from gateway.protocol.gid import evse_gid
from gateway.service import Gateway
from tools.board import Board

SITE_ID = "DE*EVE*LSITE1"
CSO_ID, CSP_ID, CSP_B_ID, CH_ID = "DE*EVE*O", "DE*HCP*O", "DE*HCB*O", "DE*CHX*O"
"""The site's operator (its EVSE ids are DE*EVE*E…), home CSPs A and B, a clearing house."""
CSP3_ID = "DE*HC3*O"
"""With `visited=True`: a third home CSP, roaming through A (its visited CSP) only."""
SITE_PARTY = "DE*ST1*O"
"""The site gateway's party id at its CSO roaming endpoint (role `site`)."""


T = TypeVar("T")


def factory_key(seed: bytes, device_id: str) -> bytes:
    return hmac.new(seed, device_id.encode(), hashlib.sha256).digest()


async def until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.05)


async def rebind(start: Callable[[], Awaitable[T]], what: str, timeout: float = 3.0) -> T:
    """`start()` of a server restarted on the port it read back from its first start (bound to
    port 0 then). The other side knows that port (the gateway's configuration names the CSMS's,
    the boards reconnect to the gateway's LAN port), so it is bound again rather than a new one
    taken. Safe enough: the kernel hands out ephemeral ports at random across the whole local
    range, so another program takes the one just freed, in the short time it is free, only by
    rare chance; then `start()` is retried while the port is in use, for `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            return await start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > end:
                raise OSError(e.errno, f"{what}: {e.strerror} (the port of its first start)") from e
        await asyncio.sleep(0.1)


async def board_wait(b: Board, ev: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                     timeout: float = 20.0, since: int = 0) -> dict[str, Any]:  # fmt: skip
    return await asyncio.to_thread(b.wait, ev, pred, timeout, since)


async def board_status(b: Board, pred: Callable[[dict[str, Any]], Any] | None = None,
                       timeout: float = 20.0) -> dict[str, Any]:  # fmt: skip
    """The board's first `status` answer that satisfies `pred` (the first answer when None),
    asked again every 50 ms until one does. The board carries out its control commands in
    order: an answer comes after every command sent before it took effect."""
    end = time.monotonic() + timeout
    while True:
        m = b.mark()
        b.cmd("status")
        st = await board_wait(b, "status", since=m, timeout=max(1.0, end - time.monotonic()))
        if pred is None or pred(st):
            return st
        if time.monotonic() > end:
            raise TimeoutError(f"{b.device_id}: status never satisfied the condition in {timeout} s")
        await asyncio.sleep(0.05)  # the poll's pace


async def board_step(b: Board, ms: int) -> dict[str, Any]:
    """`step`s the board's clock (its meter runs on with it) by `ms`; its status once the step
    was carried out. The board reads its control channel in order, so the first status asked
    after the step is answered after it. (Not "until its clock shows the step": the gateway is
    the board's time source, and a time sync that lands after the step sets the wall clock back
    to the gateway's, while the meter keeps the energy of the step.)"""
    m = b.mark()
    b.cmd("step", ms=ms)
    b.cmd("status")
    return await board_wait(b, "status", since=m)


class Site:
    """One site: CSMS, gateway, `n` boards (ev-0000 …), under `root`."""

    def __init__(self, root: Path, n_boards: int = 2, gateway_extra: dict[str, dict[str, Any]] | None = None,
                 roaming: bool = False, evses: int | Sequence[int] = 1,
                 roaming_mode: str = "mixed", visited: bool = False) -> None:  # fmt: skip
        """`evses`: the EVSEs of every board, or of each board in order (a twin-socket board: 2).
        `roaming_mode`: the roaming network's mode (peer_to_peer, clearing_house, mixed).
        `visited`: CSP↔CSP roaming (peer to peer): provider A is also the visited CSP of a third
        home CSP `csp3` that has no agreement with the CSO."""
        self.root = Path(root)
        self.n = n_boards
        self.evses = [evses] * n_boards if isinstance(evses, int) else list(evses)
        if len(self.evses) != n_boards:
            raise ValueError(f"evses: {len(self.evses)} counts for {n_boards} boards")
        self.seed = os.urandom(32)
        self.extra = gateway_extra or {}
        self.csms: CsmsServer | None = None
        self.gw: Gateway | None = None
        self.boards: list[Board] = []
        self.roaming = roaming
        self.roaming_mode = roaming_mode
        self.visited = visited
        self.t0 = time.monotonic()
        self.re_cfgs: dict[str, EndpointConfig] = {}
        self.cso: CsoEndpoint | None = None
        self.csp: CspEndpoint | None = None
        """Service provider A's home-CSP endpoint (`DE*HCP*O`)."""
        self.csp_b: CspEndpoint | None = None
        """Service provider B's (`DE*HCB*O`): its own credentials, HMAC key, certificate, store."""
        self.csp3: CspEndpoint | None = None
        """With `visited`: the home CSP (`DE*HC3*O`) that roams through A only."""
        self.ch: ClearingHouse | None = None
        self.bridge: CsmsRoaming | None = None
        self.site_roaming: SiteRoaming | None = None
        self.lan_port = 0
        """The gateway's LAN port, read back from its first start (0 before)."""

    def evse(self, i: int, evse: int = 1) -> str:
        """The global EVSE id of board i's EVSE `evse` (what the roaming endpoints see)."""
        return evse_gid(SITE_ID, self.devices[i], evse)

    async def start_roaming(self) -> None:
        """The CSO, two home-CSP (A, B) and CH endpoints in `roaming_mode`; the CSO's operator is
        the CSMS."""
        ids = {"cso": CSO_ID, "csp": CSP_ID, "csp2": CSP_B_ID, "ch": CH_ID}
        if self.visited:
            ids["csp3"] = CSP3_ID
        pairs = (("csp3", "csp"),) if self.visited else ()
        self.re_cfgs = testbed.network(self.root / "roaming", self.roaming_mode, party_ids=ids, sites=(SITE_PARTY,),
                                       visited=pairs)  # fmt: skip
        op = CsmsOperator(lambda: self.csms)
        self.csp = (VisitedCspEndpoint if self.visited else CspEndpoint)(self.re_cfgs["csp"])
        self.csp_b = CspEndpoint(self.re_cfgs["csp2"])
        self.ch = ClearingHouse(self.re_cfgs["ch"])
        self.cso = CsoEndpoint(self.re_cfgs["cso"], op)
        eps = {"csp": self.csp, "csp2": self.csp_b, "ch": self.ch, "cso": self.cso}
        if self.visited:
            self.csp3 = eps["csp3"] = CspEndpoint(self.re_cfgs["csp3"])
        self.re_cfgs = await testbed.start_endpoints(eps)  # ephemeral ports, then told to each other
        self.bridge = CsmsRoaming(self.cso, op).start()

    def roaming_section(self) -> dict[str, Any]:
        """The gateway's [roaming] section: the site as a party of its CSO's endpoint."""
        cfg = self.re_cfgs["cso"]
        me = cfg.party(SITE_PARTY)
        assert me is not None
        pki = self.root / "roaming" / "pki"
        # the endpoints want a client certificate, whose common name is the party the gateway is
        issued = devpki.issue(pki, "site", ca=devpki.ensure_ca(pki), subject=SITE_PARTY)
        return {
            "party_id": SITE_PARTY,
            "cso_party": CSO_ID,
            "address": f"{cfg.host}:{cfg.port}",
            "ca": str(cfg.ca),
            "cert": str(issued.cert),
            "key": str(issued.key),
            "password": me.password,
            "secret": me.secret_bytes.hex(),
        }

    @property
    def devices(self) -> list[str]:
        return [f"ev-{i:04d}" for i in range(self.n)]

    async def start_csms(self) -> CsmsServer:
        """The CSMS on an ephemeral port; started again (after `stop_csms`), on the same port:
        the gateway's configuration names it."""
        data = self.root / "csms"
        port = self.csms.port if self.csms is not None else 0
        csms = self.csms = CsmsServer(csms_config.load(data_dir=data, port=port))
        await (rebind(csms.start, "CSMS") if port else csms.start())
        return csms

    async def stop_csms(self) -> None:
        if self.csms is not None:
            await self.csms.stop()

    def gateway_doc(self) -> dict[str, Any]:
        assert self.csms is not None
        cfg = self.csms.config
        pki = self.root / "gw-pki"
        pki.mkdir(parents=True, exist_ok=True)
        issued = devpki.issue(pki, SITE_ID, ca=(cfg.ca, cfg.ca_key), server=False)
        signer_pub = (cfg.signing_key.parent / "signing.pub").read_text().strip()
        name = "csms-" + hashlib.sha256(bytes.fromhex(signer_pub)).hexdigest()[:16]
        doc: dict[str, Any] = {
            "site": {"id": SITE_ID, "data_dir": str(self.root / "gw")},
            "lan": {"listen": f"127.0.0.1:{self.lan_port}"},  # 0: ephemeral (a restart: the same)
            "metrics": {"listen": "127.0.0.1:0"},
            "devices": {"factory_seed": self.seed.hex(), "onboarding": "any"},  # test boards: no registration
            "upstream": {
                "address": f"127.0.0.1:{self.csms.port}",
                "server_name": cfg.cert.stem,
                "ca": str(cfg.ca),
                "cert": str(issued.cert),
                "key": str(issued.key),
                "idle_timeout_s": 3.0,
                "backoff_max_s": 0.5,
                "signers": {name: signer_pub},
            },
            "power": {"site_limit_w": 100000, "zone": [{"zone": 1, "limit_w": 60000, "devices": self.devices}]},
        }
        if self.roaming:
            doc["roaming"] = self.roaming_section()
        for k, v in self.extra.items():
            doc.setdefault(k, {}).update(v)
        return doc

    async def start_gateway(self) -> Gateway:
        """The gateway on an ephemeral LAN port; started again (after `self.gw.stop()`), on the
        same port: the boards reconnect there."""
        gw = self.gw = Gateway(gwconfig.prepare(gwconfig.parse(self.gateway_doc())))
        self.site_roaming = gw.roaming
        await (rebind(gw.start, "gateway LAN") if self.lan_port else gw.start())
        self.lan_port = gw.lan_port
        return gw

    def fw_signers(self) -> dict[str, bytes]:
        """The firmware signer the boards trust (M4): the CSMS's, provisioned at the factory."""
        assert self.csms is not None
        pub = (self.csms.config.signing_key.parent / "signing.pub").read_text().strip()
        return {"csms-" + hashlib.sha256(bytes.fromhex(pub)).hexdigest()[:16]: bytes.fromhex(pub)}

    def start_boards(self) -> list[Board]:
        assert self.gw is not None
        signers = self.fw_signers()
        for did, n in zip(self.devices, self.evses, strict=True):
            b = Board(self.root / "boards" / did, self.gw.lan_port, did, factory_key(self.seed, did), evses=n,
                      fw_signers=signers)  # fmt: skip
            self.boards.append(b.start())
        return self.boards

    async def start(self) -> Site:
        await self.start_csms()
        if self.roaming:
            await self.start_roaming()
        await self.start_gateway()
        self.start_boards()
        await until(lambda: self.gw is not None and self.gw.runner is not None and self.gw.runner.state == "up",
                    what="upstream up")  # fmt: skip
        await until(lambda: self.gw is not None and len(self.gw.online) == self.n, 30, "boards online")
        if self.roaming:  # the CSO endpoint knows the EVSEs the CSMS knows
            await until(lambda: self.csms is not None and len(CsmsOperator(lambda: self.csms).evses()) >= self.n, 30,
                        "EVSEs at the CSMS")  # fmt: skip
            self.record_meters()
        return self

    def record_meters(self) -> None:
        """The installer records each EVSE's meter key from the meter's label (R3-9: the home CSP
        checks the seal of every signed reading with it, as the location publishes it)."""
        assert self.csms is not None
        for b in self.boards:
            for n in range(1, b.evses + 1):
                self.csms.api.set_connector(SITE_ID, b.device_id, n, meter_key=b.meter_key(n))

    async def close(self) -> None:
        for b in self.boards:
            b.stop()
        if self.site_roaming is not None:
            await self.site_roaming.close()
        if self.gw is not None:
            await self.gw.stop()
        if self.bridge is not None:
            await self.bridge.stop()
        for ep in (self.cso, self.csp, self.csp_b, self.csp3, self.ch):
            if ep is not None and ep.server is not None:
                await ep.stop()
        await self.stop_csms()

    async def command_done(self, cmd_id: int, timeout: float = 20.0) -> dict[str, Any]:
        assert self.csms is not None
        api = self.csms.api

        def done() -> Any:
            row = api.command(cmd_id)
            return row if row is not None and row["state"] in ("done", "failed", "expired") else None

        return dict(await until(done, timeout, f"command {cmd_id} answered"))
