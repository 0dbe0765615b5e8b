"""User credentials issued by the clearing house (IEC 63119-1: "in CH and mixed modes the user
credentials may be issued by the CH or by each CSP"), on the real chain: real MicroPython
boards, the real gateway, the real CSMS, its CSO endpoint, two home CSPs and the CH over HTTP/3.
Home CSP A asks the CH for a credential for a customer (IssueCredential); the CH issues it under
its own provider id (`DE*CHX*C…`, a standard eMAID) and keeps which CSP it belongs to.

In clearing_house and mixed modes: a CH-issued RFID card presented at a board is authorized by
CSP A through the CH — the CSO sees the CH as its provider, the CH asks A and no other CSP —
charged and billed to A once at the CSMS, the CSO, A and the CH, matched (R3-1, R4-1, R3-5,
R3-6, R3-9); a CH-issued contract id likewise, its contract certificate installed by A through
the CH (S7) and presented by the EV (ISO 15118, R3-3): test_r3_1_r4_1_r3_3_r3_9_…. A CH-issued
card on A's token list is authorized at the site while it is offline and billed to A (R4-2); a
deletion started at the CH (M10) reaches A, the CSO and the site (the card is then refused at the
board): test_r4_2_m10_…. Peer to peer: A's request is refused by name, and a card under the
CH's prefix is no one's (no roaming session): test_peer_to_peer_…. Every scenario that charges
ends with the billing invariants (roaming_books.check_books)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from realsite import Invariants, Site, charge, scenario
from roaming_books import check_books, roaming_sdrs

from evedge_roaming.contract_pki import split_chain, verify_chain
from evedge_roaming.endpoint import Refused
from gateway.protocol import gid
from gateway.schema import TokenType
from tools.site.harness import CH_ID, CSP_ID, board_status, board_wait, until

pytestmark = pytest.mark.timeout(150)
WITH_CH = pytest.mark.parametrize("mode", ["clearing_house", "mixed"])


async def tariff(site: Site) -> None:
    """The operator's tariff, at the home CSPs before the charge (their own price of it)."""
    assert site.csms is not None and site.gw is not None and site.csp is not None and site.cso is not None
    cmd = site.csms.api.set_tariff(site.gw.cfg.site.id, 3, 250, "EUR", price_session=40, targets=site.devices)
    assert (await site.command_done(cmd))["state"] == "done"
    csp, cso = site.csp, site.cso
    await until(lambda: 3 in csp.tariffs(cso.me), 10, "the tariff at the home CSP")


def held(site: Site, uid: str) -> dict[str, bool]:
    eps = {"cso": site.cso, "csp": site.csp, "csp_b": site.csp_b, "ch": site.ch}
    return {k: ep is not None and uid in json.dumps(ep.store.snapshot(), default=repr) for k, ep in eps.items()}


def routed_to(site: Site) -> list[tuple[str, str]]:
    """Where the CH sent AuthorizeRoaming requests (its routing log: origin, destination)."""
    assert site.ch is not None
    q = "SELECT origin, dest FROM routed WHERE message='AuthorizeRoaming' AND status=200"
    return [(str(r[0]), str(r[1])) for r in site.ch.store.all(q)]


