"""Unit tests of the site's authorization rule (S2: the local list, the cache, the operator's
trust window online) and of the site-wide commands' pure parts and state (E2, S5, M10). The
proof on the real chain: tests/scenarios/test_authorization.py, test_site_commands.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from gateway.localcsms.auth import Authorizer
from gateway.localcsms.sitewide import SiteWideStore, dr_shares, in_force
from gateway.schema import AuthStatus, GridEvent, Key

NOW = 10_000


def test_s2_cached_answer_is_not_trusted_online_by_default(tmp_path: Path) -> None:
    a = Authorizer(tmp_path / "a.sqlite")
    a.remember("C1", AuthStatus.ACCEPTED, None, at=NOW)
    d = a.authorize("C1", NOW)
    assert (d.status, d.source, d.trusted) == (AuthStatus.ACCEPTED, "cache", False)


def test_s2_trust_window_trusts_a_young_cached_answer_only(tmp_path: Path) -> None:
    a = Authorizer(tmp_path / "a.sqlite", online_trust_s=60)
    a.remember("C1", AuthStatus.ACCEPTED, None, at=NOW)
    assert a.authorize("C1", NOW + 59).trusted
    assert not a.authorize("C1", NOW + 60).trusted
    assert a.authorize("C1", NOW - 5).trusted  # the clock stepped back a little: within the window


def test_s2_the_local_list_beats_the_cache_and_is_trusted_online(tmp_path: Path) -> None:
    a = Authorizer(tmp_path / "a.sqlite")
    a.remember("C1", AuthStatus.ACCEPTED, None, at=NOW)
    a.update_list(2, True, [("C1", AuthStatus.BLOCKED, None)])
    d = a.authorize("C1", NOW)
    assert (d.status, d.source, d.trusted) == (AuthStatus.BLOCKED, "list", True)


def test_s2_an_expired_entry_answers_expired_and_is_asked_again_online(tmp_path: Path) -> None:
    a = Authorizer(tmp_path / "a.sqlite", online_trust_s=3600)
    a.update_list(1, True, [("L1", AuthStatus.ACCEPTED, NOW - 1)])
    a.remember("C1", AuthStatus.ACCEPTED, NOW - 1, at=NOW - 10)
    for tok in ("L1", "C1"):
        d = a.authorize(tok, NOW)
        assert (d.status, d.trusted) == (AuthStatus.EXPIRED, False), tok


def test_m10_forget_removes_list_and_cache_and_survives_a_restart(tmp_path: Path) -> None:
    a = Authorizer(tmp_path / "a.sqlite")
    a.update_list(1, True, [("P1", AuthStatus.ACCEPTED, None)])
    a.remember("P1", AuthStatus.ACCEPTED, None)
    assert a.forget("P1") == 2
    a.close()
    b = Authorizer(tmp_path / "a.sqlite")
    assert b.authorize("P1", NOW).source == "unknown"


def test_s2_a_database_from_before_the_trust_window_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(str(tmp_path / "old.sqlite"))
    db.execute(
        "CREATE TABLE tokens (token TEXT NOT NULL, source TEXT NOT NULL, status INTEGER NOT NULL,"
        " expiry INTEGER, PRIMARY KEY (source, token))"
    )
    db.execute("INSERT INTO tokens VALUES ('OLD', 'cache', 0, NULL)")
    db.commit()
    db.close()
    a = Authorizer(tmp_path / "old.sqlite", online_trust_s=3600)
    d = a.authorize("OLD", NOW)
    assert (d.status, d.source) == (AuthStatus.ACCEPTED, "cache")
    assert not d.trusted  # its age is unknown: asked again online


def test_e2_a_site_limit_is_shared_and_a_signal_without_one_goes_as_it_is() -> None:
    body: dict[int, Any] = {Key.GRID_EVENT: GridEvent.EMERGENCY, Key.LIMIT_W: 8001, Key.ZONE: 1}
    shares = dr_shares(body, ["a", "b", "c"])
    assert {d: b[Key.LIMIT_W] for d, b in shares.items()} == {"a": 2667, "b": 2667, "c": 2667}
    assert all(Key.ZONE not in b for b in shares.values())
    price: dict[int, Any] = {Key.GRID_EVENT: GridEvent.PRICE, Key.PRICE: 42}
    assert dr_shares(price, ["a"]) == {"a": price}
    assert dr_shares(body, []) == {}


def test_e2_valid_to_bounds_what_is_in_force() -> None:
    assert in_force({Key.GRID_EVENT: 1}, NOW)
    assert in_force({Key.VALID_TO: NOW + 1}, NOW)
    assert not in_force({Key.VALID_TO: NOW}, NOW)


def test_s5_m10_what_is_kept_and_owed_survives_a_restart(tmp_path: Path) -> None:
    s = SiteWideStore(tmp_path / "sw.sqlite")
    tariff: dict[int, Any] = {Key.TARIFF_ID: 7, Key.PRICE_KWH: 30, Key.CURRENCY: "EUR"}
    s.keep("tariff", tariff)
    s.keep("dr:2", {Key.GRID_EVENT: 3, Key.LIMIT_W: 1000, Key.ZONE: 2})
    s.drop(["dr:2"])
    s.owe("P1", ["ev-0", "ev-1"])
    s.paid("P1", "ev-0")
    s.close()
    t = SiteWideStore(tmp_path / "sw.sqlite")
    assert t.kept == {"tariff": tariff}
    assert t.owed == {("P1", "ev-1")}
