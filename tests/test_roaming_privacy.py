"""Privacy routing (M10, R3-1, R4-1) in each mode: a card number goes only to its home CSP —
known from its token list, or the provider prefix of a contract id — never to every CSP; the
clearing house routes without keeping card numbers; a deletion started at any party reaches
every party that held the data, also late (after the retention purged where the card went), and
only a party the card went to or from, or its home, may have another party delete it: any other
(another CSP, a CSO it never reached, the CH), directly or through the CH, is refused by name and
changes nothing. A CSO ends no contract: its deletion at a CSP blanks only that CSO's records
there (the customer, list entry and contract certificates stay; nothing is passed on)."""

from __future__ import annotations

import asyncio
import json
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

from evedge_roaming.ch import ClearingHouse
from evedge_roaming.cso import CsoEndpoint
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.endpoint import Endpoint
from evedge_roaming.operator import MemoryOperator
from evedge_roaming.testbed import CH, CSO, CSP, EVSES, LOCATION, FakeClock, Net, network, running, start_endpoints
from gateway.protocol import gid
from gateway.protocol.roaming.client import RoamingError

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


def contract_rows(csp: CspEndpoint) -> list[Any]:
    """A CSP's contracts with its customers: what only the CSP (or the user through it) may end."""
    return [[tuple(r) for r in csp.store.all(f"SELECT * FROM {t} ORDER BY 1")]
            for t in ("customers", "token_sent", "contract_certs")]  # fmt: skip


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


