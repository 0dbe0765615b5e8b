"""The billing invariants of roaming (issue #14), checked at the end of every roaming scenario:
every roaming session yields exactly one SDR at the CSMS, at the CSO endpoint, at its home CSP
and — in clearing-house and mixed modes — at the clearing house (peer to peer: none there);
each priced with the tariff in force during each of its transactions (the CSMS's own price
of it, line by line, and the home CSP's copy of the tariffs give the same), carrying the
CSMS's signed meter data end to end, and matched by the home CSP against its own record
(and by the CH's reconciliation), unless the scenario sent it wrong on purpose (`wrong`):
then it is flagged a mismatch at the CSP and the CH.

A session of a card whose home roams through a visited CSP (CSP↔CSP roaming, `Site(visited=True)`)
is billed twice over: the CSO's SDR at the visited CSP, matched against its record, and the
visited CSP's own SDR at the home CSP, matched against the home's record; both priced the same
(the CSO's tariff passed on unchanged) and carrying the same signed meter data. Every CSP holds
one SDR per session it is the CSO's counterpart of, plus one per session of its customers
billed through a visited CSP.

A roaming card is one of a home CSP's customers (token uid or contract id); the operator's
own cards are the CSMS's business (tests/scenarios/realsite.py checks those).

Shared by the roaming scenarios (tests/scenarios/roaming_books.py) and the fault campaign
(`python -m tools.site.campaign --roaming`, which reads `books_faults` instead of asserting)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from evedge_roaming import pricing, publish
from evedge_roaming.csp import CspEndpoint
from evedge_roaming.visited import VisitedCspEndpoint
from tools.site.harness import Site, until

MODES = ("peer_to_peer", "clearing_house", "mixed")


@dataclass
class Book:
    """One roaming session as each party booked it."""

    csms: dict[str, Any]
    session_id: str = ""
    csp: str = ""
    cso_session: dict[str, Any] = field(default_factory=dict)
    csp_sdr: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""
    ch_verdict: str | None = None
    home: str = ""
    """The card's home CSP: `csp`, or the partner `csp` is the visited CSP of."""
    home_session: str = ""
    home_sdr: dict[str, Any] = field(default_factory=dict)
    home_verdict: str = ""


def _customers(csp: CspEndpoint) -> set[str]:
    rows = csp.store.all("SELECT token_uid, contract_id FROM customers")
    return {str(v) for r in rows for v in r if v}


def _csps(site: Site) -> list[CspEndpoint]:
    return [c for c in (site.csp, site.csp_b, site.csp3) if c is not None]


def roaming_sdrs(site: Site, known: Collection[str] = ()) -> list[dict[str, Any]]:
    """The CSMS's SDRs of roaming cards (a CSP's customers, or `known`: cards deleted since),
    each split by card (`publish.sdr_parts`: a service session may hold several cards')."""
    assert site.csms is not None
    store = site.csms.store
    cards = set(known).union(*(_customers(c) for c in _csps(site)))
    own = {r["id_token"] for r in store.select("tokens")}
    parts = (p for s in site.csms.api.sdrs() for p in publish.sdr_parts(s, publish.sdr_tokens(store, s)))
    return [s for s in parts if s["id_token"] in cards and s["id_token"] not in own]


def _books(site: Site, known: Collection[str]) -> list[Book] | None:
    """Each roaming SDR of the CSMS followed to the CSO and the home CSP; None while one is
    still on its way."""
    assert site.cso is not None
    out = []
    for s in roaming_sdrs(site, known):
        row = site.cso.store.one("SELECT session_id, state FROM csms_sdrs WHERE sdr_id=?", s["sdr_id"])
        if row is None or row[1] != "sent":
            return None
        sid = str(row[0])
        sess = dict(site.cso.store.get("SELECT * FROM sessions WHERE session_id=?", sid))
        book = Book(s, sid, str(sess["csp"]), sess)
        for csp in _csps(site):
            got = csp.store.one("SELECT body, verdict FROM sdrs WHERE session_id=?", sid)
            if got is not None and csp.me == book.csp:
                book.csp_sdr, book.verdict = json.loads(got[0]), str(got[1])
        if not book.csp_sdr or not _home_leg(site, book):
            return None
        out.append(book)
    return out


async def check_books(site: Site, mode: str, *, known: Collection[str] = (), wrong: Collection[str] = (),
                      timeout: float = 20.0) -> list[Book]:  # fmt: skip
    """Waits until every roaming SDR of the CSMS has reached its home CSP (and the CH's
    reconciliation has every CSP record), then asserts the billing invariants; the books.
    `wrong`: roaming session ids whose SDR the scenario made wrong on purpose."""
    books, faults = await books_faults(site, mode, known=known, wrong=wrong, timeout=timeout)
    assert not faults, "roaming books broken:\n" + "\n".join(faults)
    return books


