"""What an operator must be able to trust on a site at every instant, sampled while a scenario or
the fault campaign runs (DESIGN.md, "Proof on the real chain"; docs/design/testing.md):

- **limits**: the power the boards' meters draw, summed over the boards a limit covers, stays
  within every limit in force (site, zone, DSO, resource manager, charging profile) from that
  limit's deadline on, across board reboots and gateway restarts;
- **no energy without a transaction**: a board whose meter shows power has a transaction; on a
  board with several EVSEs, each EVSE whose meter shows power has one of its own;
- **registration**: a board the CSMS has not accepted (pending, rejected, deregistered) draws
  nothing once the decision is `registration_grace_s` old;
- **billing** (`billing_faults`, checked at the end): every transaction the CSMS saw end is
  billed exactly once, at the tariff it ran under, and every transaction a board ended reached
  the CSMS's books.

`Checker` is the pure part: it is fed samples (`observe`) and keeps what broke. `Sampler` is the
asyncio glue that probes the boards of a `Site` (the emulated board's `probe` control command:
power, transaction, contactor, registration) a few times a second.

Why a violation must persist for `settle_s`: the boards are probed one after the other, not at
one instant, and a new share is sent to one board before another; a sum over probes taken
100 ms apart can add a board's old share to another's new one. Only an excess seen in every
sample for `settle_s` (default 1 s, well under any deadline a DSO or RM sets) is a fault of
the site; every excess is still recorded (`Checker.excursions`) and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Limit:
    """A limit in force: the boards `devices` (None: every board of the site) together draw at
    most `watts` from `start` (monotonic seconds: the deadline) until `end` (None: for good)."""

    watts: int
    devices: tuple[str, ...] | None
    start: float
    end: float | None = None
    what: str = ""

    def in_force(self, now: float) -> bool:
        return self.start <= now and (self.end is None or now < self.end)

    def __str__(self) -> str:
        who = "the site" if self.devices is None else ",".join(self.devices)
        return f"{self.what or 'limit'} {self.watts} W over {who}"


@dataclass(frozen=True)
class Probe:
    """One board's answer to a probe: its meters' power (W, negative when discharging), a
    transaction of it, a contactor closed, whether it considers itself registered; on a board
    with several EVSEs, each EVSE's (power W, transaction or None) in order."""

    power_w: int
    tx_id: object
    contactor: bool
    registered: bool
    evses: tuple[tuple[int, object], ...] = ()


@dataclass
class Checker:
    """The pure invariant checker (no I/O): fed one round of probes at a time."""

    settle_s: float = 1.0
    registration_grace_s: float = 5.0
    limits: list[Limit] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    excursions: list[str] = field(default_factory=list)
    samples: int = 0
    _over: dict[int, float] = field(default_factory=dict)  # id(limit) -> when the excess began
    _unaccepted: dict[str, float] = field(default_factory=dict)  # device -> since when not accepted
    _reported: set[tuple[str, str]] = field(default_factory=set)

    def limit(self, watts: int, devices: Iterable[str] | None = None, start: float = 0.0, what: str = "") -> Limit:
        lim = Limit(int(watts), None if devices is None else tuple(sorted(devices)), start, what=what)
        self.limits.append(lim)
        return lim

    def _fault(self, key: tuple[str, str], text: str) -> None:
        if key not in self._reported:  # one line per fault and subject, not one per sample
            self._reported.add(key)
            self.violations.append(text)

    def observe(self, now: float, probes: Mapping[str, Probe], registration: Mapping[str, str]) -> None:
        """One round: `probes` of the boards that answered, `registration` the CSMS's decision
        per device (absent: the CSMS has not decided, e.g. never booted)."""
        self.samples += 1
        for did, p in probes.items():
            if p.power_w != 0 and p.tx_id is None:
                self._fault(("no-tx", did), f"{did}: {p.power_w} W drawn with no transaction (t={now:.2f})")
            for n, (w, tx) in enumerate(p.evses, 1):
                if w != 0 and tx is None:
                    self._fault(("no-tx", f"{did}#{n}"), f"{did} EVSE {n}: {w} W drawn with no transaction "
                                                         f"on it (t={now:.2f})")  # fmt: skip
        for did, decided in registration.items():
            if decided == "accepted":
                self._unaccepted.pop(did, None)
                continue
            since = self._unaccepted.setdefault(did, now)
            seen = probes.get(did)
            if seen is not None and seen.power_w != 0 and now - since >= self.registration_grace_s:
                self._fault(("registration", did), f"{did}: {seen.power_w} W drawn while {decided} at the CSMS "
                                                   f"for {now - since:.1f} s")  # fmt: skip
        for lim in self.limits:
            if not lim.in_force(now):
                self._over.pop(id(lim), None)
                continue
            covered = probes if lim.devices is None else {d: probes[d] for d in lim.devices if d in probes}
            drawn = sum(p.power_w for p in covered.values())
            if drawn <= lim.watts:
                self._over.pop(id(lim), None)
                continue
            began = self._over.setdefault(id(lim), now)
            detail = ", ".join(f"{d} {p.power_w}" for d, p in sorted(covered.items()))
            self.excursions.append(f"t={now:.2f} {lim}: {drawn} W ({detail})")
            if now - began >= self.settle_s:
                self._fault(("limit", str(id(lim))), f"{lim} broken for {now - began:.1f} s: {drawn} W ({detail})")


