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


def _set_variables(ctx: Ctx, cmd: dict[str, Any], site: str, device: str, body: dict[Any, Any], now: float) -> None:
    """M2: what the station now holds: the value written where it accepted it (or will apply it
    after a reboot), the value known before where it refused it; its answer carries only the
    status, so the value comes from the request (the answers are in the request's order)."""
    asked = _core.decode(cmd["frame"]).body.get(Key.VARS, [])
    for i, answer in enumerate(body.get(Key.VARS, [])):
        v = dict(answer)
        req = asked[i] if i < len(asked) else {}
        same = all(req.get(k) == v.get(k) for k in (Key.COMPONENT, Key.VARIABLE, Key.INSTANCE, Key.EVSE))
        if same and v.get(Key.STATUS) in (Status.ACCEPTED, Status.REBOOT_REQUIRED) and Key.VAL in req:
            v[Key.VAL] = req[Key.VAL]
        elif Key.VAL not in v:
            old = ctx.store.get(
                "variables",
                site_id=site,
                device_id=device,
                component=v[Key.COMPONENT],
                variable=v[Key.VARIABLE],
                instance=v.get(Key.INSTANCE, ""),
                evse=v.get(Key.EVSE, -1),
                attr=v.get(Key.ATTR, 0),
            )
            if old is not None:
                v[Key.VAL] = old["val"]
        store_variable(ctx.store, site, device, v, now)


def apply(ctx: Ctx, cmd: dict[str, Any], device: str, body: dict[Any, Any], now: float) -> None:
    """Use-case data in a board's response to a Command."""
    action, site = int(cmd["action"]), cmd["site_id"]
    if action == Action.GET_VARIABLES:
        for v in body.get(Key.VARS, []):
            store_variable(ctx.store, site, device, v, now)
    elif action == Action.SET_VARIABLES:
        _set_variables(ctx, cmd, site, device, body, now)
    elif action == Action.REQUEST_START_TRANSACTION and Key.TX_ID in body:
        ctx.store.upsert("transactions", {"site_id": site, "device_id": device, "tx_id": body[Key.TX_ID]})
    elif action == Action.DELETE_PERSONAL_DATA and cmd["ref"]:
        row = ctx.store.get("privacy_requests", request_id=int(cmd["ref"]))
        if row is not None:
            deleted = dict(row["deleted"] or {})
            deleted[f"site:{site}/{device}"] = body.get(Key.COUNT, 0)
            ctx.store.update("privacy_requests", {"deleted": deleted}, {"request_id": int(cmd["ref"])})
