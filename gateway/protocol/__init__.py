"""What the gateway shares with the programs it talks to upstream — the CSMS and the IEC 63119
roaming endpoints (`evedge_csms`, `evedge_roaming`: the evedge-peers distribution in tools/peers)
— and nothing else of the gateway:

- `gid`: global identifiers (operators, sites, EVSEs, contracts, sessions, SDRs);
- `upstream_wire`: the upstream protocol's framing on QUIC streams, ALPN, priority classes;
- `mtls`: client certificates demanded and checked by aioquic servers;
- `devpki`: the development PKI (a CA, leaf certificates, private files written 0600);
- `roaming`: the IEC 63119 wire: JSON bodies, login tokens and HMAC, the HTTP/3 client.

With the generated `gateway.schema` and the Rust core `gateway._core`, this package is the
whole contract between the gateway and the peers: a peer importing anything else of the
gateway fails `tests/test_layout.py`.
"""
