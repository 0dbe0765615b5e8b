"""Relay bookkeeping of the uplink, sans I/O: what waits to be relayed and what is in flight.

Rule: rows of one class leave in acceptance order, and a row is owed until the CSMS acked
the Relay that carried it; after a lost connection, everything in flight goes back to the
front of its class, in order (the CSMS deduplicates what it had already stored).

`Uplink` holds the outbox rows owed upstream (one queue per class) and the Relays sent and
not yet acked; it knows nothing of QUIC, sockets or clocks. `take` builds the next Relay of
a class by concatenating the rows' already encoded frames into `relayed` items, and
`encode_relay` wraps them into the Relay envelope byte for byte as `_core.encode` would,
without decoding or re-encoding a frame: the per-row work is a deque pop and a few list
appends. The wire format itself (ALPN, tag key, stream framing) is
gateway/protocol/upstream_wire.py, shared with the CSMS.
"""

from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass
from typing import Any

from gateway import _core
from gateway.metrics import UrgentTrace
from gateway.outbox import Row
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import FIELDS, MESSAGES, PROTOCOL_VERSION, TAG_LEN, Action, Key, Kind, Priority

RELAY_DEFAULT_PRIO = MESSAGES[Action.RELAY].priority
RELAY_HEAD = 64
"""Envelope, tag and site id overhead of a Relay, in bytes, beside the site id (upper bound)."""
MAX_RELAY_BYTES = 256 << 10
"""Default bound of one Relay's envelope (the core decodes up to MAX_UP_FRAME = 1 MiB)."""
MAX_RELAY_FRAMES = FIELDS[Key.FRAMES].max_len
"""The schema's bound of `frames` in one Relay."""
_BIN_HEAD = [bytes((0xC4, n)) for n in range(256)]
_TAG_HEAD = bytes((0xC4, TAG_LEN))


def _bin_head(n: int) -> bytes:
    return _BIN_HEAD[n] if n < 256 else b"\xc5" + n.to_bytes(2, "big")


