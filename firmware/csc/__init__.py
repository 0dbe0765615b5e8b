"""Charging station controller (CSC): the EVSE board's firmware.

Link codec modules: `msgpack` (canonical encoder, hardened decoder), `frame` (envelope,
validation against the generated `schema`, stream splitting), `crypto` (HMAC tags, key
derivation, AES-128-CTR for secret fields); the replay window is the link's (`link`). The
modules and how they depend on each other: docs/firmware.md, "Modules".

`FW_VERSION` is the firmware's version (Hello, BootNotification, the FirmwareVersion
variable): here, in the package's own module, which every import of a `csc` module loads
anyway, rather than in a module of its own (a module costs heap: ~160 B on the unix port).
"""

FW_VERSION = "1.0.0"