def _home_leg(site: Site, book: Book) -> bool:
    """Fills in the home's side of the book: the same CSP, or through a visited CSP the home's
    SDR (False while it is on its way)."""
    visited = next((c for c in _csps(site) if c.me == book.csp), None)
    link = visited.link(book.session_id) if isinstance(visited, VisitedCspEndpoint) else None
    if link is None:
        book.home, book.home_session = book.csp, book.session_id
        book.home_sdr, book.home_verdict = book.csp_sdr, book.verdict
        return True
    home = next((c for c in _csps(site) if c.me == link.home), None)
    q = "SELECT body, verdict FROM sdrs WHERE session_id=?"
    got = None if home is None else home.store.one(q, link.home_session)
    if got is None:
        return False
    book.home, book.home_session = link.home, link.home_session
    book.home_sdr, book.home_verdict = json.loads(got[0]), str(got[1])
    return True


def _unsent(site: Site, known: Collection[str]) -> list[str]:
    """The CSMS's roaming SDRs not (yet) at their home CSP: what a timeout names."""
    assert site.cso is not None
    out = []
    for s in roaming_sdrs(site, known):
        row = site.cso.store.one("SELECT session_id, state FROM csms_sdrs WHERE sdr_id=?", s["sdr_id"])
        at_csp = row is not None and any(
            c.store.one("SELECT 1 FROM sdrs WHERE session_id=?", str(row[0])) is not None for c in _csps(site)
        )
        if not at_csp:
            out.append(f"{s['sdr_id']} ({s['id_token']}, CSO: {'none' if row is None else row[1]})")
        for c in _csps(site):  # through a visited CSP: at the visited CSP, not yet at the home
            link = c.link(str(row[0])) if row is not None and isinstance(c, VisitedCspEndpoint) else None
            if link is not None and link.state != "forwarded":
                out.append(f"{s['sdr_id']} ({s['id_token']}, at {c.me}, to {link.home}: {link.state})")
    return out


async def books_faults(site: Site, mode: str, *, known: Collection[str] = (), wrong: Collection[str] = (),
                       timeout: float = 20.0) -> tuple[list[Book], list[str]]:  # fmt: skip
    """`check_books` without the assertion: the books and the broken invariants, each named (an
    SDR that did not reach its home CSP within `timeout` is one)."""
    assert site.cso is not None and site.ch is not None
    ch = site.ch
    try:
        books: list[Book] = await until(lambda: _books(site, known), timeout, "every roaming SDR at its home CSP")
    except TimeoutError:
        return [], [f"roaming SDRs not at their home CSP after {timeout:.0f} s: {_unsent(site, known)}"]
    if mode != "peer_to_peer":

        def reconciled() -> dict[str, str] | None:
            verdicts = {r.sdr_id: r.verdict for r in ch.reconcile()}
            kept = {str(r[0]): str(r[1]) for r in ch.store.all("SELECT sdr_id, verdict FROM sdrs")}
            return None if "missing" in verdicts.values() or len(kept) < len(books) else kept

        with contextlib.suppress(TimeoutError):  # what is still missing is the verdict below
            await until(reconciled, timeout, "the CSPs' records at the CH")
    faults = []
    sdr_ids = [b.cso_session["sdr_id"] for b in books]
    if len(set(sdr_ids)) != len(books) or len({b.session_id for b in books}) != len(books):
        faults.append(f"one roaming session billed by several CSMS SDRs: {sdr_ids}")
    billed = site.cso.store.get("SELECT COUNT(*) FROM sessions WHERE sdr_id IS NOT NULL")[0]
    if billed != len(books):
        faults.append(f"CSO: {billed} sessions with an SDR, the CSMS has {len(books)} roaming SDRs")
    for csp in _csps(site):
        n = csp.store.get("SELECT COUNT(*) FROM sdrs")[0]
        mine = sum(b.csp == csp.me for b in books) + sum(b.home == csp.me != b.csp for b in books)
        if n != mine:
            faults.append(f"{csp.me}: {n} SDRs received, {mine} roaming sessions are its customers' or its partners'")
    ch_rows = {str(r["session_id"]): dict(r) for r in ch.store.all("SELECT * FROM sdrs")}
    if mode == "peer_to_peer":
        if ch_rows or ch.store.get("SELECT COUNT(*) FROM routed")[0]:
            faults.append("peer to peer, yet the clearing house routed messages or holds SDRs")
    elif len(ch_rows) != len(books):
        faults.append(f"CH: {len(ch_rows)} SDRs for {len(books)} roaming sessions")
    for b in books:
        faults += _one(site, mode, b, ch_rows.get(b.session_id), b.session_id in wrong)
    return books, faults


