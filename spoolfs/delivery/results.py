"""What a delivery attempt says about each recipient, and the two failures.

Failure rules: a reply code 2xx is delivered, 5xx is failed (permanent), and
everything else (4xx, no reply, an unknown code) is deferred (temporary).
`TemporaryFailure` means try again later; `PermanentFailure` means bounce.
Both carry the SMTP-style `code` and the one-line `response` ("CODE text")
that goes into the event log, the sidecar and the DSN.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from events.errors import SpoolError, StorageFull

Result = Literal["delivered", "deferred", "failed"]

_SPACE_RE = re.compile(r"[\x00-\x20\x7f]+")


class RcptResult(msgspec.Struct, frozen=True):
    """The outcome of one attempt for one recipient."""

    recipient: str
    result: Result
    # the reply code (250, 451, 550, ...); synthesised for local errors
    code: int
    # the server's reply, one line: "550 5.1.1 <x@y>: Recipient address rejected"
    response: str
    # the MX host (as connected to) or "maildir"
    host: str


class DeliveryFailure(SpoolError):
    """A delivery step failed; `response` is one line beginning with `code`."""

    temporary: bool = True

    def __init__(self, code: int, response: str) -> None:
        response = one_line(response)
        super().__init__(response)
        self.code = code
        self.response = response


class TemporaryFailure(DeliveryFailure):
    """Try again later (4xx, timeouts, DNS trouble, full disk, anything unknown)."""

    temporary = True


class PermanentFailure(DeliveryFailure):
    """Will never succeed: bounce (5xx, NXDOMAIN, null MX)."""

    temporary = False


class MailboxStorageFull(TemporaryFailure, StorageFull):
    """The disk (or quota) holding a local mailbox is full: temporary."""


def one_line(text: str) -> str:
    """Collapse whitespace and control characters (multi-line replies) into single spaces."""
    return _SPACE_RE.sub(" ", text).strip()


def result_for_code(code: int) -> Result:
    """2xx delivered, 5xx failed, anything else deferred (unknown is temporary)."""
    if 200 <= code < 300:
        return "delivered"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


def reply(code: int, text: str) -> str:
    """A reply as recorded: "CODE text" on one line."""
    text = one_line(text)
    return f"{code} {text}" if text else str(code)
