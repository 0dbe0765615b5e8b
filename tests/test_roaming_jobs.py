"""Durable jobs (M10 DeleteUserData hand-ons, CH Settlements) and reservation expiry (R3-8):
a peer that is down gets what it missed when it is back, even after the sender restarted,
and a repeated delivery changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from evedge_roaming.endpoint import Endpoint, retry_delay
from evedge_roaming.testbed import CSO, CSP, EVSES, Net, running

pytestmark = pytest.mark.timeout(30)
TARIFF = {"tariff_id": 5, "operator_id": CSO, "price_kwh": 40, "currency": "EUR"}


async def until(cond: Callable[[], bool], seconds: float = 12.0) -> None:
    """Wait (real time) for the endpoints' background loops to make `cond` true."""
    end = asyncio.get_running_loop().time() + seconds
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.05)


def count_ticks(ep: Endpoint) -> list[float]:
    """The times (its clock) of the rounds of `ep`'s background loop completed from now on."""
    done: list[float] = []
    tick = ep.tick

    async def counted() -> None:
        await tick()
        done.append(ep.clock())

    ep.tick = counted  # type: ignore[method-assign]
    return done


def test_backoff_is_bounded_and_jittered() -> None:
    delays = [[retry_delay(n, Endpoint.RETRY_BASE_S, Endpoint.RETRY_CAP_S) for n in range(1, 16)] for _ in range(20)]
    for run in delays:
        for n, d in enumerate(run, start=1):
            top = min(Endpoint.RETRY_CAP_S, Endpoint.RETRY_BASE_S * 2 ** (n - 1))
            assert top / 2 <= d <= top <= Endpoint.RETRY_CAP_S
    assert len({run[0] for run in delays}) > 1  # jittered


@pytest.mark.parametrize("mode", ["peer_to_peer", "clearing_house"])
def test_m10_deletion_reaches_a_peer_that_was_down(tmp_path: Path, mode: str) -> None:
    uid = "04DE1E7E99"

    async def main() -> None:
        async with running(tmp_path, mode) as net:
            net.csp.add_customer(uid)
            await net.csp.distribute_tokens()
            sid = (await net.cso.token_presented(EVSES[0], uid))["roaming_session_id"]
            await net.cso.stop()  # the CSO is down
            count = await net.csp.delete_user(uid)
            assert count >= 1  # the CSP's own records
            assert uid not in json.dumps(net.csp.store.snapshot()["customers"])
            [job] = net.csp.jobs()
            assert (job["message"], job["dest"], job["attempts"]) == ("DeleteUserData", CSO, 1)
            assert job["due"] > net.clock()  # backoff

            await net.restart("csp")  # the sender restarts: the job is in its store
            assert [j["id"] for j in net.csp.jobs()] == [job["id"]]
            await net.restart("cso")  # the CSO is back, still holding the user's data
            assert net.cso.session(sid)["token_uid"] == uid
            net.clock.advance(Endpoint.RETRY_CAP_S + 1)
            await until(lambda: net.csp.jobs() == [])  # the background loop delivered it
            assert net.cso.session(sid)["token_uid"] is None
            assert uid not in json.dumps(net.cso.store.snapshot())
            assert uid not in json.dumps(net.csp.store.snapshot())
            assert uid not in json.dumps(net.ch.store.snapshot())

            before = net.cso.store.snapshot()  # a repeat (lost answer) changes nothing
            again = await net.csp.send("DeleteUserData", {"token_uid": uid, "party_id": CSP}, CSO)
            assert again == {"status": "accepted", "count": 0}
            assert net.cso.store.snapshot() == before
            assert net.csp.jobs() == [] and net.cso.jobs() == []

    asyncio.run(main())


