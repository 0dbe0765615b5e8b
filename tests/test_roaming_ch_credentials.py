"""Credentials issued by the clearing house (IssueCredential, docs/roaming.md "Credentials issued
by the clearing house"), against the real endpoints on loopback (`testbed`, with two CSPs): a
CH-issued RFID card and contract id are authorized by the CSP they belong to only, through the
CH (R3-1, R3-3, R4-1), the contract's certificate comes from that CSP (S7), the session billed
to it once (R3-9; an out-of-order update and a second SDR refused by name), authorized offline
from its token list (R4-2), deleted everywhere (M10) or dropped after its expiry (retention);
and every refusal of the message is named and changes nothing: peer to peer, wrong role, not a
CH, relayed, duplicate key with another body, bad fields, beyond the quota or the longest expiry,
another CSP listing the credential (broadcast, relayed to one CSO, or sent to the CSO directly),
a deletion by a party that never held it. M10 reaches the CH from the CSP also after the
retention, and the owner from a deletion relayed to anyone."""

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
from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.cso import CsoEndpoint
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.endpoint import Endpoint, Refused
from evedge_roaming.operator import MemoryOperator
from evedge_roaming.testbed import CH, CSO, CSP, EVSES, LOCATION, FakeClock, network, start_endpoints
from gateway.protocol import gid
from gateway.protocol.roaming import auth
from gateway.protocol.roaming.client import RoamingError
from tools.site.harness import until

CSP_B = "DE*CSB*O"
TARIFF = {"tariff_id": 7, "operator_id": CSO, "price_kwh": 45, "currency": "EUR"}
pytestmark = pytest.mark.timeout(30)
WITH_CH = pytest.mark.parametrize("mode", ["clearing_house", "mixed"])


@dataclass
class Net:
    clock: FakeClock
    cso: CsoEndpoint
    csp: CspEndpoint
    csp_b: CspEndpoint
    ch: ClearingHouse

    def endpoints(self) -> dict[str, Endpoint]:
        return {"cso": self.cso, "csp": self.csp, "csp2": self.csp_b, "ch": self.ch}

    def held(self, uid: str) -> dict[str, bool]:
        return {k: uid in json.dumps(ep.store.snapshot(), default=repr) for k, ep in self.endpoints().items()}

    def snapshots(self) -> dict[str, Any]:
        return {k: ep.store.snapshot() for k, ep in self.endpoints().items()}


@asynccontextmanager
async def running(folder: Path, mode: str, **ch: Any) -> AsyncIterator[Net]:
    """A CSO, two CSPs (A, B) and the CH on loopback (`ch`: CH configuration keys)."""
    cfgs = network(folder, mode, party_ids={"csp2": CSP_B})
    cfgs["ch"] = replace(cfgs["ch"], **ch)
    clock = FakeClock()
    op = MemoryOperator.one_site(CSO, LOCATION, list(EVSES))
    net = Net(clock, CsoEndpoint(cfgs["cso"], op, clock=clock), CspEndpoint(cfgs["csp"], clock=clock),
              CspEndpoint(cfgs["csp2"], clock=clock), ClearingHouse(cfgs["ch"], clock=clock))  # fmt: skip
    await start_endpoints(net.endpoints())
    try:
        yield net
    finally:
        for ep in net.endpoints().values():
            if ep.server is not None:
                await ep.stop()


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]], **ch: Any) -> None:
    async def main() -> None:
        async with running(tmp_path, mode, **ch) as net:
            await scenario(net)

    asyncio.run(main())


async def raw(ep: Endpoint, to: str, body: bytes, *, via: str = "") -> tuple[int, dict[str, Any]]:
    """An IssueCredential with a hand-made body (the client checks what it sends: bad fields
    are only sent this way)."""
    c = ep.client(to)
    token = await c.login()
    status, answer = await c._send("IssueCredential", body, auth.Route(ep.me, "", via), token)
    return status, json.loads(answer)


