"""A fast load client: many boards in one process, speaking the link protocol through
`gateway._core.Sender` (docs/protocol.md).

Each simulated board keeps what it sent until the gateway acks it (like the firmware's
flash outbox), resends it after a reconnect with the same id, and never reuses an id.

    python -m tools.loadclient --boards 500 --frames 2000 [--port 7700] --dev-seed HEX [--prefix ev-]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import _core
from gateway.schema import EPOCH_UNIX, Action, Key, Kind, Priority

Body = dict[int, Any]


def dev_key(seed: bytes, device_id: str) -> bytes:
    return hmac.new(seed, device_id.encode(), hashlib.sha256).digest()


def meter_body(i: int) -> Body:
    return {Key.EVSE: 1, Key.ENERGY_WH: 1_000_000 + i, Key.POWER_W: 11_000, Key.TX_ID: 4242}


def log_body(i: int) -> Body:
    return {Key.REQUEST_ID: 1, Key.OFFSET: i * 1024, Key.DATA: bytes(1000), Key.LAST: False}


def fault_body(i: int) -> Body:
    return {Key.FAULT_CODE: 7, Key.ACTIVE: True, Key.TIME: int(time.time()) - EPOCH_UNIX}


KINDS: dict[str, tuple[int, int, Callable[[int], Body]]] = {
    "meter": (Action.METER_VALUES, Priority.TELEMETRY, meter_body),
    "log": (Action.LOG_CHUNK, Priority.BULK, log_body),
    "fault": (Action.FAULT_REPORT, Priority.URGENT, fault_body),  # a sender may raise the class
}


class HelloRefused(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name


@dataclass
class Board:
    device_id: str
    key: bytes | None
    host: str
    port: int
    factory_key: bytes | None = None
    next_id: int = 1
    unacked: OrderedDict[int, tuple[int, int, Body, float]] = field(default_factory=OrderedDict)
    acked: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    sender: _core.Sender | None = None
    receiver: _core.Receiver | None = None
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    acked_event: asyncio.Event = field(default_factory=asyncio.Event)
    acked_ids: list[int] = field(default_factory=list)
    record_acks: bool = False
    e_up: bytes = b""
    k_up: bytes = b""
    responses: dict[int, _core.Frame] = field(default_factory=dict)
    requests_in: list[_core.Frame] = field(default_factory=list)
    answer: Callable[[_core.Frame], Body | None] | None = None
    rx_max: int | None = None
    """The largest frame this board receives, stated in its Hello (None: not stated, MAX_FRAME)."""

    async def connect(self) -> None:
        """Opens the link and runs the Hello; onboards first when only a factory key is held (M13)."""
        if self.key is None:
            assert self.factory_key is not None
            self.key = await self._hello(self.factory_key, factory=True)
            self.close()
        await self._hello(self.key, factory=False)
        self.connected.set()
        asyncio.get_running_loop().create_task(self._read_loop())
        if self.unacked:
            self._write([self._seal(i, v[0], v[1], v[2]) for i, v in self.unacked.items()])

    async def _hello(self, key: bytes, factory: bool) -> bytes:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        nonce = os.urandom(16)
        body: Body = {
            Key.DEVICE_ID: self.device_id,
            Key.NONCE: nonce,
            Key.VER_MIN: 1,
            Key.VER_MAX: 1,
            Key.SCHEMA_REV: 1,
        }
        if factory:
            body[Key.FACTORY] = True
        if self.rx_max is not None:
            body[Key.RX_MAX] = self.rx_max
        hello_id = self._new_id()
        f = _core.encode(Kind.REQUEST, 0, hello_id, Priority.CONTROL, _ts(), Action.HELLO, body, _core.hello_key(key))
        self._write([f])
        head = await self.reader.readexactly(2)
        raw = await self.reader.readexactly(int.from_bytes(head, "big"))
        reply = _core.decode(raw)
        if reply.kind == Kind.ERROR:
            self.close()
            raise HelloRefused(_core.error_name(reply.body[Key.ERROR_CODE]), str(reply.body.get(Key.REASON)))
        k_up, k_dn, e_up, e_dn = _core.derive_keys(key, nonce, reply.body[Key.NONCE])
        self.receiver = _core.Receiver(k_dn)
        self.receiver.receive(raw)
        self.sender = _core.Sender(k_up)
        self.k_up, self.e_up = k_up, e_up
        if Key.ID_FLOOR in reply.body:  # a newly keyed board numbers above what the site saw (M13)
            self.next_id = max(self.next_id, int(reply.body[Key.ID_FLOOR]) - 1)
        if Key.DEVICE_KEY in reply.body:
            return _core.aes_ctr(e_dn, 1, Key.DEVICE_KEY, reply.body[Key.DEVICE_KEY])
        return key

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _seal(self, msg_id: int, action: int, prio: int, body: Body, kind: int = Kind.EVENT) -> bytes:
        assert self.sender is not None
        return self.sender.seal(kind, msg_id, prio, _ts(), action, body)

    def _write(self, frames: list[bytes]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(b"".join(len(f).to_bytes(2, "big") + f for f in frames))

    def send(self, kind: str, n: int) -> list[int]:
        """Queues n durable events of a kind; they stay unacked until the gateway acks them."""
        action, prio, make = KINDS[kind]
        now = time.perf_counter()
        frames, ids = [], []
        for _ in range(n):
            i = self._new_id()
            body = make(i)
            self.unacked[i] = (action, prio, body, now)
            ids.append(i)
            if self.connected.is_set():
                frames.append(self._seal(i, action, prio, body))
        self._write(frames)
        return ids

    async def request(self, action: int, body: Body, prio: int = Priority.CONTROL, timeout: float = 5) -> _core.Frame:
        i = self._new_id()
        self._write([self._seal(i, action, prio, body, Kind.REQUEST)])
        t0 = time.monotonic()
        while i not in self.responses:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no answer to request {i}")
            await asyncio.sleep(0.002)
        return self.responses.pop(i)

    def send_raw(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)

    async def _read_loop(self) -> None:
        reader = self.reader
        assert reader is not None and self.receiver is not None
        buf = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                frames, used = _core.split_frames(buf)
                del buf[:used]
                now = time.perf_counter()
                for raw in frames:
                    f = self.receiver.receive(raw)
                    if f.kind == Kind.ACK:
                        for i in [f.msg_id, *f.body.get(Key.IDS, [])]:
                            v = self.unacked.pop(i, None)
                            if v is not None:
                                self.acked += 1
                                self.latencies.setdefault(v[1], []).append(now - v[3])
                                if self.record_acks:
                                    self.acked_ids.append(i)
                        self.acked_event.set()
                    elif f.kind == Kind.ERROR:
                        name = _core.error_name(f.body[Key.ERROR_CODE])
                        self.errors[name] = self.errors.get(name, 0) + 1
                        self.responses[f.msg_id] = f
                    elif f.kind == Kind.RESPONSE:
                        self.responses[f.msg_id] = f
                    elif f.kind == Kind.REQUEST:
                        self.requests_in.append(f)
                        reply: Body | None = self.answer(f) if self.answer else {Key.STATUS: 0}
                        if reply is not None:
                            self._write([self._seal(f.msg_id, f.action, f.prio, reply, Kind.RESPONSE)])
        except (ConnectionError, asyncio.IncompleteReadError, _core.CoreError):
            pass
        finally:
            self.connected.clear()
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.connected.clear()

    async def keep_connected(self, stop: asyncio.Event, backoff: float = 0.05) -> None:
        """Reconnects whenever the link drops (gateway restarted), resending what is unacked."""
        while not stop.is_set():
            if not self.connected.is_set():
                try:
                    await self.connect()
                except (OSError, asyncio.IncompleteReadError, HelloRefused):
                    await asyncio.sleep(backoff)
                    continue
            await asyncio.sleep(0.02)


def _ts() -> int:
    return int(time.time()) - EPOCH_UNIX


CONNECT_AT_ONCE = 32
"""Boards of one load connecting at the same time (below the gateway's `lan.max_per_address`, 64)."""


@dataclass
class LoadResult:
    sent: int
    acked: int
    seconds: float
    errors: dict[str, int]


async def run_load(
    boards: list[Board],
    per_board: int,
    kind: str = "meter",
    window: int = 256,
    batch: int = 32,
    seconds: float | None = None,
    started: Callable[[], None] | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Each board sends `per_board` events as fast as acks allow (at most `window` unacked);
    with `seconds`, it keeps sending until then instead. With `rate` (and `seconds`), each
    board sends one event every 1/`rate` s instead, the boards evenly staggered, whatever
    the acks. `started` is called once every board is connected, just before the first event.
    The boards connect `CONNECT_AT_ONCE` at a time: they all come from one address, and the
    gateway caps the connections without a completed Hello per address (`lan.max_per_address`)."""
    at_once = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect(b: Board) -> None:
        async with at_once:
            await b.connect()

    await asyncio.gather(*(connect(b) for b in boards))
    if started is not None:
        started()
    t0 = time.perf_counter()
    stop = t0 + seconds if seconds is not None else None
    sent = [0]
    if rate is not None:
        assert stop is not None, "a paced load runs for a stated time"
        await _paced(boards, kind, rate * len(boards), t0, stop, sent)

    async def one(b: Board) -> None:
        left = per_board if stop is None else 1 << 62
        while left or b.unacked:
            if stop is not None and left and time.perf_counter() >= stop:
                left = 0
            if left and len(b.unacked) < window:
                n = min(batch, left, window - len(b.unacked))
                b.send(kind, n)
                left -= n
                sent[0] += n
                await asyncio.sleep(0)
            else:
                b.acked_event.clear()
                await b.acked_event.wait()

    if rate is None:
        await asyncio.gather(*(one(b) for b in boards))
    else:  # the last events' acks
        end = time.perf_counter() + 30
        while any(b.unacked for b in boards) and time.perf_counter() < end:
            await asyncio.sleep(0.01)
    dt = time.perf_counter() - t0
    errors: dict[str, int] = {}
    for b in boards:
        for k, v in b.errors.items():
            errors[k] = errors.get(k, 0) + v
        b.close()
    return LoadResult(sent[0], sum(b.acked for b in boards), dt, errors)


async def _paced(boards: list[Board], kind: str, total_rate: float, t0: float, stop: float, sent: list[int]) -> None:
    """Event k (from 0) leaves at t0 + k / total_rate, from board k mod len(boards)."""
    k = 0
    nb = len(boards)
    while True:
        now = time.perf_counter()
        due = int((min(now, stop) - t0) * total_rate)
        while k < due:
            boards[k % nb].send(kind, 1)
            k += 1
        sent[0] = k
        if now >= stop:
            return
        await asyncio.sleep(0.002)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7700)
    p.add_argument("--boards", type=int, default=100)
    p.add_argument("--frames", type=int, default=1000, help="events per board")
    p.add_argument("--kind", choices=sorted(KINDS), default="meter")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=None, help="send for this long instead of --frames per board")
    p.add_argument("--rate", type=float, default=None, help="events per second per board (with --seconds)")
    p.add_argument("--dev-seed", required=True, help="hex dev seed of the gateway's [devices] dev_seed")
    p.add_argument("--prefix", default="ev-")
    a = p.parse_args()
    seed = bytes.fromhex(a.dev_seed)
    boards = [Board(f"{a.prefix}{i:05d}", dev_key(seed, f"{a.prefix}{i:05d}"), a.host, a.port) for i in range(a.boards)]
    r = asyncio.run(
        run_load(
            boards,
            a.frames,
            a.kind,
            a.window,
            a.batch,
            a.seconds,
            lambda: print(f"T0 {time.time()}", flush=True),
            a.rate,
        )
    )
    print(f"sent {r.sent} acked {r.acked} in {r.seconds:.2f} s: {r.acked / r.seconds:,.0f} frames/s; errors {r.errors}")
    print(f"RESULT {r.sent} {r.acked} {r.seconds}", flush=True)


if __name__ == "__main__":
    main()
