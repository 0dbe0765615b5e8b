"""The invariants themselves can fail: the pure checker on made-up samples, and the sampler on a
real site where a board charges through a limit the scenario declares but nobody enforces."""

from __future__ import annotations

from pathlib import Path

import pytest
from realsite import Invariants, Site, scenario

from tools.site.harness import board_status, board_wait, until
from tools.site.invariants import Checker, Probe, billing_faults

pytestmark = pytest.mark.timeout(120)

IDLE = Probe(0, None, False, True)


def charging(w: int, tx: object = 1) -> Probe:
    return Probe(w, tx, True, True)


def test_a_limit_broken_longer_than_the_settle_time_is_a_violation() -> None:
    c = Checker(settle_s=1.0)
    c.limit(10_000, None, start=5.0, what="site")
    c.observe(1.0, {"a": charging(11_000), "b": charging(11_000)}, {})  # before the deadline: fine
    c.observe(5.0, {"a": charging(11_000), "b": charging(0)}, {})  # over, but just begun
    c.observe(5.5, {"a": charging(9_000), "b": charging(0)}, {})  # back under: the excess forgotten
    c.observe(6.0, {"a": charging(6_000), "b": charging(6_000)}, {})
    assert not c.violations and len(c.excursions) == 2
    c.observe(7.0, {"a": charging(6_000), "b": charging(6_000)}, {})
    assert len(c.violations) == 1 and "site 10000 W over the site broken for 1.0 s" in c.violations[0]
    c.observe(9.0, {"a": charging(6_000), "b": charging(6_000)}, {})
    assert len(c.violations) == 1  # one line per broken limit, not one per sample


def test_a_zone_limit_counts_only_its_boards_and_ends_when_lifted() -> None:
    c = Checker(settle_s=0.0)
    z = c.limit(5_000, ["a"], what="zone")
    c.observe(1.0, {"a": charging(4_000), "b": charging(11_000)}, {})
    assert not c.violations
    z.end = 2.0
    c.observe(2.5, {"a": charging(11_000)}, {})
    assert not c.violations
    c.observe(1.5, {"a": charging(6_000)}, {})
    assert c.violations


def test_power_without_a_transaction_and_power_while_not_accepted_are_violations() -> None:
    c = Checker(registration_grace_s=2.0)
    c.observe(1.0, {"a": Probe(3_000, None, True, True), "b": IDLE}, {})
    assert c.violations == ["a: 3000 W drawn with no transaction (t=1.00)"]
    c = Checker(registration_grace_s=2.0)
    c.observe(1.0, {"a": charging(3_000)}, {"a": "rejected"})
    c.observe(2.0, {"a": charging(3_000)}, {"a": "rejected"})
    assert not c.violations  # within the grace
    c.observe(3.0, {"a": charging(3_000)}, {"a": "rejected"})
    assert c.violations and "while rejected at the CSMS" in c.violations[0]


def test_power_on_an_evse_without_its_own_transaction_is_a_violation() -> None:
    # a twin board: EVSE 1 charges in its transaction; EVSE 2 drawing with none is a fault even
    # though the board as a whole has a transaction
    c = Checker()
    c.observe(1.0, {"a": Probe(7_000, 5, True, True, ((4_000, 5), (3_000, 6)))}, {})
    assert not c.violations
    c.observe(2.0, {"a": Probe(7_000, 5, True, True, ((4_000, 5), (3_000, None)))}, {})
    assert c.violations == ["a EVSE 2: 3000 W drawn with no transaction on it (t=2.00)"]


def test_billing_twice_never_or_at_another_tariff_is_a_fault() -> None:
    tx = {"site_id": "S", "device_id": "a", "tx_id": 1, "state": "ended", "tariff_id": 2}
    sdr = {"site_id": "S", "device_id": "a", "tx_id": 1, "tariff_id": 2}
    assert billing_faults([tx], [sdr], [("a", 1)]) == []
    assert billing_faults([tx], [], []) == ["transaction ('S', 'a', 1) billed 0 times"]
    assert billing_faults([tx], [sdr, sdr], []) == ["transaction ('S', 'a', 1) billed 2 times"]
    assert "billed at 3" in billing_faults([tx], [{**sdr, "tariff_id": 3}], [])[0]
    assert "not ended at the CSMS" in billing_faults([], [], [("a", 7)])[0]
    assert "does not know" in billing_faults([], [sdr], [])[0]


def test_the_sampler_sees_real_power_through_a_limit_nobody_enforces(tmp_path: Path) -> None:
    """A limit declared but never sent to the site: the board charges through it and the run
    fails, naming it. (The invariant fails when the world breaks it, not only on paper.)"""

    async def fn(site: Site, inv: Invariants) -> None:
        assert site.csms is not None
        site.csms.api.add_token("04INV")
        b = site.boards[0]
        inv.limit(1_000, [b.device_id], deadline_s=0.0, what="undeclared-to-the-site limit")
        m = b.mark()
        b.cmd("card", token="04INV")
        b.cmd("plug")
        await board_wait(b, "tx_started", since=m)
        await board_status(b, lambda st: st["power_w"] > 1_000)
        await until(lambda: inv.checker.violations, 10, "the sampler's verdict")  # its rounds, for 1 s
        b.cmd("unplug")
        await board_wait(b, "tx_ended", since=m)

    with pytest.raises(AssertionError, match=r"undeclared-to-the-site limit 1000 W over ev-0000 broken"):
        scenario(tmp_path, fn, boards=1)