def csr(common_name: str) -> bytes:
    """An EV's DER PKCS#10 request for its contract certificate (contract_pki.py)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


async def refused(call: Awaitable[Any], status: int, cause: str, field: str | None = None) -> None:
    with pytest.raises((RoamingError, Refused)) as exc:
        await call
    e = exc.value
    assert isinstance(e, RoamingError | Refused)
    assert (e.status, e.cause) == (status, cause), e
    if field is not None:
        assert e.field == field


@WITH_CH
def test_r3_1_r4_1_r3_9_a_ch_issued_card_is_authorized_and_billed_by_its_csp_only_through_the_ch(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        issued = await net.csp.request_credential("rfid", 1)
        uid = issued["token_uid"]
        assert gid.parse(uid, expect="C").operator == CH and "contract_id" not in issued
        assert gid.parse(uid).emaid()[-1] == gid.check_digit(gid.parse(uid).emaid()[:14])  # a standard eMAID
        assert net.csp.store.get("SELECT token_uid FROM customers")[0] == uid
        # R3-1, R4-1: no list names it; the CSO sees the CH as its provider, the CH asks its CSP only
        answer = await net.cso.token_presented(EVSES[0], uid)
        assert (answer["auth_status"], answer["result"]) == ("accepted", "accepted"), answer
        sid = answer["roaming_session_id"]
        assert gid.parse(sid).operator == CSP and net.cso.session(sid)["csp"] == CSP  # the CSO learnt the home
        assert net.held(uid)["csp2"] is False  # privacy: the other CSP never saw it
        routed = net.ch.store.all("SELECT origin, dest, message FROM routed WHERE message='AuthorizeRoaming'")
        assert [tuple(r) for r in routed] == [(CSO, CSP, "AuthorizeRoaming")]
        # R3-6, R3-5, R3-9: progress and one SDR, to the CSP the credential belongs to, matched
        await net.cso.session_progress(sid, 2000, 7000)
        late = {"roaming_session_id": sid, "evse_gid": EVSES[0], "energy_wh": 1000, "power_w": 7000,
                "time": int(net.clock()) - 60}  # fmt: skip
        await refused(net.cso.send("SessionUpdate", late, CSP), 409, "out_of_order", "time")
        done = await net.cso.session_ended(sid, 2000)
        assert done["status"] == "accepted"
        # a second bill for the session (another SDR id): refused by name, the books keep the first
        sdr = json.loads(net.csp.store.get("SELECT body FROM sdrs WHERE session_id=?", sid)[0])
        again = dict(sdr, sdr_id=f"{CSO[:7]}R2", token_uid=uid)
        await refused(net.cso.send("PutSdr", again, CSP), 409, "duplicate_sdr", "sdr_id")
        count = "SELECT COUNT(*) FROM sdrs"
        assert net.csp.store.get(count)[0] == net.ch.store.get(count)[0] == 1
        assert net.csp.store.get("SELECT verdict FROM sdrs WHERE session_id=?", sid)[0] == "matched"
        assert [tuple(r) for r in net.ch.store.all("SELECT csp, token_uid FROM sdrs")] == [(CSP, None)]
        assert [r.verdict for r in net.ch.reconcile()] == ["matched"]
        assert net.csp_b.store.get("SELECT COUNT(*) FROM sdrs")[0] == 0
        # a contract id under the CH's prefix it never issued goes to no CSP
        stray = await net.cso.token_presented(EVSES[1], f"{CH[:7]}C00000000")
        assert stray["auth_status"] == "unknown"
        assert net.ch.store.get("SELECT COUNT(*) FROM routed WHERE message='AuthorizeRoaming'")[0] == 1

    run(tmp_path, mode, scenario)


@WITH_CH
def test_r3_3_s7_a_ch_issued_contract_gets_its_certificate_and_is_authorized_in_its_iso15118_spelling(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        issued = await net.csp.request_credential("iso15118", 2, expiry=int(net.clock()) + 86400)
        cid = issued["contract_id"]
        assert issued["token_uid"] == cid and issued["expiry"] == int(net.clock()) + 86400
        row = net.csp.store.get("SELECT contract_id, expiry FROM customers WHERE token_uid=?", cid)
        assert tuple(row) == (cid, issued["expiry"])
        answer = await net.cso.token_presented(EVSES[0], gid.parse(cid).emaid(), "iso15118")  # with check digit
        assert answer["auth_status"] == "accepted" and answer["contract_id"] == cid
        assert net.cso.session(answer["roaming_session_id"])["csp"] == CSP
        # S7: the EV's contract certificate from the CSP's MO PKI, through the CH (which knows the CSP)
        got = await net.cso.contract_certificate(EVSES[0], "install", csr(gid.parse(cid).emaid()))
        assert got["status"] == "accepted", got
        verify_chain(split_chain(got["exi"]), net.csp.mo.root)
        stray = await net.cso.contract_certificate(EVSES[0], "install", csr(f"{CH[:7]}C00000000"))
        assert (stray["status"], stray["reason"]) == ("rejected", "no contract issued by this clearing house")
        assert net.held(cid)["csp2"] is False
        net.clock.advance(86401)  # the contract expired: the CSP says so, through the CH
        assert (await net.cso.token_presented(EVSES[1], cid, "iso15118"))["auth_status"] == "expired"

    run(tmp_path, mode, scenario)


@WITH_CH
def test_r4_2_a_listed_ch_issued_card_is_authorized_offline_and_billed_to_its_csp(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        uid = (await net.csp.request_credential("rfid", 3))["token_uid"]
        await net.csp.distribute_tokens()
        assert tuple(net.cso.store.get("SELECT party, auth_status FROM token_cache WHERE token_uid=?", uid)) == (
            CSP,
            "accepted",
        )
        await net.ch.stop()  # neither the CH nor the CSP answers: the list decides
        await net.csp.stop()
        answer = await net.cso.token_presented(EVSES[0], uid)
        assert (answer["auth_status"], answer["result"]) == ("accepted", "accepted")
        assert net.cso.session(answer["roaming_session_id"])["csp"] == CSP

    run(tmp_path, mode, scenario)


@WITH_CH
def test_m10_a_ch_issued_credential_is_deleted_at_the_ch_its_csp_and_the_csos_that_saw_it(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        a = (await net.csp.request_credential("rfid", 4))["token_uid"]
        b = (await net.csp.request_credential("iso15118", 5))["token_uid"]
        await net.csp.distribute_tokens()
        for uid, evse in ((a, EVSES[0]), (b, EVSES[1])):
            sid = (await net.cso.token_presented(evse, uid))["roaming_session_id"]
            await net.cso.session_ended(sid, 1000)
        assert net.held(a) == net.held(b) == {"cso": True, "csp": True, "csp2": False, "ch": True}
        # started at the CH (the issuer): its CSP, and through it the CSO, delete it too
        assert await net.ch.delete_user(a) >= 3
        assert net.held(a) == {"cso": False, "csp": False, "csp2": False, "ch": False}
        # started at the CSP: the CH (which issued it) and the CSO
        assert await net.csp.delete_user(b) >= 3
        assert net.held(b) == {"cso": False, "csp": False, "csp2": False, "ch": False}
        assert not net.ch.jobs() and not net.csp.jobs() and not net.cso.jobs()
        # a deleted credential is no one's any more: unknown
        assert (await net.cso.token_presented(EVSES[0], a))["auth_status"] == "unknown"

    run(tmp_path, mode, scenario)


def test_retention_drops_an_expired_ch_issued_credential(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        uid = (await net.csp.request_credential("rfid", 6, expiry=int(net.clock()) + 60))["token_uid"]
        assert net.ch.purge() == 0 and net.held(uid)["ch"]
        net.clock.advance(60 + net.ch.cfg.retention_s + 1)
        assert net.ch.purge() >= 1 and not net.held(uid)["ch"]

    run(tmp_path, "clearing_house", scenario)


def test_a_repeated_request_whose_stored_answer_was_lost_gets_the_same_credential(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        first = await net.csp.request_credential("rfid", 8)
        net.ch.store.exec("DELETE FROM idempotency")  # the CH stopped before it kept the answer
        body = {"request_id": 8, "token_type": "rfid"}
        assert await net.csp.client(CH).call("IssueCredential", body) == first
        await refused(net.csp.client(CH).call("IssueCredential", dict(body, expiry=int(net.clock()) + 60)), 409,
                      "conflict")  # fmt: skip
        assert net.ch.store.get("SELECT COUNT(*) FROM issued_credentials")[0] == 1

    run(tmp_path, "mixed", scenario)


def test_peer_to_peer_a_csp_asking_for_a_credential_is_refused_by_name(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        before = net.snapshots()
        await refused(net.csp.request_credential("rfid", 1), 403, "wrong_mode")
        # sent anyway (the CH is configured for other uses): the CH refuses it too
        await refused(net.csp.client(CH).call("IssueCredential", {"request_id": 1, "token_type": "rfid"}), 403,
                      "wrong_mode")  # fmt: skip
        assert net.snapshots() == before

    run(tmp_path, "peer_to_peer", scenario)


@WITH_CH
def test_bad_issue_credential_requests_get_a_named_4xx_and_change_nothing(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        first = await net.csp.request_credential("rfid", 10)
        before = net.snapshots()
        body = {"request_id": 10, "token_type": "rfid"}
        # the same key and body again: the stored answer, nothing new
        assert await net.csp.client(CH).call("IssueCredential", body) == first
        # the same key with another body: a conflict
        await refused(net.csp.client(CH).call("IssueCredential", dict(body, token_type="iso15118")), 409, "conflict")
        # wrong role: a CSO may not ask; only a CH issues (a CSO or CSP has no such message); not relayed
        await refused(net.cso.client(CH).call("IssueCredential", {"request_id": 11, "token_type": "rfid"}), 403,
                      "not_allowed")  # fmt: skip
        await refused(net.csp.client(CSO).call("IssueCredential", {"request_id": 12, "token_type": "rfid"}), 404,
                      "unknown_message")  # fmt: skip
        await refused(net.csp.client(CH).call("IssueCredential", {"request_id": 13, "token_type": "rfid"}, to=CSO),
                      403, "not_allowed")  # fmt: skip
        cert = {"evse_gid": EVSES[0], "action_15118": "install", "exi": "AA==", "contract_id": first["token_uid"]}
        await refused(net.csp.client(CH).call("ContractCertificate", cert), 403, "not_allowed")  # a CSO's request
        # bad fields
        await refused(net.csp.client(CH).call("IssueCredential", {"request_id": 14, "token_type": "pin"}), 400,
                      "unsupported_token_type", "token_type")  # fmt: skip
        past = {"request_id": 15, "token_type": "rfid", "expiry": int(net.clock()) - 1}
        await refused(net.csp.client(CH).call("IssueCredential", past), 400, "expired", "expiry")
        for data, cause, field in (
            (b'{"request_id": 16, "token_type": "nfc"}', "bad_enum", "token_type"),
            (b'{"token_type": "rfid"}', "missing_field", "request_id"),
            (b'{"request_id": "16", "token_type": "rfid"}', "bad_type", "request_id"),
            (b'{"request_id": -1, "token_type": "rfid"}', "out_of_range", "request_id"),
            (b'{"request_id": 16, "token_type": "rfid", "expiry": 1.5}', "bad_type", "expiry"),
        ):
            status, answer = await raw(net.csp, CH, data)
            assert (status, answer["error"], answer.get("field")) == (400, cause, field), answer
        # another CSP's key is its own: B's request 10 is a new credential, not A's
        other = await net.csp_b.request_credential("rfid", 10)
        assert other["token_uid"] != first["token_uid"]
        # B lists A's credential (a partner speaking for a customer it does not serve): refused by
        # the CH, passed on to no CSO
        net.csp_b.add_customer(first["token_uid"])
        await refused(net.csp_b.distribute_tokens(), 403, "party_mismatch")
        after = net.snapshots()
        after["csp2"], before["csp2"] = {}, {}
        after["ch"]["issued_credentials"] = [r for r in after["ch"]["issued_credentials"] if r[1] != CSP_B]
        after["ch"]["idempotency"] = [r for r in after["ch"]["idempotency"] if r[0] != CSP_B]
        assert after == before

    run(tmp_path, mode, scenario)


async def until_no_jobs(net: Net) -> None:
    """Until every endpoint delivered its durable jobs (hand-ons tried in the background)."""
    try:
        await until(lambda: not any(ep.jobs() for ep in net.endpoints().values()), 5, "every job delivered")
    except TimeoutError:
        raise AssertionError({k: ep.jobs() for k, ep in net.endpoints().items()}) from None


def listed(net: Net, uid: str) -> list[tuple[str, str]]:
    """The CSO's token lists naming `uid`: (party, status)."""
    return [(str(r[0]), str(r[1])) for r in net.cso.store.all("SELECT party, auth_status FROM token_cache WHERE"
                                                              " token_uid=?", uid)]  # fmt: skip


