"""Message IDs: form, uniqueness, time order, and check_id's refusals."""

from __future__ import annotations

import datetime as dt

import pytest
from freezegun import freeze_time

from spoolfs.errors import InvalidId, SpoolError
from spoolfs.ids import ALPHABET, ID_LENGTH, check_id, new_id

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_alphabet_is_crockford_base32() -> None:
    assert set(ALPHABET) == CROCKFORD
    assert len(ALPHABET) == 32
    assert ID_LENGTH == 26


def test_new_id_form() -> None:
    for _ in range(200):
        mid = new_id()
        assert len(mid) == 26
        assert set(mid) <= CROCKFORD
        assert check_id(mid) == mid


def test_new_id_unique_over_10000_calls() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000


def test_new_id_encodes_the_millisecond_in_the_first_ten_characters() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
    with freeze_time(when):
        a, b = new_id(), new_id()
    ms = int(when.timestamp() * 1000)
    prefix = ""
    for _ in range(10):
        prefix = ALPHABET[ms & 31] + prefix
        ms >>= 5
    assert a[:10] == b[:10] == prefix
    assert a != b  # the random part differs


def test_ids_sort_by_time() -> None:
    with freeze_time("2024-01-01 00:00:00.000"):
        early = [new_id() for _ in range(50)]
    with freeze_time("2024-01-01 00:00:00.001"):
        later = [new_id() for _ in range(50)]
    with freeze_time("2031-07-15 12:00:00"):
        much_later = new_id()
    assert max(early) < min(later)
    assert max(later) < much_later
    mixed = [*later, much_later, *early]
    assert sorted(mixed) == sorted(early) + sorted(later) + [much_later]


def test_ids_before_and_after_are_ordered_across_years() -> None:
    with freeze_time("1999-12-31 23:59:59.999"):
        old = new_id()
    with freeze_time("2000-01-01 00:00:00"):
        new = new_id()
    assert old < new


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../x",
        "a/b",
        "..",
        "/",
        "01ARZ3NDEKTSV4RRFFQ69G5FA/",
        "../../../../etc/passwd",
        "01arz3ndektsv4rrffq69g5fav",  # lowercase
        "01ARZ3NDEKTSV4RRFFQ69G5FAVX",  # 27 characters
        "01ARZ3NDEKTSV4RRFFQ69G5FA",  # 25 characters
        "01ARZ3NDEKTSV4RRFFQ69G5FAI",  # I is not in the alphabet
        "01ARZ3NDEKTSV4RRFFQ69G5FAL",
        "01ARZ3NDEKTSV4RRFFQ69G5FAO",
        "01ARZ3NDEKTSV4RRFFQ69G5FAU",
        " 01ARZ3NDEKTSV4RRFFQ69G5FA",
        "01ARZ3NDEKTSV4RRFFQ69G5FA.json",
        "01ARZ3NDEKTSV4RRFFQ69G5\x00AV",
    ],
)
def test_check_id_refuses_and_names_the_value(value: str) -> None:
    with pytest.raises(InvalidId) as info:
        check_id(value)
    assert repr(value) in str(info.value)
    assert str(info.value).startswith("not a message ID")
    assert isinstance(info.value, SpoolError)


def test_check_id_shortens_a_huge_value() -> None:
    with pytest.raises(InvalidId) as info:
        check_id("A" * 1000)
    assert len(str(info.value)) < 100
    assert "AAAA" in str(info.value)


def test_check_id_accepts_a_valid_id() -> None:
    assert check_id("01ARZ3NDEKTSV4RRFFQ69G5FAV") == "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def test_check_id_refuses_a_trailing_newline() -> None:
    with pytest.raises(InvalidId):
        check_id(new_id() + "\n")


def test_ids_made_in_one_process_sort_in_the_order_they_were_made() -> None:
    with freeze_time("2026-11-29 12:00:00"):  # all in one millisecond
        same_ms = [new_id() for _ in range(1000)]
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 1000
    with freeze_time("2026-11-29 13:00:00"):  # a later millisecond: time leads, randomness again
        later = new_id()
    assert later[:10] > same_ms[-1][:10]
