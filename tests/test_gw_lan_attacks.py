"""Attacks on the gateway's LAN server, on loopback, with legitimate boards sending meanwhile
(docs/gateway.md, "Bounds of the LAN server"; gateway/languard.py).

Each attack comes from other loopback source addresses (127.0.0.2 …) than the boards
(127.0.0.1). The boards speak the real protocol (tools.loadclient, through the Rust core);
every event they send during an attack must be acked. Deadlines are small in these
configurations so that the tests run fast; the assertions are on counts and states.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import subprocess
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gwpeer import SEED
from test_gw_lan import start_gw, wait_for

from gateway import _core, config, metrics
from gateway.ratelog import LOG_BURST
from gateway.schema import Action, Key, Kind
from gateway.service import Gateway
from tools.bench.lan_attack import gateway_cmd
from tools.loadclient import Board, HelloRefused, dev_key

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the legitimate boards


class Legit:
    """Boards on 127.0.0.1 sending one event each every `period_s` for as long as the
    attack lasts; `stop` waits until every event sent was acked."""

    def __init__(self, port: int, n: int = 3, period_s: float = 0.02, tag: str = "l") -> None:
        self.boards = [
            Board(f"ev-{tag}{i:03d}", dev_key(SEED, f"ev-{tag}{i:03d}"), "127.0.0.1", port) for i in range(n)
        ]
        self.period_s = period_s
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> Legit:
        await asyncio.wait_for(asyncio.gather(*(b.connect() for b in self.boards)), timeout)
        self._task = asyncio.create_task(self._send())
        return self

    async def _send(self) -> None:
        while not self._stop.is_set():
            for b in self.boards:
                b.send("meter", 1)
                self.sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.period_s)

    async def stop(self, timeout: float = 30.0) -> int:
        """Stops sending; every event acked within `timeout`, none refused. Returns the acked count."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await wait_for(lambda: all(not b.unacked for b in self.boards), timeout)
        for b in self.boards:
            assert b.connected.is_set(), f"{b.device_id} lost its link during the attack"
            assert b.errors == {}, b.errors
            b.close()
        acked = sum(b.acked for b in self.boards)
        assert acked == self.sent > 0
        return acked


# ---------------------------------------------------------------- the attacker's tools