@WITH_CH
def test_another_csps_list_of_a_ch_issued_credential_is_refused_to_one_cso_and_sent_directly(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        uid = (await net.csp.request_credential("rfid", 20))["token_uid"]
        net.csp_b.add_customer(uid)  # B speaks for A's customer
        entry = {"token_uid": uid, "auth_status": "blocked", "party_id": CSP_B}
        body: dict[str, Any] = {"party_id": CSP_B, "list_version": 1, "update_type": "full", "page": 0, "pages": 1,
                                "tokens": [entry]}  # fmt: skip
        before = net.snapshots()
        # through the CH to one CSO (x-ev-to): checked like a broadcast
        await refused(net.csp_b.client(CH).call("TokenList", body, to=CSO), 403, "party_mismatch",
                      "tokens[0].token_uid")  # fmt: skip
        # straight to the CSO (which the CH cannot check): a credential of the CH comes through the CH only
        await refused(net.csp_b.client(CSO).call("TokenList", body), 403, "not_via_clearing_house",
                      "tokens[0].token_uid")  # fmt: skip
        # another spelling of it, and a removal (which touches B's own list only) passes
        emaid = dict(body, tokens=[dict(entry, token_uid=gid.parse(uid).emaid())])
        await refused(net.csp_b.client(CSO).call("TokenList", emaid), 403, "not_via_clearing_house")
        assert net.snapshots() == before and listed(net, uid) == []
        gone = dict(body, tokens=[dict(entry, auth_status="invalid")])
        assert (await net.csp_b.client(CSO).call("TokenList", gone))["status"] == "accepted"
        assert listed(net, uid) == []
        # the card is still asked of A only, and A's own list of it reaches the CSO
        answer = await net.cso.token_presented(EVSES[0], uid)
        assert answer["auth_status"] == "accepted" and net.cso.session(answer["roaming_session_id"])["csp"] == CSP
        await net.csp.distribute_tokens()
        assert listed(net, uid) == [(CSP, "accepted")]

    run(tmp_path, mode, scenario)


@WITH_CH
def test_m10_started_at_the_csp_reaches_the_ch_after_the_retention_purged_where_it_went(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        a = (await net.csp.request_credential("rfid", 21))["token_uid"]
        b = (await net.csp.request_credential("iso15118", 22))["token_uid"]
        net.clock.advance(net.csp.cfg.retention_s + 1)  # a customer for longer than the retention
        net.csp.purge()
        assert net.held(a)["ch"] and net.held(b)["ch"]
        assert await net.csp.delete_user(a) >= 2
        assert await net.csp.delete_user(gid.parse(b).emaid()) >= 2  # asked in another spelling
        for uid in (a, b):
            assert net.held(uid) == {"cso": False, "csp": False, "csp2": False, "ch": False}
        assert net.ch.store.get("SELECT COUNT(*) FROM issued_credentials")[0] == 0
        assert not net.csp.jobs() and not net.ch.jobs()
        # asked by the CH itself: the CSP does not send it back
        c = (await net.csp.request_credential("rfid", 23))["token_uid"]
        assert await net.ch.delete_user(gid.parse(c).emaid()) >= 2  # in another spelling too
        assert not net.csp.jobs() and not net.ch.jobs() and not net.held(c)["csp"]

    run(tmp_path, mode, scenario)


@WITH_CH
def test_m10_a_cso_that_holds_a_ch_issued_credential_ends_only_its_own_part_relayed_or_at_the_ch(
    tmp_path: Path, mode: str
) -> None:
    """A CSO's deletion cannot end a credential (the owner's customer's): the owner blanks that
    CSO's sessions, the CH drops that CSO's route only; the owner's own deletion still ends it."""

    async def scenario(net: Net) -> None:
        await net.cso.publish_tariff(TARIFF)
        a, b, c = [(await net.csp.request_credential("rfid", n))["token_uid"] for n in (24, 25, 27)]
        await net.csp.distribute_tokens()  # all on A's list, through the CH, at the CSO
        sid = (await net.cso.token_presented(EVSES[0], a))["roaming_session_id"]
        await net.cso.session_ended(sid, 1000)

        def routed(uid: str) -> bool:
            q = "SELECT 1 FROM credential_routes WHERE digest=? AND cso=?"
            return net.ch.store.one(q, net.ch._digest(uid), CSO) is not None

        assert routed(a) and routed(b) and routed(c)
        issued = net.ch.store.all("SELECT * FROM issued_credentials ORDER BY token_uid")
        customers = net.csp.store.all("SELECT * FROM customers ORDER BY token_uid")
        # the CSO's own deletion (a driver asked it): through the CH to A, which blanks the CSO's session
        assert await net.cso.delete_user(a) >= 2
        assert net.held(a) == {"cso": False, "csp": True, "csp2": False, "ch": True}
        assert net.csp.session(sid)["token_uid"] is None
        # a deletion the CSO addresses to another party (B), and one to the CH itself: its route goes
        assert (await net.cso.send("DeleteUserData", {"token_uid": b, "party_id": CSO}, CSP_B))["status"] == "accepted"
        assert (await net.cso.client(CH).call("DeleteUserData", {"token_uid": c, "party_id": CSO}))["count"] == 1
        await until_no_jobs(net)
        assert not routed(a) and not routed(b) and not routed(c)
        assert net.ch.store.all("SELECT * FROM issued_credentials ORDER BY token_uid") == issued
        assert net.csp.store.all("SELECT * FROM customers ORDER BY token_uid") == customers
        assert not any(ep.jobs("refused") for ep in net.endpoints().values())
        # the owner's own deletion (the user leaving A) still ends the credential everywhere
        assert await net.csp.delete_user(a) >= 2
        assert net.held(a) == {"cso": False, "csp": False, "csp2": False, "ch": False}

    run(tmp_path, mode, scenario)


@WITH_CH
def test_m10_of_a_ch_issued_credential_by_a_party_that_never_held_it_is_refused_by_name(
    tmp_path: Path, mode: str
) -> None:
    async def scenario(net: Net) -> None:
        uid = (await net.csp.request_credential("rfid", 26))["token_uid"]
        b_own = (await net.csp_b.request_credential("rfid", 1))["token_uid"]
        before = net.snapshots()
        body = {"token_uid": uid, "party_id": CSP_B}
        for call in (
            net.csp_b.client(CH).call("DeleteUserData", body),  # B, at the CH
            net.csp_b.client(CH).call("DeleteUserData", body, to=CSO),  # B, relayed to a CSO
            net.csp_b.client(CH).call("DeleteUserData", {**body, "token_uid": gid.parse(uid).emaid()}),
            # a CSO the CH never passed it to (not listed, never presented there), at A and at the CH
            net.cso.client(CH).call("DeleteUserData", {"token_uid": uid, "party_id": CSO}, to=CSP),
            net.cso.client(CH).call("DeleteUserData", {"token_uid": uid, "party_id": CSO}),
        ):
            await refused(call, 403, "not_your_credential", "token_uid")
        assert net.snapshots() == before
        # a CSO that asked the owner of an unknown card earns nothing either
        await net.cso.token_presented(EVSES[0], f"{CH[:7]}C00000000")
        await refused(net.cso.client(CH).call("DeleteUserData", {"token_uid": uid, "party_id": CSO}), 403,
                      "not_your_credential")  # fmt: skip
        # the owners themselves may: A its credential, B its own
        assert (await net.csp_b.client(CH).call("DeleteUserData", {"token_uid": b_own, "party_id": CSP_B}))[
            "status"] == "accepted"  # fmt: skip
        assert (await net.csp.client(CH).call("DeleteUserData", {"token_uid": uid, "party_id": CSP}))[
            "status"] == "accepted"  # fmt: skip
        assert net.ch.store.get("SELECT COUNT(*) FROM issued_credentials")[0] == 0

    run(tmp_path, mode, scenario)


def test_issue_credential_is_bounded_per_csp_and_in_lifetime(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        now = int(net.clock())
        first = await net.csp.request_credential("rfid", 30)
        assert first["expiry"] == now + 86400  # none asked: the longest
        await net.csp.request_credential("iso15118", 31, expiry=now + 86400)  # the longest is allowed
        before = net.snapshots()
        await refused(net.csp.request_credential("rfid", 32), 403, "quota_exceeded")
        await refused(net.csp.request_credential("rfid", 33, expiry=now + 86401), 400, "expiry_too_far", "expiry")
        assert net.snapshots() == before
        assert await net.csp.client(CH).call("IssueCredential", {"request_id": 30, "token_type": "rfid"}) == first
        net.ch.store.exec("DELETE FROM idempotency")  # a repeat whose stored answer was lost: the same, at quota
        assert await net.csp.client(CH).call("IssueCredential", {"request_id": 30, "token_type": "rfid"}) == first
        assert (await net.csp_b.request_credential("rfid", 30))["token_uid"]  # B's quota is its own
        await net.csp.delete_user(first["token_uid"])  # a deletion frees a place
        assert (await net.csp.request_credential("rfid", 32))["token_uid"]
        # expired and purged (retention after its expiry) frees one too
        net.clock.advance(86400 + net.ch.cfg.retention_s + 1)
        assert net.ch.purge() >= 2
        assert (await net.csp.request_credential("rfid", 34))["expiry"] == int(net.clock()) + 86400

    run(tmp_path, "clearing_house", scenario, credential_quota=2, credential_max_lifetime_s=86400)


def test_a_repeat_whose_stored_answer_was_lost_is_told_by_its_body_also_after_its_expiry(tmp_path: Path) -> None:
    """A request whose stored answer was lost: repeated without the `expiry` it had is 409
    `conflict` (before: the credential), repeated as it was after that expiry passed gets the
    same credential (before: 400 `expired`); a request that had none, repeated without, the same."""

    async def scenario(net: Net) -> None:
        expiry = int(net.clock()) + 60
        first = await net.csp.request_credential("rfid", 40, expiry=expiry)
        plain = await net.csp.request_credential("rfid", 41)
        net.ch.store.exec("DELETE FROM idempotency")  # the CH stopped before it kept the answers
        before = net.snapshots()
        ch = net.csp.client(CH)
        await refused(ch.call("IssueCredential", {"request_id": 40, "token_type": "rfid"}), 409, "conflict")
        assert net.snapshots() == before
        net.ch.store.exec("DELETE FROM idempotency")
        net.clock.advance(120)  # the asked expiry has passed
        body = {"request_id": 40, "token_type": "rfid", "expiry": expiry}
        assert await ch.call("IssueCredential", body) == first
        assert await ch.call("IssueCredential", {"request_id": 41, "token_type": "rfid"}) == plain
        assert net.ch.store.get("SELECT COUNT(*) FROM issued_credentials")[0] == 2

    run(tmp_path, "clearing_house", scenario)


def test_a_credential_issued_before_every_one_got_an_expiry_is_purged_in_the_end(tmp_path: Path) -> None:
    """A row of before the lifetime bound (no expiry) lives the longest lifetime at most: it is
    purged `retention_s` after, and frees its place in its CSP's quota (before: never)."""

    async def scenario(net: Net) -> None:
        old = await net.csp.request_credential("rfid", 50)
        net.ch.store.exec("UPDATE issued_credentials SET expiry=NULL")  # as a store of before kept it
        await refused(net.csp.request_credential("rfid", 51), 403, "quota_exceeded")
        net.clock.advance(86400 + net.ch.cfg.retention_s + 1)
        assert net.ch.purge() >= 1 and not net.held(old["token_uid"])["ch"]
        assert (await net.csp.request_credential("rfid", 51))["token_uid"]

    run(tmp_path, "clearing_house", scenario, credential_quota=1, credential_max_lifetime_s=86400)