def _one(site: Site, mode: str, b: Book, ch_row: dict[str, Any] | None, wrong: bool) -> list[str]:
    s, sdr, sid = b.csms, b.csp_sdr, b.session_id
    out = []
    home = next(c for c in _csps(site) if c.me == b.csp)
    lines = publish.sdr_lines(s)
    want_cost = sum(pricing.price(home.tariffs(site.cso.me if site.cso else ""), lines))
    checks: list[tuple[str, object, object]] = [
        ("signed meter data (CSO SDR, CSMS SDR)", sdr.get("signed_meter"), publish.signed_meter(s)),
        ("tariff of each line (CSO SDR, CSMS)", [x.get("tariff_id") for x in sdr.get("lines", [])],
         [x.tariff_id for x in lines]),
        ("lines (CSO SDR, CSMS SDR transactions)", len(sdr.get("lines", [])), len(lines)),
    ]  # fmt: skip
    if not wrong:
        checks += [
            ("energy (CSO SDR, CSMS SDR)", sdr["energy_wh"], s["energy_wh"]),
            ("cost (CSO SDR, priced again with the home CSP's tariffs)", sdr["cost"], want_cost),
            ("the home CSP's verdict", b.verdict, "matched"),
        ]
        if not s.get("split"):  # a card's part of a service session: the CSMS prices the whole
            checks.append(("cost (CSO SDR, the CSMS's price)", sdr["cost"], s["cost"] or 0))
        readings = home.readings(sid)
        if s["energy_wh"] and (not readings or readings[-1][1] != s["energy_wh"]):
            out.append(f"{sid}: the home CSP's own record ends at {readings[-1:]} not {s['energy_wh']} Wh")
    elif not b.verdict.startswith("mismatch"):
        out.append(f"{sid}: a wrong SDR was not flagged by the home CSP: {b.verdict}")
    for what, got, want in checks:
        if got != want:
            out.append(f"{sid}: {what}: {got!r} != {want!r}")
    if b.home != b.csp:
        out += _through_visited(site, b, wrong)
    if mode != "peer_to_peer":
        if ch_row is None:
            out.append(f"{sid}: no SDR at the clearing house")
        else:
            b.ch_verdict = ch_row["verdict"]
            if ch_row["token_uid"] is not None:
                out.append(f"{sid}: the clearing house kept the card number")
            if (ch_row["energy_wh"], ch_row["cost"]) != (sdr["energy_wh"], sdr["cost"]):
                out.append(f"{sid}: the CH's SDR differs from the CSP's")
            ok = {"mismatch", "disputed"} if wrong else {"matched"}
            if ch_row["verdict"] not in ok:
                out.append(f"{sid}: the clearing house's verdict {ch_row['verdict']}, wanted one of {ok}")
    return out


def _through_visited(site: Site, b: Book, wrong: bool) -> list[str]:
    """The home leg of a session billed through a visited CSP: the visited CSP's own SDR at the
    home, as the CSMS billed it (energy, lines, the CSO's price with the home's copy of the
    tariffs, signed meter data), issued by the visited CSP, matched by the home's own record."""
    s, sdr, sid = b.csms, b.home_sdr, b.home_session
    home = next(c for c in _csps(site) if c.me == b.home)
    lines = publish.sdr_lines(s)
    out = []
    checks: list[tuple[str, object, object]] = [
        ("signed meter data (home SDR, CSMS SDR)", sdr.get("signed_meter"), publish.signed_meter(s)),
        ("tariff of each line (home SDR, CSMS)", [x.get("tariff_id") for x in sdr.get("lines", [])],
         [x.tariff_id for x in lines]),
        ("issuer of the home's SDR (the visited CSP)", str(sdr["sdr_id"]).rsplit("*", 1)[0], b.csp.rsplit("*", 1)[0]),
        ("price passed on (home SDR, CSO SDR)", sdr["cost"], b.csp_sdr["cost"]),
    ]  # fmt: skip
    if not wrong:
        want_cost = sum(pricing.price(home.tariffs(site.cso.me if site.cso else ""), lines))
        checks += [
            ("energy (home SDR, CSMS SDR)", sdr["energy_wh"], s["energy_wh"]),
            ("cost (home SDR, priced again with the home CSP's tariffs)", sdr["cost"], want_cost),
            ("the home CSP's verdict", b.home_verdict, "matched"),
        ]
        readings = home.readings(sid)
        if s["energy_wh"] and (not readings or readings[-1][1] != s["energy_wh"]):
            out.append(f"{sid}: the home CSP's own record ends at {readings[-1:]} not {s['energy_wh']} Wh")
    elif not b.home_verdict.startswith("mismatch"):
        out.append(f"{sid}: a wrong SDR was not flagged by the home CSP: {b.home_verdict}")
    for what, got, want in checks:
        if got != want:
            out.append(f"{b.session_id} (home {sid}): {what}: {got!r} != {want!r}")
    return out