def _array_head(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def encode_relay(seq: int, relay_id: int, prio: int, ts: int, site_id: str, items: bytes, count: int) -> bytes:
    """The Relay envelope around `count` already encoded `relayed` items, byte for byte what
    `_core.encode` makes of the same body, without decoding or re-encoding the frames."""
    head = _core.pack([PROTOCOL_VERSION, Kind.EVENT, seq, relay_id, prio, ts, Action.RELAY])
    data = b"".join(
        (
            b"\x99",
            head[1:],
            b"\x82",
            _core.pack(Key.SITE_ID),
            _core.pack(site_id),
            _core.pack(Key.FRAMES),
            _array_head(count),
            items,
        )
    )
    return data + _TAG_HEAD + hmac.digest(K_UP, data, "sha256")[:TAG_LEN]


@dataclass
class Relay:
    relay_id: int
    prio: int
    rows: list[Row]
    nbytes: int
    items: bytes = b""
    """The encoded `relayed` items of `rows`, in order (see `Uplink.take`)."""


class Uplink:
    """Relay bookkeeping, sans I/O. Rows of one class leave in acceptance order; after a
    lost connection, relays in flight go back to the front of their class."""

    def __init__(self, site_id: str, max_frames: int = MAX_RELAY_FRAMES, fifo: bool = False) -> None:
        self.site_id = site_id
        self.fifo = fifo  # benchmark baseline only: one queue, one stream, no priority
        self.max_frames = max_frames
        self.unsent: list[deque[Row]] = [deque() for _ in range(4)]
        self.unsent_bytes = [0, 0, 0, 0]
        self.inflight: dict[int, Relay] = {}
        self.inflight_bytes = 0
        self.relayed = 0
        self.acked_frames = 0
        self._item_heads: dict[str, bytes] = {}
        self._map_heads: dict[str, bytes] = {}
        """The same, after the item's map head (two entries: no token uid)."""
        self.token_uids: dict[tuple[str, int], str] = {}
        """(device, msg_id) → plaintext id token of an accepted frame (filled by the command path,
        `gateway.commands.CommandPath.accepted`): sent as the item's `token_uid`."""
        self.trace: UrgentTrace | None = None
        """Timings of urgent rows (set by the gateway): the pump notes when their Relay is
        handed to aioquic and sent."""

    def add(self, rows: list[Row]) -> None:
        unsent, nbytes = self.unsent, self.unsent_bytes
        if self.fifo:
            unsent[Priority.TELEMETRY].extend(rows)
            nbytes[Priority.TELEMETRY] += sum(len(r[4]) for r in rows)
            return
        for r in rows:
            p = r[3]
            unsent[p].append(r)
            nbytes[p] += len(r[4])

    def backlog(self) -> int:
        return sum(len(q) for q in self.unsent) + sum(len(r.rows) for r in self.inflight.values())

    def depth(self, prio: int) -> int:
        return len(self.unsent[prio])

    def _head(self, device: str) -> bytes:
        """`device_id`, its value and the `frame` key of a `relayed` item (after its map head)."""
        head = self._item_heads.get(device)
        if head is None:
            head = self._item_heads[device] = _core.pack(Key.DEVICE_ID) + _core.pack(device) + _core.pack(Key.FRAME)
        return head

    def take(self, prio: int, max_bytes: int) -> Relay | None:
        """The next relay of class `prio`: up to `max_frames` rows and about `max_bytes`
        bytes of frames (the first row always comes)."""
        q = self.unsent[prio]
        if not q:
            return None
        rows: list[Row] = []
        parts: list[bytes] = []
        n = 0
        budget = max_bytes - RELAY_HEAD - len(self.site_id)
        tokens = self.token_uids
        limit = min(self.max_frames, MAX_RELAY_FRAMES, len(q))
        if tokens:
            for _ in range(limit):
                r = q[0]
                f = r.frame
                head = self._head(r.device)
                uid = tokens.get((r.device, r.msg_id))
                tail = b"" if uid is None else _core.pack(Key.TOKEN_UID) + _core.pack(uid)
                cost = len(head) + len(f) + len(tail) + 4
                if rows and cost > budget:
                    break
                q.popleft()
                rows.append(r)
                parts += (b"\x82" if uid is None else b"\x83", head, _bin_head(len(f)), f, tail)
                n += len(f)
                budget -= cost
        else:
            # The common case, per row: one dict lookup, no tuple, no call but the deque's.
            heads = self._map_heads
            bin_head = _BIN_HEAD
            popleft = q.popleft
            add_row = rows.append
            add = parts.append
            for _ in range(limit):
                r = q[0]
                f = r[4]
                h = heads.get(r[1])
                if h is None:
                    h = heads[r[1]] = b"\x82" + self._head(r[1])
                lf = len(f)
                cost = len(h) + lf + 3
                if cost > budget and rows:
                    break
                popleft()
                add_row(r)
                add(h)
                add(bin_head[lf] if lf < 256 else b"\xc5" + lf.to_bytes(2, "big"))
                add(f)
                n += lf
                budget -= cost
        self.unsent_bytes[prio] -= n
        relay = Relay(rows[0].seq, prio, rows, n, b"".join(parts))
        self.inflight[relay.relay_id] = relay
        self.inflight_bytes += n
        self.relayed += len(rows)
        return relay

    def acked(self, relay_id: int) -> list[int]:
        """Seqs of the rows the CSMS now holds (to retire); [] for an unknown relay id."""
        relay = self.inflight.pop(relay_id, None)
        if relay is None:
            return []
        self.inflight_bytes -= relay.nbytes
        self.acked_frames += len(relay.rows)
        return [r.seq for r in relay.rows]

    def reset(self) -> None:
        """The connection is gone: everything in flight is owed again, in order."""
        back: list[list[Row]] = [[], [], [], []]
        for relay in self.inflight.values():
            back[relay.prio].extend(relay.rows)
        for prio, rows in enumerate(back):
            rows.sort(key=lambda r: r.seq)
            self.unsent[prio].extendleft(reversed(rows))
            self.unsent_bytes[prio] += sum(len(r.frame) for r in rows)
        self.inflight.clear()
        self.inflight_bytes = 0

    def relay_body(self, relay: Relay) -> dict[int, Any]:
        """The body `encode_relay` writes for `relay`, as a dict: the reference encoding
        (`_core.encode` of it is byte for byte the same; tests/test_gw_uplink.py)."""
        frames: list[dict[int, Any]] = [{Key.DEVICE_ID: r.device, Key.FRAME: r.frame} for r in relay.rows]
        if self.token_uids:  # the plaintext id tokens (docs/upstream.md, `relayed.token_uid`)
            for item, r in zip(frames, relay.rows, strict=True):
                uid = self.token_uids.get((r.device, r.msg_id))
                if uid is not None:
                    item[Key.TOKEN_UID] = uid
        return {Key.SITE_ID: self.site_id, Key.FRAMES: frames}
