"""CSP↔CSP roaming (IEC 63119-1, a visited CSP) over real HTTP/3 on loopback, peer to peer: a
CSO, the visited CSP `csp` (VisitedCspEndpoint) and a home CSP `csp3` that has an agreement
with `csp` only (testbed.network `visited=(("csp3", "csp"),)`). Unit tests of the endpoints
against the in-memory operator; the proof on the real chain is
tests/scenarios/test_roaming_visited.py. R1-2, R1-3, R2-1, R2-2, R3-1, R3-2, R3-3, R3-4, R3-5,
R3-6, R3-7, R3-8, R3-9 (with a wrong SDR disputed), R3-10, R4-2, R5-2, R5-3, M10 through the
visited CSP; and the bad input of the new paths: a CSO message at the home directly, a partner
sending for a party it does not serve or with the wrong role, a CSP that is not a partner, a
duplicate SDR, a partner listing another party's card, a partner deleting a customer of the visited
CSP (M10), a second visited CSP speaking for a CSO
the home reaches through the first, a list of too many pages — each a named refusal that
changes nothing. Wider networks (`run_wide`: two partners, two visited CSPs, two CSOs) for the
cases that need them."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from evedge_roaming import pricing
from evedge_roaming.__main__ import build
from evedge_roaming.ch import ClearingHouse
from evedge_roaming.config import ConfigError, EndpointConfig, PartyConfig, dump, load
from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.cso import CsoEndpoint
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.endpoint import Endpoint
from evedge_roaming.operator import MemoryOperator
from evedge_roaming.testbed import (
    CSO,
    CSP,
    EVSES,
    LOCATION,
    FakeClock,
    lose_answer,
    network,
    restart_on_port,
    start_endpoints,
)
from evedge_roaming.visited import VisitedCspEndpoint
from gateway import schema
from gateway.protocol.roaming import auth
from gateway.protocol.roaming.client import PREFIX, MaybeDelivered, RoamingError
from gateway.protocol.roaming.http3 import H3Client, H3Error, TlsFiles
from tools.site.harness import until

CSP3 = "DE*HC3*O"
TARIFF = {"tariff_id": 7, "operator_id": CSO, "price_kwh": 45, "currency": "EUR", "price_session": 50}
pytestmark = pytest.mark.timeout(30)


@dataclass
class Net:
    cfgs: dict[str, EndpointConfig]
    clock: FakeClock
    cso: CsoEndpoint
    csp: VisitedCspEndpoint
    csp3: CspEndpoint
    ch: ClearingHouse

    def endpoints(self) -> dict[str, Endpoint]:
        return {"cso": self.cso, "csp": self.csp, "csp3": self.csp3, "ch": self.ch}

    def snapshots(self) -> dict[str, Any]:
        return {k: ep.store.snapshot() for k, ep in self.endpoints().items()}


@asynccontextmanager
async def running(folder: Path) -> AsyncIterator[Net]:
    cfgs = network(folder, "peer_to_peer", party_ids={"csp3": CSP3}, visited=(("csp3", "csp"),))
    clock = FakeClock()
    op = MemoryOperator.one_site(CSO, LOCATION, list(EVSES))
    net = Net(cfgs, clock, CsoEndpoint(cfgs["cso"], op, clock=clock), VisitedCspEndpoint(cfgs["csp"], clock=clock),
              CspEndpoint(cfgs["csp3"], clock=clock), ClearingHouse(cfgs["ch"], clock=clock))  # fmt: skip
    net.cfgs = await start_endpoints(net.endpoints())
    try:
        yield net
    finally:
        for ep in net.endpoints().values():
            await ep.stop()


def run(tmp_path: Path, fn: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path) as net:
            await fn(net)

    asyncio.run(main())


async def listed(net: Net, uid: str) -> None:
    """A customer of the home CSP whose list reaches the CSO through the visited CSP (R4-2)."""
    net.csp3.add_customer(uid)
    await net.csp3.distribute_tokens("differential")
    await net.csp.tick()  # the visited CSP's next round: its list, with the partner's tokens


async def billed(net: Net, sid: str, energy: int = 4000) -> dict[str, Any]:
    """The CSO reports progress and the end of a session: the SDR at the CSO."""
    net.clock.advance(60)
    await net.cso.session_progress(sid, energy // 2, 7000)
    net.clock.advance(60)
    return await net.cso.session_ended(sid, energy)


def test_the_network_gives_the_home_csp_an_agreement_with_its_visited_csp_only(tmp_path: Path) -> None:
    cfgs = network(tmp_path, "peer_to_peer", party_ids={"csp3": CSP3}, visited=(("csp3", "csp"),))
    assert [(p.party_id, p.visited) for p in cfgs["csp3"].parties] == [(CSP, True)]
    assert [p.party_id for p in cfgs["csp"].partners()] == [CSP3]
    cso_view = cfgs["cso"].party(CSP)
    assert cso_view is not None and cso_view.serves == (CSP3,) and cfgs["cso"].party(CSP3) is None
    assert cfgs["ch"].party(CSP3) is None
    (tmp_path / "csp.toml").write_text(dump(cfgs["csp"], relative_to=tmp_path))
    (tmp_path / "cso.toml").write_text(dump(cfgs["cso"], relative_to=tmp_path))
    assert load(tmp_path / "csp.toml").partners()[0].party_id == CSP3  # the keys survive TOML
    assert load(tmp_path / "cso.toml").provider(CSP3) == cso_view
    # `evedge-roaming --role csp` runs a CSP with partners as their visited CSP, the others plain
    assert type(build("csp", load(tmp_path / "csp.toml"))) is VisitedCspEndpoint
    assert type(build("csp", cfgs["csp3"])) is CspEndpoint
    with pytest.raises(ValueError, match="peer to peer"):
        network(tmp_path, "mixed", party_ids={"csp3": CSP3}, visited=(("csp3", "csp"),))
    with pytest.raises(ConfigError, match="serves"):
        EndpointConfig(CSP, "csp", tmp_path, tmp_path, tmp_path, tmp_path,
                       parties=(cso_view.__class__(CSO, "cso", "x", "00", serves=(CSP3,)),))  # fmt: skip


def test_r1_2_r1_3_r2_1_r2_2_the_csos_publications_reach_the_home_through_the_visited_csp(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        loc = json.loads(net.csp3.store.get("SELECT body FROM locations WHERE location_id=?", LOCATION)[0])
        assert loc["operator_id"] == CSO  # passed on unchanged
        net.clock.advance(1)
        await net.cso.publish_status(EVSES[0], "occupied")
        assert net.csp3.store.get("SELECT status FROM evse_status WHERE evse_gid=?", EVSES[0])[0] == "occupied"
        await net.cso.publish_tariff(TARIFF)
        assert net.csp3.tariffs(CSO)[7].price_kwh == 45  # the CSO's price, unchanged
        assert net.csp3.counterpart(CSO) == CSP
        net.csp3.store.exec("DELETE FROM tariffs")
        pulled = await net.csp3.pull_tariffs(CSO)  # R2-2 through the visited CSP
        assert pulled["status"] == "accepted" and 7 in net.csp3.tariffs(CSO)

    run(tmp_path, fn)


def test_r3_1_r3_5_r3_6_r3_9_a_partner_card_is_authorized_by_its_home_and_billed_there(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        card = "DE*HC3*CCARD00003"  # in no list: the CSO routes it by its provider (the visited CSP serves it)
        net.csp3.add_customer(card)
        got = await net.cso.token_presented(EVSES[0], card)
        assert got["auth_status"] == "accepted" and got["result"] == "accepted", got
        sid = got["roaming_session_id"]
        link = net.csp.link(sid)
        assert link is not None and link.home == CSP3 and link.home_session != sid
        assert net.csp3.session(link.home_session)["cso"] == CSP
        # privacy: the card went CSO → visited CSP → home, and nowhere else
        assert net.cso.store.all("SELECT party FROM shared WHERE token_uid=?", card)[0][0] == CSP
        assert {r[0] for r in net.csp.store.all("SELECT party FROM shared WHERE token_uid=?", card)} == {CSO, CSP3}
        assert net.ch.store.get("SELECT COUNT(*) FROM routed")[0] == 0
        sdr = await billed(net, sid)
        assert sdr["status"] == "accepted"
        assert net.csp3.readings(link.home_session)[-1][1] == 4000  # R3-6, R3-5: the home's own record
        (ours,) = net.csp.store.all("SELECT verdict FROM sdrs")
        assert ours[0] == "matched"
        (theirs,) = net.csp3.store.all("SELECT sdr_id, body, verdict FROM sdrs")
        body = json.loads(theirs["body"])
        assert theirs["verdict"] == "matched" and body["roaming_session_id"] == link.home_session
        assert theirs["sdr_id"].startswith(CSP[:-1] + "R") and body["cost"] == sdr["cost"] == 50 + 4000 * 45 // 1000
        done = net.csp.link(sid)
        assert done is not None and (done.state, done.sdr_id) == ("forwarded", theirs["sdr_id"])
        # a duplicate: the CSO bills the session again under another SDR id: refused, nothing changes
        before = net.snapshots()
        again = json.loads(net.csp.store.get("SELECT body FROM sdrs")[0]) | {"sdr_id": "DE*CSO*RDUP0001"}
        with pytest.raises(RoamingError) as e:
            await net.cso.send("PutSdr", again, CSP)
        assert (e.value.status, e.value.cause) == (409, "duplicate_sdr")
        # … and the visited CSP forwarding the home's SDR twice under another id
        twice = json.loads(theirs["body"]) | {"sdr_id": CSP[:-1] + "RDUP0002"}
        with pytest.raises(RoamingError) as e:
            await net.csp.send("PutSdr", twice, CSP3)
        assert (e.value.status, e.value.cause) == (409, "duplicate_sdr")
        after = net.snapshots()
        for k in before:
            assert after[k] == before[k], k

    run(tmp_path, fn)


def test_r4_2_the_partners_list_reaches_the_cso_and_an_offline_session_is_billed_to_the_home(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        await listed(net, "04PART01")
        row = net.cso.store.get("SELECT party, auth_status FROM token_cache WHERE token_uid=?", "04PART01")
        assert tuple(row) == (CSP, "accepted")  # under the visited CSP's party: the CSO knows no other
        # the CSO's site authorized it from the list: the CSO opens the session itself
        sid = net.cso.adopt_session(EVSES[0], "04PART01", int(net.clock()))
        assert sid is not None and net.cso.session(sid)["csp"] == CSP
        await billed(net, sid, 3000)
        link = net.csp.link(sid)
        assert link is not None and link.home == CSP3 and link.state == "forwarded"
        (theirs,) = net.csp3.store.all("SELECT body, verdict FROM sdrs")
        assert theirs["verdict"] == "matched" and json.loads(theirs["body"])["energy_wh"] == 3000
        assert [e for _, e in net.csp3.readings(link.home_session)] == [1500, 3000]  # every reading, in order
        # a token gone from the home's list goes from the CSO's too
        net.csp3.store.exec("DELETE FROM customers")
        await net.csp3.distribute_tokens("differential")
        await net.csp.tick()
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04PART01'") is None

    run(tmp_path, fn)


def test_r3_2_r3_4_the_home_starts_and_stops_remotely_through_the_visited_csp(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        net.csp3.add_customer("APP-3")
        start = await net.csp3.start_remote(EVSES[0], "APP-3")
        assert start["result"] == "accepted", start
        home_sid = start["roaming_session_id"]
        row = net.csp.store.get("SELECT session_id FROM partner_sessions WHERE home_session=?", home_sid)
        sid = str(row[0])
        assert net.cso.session(sid)["csp"] == CSP
        stop = await net.csp3.stop_remote(home_sid)
        assert stop["result"] == "accepted", stop
        await billed(net, sid, 2000)
        (theirs,) = net.csp3.store.all("SELECT verdict, session_id FROM sdrs")
        assert tuple(theirs) == ("matched", home_sid)

    run(tmp_path, fn)


def test_m10_a_deletion_at_the_home_reaches_the_visited_csp_and_the_cso_and_back(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await listed(net, "04DEL001")
        await listed(net, "04DEL002")
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04DEL001'") is not None
        await net.csp3.delete_user("04DEL001")
        assert net.csp.store.one("SELECT 1 FROM partner_tokens WHERE token_uid='04DEL001'") is None
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04DEL001'") is None
        for ep in net.endpoints().values():
            assert ep.store.one("SELECT 1 FROM shared WHERE token_uid='04DEL001'") is None

    run(tmp_path, fn)


def test_m10_a_csos_deletion_blanks_its_sessions_at_both_csps_but_ends_no_contract(tmp_path: Path) -> None:
    """Started at the CSO: the visited CSP blanks that CSO's records and keeps the partner's list
    entry; the home is told only of a card that had a session of that CSO through us, and blanks
    what it holds through the visited CSP — it keeps the customer (a CSO ends no contract)."""

    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        await listed(net, "04DEL002")  # charged at the CSO
        await listed(net, "04DEL003")  # only listed
        sid = (await net.cso.token_presented(EVSES[0], "04DEL002"))["roaming_session_id"]
        await billed(net, sid)
        link = net.csp.link(sid)
        assert link is not None
        home_before = net.csp3.store.all("SELECT * FROM customers ORDER BY token_uid")
        partner_before = net.csp.store.all("SELECT * FROM partner_tokens ORDER BY token_uid")
        assert await net.cso.delete_user("04DEL002") >= 3  # the CSO, the visited CSP, the home
        assert await net.cso.delete_user("04DEL003") >= 1
        assert net.csp.session(sid)["token_uid"] is None and net.csp3.session(link.home_session)["token_uid"] is None
        for ep in (net.csp, net.csp3):
            assert "04DEL002" not in json.dumps([r[0] for r in ep.store.all("SELECT body FROM sdrs")])
        assert net.csp.store.all("SELECT * FROM partner_tokens ORDER BY token_uid") == partner_before
        assert net.csp3.store.all("SELECT * FROM customers ORDER BY token_uid") == home_before
        assert net.csp3.store.one("SELECT 1 FROM shared WHERE token_uid='04DEL003'") is not None  # never told
        assert not any(ep.jobs() or ep.jobs("refused") for ep in net.endpoints().values())

    run(tmp_path, fn)


def test_bad_input_of_the_visited_paths_is_refused_by_name_and_changes_nothing(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await listed(net, "04GOOD01")
        net.csp.add_customer("04OWN001")  # one of the visited CSP's own customers, on its list
        await net.csp.tick()
        before = net.snapshots()

        async def refused(coro: Awaitable[Any], status: int, cause: str) -> None:
            with pytest.raises(RoamingError) as e:
                await coro
            assert (e.value.status, e.value.cause) == (status, cause), e.value
            after = net.snapshots()
            for k in before:
                assert after[k] == before[k], (cause, k)

        tokens = [{"token_uid": "04EVIL01", "auth_status": "accepted", "party_id": CSP3}]
        other = {"party_id": "DE*XXX*O", "list_version": 9, "update_type": "full", "tokens": tokens}
        # a partner sending a list for a party it does not serve, or tokens of another party
        await refused(net.csp3.send("TokenList", other, CSP), 403, "party_mismatch")
        foreign = [t | {"party_id": "DE*XXX*O"} for t in tokens]
        mine = {"party_id": CSP3, "list_version": 9, "update_type": "full", "tokens": foreign}
        await refused(net.csp3.send("TokenList", mine, CSP), 403, "party_mismatch")
        # a partner in the CSO's role (wrong role) or stopping a session not its own
        ask = {"token_uid": "04GOOD01", "evse_gid": EVSES[0], "token_type": "rfid"}
        await refused(net.csp3.send("AuthorizeRoaming", ask, CSP), 403, "not_allowed")
        stop = {"roaming_session_id": "DE*HC3*SNOTMINE01"}
        await refused(net.csp3.send("RemoteStop", stop, CSP), 404, "unknown_session")
        start = {"evse_gid": EVSES[0], "token_uid": "04GOOD01", "roaming_session_id": "DE*HCP*SNOTYOURS1"}
        await refused(net.csp3.send("RemoteStart", start, CSP), 403, "not_your_session")
        start = {"evse_gid": "DE*ZZZ*E1-1", "token_uid": "04GOOD01", "roaming_session_id": "DE*HC3*SMINE0001"}
        await refused(net.csp3.send("RemoteStart", start, CSP), 404, "unknown_evse")
        # a partner deleting a customer of the visited CSP's own (M10: never its card)
        await refused(net.csp3.send("DeleteUserData", {"token_uid": "04OWN001", "party_id": CSP3}, CSP), 403,
                      "not_shared")  # fmt: skip
        # the home's own card list sent back to it as a CSO's message has no route
        await refused(net.csp.send("TokenList", mine | {"party_id": CSP, "tokens": []}, CSP3), 404, "unknown_message")
        # a CSP with an agreement that is not a partner may not roam through us
        cfg = net.csp.cfg
        net.csp.cfg = replace(cfg, parties=tuple(replace(p, partner=False) for p in cfg.parties))
        start = {"evse_gid": EVSES[0], "token_uid": "04GOOD01", "roaming_session_id": "DE*HC3*SMINE0002"}
        await refused(net.csp3.send("RemoteStart", start, CSP), 403, "not_partner")
        net.csp.cfg = cfg
        # the visited CSP publishing for a CSO the home has an agreement with itself
        home = net.csp3.cfg
        net.csp3.cfg = replace(home, parties=(*home.parties, PartyConfig(CSO, "cso", "x", "00")))
        loc = json.loads(net.csp.store.get("SELECT body FROM locations")[0])
        await refused(net.csp.send("PutLocation", loc, CSP3), 403, "party_mismatch")
        net.csp3.cfg = home
        # a partner's contract certificate asked for at an EVSE that is not the asking CSO's
        cert = {"evse_gid": "DE*ZZZ*E1-1", "action_15118": "install", "exi": "eA==", "contract_id": "DE*HC3*C00000007"}
        await refused(net.cso.send("ContractCertificate", cert, CSP), 403, "party_mismatch")
        # a CSO message at the home directly: the home has no agreement with the CSO
        status, body = await raw_from_cso(net, CSP3, "EvseStatusUpdate",
                                          {"evse_gid": EVSES[0], "evse_status": "available", "time": 1})  # fmt: skip
        assert (status, body["error"]) == (403, "unknown_party")
        after = net.snapshots()
        assert after["csp3"] == before["csp3"]

    run(tmp_path, fn)


async def raw_from_cso(net: Net, port_of: str, message: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A request from the CSO (its own certificate) to a party it has no agreement with."""
    cfg = net.cfgs["cso"]
    port = next(ep.port for ep in net.endpoints().values() if ep.me == port_of)
    http = H3Client("127.0.0.1", port, TlsFiles(cfg.ca, cfg.cert, cfg.key))
    data = json.dumps(body).encode()
    h = auth.sign(secrets.token_bytes(32), "POST", PREFIX + message, auth.Route(CSO), data, now=net.clock())
    h[auth.H_AUTH] = "Bearer x"
    try:
        r = await http.request("POST", PREFIX + message, h, data)
    finally:
        await http.close()
    return r.status, json.loads(r.body)


