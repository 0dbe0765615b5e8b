"""Token lists (R4-2) in each mode: more customers than one message holds go in pages (no
fixed cap), a version is installed at the CSO only once all its pages are there, and a
differential list carries only what changed (a token gone removes it); a CSO that missed a
version gets the full list instead."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from evedge_roaming.csp import TOKEN_PAGE
from evedge_roaming.testbed import CSP, EVSES, Net, running
from gateway.protocol.roaming.client import RoamingError

MODES = ["peer_to_peer", "clearing_house", "mixed"]
pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("mode", MODES)]


def run(tmp_path: Path, mode: str, scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path, mode) as net:
            await scenario(net)

    asyncio.run(main())


def spy(net: Net) -> list[dict[str, Any]]:
    """Every TokenList body the CSP sends."""
    sent: list[dict[str, Any]] = []
    real = net.csp.broadcast

    async def broadcast(message: str, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        if message == "TokenList":
            sent.append(body)
        return await real(message, body)

    net.csp.broadcast = broadcast  # type: ignore[method-assign]
    return sent


def cached(net: Net) -> dict[str, str]:
    return {r[0]: r[1] for r in net.cso.store.all("SELECT token_uid, auth_status FROM token_cache")}


def test_r4_2_a_list_longer_than_one_message_goes_in_pages(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        n = TOKEN_PAGE + 44  # 300: one message holds 256
        for i in range(n):
            net.csp.add_customer(f"04{i:08X}")
        sent = spy(net)
        await net.csp.distribute_tokens()
        assert [(b["page"], b["pages"], len(b["tokens"])) for b in sent] == [(0, 2, TOKEN_PAGE), (1, 2, 44)]
        assert len(cached(net)) == n
        answer = await net.cso.token_presented(EVSES[0], f"04{n - 1:08X}")  # from the last page
        assert answer["auth_status"] == "accepted"

    run(tmp_path, mode, scenario)


def test_r4_2_a_version_is_installed_only_when_every_page_is_there(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04OLD")
        await net.csp.distribute_tokens()
        body = {"party_id": CSP, "list_version": 2, "update_type": "full", "pages": 2}
        first = [{"token_uid": "04NEW1", "auth_status": "accepted"}]
        await net.csp.broadcast("TokenList", body | {"page": 0, "tokens": first})
        assert cached(net) == {"04OLD": "accepted"}  # half a list changes nothing yet
        await net.csp.broadcast(
            "TokenList", body | {"page": 1, "tokens": [{"token_uid": "04NEW2", "auth_status": "blocked"}]}
        )
        assert cached(net) == {"04NEW1": "accepted", "04NEW2": "blocked"}

    run(tmp_path, mode, scenario)


def test_r4_2_a_csp_cannot_pile_up_lists_it_never_completes(tmp_path: Path, mode: str) -> None:
    """Bounds: the CSO keeps the pages of one list in the making per CSP; the pages of an older
    version never completed, or of the same version cut otherwise, are dropped."""

    async def scenario(net: Net) -> None:
        one = [{"token_uid": "04HALF", "auth_status": "accepted"}]
        for version in range(2, 12):  # ten versions, each with its first page only
            body = {"party_id": CSP, "list_version": version, "update_type": "full", "pages": 4096, "page": 0}
            await net.csp.broadcast("TokenList", body | {"tokens": one})
        body = {"party_id": CSP, "list_version": 11, "update_type": "full", "pages": 3, "page": 1}
        await net.csp.broadcast("TokenList", body | {"tokens": one})
        rows = net.cso.store.all("SELECT version, page, pages FROM token_pages WHERE party=?", CSP)
        assert [tuple(r) for r in rows] == [(11, 1, 3)]
        assert cached(net) == {}  # nothing installed from a list never completed

    run(tmp_path, mode, scenario)


def test_r4_2_a_differential_list_carries_only_the_changes(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        for i in range(10):
            net.csp.add_customer(f"04{i:08X}")
        await net.csp.distribute_tokens()
        sent = spy(net)
        net.csp.add_customer("0400000001", status="blocked")  # changed
        net.csp.store.exec("DELETE FROM customers WHERE token_uid='0400000002'")  # gone
        net.csp.add_customer("04NEWCARD")  # new
        await net.csp.distribute_tokens("differential")
        [body] = sent
        assert body["update_type"] == "differential"
        assert {t["token_uid"]: t["auth_status"] for t in body["tokens"]} == {
            "0400000001": "blocked",
            "0400000002": "invalid",
            "04NEWCARD": "accepted",
        }
        have = cached(net)
        assert len(have) == 10 and "0400000002" not in have
        assert (have["0400000001"], have["04NEWCARD"]) == ("blocked", "accepted")
        answer = await net.cso.token_presented(EVSES[0], "0400000001")
        assert answer["auth_status"] == "blocked"

    run(tmp_path, mode, scenario)


def test_r4_2_a_cso_that_missed_a_version_gets_the_full_list(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        net.csp.add_customer("04AAAA")
        await net.csp.distribute_tokens()
        net.cso.store.exec("DELETE FROM token_lists")  # the CSO lost its list (restored from an old backup)
        net.cso.store.exec("DELETE FROM token_cache")
        body = {"party_id": CSP, "list_version": 9, "update_type": "differential", "tokens": []}
        with pytest.raises(RoamingError) as exc:
            await net.csp.broadcast("TokenList", body)
        assert exc.value.cause == "version_gap"
        sent = spy(net)
        net.csp.add_customer("04BBBB")
        await net.csp.distribute_tokens("differential")
        assert [b["update_type"] for b in sent] == ["differential", "full"]
        assert cached(net) == {"04AAAA": "accepted", "04BBBB": "accepted"}

    run(tmp_path, mode, scenario)


def test_r4_2_versions_sent_downwards_pile_up_nothing_and_the_page_count_is_bounded(tmp_path: Path, mode: str) -> None:
    """Bounds: the latest page a CSP sends is all the CSO stages of its lists in the making: a
    version lower than one arriving replaces it (before, versions sent downwards — V, V−1, V−2 …
    — each kept their pages until the retention purge); more pages than `max_list_pages` is 413
    `too_large`, changing nothing."""

    async def scenario(net: Net) -> None:
        one = [{"token_uid": "04DOWN", "auth_status": "accepted"}]
        body = {"party_id": CSP, "update_type": "full", "page": 0, "tokens": one}
        for version in (50, 49, 48, 47):
            await net.csp.broadcast("TokenList", body | {"list_version": version, "pages": 4})
        rows = net.cso.store.all("SELECT version, page, pages FROM token_pages WHERE party=?", CSP)
        assert [tuple(r) for r in rows] == [(47, 0, 4)]
        before = net.cso.store.snapshot()
        too_many = net.cso.cfg.max_list_pages + 1
        with pytest.raises(RoamingError) as exc:
            await net.csp.broadcast("TokenList", body | {"list_version": 51, "pages": too_many})
        assert (exc.value.status, exc.value.cause, exc.value.field) == (413, "too_large", "pages")
        assert net.cso.store.snapshot() == before
        assert cached(net) == {}

    run(tmp_path, mode, scenario)
