"""One station's WebSocket to the CSMS: OCPP-J framing with the `ocpp` library's message
classes and its OCPP 2.0.1 JSON-schema validation, on `websockets`.

Rule: nothing the CSMS sends reaches a board unless it is a well-formed CALL of an action the
gateway carries, whose payload the OCPP 2.0.1 schema accepts; everything else is answered with
the CALLERROR OCPP-J names (RpcFrameworkError, MessageTypeNotSupported, NotImplemented,
NotSupported, FormatViolation, TypeConstraintViolation, OccurrenceConstraintViolation, …). The
CSMS's CALLs are handled concurrently (a board's answer may take seconds, and the station's own
CALL waits meanwhile for its result on the same socket); the station's own CALLs go one at a
time, as OCPP-J requires. Why not `ocpp.ChargePoint` itself: it routes each message to the end
before reading the next, so a CSMS CALL waiting for a board would hold the result of the
station's own CALL; and it logs an unparsable frame instead of answering it.

Security profiles (OCPP 2.0.1 A00): 1 basic auth over ws://, 2 basic auth over wss:// (the CSMS
verified against `ca`), 3 mutual TLS with the site's certificate over wss://.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

import websockets
from ocpp import exceptions as oe
from ocpp import messages as ocpp_messages
from ocpp.messages import Call, CallError, CallResult, MessageType

from gateway.ocpp.up import Payload

log = logging.getLogger("gateway.ocpp")

VERSION = "2.0.1"
SUBPROTOCOL = "ocpp2.0.1"
SCHEMAS = frozenset(
    p.name.removesuffix("Request.json")
    for p in resources.files("ocpp.v201").joinpath("schemas").iterdir()
    if p.name.endswith("Request.json")
)
"""The actions OCPP 2.0.1 defines (a CALL of another action is NotImplemented)."""
CallHandler = Callable[[str, Payload], Awaitable[Payload]]
"""Answers one CSMS CALL (action, payload already valid) with its response payload; raises
an `ocpp.exceptions.OCPPError` to answer with a CALLERROR."""


class Socket(Protocol):
    """What a station needs of its WebSocket (websockets' ClientConnection is one)."""

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self) -> None: ...


class CallFailed(Exception):
    """The CSMS answered the station's CALL with a CALLERROR."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code


class Refused(Exception):
    """The station's own payload does not pass the OCPP 2.0.1 schema (a translation bug):
    it is never sent."""


def error_frame(unique_id: str, code: str, description: str, cause: str = "") -> str:
    return str(CallError(unique_id, code, description[:255], {"cause": cause[:255]} if cause else {}).to_json())


class OcppLink:
    """One station's OCPP-J session on an open socket; `run()` reads until it closes."""

    def __init__(self, station_id: str, ws: Socket, handler: CallHandler, timeout_s: float,
                 max_frame: int, max_concurrent: int = 8) -> None:  # fmt: skip
        self.station_id = station_id
        self.ws = ws
        self.handler = handler
        self.timeout_s = timeout_s
        self.max_frame = max_frame
        self._waiting: dict[str, asyncio.Future[CallResult | CallError]] = {}
        self._ids = itertools.count(1)
        self._nonce = secrets.token_hex(4)
        """Our CALLs' message ids are unique across connections and restarts (OCPP-J): this
        connection's nonce and a counter, or the id the caller gives (a row's, stable)."""
        self._call_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors_sent: dict[str, int] = {}
        """CALLERRORs this station answered the CSMS, by code."""

    async def run(self) -> None:
        try:
            while True:
                raw = await self.ws.recv()
                await self.received(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))
        finally:
            for t in list(self._tasks):
                t.cancel()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection to the CSMS lost"))

    async def received(self, raw: str) -> None:
        """One frame from the CSMS."""
        if len(raw) > self.max_frame:
            await self._error(_peek_id(raw), "FormatViolation", f"frame of {len(raw)} bytes over {self.max_frame}")
            return
        try:
            msg = json.loads(raw)
        except ValueError:
            await self._error("-1", "RpcFrameworkError", "not JSON")
            return
        if not isinstance(msg, list) or len(msg) < 3 or not isinstance(msg[1], str):
            await self._error(_peek_id(msg), "RpcFrameworkError", "not an OCPP-J message (no message id)")
            return
        kind, uid = msg[0], msg[1]
        if kind == MessageType.Call and len(msg) == 4 and isinstance(msg[2], str) and isinstance(msg[3], dict):
            if self._slots.locked():
                await self._error(uid, "GenericError", "too many CALLs in progress")
                return
            await self._slots.acquire()
            t = asyncio.get_running_loop().create_task(self._call(Call(uid, msg[2], msg[3])))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        elif kind == MessageType.CallResult and len(msg) == 3 and isinstance(msg[2], dict):
            self._resolve(uid, CallResult(uid, msg[2]))
        elif kind == MessageType.CallError and len(msg) == 5:
            self._resolve(uid, CallError(uid, str(msg[2]), str(msg[3]), msg[4]))
        elif kind in (MessageType.Call, MessageType.CallResult, MessageType.CallError):
            await self._error(uid, "RpcFrameworkError", "malformed OCPP-J message")
        else:
            await self._error(uid, "MessageTypeNotSupported", f"message type {kind!r}")

    def _resolve(self, uid: str, msg: CallResult | CallError) -> None:
        fut = self._waiting.get(uid)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _call(self, msg: Call) -> None:
        try:
            try:
                if msg.action not in SCHEMAS:
                    raise oe.NotImplementedError(f"{msg.action} is not an OCPP {VERSION} action")
                _validate(msg)
                payload = await self.handler(msg.action, msg.payload)
                result = msg.create_call_result(payload)
                try:
                    _validate(result)
                except oe.OCPPError as e:  # our own answer: a bug here, not the CSMS's fault
                    raise oe.InternalError(f"response does not pass the schema: {e.description}") from e
            except oe.OCPPError as e:
                await self._error(msg.unique_id, _code(e), e.description or type(e).__name__, _cause(e))
                return
            except Exception as e:
                log.exception("%s: %s failed", self.station_id, msg.action)
                await self._error(msg.unique_id, "InternalError", f"{type(e).__name__}")
                return
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.ws.send(result.to_json())
        finally:
            self._slots.release()

    async def _error(self, uid: str, code: str, description: str, cause: str = "") -> None:
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.ws.send(error_frame(uid, code, description, cause))

    async def call(self, action: str, payload: Payload, uid: str | None = None) -> Payload:
        """The station's CALL; its CALLRESULT's payload (checked against the schema).
        `Refused` before sending, `CallFailed` on a CALLERROR, TimeoutError, ConnectionError.
        `uid`: the message id, when the same message must keep its id when sent again."""
        msg = Call(uid or f"{self._nonce}-{next(self._ids)}", action, payload)
        try:
            _validate(msg)
        except oe.OCPPError as e:
            raise Refused(f"{action}: {e.description} {_cause(e)}") from e
        async with self._call_lock:
            fut: asyncio.Future[CallResult | CallError] = asyncio.get_running_loop().create_future()
            self._waiting[msg.unique_id] = fut
            try:
                await self.ws.send(msg.to_json())
                answer = await asyncio.wait_for(fut, self.timeout_s)
            finally:
                self._waiting.pop(msg.unique_id, None)
        if isinstance(answer, CallError):
            raise CallFailed(answer.error_code, answer.error_description)
        answer.action = action
        try:
            _validate(answer)
        except oe.OCPPError as e:
            raise CallFailed(_code(e), f"the CSMS's {action} result: {e.description} {_cause(e)}") from e
        return dict(answer.payload)


