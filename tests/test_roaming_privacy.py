"""Privacy routing (M10, R3-1, R4-1) in each mode: a card number goes only to its home CSP —
known from its token list, or the provider prefix of a contract id — never to every CSP; the
clearing house routes without keeping card numbers; a deletion started at any party reaches
every party that held the data."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from evedge_roaming.testbed import CSP, EVSES, Net, running
from gateway.protocol import gid

MODES = ["peer_to_peer", "clearing_house", "mixed"]
TARIFF = {"tariff_id": 7, "operator_id": "DE*CSO*O", "price_kwh": 45, "currency": "EUR"}
pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("mode", MODES)]


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await scenario(net)

    asyncio.run(main())


def held(net: Net, uid: str) -> dict[str, bool]:
    return {role: uid in json.dumps(ep.store.snapshot()) for role, ep in net.endpoints().items()}


def test_r3_1_a_card_whose_home_is_unknown_goes_to_no_csp(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04KNOWN1")  # a customer, but no list tells the CSO or the CH
        answer = await net.cso.token_presented(EVSES[0], "04KNOWN1")
        assert answer["auth_status"] == "unknown"
        assert net.csp.store.get("SELECT COUNT(*) FROM sessions")[0] == 0  # the CSP was never asked
        assert held(net, "04KNOWN1") == {"cso": False, "csp": True, "ch": False}
        # an operator whose CSPs all agreed may ask each of them (the old behaviour, opt-in)
        net.cso.cfg = replace(net.cso.cfg, token_discovery="ask_every_csp")
        net.ch.cfg = replace(net.ch.cfg, token_discovery="ask_every_csp")
        assert (await net.cso.token_presented(EVSES[0], "04KNOWN1"))["auth_status"] == "accepted"

    run(tmp_path, mode, scenario)


def test_r3_3_a_contract_id_goes_only_to_its_provider(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04PNC", contract_id="DE*CSP*CA2B3C4D5")
        # the ISO 15118 spelling with its check digit, no list needed: the prefix names the home
        emaid = "DECSPCA2B3C4D5" + gid.check_digit("DECSPCA2B3C4D5")
        answer = await net.cso.token_presented(EVSES[0], emaid, "iso15118")
        assert answer["auth_status"] == "accepted" and answer["result"] == "accepted"
        # a contract of a provider the CSO has no agreement with is sent nowhere
        other = await net.cso.token_presented(EVSES[1], "FR*XYZ*C00000001", "iso15118")
        assert other["auth_status"] == "unknown"
        assert not any(held(net, "FR*XYZ*C00000001").values())

    run(tmp_path, mode, scenario)


def test_r4_1_the_clearing_house_routes_a_card_without_keeping_it(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        net.csp.add_customer("04PRIV01")
        await net.csp.distribute_tokens()
        net.cso.store.exec("DELETE FROM token_cache")  # the CSO lost its copy: only the CH can route
        answer = await net.cso.token_presented(EVSES[0], "04PRIV01")
        expected = "unknown" if mode == "peer_to_peer" else "accepted"
        assert answer["auth_status"] == expected
        if mode != "peer_to_peer":
            sid = answer["roaming_session_id"]
            await net.cso.session_progress(sid, 1000, 7000)
            await net.cso.session_ended(sid, 1000)
            assert net.ch.store.get("SELECT token_uid FROM sdrs")[0] is None  # settlement needs none
        assert held(net, "04PRIV01")["ch"] is False

    run(tmp_path, mode, scenario)


def test_m10_a_deletion_started_at_the_cso_reaches_every_party(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        net.csp.add_customer("04GONE01")
        await net.csp.distribute_tokens()
        sid = (await net.cso.token_presented(EVSES[0], "04GONE01"))["roaming_session_id"]
        await net.cso.session_progress(sid, 1000, 7000)
        await net.cso.session_ended(sid, 1000)
        assert held(net, "04GONE01") == {"cso": True, "csp": True, "ch": False}
        assert await net.cso.delete_user("04GONE01") >= 2
        assert net.cso.jobs() == []  # every hand-on acknowledged
        assert held(net, "04GONE01") == {"cso": False, "csp": False, "ch": False}
        assert net.csp.session(sid)["token_uid"] is None

    run(tmp_path, mode, scenario)


def test_m10_a_deleted_card_is_no_longer_routed_by_the_clearing_house(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04GONE02")
        await net.csp.distribute_tokens()
        await net.csp.delete_user("04GONE02")
        assert net.ch.store.get("SELECT COUNT(*) FROM token_homes")[0] == 0
        assert CSP not in [r[0] for r in net.ch.store.all("SELECT csp FROM token_homes")]

    run(tmp_path, mode, scenario)
