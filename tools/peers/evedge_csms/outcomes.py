"""What the CSMS records when a gateway answers a Command: the per-target results, and for
targets whose result carries the board's own response frame (`frame`, docs/csms.md), the
use-case data in it (variables read, schedule, certificates installed, transaction id …)."""

from __future__ import annotations

import logging
from typing import Any

from evedge_csms.inbound import Ctx, store_variable
from gateway import _core
from gateway.schema import Action, Key, Kind, Status

log = logging.getLogger("csms.outcomes")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def record(ctx: Ctx, cmd: dict[str, Any], action: int, body: dict[Any, Any], now: float) -> None:
    store = ctx.store
    if action != Action.COMMAND:  # a bare request (AvailablePower): its response is the result
        store.update(
            "commands",
            {"state": "done", "results": [_jsonable(body)], "done": int(now)},
            {"cmd_id": cmd["cmd_id"]},
        )
        return
    results = []
    inner_action = int(cmd["action"])
    for r in body.get(Key.RESULTS, []):
        entry: dict[str, Any] = {"device_id": r.get(Key.DEVICE_ID), "status": r.get(Key.STATUS)}
        if Key.REASON in r:
            entry["reason"] = r[Key.REASON]
        frame = r.get(Key.FRAME)
        if isinstance(frame, bytes):
            try:
                f = _core.decode(frame)
            except _core.CoreError as e:
                entry["response_error"] = f"{e.name}: {e.reason}"
            else:
                entry["response"] = _jsonable(f.body)
                if f.kind == Kind.RESPONSE and f.action == inner_action:
                    apply(ctx, cmd, str(entry["device_id"]), f.body, now)
        results.append(entry)
        _status_side_effects(ctx, cmd, entry, now)
    store.update("commands", {"state": "done", "results": results, "done": int(now)}, {"cmd_id": cmd["cmd_id"]})


def _status_side_effects(ctx: Ctx, cmd: dict[str, Any], entry: dict[str, Any], now: float) -> None:
    action, device = int(cmd["action"]), entry["device_id"]
    accepted = entry["status"] == Status.ACCEPTED
    if action == Action.RESERVE_NOW and cmd["ref"]:
        status = "accepted" if accepted else "rejected"
        ctx.store.update("reservations", {"status": status, "updated": int(now)}, {"reservation_id": int(cmd["ref"])})
    elif action == Action.UPDATE_FIRMWARE and device:
        f = _core.decode(cmd["frame"])
        key = {"site_id": cmd["site_id"], "device_id": device, "image_id": f.body[Key.IMAGE_ID]}
        row = ctx.store.get("fw_status", **key)
        history = list(row["history"]) if row and row["history"] else []
        history.append([int(now), "command " + ("accepted" if accepted else f"status {entry['status']}")])
        ctx.store.upsert("fw_status", {**key, "history": history, "time": int(now)})


def apply(ctx: Ctx, cmd: dict[str, Any], device: str, body: dict[Any, Any], now: float) -> None:
    """Use-case data in a board's response to a Command."""
    action, site = int(cmd["action"]), cmd["site_id"]
    if action in (Action.GET_VARIABLES, Action.SET_VARIABLES):
        for v in body.get(Key.VARS, []):
            store_variable(ctx.store, site, device, v, now)
    elif action == Action.REQUEST_START_TRANSACTION and Key.TX_ID in body:
        ctx.store.upsert("transactions", {"site_id": site, "device_id": device, "tx_id": body[Key.TX_ID]})
    elif action == Action.DELETE_PERSONAL_DATA and cmd["ref"]:
        row = ctx.store.get("privacy_requests", request_id=int(cmd["ref"]))
        if row is not None:
            deleted = dict(row["deleted"] or {})
            deleted[f"site:{site}/{device}"] = body.get(Key.COUNT, 0)
            ctx.store.update("privacy_requests", {"deleted": deleted}, {"request_id": int(cmd["ref"])})
