"""The site's inventory (M1 BoardsReport): its boards, their EVSEs and what each one is; sans I/O.

The gateway learns what a board is from its BootNotification (model, vendor, serial, firmware)
and from a GetVariables it asks after that boot (`DISCOVER`: the same, with the number of
EVSEs and their rating); each EVSE's status from the board's StatusNotifications, and whether
the board is online from its link. The report lists every active device of the site (one
entry per EVSE, `evse_gid` by `gateway.protocol.gid.evse_gid`); a device deregistered or
migrated is no longer the site's and leaves the report. A board never discovered is listed
with what is known (status `unknown`, `max_power_w` 0: not known).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.gid import evse_gid
from gateway.schema import FIELDS, ConnectorStatus, EvseStatus, Key, Status

PAGE_MAX = FIELDS[Key.EVSES].max_len
"""EVSEs one BoardsReport may carry: a larger site is reported in pages."""
DISCOVER = (
    ("ChargingStation", "Model", "model"),
    ("ChargingStation", "VendorName", "vendor"),
    ("ChargingStation", "SerialNumber", "serial"),
    ("ChargingStation", "FirmwareVersion", "fw_version"),
    ("ChargingStation", "EVSECount", "evses"),
    ("EVSE", "MaxPowerW", "max_power_w"),
)
"""The board variables (component, variable) the site asks after a boot, and what they fill."""
_EVSE_STATUS: dict[int, EvseStatus] = {
    ConnectorStatus.AVAILABLE: EvseStatus.AVAILABLE,
    ConnectorStatus.OCCUPIED: EvseStatus.OCCUPIED,
    ConnectorStatus.RESERVED: EvseStatus.RESERVED,
    ConnectorStatus.UNAVAILABLE: EvseStatus.OUT_OF_ORDER,
    ConnectorStatus.FAULTED: EvseStatus.OUT_OF_ORDER,
}
_TEXT = {"model": Key.MODEL, "vendor": Key.VENDOR, "serial": Key.SERIAL, "fw_version": Key.FW_VERSION}
WATTS_MAX = int(FIELDS[Key.MAX_POWER_W].max)
EVSES_MAX = 255
"""The most EVSEs one board is believed to have (the schema's bound of `evse`)."""


@dataclass
class BoardInfo:
    """What the site knows of one board."""

    model: str | None = None
    vendor: str | None = None
    serial: str | None = None
    fw_version: str | None = None
    evses: int = 1
    max_power_w: int = 0
    """The rating of each EVSE (W); 0: not known."""
    registration: int | None = None
    """The CSMS's decision on the board (gateway.schema.Registration), None: not known."""
    online: bool = False
    status: dict[int, int] = field(default_factory=dict)
    """EVSE → its last StatusNotification state (gateway.schema.ConnectorStatus)."""

    def fill(self, values: Mapping[str, Any]) -> bool:
        """Sets the known values; True if one changed."""
        changed = False
        for name, v in values.items():
            if v is not None and getattr(self, name) != v:
                setattr(self, name, v)
                changed = True
        return changed


def _text(key: int, v: object) -> str | None:
    return v[: FIELDS[key].max_len] if isinstance(v, str) else None


class Inventory:
    """The boards of the site as far as the gateway knows them; each update says whether the
    report changed."""

    def __init__(self, site_id: str) -> None:
        self.site_id = site_id
        self.boards: dict[str, BoardInfo] = {}

    def board(self, device_id: str) -> BoardInfo:
        b = self.boards.get(device_id)
        if b is None:
            b = self.boards[device_id] = BoardInfo()
        return b

    def booted(self, device_id: str, body: Mapping[int, Any]) -> bool:
        """A BootNotification: what the board says it is."""
        return self.board(device_id).fill({n: _text(k, body.get(k)) for n, k in _TEXT.items()})

    def discovered(self, device_id: str, variables: Iterable[Mapping[int, Any]]) -> bool:
        """The board's answer to the `DISCOVER` GetVariables (variables it does not know are skipped)."""
        got = {(v.get(Key.COMPONENT), v.get(Key.VARIABLE)): v.get(Key.VAL) for v in variables
               if v.get(Key.STATUS, Status.ACCEPTED) == Status.ACCEPTED}  # fmt: skip
        values: dict[str, Any] = {}
        for component, variable, name in DISCOVER:
            val = got.get((component, variable))
            if not isinstance(val, str):
                continue
            if name in _TEXT:
                values[name] = _text(_TEXT[name], val)
            elif val.isdigit():
                n = int(val)
                values[name] = min(max(n, 1), EVSES_MAX) if name == "evses" else min(n, WATTS_MAX)
        return self.board(device_id).fill(values)

    def connector(self, device_id: str, evse: int, state: int) -> bool:
        """A StatusNotification: EVSE `evse` (0: the whole board) is now `state`."""
        b = self.board(device_id)
        if evse == 0:
            changed = any(b.status.get(e) != state for e in range(1, b.evses + 1))
            b.status = dict.fromkeys(range(1, b.evses + 1), state)
            return changed
        changed = b.status.get(evse) != state
        b.status[evse] = state
        return changed

    def link(self, device_id: str, online: bool) -> bool:
        return self.board(device_id).fill({"online": online})

    def registration(self, device_id: str, registration: int) -> bool:
        return self.board(device_id).fill({"registration": registration})

    def entries(self, active: Iterable[str]) -> list[dict[int, Any]]:
        """One `evse_info` per EVSE of every active device, by device id then EVSE."""
        out: list[dict[int, Any]] = []
        for did in sorted(set(active)):
            b = self.boards.get(did) or BoardInfo()
            for n in range(1, b.evses + 1):
                state = b.status.get(n)
                status = _EVSE_STATUS.get(state) if b.online and state is not None else None
                e: dict[int, Any] = {
                    Key.EVSE_GID: evse_gid(self.site_id, did, n),
                    Key.EVSE_STATUS: int(status if status is not None else EvseStatus.UNKNOWN),
                    Key.MAX_POWER_W: b.max_power_w,
                    Key.DEVICE_ID: did,
                    Key.EVSE: n,
                }
                for name, key in _TEXT.items():
                    v = getattr(b, name)
                    if v is not None:
                        e[key] = v
                if b.registration is not None:
                    e[Key.REGISTRATION] = b.registration
                out.append(e)
        return out

    def reports(self, active: Iterable[str]) -> list[dict[int, Any]]:
        """The BoardsReport bodies of the inventory: one, or pages of `PAGE_MAX` EVSEs."""
        entries = self.entries(active)
        chunks = [entries[i : i + PAGE_MAX] for i in range(0, len(entries), PAGE_MAX)] or [[]]
        if len(chunks) == 1:
            return [{Key.SITE_ID: self.site_id, Key.EVSES: chunks[0]}]
        return [{Key.SITE_ID: self.site_id, Key.EVSES: c, Key.PAGE: i, Key.PAGES: len(chunks)}
                for i, c in enumerate(chunks)]  # fmt: skip
