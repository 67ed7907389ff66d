"""SMTP policy and ingest: what the server says to each command.

Failure rules (what the client hears):
- bad sender syntax 501 5.1.7; bad recipient 501 5.1.3; relay refused
  554 5.7.1; unknown local user 550 5.1.1; too many recipients 452 4.5.3.
- DATA: `250 2.0.0 Ok: queued as ID` only after the body, its sidecar and
  the enqueue event are durable. Disk full: `452 4.3.1 Insufficient system
  storage`, nothing kept. Any other failure to store: `451 4.3.0`, nothing
  acknowledged (a partial write is crash debris fsck removes).
- A Received header is prepended; the client IP, HELO name and session ID
  go into the sidecar.
- Scanning (`[scan]`, spoolfs.scan.gate): after the Received header and
  before anything is stored. Spam or virus: kept in quarantine, then
  `250 2.0.0 Ok: queued as ID` (the same words: a sender learns nothing).
  A scanner unavailable: `451 4.7.1`, nothing kept, or with
  on_failure = "accept" spooled and marked unscanned before the 250.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
from concurrent.futures import Executor
from functools import partial
from typing import Any

from events import clock
from events.errors import SpoolError, StorageFull
from spoolfs.ids import new_id
from spoolfs.protolog import ProtocolLog
from spoolfs.scan.gate import UNSCANNED_REPLY, ScanGate
from spoolfs.scan.scanner import ScanResult
from spoolfs.smtp.policy import RelayPolicy
from spoolfs.spool import Spool

_date_cache: list[tuple[int, str]] = [(-1, "")]


def received_date(now: datetime.datetime) -> str:
    """RFC 5322 date of `now` (UTC), to the second: formatted once a second, not once a message."""
    second = int(now.timestamp())
    cached = _date_cache[0]
    if cached[0] != second:
        cached = (second, email.utils.format_datetime(now.replace(microsecond=0)))
        _date_cache[0] = cached
    return cached[1]


class SpoolHandler:
    def __init__(
        self,
        spool: Spool,
        policy: RelayPolicy,
        *,
        hostname: str,
        max_recipients: int,
        protolog: ProtocolLog,
        executor: Executor,
        scan: ScanGate | None = None,
    ) -> None:
        self.spool = spool
        self.scan = scan
        self.policy = policy
        self.hostname = hostname
        self.max_recipients = max_recipients
        self.protolog = protolog
        self.executor = executor

    @staticmethod
    def _sid(session: Any) -> str:
        return getattr(session, "spool_sid", "S?")

    @staticmethod
    def _ip(session: Any) -> str:
        peer = session.peer or ("", 0)
        return str(peer[0])

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.protolog.write(self._sid(session), f"ehlo {hostname}")
        # insert before the final "250 HELP" line
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self.protolog.write(self._sid(session), f"helo {hostname}")
        return f"250 {self.hostname}"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal, sender = self.policy.check_sender(address)
        self.protolog.write(
            self._sid(session), f"mail from=<{address}>" + (f" refused: {refusal}" if refusal else "")
        )
        if refusal:
            return refusal
        envelope.mail_from = sender
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        sid = self._sid(session)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        refusal, rcpt = self.policy.check_recipient(self._ip(session), address)
        self.protolog.write(sid, f"rcpt to=<{address}>")
        if refusal:
            return refusal
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's address parser can raise on malformed input: that is a syntax error."""
        tb = error.__traceback__
        while tb is not None:
            if "_header_value_parser" in tb.tb_frame.f_code.co_filename:
                return "501 5.5.4 Syntax error in parameters"
            tb = tb.tb_next
        self.protolog.write("S?", f"error: {type(error).__name__}: {error}")
        return "451 4.3.0 Error: internal error"

    def received_header(self, session: Any, envelope: Any, message_id: str) -> bytes:
        helo = session.host_name or "unknown"
        ip = self._ip(session)
        proto = "UTF8SMTP" if envelope.smtp_utf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        date = received_date(clock.now())
        text = f"Received: from {helo} ([{ip}])\r\n\tby {self.hostname} (spoolfs) with {proto} id {message_id}{rcpt};\r\n\t{date}\r\n"
        return text.encode("utf-8", "replace")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sid = self._sid(session)
        message_id = new_id()
        raw = self.received_header(session, envelope, message_id) + envelope.original_content
        loop = asyncio.get_running_loop()
        unscanned: ScanResult | None = None
        if self.scan is not None and self.scan.applies(self.policy.trusted(self._ip(session))):
            result = await self.scan.scan(raw)
            if result.kind in ("spam", "virus"):
                return await self._quarantine(session, envelope, result, raw, message_id)
            if result.kind == "unavailable":
                self.protolog.write(sid, f"scan failed: {result.reason}")
                if not self.scan.accept_unscanned:
                    refuse = partial(self.scan.refuse, result, client_ip=self._ip(session), session_id=sid)
                    await loop.run_in_executor(self.executor, refuse)
                    return UNSCANNED_REPLY
                unscanned = result
        enqueue = partial(
            self.spool.enqueue,
            raw,
            envelope.mail_from,
            envelope.rcpt_tos,
            source="smtp",
            client_ip=self._ip(session),
            helo=session.host_name or "",
            session_id=sid,
            actor="smtp",
            message_id=message_id,
        )
        try:
            await loop.run_in_executor(self.executor, enqueue)
            if unscanned is not None and self.scan is not None:
                mark = partial(
                    self.scan.mark_unscanned,
                    self.spool,
                    message_id,
                    unscanned,
                    client_ip=self._ip(session),
                    session_id=sid,
                )
                await loop.run_in_executor(self.executor, mark)
        except StorageFull:
            self.protolog.write(sid, "data refused: disk full")
            return "452 4.3.1 Insufficient system storage"
        except SpoolError as exc:
            self.protolog.write(sid, f"data refused: {exc}")
            return "451 4.3.0 Error: queue file write error"
        self.protolog.write(
            sid,
            f"queued as {message_id} size={len(raw)} from=<{envelope.mail_from}> nrcpt={len(envelope.rcpt_tos)}",
        )
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _quarantine(
        self, session: Any, envelope: Any, result: ScanResult, raw: bytes, message_id: str
    ) -> str:
        sid = self._sid(session)
        assert self.scan is not None
        keep = partial(
            self.scan.keep,
            result,
            raw,
            envelope.mail_from,
            envelope.rcpt_tos,
            message_id=message_id,
            client_ip=self._ip(session),
            helo=session.host_name or "",
            session_id=sid,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, keep)
        except StorageFull:
            self.protolog.write(sid, "data refused: disk full")
            return "452 4.3.1 Insufficient system storage"
        except SpoolError as exc:
            self.protolog.write(sid, f"data refused: {exc}")
            return "451 4.3.0 Error: queue file write error"
        why = f"virus {result.verdict.virus}" if result.kind == "virus" else f"spam {result.verdict.score:g}"
        self.protolog.write(
            sid,
            f"quarantined as {message_id} ({why}) size={len(raw)} from=<{envelope.mail_from}> "
            f"nrcpt={len(envelope.rcpt_tos)}",
        )
        return f"250 2.0.0 Ok: queued as {message_id}"
