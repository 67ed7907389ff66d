"""Where to deliver a domain's mail: MX lookup (RFC 5321 section 5.1) and host addresses.

Failure rules:
- permanent (PermanentFailure, bounce): the domain does not exist (NXDOMAIN,
  550 5.1.2); it publishes a null MX (RFC 7505, 556 5.1.10); it has no MX and
  no A/AAAA record either (550 5.1.2); the name cannot be a DNS name at all
  (550 5.1.2).
- temporary (TemporaryFailure, 451 4.4.3, retry later): timeouts, SERVFAIL,
  REFUSED, no nameserver answering, and any other error, known or not.
`resolve_host` follows the same rules for an MX host's addresses, with
550 5.4.4 when the host has no address.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from spoolfs.delivery.results import PermanentFailure, TemporaryFailure


def _resolver(nameserver: tuple[str, int] | None, timeout: float) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        try:
            resolver = dns.asyncresolver.Resolver()
        except Exception as exc:  # no /etc/resolv.conf, unreadable, ...
            raise _temporary("(system resolver configuration)", exc) from exc
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _absolute(domain: str) -> dns.name.Name:
    try:
        return dns.name.from_text(domain.strip().rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise PermanentFailure(550, f"550 5.1.2 {domain!r} is not a valid domain name: {exc}") from exc


def _temporary(what: str, exc: BaseException) -> TemporaryFailure:
    if isinstance(exc, dns.exception.Timeout):
        why = "timed out"
    elif isinstance(exc, dns.resolver.NoNameservers):
        why = "no nameserver answered (SERVFAIL or REFUSED)"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return TemporaryFailure(451, f"451 4.4.3 DNS lookup of {what} failed: {why}")


async def _query(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.resolver.Answer:
    return await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=True)


async def resolve(domain: str, *, nameserver: tuple[str, int] | None, timeout: float) -> list[str]:
    """MX hosts of `domain` in preference order (ties keep the answer's order).

    No MX record: [domain] if it has an A or AAAA record (implicit MX).
    """
    name = _absolute(domain)
    shown = name.to_text(omit_final_dot=True)
    resolver = _resolver(nameserver, timeout)
    try:
        answer = await _query(resolver, name, dns.rdatatype.MX)
    except dns.resolver.NXDOMAIN as exc:
        raise PermanentFailure(550, f"550 5.1.2 {shown}: domain not found") from exc
    except dns.resolver.NoAnswer:
        return await _implicit_mx(resolver, name, shown)
    except Exception as exc:
        raise _temporary(f"{shown} MX", exc) from exc
    records = [(int(r.preference), r.exchange) for r in answer]
    if all(exchange == dns.name.root for _, exchange in records):
        raise PermanentFailure(556, f"556 5.1.10 {shown} does not accept mail (null MX)")
    hosts: list[str] = []
    # sorted() is stable: equal preferences keep the order the server gave.
    for _, exchange in sorted(records, key=lambda r: r[0]):
        host = exchange.to_text(omit_final_dot=True)
        if exchange != dns.name.root and host not in hosts:
            hosts.append(host)
    return hosts


async def _implicit_mx(resolver: dns.asyncresolver.Resolver, name: dns.name.Name, shown: str) -> list[str]:
    addresses = await _addresses(resolver, name, shown)
    if not addresses:
        raise PermanentFailure(550, f"550 5.1.2 {shown}: domain has no MX and no address record")
    return [shown]


async def _addresses(resolver: dns.asyncresolver.Resolver, name: dns.name.Name, shown: str) -> list[str]:
    """A then AAAA addresses; [] when there are none (NXDOMAIN or no data); raise on trouble."""
    results = await asyncio.gather(
        _query(resolver, name, dns.rdatatype.A),
        _query(resolver, name, dns.rdatatype.AAAA),
        return_exceptions=True,
    )
    addresses: list[str] = []
    trouble: BaseException | None = None
    for result in results:
        if isinstance(result, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
            continue
        if isinstance(result, BaseException):
            trouble = trouble or result
        else:
            addresses.extend(r.address for r in result)
    if not addresses and trouble is not None:
        raise _temporary(f"{shown} A/AAAA", trouble) from trouble
    return addresses


async def resolve_host(host: str, *, nameserver: tuple[str, int] | None, timeout: float) -> list[str]:
    """IPv4 then IPv6 addresses of an MX host, to connect to. An IP literal is returned as is."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    name = _absolute(host)
    shown = name.to_text(omit_final_dot=True)
    addresses = await _addresses(_resolver(nameserver, timeout), name, shown)
    if not addresses:
        raise PermanentFailure(550, f"550 5.4.4 {shown}: host not found (no A or AAAA record)")
    return addresses