def configured_limits(checker: Checker, gateway_doc: Mapping[str, Any]) -> None:
    """Declares the site and zone limits of a gateway's configuration (its TOML as a dict), in
    force from the start: the site holds them with no command from anybody (E1)."""
    power = gateway_doc.get("power", {})
    if "site_limit_w" in power:
        checker.limit(int(power["site_limit_w"]), None, 0.0, "site limit (configured)")
    for z in power.get("zone", []):
        checker.limit(int(z["limit_w"]), z["devices"], 0.0, f"zone {z['zone']} limit (configured)")


class BoardLike(Protocol):
    """What the sampler needs of an emulated board (tools.board.Board is one)."""

    device_id: str

    def alive(self) -> bool: ...

    def cmd(self, cmd: str, **kw: Any) -> None: ...

    def mark(self) -> int: ...

    def wait(self, ev: str, pred: Callable[[dict[str, Any]], bool] | None = ..., timeout: float = ...,
             since: int = ...) -> dict[str, Any]: ...  # fmt: skip


class Sampler:
    """Probes `boards()` every `period_s` and feeds a `Checker`; `registration()` gives the
    CSMS's decisions (device -> accepted|pending|rejected)."""

    def __init__(self, boards: Callable[[], Sequence[BoardLike]], registration: Callable[[], Mapping[str, str]],
                 checker: Checker | None = None, period_s: float = 0.2) -> None:  # fmt: skip
        self.boards = boards
        self.registration = registration
        self.checker = checker or Checker()
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _probe(b: BoardLike) -> Probe | None:
        if not b.alive():
            return None
        m = b.mark()
        try:
            b.cmd("probe")
            e = b.wait("probe", None, 3.0, m)
        except (TimeoutError, OSError, ValueError, AssertionError):
            return None  # the board was cut (a power-cut fault) or is starting: no sample of it
        per = tuple((int(w), tx) for w, tx in e.get("e", ()))
        return Probe(int(e["p"]), e["tx"], bool(e["c"]), bool(e["r"]), per)

    async def round(self) -> None:
        boards = list(self.boards())
        got = await asyncio.gather(*(asyncio.to_thread(self._probe, b) for b in boards))
        probes = {b.device_id: p for b, p in zip(boards, got, strict=True) if p is not None}
        self.checker.observe(time.monotonic(), probes, self.registration())

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as e:  # a sampler that stops would pass every check: it says so instead
                self.checker.violations.append(f"the invariant sampler failed: {type(e).__name__}: {e}")
                raise
            await asyncio.sleep(self.period_s)

    def start(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def billing_faults(transactions: Sequence[Mapping[str, Any]], sdrs: Sequence[Mapping[str, Any]],
                   ended_at_boards: Iterable[tuple[str, object]] = ()) -> list[str]:  # fmt: skip
    """Every transaction the CSMS saw end billed exactly once, at the tariff it ran under; every
    (device, tx id) a board ended known to the CSMS as ended. `transactions` are the CSMS's
    transactions (`api.sessions()`), `sdrs` its billing lines (`api.billed_transactions()`: an
    SDR is per service session and lists its transactions, IEC 63110-1 clause 6)."""
    faults: list[str] = []
    billed: dict[tuple[str, str, object], list[Mapping[str, Any]]] = {}
    for s in sdrs:
        billed.setdefault((s["site_id"], s["device_id"], s["tx_id"]), []).append(s)
    ended = set()
    for t in transactions:
        key = (t["site_id"], t["device_id"], t["tx_id"])
        if t.get("state") != "ended":
            continue
        ended.add((t["device_id"], t["tx_id"]))
        got = billed.get(key, [])
        if len(got) != 1:
            faults.append(f"transaction {key} billed {len(got)} times")
        elif t.get("tariff_id") is not None and got[0].get("tariff_id") != t.get("tariff_id"):
            faults.append(f"transaction {key} ran under tariff {t['tariff_id']} but was billed at "
                          f"{got[0].get('tariff_id')}")  # fmt: skip
    for key in billed:
        if not any((t["site_id"], t["device_id"], t["tx_id"]) == key for t in transactions):
            faults.append(f"SDR for {key}, a transaction the CSMS does not know")
    for did, tx in ended_at_boards:
        if (did, tx) not in ended:
            faults.append(f"{did}: transaction {tx} ended at the board, not ended at the CSMS")
    return faults
