"""RFC 5321 mailboxes: what parse_mailbox accepts, what it refuses, normalisation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoolfs.addresses import normalize, normalize_sender, parse_mailbox
from spoolfs.errors import InvalidAddress, SpoolError

VALID = [
    ("user@example.org", ("user", "example.org")),
    ("first.last@sub.example.org", ("first.last", "sub.example.org")),
    ("user+tag@example.org", ("user+tag", "example.org")),
    ("a%b@relay.example", ("a%b", "relay.example")),
    ("host!user@example.org", ("host!user", "example.org")),
    ("o'brien@example.ie", ("o'brien", "example.ie")),
    ("x@localhost", ("x", "localhost")),
    ("x@123.example", ("x", "123.example")),
    ("x@a-b.example", ("x", "a-b.example")),
    ('"john doe"@example.org', ('"john doe"', "example.org")),
    ('"a\\"b"@example.org', ('"a\\"b"', "example.org")),
    ('"a@b"@example.org', ('"a@b"', "example.org")),
    ('""@example.org', ('""', "example.org")),
    ("postmaster@[127.0.0.1]", ("postmaster", "[127.0.0.1]")),
    ("postmaster@[IPv6:::1]", ("postmaster", "[ipv6:::1]")),
    ("p@[IPv6:2001:db8::1]", ("p", "[ipv6:2001:db8::1]")),
    ("用户@例子.广告", ("用户", "例子.广告")),
    ("jürgen@bücher.de", ("jürgen", "bücher.de")),
    ("Mixed.Case@EXAMPLE.Org", ("Mixed.Case", "example.org")),
    ("l" * 64 + "@example.org", ("l" * 64, "example.org")),
]


@pytest.mark.parametrize(("address", "parts"), VALID, ids=[a for a, _ in VALID])
def test_valid_addresses(address: str, parts: tuple[str, str]) -> None:
    assert parse_mailbox(address) == parts
    assert normalize(address) == f"{parts[0]}@{parts[1]}"


def test_254_octets_total_is_accepted() -> None:
    domain = ".".join(["d" * 63] * 3) + "." + "e" * 60
    address = "a@" + domain
    assert len(address.encode()) == 254
    assert parse_mailbox(address)[1] == domain


INVALID = [
    ("", "no local part and domain"),
    ("plainaddress", "no local part and domain"),
    ("@example.org", "source route"),
    ("user@", "empty domain"),
    ("@a,@b:u@c", "source route"),
    ("@a:u@c.example", "source route"),
    ("a@b@example.org", "malformed local part"),
    ("user@example.org.", "trailing dot"),
    ("user.@example.org", "malformed local part"),
    (".user@example.org", "malformed local part"),
    ("us..er@example.org", "malformed local part"),
    ("user@example..org", "malformed domain"),
    ("user@.example.org", "malformed domain"),
    ("user@-bad.example", "malformed domain"),
    ("user@bad-.example", "malformed domain"),
    ("user@exa_mple.org", "malformed domain"),
    ("user@[1.2.3.4", "unbalanced brackets"),
    ("user@1.2.3.4]", "unbalanced brackets"),
    ("user@[1.2.3.4]x", "unbalanced brackets"),
    ("user@[300.1.1.1]", "bad address literal"),
    ("user@[IPv6:zz::1]", "bad address literal"),
    ("user@[::1]", "bad address literal"),
    ('"unbalanced@example.org', "malformed quoted local part"),
    ('"a"b@example.org', "malformed quoted local part"),
    ('a"b"@example.org', "malformed local part"),
    ('"a"b"@example.org', "malformed quoted local part"),
    ("us er@example.org", "malformed local part"),
    ("a\r\nRCPT TO:<x@y>@example.org", "control character"),
    ("user@example.org\r\n", "control character"),
    ("user\n@example.org", "control character"),
    ("user@exam\rple.org", "control character"),
    ("user\x00@example.org", "control character"),
    ("user\t@example.org", "control character"),
    ("user\x7f@example.org", "control character"),
    ("<user@example.org>", "angle brackets"),
    ("<user@example.org", "angle brackets"),
    ("user@example.org>", "angle brackets"),
    ("<>", "angle brackets"),
    ("l" * 65 + "@example.org", "local part longer than 64 octets"),
    ("ü" * 33 + "@example.org", "local part longer than 64 octets"),  # 66 octets, 33 characters
    ("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 62, "longer than 254 octets"),
]


@pytest.mark.parametrize(("address", "why"), INVALID, ids=[repr(a)[:40] for a, _ in INVALID])
def test_invalid_addresses(address: str, why: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_mailbox(address)
    message = str(info.value)
    assert why in message
    # the refusal names the address (shortened when long)
    assert repr(address if len(address) <= 80 else address[:77] + "...") in message
    assert isinstance(info.value, SpoolError)
    with pytest.raises(InvalidAddress):
        normalize(address)


def test_label_longer_than_63_is_refused() -> None:
    assert parse_mailbox("a@" + "b" * 63 + ".org")
    with pytest.raises(InvalidAddress, match="malformed domain"):
        parse_mailbox("a@" + "b" * 64 + ".org")


def test_normalize_lowercases_only_the_domain() -> None:
    assert normalize("John.Doe@Example.ORG") == "John.Doe@example.org"
    assert normalize('"Quoted Part"@MX.Example') == '"Quoted Part"@mx.example'
    assert normalize("p@[IPv6:2001:DB8::1]") == "p@[ipv6:2001:db8::1]"


@pytest.mark.parametrize("null", ["", "<>"])
def test_normalize_sender_accepts_the_null_sender(null: str) -> None:
    assert normalize_sender(null) == ""


def test_normalize_sender_normalises_and_refuses_like_normalize() -> None:
    assert normalize_sender("Bounce@Lists.Example") == "Bounce@lists.example"
    for bad in ("<<>>", "< >", "nobody", "@a,@b:u@c", "x@y\r\n"):
        with pytest.raises(InvalidAddress):
            normalize_sender(bad)
    with pytest.raises(InvalidAddress):
        normalize("")  # only the sender may be null


def test_lone_surrogate_is_an_invalid_address() -> None:
    with pytest.raises(InvalidAddress):
        parse_mailbox("a\udcff@example.org")


def test_normalize_output_is_always_valid_for_lengthening_lowercase() -> None:
    # lower-casing makes this label 120 characters: refused, rather than accepted
    # and then normalised into something parse_mailbox refuses
    address = "a@" + "İ" * 60 + ".example"
    with pytest.raises(InvalidAddress):
        normalize(address)
    short = "a@" + "İ" * 20 + ".example"
    once = normalize(short)
    assert normalize(once) == once


def test_c1_control_character_is_refused() -> None:
    with pytest.raises(InvalidAddress, match="control character"):
        parse_mailbox("user\x85@example.org")


# --- property -----------------------------------------------------------------------

# Characters whose lower() keeps length (the lengthening case has its own test above).
_LOCAL_CHARS = "abcXYZ019.!#$%&'*+/=?^_`{|}~-\"\\ @ü中\r\n\x00\t<>[]()"
_DOMAIN_CHARS = "abcXYZ019-.[]:ü中\r\n\x00 @"

_label = st.text(alphabet="abcdefXYZ0189ü中", min_size=1, max_size=12)
_near_valid = st.builds(
    lambda local, labels, literal, noise, pos: _inject(
        f"{local}@{literal or '.'.join(labels)}",
        noise,
        pos,
    ),
    st.one_of(
        st.text(alphabet="abcXYZ09.+%!-_ü", min_size=1, max_size=20),
        st.text(alphabet='ab c@\\"', max_size=10).map(lambda s: f'"{s}"'),
    ),
    st.lists(_label, min_size=1, max_size=4),
    st.sampled_from(["", "[127.0.0.1]", "[IPv6:::1]", "[IPv6:FE80::1]", "[1.2.3.4", "1.2.3.4]"]),
    st.sampled_from(["", "", "\r", "\n", "\x00", "\r\n", "@", ".", "<", '"']),
    st.integers(min_value=0, max_value=60),
)


def _inject(address: str, noise: str, pos: int) -> str:
    pos = min(pos, len(address))
    return address[:pos] + noise + address[pos:]


_addresses = st.one_of(
    _near_valid,
    st.text(alphabet=_LOCAL_CHARS, max_size=30).flatmap(
        lambda local: st.text(alphabet=_DOMAIN_CHARS, max_size=30).map(lambda dom: f"{local}@{dom}")
    ),
    st.text(max_size=40),
)


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_addresses)
def test_accepted_addresses_are_clean_and_normalize_is_idempotent(address: str) -> None:
    try:
        local, domain = parse_mailbox(address)
    except InvalidAddress:
        return
    assert not any(c in address for c in "\r\n\x00")
    assert domain == address[len(local) + 1 :].lower()
    once = normalize(address)
    assert once == f"{local}@{domain}"
    assert parse_mailbox(once) == (local, domain)
    assert normalize(once) == once
    assert normalize_sender(address) == once