async def connect_from(src: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


async def until_closed(reader: asyncio.StreamReader, timeout: float = 15.0) -> bytes:
    """What the gateway sent until it closed the connection (end of stream or reset)."""
    data = bytearray()

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                data.extend(chunk)
        except ConnectionError:
            pass

    await asyncio.wait_for(read(), timeout)
    return bytes(data)


def error_names(data: bytes) -> list[str]:
    frames, _ = _core.split_frames(bytearray(data))
    return [_core.error_name(_core.decode(f).body[Key.ERROR_CODE]) for f in frames]


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()


def forged(n: int) -> bytes:
    """`n` frames with a bad tag, length-prefixed."""
    f = _core.encode(Kind.EVENT, 1, 1, 2, 0, Action.METER_VALUES, {Key.EVSE: 1}, bytes(32))
    return (len(f).to_bytes(2, "big") + f) * n


def attack(**lan: Any) -> Callable[[Callable[[Gateway], Awaitable[None]]], Callable[[Path], None]]:
    """Runs an async test body against a fresh in-process gateway with these [lan] settings."""

    def wrap(fn: Callable[[Gateway], Awaitable[None]]) -> Callable[[Path], None]:
        @functools.wraps(fn)
        def test(tmp_path: Path) -> None:
            async def main() -> None:
                g = await start_gw(tmp_path, lan=lan)
                try:
                    await fn(g)
                finally:
                    await g.stop()

            asyncio.run(main())

        del test.__wrapped__  # pytest must see the (tmp_path) signature
        return test

    return wrap


# ---------------------------------------------------------------- LAN lockout without credentials


@attack(hello_timeout_s=0.5)
async def test_a_connection_without_hello_is_closed_and_counted(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port).start()
    r, w = await connect_from("127.0.0.2", gw.lan_port)
    await wait_for(lambda: gw.guard.snapshot(len(gw.connections))["connections"]["pre_hello"] == 1)
    text = metrics.prometheus(gw.snapshot(), 0.0, None)
    assert 'evedge_lan_connections{state="pre_hello"} 1' in text  # an idle connection is seen
    assert error_names(await until_closed(r)) == ["TIMEOUT"]
    w.close()
    assert gw.guard.closed["hello_timeout"] == 1
    text = metrics.prometheus(gw.snapshot(), 0.0, None)
    assert 'evedge_lan_closed_total{cause="hello_timeout"} 1' in text
    assert 'evedge_lan_connections{state="live"} 3' in text
    assert 'evedge_lan_connections{state="pre_hello"} 0' in text
    assert gw.snapshot()["lan"]["closed"]["hello_timeout"] == 1
    await legit.stop()


@attack(hello_timeout_s=60, frame_timeout_s=0.5)
async def test_a_byte_dribbling_connection_is_closed_before_and_after_hello(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port).start()
    # Before Hello: a frame declared 4000 bytes long, one byte at a time.
    r, w = await connect_from("127.0.0.2", gw.lan_port)
    stop = asyncio.Event()

    async def dribble(write: Callable[[bytes], None], data: bytes) -> None:
        for i in range(len(data)):
            if stop.is_set():
                return
            write(data[i : i + 1])
            await asyncio.sleep(0.02)  # the attacker's pace, not a wait for the gateway

    t1 = asyncio.create_task(dribble(w.write, (4000).to_bytes(2, "big") + bytes(4000)))
    assert error_names(await until_closed(r)) == ["TIMEOUT"]
    # After Hello, a board with a valid key dribbling a frame: its link is closed too.
    b = Board("ev-d001", dev_key(SEED, "ev-d001"), "127.0.0.1", gw.lan_port)
    await b.connect()
    t2 = asyncio.create_task(dribble(b.send_raw, (4000).to_bytes(2, "big") + bytes(4000)))
    await wait_for(lambda: not b.connected.is_set(), 15)
    stop.set()
    await asyncio.gather(t1, t2, return_exceptions=True)
    w.close()
    b.close()
    assert b.errors == {"TIMEOUT": 1}
    assert gw.guard.closed["frame_timeout"] == 2
    assert gw.guard.closed["hello_timeout"] == 0
    await legit.stop()


@attack(max_per_address=4, hello_timeout_s=60)
async def test_connections_over_the_per_address_cap_are_refused_at_once(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port).start()
    kept = [await connect_from("127.0.0.2", gw.lan_port) for _ in range(4)]
    await wait_for(lambda: gw.guard.pre_by_host.get("127.0.0.2") == 4)
    over = [await connect_from("127.0.0.2", gw.lan_port) for _ in range(3)]
    for r, _ in over:
        assert await until_closed(r) == b""  # closed, nothing answered
    other = await connect_from("127.0.0.3", gw.lan_port)  # another address is not affected
    await wait_for(lambda: gw.guard.pre_by_host.get("127.0.0.3") == 1)
    assert gw.guard.closed["over_address_cap"] == 3
    assert gw.guard.pre_by_host["127.0.0.2"] == 4
    assert all(not r.at_eof() for r, _ in kept)
    # A connection that completed its Hello no longer counts against its address.
    b = Board("ev-p001", dev_key(SEED, "ev-p001"), "127.0.0.1", gw.lan_port)
    await b.connect()
    assert "127.0.0.1" not in gw.guard.pre_by_host
    b.close()
    close_all([w for _, w in kept + over] + [other[1]])
    await legit.stop()


@attack(max_connections=16, max_per_address=100, hello_timeout_s=60)
async def test_idle_connections_beyond_the_total_cap_lock_no_board_out(gw: Gateway) -> None:
    assert gw.guard.max_connections == 16
    idle = [await connect_from(f"127.0.0.{2 + i % 4}", gw.lan_port) for i in range(40)]
    await wait_for(lambda: gw.guard.accepted == 40 and len(gw.connections) <= 16)
    # Boards connecting now each take the place of the oldest connection without Hello.
    legit = await Legit(gw.lan_port, n=5).start()
    more = [await connect_from("127.0.0.6", gw.lan_port) for _ in range(20)]
    await wait_for(lambda: gw.guard.accepted == 65)
    await legit.stop()
    snap = gw.snapshot()["lan"]
    assert snap["connections"]["live"] == 5
    assert snap["connections"]["pre_hello"] + snap["connections"]["live"] <= 16
    assert snap["closed"]["evicted"] == 65 - 16
    close_all([w for _, w in idle + more])


@attack(max_connections=3, hello_timeout_s=60)
async def test_when_every_slot_is_a_live_link_a_new_connection_is_refused(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port, n=3).start()
    r, w = await connect_from("127.0.0.2", gw.lan_port)
    assert await until_closed(r) == b""
    w.close()
    await legit.stop()
    assert gw.guard.closed["over_total_cap"] == 1
    assert gw.guard.closed["evicted"] == 0


@pytest.fixture
def gateway_256_fds(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """`python -m gateway` with RLIMIT_NOFILE 256 (soft and hard): (LAN port, metrics port, its log)."""
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        '[site]\ndata_dir = "gw"\n[lan]\nlisten = "127.0.0.1:0"\nhello_timeout_s = 60.0\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[upstream]\nenabled = false\n'
        f'[devices]\ndev_seed = "{SEED.hex()}"\ndev_prefix = "ev-"\n'
    )
    log = tmp_path / "gateway.log"
    with log.open("w") as err:
        p = subprocess.Popen(
            gateway_cmd(cfg, 256), stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("READY"), log.read_text()
        lan, met = (int(x.split("=")[1]) for x in line.split()[1:])
        yield lan, met, log
    finally:
        p.terminate()
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def test_idle_connections_beyond_the_descriptor_limit_lock_no_board_out(gateway_256_fds: tuple[int, int, Path]) -> None:
    """The report's attack: far more idle connections than the gateway has descriptors, from
    several addresses, each reopened as soon as it is closed. Boards connecting during it get
    in and every event they send is acked, /status answers, and the log stays short."""
    lan, met, log = gateway_256_fds

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def hold(src: str) -> None:  # one idle connection, reopened whenever closed
            while not stop.is_set():
                try:
                    r, w = await connect_from(src, lan)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writers.append(w)
                with_stop = asyncio.create_task(stop.wait())
                closed = asyncio.create_task(until_closed(r, 3600))
                await asyncio.wait({with_stop, closed}, return_when=asyncio.FIRST_COMPLETED)
                with_stop.cancel()
                closed.cancel()
                w.close()
                await asyncio.sleep(0.05)

        holders = [asyncio.create_task(hold(f"127.0.0.{2 + i % 8}")) for i in range(400)]
        status: dict[str, Any] = {}

        def get_status() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{met}/status", timeout=10) as resp:
                status.update(json.loads(resp.read()))

        try:
            await wait_for(lambda: len(writers) >= 300, 30)
            legit = await Legit(lan, n=3).start(timeout=30)
            await asyncio.to_thread(get_status)
            await legit.stop()
        finally:
            stop.set()
            await asyncio.gather(*holders, return_exceptions=True)
            close_all(writers)
        return status

    status = asyncio.run(main())
    bounds = status["lan"]
    assert bounds["max_connections"] == 128  # 256 descriptors less the headroom
    assert bounds["connections"]["pre_hello"] + bounds["connections"]["live"] <= 128
    assert bounds["closed"]["evicted"] > 0
    lines = log.read_text().splitlines()
    assert len(lines) <= 5 * LOG_BURST, lines[:20]


# ---------------------------------------------------------------- insider floods


@attack(max_bad_frames=5, bad_window_s=60, throttle_s=0.05)
async def test_a_flood_is_stopped_at_the_limit_and_reconnecting_does_not_reset_it(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port).start()
    flooder = Board("ev-f001", dev_key(SEED, "ev-f001"), "127.0.0.1", gw.lan_port)
    await flooder.connect()
    flooder.send_raw(forged(2000))  # one write: many reads' worth, or one
    await wait_for(lambda: not flooder.connected.is_set(), 15)
    close_at = 2 * 5
    assert gw.rejections["BAD_TAG"] == close_at  # the gateway looked at no frame after the limit
    assert sum(flooder.errors.values()) <= close_at + 1  # their errors and RATE_LIMITED, at most
    assert gw.guard.closed["flood"] == 1
    with pytest.raises(HelloRefused) as e:  # its reconnect is refused for the window
        await Board("ev-f001", dev_key(SEED, "ev-f001"), "127.0.0.1", gw.lan_port).connect()
    assert e.value.name == "RATE_LIMITED"
    assert gw.guard.closed["flood"] == 2
    assert gw.snapshot()["lan"]["flood_held"] == 1
    assert gw.rejections["BAD_TAG"] == close_at
    await legit.stop()


@attack(max_bad_frames=5, bad_window_s=60, throttle_s=0.05)
async def test_bad_frames_count_across_reconnects(gw: Gateway) -> None:
    """Below the closing count, a device's bad frames of one link count on its next one."""
    legit = await Legit(gw.lan_port).start()
    b = Board("ev-f002", dev_key(SEED, "ev-f002"), "127.0.0.1", gw.lan_port)
    for k in (1, 2):
        await b.connect()
        b.send_raw(forged(4))
        await wait_for(lambda k=k: b.errors.get("BAD_TAG") == 4 * k)
        b.close()
        await wait_for(lambda: "ev-f002" not in gw.online)
    await b.connect()  # 8 bad frames in the window: 2 more close the link
    b.send_raw(forged(50))
    await wait_for(lambda: not b.connected.is_set(), 15)
    assert gw.rejections["BAD_TAG"] == 10
    assert gw.guard.closed["flood"] == 1
    await legit.stop()


# ---------------------------------------------------------------- device rows before the tag check


@attack()
async def test_bad_tag_hellos_for_fresh_dev_ids_create_no_device_rows(gw: Gateway) -> None:
    legit = await Legit(gw.lan_port).start()
    before = len(gw.devices)

    async def forge(i: int) -> str:
        try:
            await Board(f"ev-x{i:05d}", bytes(32), "127.0.0.1", gw.lan_port).connect()
        except HelloRefused as e:
            return e.name
        return "accepted"

    for start in range(0, 500, 50):
        assert set(await asyncio.gather(*(forge(i) for i in range(start, start + 50)))) == {"BAD_TAG"}
    assert len(gw.devices) == before
    assert gw.devices.get("ev-x00000") is None
    # A good Hello of a fresh id gets its row, written on the writer thread, not the loop's.
    threads: list[str] = []
    admit = gw.devices.admit

    def spy(device_id: str, key: bytes) -> None:
        threads.append(threading.current_thread().name)
        admit(device_id, key)

    gw.devices.admit = spy  # type: ignore[method-assign]
    b = Board("ev-x99999", dev_key(SEED, "ev-x99999"), "127.0.0.1", gw.lan_port)
    await b.connect()
    b.send("meter", 2)
    await wait_for(lambda: not b.unacked)
    b.close()
    d = gw.devices.get("ev-x99999")
    assert d is not None and d.key == dev_key(SEED, "ev-x99999")
    assert len(threads) == 1 and threads[0] != threading.main_thread().name
    await legit.stop()


# ---------------------------------------------------------------- a live link gone silent


@attack(heartbeat_s=1, idle_heartbeats=3.0)
async def test_a_live_link_silent_beyond_three_heartbeats_is_closed(gw: Gateway) -> None:
    silent = Board("ev-s001", dev_key(SEED, "ev-s001"), "127.0.0.1", gw.lan_port)
    await silent.connect()
    active = Board("ev-s002", dev_key(SEED, "ev-s002"), "127.0.0.1", gw.lan_port)
    await active.connect()
    done = asyncio.Event()

    async def heartbeats() -> None:  # as the firmware does, only more often
        while not done.is_set():
            await active.request(Action.HEARTBEAT, {}, 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)

    t = asyncio.create_task(heartbeats())
    await wait_for(lambda: not silent.connected.is_set(), 20)
    assert active.connected.is_set()  # the order: the silent one closed, the active one not
    done.set()
    await t
    assert silent.errors == {"TIMEOUT": 1}
    assert gw.guard.closed["idle"] == 1
    silent.close()
    active.close()


# ---------------------------------------------------------------- what an attack writes to the log


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@attack(hello_timeout_s=0.3, max_per_address=5)
async def test_log_lines_of_an_attack_are_bounded_and_summarised(gw: Gateway) -> None:
    lines = Lines()
    root = logging.getLogger()
    gwlog = logging.getLogger("gateway")
    level = gwlog.level
    root.addHandler(lines)
    gwlog.setLevel(logging.INFO)
    try:
        legit = await Legit(gw.lan_port).start()
        for _ in range(20):  # each round: 5 connections time out, 5 are over the address cap
            conns = [await connect_from("127.0.0.2", gw.lan_port) for _ in range(10)]
            await asyncio.gather(*(until_closed(r) for r, _ in conns))
            close_all([w for _, w in conns])
            await wait_for(lambda: not gw.guard.pre_by_host)
        asyncio_log = logging.getLogger("asyncio")
        for _ in range(100):  # asyncio's own lines go through the same limit
            asyncio_log.warning("socket.send() raised exception.")
        await legit.stop()
        closed = gw.guard.closed
        timeouts, refused = closed["hello_timeout"], closed["over_address_cap"]
        assert timeouts + refused == 200 and min(timeouts, refused) > LOG_BURST  # about 100 each
        assert len(lines.records) <= 3 * LOG_BURST
        # The summaries come when an interval ends (the limit's own clock, moved on here).
        limit = gw.guard.limit
        t = limit.clock() + limit.interval_s
        limit.clock = lambda: t
        limit.flush()
        summaries = [r.getMessage() for r in lines.records if "suppressed" in r.getMessage()]
        more = f"hello_timeout: {timeouts - LOG_BURST} more lines suppressed"
        assert any(s.startswith(more) for s in summaries), summaries
        assert any(s.startswith(f"over_address_cap: {refused - LOG_BURST} more") for s in summaries), summaries
        assert any(s.startswith("asyncio: socket.send") for s in summaries), summaries
    finally:
        root.removeHandler(lines)
        gwlog.setLevel(level)


def test_the_bounds_are_configured_in_lan_and_bad_values_name_their_key() -> None:
    lan = config.parse({"lan": {"max_connections": 500, "max_per_address": 8, "hello_timeout_s": 2,
                                "frame_timeout_s": 1.5, "idle_heartbeats": 4}}).lan  # fmt: skip
    assert (lan.max_connections, lan.max_per_address, lan.hello_timeout_s, lan.frame_timeout_s) == (500, 8, 2.0, 1.5)
    assert lan.idle_heartbeats == 4.0
    for key, value in (("max_connections", 0), ("max_per_address", -1), ("hello_timeout_s", 0),
                       ("frame_timeout_s", "10"), ("idle_heartbeats", 0.5)):  # fmt: skip
        with pytest.raises(config.ConfigError, match=f"lan.{key}"):
            config.parse({"lan": {key: value}})
