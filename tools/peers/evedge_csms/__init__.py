"""The CSMS peer of the upstream protocol (docs/upstream.md, docs/csms.md).

A full protocol peer with its own persistent store: the site gateways connect to it over
QUIC with mutual TLS, relay their boards' frames, and receive Commands. Layers:

- `wire`      upstream envelopes (decode of frames above the LAN size, errors, encode)
- `store`     the `Store` protocol and its SQLite implementation (`tables` holds the schema)
- `inbound`   what the CSMS does with each board message (rows written, answers queued)
- `commands`  builders of the Commands of the E, M and S use cases, signatures
- `core`      the sans-I/O protocol core of one gateway connection
- `server`    thin asyncio/aioquic glue with client-certificate verification
- `admin`     the operator's command line
"""
