"""Global identifiers (B12, IEC 63119-2): the standard EVSE id and eMAID spellings of ISO 15118-2
Annex H / eMI3, the eMAID check digit, and EVSE ids that stay distinct for long device ids."""

from __future__ import annotations

import pytest

from gateway.protocol import gid
from gateway.protocol.roaming import json_body


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("DE*AB7*E840*6487", "DE*AB7*E8406487"),
        ("DEAB7E8406487", "DE*AB7*E8406487"),
        ("DE8AACA2B3C4D5L", "DE*8AA*CA2B3C4D5"),
        ("DE-8AA-CA2B3C4D5-L", "DE*8AA*CA2B3C4D5"),
        ("DE*8AA*CA2B3C4D5*L", "DE*8AA*CA2B3C4D5"),
        ("DE8AACA2B3C4D5", "DE*8AA*CA2B3C4D5"),
        ("DE-8AA-CA2B3C4D5", "DE*8AA*CA2B3C4D5"),
        # the project's own spelling is already canonical
        ("DE*ABC*E1234-1", "DE*ABC*E1234-1"),
        ("DE*CSP*CABC123-4", "DE*CSP*CABC123-4"),
        ("DE*CSP*C00012345", "DE*CSP*C00012345"),
        ("DE*CSO*O", "DE*CSO*O"),
        ("DE*CSP*Snope", "DE*CSP*Snope"),
    ],
)
def test_the_standard_spellings_are_accepted_and_normalised(text: str, canonical: str) -> None:
    assert gid.canonical(text) == canonical


def test_the_issue_examples_have_their_types() -> None:
    assert gid.parse("DE*AB7*E840*6487", expect="E").party == "AB7"
    for text in ("DE8AACA2B3C4D5L", "DE-8AA-CA2B3C4D5-L", "DE*8AA*CA2B3C4D5*L"):
        c = gid.parse(text, expect="C")
        assert (c.country, c.party, c.local, c.operator) == ("DE", "8AA", "A2B3C4D5", "DE*8AA*O")


# published eMI3 examples ("Check Digit Calculation for Contract-IDs")
@pytest.mark.parametrize(
    ("emaid", "digit"),
    [
        ("NN123ABCDEFGHI", "T"),
        ("FRXYZ123456789", "2"),
        ("ITA1B2C3E4F5G6", "4"),
        ("ESZU8WOX834H1D", "R"),
        ("PT73902837ABCZ", "Z"),
        ("DE83DUIEN83QGZ", "D"),
        ("DE83DUIEN83ZGQ", "M"),
        ("DE8AA001234567", "0"),
        ("DE8AACA2B3C4D5", "L"),
    ],
)
def test_the_emaid_check_digit_follows_the_published_algorithm(emaid: str, digit: str) -> None:
    assert gid.check_digit(emaid) == digit
    assert gid.check_digit(emaid.lower()) == digit


def test_a_wrong_check_digit_is_refused_by_name() -> None:
    for text in ("DE8AACA2B3C4D5M", "DE-8AA-CA2B3C4D5-M", "DE*8AA*CA2B3C4D5*M"):
        with pytest.raises(gid.GidError, match="check digit is 'M', expected 'L'"):
            gid.parse(text)


def test_an_adjacent_transposition_is_caught() -> None:
    good = "DE8AACA2B3C4D5"
    swapped = "DE8AACA2B3C45D"
    assert gid.check_digit(good) != gid.check_digit(swapped)


def test_emaid_renders_the_iso15118_form_with_its_check_digit() -> None:
    assert gid.parse("DE*8AA*CA2B3C4D5").emaid() == "DE8AACA2B3C4D5L"
    with pytest.raises(gid.GidError, match="not an eMAID"):
        gid.parse("DE*CSP*CABC123-4").emaid()


@pytest.mark.parametrize(
    "text",
    ["de*ABC*E1", "DE*AB*E1", "DE*ABC*X1", "DE*ABC*E", "DE*ABC*E" + "1" * 33, "DE*ABC-E1", "DEABC*E1", "", "x" * 500],
)
def test_malformed_ids_are_refused(text: str) -> None:
    with pytest.raises(gid.GidError):
        gid.parse(text)


def test_the_expected_type_is_enforced_on_every_spelling() -> None:
    with pytest.raises(gid.GidError, match="is a contract id, expected a evse id"):
        gid.parse("DE8AACA2B3C4D5L", expect="E")


def test_evse_gid_is_unchanged_for_ordinary_device_ids() -> None:
    assert gid.evse_gid("DE*EVE*LSITE1", "ev-0000", 1) == "DE*EVE*ESITE1-ev-0000-1"


def test_evse_gid_never_collides_for_long_device_ids() -> None:
    base = "cabinet-north-row-7-charger-"
    a = gid.evse_gid("DE*EVE*LSITE1", base + "0001", 1)
    b = gid.evse_gid("DE*EVE*LSITE1", base + "0002", 1)
    assert a != b
    for text in (a, b):
        assert gid.parse(text, expect="E").local.startswith("SITE1-cabinet-north")
        assert len(gid.parse(text).local) <= gid.LOCAL_MAX
    assert gid.evse_gid("DE*EVE*LSITE1", base + "0001", 2) != a


def test_evse_gid_keeps_apart_ids_that_differ_only_in_replaced_characters() -> None:
    assert gid.evse_gid("DE*EVE*LS1", "a.b") != gid.evse_gid("DE*EVE*LS1", "a_b")
    assert gid.evse_gid("DE*EVE*LS1", "a.b") != gid.evse_gid("DE*EVE*LS1", "a-b")
    many = {gid.evse_gid("DE*EVE*LS1", "x" * 40 + str(i)) for i in range(2000)}
    assert len(many) == 2000


def test_roaming_bodies_carry_the_canonical_spelling() -> None:
    body = json_body.check("AuthorizeRoaming", {"token_uid": "04A1", "evse_gid": "DEAB7E8406487", "token_type": "rfid"})
    assert body["evse_gid"] == "DE*AB7*E8406487"
    with pytest.raises(json_body.BodyError) as exc:
        json_body.check("AuthorizeRoaming", {"token_uid": "x", "evse_gid": "DE*AB7*C1", "token_type": "rfid"})
    assert exc.value.cause == "bad_gid"
