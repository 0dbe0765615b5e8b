"""Soak and fault campaign: `python -m tools.site.campaign [--minutes M] [--seed S] [--boards N]`.

The CSMS runs in this process; the gateway is a real `python -m gateway --config …`
subprocess; the boards are real MicroPython processes. While sessions run (card, plug,
charge, unplug) and boards emit numbered billing MeterValues, seeded random faults are
injected: board power cuts (SIGKILL, power up again), `kill -9` of the gateway (restarted
on the same ports and data), upstream cuts (the CSMS stopped, then started), clock steps
on boards. Then everything comes back, the backlog drains, and the run checks:

- no loss: every MeterValues a board confirmed (its `status` answer came after the emit, so
  it was on its flash) is stored at the CSMS;
- no duplicate: each one stored once, each (site, device, msg id, group) once (the CSMS
  counts the redeliveries it deduplicated), transaction events unique per (tx, seq_no);
- order per device: the CSMS received each device's emitted values in emit order;
- every SDR reconciles with the metered energy of its transaction (meter stop − start, and
  the board's own figure when it printed one);
- the invariants of tools/site/invariants.py, sampled for the whole run (faults included): the
  site limit (set to bind: `SITE_LIMIT_W_PER_BOARD` a board, less than two sessions draw) and
  the zone limit hold, no board draws without a transaction or while the CSMS has not
  accepted it, and every transaction the CSMS saw end is billed exactly once.

`--ocpp`: the same campaign with the gateway's OCPP 2.0.1 northbound on (docs/ocpp.md), against
the `ocpp` library's CSMS (tools/site/ocpp_csms.py) beside the native one; an upstream cut is an
outage of the OCPP CSMS, and the checks read what the OCPP CSMS received: no loss and order of
the numbered MeterValues, no duplicate (a message sent again with its message id, after a kill
between the CSMS's answer and the gateway's cursor, is a retransmission the CSMS can tell and is
counted as such; a value under two message ids is a duplicate), every transaction's
TransactionEvents with seqNo 0, 1, … once each, Started first and Ended last, and its Ended
event's energy register minus its Started one equal to the board's own figure.

`--roaming [MODE]`: the same campaign with the IEC 63119 roaming endpoints on (docs/roaming.md;
MODE peer_to_peer, clearing_house or mixed, the default): the CSO endpoint beside the CSMS,
two home CSPs and the clearing house. Of each board's cards one is the operator's own and one
a roaming card of each home CSP (a contract id with its provider, on the CSPs' token lists);
the operator's tariff reaches the home CSPs. The faults are the same (an upstream cut stops the
CSMS; the roaming endpoints stay up). At the end, beside the checks above, the roaming billing
invariants (tools/site/roaming_books.py): every roaming session exactly one SDR at the CSMS,
the CSO endpoint, its home CSP and (not peer to peer) the clearing house, priced with the
tariff in force, its signed meter data end to end, matched by the home CSP and the CH.

The seed is printed; `--seed S` replays the same fault schedule: the faults come from their
own `random.Random(seed)` (`fault_schedule`, printed at the start), drawn before the run, so
the same seed gives the same faults (kind, board, outage and step lengths) in the same order
at the same offsets. Each fault is injected at its offset or, when the one before took longer
(a gateway restart), right after it. The traffic (sessions, emits, steps) has an RNG of its
own and depends on the machine's timing; it is not replayed. Exit status 1 on a failed check.
The CI runs a short campaign (tests/test_soak_campaign.py); `--minutes 30` soaks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.protocol import devpki
from tools.board import Board
from tools.site.harness import SITE_ID, Site, board_status, factory_key, until
from tools.site.invariants import Checker, Sampler, billing_faults, configured_limits
from tools.site.ocpp_csms import PASSWORD as OCPP_PASSWORD
from tools.site.ocpp_csms import OcppCsms, Seen
from tools.site.roaming_books import MODES as ROAMING_MODES
from tools.site.roaming_books import books_faults

ROOT = Path(__file__).resolve().parents[2]
EMIT_BASE = 10_000_000  # emitted MeterValues carry energy_wh = EMIT_BASE * (board + 1) + k
SITE_LIMIT_W_PER_BOARD = 6000
"""The campaign's site limit is this times the boards: a session draws up to 11 kW, so two at
once already need the gateway to share (E1), through every fault."""
FAULTS = ("board_power_cut", "gateway_kill9", "upstream_cut", "clock_step")
ROAMING_TARIFF = (7, 250, 40)
"""(tariff id, price per kWh, session fee), EUR cents: the operator's tariff in a --roaming
campaign, set before the first session, so that every roaming SDR has a price the home CSPs check."""


def roaming_cards(board: int) -> tuple[str, str]:
    """Board `board`'s roaming cards: a customer of home CSP A, one of B (contract ids whose
    provider routes them; also on the CSPs' token lists, for the offline site)."""
    return f"DE*HCP*CSOAK{board:05d}", f"DE*HCB*CSOAK{board:05d}"


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule."""

    at_s: float
    """Offset from the start of the fault phase, seconds."""
    kind: str
    board: int
    """The board it hits (board power cut, clock step); drawn for every kind."""
    pause_s: float
    """How long the part stays down (power cut, gateway kill -9, upstream cut)."""
    step_ms: int
    """The clock step (clock_step)."""

    def __str__(self) -> str:
        if self.kind == "clock_step":
            what = f"board {self.board}, +{self.step_ms // 1000} s"
        elif self.kind == "board_power_cut":
            what = f"board {self.board}, off {self.pause_s:.2f} s"
        else:
            what = f"down {self.pause_s:.2f} s"
        return f"{self.at_s:.1f} s {self.kind} ({what})"


def fault_schedule(seed: int, seconds: float, boards: int) -> list[Fault]:
    """The faults of a campaign, from `random.Random(seed)` alone: one every 1–3 s from the
    start of the fault phase until `seconds`. The same arguments give the same list."""
    rng = random.Random(seed)
    out: list[Fault] = []
    t = rng.uniform(1.0, 3.0)
    while t < seconds:
        kind = rng.choice(FAULTS)
        board = rng.randrange(boards)
        pause = rng.uniform(0.5, 2.0) if kind == "upstream_cut" else rng.uniform(0.1, 1.0)
        out.append(Fault(round(t, 3), kind, board, round(pause, 3), rng.randint(10, 3600) * 1000))
        t += rng.uniform(1.0, 3.0)
    return out


class GatewayProcess:
    """`python -m gateway --config FILE` as a subprocess; `kill9()` and `start()` again.

    `doc` is its configuration, written to FILE. Its LAN and metrics ports are 0 there at first:
    the gateway binds ephemeral ones and names them on its `READY lan=… metrics=…` line; they
    are then written into FILE, so that a restart listens where the boards reconnect."""

    def __init__(self, config: Path, doc: dict[str, Any]) -> None:
        self.config = config
        self.doc = doc
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        """The ports it bound ("lan", "metrics"), from its first READY line."""
        self.log: list[str] = []
        devpki.write_private(config, _toml(doc).encode())  # it holds the factory seed

    def start(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while True:
            done = threading.Event()
            ready: list[str] = []
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(self.config)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            )  # fmt: skip
            threading.Thread(target=self._read, args=(self.proc, done, ready), daemon=True).start()
            done.wait(max(0.1, end - time.monotonic()))  # set on READY, or when it exits
            if ready:
                break
            self.kill9()
            # A restart binds the ports of the first start again (the boards reconnect there):
            # another program may have taken one in the short time it was free, by rare chance
            # (the kernel hands out ephemeral ports at random over the whole range): retry.
            in_use = bool(self.ports) and any("Address already in use" in line for line in self.log[-20:])
            if not in_use or time.monotonic() > end:
                raise RuntimeError("gateway not ready:\n" + "\n".join(self.log[-20:]))
            time.sleep(0.2)
        if not self.ports:
            self.ports = {k: int(v) for k, v in (kv.split("=") for kv in ready[0].split()[1:])}
            self.doc["lan"]["listen"] = f"127.0.0.1:{self.ports['lan']}"
            self.doc["metrics"]["listen"] = f"127.0.0.1:{self.ports['metrics']}"
            devpki.write_private(self.config, _toml(self.doc).encode())

    def _read(self, p: subprocess.Popen[str], done: threading.Event, ready: list[str]) -> None:
        """Keeps the last lines of `p`'s output; `ready` gets its READY line, `done` is set then
        (or when `p` exits before)."""
        assert p.stdout is not None
        for line in p.stdout:
            self.log.append(line.rstrip())
            del self.log[:-200]
            if line.startswith("READY"):
                ready.append(line.strip())
                done.set()
        p.stdout.close()  # the process is gone: its pipe with it
        done.set()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


class Campaign:
    def __init__(self, root: Path, boards: int, seconds: float, seed: int, ocpp: bool = False,
                 roaming: str | None = None) -> None:  # fmt: skip
        self.root, self.n, self.seconds, self.seed = root, boards, seconds, seed
        self.ocpp = OcppCsms() if ocpp else None
        """The OCPP CSMS (--ocpp): what the checks read."""
        if roaming is not None and roaming not in ROAMING_MODES:
            raise ValueError(f"roaming mode {roaming!r}: one of {ROAMING_MODES}")
        self.roaming = roaming
        """The roaming network's mode (--roaming), or None: no roaming endpoints."""
        self.schedule = fault_schedule(seed, seconds, boards)
        self.rng = random.Random(f"traffic {seed}")  # the traffic's own: timing-dependent, not replayed
        self.site = Site(root, boards, roaming=roaming is not None, roaming_mode=roaming or "mixed")
        self.roaming_sessions = 0
        self.gw: GatewayProcess | None = None
        self.boards: list[Board] = []
        self.faults: Counter[str] = Counter()
        self.confirmed: dict[str, list[int]] = {}  # device → emitted values confirmed on flash
        self.issued: dict[str, int] = {}
        self.board_wh: dict[tuple[str, int], int] = {}  # (device, tx id) → the board's tx_ended wh
        self.sessions = 0
        self.redelivered = 0
        self.csms_up = False
        self.problems: list[str] = []
        self.checker = Checker()
        self.t_faults = 0.0
        """When the fault phase began (monotonic): the schedule's offsets count from there."""
        self.sampler = Sampler(lambda: self.boards, self._registration, self.checker)

    def _registration(self) -> dict[str, str]:
        csms = self.site.csms
        if csms is None or not self.csms_up:
            return {}  # the CSMS is down (an upstream cut): the decisions it holds are unchanged
        return {r["device_id"]: r["registration"] for r in csms.api.stations() if r["registration"]}

    # ------------------------------------------------------------------ set-up
    async def start(self) -> None:
        s = self.site
        csms = await s.start_csms()
        self.csms_up = True
        for i in range(self.n):
            csms.api.add_token(f"SOAK-{i}")  # the CSMS answers online; the site caches (S2)
        if self.roaming is not None:
            await self._start_roaming()
        doc = s.gateway_doc()  # LAN and metrics on port 0: the gateway names the ports it bound
        doc.setdefault("auth", {})["unknown_token_offline"] = "accept"  # cards: the site decides
        doc["power"]["site_limit_w"] = SITE_LIMIT_W_PER_BOARD * self.n
        if self.ocpp is not None:
            await self.ocpp.start()
            pw = self.root / "ocpp-password"
            devpki.write_private(pw, OCPP_PASSWORD.encode())
            doc["ocpp"] = {"url": self.ocpp.url, "password_file": str(pw), "timeout_s": 5.0, "backoff_max_s": 0.5}
        configured_limits(self.checker, doc)
        self.gw = GatewayProcess(self.root / "gateway.toml", doc)
        await asyncio.to_thread(self.gw.start)
        lan_port = self.gw.ports["lan"]
        for did in s.devices:
            b = Board(self.root / "boards" / did, lan_port, did, factory_key(s.seed, did))
            self.boards.append(b.start())
            self.confirmed[did] = []
            self.issued[did] = 0
        await asyncio.gather(*(asyncio.to_thread(b.wait, "registration", None, 30) for b in self.boards))
        if self.roaming is not None:
            await self._roaming_tariff()
        self.sampler.start()

    async def _start_roaming(self) -> None:
        """The CSO, home CSP A and B and CH endpoints (in this process, beside the CSMS); each
        board's roaming cards the CSPs' customers, on their token lists."""
        s = self.site
        await s.start_roaming()
        assert s.csp is not None and s.csp_b is not None
        for i in range(self.n):
            a, b = roaming_cards(i)
            s.csp.add_customer(a, contract_id=a)
            s.csp_b.add_customer(b, contract_id=b)
        for csp in (s.csp, s.csp_b):
            await csp.distribute_tokens("full")

    async def _roaming_tariff(self) -> None:
        """The operator's tariff at the CSMS, to the boards and, published, the home CSPs."""
        s = self.site
        csms = s.csms
        assert csms is not None and s.csp is not None and s.csp_b is not None and s.cso is not None
        tariff_id, price_kwh, fee = ROAMING_TARIFF
        cmd = csms.api.set_tariff(SITE_ID, tariff_id, price_kwh, "EUR", price_session=fee, targets=s.devices)
        row = await s.command_done(cmd, 30)
        if row["state"] != "done":
            raise RuntimeError(f"SetTariff: {row}")
        cso, csps = s.cso.me, (s.csp, s.csp_b)
        await until(lambda: all(tariff_id in c.tariffs(cso) for c in csps), 20, "the tariff at the home CSPs")

    async def close(self) -> None:
        await self.sampler.stop()
        for b in self.boards:
            b.stop()
        if self.gw is not None:
            await asyncio.to_thread(self.gw.stop)
        s = self.site
        if s.bridge is not None:
            await s.bridge.stop()
        for ep in (s.cso, s.csp, s.csp_b, s.ch):
            if ep is not None and ep.server is not None:
                await ep.stop()
        await self._csms_stop()
        if self.ocpp is not None:
            await self.ocpp.stop()

    async def _csms_stop(self) -> None:
        s = self.site
        if s.csms is not None and self.csms_up:
            self.redelivered += s.csms.ctx.counters.get("redelivered", 0)
            self.csms_up = False
            await s.stop_csms()

    # ------------------------------------------------------------------ traffic
    async def confirm(self, b: Board, values: list[int]) -> None:
        """`status` answered after the emit: the values were written to flash."""
        m = b.mark()
        b.cmd("status")
        try:
            await asyncio.to_thread(b.wait, "status", None, 5, m)
        except TimeoutError:
            return  # power cut in between: not confirmed (may or may not arrive; never twice)
        self.confirmed[b.device_id].extend(values)

    async def traffic(self, i: int) -> None:
        b = self.boards[i]
        if not b.alive():
            return
        roll = self.rng.random()
        if roll < 0.5:
            k = self.issued[b.device_id]
            n = self.rng.randint(1, 6)
            values = [EMIT_BASE * (i + 1) + k + j for j in range(n)]
            self.issued[b.device_id] = k + n
            b.cmd("emit", n=n, **{"from": values[0]})
            await self.confirm(b, values)
        elif roll < 0.7:
            card = f"SOAK-{i}"
            if self.roaming is not None:  # the operator's own card, or one of a home CSP's
                card = self.rng.choice((card, *roaming_cards(i)))
                self.roaming_sessions += card != f"SOAK-{i}"
            b.cmd("card", token=card)
            b.cmd("plug")
            self.sessions += 1
        elif roll < 0.9:
            b.cmd("step", ms=self.rng.randint(1, 5) * 60_000)
        else:
            b.cmd("unplug")

    async def fault(self, f: Fault) -> None:
        kind = f.kind
        s = self.site
        if kind == "board_power_cut":
            b = self.boards[f.board]
            b.kill()
            await asyncio.sleep(f.pause_s)  # the outage's length
            b.start()
        elif kind == "gateway_kill9":
            assert self.gw is not None
            self.gw.kill9()
            await asyncio.sleep(f.pause_s)
            await asyncio.to_thread(self.gw.start)
        elif kind == "upstream_cut" and self.ocpp is not None:  # an outage of the OCPP CSMS
            await self.ocpp.stop()
            await asyncio.sleep(f.pause_s)
            await self.ocpp.start()
        elif kind == "upstream_cut":
            await self._csms_stop()
            await asyncio.sleep(f.pause_s)
            await s.start_csms()
            self.csms_up = True
        else:  # the board's clock jumps (and its meter runs on)
            b = self.boards[f.board]
            if b.alive():
                b.cmd("step", ms=f.step_ms)
        self.faults[kind] += 1

    async def run(self) -> None:
        """Traffic every 0.2 s; each fault of the schedule at its offset (or right after the one
        before, when that one ran late), every one of them injected; at least `seconds` long."""
        t0 = self.t_faults = time.monotonic()
        pending = list(self.schedule)
        while pending or time.monotonic() < t0 + self.seconds:
            await asyncio.gather(*(self.traffic(i) for i in range(self.n)))
            if pending and time.monotonic() >= t0 + pending[0].at_s:
                await self.fault(pending.pop(0))
            await asyncio.sleep(0.2)  # the traffic's pace

    # ------------------------------------------------------------------ settle and check
    async def settle(self) -> None:
        for b in self.boards:
            if not b.alive():
                b.start()
            b.cmd("unplug")
        csms = self.site.csms
        assert csms is not None

        def all_in() -> bool:
            got = self.stored_values()
            return all(set(v) <= set(got.get(d, [])) for d, v in self.confirmed.items())

        await until(all_in, 60, "every confirmed MeterValues at the CSMS")
        # the last transaction events: every board idle (its unplug carried out), then an SDR at
        # the CSMS for every transaction a board ended
        for b in self.boards:
            await board_status(b, lambda st: st["tx_id"] is None, 30)

        def missing() -> list[tuple[str, int]]:
            have = {(str(x["device_id"]), int(x["tx_id"])) for x in csms.api.billed_transactions()}
            ended = {(b.device_id, int(e["tx_id"])) for b in self.boards for e in b.all("tx_ended")}
            return sorted(ended - have)

        if self.ocpp is not None:
            missing = self._ocpp_missing
        try:
            await until(lambda: not missing(), 60, "an SDR at the CSMS for every transaction a board ended")
        except TimeoutError as timeout:
            raise TimeoutError(f"{timeout}: missing {missing()}") from None
        for b in self.boards:
            kinds = Counter(str(e["ev"]) for e in b.events)
            print(f"[campaign] {b.device_id} events: {dict(kinds)}", flush=True)
            for e in b.all("tx_ended"):
                self.board_wh[b.device_id, int(e["tx_id"])] = int(e["wh"])

    def _ocpp_missing(self) -> list[tuple[str, int]]:
        """(device, tx) a board ended whose Ended event the OCPP CSMS has not received."""
        assert self.ocpp is not None
        have = {(c.station, int(c.payload["transactionInfo"]["transactionId"])) for c in self.ocpp.calls
                if c.action == "TransactionEvent" and c.payload["eventType"] == "Ended"}  # fmt: skip
        ended = {(b.device_id, int(e["tx_id"])) for b in self.boards for e in b.all("tx_ended")}
        return sorted(ended - have)

    def ocpp_calls(self, action: str) -> tuple[list[Seen], int]:
        """The OCPP CSMS's `action` CALLs in the order received, each message id once, and how
        many were retransmissions (the same message id again)."""
        assert self.ocpp is not None
        seen: set[tuple[str, str]] = set()
        out = []
        for c in self.ocpp.calls:
            if c.action == action and (c.station, c.uid) not in seen:
                seen.add((c.station, c.uid))
                out.append(c)
        return out, sum(1 for c in self.ocpp.calls if c.action == action) - len(out)

    def stored_values(self) -> dict[str, list[int]]:
        """device → emitted values stored at the CSMS, in the order the CSMS received them."""
        if self.ocpp is not None:
            got: dict[str, list[int]] = {}
            for c in self.ocpp_calls("MeterValues")[0]:
                for mv in c.payload["meterValue"]:
                    for v in mv["sampledValue"]:
                        if v["measurand"] == "Energy.Active.Import.Register" and v["value"] >= EMIT_BASE:
                            got.setdefault(c.station, []).append(int(v["value"]))
            return got
        csms = self.site.csms
        assert csms is not None
        out: dict[str, list[int]] = {}
        rows = csms.store._db.execute(  # type: ignore[attr-defined]  # in the order the CSMS stored them
            "SELECT device_id, energy_wh FROM meter_values WHERE energy_wh >= ? ORDER BY rowid", (EMIT_BASE,)
        )
        for device, wh in rows:
            out.setdefault(str(device), []).append(int(wh))
        return out

    def check_ocpp(self) -> dict[str, Any]:
        """The checks on what the OCPP CSMS received (--ocpp)."""
        stored = self.stored_values()
        lost = {d: sorted(set(v) - set(stored.get(d, []))) for d, v in self.confirmed.items()}
        lost = {d: v for d, v in lost.items() if v}
        dups = {d: [x for x, c in Counter(v).items() if c > 1] for d, v in stored.items()}
        dups = {d: v for d, v in dups.items() if v}
        disorder = {d: v for d, v in stored.items() if v != sorted(v)}
        events, resent = self.ocpp_calls("TransactionEvent")
        self.redelivered = resent + self.ocpp_calls("MeterValues")[1]
        txs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for c in events:
            txs.setdefault((c.station, int(c.payload["transactionInfo"]["transactionId"])), []).append(c.payload)
        bad_seq = []
        bad_energy = []
        compared = 0
        for key, evs in txs.items():
            kinds = [e["eventType"] for e in evs]
            if [e["seqNo"] for e in evs] != list(range(len(evs))) or kinds[0] != "Started" or "Ended" in kinds[:-1]:
                bad_seq.append(f"{key}: {[(e['seqNo'], e['eventType'][0]) for e in evs]}")
            wh = self.board_wh.get(key)
            if wh is not None and kinds[-1] == "Ended":
                compared += 1
                got = _register(evs[-1]) - _register(evs[0])
                if got != wh:
                    bad_energy.append(f"{key}: board {wh} Wh, CSMS {got} Wh")
        ended = {k for k, evs in txs.items() if evs[-1]["eventType"] == "Ended"}
        missing = sorted(set(self.board_wh) - ended)
        inv = self.checker
        checks = {
            "no accepted message lost": not lost,
            "none duplicated": not dups and not bad_seq,
            "order per device kept": not disorder,
            "every transaction's events continuous (seqNo 0, 1, …), its energy that of the board's meter":
                not bad_seq and not bad_energy and not missing,
            f"invariants held in {inv.samples} sample rounds (limits, no energy without a transaction, "
            "registration)": not inv.violations,
        }  # fmt: skip
        self.problems += [name for name, ok in checks.items() if not ok]
        if lost:
            self.problems.append(f"lost: {lost}")
        if dups:
            self.problems.append(f"duplicated: {dups}")
        self.problems += [f"out of order at {d}" for d in disorder]
        self.problems += [f"transaction events: {x}" for x in bad_seq] + bad_energy
        if missing:
            self.problems.append(f"no Ended event at the OCPP CSMS: {missing}")
        self.problems += inv.violations
        return {
            "checks": checks,
            "confirmed": sum(len(v) for v in self.confirmed.values()),
            "stored_frames": len(self.ocpp.calls) if self.ocpp is not None else 0,
            "sdrs": 0,
            "sdrs_compared_with_board": compared,
            "transactions_billed": len(ended),
            "energy_wh": sum(self.board_wh.get(k, 0) for k in ended),
        }

    async def check_roaming(self) -> dict[str, Any]:
        """The roaming billing invariants (tools/site/roaming_books.py), the CSMS up again."""
        assert self.roaming is not None
        books, faults = await books_faults(self.site, self.roaming, timeout=60)
        name = ("every roaming session one SDR at the CSMS, the CSO, its home CSP"
                + ("" if self.roaming == "peer_to_peer" else " and the CH") + ", priced right, matched")  # fmt: skip
        if faults:
            self.problems.append(name)
            self.problems += faults
        return {"checks": {name: not faults}, "roaming_sdrs": len(books),
                "roaming_cost": sum(int(b.csp_sdr.get("cost", 0)) for b in books)}  # fmt: skip

    async def check(self) -> dict[str, Any]:
        if self.ocpp is not None:
            return self.check_ocpp()
        csms = self.site.csms
        assert csms is not None
        stored = self.stored_values()
        lost = {d: sorted(set(v) - set(stored.get(d, []))) for d, v in self.confirmed.items()}
        lost = {d: v for d, v in lost.items() if v}
        dups = {d: [x for x, c in Counter(v).items() if c > 1] for d, v in stored.items()}
        dups = {d: v for d, v in dups.items() if v}
        disorder = {d: v for d, v in stored.items() if v != sorted(v)}
        received = csms.store.select("received")
        keys = {(r["site_id"], r["device_id"], r["msg_id"], r["grp"]) for r in received}
        sdrs = csms.api.sdrs()  # one per service session (clause 6), listing its transactions:
        lines = csms.api.billed_transactions()  # those transactions, each with its SDR
        bad_sdr = [f"{x['sdr_id']} tx {x['tx_id']}" for x in lines
                   if x["energy_wh"] != x["meter_stop_wh"] - x["meter_start_wh"]]  # fmt: skip
        compared = 0
        for x in lines:
            wh = self.board_wh.get((str(x["device_id"]), int(x["tx_id"])))
            if wh is not None:
                compared += 1
                if wh != x["energy_wh"]:
                    bad_sdr.append(f"{x['sdr_id']} tx {x['tx_id']}: board {wh} Wh, SDR {x['energy_wh']} Wh")
        ended = [t for t in csms.api.sessions() if t["state"] == "ended"]
        billed = {(x["device_id"], x["tx_id"]) for x in lines}
        no_sdr = [(t["device_id"], t["tx_id"]) for t in ended if (t["device_id"], t["tx_id"]) not in billed]
        ended_at_boards = [(b.device_id, e["tx_id"]) for b in self.boards for e in b.all("tx_ended")]
        billing = billing_faults(csms.api.sessions(), lines, ended_at_boards)
        inv = self.checker
        checks = {
            "no accepted message lost": not lost,
            "none duplicated": not dups and len(keys) == len(received),
            "order per device kept": not disorder,
            "every SDR reconciles with its metered energy": not bad_sdr and not no_sdr,
            "every transaction billed exactly once": not billing,
            f"invariants held in {inv.samples} sample rounds (limits, no energy without a transaction, "
            "registration)": not inv.violations,
        }
        for name, ok in checks.items():
            if not ok:
                self.problems.append(name)
        if lost:
            self.problems.append(f"lost: {lost}")
        if dups:
            self.problems.append(f"duplicated: {dups}")
        for d, v in disorder.items():
            i = next(k for k in range(1, len(v)) if v[k] < v[k - 1])
            self.problems.append(f"out of order at {d}: ... {v[max(0, i - 3) : i + 3]} ...")
        if bad_sdr or no_sdr:
            self.problems.append(f"SDRs: {bad_sdr} without SDR: {no_sdr}")
        self.problems += billing + inv.violations
        roaming: dict[str, Any] = {}
        if self.roaming is not None:
            roaming = await self.check_roaming()
            checks.update(roaming.pop("checks"))
        return {
            **roaming,
            "checks": checks,
            "confirmed": sum(len(v) for v in self.confirmed.values()),
            "stored_frames": len(received),
            "sdrs": len(sdrs),
            "sdrs_compared_with_board": compared,
            "transactions_billed": len(lines),
            "energy_wh": sum(int(x["energy_wh"]) for x in lines),
        }


