"""What the uplink derives from its configuration section (`[upstream]`, `config.UpstreamConfig`):
the QUIC configuration, the per-class caps and the Relay sizes.

The section is the operator's; the constants here are the uplink's own, measured choices
(docs/gateway.md, "Priority above aioquic" and "Relay size").
"""

from __future__ import annotations

import ssl

from aioquic.quic.configuration import QuicConfiguration

from gateway.config import UpstreamConfig
from gateway.protocol.upstream_wire import ALPN

URGENT_RELAY_MAX_BYTES = 16 << 10
"""Urgent Relays stay small: each is built in one loop turn."""
BULK_RELAY_MAX_BYTES = 32 << 10
"""Bulk Relays stay small too: each is built in one loop turn and decoded at once by the
CSMS, so an urgent relay that arrives meanwhile waits for at most one of them."""
LOOPBACK_DATAGRAM = 16 << 10
"""UDP payload on a loopback address (no path MTU to respect): fewer, larger packets, since
aioquic's cost is per packet."""


def class_caps(up: UpstreamConfig) -> list[int]:
    """Bytes each class may leave in aioquic unsent: what an urgent frame can find ahead of it."""
    return [1 << 20, 32 << 10, 32 << 10, up.bulk_unsent_max]


def relay_max_bytes(up: UpstreamConfig) -> list[int]:
    """The bound of one Relay's frame bytes, per class."""
    return [
        URGENT_RELAY_MAX_BYTES,
        up.relay_max_bytes,
        up.relay_max_bytes,
        min(BULK_RELAY_MAX_BYTES, up.relay_max_bytes),
    ]


def quic_configuration(up: UpstreamConfig) -> QuicConfiguration:
    """Client side, mutual TLS (the section's ca, cert and key must be set: `config.prepare`)."""
    assert up.ca is not None and up.cert is not None and up.key is not None, "config.prepare fills them"
    qc = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=up.server_name,
        verify_mode=ssl.CERT_REQUIRED,
        idle_timeout=up.idle_timeout_s,
        max_datagram_frame_size=None,
    )
    size = up.max_datagram_size
    if not size and (up.host.startswith("127.") or up.host in ("::1", "localhost")):
        size = LOOPBACK_DATAGRAM
    if size:
        qc.max_datagram_size = size
    qc.load_verify_locations(cafile=str(up.ca))
    qc.load_cert_chain(str(up.cert), str(up.key))
    return qc
