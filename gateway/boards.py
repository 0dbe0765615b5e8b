"""The boards online, their requests to the site, and the site's requests to them.

Rule: a board request is decoded once. Its frame, its device and, for an `Authorize`, the
id token in clear and the local CSMS's decision on it travel together as one
`BoardRequest` down one chain (gateway.service: roaming endpoint → CSMS over the uplink →
local CSMS), each stage answering it or handing it on. And every request the site sends a
board waits for its answer in one table (`Boards.pending`, by link and message id), whoever
sends it: a command fanned out by the CSMS, a rollout's UpdateFirmware, a power share.

`BoardLink` is what the site needs of one board connection (gateway.lan.BoardConnection is
one). `Boards` keeps the links online by device and by link number, wakes what waits for a
board to come back, seals a request for one board (its plaintext `secret` fields encrypted
under the board's E_dn at the counter the frame carries) and resolves the answer the
dispatcher hands back (`answered`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from gateway import _core
from gateway.link import FrameTooLarge, Link, State, proto_ts
from gateway.localcsms.auth import Authorizer, Decision
from gateway.protocol.text import clip_reason
from gateway.schema import FIELDS, MESSAGES, Action, Key, Kind, Status

SECRET_KEYS = frozenset(k for k, spec in FIELDS.items() if spec.type == "secret")
"""Body keys whose values cross the LAN encrypted (docs/protocol.md)."""
Result = dict[int, Any]
"""One target's result in a `Command` response: device_id, status, reason?, frame?."""


class BoardLink(Protocol):
    """What the site needs of one board connection."""

    link: Link
    closed: bool

    def send_one(self, frame: bytes) -> None: ...

    def close(self, cause: str = "site", reason: str = "") -> None:
        """Closes the link, counted under `cause` (gateway.languard.CAUSES)."""


class LinkNotOpen(ConnectionError):
    """The board's link is not (or no longer) open: nothing was sent."""


@dataclass(frozen=True, slots=True)
class BoardRequest:
    """A request a board sent the site, decoded once."""

    conn: BoardLink
    device: str
    raw: bytes
    """The frame as the board sealed it (what a Relay carries upstream)."""
    frame: _core.Frame
    token: str | None = None
    """The id token of an `Authorize`, in clear."""
    decision: Decision | None = None
    """The local CSMS's decision on `token` (list, cache, or the offline policy)."""

    @property
    def known_here(self) -> bool:
        """An `Authorize` the site answers at once, online too: a token in its local list, or
        cached within the operator's trust window (gateway/localcsms/auth.py, S2)."""
        return self.decision is not None and self.decision.trusted


def board_request(conn: BoardLink, raw: bytes, auth: Authorizer, now: float) -> BoardRequest:
    """Decodes a board request; an `Authorize`'s token is decrypted and looked up here, once."""
    f = _core.decode(raw)
    link = conn.link
    if f.action == Action.AUTHORIZE:
        ct = f.body.get(Key.ID_TOKEN)
        if isinstance(ct, bytes):
            token = link.decrypt(f.seq, Key.ID_TOKEN, ct).decode("utf-8", "replace")
            return BoardRequest(conn, link.device_id, raw, f, token, auth.authorize(token, proto_ts(now)))
    return BoardRequest(conn, link.device_id, raw, f)


def sealed_body(link: Link, body: dict[int, Any]) -> dict[int, Any]:
    """The body for one board: plaintext secret fields encrypted under its E_dn and the `seq`
    its next frame carries (call right before sealing, no await between)."""
    keys = SECRET_KEYS.intersection(body)
    if not keys:
        return body
    assert link.tx is not None
    seq = link.tx.seq
    out = dict(body)
    for k in keys:
        v = body[k]
        plain = v.encode() if isinstance(v, str) else bytes(v)
        out[k] = _core.aes_ctr(link.e_dn, seq, k, plain)
    return out


C = TypeVar("C", bound=BoardLink)


