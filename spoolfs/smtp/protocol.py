"""The wire: aiosmtpd's SMTP protocol with a few server-wide duties.

Kept here (not in the handler) because they concern the connection, not a
transaction: a limit on simultaneous connections per client address,
a session ID for the protocol log, RFC 3463 enhanced status codes on the
replies aiosmtpd words itself (size and line-length refusals), and a 421
before a timeout disconnect. Policy stays in the handler.

aiosmtpd's per-connection introspection and its address parser are
bypassed where that cannot change a reply (spoolfs.smtp.fastpath), the
message body is read in bulk rather than a line at a time
(spoolfs.smtp.data), and the lines of a multi-line reply go out in one write.

Failure rules: a client over its connection limit gets `421 4.7.0` and is
disconnected before the greeting; nothing is logged as an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

from aiosmtpd.smtp import SMTP, log

from spoolfs.protolog import ProtocolLog
from spoolfs.smtp.data import BULK_DATA, smtp_data
from spoolfs.smtp.fastpath import INIT_MATCHES, fast_getaddr, init_smtp

# aiosmtpd's own wording -> ours, with enhanced status codes.
_REPLIES = {
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed limit",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
    "500 Error: line too long": "500 5.5.2 Line too long",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
}


class ConnectionCounter:
    """Connections now open, per client address (one per worker process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()


def session_id() -> str:
    return "S" + os.urandom(6).hex().upper()


class SpoolSMTP(SMTP):
    def __init__(
        self,
        handler: Any,
        *,
        counter: ConnectionCounter,
        protolog: ProtocolLog,
        max_line_length: int,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd reads this in __init__ for the stream limit; +2 for CRLF
        self.line_length_limit = max_line_length + 2
        if INIT_MATCHES:
            init_smtp(self, handler, **kwargs)
        else:
            super().__init__(handler, **kwargs)
        self.counter = counter
        self.protolog = protolog
        self.sid = session_id()
        self.client = ""
        self._refused = False
        self._continued: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client = str(peer[0])
        if self.counter.open[self.client] >= self.counter.limit:
            self._refused = True
            self.protolog.write(self.sid, f"{self.client}:{peer[1]} refused: too many connections")
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 Too many connections from your address, try again later\r\n")
            transport.close()
            return
        self.counter.open[self.client] += 1
        self.protolog.write(self.sid, f"{self.client}:{peer[1]} connect")
        super().connection_made(transport)
        self.session.spool_sid = self.sid  # type: ignore[union-attr]

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self.counter.open[self.client] -= 1
        if self.counter.open[self.client] <= 0:
            del self.counter.open[self.client]
        self.protolog.write(self.sid, "disconnect")
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        text = _REPLIES.get(text, text)
        if text[:1] in "45":
            self.protolog.write(self.sid, f"< {text}")
        # aiosmtpd's push, except that the continuation lines of a reply
        # ("250-...") wait for its last line: one send() for an EHLO reply
        response = text.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        line = response + b"\r\n"
        if text[3:4] == "-":
            self._continued.append(line)
            return
        if self._continued:
            self._continued.append(line)
            line = b"".join(self._continued)
            self._continued.clear()
        self._writer.write(line)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r << %r", self.session.peer if self.session else None, response)
        await self._writer.drain()

    async def smtp_DATA(self, arg: str) -> None:
        if BULK_DATA:
            await smtp_data(self, arg)
        else:
            await super().smtp_DATA(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        found = fast_getaddr(arg) if arg else None
        if found is None:
            return super()._getaddr(arg)
        address, rest = found
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(b"421 4.4.2 Error: timeout exceeded\r\n")
            self.protolog.write(self.sid, "timeout")
        super()._timeout_cb()  # type: ignore[no-untyped-call]
