"""The uplink's bookkeeping, sans I/O (gateway/uplink/relay.py): no socket, no QUIC."""

from __future__ import annotations

from gateway import _core
from gateway.outbox import Row
from gateway.protocol.upstream_wire import K_UP
from gateway.schema import Action, Kind, Priority
from gateway.uplink.relay import Uplink, encode_relay


def rows(n: int, prio: int = Priority.TELEMETRY) -> list[Row]:
    return [Row(i + 1, f"ev-{i % 3:04d}", 10 + i, prio, bytes([i]) * (50 + 40 * i)) for i in range(n)]


def test_a_relay_is_byte_for_byte_what_the_core_encodes_of_its_body() -> None:
    for with_token in (False, True):
        up = Uplink("DE*EVE*LSITE1")
        up.add(rows(10))
        if with_token:
            up.token_uids["ev-0001", 11] = "04AB"
        relay = up.take(Priority.TELEMETRY, 1 << 20)
        assert relay is not None and len(relay.rows) == 10
        fast = encode_relay(7, relay.relay_id, 2, 1000, up.site_id, relay.items, len(relay.rows))
        slow = _core.encode(Kind.EVENT, 7, relay.relay_id, 2, 1000, Action.RELAY, up.relay_body(relay), K_UP)
        assert fast == slow, with_token


def test_relays_in_flight_go_back_to_the_front_of_their_class_in_order() -> None:
    up = Uplink("DE*EVE*LSITE1")
    up.add(rows(10))
    first = up.take(Priority.TELEMETRY, 300)
    second = up.take(Priority.TELEMETRY, 300)
    assert first is not None and second is not None
    assert up.acked(first.relay_id) == [r.seq for r in first.rows]
    up.reset()  # the connection is gone: the second relay is owed again, ahead of the rest
    assert [r.seq for r in up.unsent[Priority.TELEMETRY]] == [r.seq for r in rows(10)][len(first.rows) :]
    assert up.unsent_bytes[Priority.TELEMETRY] == sum(len(r.frame) for r in up.unsent[Priority.TELEMETRY])
    assert not up.inflight and up.inflight_bytes == 0