def test_r3_7_r3_10_r5_2_r5_3_plans_and_unlocks_of_the_home_pass_through_the_visited_csp(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        net.csp3.add_customer("APP-3")
        start = await net.csp3.start_remote(EVSES[0], "APP-3")
        home_sid = start["roaming_session_id"]
        sid = str(net.csp.store.get("SELECT session_id FROM partner_sessions WHERE home_session=?", home_sid)[0])
        plan = await net.csp3.send_plan(home_sid, [{"start_s": 0, "limit_w": 4000}])  # R3-7
        assert plan["status"] == "accepted" and plan["plan"][0]["limit_w"] == 4000, plan
        again = await net.cso.update_plan(sid, [{"start_s": 0, "limit_w": 2000}])  # R3-10: the CSO replans
        assert again["status"] == "accepted"
        kept = json.loads(net.csp3.store.get("SELECT plan FROM plans WHERE session_id=?", home_sid)[0])
        assert kept[0]["limit_w"] == 2000
        assert (await net.csp3.unlock(EVSES[1], None, "cable stuck"))["result"] == "accepted"  # R5-3
        assert (await net.csp3.unlock(EVSES[0], home_sid, "cable stuck"))["result"] == "accepted"  # R5-2
        assert net.csp3.session(home_sid)["state"] == "unlocked" and net.cso.session(sid)["state"] == "stopping"

    run(tmp_path, fn)


def test_s7_r3_3_a_partners_contract_certificate_is_issued_by_its_home_through_the_visited_csp(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        contract = "DE*HC3*C00012345"
        net.csp3.add_customer("04PNC003", contract_id=contract)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, contract)])
        der = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        answer = await net.cso.contract_certificate(EVSES[0], "install", der.public_bytes(serialization.Encoding.DER))
        assert answer["status"] == "accepted", answer
        verify_chain(split_chain(answer["exi"]), net.csp3.mo.root)  # issued by the home's MO sub-CA
        assert tuple(net.csp3.store.get("SELECT contract_id, cso FROM contract_certs")) == (contract, CSP)
        assert net.csp.store.one("SELECT 1 FROM contract_certs") is None  # the visited CSP issues none

    run(tmp_path, fn)