@WITH_CH
def test_r3_1_r4_1_r3_3_r3_9_ch_issued_card_and_contract_are_authorized_via_the_ch_by_their_csp_and_billed_to_it(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None
        csp, cso = site.csp, site.cso
        await tariff(site)
        card = (await csp.request_credential("rfid", 1))["token_uid"]
        assert gid.parse(card).operator == CH_ID  # issued under the CH's provider id, on no list
        await charge(site, 0, card, 300_000)  # R3-1, R4-1: asked online, the CH finds A
        assert routed_to(site) == [(cso.me, CSP_ID)]
        assert held(site, card)["csp_b"] is False  # privacy: the other CSP never saw the card
        (book,) = await check_books(site, mode)  # R3-5, R3-9: one SDR everywhere, billed to A, matched
        assert (book.csms["id_token"], book.csp, book.ch_verdict) == (card, CSP_ID, "matched")
        # R3-3: a contract id the CH issued; the EV's contract certificate comes from A's MO PKI
        # (through the CH, which knows A), then the EV presents the contract (as the CSMS books it)
        contract = (await csp.request_credential("iso15118", 2))["contract_id"]
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gid.parse(contract).emaid())])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        b = site.boards[0]
        m = b.mark()
        b.cmd("ev_cert", exi=csr.public_bytes(serialization.Encoding.DER).hex())
        assert (await board_wait(b, "ev_certificate", since=m))["ok"] is True
        chain = split_chain(bytes.fromhex((await board_status(b, lambda st: st["exi"]))["exi"]))
        verify_chain(chain, csp.mo.root)
        assert chain[0].public_key() == key.public_key()
        await charge(site, 0, contract, 120_000, token_type=int(TokenType.ISO15118))
        assert routed_to(site)[1:] == [(cso.me, CSP_ID)]
        await until(lambda: len(roaming_sdrs(site)) == 2, 20, "the second SDR at the CSMS")
        books = await check_books(site, mode)
        assert sorted((b.csms["id_token"], b.csp) for b in books) == sorted([(card, CSP_ID), (contract, CSP_ID)])
        assert held(site, contract)["csp_b"] is False

    scenario(tmp_path, fn, boards=1, roaming=mode)


@WITH_CH
def test_r4_2_m10_a_listed_ch_issued_card_charges_offline_is_billed_to_its_csp_and_deleted_everywhere(
    tmp_path: Path, mode: str
) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.cso is not None and site.ch is not None and site.gw is not None
        csp, cso, ch, gw = site.csp, site.cso, site.ch, site.gw
        await tariff(site)
        card = (await csp.request_credential("rfid", 7))["token_uid"]
        await csp.distribute_tokens("differential")  # R4-2: on A's list, to the CSO and the site

        def listed() -> bool:
            d = gw.auth.authorize(card, 0)
            return (d.status, d.source) == (0, "list")

        await until(listed, 20, "the CH-issued card in the site's local list")
        await site.stop_csms()  # the site is offline: its list decides
        await charge(site, 0, card, 300_000)
        await site.start_csms()  # back: the transaction reaches the CSMS and its SDR home CSP A
        (book,) = await check_books(site, mode, timeout=30)
        assert (book.csms["id_token"], book.csp) == (card, CSP_ID)
        assert not routed_to(site)  # no online authorization was needed
        # M10 started at the CH (the issuer): A and the CSO delete it too (durable jobs)
        await ch.delete_user(card)
        await until(lambda: not any(held(site, card).values()), 15, "the card deleted everywhere")
        assert not ch.jobs() and not csp.jobs() and not cso.jobs()
        # the site's list follows (the CSMS re-sends it without the card): the card is refused
        await until(lambda: gw.auth.authorize(card, 0).source != "list", 20, "the card gone from the site's list")
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token=card)
        assert (await board_wait(b, "auth", since=m))["status"] != 0
        await check_books(site, mode, known=[card])  # the books stand without the card number

    scenario(tmp_path, fn, boards=1, roaming=mode)


def test_peer_to_peer_a_csp_asking_for_a_ch_issued_credential_is_refused_by_name(tmp_path: Path) -> None:
    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csp is not None and site.ch is not None
        with pytest.raises(Refused) as exc:
            await site.csp.request_credential("rfid", 1)
        assert (exc.value.status, exc.value.cause) == (403, "wrong_mode")
        assert site.csp.store.get("SELECT COUNT(*) FROM customers")[0] == 0
        assert site.ch.store.get("SELECT COUNT(*) FROM issued_credentials")[0] == 0
        b = site.boards[0]
        m = b.mark()
        b.cmd("card", token=f"{CH_ID[:7]}C00000001")  # the CH's prefix, peer to peer: no one's card
        assert (await board_wait(b, "auth", since=m))["status"] != 0
        assert site.cso is not None and site.cso.store.get("SELECT COUNT(*) FROM sessions")[0] == 0
        assert site.ch.store.get("SELECT COUNT(*) FROM routed")[0] == 0  # peer to peer: no hub at all

    scenario(tmp_path, fn, boards=1, roaming="peer_to_peer")
