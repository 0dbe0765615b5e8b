"""Load and check the message catalogue (tools/schema/messages.toml).

Everything the generators emit comes from the `Schema` built here, so a rule about the
catalogue (unique codes, known field names, secrets only at the top level) is written
once, in `load`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "messages.toml"

SCALARS = ("uint", "int", "float", "bool", "str", "bin", "secret", "any")
TYPES = (*SCALARS, "list", "struct")
KINDS = ("request", "event")
ORIGINS = ("cs", "csms", "site", "upstream", "re", "any")

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)


class SchemaError(ValueError):
    """The catalogue breaks one of its own rules; the message names the entry."""


@dataclass(frozen=True)
class Member:
    key: int
    name: str
    required: bool


@dataclass(frozen=True)
class Field:
    key: int
    name: str
    type: str
    elem: str  # element type of a list ("" otherwise); "struct" for a list of structs
    min: int | float
    max: int | float
    max_len: int  # str/bin/secret bytes, list items
    item_len: int  # str/bin element bytes of a list
    enum: str | None
    struct: str | None
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class Message:
    code: int
    name: str
    kind: str
    origin: str
    priority: int
    timeout_ms: int
    durable: bool
    usecases: tuple[str, ...]
    fields: tuple[Member, ...]
    response: tuple[Member, ...]


@dataclass(frozen=True)
class Error:
    code: int
    name: str
    text: str


@dataclass
class Schema:
    meta: dict[str, int]
    priorities: dict[str, int]
    kinds: dict[str, int]
    errors: list[Error]
    enums: dict[str, list[str]]
    fields: list[Field]
    structs: dict[str, tuple[Member, ...]]
    messages: list[Message]
    error_body: tuple[Member, ...]
    ack_body: tuple[Member, ...]
    by_name: dict[str, Field] = field(default_factory=dict)


def _members(names: list[str], fields: dict[str, dict[str, Any]], where: str) -> tuple[Member, ...]:
    out: list[Member] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.rstrip("?")
        if name not in fields:
            raise SchemaError(f"{where}: unknown field {name!r}")
        if name in seen:
            raise SchemaError(f"{where}: field {name!r} listed twice")
        seen.add(name)
        out.append(Member(int(fields[name]["key"]), name, not raw.endswith("?")))
    return tuple(out)


def _bounds(name: str, spec: dict[str, Any], ty: str, enums: dict[str, list[str]]) -> tuple[int | float, int | float]:
    if "enum" in spec:
        if spec["enum"] not in enums:
            raise SchemaError(f"field {name}: unknown enum {spec['enum']!r}")
        return 0, len(enums[spec["enum"]]) - 1
    if ty == "float":
        return float(spec.get("min", -1e300)), float(spec.get("max", 1e300))
    lo = int(spec.get("min", 0 if ty == "uint" else I64_MIN))
    hi = int(spec.get("max", U64_MAX if ty == "uint" else 2**63 - 1))
    if lo > hi:
        raise SchemaError(f"field {name}: min {lo} > max {hi}")
    return lo, hi


def load(path: Path = SCHEMA_PATH) -> Schema:
    with path.open("rb") as f:
        raw = tomllib.load(f)
    enums: dict[str, list[str]] = raw["enum"]
    fdefs: dict[str, dict[str, Any]] = raw["field"]
    structs_raw: dict[str, list[str]] = raw["struct"]
    structs = {n: _members(m, fdefs, f"struct {n}") for n, m in structs_raw.items()}

    fields: list[Field] = []
    keys: dict[int, str] = {}
    for name, spec in fdefs.items():
        key, ty = int(spec["key"]), spec["type"]
        if ty not in TYPES:
            raise SchemaError(f"field {name}: unknown type {ty!r}")
        if key in keys:
            raise SchemaError(f"field {name}: key {key} already used by {keys[key]}")
        if not 0 <= key <= 65535:
            raise SchemaError(f"field {name}: key {key} out of range")
        keys[key] = name
        elem, struct, members = "", None, tuple[Member, ...]()
        bty = ty
        if ty == "list":
            of = spec["of"]
            if of in structs:
                elem, struct, members = "struct", of, structs[of]
            elif of in SCALARS and of != "secret":
                elem, bty = of, of
            else:
                raise SchemaError(f"field {name}: list of unknown type {of!r}")
            if "max_len" not in spec:
                raise SchemaError(f"field {name}: a list needs max_len")
        if ty in ("str", "bin", "secret") and "max_len" not in spec:
            raise SchemaError(f"field {name}: {ty} needs max_len")
        lo, hi = _bounds(name, spec, bty, enums) if bty in ("uint", "int", "float") else (0, 0)
        fields.append(
            Field(
                key=key,
                name=name,
                type=ty,
                elem=elem,
                min=lo,
                max=hi,
                max_len=int(spec.get("max_len", 0)),
                item_len=int(spec.get("max_len_item", 0)),
                enum=spec.get("enum"),
                struct=struct,
                members=members,
            )
        )
    fields.sort(key=lambda f: f.key)
    by_name = {f.name: f for f in fields}
    for sname, smembers in structs.items():
        for m in smembers:
            if by_name[m.name].type == "secret":
                raise SchemaError(f"struct {sname}: secret field {m.name} allowed at body top level only")

    prios: dict[str, int] = raw["priority"]
    messages: list[Message] = []
    codes: dict[int, str] = {}
    for m in raw["message"]:
        name, code = m["name"], int(m["code"])
        if code in codes:
            raise SchemaError(f"message {name}: code {code} already used by {codes[code]}")
        if not 1 <= code <= 65535:
            raise SchemaError(f"message {name}: code {code} out of range")
        codes[code] = name
        if m["kind"] not in KINDS:
            raise SchemaError(f"message {name}: kind must be one of {KINDS}")
        if m["from"] not in ORIGINS:
            raise SchemaError(f"message {name}: from must be one of {ORIGINS}")
        if m["priority"] not in prios:
            raise SchemaError(f"message {name}: unknown priority {m['priority']!r}")
        if m["kind"] == "event" and "response" in m:
            raise SchemaError(f"message {name}: an event has no response")
        if m["kind"] == "request" and "response" not in m:
            raise SchemaError(f"message {name}: a request needs a response field list")
        if not m.get("usecases"):
            raise SchemaError(f"message {name}: list the use cases it serves")
        messages.append(
            Message(
                code=code,
                name=name,
                kind=m["kind"],
                origin=m["from"],
                priority=prios[m["priority"]],
                timeout_ms=int(m["timeout_ms"]),
                durable=bool(m.get("durable", False)),
                usecases=tuple(m["usecases"]),
                fields=_members(m["fields"], fdefs, f"message {name}"),
                response=_members(m.get("response", []), fdefs, f"message {name} response"),
            )
        )
    messages.sort(key=lambda x: x.code)
    for msg in messages:
        budget = raw["meta"]["max_up_objects" if msg.origin in UPSTREAM_ORIGINS else "max_objects"]
        for part in (msg.fields, msg.response):
            n = frame_values(by_name, part)
            if msg.origin != "re" and n > budget:
                raise SchemaError(f"message {msg.name}: a full body makes a frame of {n} values, above {budget}")
    errors = sorted((Error(int(e["code"]), e["name"], e["text"]) for e in raw["error"]), key=lambda e: e.code)
    if len({e.code for e in errors}) != len(errors):
        raise SchemaError("error codes must be unique")
    return Schema(
        meta=raw["meta"],
        priorities=prios,
        kinds=raw["kind"],
        errors=errors,
        enums=enums,
        fields=fields,
        structs=structs,
        messages=messages,
        error_body=_members(raw["bodies"]["error"], fdefs, "error body"),
        ack_body=_members(raw["bodies"]["ack"], fdefs, "ack body"),
        by_name=by_name,
    )


UPSTREAM_ORIGINS = ("site", "upstream")
"""Messages of upstream envelopes (max_up_frame, max_up_objects); `re` ones are JSON."""


def frame_values(by_name: dict[str, Field], members: tuple[Member, ...]) -> int:
    """The most values a frame of this body can hold below its envelope array (what
    max_objects counts): the 9 envelope elements, then every key and value of the body with
    every member present and every list at its max_len."""

    def value(f: Field) -> int:
        if f.type != "list":
            return 1
        item = 1 + sum(1 + value(by_name[m.name]) for m in f.members) if f.members else 1
        return 1 + f.max_len * item

    return 9 + sum(1 + value(by_name[m.name]) for m in members)


def upper(name: str) -> str:
    """Constant name for an identifier such as 'TimeSync', 'R3-1' or 'energy_wh'."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    out = "".join(c if c.isalnum() else "_" for c in name).upper()
    return "_" + out if out[0].isdigit() else out
