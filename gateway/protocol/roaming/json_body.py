"""JSON bodies of the roaming messages (IEC 63119, codes 200-215), checked against gateway.schema.

Encoding rules (docs/roaming.md):
- keys are the schema's field names; unknown keys are kept (forward compatibility);
- uint/int: JSON integers within the field's bounds (``true``/``false`` are not integers);
  float: a finite JSON number within bounds; bool: ``true``/``false``;
- str: a string of at most ``max_len`` UTF-8 bytes; secret: a string too (TLS protects it
  upstream); bin: standard base64 whose decoded length is at most ``max_len``;
- enum fields: the value's NAME as a lower-case string (``"accepted"``, ``"out_of_order"``),
  never its integer: bodies stay readable and survive a renumbering of nothing;
- list/struct recursively; ``null`` is not a value of any field (leave an optional field out);
- the fields of ``GID_FIELDS`` hold global identifiers (gateway.protocol.gid) of the given type.

Limits checked before or while parsing: at most ``MAX_BODY`` bytes, nesting depth at most
``MAX_DEPTH``, valid UTF-8, no duplicate keys, no NaN/Infinity, a JSON object at the top.
Every rejection is a `BodyError` naming the field (a path like ``evses[2].evse_gid``) and the cause.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
from typing import Any, Final

from gateway import schema
from gateway.protocol import gid

MAX_BODY: Final = 256 * 1024
MAX_DEPTH: Final = 16

#: fields holding a global id, with the gid type letter they must have
GID_FIELDS: Final[dict[str, str]] = {
    "operator_id": "O",
    "party_id": "O",
    "location_id": "L",
    "evse_gid": "E",
    "contract_id": "C",
    "roaming_session_id": "S",
    "sdr_id": "R",
}
#: list fields whose items are global ids
GID_ITEMS: Final[dict[str, str]] = {"sdrs": "R"}

#: the messages the schema marks `from = "re"` (codes 200 on): a new one needs no edit here
ROAMING_CODES: Final = frozenset(m.code for m in schema.MESSAGES.values() if m.origin == "re")

MAX_INT_DIGITS: Final = 20
"""A JSON integer of more digits is refused before Python converts it: no schema integer is
wider than 64 bits, and the conversion of a long one is quadratic (and raises ValueError
beyond 4,300 digits)."""

_SPECIAL: Final = re.compile(rb'[\[\]{}"\\]')


class BodyError(ValueError):
    """A body was refused. `cause` is a stable code, `field` the path of the offending field."""

    def __init__(self, cause: str, detail: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.cause = cause
        self.detail = detail
        self.field = field
        self.status = status

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.cause, "detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        return out


def roaming_messages() -> dict[str, schema.MessageSpec]:
    """The roaming messages by name."""
    return {m.name: m for m in schema.MESSAGES.values() if m.code in ROAMING_CODES}


def _depth(data: bytes) -> int:
    """The deepest nesting of `data`, in one pass: only the bytes that matter (brackets,
    quotes, backslashes) are visited, each once, so a hostile body costs time linear in its
    size (a regex skipping strings backtracks on unterminated ones: quadratic)."""
    deepest = depth = 0
    in_string = False
    escaped_at = -1  # the position of the byte a backslash escapes
    for m in _SPECIAL.finditer(data):
        at = m.start()
        if at == escaped_at:
            continue
        c = data[at]
        if in_string:
            if c == 0x5C:  # backslash
                escaped_at = at + 1
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if depth > MAX_DEPTH:
                    return depth
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyError("out_of_range", f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constants(name: str) -> float:
    raise BodyError("bad_json", f"{name} is not a JSON number")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BodyError("duplicate_key", f"key {k!r} appears twice", field=k)
        out[k] = v
    return out


def parse(data: bytes) -> dict[str, Any]:
    """Parse a body: size and depth are checked before the JSON parser sees it."""
    if len(data) > MAX_BODY:
        raise BodyError("too_large", f"body of {len(data)} bytes exceeds {MAX_BODY}", status=413)
    if _depth(data) > MAX_DEPTH:
        raise BodyError("too_deep", f"nesting deeper than {MAX_DEPTH}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("bad_utf8", f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constants, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise BodyError("bad_json", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BodyError("too_deep", "nesting too deep") from None
    if not isinstance(value, dict):
        raise BodyError("bad_json", f"body must be a JSON object, not {type(value).__name__}")
    return value


def enum_names(spec: schema.FieldSpec) -> dict[str, int]:
    """JSON names of an enum field's values."""
    cls = getattr(schema, spec.enum or "")
    assert isinstance(cls, type) and issubclass(cls, enum.IntEnum)
    return {m.name.lower(): int(m) for m in cls}


def _kind(value: object) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
    )


