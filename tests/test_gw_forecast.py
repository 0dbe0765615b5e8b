"""The site's reports upstream, sans I/O and glue: the forecast (E3, gateway/localcsms/forecast.py),
the inventory (M1, gateway/localcsms/inventory.py), when they are sent
(gateway/localcsms/reports.py), and the CSMS assembling a paged BoardsReport. The proof on the
real chain is tests/scenarios/test_site_reports.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from csmsclient import TELEMETRY, running_csms, site, until

from gateway import _core
from gateway.config import PowerConfig, Zone
from gateway.localcsms.forecast import GRID_S, PERIODS_MAX, Demand, Throttle, energy_wh, forecast, steps
from gateway.localcsms.inventory import DISCOVER, PAGE_MAX, Inventory
from gateway.localcsms.reports import SiteReports
from gateway.schema import Action, ConnectorStatus, EvseStatus, Key, Kind, Registration, Status, TxEvent

SITE = "DE*EVE*LSITE1"
NOW = 1_000_000
KEY = b"k" * 32


def needs(wh: int, in_s: int | None, meter: int = 0) -> Demand:
    d = Demand()
    d.transaction(True, False, meter, 0)
    d.needs(wh, None if in_s is None else NOW + in_s)
    return d


# ---------------------------------------------------------------- the forecast (E3)
def test_e3_needs_spread_evenly_until_departure_and_open_sessions_at_their_rate() -> None:
    a = steps(needs(5_500, 3_600), NOW, 11_000)
    b = steps(needs(2_000, 1_800), NOW, 11_000)
    c = steps(Demand(drawing=True), NOW, 11_000)
    assert (a, b, c) == ((5_500, 3_600), (4_000, 1_800), (11_000, None))
    assert forecast([p for p in (a, b) if p], 100_000) == [(0, 9_500), (1_800, 5_500), (3_600, 0)]
    assert forecast([p for p in (a, c) if p], 100_000) == [(0, 16_500), (3_600, 11_000)]
    assert forecast([], 100_000) == [(0, 0)]
    assert steps(Demand(), NOW, 11_000) is None  # no transaction: nothing needed


def test_e3_needs_are_capped_by_the_rating_and_the_configured_limit() -> None:
    assert steps(needs(50_000, 3_600), NOW, 11_000) == (11_000, 3_600)  # the EV cannot get it all in time
    assert forecast([(11_000, 3_600), (11_000, None)], 15_000) == [(0, 15_000), (3_600, 11_000)]
    # no departure ahead: at its rate until the energy is delivered (rounded up)
    assert steps(needs(5_500, None), NOW, 11_000) == (11_000, 1_800)
    assert steps(needs(5_500, -60), NOW, 11_000) == (11_000, 1_800)
    # the rate: rating, else metered power, else the share of the site
    d = Demand()
    d.transaction(True, False, 0, 7_000)
    assert steps(d, NOW, 0, 3_000) == (7_000, None) and steps(Demand(drawing=True), NOW, 0, 3_000) == (3_000, None)


def test_e3_delivered_energy_is_no_longer_needed_and_the_needs_leave_with_the_session() -> None:
    d = needs(6_000, 3_600, meter=1_000)
    assert d.transaction(False, False, 3_000, 11_000) is False  # an update: nothing material
    assert d.remaining_wh() == 4_000 and steps(d, NOW, 11_000) == (4_000, 3_600)
    assert d.transaction(False, True, 3_500, 0) is True
    assert d.remaining_wh() is None and steps(d, NOW, 11_000) is None
    late = Demand()
    late.needs(2_000, NOW + 3_600)  # told at plug-in, before the transaction
    assert late.transaction(True, False, 500, 0) is True and late.remaining_wh() == 2_000


def test_e3_many_departures_fit_the_schema_on_a_coarser_grid_never_asking_less() -> None:
    parts: list[tuple[int, int | None]] = [(1_000, 600 + 97 * i) for i in range(60)]
    out = forecast(parts, 10**6)
    assert len(out) <= PERIODS_MAX and out[0] == (0, 60_000) and out[-1][1] == 0
    assert all(t % GRID_S[1] == 0 for t, _ in out)
    exact = sum(w * e for w, e in parts if e is not None) / 3_600
    assert exact <= energy_wh(out, 10**5) <= exact * 1.1


def test_e3_throttle_sends_at_once_then_coalesces_within_the_interval() -> None:
    t = Throttle(60.0)
    assert not t.due(0.0)
    t.mark()
    assert t.due(0.0)
    t.sent(0.0)
    t.mark()
    t.mark()
    assert not t.due(10.0) and t.when(10.0) == 60.0 and t.due(60.0)
    t.sent(60.0)
    t.mark(force=True)  # a new connection: the present at once
    assert t.due(61.0)


# ---------------------------------------------------------------- the inventory (M1)
def vars_answer(**vals: str) -> list[dict[int, Any]]:
    names = {n: (c, v) for c, v, n in DISCOVER}
    return [{Key.COMPONENT: names[n][0], Key.VARIABLE: names[n][1], Key.VAL: x, Key.STATUS: Status.ACCEPTED}
            for n, x in vals.items()]  # fmt: skip


def test_m1_inventory_lists_active_boards_with_what_they_are_and_their_status() -> None:
    inv = Inventory(SITE)
    boot: dict[int, Any] = {Key.MODEL: "SIM-1", Key.VENDOR: "evedge", Key.SERIAL: "S1", Key.FW_VERSION: "1.2.3"}
    assert inv.booted("ev-0000", boot) and not inv.booted("ev-0000", boot)
    assert inv.discovered("ev-0000", vars_answer(evses="2", max_power_w="11000", fw_version="1.2.4"))
    assert not inv.discovered("ev-0000", [{Key.COMPONENT: "EVSE", Key.VARIABLE: "MaxPowerW", Key.STATUS: 2}])
    inv.link("ev-0000", True)
    inv.connector("ev-0000", 2, ConnectorStatus.OCCUPIED)
    assert inv.connector("ev-0000", 0, ConnectorStatus.FAULTED)  # the whole board
    inv.connector("ev-0000", 1, ConnectorStatus.AVAILABLE)
    inv.registration("ev-0000", Registration.ACCEPTED)
    inv.link("ev-0009", False)  # known, but not active at the site any more: not listed
    e = inv.entries(["ev-0000", "ev-0001"])
    assert [(x[Key.DEVICE_ID], x[Key.EVSE], x[Key.EVSE_STATUS]) for x in e] == [
        ("ev-0000", 1, EvseStatus.AVAILABLE),
        ("ev-0000", 2, EvseStatus.OUT_OF_ORDER),
        ("ev-0001", 1, EvseStatus.UNKNOWN),  # never seen: listed with what is known
    ]
    assert e[0][Key.FW_VERSION] == "1.2.4" and e[0][Key.MAX_POWER_W] == 11_000 and e[0][Key.MODEL] == "SIM-1"
    assert e[0][Key.EVSE_GID] == "DE*EVE*ESITE1-ev-0000-1" and e[2][Key.MAX_POWER_W] == 0
    inv.link("ev-0000", False)
    assert {x[Key.EVSE_STATUS] for x in inv.entries(["ev-0000"])} == {EvseStatus.UNKNOWN}


def test_m1_a_large_site_is_reported_in_pages_each_a_valid_frame() -> None:
    inv = Inventory(SITE)
    devs = [f"ev-{i:04d}" for i in range(PAGE_MAX * 2 + 5)]
    bodies = inv.reports(devs)
    assert [(b[Key.PAGE], b[Key.PAGES], len(b[Key.EVSES])) for b in bodies] == [
        (0, 3, PAGE_MAX),
        (1, 3, PAGE_MAX),
        (2, 3, 5),
    ]
    for b in bodies:
        _core.decode(
            _core.encode(Kind.EVENT, 1, 1, 2, 0, Action.BOARDS_REPORT, b, KEY), max_frame=_core.MAX_UP_FRAME
        )  # the schema's bounds hold
    assert inv.reports([]) == [{Key.SITE_ID: SITE, Key.EVSES: []}]


def test_m1_the_csms_assembles_a_paged_report_and_names_its_fields(tmp_path: Path) -> None:
    async def main() -> None:
        inv = Inventory(SITE)
        inv.booted("ev-0000", {Key.FW_VERSION: "9.9"})
        bodies = inv.reports([f"ev-{i:04d}" for i in range(PAGE_MAX + 1)])
        async with running_csms(tmp_path / "csms") as srv, site(srv) as gw:
            for b in bodies:
                gw.send(TELEMETRY, Kind.EVENT, Action.BOARDS_REPORT, {**b, Key.SITE_ID: "site-1"})
            await until(lambda: len(srv.api.boards("site-1")) == PAGE_MAX + 1)
            rows = srv.api.boards("site-1")
            assert rows[0]["fw_version"] == "9.9" and rows[0]["evse_status"] == "unknown"
            assert rows[-1]["device_id"] == f"ev-{PAGE_MAX:04d}"
            gw.send(TELEMETRY, Kind.EVENT, Action.BOARDS_REPORT, inv.reports(["ev-0001"])[0] | {Key.SITE_ID: "site-1"})
            await until(lambda: [r["device_id"] for r in srv.api.boards("site-1")] == ["ev-0001"])  # page 0 replaces

    asyncio.run(asyncio.wait_for(main(), 25))


# ---------------------------------------------------------------- the glue
class Links:
    def __init__(self) -> None:
        self.online: dict[str, Any] = {}
        self.asked: list[tuple[str, int]] = []

    async def request(self, conn: Any, action: int, body: dict[int, Any], timeout: float,
                      prio: int | None = None) -> bytes:  # fmt: skip
        self.asked.append((conn, action))
        answer = {Key.VARS: vars_answer(max_power_w="11000")}
        return bytes(_core.encode(Kind.RESPONSE, 1, 1, 1, 0, action, answer, KEY))


def tx(event: TxEvent, energy: int = 0) -> bytes:
    body = {Key.EVENT: event, Key.TX_ID: 1, Key.SEQ_NO: 0, Key.TRIGGER: 0, Key.EVSE: 1, Key.ENERGY_WH: energy}
    return bytes(_core.encode(Kind.EVENT, 1, 1, 1, 0, Action.TRANSACTION_EVENT, body, KEY))


def test_e3_m1_reports_are_sent_on_change_at_most_once_per_interval_and_the_present_on_connect() -> None:
    async def main() -> None:
        sent: list[tuple[int, dict[int, Any]]] = []
        up = [False]
        power = PowerConfig(site_limit_w=20_000, zones=(Zone(1, 9_000, ("ev-0000",)),))
        links = Links()
        links.online["ev-0000"] = "conn-0"
        r = SiteReports(SITE, power, 0.2, links, lambda: {}, lambda: ["ev-0000"], time.time)

        def send(action: int, body: dict[int, Any]) -> bool:
            if up[0]:
                sent.append((action, body))
            return up[0]

        r.send = send
        r.booted("ev-0000", {Key.FW_VERSION: "1.0"})
        await until(lambda: r.inventory.boards["ev-0000"].max_power_w == 11_000)  # discovered
        assert links.asked == [("conn-0", Action.GET_VARIABLES)]
        r.frame("ev-0000", Action.TRANSACTION_EVENT, tx(TxEvent.STARTED))
        assert sent == []  # the uplink is down: nothing owed, nothing queued
        up[0] = True
        r.uplink_up()  # the present: the inventory, then the site's and the zone's forecasts
        assert [a for a, _ in sent] == [Action.BOARDS_REPORT, Action.SITE_FORECAST, Action.SITE_FORECAST]
        site_fc, zone_fc = sent[1][1], sent[2][1]
        assert site_fc[Key.FORECAST] == [{Key.START_S: 0, Key.LIMIT_W: 11_000}] and Key.ZONE not in site_fc
        assert zone_fc[Key.FORECAST] == [{Key.START_S: 0, Key.LIMIT_W: 9_000}] and zone_fc[Key.ZONE] == 1
        sent.clear()
        r.frame("ev-0000", Action.TRANSACTION_EVENT, tx(TxEvent.UPDATED, 100))  # not material
        r.frame("ev-0000", Action.TRANSACTION_EVENT, tx(TxEvent.ENDED, 200))
        assert sent == []  # within the interval: waits for its end
        await until(lambda: len(sent) == 2)
        assert sent[0][1][Key.FORECAST] == [{Key.START_S: 0, Key.LIMIT_W: 0}]
        await r.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_reports_interval_defaults_to_a_minute_and_a_bad_value_is_named() -> None:
    from gateway.config import ConfigError, parse

    assert parse({}).upstream.reports_interval_s == 60.0
    assert parse({"upstream": {"reports_interval_s": 0.5}}).upstream.reports_interval_s == 0.5
    with pytest.raises(ConfigError, match=r"upstream\.reports_interval_s"):
        parse({"upstream": {"reports_interval_s": 0}})