def test_settlement_reaches_a_party_that_was_down(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "clearing_house") as net:
            await net.cso.publish_tariff(TARIFF)
            net.csp.add_customer("04SETTLE")
            await net.csp.distribute_tokens()  # the CSO and the CH learn the card's home (R4-2)
            sid = (await net.cso.token_presented(EVSES[0], "04SETTLE"))["roaming_session_id"]
            await net.cso.session_progress(sid, 3000, 7000)
            done = await net.cso.session_ended(sid, 3000)
            await net.csp.stop()  # the CSP is down when the CH settles
            settled = await net.ch.settle()
            assert [s["sdrs"] for s in settled] == [[done["sdr_id"]]]
            assert net.cso.store.get("SELECT COUNT(*) FROM settlements")[0] == 1
            assert net.ch.store.get("SELECT delivered FROM settlements")[0] == 0
            [job] = net.ch.jobs()
            assert (job["message"], job["dest"]) == ("Settlement", CSP)

            await net.restart("ch")  # the sender restarts
            await net.restart("csp")
            net.clock.advance(Endpoint.RETRY_CAP_S + 1)
            await until(lambda: net.ch.jobs() == [])
            row = net.csp.store.get("SELECT party, sdrs, amount FROM settlements")
            assert tuple(row) == (CSO, json.dumps([done["sdr_id"]]), done["cost"])
            assert net.ch.store.get("SELECT delivered FROM settlements")[0] == 1
            assert await net.ch.settle() == []

            body = {"party_id": CSO, "sdrs": [done["sdr_id"]], "amount": done["cost"], "currency": "EUR"}
            before = net.csp.store.snapshot()  # a repeat (lost answer) changes nothing
            assert (await net.ch.send("Settlement", body, CSP))["status"] == "accepted"
            assert net.csp.store.snapshot() == before
            assert net.cso.store.get("SELECT COUNT(*) FROM settlements")[0] == 1

    asyncio.run(main())


def _reservation(net: Net, ep: str, rid: int) -> str:
    store = net.cso.store if ep == "cso" else net.csp.store
    return str(store.get("SELECT state FROM reservations WHERE reservation_id=?", rid)[0])


@pytest.mark.parametrize("mode", ["peer_to_peer", "clearing_house", "mixed"])
def test_r3_8_unused_reservation_expires(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await net.cso.publish_locations()
            expiry = int(net.clock()) + 600
            assert (await net.csp.reserve(EVSES[1], "04RES1", expiry, 77))["result"] == "accepted"
            assert net.operator.evses[EVSES[1]].status == "reserved"
            other = await net.csp.start_remote(EVSES[1], "04OTHER")  # reserved for another token
            assert other["result"] == "evse_occupied" and "reservation 77" in other["reason"]

            ticks = count_ticks(net.cso)
            net.clock.advance(599)
            n = len(ticks)
            await until(lambda: len(ticks) >= n + 2)  # a whole round of the background loop after the clock moved
            assert _reservation(net, "cso", 77) == "active" and net.operator.cancelled == []
            net.clock.advance(2)  # expired unused: the background loop cancels and tells the CSP
            await until(lambda: _reservation(net, "csp", 77) == "expired" and net.cso.jobs() == [])
            assert _reservation(net, "cso", 77) == "expired"
            assert net.operator.cancelled == [77] and net.operator.evses[EVSES[1]].status == "available"
            row = net.csp.store.get("SELECT status, reason FROM evse_status WHERE evse_gid=?", EVSES[1])
            assert tuple(row) == ("available", "reservation 77 expired")

            late = await net.csp.start_remote(EVSES[1], "04RES1")  # the start the reservation was for
            assert late["result"] == "rejected" and "reservation 77 expired" in late["reason"]
            assert net.operator.evses[EVSES[1]].session is None
            assert net.cso.store.get("SELECT COUNT(*) FROM sessions")[0] == 0
            await net.cso.expire_reservations()  # a second pass changes nothing
            assert net.operator.cancelled == [77]

            # a reservation that is used does not expire
            expiry = int(net.clock()) + 600
            assert (await net.csp.reserve(EVSES[0], "04RES2", expiry, 78))["result"] == "accepted"
            assert (await net.csp.start_remote(EVSES[0], "04RES2"))["result"] == "accepted"
            assert _reservation(net, "cso", 78) == "used"
            net.clock.advance(601)
            assert await net.cso.expire_reservations() == []
            assert net.operator.cancelled == [77]

    asyncio.run(main())


def test_r3_8_expiry_at_start_when_the_loop_has_not_run_yet(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "peer_to_peer") as net:
            await net.cso.publish_locations()
            assert (await net.csp.reserve(EVSES[1], "04RES3", int(net.clock()) + 60, 90))["result"] == "accepted"
            await net.restart("cso")  # the reservation is durable
            net.clock.advance(61)
            late = await net.csp.start_remote(EVSES[1], "04RES3")  # the start itself expires it first
            assert late["result"] == "rejected" and "reservation 90 expired" in late["reason"]
            assert net.operator.cancelled == [90]
            await until(lambda: _reservation(net, "csp", 90) == "expired" and net.cso.jobs() == [])
            net.clock.advance(net.cso.EXPIRED_REFUSE_S)  # later, an ordinary start
            assert (await net.csp.start_remote(EVSES[1], "04RES3"))["result"] == "accepted"

    asyncio.run(main())
