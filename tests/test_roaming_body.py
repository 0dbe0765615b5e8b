"""JSON bodies of the roaming messages and the HMAC source authentication, without the network."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.roaming import auth, json_body
from gateway.protocol.roaming.json_body import BodyError

SDR = {
    "sdr_id": "DE*CSO*R1",
    "roaming_session_id": "DE*CSP*S1",
    "evse_gid": "DE*CSO*E1-1",
    "token_uid": "04A1",
    "started": 1,
    "stopped": 2,
    "meter_start_wh": 0,
    "meter_stop_wh": 5,
    "energy_wh": 5,
    "cost": 1,
    "currency": "EUR",
    "signed_meter": json_body.b64(b"\x01\x02"),
}


def cause(message: str, body: object, response: bool = False) -> tuple[str, str | None]:
    with pytest.raises(BodyError) as exc:
        json_body.load(message, json.dumps(body).encode(), response=response)
    return exc.value.cause, exc.value.field


def test_every_roaming_message_is_known() -> None:
    assert sorted(m.code for m in json_body.roaming_messages().values()) == list(range(200, 219))


def test_valid_body_passes_and_unknown_keys_are_kept() -> None:
    body = json_body.load("PutSdr", json_body.dump(dict(SDR, vendor_x={"a": 1})))
    assert body["vendor_x"] == {"a": 1}


def test_field_errors_name_the_field() -> None:
    assert cause("PutSdr", dict(SDR, cost=-1)) == ("out_of_range", "cost")
    assert cause("PutSdr", dict(SDR, cost=1.5)) == ("bad_type", "cost")
    assert cause("PutSdr", dict(SDR, cost=True)) == ("bad_type", "cost")
    assert cause("PutSdr", dict(SDR, cost=None)) == ("bad_type", "cost")
    assert cause("PutSdr", dict(SDR, currency="EURO")) == ("out_of_range", "currency")
    assert cause("PutSdr", dict(SDR, signed_meter="@@")) == ("bad_type", "signed_meter")
    assert cause("PutSdr", dict(SDR, signed_meter=json_body.b64(b"x" * 513))) == ("out_of_range", "signed_meter")
    assert cause("PutSdr", dict(SDR, sdr_id="DE*CSO*S1")) == ("bad_gid", "sdr_id")
    assert cause("PutSdr", {k: v for k, v in SDR.items() if k != "token_uid"}) == ("missing_field", "token_uid")
    plan = {"roaming_session_id": "DE*CSP*S1", "plan": [{"start_s": 0, "limit_w": 1}, {"start_s": 0}]}
    assert cause("ChargePlan", plan) == ("missing_field", "plan[1].limit_w")
    s = {"party_id": "DE*CHX*O", "sdrs": ["DE*CSO*R1", "nope"], "amount": 1, "currency": "EUR"}
    assert cause("Settlement", s) == ("bad_gid", "sdrs[1]")
    assert cause("AuthorizeRoaming", {"auth_status": 0}, response=True) == ("bad_type", "auth_status")
    assert cause("AuthorizeRoaming", {"auth_status": "fine"}, response=True) == ("bad_enum", "auth_status")


def test_limits_before_parsing() -> None:
    with pytest.raises(BodyError) as exc:
        json_body.parse(b" " * (json_body.MAX_BODY + 1))
    assert (exc.value.cause, exc.value.status) == ("too_large", 413)
    json_body.parse(b'{"a": ' + b"[" * 15 + b"]" * 15 + b"}")  # depth 16 is fine
    with pytest.raises(BodyError, match="nesting"):
        json_body.parse(b'{"a": ' + b"[" * 16 + b"]" * 16 + b"}")
    json_body.parse(b'{"a": "' + b"[" * 40 + b'"}')  # brackets in strings do not count
    with pytest.raises(BodyError, match="twice"):
        json_body.parse(b'{"a": 1, "a": 2}')


def _true_depth(v: object) -> int:
    if isinstance(v, dict):
        return 1 + max((_true_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_true_depth(x) for x in v), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner,
                                                                  max_size=3),
    max_leaves=12,
)  # fmt: skip


@given(_JSON)
def test_the_depth_scan_agrees_with_the_parser_whatever_the_strings_hold(value: object) -> None:
    # strings full of brackets, quotes and backslashes (escaped by json.dumps) must not count
    assert json_body._depth(json.dumps(value).encode()) == _true_depth(value)


@pytest.mark.timeout(60)  # the old regex scan took minutes on such bodies, blocking the event loop
@pytest.mark.parametrize(
    "body",
    [b'{"a":' + b'"\\' * (json_body.MAX_BODY // 2 - 4), b'"' * json_body.MAX_BODY, b"[" * json_body.MAX_BODY],
    ids=["unterminated-escapes", "quotes", "brackets"],
)
def test_hostile_bodies_at_the_size_limit_are_refused_by_name(body: bytes) -> None:
    with pytest.raises(BodyError) as exc:
        json_body.parse(body)
    assert exc.value.cause in ("bad_json", "too_deep")


def test_a_huge_integer_is_refused_by_name_not_by_a_valueerror() -> None:
    with pytest.raises(BodyError) as exc:
        json_body.parse(b'{"energy_wh": ' + b"9" * 5000 + b"}")
    assert exc.value.cause == "out_of_range"
    assert json_body.parse(b'{"x": -18446744073709551615}') == {"x": -18446744073709551615}


@given(st.binary(max_size=200))
def test_parse_never_fails_otherwise(data: bytes) -> None:
    try:
        json_body.parse(data)
    except BodyError as exc:
        assert exc.to_json()["error"]


def test_hmac_covers_every_part_and_checks_time() -> None:
    route = auth.Route("DE*CSO*O", "", "DE*CSP*O")
    h = auth.sign(b"k", "POST", "/roaming/v1/PutSdr", route, b"{}", now=1000.0)
    assert auth.verify(h, b"k", "POST", "/roaming/v1/PutSdr", body=b"{}", now=1000.0).origin == "DE*CSO*O"
    for changed in ({"x-ev-to": "DE*CHX*O"}, {"x-ev-origin": "DE*CHX*O"}, {"x-ev-ts": "1001"}):
        with pytest.raises(auth.AuthError, match="HMAC"):
            auth.verify(h | changed, b"k", "POST", "/roaming/v1/PutSdr", body=b"{}", now=1000.0)
    with pytest.raises(auth.AuthError, match="HMAC"):
        auth.verify(h, b"k", "POST", "/roaming/v1/PutSdr", body=b"{ }", now=1000.0)
    with pytest.raises(auth.AuthError) as exc:
        auth.verify(h, b"k", "POST", "/roaming/v1/PutSdr", body=b"{}", now=1301.0)
    assert exc.value.cause == "stale_timestamp"
    with pytest.raises(auth.AuthError) as exc:
        auth.verify(h | {"x-ev-party": "nobody"}, b"k", "POST", "/x", body=b"", now=1000.0)
    assert (exc.value.cause, exc.value.status) == ("bad_party", 400)


def test_token_rules() -> None:
    with pytest.raises(auth.AuthError, match="unknown"):
        auth.check_token(None, "DE*CSO*O", 0)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.check_token(("DE*CSO*O", 100), "DE*CSO*O", 100)
    with pytest.raises(auth.AuthError) as exc:
        auth.check_token(("DE*CSO*O", 100), "DE*CSP*O", 50)
    assert exc.value.status == 403
    auth.check_token(("DE*CSO*O", 100), "DE*CSO*O", 99)
    assert auth.token_digest("a") != "a" and len(auth.new_token()) >= 43