class Boards(Generic[C]):
    """The links online and the requests the site waits on."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        """The site's clock (its frames' timestamps)."""
        self.online: dict[str, C] = {}
        self.by_idx: dict[int, C] = {}
        self.came_online: dict[str, asyncio.Event] = {}
        self.pending: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        """(link idx, msg id) of a request to a board → its answer frame."""

    def opened(self, conn: C) -> None:
        did = conn.link.device_id
        old = self.online.get(did)
        if old is not None and old is not conn:
            old.close("replaced")  # a board reconnecting replaces its stale link
        self.online[did] = conn
        self.by_idx[conn.link.idx] = conn
        ev = self.came_online.pop(did, None)
        if ev is not None:
            ev.set()

    def closed(self, conn: C) -> None:
        idx = conn.link.idx
        did = conn.link.device_id
        if did and self.online.get(did) is conn:
            del self.online[did]
            self.by_idx.pop(idx, None)
        for key, fut in list(self.pending.items()):
            if key[0] == idx and not fut.done():
                fut.set_exception(ConnectionError("link closed"))

    def answered(self, idx: int, msg_id: int, frame: bytes) -> None:
        """A board's response or error frame (from the dispatcher): to the request waiting."""
        fut = self.pending.pop((idx, msg_id), None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    async def wait_online(self, device_id: str, timeout: float) -> C | None:
        """The board's link, waiting up to `timeout` for it to come (back) online."""
        conn = self.online.get(device_id)
        if conn is None:
            ev = self.came_online.setdefault(device_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout)
            conn = self.online.get(device_id)
        return conn

    async def request(self, conn: C, action: int, body: dict[int, Any], timeout: float,
                      prio: int | None = None) -> bytes:  # fmt: skip
        """Seals a request for the board, sends it and waits for its response or error frame.
        `LinkNotOpen`, `FrameTooLarge` (above the board's rx_max): nothing sent; `ConnectionError`:
        the link closed before the answer; `TimeoutError`."""
        link = conn.link
        if link.state is not State.OPEN or link.tx is None:
            raise LinkNotOpen("link not open")
        msg_id, frame = link.request(action, sealed_body(link, body), self.now(), prio)
        key = (link.idx, msg_id)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        conn.send_one(frame)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(key, None)

    def notify(self, conn: C, action: int, body: dict[int, Any], prio: int | None = None) -> None:
        """Seals an event for the board and sends it: a (non-durable) event has no answer."""
        link = conn.link
        if link.state is not State.OPEN or link.tx is None:
            raise LinkNotOpen("link not open")
        conn.send_one(link.request(action, sealed_body(link, body), self.now(), prio)[1])

    async def deliver(self, device_id: str, action: int, body: dict[int, Any], prio: int, timeout: float) -> Result:
        """One target of a command: the request re-sealed for this board, its answer as the
        target's result (with the board's response envelope under `frame`). A board offline
        now gets it if it comes back before the deadline (B16). An event (Setpoint, E7) has no
        answer: its result is ACCEPTED once it is on the board's link (the board reports what it
        did in its MeasuredValues)."""
        deadline = time.monotonic() + timeout
        conn = await self.wait_online(device_id, timeout)
        if conn is None:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: "board offline until expiry"}
        if MESSAGES[action].kind == Kind.EVENT:
            try:
                self.notify(conn, action, body, prio)
            except LinkNotOpen:
                return {Key.DEVICE_ID: device_id, Key.STATUS: Status.FAILED, Key.REASON: "link not open"}
            except FrameTooLarge as e:
                return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: str(e)}
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.ACCEPTED, Key.REASON: "sent (an event: no answer)"}
        try:
            raw = await self.request(conn, action, body, max(0.0, deadline - time.monotonic()), prio)
        except LinkNotOpen:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.FAILED, Key.REASON: "link not open"}
        except FrameTooLarge as e:  # not sent: the sender splits it (docs/protocol.md, "Frame size")
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.REJECTED, Key.REASON: str(e)}
        except TimeoutError:
            return {
                Key.DEVICE_ID: device_id,
                Key.STATUS: Status.FAILED,
                Key.REASON: "TIMEOUT: no answer from the board",
            }
        except ConnectionError:
            return {Key.DEVICE_ID: device_id, Key.STATUS: Status.FAILED, Key.REASON: "link lost before the answer"}
        answer = _core.decode(raw)
        out: Result = {Key.DEVICE_ID: device_id, Key.FRAME: raw}
        if answer.kind == Kind.ERROR:
            out[Key.STATUS] = Status.REJECTED
            out[Key.REASON] = clip_reason(str(answer.body.get(Key.REASON, "")))
        else:
            out[Key.STATUS] = int(answer.body.get(Key.STATUS, Status.ACCEPTED))
            if Key.REASON in answer.body:
                out[Key.REASON] = answer.body[Key.REASON]
        return out
