"""DSNs (RFC 3464) read back with the email package and flufl.bounce; retry backoff."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
from email.message import Message
from typing import Literal

import flufl.bounce
import pytest
from peers import smtp_sink

from spoolfs.delivery.backoff import expired, next_attempt_delay
from spoolfs.delivery.dsn import build_dsn, status_code
from spoolfs.delivery.remote import deliver
from spoolfs.delivery.results import RcptResult

Action = Literal["failed", "delayed"]
NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
ARRIVED = NOW - dt.timedelta(days=5)
ORIGINAL = (
    b"From: Alice <a@example.org>\r\n"
    b"To: x@remote.test, y@remote.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig.1@example.org>\r\n"
    b"\r\n"
    b"the secret body\r\n"
)
FAILED = [
    RcptResult(
        "x@remote.test",
        "failed",
        550,
        "550 5.1.1 <x@remote.test>: Recipient address rejected",
        "mx1.remote.test",
    ),
    RcptResult("y@remote.test", "failed", 554, "554 transaction failed", "mx2.remote.test"),
    RcptResult("bob@example.org", "failed", 451, "451 4.3.0 cannot deliver to Maildir", "maildir"),
]


def dsn_of(recipients: list[RcptResult], action: Action = "failed") -> bytes:
    return build_dsn(
        ORIGINAL,
        original_sender="a@example.org",
        recipients=recipients,
        reporting_mta="mail.example.org",
        arrival_date=ARRIVED,
        action=action,
        now=NOW,
    )


def parsed(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def parts(msg: Message) -> list[Message]:
    """The subparts of a multipart, or the header blocks of a message/delivery-status."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def decoded(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def test_structure_of_a_failure_dsn() -> None:
    raw = dsn_of(FAILED)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert b"\r" not in raw.replace(b"\r\n", b"")
    msg = parsed(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert email.utils.parseaddr(msg["From"])[1] == "MAILER-DAEMON@mail.example.org"
    assert msg["To"] == "a@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(msg["Date"]) == NOW
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mail.example.org>")

    human, status, headers = parts(msg)
    assert [p.get_content_type() for p in (human, status, headers)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    text = decoded(human).decode()
    for r in FAILED:
        assert f"<{r.recipient}>" in text
        assert r.response in text

    per_message, *per_recipient = parts(status)
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVED
    assert len(per_recipient) == 3
    x, y, bob = per_recipient
    assert x["Final-Recipient"] == "rfc822; x@remote.test"
    assert x["Action"] == "failed"
    assert x["Status"] == "5.1.1"
    assert x["Remote-MTA"] == "dns; mx1.remote.test"
    assert (
        " ".join(x["Diagnostic-Code"].split())
        == "smtp; 550 5.1.1 <x@remote.test>: Recipient address rejected"
    )
    assert email.utils.parsedate_to_datetime(x["Last-Attempt-Date"]) == NOW
    assert y["Status"] == "5.0.0"  # no enhanced code: from the basic code
    assert y["Remote-MTA"] == "dns; mx2.remote.test"
    assert bob["Status"] == "4.3.0"
    assert bob["Remote-MTA"] is None  # local delivery has no remote MTA

    original = decoded(headers)
    assert b"Subject: quarterly numbers" in original
    assert b"Message-ID: <orig.1@example.org>" in original
    assert b"secret body" not in original
    assert b"secret body" not in raw


def test_flufl_bounce_finds_the_failed_recipients() -> None:
    found = flufl.bounce.scan_message(parsed(dsn_of(FAILED)))
    assert found == {b"x@remote.test", b"y@remote.test", b"bob@example.org"}


def test_delay_warning_is_not_a_permanent_failure() -> None:
    deferred = [RcptResult("x@remote.test", "deferred", 451, "451 4.7.1 try later", "mx1.remote.test")]
    msg = parsed(dsn_of(deferred, action="delayed"))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = parts(msg)
    block = parts(status)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert flufl.bounce.scan_message(msg) == frozenset()
    temporary, permanent = flufl.bounce.all_failures(msg)
    assert (temporary, permanent) == ({b"x@remote.test"}, frozenset())


def test_no_dsn_for_the_null_sender() -> None:
    with pytest.raises(ValueError):
        build_dsn(
            ORIGINAL,
            original_sender="",
            recipients=FAILED,
            reporting_mta="mail.example.org",
            arrival_date=ARRIVED,
            now=NOW,
        )


def test_original_without_body_separator_and_with_lf_endings() -> None:
    raw = build_dsn(
        b"Subject: only headers\nX-Other: 1",
        original_sender="a@example.org",
        recipients=FAILED[:1],
        reporting_mta="mail.example.org",
        arrival_date=ARRIVED,
        now=NOW,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    headers = decoded(parts(parsed(raw))[2])
    assert headers.replace(b"\r\n", b"\n") == b"Subject: only headers\nX-Other: 1\n"


@pytest.mark.parametrize(
    ("response", "code", "action", "expected"),
    [
        ("550 5.1.1 user unknown", 550, "failed", "5.1.1"),
        ("550-5.7.1 multi", 550, "failed", "5.7.1"),
        ("421 4.4.2 lost connection", 421, "delayed", "4.4.2"),
        ("554 rejected", 554, "failed", "5.0.0"),
        ("450 later", 450, "delayed", "4.0.0"),
        ("450 later", 450, "failed", "4.0.0"),
        ("", 0, "failed", "5.0.0"),
        ("", 0, "delayed", "4.0.0"),
        ("550 5.1.1234 not an enhanced code", 550, "failed", "5.0.0"),
    ],
)
def test_status_code(response: str, code: int, action: Action, expected: str) -> None:
    assert status_code(response, code, action) == expected


def test_dsn_from_a_real_rejection_is_recognised() -> None:
    with smtp_sink(reply_5xx=["RCPT"]) as sink:
        results = asyncio.run(
            asyncio.wait_for(
                deliver(
                    [(sink.host, sink.port)],
                    "a@example.org",
                    ["x@remote.test", "y@remote.test"],
                    ORIGINAL,
                    helo="out.example.org",
                    timeout=5,
                ),
                30,
            )
        )
    assert {r.result for r in results} == {"failed"}
    msg = parsed(dsn_of(results))
    assert flufl.bounce.scan_message(msg) == {b"x@remote.test", b"y@remote.test"}
    assert parts(parts(msg)[1])[1]["Status"] == "5.3.0"


# --- backoff --------------------------------------------------------------------------


def test_backoff_doubles_from_min_and_is_capped() -> None:
    delays = [next_attempt_delay(n, 300.0, 4000.0) for n in range(1, 8)]
    assert delays == [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0, 4000.0]
    assert next_attempt_delay(0, 300.0, 4000.0) == 300.0
    assert next_attempt_delay(10_000, 300.0, 4000.0) == 4000.0


def test_expired_after_lifetime() -> None:
    lifetime = 5 * 86400.0
    assert not expired(ARRIVED, ARRIVED + dt.timedelta(seconds=lifetime - 1), lifetime)
    assert expired(ARRIVED, ARRIVED + dt.timedelta(seconds=lifetime), lifetime)
    assert expired(ARRIVED, ARRIVED + dt.timedelta(days=30), lifetime)