def _register(ev: dict[str, Any]) -> int:
    """A TransactionEvent's Energy.Active.Import.Register, Wh (0 when it carries none)."""
    for mv in ev.get("meterValue", ()):
        for v in mv["sampledValue"]:
            if v["measurand"] == "Energy.Active.Import.Register":
                return int(v["value"])
    return 0


def _toml(doc: dict[str, Any]) -> str:
    """The gateway configuration as TOML (strings, numbers, lists, inline tables)."""

    def v(x: Any) -> str:
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, int | float):
            return str(x)
        if isinstance(x, str):
            return json.dumps(x)
        if isinstance(x, list):
            return "[" + ", ".join(v(y) for y in x) + "]"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {v(y)}" for k, y in x.items()) + "}"
        raise TypeError(type(x))

    return "".join(f"[{sec}]\n" + "".join(f"{k} = {v(x)}\n" for k, x in body.items()) for sec, body in doc.items())


async def amain(root: Path, boards: int, seconds: float, seed: int, ocpp: bool = False,
                roaming: str | None = None) -> int:  # fmt: skip
    c = Campaign(root, boards, seconds, seed, ocpp, roaming)
    mode = " (OCPP 2.0.1 northbound: the checks read the OCPP CSMS)" if ocpp else ""
    if roaming is not None:
        mode += f" (roaming on, {roaming}: the roaming books checked)"
    print(f"[campaign] seed {seed}, {boards} boards, {seconds:.0f} s of faults, data {root}{mode}", flush=True)
    print(f"[campaign] fault schedule (seed {seed}): " + "; ".join(map(str, c.schedule)), flush=True)
    t0 = time.monotonic()
    report: dict[str, Any] = {}
    try:
        await c.start()
        await c.run()
        await c.settle()
        await c.sampler.stop()
        report = await c.check()
    except Exception as e:  # the summary names what failed
        c.problems.append(f"{type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(Exception):
            await c.close()
    print("\n== campaign summary ==")
    print(f"seed {seed}; faults injected: " + ", ".join(f"{k} {c.faults[k]}" for k in FAULTS))
    confirmed = sum(len(v) for v in c.confirmed.values())
    stored = report.get("stored_frames", 0)
    what = "retransmissions (same message id) recognized" if ocpp else "redeliveries deduplicated"
    print(f"sessions started {c.sessions}; MeterValues confirmed by boards {confirmed}; "
          f"frames stored at the CSMS {stored}; {what} {c.redelivered}")  # fmt: skip
    if ocpp:
        print(f"transactions ended at the OCPP CSMS {report.get('transactions_billed', 0)} "
              f"({report.get('sdrs_compared_with_board', 0)} compared with the board's meter), "
              f"energy {report.get('energy_wh', 0)} Wh; {time.monotonic() - t0:.0f} s")  # fmt: skip
    else:
        print(f"SDRs {report.get('sdrs', 0)} billing {report.get('transactions_billed', 0)} transactions "
              f"({report.get('sdrs_compared_with_board', 0)} compared with the board's meter), "
              f"energy {report.get('energy_wh', 0)} Wh; {time.monotonic() - t0:.0f} s")  # fmt: skip
    if roaming is not None:
        print(f"roaming sessions started {c.roaming_sessions}; roaming SDRs at the home CSPs "
              f"{report.get('roaming_sdrs', 0)}, cost {report.get('roaming_cost', 0)}")  # fmt: skip
    for name, ok in report.get("checks", {}).items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    if c.checker.violations:  # where the invariants broke, on the fault schedule's clock
        for line in c.checker.excursions[:12]:
            t = float(line.split()[0][2:])
            print(f"excursion at {t - c.t_faults:+.2f} s: {line.split(' ', 1)[1]}")
    for p in c.problems:
        print("PROBLEM:", p)
    print("OK" if not c.problems else f"FAILED (replay: python -m tools.site.campaign --seed {seed})")
    return 1 if c.problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.site.campaign", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--minutes", type=float, default=0.5, help="duration of the fault phase")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--boards", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="an empty or new folder (default: a fresh temporary one)")
    ap.add_argument("--ocpp", action="store_true", help="the gateway's OCPP 2.0.1 northbound on; checked at its CSMS")
    ap.add_argument("--roaming", nargs="?", const="mixed", default=None, choices=ROAMING_MODES, metavar="MODE",
                    help="the IEC 63119 roaming endpoints on (mode: peer_to_peer, clearing_house, mixed — the "
                         "default); roaming cards, the roaming books checked")  # fmt: skip
    a = ap.parse_args(argv)
    if a.data is not None and a.data.exists() and any(a.data.iterdir()):
        # The checks compare what the boards confirmed with everything the CSMS holds: the
        # state of an earlier run would count as duplicates and disorder.
        ap.error(f"--data {a.data} is not empty: a campaign starts from nothing")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    root = a.data or Path(tempfile.mkdtemp(prefix="evedge-campaign-"))
    if a.roaming is not None and a.ocpp:
        ap.error("--roaming with --ocpp: the roaming endpoints serve the native CSMS only")
    return asyncio.run(amain(root, a.boards, a.minutes * 60, seed, a.ocpp, a.roaming))


if __name__ == "__main__":
    sys.exit(main())
