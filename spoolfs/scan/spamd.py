"""spamd over the SPAMD protocol, command SYMBOLS:

    SYMBOLS SPAMC/1.5            SPAMD/1.1 0 EX_OK
    Content-length: N            Content-length: M
                                 Spam: True ; 1005.2 / 5.0
    <N bytes of message>
                                 GTUBE,MISSING_DATE,...      (M bytes)

The client half-closes its side after the message (as spamc does); spamd
answers and closes the connection.

Failure rules: a status other than 0 EX_OK, a missing or unreadable
`Spam:` header, or an answer over 1 MB is a ScannerError.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from spoolfs.scan.errors import ScannerError, round_trip

NAME = "spamd"
MAX_ANSWER = 1 << 20
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ +(\d+) +(.*)$")
_SPAM = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I)


@dataclass(frozen=True)
class SpamResult:
    is_spam: bool  # spamd's own decision (score >= its threshold)
    score: float
    threshold: float  # spamd's threshold (required_score)
    rules: list[str] = field(default_factory=list)


class SpamdClient:
    name = NAME

    def __init__(self, address: str, *, timeout: float = 30.0, user: str = "") -> None:
        self.address = address
        self.timeout = timeout
        self.user = user

    async def check(self, data: bytes) -> SpamResult:
        head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(data)}\r\n"
        if self.user:
            head += f"User: {self.user}\r\n"
        async with round_trip(NAME, self.address, self.timeout) as (reader, writer):
            writer.write(head.encode() + b"\r\n")
            writer.write(data)
            # spamd reads the body line by line: like spamc, say where it ends
            # (a message without a final newline would otherwise wait for EOF)
            writer.write_eof()
            await writer.drain()
            answer = await _read_all(reader)
        return parse_answer(answer)

    async def ping(self) -> None:
        async with round_trip(NAME, self.address, self.timeout) as (reader, writer):
            writer.write(b"PING SPAMC/1.5\r\n\r\n")
            await writer.drain()
            answer = await _read_all(reader)
        status = _STATUS.match(answer.split(b"\r\n", 1)[0])
        if status is None or status.group(2).strip() != b"PONG":
            raise ScannerError(NAME, f"unexpected answer to PING: {answer[:80]!r}")


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_ANSWER:
            raise ScannerError(NAME, f"answer larger than {MAX_ANSWER} bytes")
    return b"".join(chunks)


def parse_answer(answer: bytes) -> SpamResult:
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0]) if lines else None
    if status is None:
        raise ScannerError(NAME, f"not a SPAMD answer: {answer[:80]!r}")
    if status.group(1) != b"0":
        message = status.group(2).decode("utf-8", "replace")
        raise ScannerError(NAME, f"error {status.group(1).decode()} {message}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.decode("utf-8", "replace").partition(":")
        headers[key.strip().lower()] = value.strip()
    spam = _SPAM.match(headers.get("spam", ""))
    if not sep or spam is None:
        raise ScannerError(NAME, f"answer without a readable Spam header: {answer[:120]!r}")
    rules = [r.strip() for r in body.decode("utf-8", "replace").split(",") if r.strip()]
    return SpamResult(
        is_spam=spam.group(1).lower() in ("true", "yes"),
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        rules=rules,
    )
