"""IEC 63119 roaming: what the gateway and the roaming endpoints (`evedge_roaming`, tools/peers/evedge_roaming) share.

- `json_body`: JSON bodies of the roaming messages (codes 200-215) checked against the schema;
- `auth`: platform login tokens and HMAC source authentication of every request;
- `http3`: a small HTTP/3 client on aioquic (TLS 1.3, connection reuse);
- `client`: typed calls, one method per roaming message, with automatic re-login.

docs/roaming.md describes the HTTP API and the choices made here.
"""
