"""The real site of tests/scenarios/realsite.py with the gateway's OCPP 2.0.1 northbound on,
against `ocpp_csms.OcppCsms` (the `ocpp` library's CSMS), started before the site so that the
boards' first BootNotification is the OCPP CSMS's to answer. The native CSMS runs beside it, as
an operator migrating from one to the other would run them; the invariants are realsite's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ocpp_csms import PASSWORD, OcppCsms
from realsite import Invariants, check_billing

from tools.board import Board
from tools.site.campaign import GatewayProcess
from tools.site.harness import Site, board_wait, factory_key
from tools.site.invariants import Checker, Sampler, configured_limits

OcppFn = Callable[[Site, OcppCsms, Invariants], Awaitable[None]]


def ocpp_section(tmp: Path, csms: OcppCsms, **extra: Any) -> dict[str, Any]:
    pw = tmp / "ocpp-password"
    pw.write_text(PASSWORD + "\n")
    os.chmod(pw, 0o600)
    return {"url": csms.url, "password_file": str(pw), "timeout_s": 5.0, "backoff_max_s": 0.5, **extra}


def ocpp_scenario(tmp: Path, fn: OcppFn, boards: int = 1, csms: OcppCsms | None = None,
                  ocpp: dict[str, Any] | None = None,
                  gateway_extra: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
    async def main() -> None:
        oc = await (csms or OcppCsms()).start()
        extra = {**(gateway_extra or {}), "ocpp": ocpp_section(tmp, oc, **(ocpp or {}))}
        site = Site(tmp, boards, gateway_extra=extra)
        inv = Invariants(site)
        broken: list[str] = []
        try:
            await site.start()
            await asyncio.gather(*(board_wait(b, "registration") for b in site.boards))
            inv.declare_configured()
            inv.sampler.start()
            await fn(site, oc, inv)
            await inv.sampler.stop()
            await inv.sampler.round()
            if inv.billing:
                broken += await check_billing(site)
        finally:
            await inv.sampler.stop()
            await site.close()
            await oc.stop()
        broken = inv.checker.violations + broken
        assert not broken, "invariants broken:\n" + "\n".join(broken)

    asyncio.run(main())


class ProcessSite:
    """The OCPP site with the gateway as a real `python -m gateway` process (tools/site/campaign.py's
    `GatewayProcess`), so that a scenario can `kill -9` it: the native CSMS, the OCPP CSMS, the
    gateway process, real boards; `close()` stops them all."""

    def __init__(self, tmp: Path, boards: int = 1, csms: OcppCsms | None = None) -> None:
        self.tmp = tmp
        self.site = Site(tmp, boards)
        self.csms = csms or OcppCsms()
        self.gw: GatewayProcess | None = None
        self.boards: list[Board] = []
        self.checker = Checker()
        self.sampler = Sampler(lambda: self.boards, self._registration, self.checker)

    def _registration(self) -> dict[str, str]:
        csms = self.site.csms
        return (
            {}
            if csms is None
            else {r["device_id"]: r["registration"] for r in csms.api.stations() if r["registration"]}
        )

    async def start(self, **ocpp: Any) -> ProcessSite:
        await self.csms.start()
        s = self.site
        await s.start_csms()
        doc = s.gateway_doc()
        doc["ocpp"] = ocpp_section(self.tmp, self.csms, **ocpp)
        configured_limits(self.checker, doc)
        self.gw = GatewayProcess(self.tmp / "gateway.toml", doc)
        await asyncio.to_thread(self.gw.start)
        for did in s.devices:
            b = Board(self.tmp / "boards" / did, self.gw.ports["lan"], did, factory_key(s.seed, did))
            self.boards.append(b.start())
        await asyncio.gather(*(board_wait(b, "registration", lambda e: e["status"] == 0) for b in self.boards))
        self.sampler.start()
        return self

    async def close(self) -> list[str]:
        """Stops everything; the invariants broken meanwhile."""
        await self.sampler.stop()
        for b in self.boards:
            b.stop()
        if self.gw is not None:
            await asyncio.to_thread(self.gw.stop)
        await self.site.stop_csms()
        await self.csms.stop()
        return self.checker.violations