def _validate(msg: Call | CallResult) -> None:
    """The library's validation, on the event loop: its `validate_payload` hands each message to
    a thread, which buys no concurrency (jsonschema is pure Python and holds the GIL) and costs
    two thread switches per message (a third of the face's CPU per message in
    tools/bench/ocpp_bridge.py, docs/performance.md)."""
    try:
        ocpp_messages._validate_payload(msg, VERSION)
    except oe.ProtocolError as e:  # the library's name for a required key missing
        raise oe.OccurrenceConstraintViolationError(e.description, _cause(e)) from e


def _code(e: oe.OCPPError) -> str:
    return str(getattr(e, "code", "GenericError"))


def _cause(e: oe.OCPPError) -> str:
    d = e.details if isinstance(e.details, dict) else {}
    return str(d.get("cause", ""))[:255]


def _peek_id(msg: object) -> str:
    """The message id of a frame refused before parsing, when it can be read; "-1" otherwise."""
    if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str):
        return msg[1][:36]
    if isinstance(msg, str):
        with contextlib.suppress(ValueError, IndexError):
            head = msg[:128].split(",")
            if len(head) > 1:
                return str(json.loads(head[1]))[:36]
    return "-1"


# ---------------------------------------------------------------- connecting


def basic_auth(station_id: str, password: str) -> str:
    raw = f"{station_id}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def connect(url: str, station_id: str, headers: dict[str, str], ctx: ssl.SSLContext | None,
                  timeout_s: float, max_frame: int) -> Any:  # fmt: skip
    """The station's WebSocket (`url`/station id, subprotocol ocpp2.0.1); a CSMS that does not
    agree on the subprotocol is refused."""
    ws = await websockets.connect(
        f"{url.rstrip('/')}/{station_id}",
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        additional_headers=headers,
        ssl=ctx,
        open_timeout=timeout_s,
        max_size=max(max_frame * 4, 1 << 16),  # beyond our own bound: answered, not dropped
        ping_interval=timeout_s,
        ping_timeout=timeout_s,
    )
    if ws.subprotocol != SUBPROTOCOL:
        await ws.close()
        raise ConnectionError(f"the CSMS did not agree on {SUBPROTOCOL}")
    return ws
