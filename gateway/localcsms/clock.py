"""The site's time source (B13): the local clock, corrected by the CSMS's.

Boards synchronize on the gateway (Heartbeat, TimeSync, BootNotification answers), so the
gateway's own clock must not drift from the CSMS's: the time in the CSMS's SiteHello answer
replaces the local one when they differ by more than a second and a half.
"""

from __future__ import annotations

import time

from gateway.schema import EPOCH_UNIX


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def upstream_time(self, proto_seconds: int) -> None:
        skew = EPOCH_UNIX + proto_seconds - time.time()
        self.offset = skew if abs(skew) > 1.5 else 0.0
