"""Delivery status notifications (RFC 3464): the bounce and the delay warning.

A DSN is multipart/report; report-type=delivery-status with, in order: a
human explanation (text/plain), the machine-readable message/delivery-status
(one per-message block, then one block per recipient), and the original
message's header section (text/rfc822-headers; never the body).

Failure rules: building a DSN does no I/O and does not fail on odd input
(undecodable header bytes are replaced, a response without an enhanced code
gets X.0.0 from its basic code). It refuses, with ValueError, to address a
DSN to the null sender: a bounce is never sent for a bounce (RFC 5321 6.1).
The caller sends the DSN with the null sender (MAIL FROM:<>).
"""

from __future__ import annotations

import datetime as dt
import email.policy
import re
import secrets
from email.message import EmailMessage, Message
from email.policy import EmailPolicy
from email.utils import format_datetime
from typing import Literal, TypeAlias

from spoolfs.delivery.results import RcptResult

_ENHANCED = re.compile(r"^\s*\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})(?!\S)")
_BASIC = re.compile(r"^\s*([245])\d\d(?!\S)")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_MAX_LINE = 998  # RFC 5322 line limit, without CRLF

_Policy: TypeAlias = "EmailPolicy[EmailMessage]"  # generic only for type checkers
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}


def status_code(response: str, code: int, action: Literal["failed", "delayed"]) -> str:
    """The RFC 3463 status: the enhanced code of the response, else X.0.0 from the basic code."""
    match = _ENHANCED.match(response)
    if match:
        return match.group(1)
    klass = str(code)[:1] if 200 <= code < 600 else ""
    if not klass:
        basic = _BASIC.match(response)
        klass = basic.group(1) if basic else ""
    if klass not in ("2", "4", "5"):
        klass = "5" if action == "failed" else "4"
    return f"{klass}.0.0"


def _is_remote(host: str) -> bool:
    return bool(host) and host != "maildir"


def _explanation(
    recipients: list[RcptResult], *, reporting_mta: str, action: Literal["failed", "delayed"]
) -> str:
    if action == "failed":
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. Its headers are attached below.",
            "",
            "The mail system",
        ]
    else:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered for some time to the recipients",
            "below. The mail system will keep trying until the message expires.",
            "",
            "The mail system",
        ]
    lines = [*intro, ""]
    for r in recipients:
        where = f"host {r.host} said" if _is_remote(r.host) else "the mail system said"
        lines.append(f"<{r.recipient}>: {where}: {r.response or '(no response)'}")
    return "\n".join(lines) + "\n"


def _text_part(text: str, subtype: str, policy: _Policy) -> EmailMessage:
    """A text part kept readable: 7bit or 8bit unless a line is too long for SMTP."""
    longest = max((len(line.encode()) for line in text.splitlines()), default=0)
    plain = "7bit" if text.isascii() else "8bit"
    cte = "quoted-printable" if longest > _MAX_LINE else plain
    part = EmailMessage(policy=policy)
    part.set_content(text, subtype=subtype, charset="us-ascii" if text.isascii() else "utf-8", cte=cte)
    return part


def _block(fields: list[tuple[str, str]], policy: _Policy) -> EmailMessage:
    block = EmailMessage(policy=policy)
    for name, value in fields:
        block[name] = value
    return block


def _original_headers(original: bytes) -> str:
    match = _HEADER_END.search(original)
    header = original[: match.start()] if match else original
    header = _LINE_ENDINGS.sub(b"\n", header).strip(b"\n")
    return header.decode("utf-8", errors="replace") + "\n"


def build_dsn(
    original: bytes,
    *,
    original_sender: str,
    recipients: list[RcptResult],
    reporting_mta: str,
    arrival_date: dt.datetime,
    action: Literal["failed", "delayed"] = "failed",
    now: dt.datetime,
) -> bytes:
    """The DSN for `recipients` of `original`, addressed to `original_sender`, CRLF line endings."""
    if not original_sender:
        raise ValueError("no DSN for a message from the null sender")
    if action not in _SUBJECTS:
        raise ValueError(f"action must be 'failed' or 'delayed', not {action!r}")
    text_parts = [original_sender, reporting_mta, *(r.recipient for r in recipients)]
    ascii_only = all(t.isascii() for t in text_parts)
    policy: _Policy = email.policy.SMTP if ascii_only else email.policy.SMTPUTF8
    address_type = "rfc822" if ascii_only else "utf-8"

    dsn = EmailMessage(policy=policy)
    dsn["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    dsn["To"] = original_sender
    dsn["Subject"] = _SUBJECTS[action]
    dsn["Date"] = format_datetime(now)
    dsn["Message-ID"] = f"<{now:%Y%m%d%H%M%S}.{secrets.token_hex(8)}@{reporting_mta}>"
    dsn["Auto-Submitted"] = "auto-replied"
    dsn["MIME-Version"] = "1.0"
    dsn["Content-Type"] = "multipart/report; report-type=delivery-status"

    human = _text_part(_explanation(recipients, reporting_mta=reporting_mta, action=action), "plain", policy)
    human["Content-Description"] = "Notification"

    status = EmailMessage(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    blocks: list[Message | str] = [
        _block(
            [("Reporting-MTA", f"dns; {reporting_mta}"), ("Arrival-Date", format_datetime(arrival_date))],
            policy,
        )
    ]
    for r in recipients:
        fields = [
            ("Final-Recipient", f"{address_type}; {r.recipient}"),
            ("Action", action),
            ("Status", status_code(r.response, r.code, action)),
        ]
        if _is_remote(r.host):
            fields.append(("Remote-MTA", f"dns; {r.host}"))
        if r.response:
            fields.append(("Diagnostic-Code", f"smtp; {r.response}"))
        fields.append(("Last-Attempt-Date", format_datetime(now)))
        blocks.append(_block(fields, policy))
    status.set_payload(blocks)

    headers = _text_part(_original_headers(original), "rfc822-headers", policy)
    headers["Content-Description"] = "Undelivered Message Headers"

    for part in (human, status, headers):
        del part["MIME-Version"]
        dsn.attach(part)
    return dsn.as_bytes(policy=policy)
