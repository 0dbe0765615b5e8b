"""The real site a scenario runs on (DESIGN.md, "Proof on the real chain"): the CSMS, the
gateway and real MicroPython boards of tools/site/harness.py, free ports, with the invariants
of tools/site/invariants.py sampled for the whole scenario.

    def test_e1_…(tmp_path):
        async def fn(site: Site, inv: Invariants) -> None:
            ...  # act as the actor does, assert what the world sees
        scenario(tmp_path, fn, boards=2)

`scenario` starts the site (every board registered), starts the sampler, runs `fn`, then
checks billing (every transaction that ended billed once) and fails the test with every
invariant that broke. The limits of the gateway's configuration are declared from the start;
a scenario that sets another limit through an actor's interface declares it with
`inv.limit(watts, devices, deadline_s)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from evedge_csms.api import Csms
from gateway.schema import Registration
from tools.site.harness import Site, board_status, board_step, board_wait, until
from tools.site.invariants import Checker, Limit, Sampler, billing_faults, configured_limits

__all__ = ["Invariants", "Site", "api", "charge", "scenario", "site_id"]


def site_id(site: Site) -> str:
    """The site's id (the gateway's configuration names it)."""
    assert site.gw is not None
    return site.gw.cfg.site.id


def api(site: Site) -> Csms:
    """The CSMS operator's interface: where most scenarios' actors start."""
    assert site.csms is not None
    return site.csms.api


async def charge(site: Site, i: int, token: str, ms: int = 600_000, *, token_type: int | None = None,
                 unplug: bool = True) -> dict[str, Any]:  # fmt: skip
    """The driver at board i: presents `token` (a card, or with `token_type` the EV's contract),
    accepted; plugs in; charges `ms` of simulated time; unplugs unless told not to. The
    transaction's last event: `tx_ended`, or `tx_started` while it stays open."""
    b = site.boards[i]
    m = b.mark()
    b.cmd("card", token=token, **({} if token_type is None else {"type": token_type}))
    assert (await board_wait(b, "auth", since=m))["status"] == 0
    b.cmd("plug")
    started = await board_wait(b, "tx_started", since=m)
    await board_status(b, lambda st: st["power_w"] > 0)
    await board_step(b, ms)
    if not unplug:
        return dict(started)
    b.cmd("unplug")
    return dict(await board_wait(b, "tx_ended", since=m))


class Invariants:
    """The scenario's handle on the invariants: declare limits, read what was seen."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.checker = Checker()
        self.sampler = Sampler(lambda: site.boards, self._registration, self.checker)
        self.billing = True
        """Check billing at the end (a scenario about a transaction that must not be billed yet,
        e.g. one left running on purpose, still is: only ended ones are checked)."""

    def _registration(self) -> dict[str, str]:
        csms = self.site.csms
        if csms is None:
            return {}
        try:
            return {r["device_id"]: r["registration"] for r in csms.api.stations() if r["registration"]}
        except sqlite3.ProgrammingError:  # the scenario stopped the CSMS: its decisions stand as they were
            return {}

    def limit(self, watts: int, devices: Iterable[str] | None = None, deadline_s: float = 3.0,
              what: str = "") -> Limit:  # fmt: skip
        """A limit the scenario has just put in force through an actor's interface: from
        `deadline_s` on, the boards `devices` (None: all) together draw at most `watts`."""
        return self.checker.limit(watts, devices, time.monotonic() + deadline_s, what)

    def lift(self, lim: Limit) -> None:
        """`lim` is no longer in force (a higher one replaced it, it expired)."""
        lim.end = time.monotonic()

    async def settle(self) -> None:
        """One more round of probes, now (e.g. right after a state the scenario wants checked)."""
        await self.sampler.round()

    def declare_configured(self) -> None:
        """The site and zone limits of the gateway's configuration, in force from the start."""
        configured_limits(self.checker, self.site.gateway_doc())


def ended_at_boards(site: Site) -> list[tuple[str, object]]:
    return [(b.device_id, e["tx_id"]) for b in site.boards for e in b.all("tx_ended")]


async def check_billing(site: Site, timeout: float = 20.0) -> list[str]:
    """The billing faults once the books have settled: waits (up to `timeout`) until every
    transaction a board ended is ended and billed at the CSMS, then reports what is wrong."""
    csms = site.csms
    assert csms is not None
    api = csms.api

    def faults() -> list[str]:
        return billing_faults(api.sessions(), api.billed_transactions(), ended_at_boards(site))

    with contextlib.suppress(TimeoutError):  # what is still wrong then is the verdict
        await until(lambda: not faults(), timeout, "billing settled")
    return faults()


def scenario(tmp: Path, fn: Callable[[Site, Invariants], Awaitable[None]], boards: int = 2,
             gateway_extra: dict[str, dict[str, Any]] | None = None, roaming: bool | str = False,
             registered: bool = True, evses: int | Sequence[int] = 1, visited: bool = False) -> None:  # fmt: skip
    """Runs `fn` on a real site of `boards` boards under `tmp`, with the invariants sampled;
    fails with every broken invariant. `registered`: wait until every board is accepted by
    the CSMS before `fn` (False: a scenario about onboarding itself). `evses`: the EVSEs of
    every board, or of each board in order. `roaming`: True (mixed mode) or the roaming mode
    (peer_to_peer, clearing_house, mixed). `visited`: a third home CSP `site.csp3` roaming
    through `site.csp` (CSP↔CSP roaming, peer to peer only)."""

    async def main() -> None:
        mode = roaming if isinstance(roaming, str) else "mixed"
        site = Site(tmp, boards, gateway_extra=gateway_extra, roaming=bool(roaming), evses=evses, roaming_mode=mode,
                    visited=visited)  # fmt: skip
        inv = Invariants(site)
        broken: list[str] = []
        try:
            await site.start()
            if registered:
                accepted = int(Registration.ACCEPTED)
                await asyncio.gather(*(board_wait(b, "registration", lambda e: e["status"] == accepted)
                                       for b in site.boards))  # fmt: skip
            inv.declare_configured()
            inv.sampler.start()
            await fn(site, inv)
            await inv.sampler.stop()
            await inv.sampler.round()
            if inv.billing:
                broken += await check_billing(site)
        finally:
            await inv.sampler.stop()
            await site.close()
        chk = inv.checker
        for line in chk.excursions[:20]:
            print("excursion (within settle time unless listed below):", line)
        print(f"invariants: {chk.samples} sample rounds, {len(chk.excursions)} excursions")
        broken = chk.violations + broken
        assert not broken, "invariants broken:\n" + "\n".join(broken)

    asyncio.run(main())
