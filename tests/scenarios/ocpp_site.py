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

from tools.site.harness import Site, board_wait

OcppFn = Callable[[Site, OcppCsms, Invariants], Awaitable[None]]


def ocpp_section(tmp: Path, csms: OcppCsms, **extra: Any) -> dict[str, Any]:
    pw = tmp / "ocpp-password"
    pw.write_text(PASSWORD + "\n")
    os.chmod(pw, 0o600)
    return {"url": csms.url, "password_file": str(pw), "timeout_s": 5.0, "backoff_max_s": 0.5, **extra}


def ocpp_scenario(tmp: Path, fn: OcppFn, boards: int = 1, csms: OcppCsms | None = None,
                  ocpp: dict[str, Any] | None = None) -> None:  # fmt: skip
    async def main() -> None:
        oc = await (csms or OcppCsms()).start()
        site = Site(tmp, boards, gateway_extra={"ocpp": ocpp_section(tmp, oc, **(ocpp or {}))})
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
