"""RFC 5321 mailboxes: parse strictly, refuse the tricks.

`parse_mailbox` accepts `local@domain` where local is a dot-string or a
quoted string and domain is a host name (LDH labels, UTF-8 allowed for
SMTPUTF8) or an address literal. It refuses what RFC 5321 does not allow
and what relay tricks rely on: source routes (`@a,@b:u@c`), more than one
unquoted `@`, empty labels and trailing dots, unbalanced brackets or
quotes, control characters. `%` and `!` are legal in a local part; the
relay policy (not this module) decides what they mean.

Failure rules: every refusal raises InvalidAddress naming the address and
the reason; nothing here touches the disk.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from spoolfs.errors import InvalidAddress

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]"


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(dot-string, quoted string, domain label), compiled on first use: the
    ranges up to U+10FFFF take 18 ms to compile, which every `spool`
    command would pay at import."""
    return (
        re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$"),
        re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*"$'),
        re.compile(
            r"^[A-Za-z0-9\u0080-\U0010FFFF]([A-Za-z0-9\-\u0080-\U0010FFFF]{0,61}[A-Za-z0-9\u0080-\U0010FFFF])?$"
        ),
    )


def _bad(address: str, why: str) -> InvalidAddress:
    shown = address if len(address) <= 80 else address[:77] + "..."
    return InvalidAddress(f"not an RFC 5321 address: {shown!r} ({why})")


def parse_mailbox(address: str) -> tuple[str, str]:
    """Return (local part, lower-cased domain) or raise InvalidAddress."""
    if any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in address):
        raise _bad(address, "control character")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in address):
        raise _bad(address, "not valid UTF-8")
    if address.startswith("<") or address.endswith(">"):
        raise _bad(address, "angle brackets belong to the SMTP command, not the address")
    if address.startswith("@"):
        raise _bad(address, "source routes are not accepted")
    at = address.rfind("@")
    if at <= 0:
        raise _bad(address, "no local part and domain")
    # lower-case before checking: lowering can lengthen a domain ("İ" -> "i̇")
    local, domain = address[:at], address[at + 1 :].lower()
    if local.startswith('"'):
        if not _patterns()[1].match(local):
            raise _bad(address, "malformed quoted local part")
    elif not _patterns()[0].match(local):
        raise _bad(address, "malformed local part")
    if len(local.encode()) > 64:
        raise _bad(address, "local part longer than 64 octets")
    domain = _check_domain(address, domain)
    if len(local.encode()) + 1 + len(domain.encode()) > 254:
        raise _bad(address, "longer than 254 octets")
    return local, domain


def _check_domain(address: str, domain: str) -> str:
    if not domain:
        raise _bad(address, "empty domain")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad(address, "unbalanced brackets")
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError as exc:
            raise _bad(address, "bad address literal") from exc
        return domain.lower()
    if "[" in domain or "]" in domain:
        raise _bad(address, "unbalanced brackets")
    if domain.endswith("."):
        raise _bad(address, "trailing dot in domain")
    labels = domain.split(".")
    label_re = _patterns()[2]
    if not all(label_re.match(label) for label in labels):
        raise _bad(address, "malformed domain")
    return domain.lower()


def normalize(address: str) -> str:
    """The canonical form: local part as given, domain lower-cased."""
    local, domain = parse_mailbox(address)
    return f"{local}@{domain}"


def normalize_sender(address: str) -> str:
    """Like normalize, but the null reverse-path (`""` or `<>`) is allowed."""
    if address in ("", "<>"):
        return ""
    return normalize(address)
