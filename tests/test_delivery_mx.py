"""MX lookup against a real DNS server (dnsmasq on loopback): order, fallbacks, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from peers import dnsmasq, free_port, host_record, mx_record, null_mx

from spoolfs.delivery.mx import resolve, resolve_host
from spoolfs.delivery.results import PermanentFailure, TemporaryFailure

T = TypeVar("T")

RECORDS = [
    # preference order is not the order the records are given in
    mx_record("example.test", "mx2.example.test", 20),
    mx_record("example.test", "mx1.example.test", 10),
    mx_record("example.test", "mx3.example.test", 30),
    host_record("mx1.example.test", "127.0.0.2"),
    host_record("mx2.example.test", "127.0.0.3", "::1"),
    # ties: the lowest preference first, the tied ones after it
    mx_record("tie.test", "a.tie.test", 10),
    mx_record("tie.test", "b.tie.test", 10),
    mx_record("tie.test", "first.tie.test", 5),
    # no MX: the domain itself (implicit MX, RFC 5321 5.1)
    host_record("amx.test", "127.0.0.4"),
    host_record("v6only.test", "::1"),
    # exists (a TXT record) but neither MX nor A/AAAA
    "--txt-record=nothing.test,no mail here",
    null_mx("null.test"),
]

NO_RETRY = 2.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def ns() -> Iterator[tuple[str, int]]:
    with dnsmasq(RECORDS) as server:
        yield server


def test_mx_hosts_in_preference_order(ns: tuple[str, int]) -> None:
    assert run(resolve("example.test", nameserver=ns, timeout=NO_RETRY)) == [
        "mx1.example.test",
        "mx2.example.test",
        "mx3.example.test",
    ]


def test_trailing_dot_and_case_do_not_matter(ns: tuple[str, int]) -> None:
    assert run(resolve("Example.TEST.", nameserver=ns, timeout=NO_RETRY))[0].lower() == "mx1.example.test"


def test_ties_keep_a_stable_order(ns: tuple[str, int]) -> None:
    first = run(resolve("tie.test", nameserver=ns, timeout=NO_RETRY))
    assert first[0] == "first.tie.test"
    assert sorted(first[1:]) == ["a.tie.test", "b.tie.test"]
    assert run(resolve("tie.test", nameserver=ns, timeout=NO_RETRY)) == first


def test_no_mx_falls_back_to_the_domain_with_an_a_record(ns: tuple[str, int]) -> None:
    assert run(resolve("amx.test", nameserver=ns, timeout=NO_RETRY)) == ["amx.test"]


def test_no_mx_falls_back_to_the_domain_with_an_aaaa_record(ns: tuple[str, int]) -> None:
    assert run(resolve("v6only.test", nameserver=ns, timeout=NO_RETRY)) == ["v6only.test"]


def test_no_mx_and_no_address_is_permanent(ns: tuple[str, int]) -> None:
    with pytest.raises(PermanentFailure) as info:
        run(resolve("nothing.test", nameserver=ns, timeout=NO_RETRY))
    assert info.value.code == 550
    assert info.value.response.startswith("550 5.1.2 ")


def test_null_mx_is_permanent_556(ns: tuple[str, int]) -> None:
    with pytest.raises(PermanentFailure) as info:
        run(resolve("null.test", nameserver=ns, timeout=NO_RETRY))
    assert info.value.code == 556
    assert info.value.response.startswith("556 5.1.10 ")
    assert "null MX" in info.value.response
    assert not info.value.temporary


def test_nxdomain_is_permanent(ns: tuple[str, int]) -> None:
    with pytest.raises(PermanentFailure) as info:
        run(resolve("nowhere.test", nameserver=ns, timeout=NO_RETRY))
    assert info.value.code == 550
    assert info.value.response == "550 5.1.2 nowhere.test: domain not found"


def test_a_name_that_cannot_be_in_dns_is_permanent(ns: tuple[str, int]) -> None:
    with pytest.raises(PermanentFailure):
        run(resolve("a..b.test", nameserver=ns, timeout=NO_RETRY))


def test_nameserver_down_is_temporary() -> None:
    # nothing answers on this port: every query times out
    down = ("127.0.0.1", free_port())
    started = time.monotonic()
    with pytest.raises(TemporaryFailure) as info:
        run(resolve("example.test", nameserver=down, timeout=0.5))
    assert time.monotonic() - started < 5
    assert info.value.code == 451
    assert info.value.response.startswith("451 4.4.3 ")
    assert info.value.temporary


def test_resolve_host_gives_ipv4_then_ipv6(ns: tuple[str, int]) -> None:
    assert run(resolve_host("mx1.example.test", nameserver=ns, timeout=NO_RETRY)) == ["127.0.0.2"]
    assert run(resolve_host("mx2.example.test", nameserver=ns, timeout=NO_RETRY)) == ["127.0.0.3", "::1"]


def test_resolve_host_passes_ip_literals_through(ns: tuple[str, int]) -> None:
    assert run(resolve_host("127.0.0.9", nameserver=ns, timeout=NO_RETRY)) == ["127.0.0.9"]
    assert run(resolve_host("[::1]", nameserver=ns, timeout=NO_RETRY)) == ["::1"]


def test_resolve_host_without_address_is_permanent(ns: tuple[str, int]) -> None:
    # mx3.example.test is named by the MX record but has no address record
    with pytest.raises(PermanentFailure) as info:
        run(resolve_host("mx3.example.test", nameserver=ns, timeout=NO_RETRY))
    assert info.value.response.startswith("550 5.4.4 ")


def test_resolve_host_with_nameserver_down_is_temporary() -> None:
    with pytest.raises(TemporaryFailure):
        run(resolve_host("mx1.example.test", nameserver=("127.0.0.1", free_port()), timeout=0.5))