def test_m10_a_deletion_started_at_the_cso_blanks_its_sessions_at_the_home_but_ends_no_contract(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        net.csp.add_customer("04GONE01")
        await net.csp.distribute_tokens()
        sid = (await net.cso.token_presented(EVSES[0], "04GONE01"))["roaming_session_id"]
        await net.cso.session_progress(sid, 1000, 7000)
        await net.cso.session_ended(sid, 1000)
        assert held(net, "04GONE01") == {"cso": True, "csp": True, "ch": False}
        contract = contract_rows(net.csp)
        assert await net.cso.delete_user("04GONE01") >= 2
        assert net.cso.jobs() == []  # every hand-on acknowledged
        assert held(net, "04GONE01")["cso"] is False
        # at the home: that CSO's session and SDR blanked, its `shared` row gone; the customer,
        # the list entry and the certificates are the CSP's own relation with the user: kept
        assert net.csp.session(sid)["token_uid"] is None
        assert "04GONE01" not in json.dumps([r[0] for r in net.csp.store.all("SELECT body FROM sdrs")])
        assert net.csp.store.one("SELECT 1 FROM shared WHERE token_uid='04GONE01' AND party=?", CSO) is None
        assert contract_rows(net.csp) == contract and net.csp.store.one(
            "SELECT 1 FROM customers WHERE token_uid='04GONE01'") is not None  # fmt: skip
        assert not net.csp.jobs()  # not passed on: the CSO's own hand-on reached whom it shared with
        # the home's own deletion (the user leaving it) still removes everything
        assert await net.csp.delete_user("04GONE01") >= 2
        assert held(net, "04GONE01") == {"cso": False, "csp": False, "ch": False}

    run(tmp_path, mode, scenario)


def test_m10_a_deleted_card_is_no_longer_routed_by_the_clearing_house(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04GONE02")
        await net.csp.distribute_tokens()
        await net.csp.delete_user("04GONE02")
        assert net.ch.store.get("SELECT COUNT(*) FROM token_homes")[0] == 0
        assert CSP not in [r[0] for r in net.ch.store.all("SELECT csp FROM token_homes")]

    run(tmp_path, mode, scenario)


CSO2, CSP2 = "DE*CS2*O", "DE*CSB*O"


@dataclass
class Wide:
    """Two CSOs, two CSPs and the CH: a party the card never went to is at hand."""

    clock: FakeClock
    cso: CsoEndpoint
    cso2: CsoEndpoint
    csp: CspEndpoint
    csp2: CspEndpoint
    ch: ClearingHouse

    def endpoints(self) -> dict[str, Endpoint]:
        return {"cso": self.cso, "cso2": self.cso2, "csp": self.csp, "csp2": self.csp2, "ch": self.ch}

    def held(self, uid: str) -> dict[str, bool]:
        return {k: uid in json.dumps(ep.store.snapshot(), default=repr) for k, ep in self.endpoints().items()}

    def snapshots(self) -> dict[str, Any]:
        """Every store's domain tables, but the CH's routing log (it logs a refused relay too)."""
        out = {k: ep.store.snapshot() for k, ep in self.endpoints().items()}
        del out["ch"]["routed"]
        return out


def run_wide(tmp_path: Path, mode: str, scenario: Callable[[Wide], Awaitable[None]]) -> None:
    @asynccontextmanager
    async def up() -> AsyncIterator[Wide]:
        cfgs = network(tmp_path, mode, party_ids={"cso2": CSO2, "csp2": CSP2})
        clock = FakeClock()
        op = MemoryOperator.one_site(CSO, LOCATION, list(EVSES))
        op2 = MemoryOperator.one_site(CSO2, "DE*CS2*L1", ["DE*CS2*E1-1"])
        w = Wide(clock, CsoEndpoint(cfgs["cso"], op, clock=clock), CsoEndpoint(cfgs["cso2"], op2, clock=clock),
                 CspEndpoint(cfgs["csp"], clock=clock), CspEndpoint(cfgs["csp2"], clock=clock),
                 ClearingHouse(cfgs["ch"], clock=clock))  # fmt: skip
        await start_endpoints(w.endpoints())
        try:
            yield w
        finally:
            for ep in w.endpoints().values():
                if ep.server is not None:
                    await ep.stop()

    async def main() -> None:
        async with up() as w:
            await scenario(w)

    asyncio.run(main())


async def not_shared(call: Awaitable[Any]) -> None:
    with pytest.raises(RoamingError) as exc:
        await call
    assert (exc.value.status, exc.value.cause, exc.value.field) == (403, "not_shared", "token_uid"), exc.value


def deletion(uid: str, by: str) -> dict[str, Any]:
    return {"token_uid": uid, "party_id": by}


def csr(common_name: str) -> bytes:
    """An EV's DER PKCS#10 request for its contract certificate (contract_pki.py)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)  # fmt: skip


def test_m10_a_party_the_card_never_went_to_may_not_delete_it_directly_or_through_the_ch(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(w: Wide) -> None:
        await w.cso.publish_tariff(TARIFF)
        w.csp.add_customer("04LISTED")
        await w.csp.distribute_tokens()  # at both CSOs (and, in CH modes, its home at the CH)
        w.csp.add_customer("04UNSEEN")  # a customer no CSO ever saw
        sid = (await w.cso.token_presented(EVSES[0], "04LISTED"))["roaming_session_id"]
        await w.cso.session_ended(sid, 1000)
        before = w.snapshots()
        for call in (
            # another CSP wipes CSP's list entry (and session) at a CSO: directly, through the CH
            w.csp2.client(CSO).call("DeleteUserData", deletion("04LISTED", CSP2)),
            w.csp2.client(CH).call("DeleteUserData", deletion("04LISTED", CSP2), to=CSO),
            # a CSO the customer never reached deletes them at their CSP: directly, through the CH
            w.cso.client(CSP).call("DeleteUserData", deletion("04UNSEEN", CSO)),
            w.cso2.client(CH).call("DeleteUserData", deletion("04UNSEEN", CSO2), to=CSP),
            # the CH, which never held a card of CSP's (it issued none), at the CSP and the CSO
            w.ch.client(CSP).call("DeleteUserData", deletion("04LISTED", CH)),
            w.ch.client(CSO).call("DeleteUserData", deletion("04LISTED", CH)),
        ):
            await not_shared(call)
        if mode != "peer_to_peer":  # the CH's route of the card (token_homes) is its home's to drop
            await not_shared(w.csp2.client(CH).call("DeleteUserData", deletion("04LISTED", CSP2)))
        # relayed to a party that holds nothing of it: nothing there to guard (count 0), and the
        # CH keeps the card's route (neither the sender nor the destination is its home)
        answer = await w.cso2.client(CH).call("DeleteUserData", deletion("04LISTED", CSO2), to=CSP2)
        assert answer == {"status": "accepted", "count": 0}
        assert w.snapshots() == before
        assert not any(ep.jobs() or ep.jobs("refused") for ep in w.endpoints().values())
        # the legitimate ones still reach every party: the home, and a CSO its list went to
        assert await w.csp.delete_user("04UNSEEN") >= 1
        assert await w.cso2.delete_user("04LISTED") >= 1  # cso2 holds it from the list only
        assert not w.held("04LISTED")["cso2"] and w.held("04LISTED")["csp"]  # a CSO ends no contract
        assert await w.csp.delete_user("04LISTED") >= 2  # the home's own: every party
        assert not any(w.held("04LISTED").values()) and not any(w.held("04UNSEEN").values())
        if mode != "peer_to_peer":
            assert w.ch.store.get("SELECT COUNT(*) FROM token_homes")[0] == 0

    run_wide(tmp_path, mode, scenario)


def test_m10_a_cso_holding_a_csps_list_cannot_wipe_its_customers_directly_or_through_the_ch(
    tmp_path: Path, mode: str
) -> None:
    """Hostile: a CSO entitled by the list (it went to every CSO) asks the home to delete every
    listed customer. It may have only its own part blanked: the customers, the list and the
    contract certificates stay, the other CSO's session keeps its card, and nothing is passed on."""

    async def scenario(w: Wide) -> None:
        await w.cso.publish_tariff(TARIFF)
        uids = [f"04VICT{i:02d}" for i in range(4)]
        for uid in uids:
            w.csp.add_customer(uid, contract_id="DE*CSP*CVICT0003" if uid == uids[3] else None)
        await w.csp.distribute_tokens()
        sid = (await w.cso.token_presented(EVSES[0], uids[0]))["roaming_session_id"]  # another CSO's session
        await w.cso.session_ended(sid, 1000)
        # the hostile CSO had a contract certificate installed at one of its own EVSEs (S7)
        got = await w.cso2.contract_certificate("DE*CS2*E1-1", "install", csr("DE*CSP*CVICT0003"))
        assert got["status"] == "accepted", got
        contract, cso_before = contract_rows(w.csp), w.cso.store.snapshot()
        assert contract[2]  # a certificate to keep
        for i, uid in enumerate([*uids, "DE*CSP*CVICT0003"]):  # directly and, where there is one, through the CH
            client = w.cso2.client(CH if mode != "peer_to_peer" and i % 2 else CSP)
            answer = await client.call("DeleteUserData", deletion(uid, CSO2), to=CSP)
            assert answer["status"] == "accepted"
        assert contract_rows(w.csp) == contract
        assert w.csp.session(sid)["token_uid"] == uids[0]  # cso's session: not cso2's to blank
        assert w.cso.store.snapshot() == cso_before  # not passed on to the other CSO
        if mode != "peer_to_peer":  # the CH still routes the cards to their home
            assert w.ch.store.get("SELECT COUNT(*) FROM token_homes")[0] == len(uids)
        assert not any(ep.jobs() or ep.jobs("refused") for ep in w.endpoints().values())
        assert (await w.cso.token_presented(EVSES[1], uids[1]))["auth_status"] == "accepted"  # still a customer

    run_wide(tmp_path, mode, scenario)


def test_m10_a_late_deletion_reaches_the_list_and_the_home_after_the_retention_purged_shared(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(w: Wide) -> None:
        await w.cso.publish_tariff(TARIFF)
        for uid in ("04LATE01", "04LATE02"):
            w.csp.add_customer(uid)
        w.csp.add_customer("04AUTH01", contract_id="DE*CSP*CAUTH0001")  # on no list: asked by its contract
        await w.csp.distribute_tokens()
        w.csp.store.exec("DELETE FROM token_sent WHERE token_uid='04AUTH01'")  # as if listed never
        w.cso.store.exec("DELETE FROM token_cache WHERE token_uid='04AUTH01'")
        w.cso2.store.exec("DELETE FROM token_cache WHERE token_uid='04AUTH01'")
        for evse, uid, kind in ((EVSES[0], "04LATE01", "rfid"), (EVSES[1], "DE*CSP*CAUTH0001", "iso15118")):
            sid = (await w.cso.token_presented(evse, uid, kind))["roaming_session_id"]
            await w.cso.session_ended(sid, 1000)
        w.clock.advance(w.csp.cfg.retention_s + 1)
        for ep in w.endpoints().values():
            ep.purge()
        assert not any(ep.store.all("SELECT 1 FROM shared") for ep in w.endpoints().values())
        # the home deletes late: its list went to every CSO (not the purged `shared`) and each
        # CSO takes it from the card's home
        assert await w.csp.delete_user("04LATE01") >= 3
        # a CSO deletes late: its list entry names the home, which takes it from a CSO its list
        # went to — its own part only (no session of it there): the customer stays at the home
        # and on the list at the other CSO
        assert await w.cso.delete_user("04LATE02") >= 1
        assert not any(w.held("04LATE01").values())
        assert w.held("04LATE02") == {"cso": False, "cso2": True, "csp": True, "csp2": False, "ch": False}
        assert not any(ep.jobs() or ep.jobs("refused") for ep in w.endpoints().values())
        # a CSO that had a card only through an AuthorizeRoaming (a purged `shared` row) holds
        # nothing of it any more, and can no longer ask its home to delete the contract
        assert not w.held("DE*CSP*CAUTH0001")["cso"]
        before = w.snapshots()
        await not_shared(w.cso.client(CSP).call("DeleteUserData", deletion("DE*CSP*CAUTH0001", CSO)))
        assert w.snapshots() == before

    run_wide(tmp_path, mode, scenario)
