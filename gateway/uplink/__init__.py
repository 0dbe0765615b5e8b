"""The uplink to the CSMS (docs/upstream.md): what the site owes upstream, relayed over QUIC.

- `relay` — `Uplink`, `Relay`, `encode_relay`: relay bookkeeping, sans I/O.
- `protocol` — `UpstreamProtocol`: the aioquic glue (feeds bytes, drains events, one pump
  callback); what a class may hand aioquic is gateway/pacing.py's decision.
- `quic_internals` — the one reader of aioquic's internals (the path's figures).
- `runner` — `UplinkRunner`: connect, SiteHello, keepalive, reconnect with backoff.
- `settings` — what the uplink derives from `[upstream]` (QUIC configuration, caps, Relay sizes).

The wire format is gateway/protocol/upstream_wire.py (shared with the CSMS). Nothing is
re-exported here: each user imports the module it needs.
"""