def _check_number(spec: schema.FieldSpec, value: object, path: str) -> None:
    if spec.type in ("uint", "int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise BodyError("bad_type", f"expected an integer, got {_kind(value)}", path)
    elif not isinstance(value, int | float) or isinstance(value, bool):
        raise BodyError("bad_type", f"expected a number, got {_kind(value)}", path)
    elif not math.isfinite(value):
        raise BodyError("out_of_range", "number is not finite", path)
    if not spec.min <= value <= spec.max:
        raise BodyError("out_of_range", f"{value} outside [{spec.min:g}, {spec.max:g}]", path)


def _check_str(value: object, max_len: int, path: str) -> str:
    if not isinstance(value, str):
        raise BodyError("bad_type", f"expected a string, got {_kind(value)}", path)
    n = len(value.encode("utf-8", "surrogatepass"))
    if max_len and n > max_len:
        raise BodyError("out_of_range", f"string of {n} bytes exceeds {max_len}", path)
    return value


def _check_bin(value: object, max_len: int, path: str) -> None:
    text = _check_str(value, 0, path)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BodyError("bad_type", "expected base64", path) from None
    if max_len and len(raw) > max_len:
        raise BodyError("out_of_range", f"{len(raw)} bytes exceed {max_len}", path)


def _check_gid(value: str, type_: str, path: str) -> str:
    try:
        return gid.canonical(value, expect=type_)
    except gid.GidError as exc:
        raise BodyError("bad_gid", str(exc), path) from None


def _check_members(members: tuple[tuple[int, bool], ...], value: object, path: str) -> None:
    if not isinstance(value, dict):
        raise BodyError("bad_type", f"expected an object, got {_kind(value)}", path or None)
    for key, required in members:
        spec = schema.FIELDS[key]
        sub = f"{path}.{spec.name}" if path else spec.name
        if spec.name not in value:
            if required:
                raise BodyError("missing_field", "required field is absent", sub)
            continue
        _check_field(spec, value[spec.name], sub)
        if spec.name in GID_FIELDS:  # every party stores and compares the canonical spelling
            value[spec.name] = gid.canonical(value[spec.name])
        elif spec.name in GID_ITEMS:
            value[spec.name] = [gid.canonical(item) for item in value[spec.name]]


def _check_field(spec: schema.FieldSpec, value: object, path: str) -> None:
    t = spec.type
    if spec.enum is not None:
        names = enum_names(spec)
        if not isinstance(value, str):
            raise BodyError("bad_type", f"expected one of {sorted(names)} as a string, got {_kind(value)}", path)
        if value not in names:
            raise BodyError("bad_enum", f"{value[:40]!r} is not one of {sorted(names)}", path)
    elif t in ("uint", "int", "float"):
        _check_number(spec, value, path)
    elif t == "bool":
        if not isinstance(value, bool):
            raise BodyError("bad_type", f"expected a boolean, got {_kind(value)}", path)
    elif t in ("str", "secret"):
        _check_str(value, spec.max_len, path)
        if spec.name in GID_FIELDS:
            assert isinstance(value, str)
            _check_gid(value, GID_FIELDS[spec.name], path)
    elif t == "bin":
        _check_bin(value, spec.max_len, path)
    elif t == "list":
        _check_list(spec, value, path)
    elif t == "struct":
        _check_members(spec.members, value, path)
    elif t == "any":
        pass
    else:  # pragma: no cover - the generator knows no other type
        raise BodyError("bad_type", f"field type {t!r} unknown to the JSON mapping", path)


def _check_list(spec: schema.FieldSpec, value: object, path: str) -> None:
    if not isinstance(value, list):
        raise BodyError("bad_type", f"expected an array, got {_kind(value)}", path)
    if len(value) > spec.max_len:
        raise BodyError("too_many_items", f"{len(value)} items exceed {spec.max_len}", path)
    for i, item in enumerate(value):
        sub = f"{path}[{i}]"
        if spec.elem == "struct":
            _check_members(spec.members, item, sub)
        elif spec.elem in ("str", "secret"):
            _check_str(item, spec.item_len, sub)
            if spec.name in GID_ITEMS:
                assert isinstance(item, str)
                _check_gid(item, GID_ITEMS[spec.name], sub)
        elif spec.elem == "bin":
            _check_bin(item, spec.item_len, sub)
        elif spec.elem in ("uint", "int", "float"):
            _check_number(spec._replace(type=spec.elem), item, sub)
        elif spec.elem == "bool" and not isinstance(item, bool):
            raise BodyError("bad_type", f"expected a boolean, got {_kind(item)}", sub)


def check(message: str, body: dict[str, Any], *, response: bool = False) -> dict[str, Any]:
    """Check a parsed body of `message` (its request, or its response); return it, its global
    ids rewritten in canonical form (`gid.canonical`: standard EVSE id and eMAID spellings)."""
    spec = schema.MESSAGE_BY_NAME.get(message)
    if spec is None or spec.code not in ROAMING_CODES:
        raise BodyError("unknown_message", f"{message[:40]!r} is not a roaming message", status=404)
    _check_members(spec.response if response else spec.fields, body, "")
    return body


def load(message: str, data: bytes, *, response: bool = False) -> dict[str, Any]:
    """Parse and check a body in one step."""
    return check(message, parse(data), response=response)


def dump(body: dict[str, Any]) -> bytes:
    """Encode a body (compact, UTF-8)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def b64(data: bytes) -> str:
    """Encode a `bin` field."""
    return base64.b64encode(data).decode("ascii")
