"""The gateway as the site's local CSMS: what the site answers and decides on its own, also
while upstream is away.

- `answer` — `LocalCsms`: the answers to board requests (Heartbeat, TimeSync,
  BootNotification, Authorize, FirmwareChunk from the cache).
- `auth` — offline authorization: the local list and the cache (S2, R4-2).
- `power` — site and zone power shares (E1, E4, E5), sans I/O.
- `clock` — the site's time source (B13).
- `roaming` — online identification through the CSO's roaming endpoint (R3-1, R4-1).
- `fwcache`, `rollout` — the firmware image cache and the staged rollout (M4).
- `hellokey` — the local-CSMS certificate's Ed25519 key, which signs the Hello answers (M14, M17).
"""
