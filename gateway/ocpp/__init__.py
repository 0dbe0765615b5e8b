"""OCPP 2.0.1 northbound (issue #17): the gateway as OCPP's Local Controller.

Each board appears to an OCPP 2.0.1 CSMS as a charging station on a WebSocket of its own
(`station.Station`), beside or instead of the native QUIC uplink. The outbox stays the one
durable queue: the OCPP face reads the rows the dispatcher commits, keeps its own durable
cursor per board (`ledger.Ledger`) and a row is retired only once every northbound delivered
it (`ledger.RetireGate`). Translation between the site's frames and OCPP 2.0.1 payloads is
sans I/O (`up.py` board → CSMS, `down.py` CSMS → board); `link.py` is the `ocpp` library and
`websockets` glue; `bridge.py` holds the stations and the hooks the gateway calls. docs/ocpp.md.
"""