def test_r3_8_a_partners_reservation_under_an_id_of_the_visited_csp_expires_at_the_home(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        expiry = int(net.clock()) + 600
        assert (await net.csp.reserve(EVSES[1], "04OWN001", expiry, 41))["result"] == "accepted"
        net.csp3.add_customer("04RES003")
        assert (await net.csp3.reserve(EVSES[0], "04RES003", expiry, 41))["result"] == "accepted"  # the same id
        ids = {r[0] for r in net.cso.store.all("SELECT reservation_id FROM reservations WHERE csp=?", CSP)}
        assert len(ids) == 2 and 41 in ids  # the partner's under another id of the visited CSP
        net.clock.advance(601)
        await net.cso.expire_reservations()
        q = "SELECT state FROM reservations WHERE reservation_id=41"
        assert net.csp3.store.get(q)[0] == "expired" and net.csp.store.get(q)[0] == "expired"

    run(tmp_path, fn)


def test_r3_9_a_wrong_sdr_is_flagged_at_both_csps_and_the_homes_dispute_reaches_the_cso(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        card = "DE*HC3*CWRONG0001"
        net.csp3.add_customer(card)
        sid = (await net.cso.token_presented(EVSES[0], card))["roaming_session_id"]
        net.clock.advance(120)
        await net.cso.session_progress(sid, 4000, 7000)
        started = int(net.cso.session(sid)["started"])
        wrong = [pricing.Line(started, int(net.clock()), 4500, 7)]  # its transactions add up to more
        sdr = await net.cso.session_ended(sid, 4000, lines=wrong)
        link = net.csp.link(sid)
        assert link is not None and link.state == "forwarded"
        assert str(net.csp.store.get("SELECT verdict FROM sdrs")[0]).startswith("mismatch")
        home_sdr, verdict = net.csp3.store.get("SELECT sdr_id, verdict FROM sdrs")
        assert verdict.startswith("mismatch"), verdict
        answer = await net.csp3.dispute(home_sdr)
        assert answer["status"] == "accepted"
        row = net.cso.store.get("SELECT csp, reason FROM disputes WHERE sdr_id=?", sdr["sdr_id"])
        assert row[0] == CSP and row[1] == verdict[:120]
        with pytest.raises(RoamingError) as e:  # a dispute of an SDR the partner never got
            await net.csp3.send("DisputeSdr", {"sdr_id": CSP[:-1] + "RNONE0001", "roaming_session_id":
                                               link.home_session, "reason": "x"}, CSP)  # fmt: skip
        assert (e.value.status, e.value.cause) == (404, "unknown_sdr")

    run(tmp_path, fn)


def test_a_csp_with_partners_must_run_as_a_visited_csp(tmp_path: Path) -> None:
    cfgs = network(tmp_path, "peer_to_peer", party_ids={"csp3": CSP3}, visited=(("csp3", "csp"),))
    with pytest.raises(ConfigError, match="VisitedCspEndpoint"):
        CspEndpoint(cfgs["csp"])


def test_r3_9_the_sdr_to_a_home_that_is_down_is_delivered_in_order_once_it_is_back(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        card = "DE*HC3*CDOWN00001"
        net.csp3.add_customer(card)
        sid = (await net.cso.token_presented(EVSES[0], card))["roaming_session_id"]
        link = net.csp.link(sid)
        assert link is not None
        await net.csp3.stop()  # the home is away while the session is billed
        await billed(net, sid, 5000)
        waiting = net.csp.link(sid)
        assert waiting is not None and waiting.state == "billed"
        assert str(net.csp.store.get("SELECT verdict FROM sdrs")[0]) == "matched"  # our own audit stands
        net.csp3 = CspEndpoint(net.cfgs["csp3"], clock=net.clock)
        await restart_on_port(net.csp3)
        net.clock.advance(net.csp.RETRY_CAP_S)
        await net.csp.tick()  # the background loop's round: the readings it missed, then the SDR
        done = net.csp.link(sid)
        assert done is not None and done.state == "forwarded"
        (theirs,) = net.csp3.store.all("SELECT verdict FROM sdrs")
        assert theirs[0] == "matched"
        assert net.csp3.readings(link.home_session)[-1][1] == 5000

    run(tmp_path, fn)


# ---- wider networks: two partners, two visited CSPs, two CSOs
CSO2, CSP2, CSP4 = "DE*CS2*O", "DE*CP2*O", "DE*HC4*O"


@dataclass
class Wide:
    eps: dict[str, Endpoint]
    clock: FakeClock

    def __getitem__(self, key: str) -> Any:  # the endpoint of a network key (Any: each test knows its type)
        return self.eps[key]

    def snapshots(self) -> dict[str, Any]:
        return {k: ep.store.snapshot() for k, ep in self.eps.items()}


def evse_of(operator: str) -> str:
    return operator[:-1] + "E1-1"


def run_wide(tmp_path: Path, visited: tuple[tuple[str, str], ...], fn: Callable[[Wide], Awaitable[None]]) -> None:
    """A peer-to-peer network of the keys in `visited` and a second CSO `cso2`: each CSO
    with one location of one EVSE (`evse_of`), a CSP with partners as a visited CSP."""
    ids = {"csp3": CSP3, "csp4": CSP4, "csp2": CSP2, "cso2": CSO2}
    keys = {k for pair in visited for k in pair} | {"cso2"}

    async def main() -> None:
        cfgs = network(tmp_path, "peer_to_peer", party_ids={k: v for k, v in ids.items() if k in keys},
                       visited=visited)  # fmt: skip
        clock = FakeClock()
        eps: dict[str, Endpoint] = {}
        for key, cfg in cfgs.items():
            if cfg.role == "cso":
                op = MemoryOperator.one_site(cfg.party_id, cfg.party_id[:-1] + "L1", [evse_of(cfg.party_id)])
                eps[key] = CsoEndpoint(cfg, op, clock=clock)
            elif cfg.role == "ch":
                eps[key] = ClearingHouse(cfg, clock=clock)
            else:
                eps[key] = (VisitedCspEndpoint if cfg.partners() else CspEndpoint)(cfg, clock=clock)
        await start_endpoints(eps)
        try:
            await fn(Wide(eps, clock))
        finally:
            for ep in eps.values():
                await ep.stop()

    asyncio.run(main())


def same(before: dict[str, Any], after: dict[str, Any], why: str) -> None:
    for k, v in before.items():
        assert after[k] == v, (why, k)


def test_a_partner_may_not_take_over_another_partys_card_and_our_own_customers_come_first(tmp_path: Path) -> None:
    async def fn(w: Wide) -> None:
        visited, csp3, csp4 = w["csp"], w["csp3"], w["csp4"]
        visited.add_customer("04OURS01")
        csp3.add_customer("04THEIR1")
        await csp3.distribute_tokens("full")
        before = w.snapshots()
        for uid, why in [("04THEIR1", "another partner's card"), ("04OURS01", "the visited CSP's customer"),
                         ("DE*HC3*C00000001", "a contract of another provider")]:  # fmt: skip
            page = {"party_id": CSP4, "list_version": 1, "update_type": "full",
                    "tokens": [{"token_uid": uid, "auth_status": "accepted", "party_id": CSP4}]}  # fmt: skip
            with pytest.raises(RoamingError) as e:
                await csp4.send("TokenList", page, CSP)
            assert (e.value.status, e.value.cause, e.value.field) == (403, "party_mismatch", "tokens[0].token_uid")
            same(before, w.snapshots(), why)
        assert visited.store.get("SELECT party FROM partner_tokens WHERE token_uid='04THEIR1'")[0] == CSP3
        # … its own cards, and its own contracts, are taken
        mine = [{"token_uid": u, "auth_status": "accepted"} for u in ("04HC4001", "DE*HC4*C00000001")]
        ok = {"party_id": CSP4, "list_version": 1, "update_type": "full", "tokens": mine}
        assert (await csp4.send("TokenList", ok, CSP))["status"] == "accepted"

    run_wide(tmp_path, (("csp3", "csp"), ("csp4", "csp")), fn)


def test_an_offline_session_of_our_own_customer_listed_by_a_partner_too_is_billed_as_ours(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        await listed(net, "04BOTH01")  # the partner listed it first; then it became our customer too
        net.csp.add_customer("04BOTH01")
        sid = net.cso.adopt_session(EVSES[0], "04BOTH01", int(net.clock()))
        assert sid is not None
        await billed(net, sid, 3000)
        assert net.csp.link(sid) is None  # ours: no partner session, nothing sent to the partner
        assert net.csp3.store.one("SELECT 1 FROM sdrs") is None
        assert net.csp3.store.one("SELECT 1 FROM sessions") is None

    run(tmp_path, fn)


def test_a_second_visited_csp_may_not_take_over_a_cso_the_home_reaches_through_the_first(tmp_path: Path) -> None:
    async def fn(w: Wide) -> None:
        home, cso = w["csp3"], w["cso"]
        await cso.publish_locations()  # to both visited CSPs: the first to pass it on is the CSO's route
        route = home.counterpart(CSO)
        assert route in (CSP, CSP2)
        other = w["csp2" if route == CSP else "csp"]
        loc = json.loads(home.store.get("SELECT body FROM locations WHERE operator_id=?", CSO)[0])
        before = w.snapshots()
        asks: list[tuple[str, dict[str, Any]]] = [
            ("PutLocation", loc),
            ("PushTariff", TARIFF),
            ("EvseStatusUpdate", {"evse_gid": evse_of(CSO), "evse_status": "occupied", "time": int(w.clock())}),
            ("AuthorizeRoaming", {"token_uid": "DE*HC3*C00000009", "evse_gid": evse_of(CSO), "token_type": "rfid"}),
        ]
        for message, body in asks:
            with pytest.raises(RoamingError) as e:
                await other.send(message, body, CSP3)
            assert (e.value.status, e.value.cause) == (403, "party_mismatch"), message
            same(before, w.snapshots(), message)
        assert home.counterpart(CSO) == route  # remote starts, reservations and cards still go there

    run_wide(tmp_path, (("csp3", "csp"), ("csp3", "csp2")), fn)


def test_a_failed_session_notice_is_passed_on_only_for_the_senders_own_session_and_the_status_to_all(
    tmp_path: Path,
) -> None:
    async def fn(w: Wide) -> None:
        cso, cso2, visited, csp3, csp4 = w["cso"], w["cso2"], w["csp"], w["csp3"], w["csp4"]
        await cso.publish_locations()
        await cso2.publish_locations()
        card = "DE*HC3*CFAIL0001"
        csp3.add_customer(card)
        sid = (await cso.token_presented(evse_of(CSO), card))["roaming_session_id"]
        link = visited.link(sid)
        assert link is not None
        # another CSO names that session failed at an EVSE of its own: nothing reaches the home
        w.clock.advance(1)
        forged = {"evse_gid": evse_of(CSO2), "evse_status": "available", "time": int(w.clock()),
                  "reason": f"session {sid} failed: forged"}  # fmt: skip
        await cso2.send("EvseStatusUpdate", forged, CSP)
        assert csp3.session(link.home_session)["state"] == "active"
        assert all(sid not in str(r[0]) and link.home_session not in str(r[0])
                   for r in csp3.store.all("SELECT reason FROM evse_status WHERE reason IS NOT NULL"))  # fmt: skip
        # its own CSO's notice: the home hears of its session by its own id, the other partner the status only
        w.clock.advance(1)
        real = forged | {"evse_gid": evse_of(CSO), "time": int(w.clock()), "reason": f"session {sid} failed: no EV"}
        await cso.send("EvseStatusUpdate", real, CSP)
        assert csp3.session(link.home_session)["state"] == "failed"
        q = "SELECT status, reason FROM evse_status WHERE evse_gid=?"
        assert tuple(csp3.store.get(q, evse_of(CSO))) == ("available", f"session {link.home_session} failed: no EV")
        assert tuple(csp4.store.get(q, evse_of(CSO))) == ("available", None)  # R1-3: its view is current

    run_wide(tmp_path, (("csp3", "csp"), ("csp4", "csp")), fn)


def test_r3_9_the_visited_csps_sdr_ids_are_its_own_and_two_csos_cannot_make_them_collide(tmp_path: Path) -> None:
    async def fn(w: Wide) -> None:
        cso, cso2, visited, csp3 = w["cso"], w["cso2"], w["csp"], w["csp3"]
        for c in (cso, cso2):
            await c.publish_locations()
        sids = []
        for i, c in enumerate((cso, cso2)):
            card = f"DE*HC3*CCOLL000{i}"
            csp3.add_customer(card)
            sids.append((await c.token_presented(evse_of(c.me), card))["roaming_session_id"])
        w.clock.advance(60)
        first = await cso.session_ended(sids[0], 1000)
        # the second CSO's SDR id has the same local part as the first's (by chance, or on purpose)
        cso2.store.exec("UPDATE sessions SET sdr_id=? WHERE session_id=?",
                        CSO2[:-1] + first["sdr_id"].rsplit("*", 1)[-1], sids[1])  # fmt: skip
        await cso2.session_ended(sids[1], 1000)
        links = [visited.link(s) for s in sids]
        assert [x.state if x else None for x in links] == ["forwarded", "forwarded"]
        ours = [x.sdr_id for x in links if x is not None]
        assert len(set(ours)) == 2 and csp3.store.get("SELECT COUNT(*) FROM sdrs")[0] == 2
        assert all(o is not None and o.rsplit("*", 1)[-1] != first["sdr_id"].rsplit("*", 1)[-1] for o in ours)

    run_wide(tmp_path, (("csp3", "csp"),), fn)


def test_r3_2_a_remote_start_whose_answer_was_lost_is_kept_and_billed(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        net.csp3.add_customer("APP-3")
        lose_answer(net.csp, CSO, "RemoteStart")  # the CSO started it; the visited CSP never heard so
        start = await net.csp3.start_remote(EVSES[0], "APP-3")
        assert start["result"] == "timeout", start
        home_sid = start["roaming_session_id"]
        assert net.csp3.session(home_sid)["state"] == "active"  # kept: it may have started (it did)
        sid = str(net.csp.store.get("SELECT session_id FROM partner_sessions WHERE home_session=?", home_sid)[0])
        assert net.cso.session(sid)["csp"] == CSP
        await billed(net, sid, 2000)
        link = net.csp.link(sid)
        assert link is not None and link.state == "forwarded"
        assert tuple(net.csp3.store.get("SELECT verdict, session_id FROM sdrs")) == ("matched", home_sid)
        # … and the home's own RemoteStart whose answer it lost: kept, billed like any
        lose_answer(net.csp3, CSP, "RemoteStart")
        with pytest.raises(MaybeDelivered):  # the retry could not connect: still maybe started
            await net.csp3.start_remote(EVSES[1], "APP-3", session_id="DE*HC3*SLOST0001")
        assert net.csp3.session("DE*HC3*SLOST0001")["state"] == "active"
        sid = str(net.csp.store.get("SELECT session_id FROM partner_sessions WHERE home_session=?",
                                    "DE*HC3*SLOST0001")[0])  # fmt: skip
        await billed(net, sid, 1000)
        assert net.csp3.store.get("SELECT verdict FROM sdrs WHERE session_id='DE*HC3*SLOST0001'")[0] == "matched"
        # a start surely refused keeps nothing: the visited CSP knows no such EVSE (its own
        # 404 unknown_evse), and the CSO refuses an EVSE it does not have (404 unknown_evse)
        for evse, session in (("DE*ZZZ*E1-1", "DE*HC3*SNONE0001"), (CSO[:-1] + "E9-9", "DE*HC3*SNONE0002")):
            with pytest.raises(RoamingError) as e:
                await net.csp3.start_remote(evse, "APP-3", session_id=session)
            assert (e.value.status, e.value.cause) == (404, "unknown_evse"), evse
            assert net.csp3.store.one("SELECT 1 FROM sessions WHERE session_id=?", session) is None

    run(tmp_path, fn)


def test_r3_2_a_start_the_visited_csp_could_not_send_keeps_nothing_at_either_csp(tmp_path: Path) -> None:
    """The visited CSP's login at the CSO gets no answer: no RemoteStart left it, so it keeps no
    link and answers 502 `unreachable`; the home keeps no `active` session either."""

    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        net.csp3.add_customer("APP-3")
        await net.csp3.client(CSP).login()  # the home's own login is not what fails here
        before = net.snapshots()

        async def no_login() -> str:
            raise H3Error("no answer to PlatformLogin within its timeout")

        net.csp.client(CSO).login = no_login  # type: ignore[method-assign]
        with pytest.raises(RoamingError) as e:
            await net.csp3.start_remote(EVSES[0], "APP-3", session_id="DE*HC3*SNOLOGIN1")
        assert (e.value.status, e.value.cause) == (502, "unreachable")
        same(before, net.snapshots(), "login failed")

    run(tmp_path, fn)


def test_r3_2_a_retried_remote_start_waits_for_the_first_and_is_never_taken_as_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The home's RemoteStart times out while the visited CSP still waits for the CSO; the
    client's automatic retry arrives during the first: it waits for it (one lock per idempotency
    key) and gets its answer — not 409, which the home would take for "nothing started" and drop
    the session the CSO then bills. A repeat after a first that left no answer (the visited CSP
    stopped mid-start) is answered `timeout`: outcome unknown, the session kept."""
    spec = schema.MESSAGE_BY_NAME["RemoteStart"]
    monkeypatch.setitem(schema.MESSAGE_BY_NAME, "RemoteStart", spec._replace(timeout_ms=400))

    async def fn(net: Net) -> None:
        await net.cso.publish_locations()
        await net.cso.publish_tariff(TARIFF)
        net.csp3.add_customer("APP-3")
        real = net.csp.send

        async def slow(message: str, body: dict[str, Any], to: str, *, origin: str = "") -> dict[str, Any]:
            if message == "RemoteStart":  # held until the home's client, timed out, retried: the
                # retry waits on the first's idempotency lock
                await until(lambda: any(n >= 2 for _, n in net.csp._keyed.values()), 10, "the home's retry")
            return await real(message, body, to, origin=origin)

        net.csp.send = slow  # type: ignore[method-assign]
        start = await net.csp3.start_remote(EVSES[0], "APP-3", session_id="DE*HC3*SRETRY001")
        assert start["result"] == "accepted", start  # the first's answer, to the retry
        assert net.csp.store.get("SELECT COUNT(*) FROM partner_sessions")[0] == 1
        assert net.csp._keyed == {}  # no lock left behind
        sid = str(net.csp.store.get("SELECT session_id FROM partner_sessions")[0])
        await billed(net, sid, 1500)
        assert net.csp3.store.get("SELECT verdict FROM sdrs WHERE session_id='DE*HC3*SRETRY001'")[0] == "matched"
        # the link is there, the stored answer is not (lost with a restart mid-start)
        net.csp.send = real  # type: ignore[method-assign]
        net.csp.store.exec("DELETE FROM idempotency WHERE key='DE*HC3*SRETRY001'")
        again = await net.csp3.send("RemoteStart", {"evse_gid": EVSES[0], "token_uid": "APP-3",
                                                   "roaming_session_id": "DE*HC3*SRETRY001"}, CSP)  # fmt: skip
        assert again["result"] == "timeout", again
        assert net.csp.store.get("SELECT COUNT(*) FROM partner_sessions")[0] == 1

    run(tmp_path, fn)


def test_a_partners_token_list_is_bounded_and_compared_only_when_it_changed(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        tokens = [{"token_uid": "04PAGE01", "auth_status": "accepted"}]
        base = {"party_id": CSP3, "update_type": "full", "tokens": tokens}
        before = net.snapshots()
        too_many = net.csp.cfg.max_list_pages + 1  # the configured bound (max_list_pages), as at a CSO
        with pytest.raises(RoamingError) as e:
            await net.csp3.send("TokenList", base | {"list_version": 5, "page": 0, "pages": too_many}, CSP)
        assert (e.value.status, e.value.cause, e.value.field) == (413, "too_large", "pages")
        same(before, net.snapshots(), "too_large")
        # an unfinished version is dropped when a newer one arrives
        await net.csp3.send("TokenList", base | {"list_version": 5, "page": 0, "pages": 2}, CSP)
        await net.csp3.send("TokenList", base | {"list_version": 6, "page": 0, "pages": 3}, CSP)
        assert [tuple(r) for r in net.csp.store.all("SELECT version, page FROM partner_pages")] == [(6, 0)]
        # the background loop compares our list with the CSOs' only after a change
        await listed(net, "04DIRTY1")
        calls = 0
        real = net.csp.list_entries

        def counted() -> dict[str, tuple[str, int | None]]:
            nonlocal calls
            calls += 1
            return real()

        net.csp.list_entries = counted  # type: ignore[method-assign]
        for _ in range(3):
            await net.csp.tick()
        assert calls == 0
        net.csp.add_customer("04OWNNEW")
        await net.csp.tick()
        assert calls >= 1 and net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04OWNNEW'") is not None

    run(tmp_path, fn)


def test_a_partner_removed_from_the_configuration_is_no_longer_listed_under_our_id(tmp_path: Path) -> None:
    async def fn(net: Net) -> None:
        await listed(net, "04GONE01")
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04GONE01'") is not None
        cfg = net.cfgs["csp"]
        cfg = replace(cfg, parties=tuple(p for p in cfg.parties if p.party_id != CSP3))
        await net.csp.stop()
        net.csp = VisitedCspEndpoint(cfg, clock=net.clock)  # restarted without that agreement
        await restart_on_port(net.csp)
        await net.csp.tick()
        assert "04GONE01" not in net.csp.list_entries()
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04GONE01'") is None
        assert net.csp._home_of("04GONE01") is None  # its card is asked of nobody

    run(tmp_path, fn)


def test_r4_2_a_partners_versions_sent_downwards_pile_up_nothing(tmp_path: Path) -> None:
    """Bounds, as at a CSO: the latest page a partner sends is all we stage of its lists in
    the making (before, versions sent downwards, V, V−1, V−2 …, each kept their pages until
    the retention purge)."""

    async def fn(net: Net) -> None:
        one = [{"token_uid": "04DOWN01", "auth_status": "accepted"}]
        base = {"party_id": CSP3, "update_type": "full", "tokens": one, "page": 0, "pages": 3}
        for version in (30, 29, 28, 27):
            await net.csp3.send("TokenList", base | {"list_version": version}, CSP)
        assert [tuple(r) for r in net.csp.store.all("SELECT version, page FROM partner_pages")] == [(27, 0)]
        assert net.csp.store.one("SELECT 1 FROM partner_tokens WHERE token_uid='04DOWN01'") is None

    run(tmp_path, fn)


def test_an_older_store_with_colliding_sdr_ids_is_upgraded_and_the_endpoint_starts(tmp_path: Path) -> None:
    """Upgrade: SDR ids derived from the CSOs' could collide in a store of before; the unique
    index is made once the duplicates have fresh ids (the one the home has keeps its own)."""

    async def fn(net: Net) -> None:
        cfg = net.csp.cfg
        await net.csp.stop()
        db = sqlite3.connect(cfg.db)
        db.execute("DROP INDEX partner_sessions_sdr")  # the store as it was before the index
        rows = [("S1", "forwarded"), ("S2", "billed"), ("S3", "refused")]
        for sid, state in rows:
            db.execute("INSERT INTO partner_sessions(session_id, home, home_session, cso, state, sdr_id, created)"
                       " VALUES(?,?,?,?,?,?,0)", (sid, CSP3, "H" + sid, CSO, state, "DE*CSP*RSAME"))  # fmt: skip
        db.commit()
        db.close()
        net.csp = VisitedCspEndpoint(cfg, clock=net.clock)  # started on that store: no IntegrityError
        await restart_on_port(net.csp)
        ids = {str(r[0]): str(r[1]) for r in net.csp.store.all("SELECT session_id, sdr_id FROM partner_sessions")}
        assert ids["S1"] == "DE*CSP*RSAME" and len(set(ids.values())) == 3
        assert net.csp.store.one("SELECT 1 FROM sqlite_master WHERE name='partner_sessions_sdr'") is not None

    run(tmp_path, fn)


def test_a_failed_distribution_of_the_partners_tokens_is_tried_again(tmp_path: Path) -> None:
    """The list is marked changed again on any failure of the distribution, not only a
    partner's refusal or absence: the change is not left unsent until the next one."""

    async def fn(net: Net) -> None:
        await listed(net, "04FAIL01")
        net.csp3.add_customer("04FAIL02")
        await net.csp3.distribute_tokens("differential")
        real = net.csp.distribute_tokens

        async def broken(update_type: str = "full") -> dict[str, Any]:
            raise ValueError("a bug in the distribution")

        net.csp.distribute_tokens = broken  # type: ignore[method-assign]
        with pytest.raises(ValueError):
            await net.csp.tick()
        net.csp.distribute_tokens = real  # type: ignore[method-assign]
        net.clock.advance(net.csp.RETRY_BASE_S + 1)
        await net.csp.tick()
        assert net.cso.store.one("SELECT 1 FROM token_cache WHERE token_uid='04FAIL02'") is not None

    run(tmp_path, fn)
