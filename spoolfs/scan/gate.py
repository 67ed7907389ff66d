"""Scanning in the SMTP transaction: whether to scan, and what each result does.

    clean        -> the caller spools the message as usual
    virus, spam  -> `quarantine`: kept in quarantine/KIND/ (durable, with
                    its `message_quarantined` event) and the client gets 250
    unavailable  -> on_failure "tempfail": `refuse` records a
                    `scanner_unavailable` event and the client gets 451 4.7.1
                    (nothing is kept; the client retries);
                    on_failure "accept": the caller spools the message, then
                    `mark_unscanned` records `scanner_unavailable` with its ID,
                    which sets `unscanned` in its sidecar, before the 250.

Which mail is scanned: mail from trusted networks (relayed, outgoing)
always; mail from anyone else only with `scan_incoming`.

Failure rules: the synchronous methods write files and events and run in
the SMTP executor; they raise SpoolError like Spool.enqueue (the handler
answers 451/452, nothing acknowledged). `mark_unscanned` takes the
message's claim like any change; if delivery holds it for longer than
CLAIM_WAIT, the event is appended anyway and `fsck --repair` (run by
`spool serve` at start) brings the sidecar in line.
"""

from __future__ import annotations

from events import schema as ev
from spoolfs.config import ScanConfig
from spoolfs.errors import MessageBusy, MessageNotFound
from spoolfs.quarantine import Quarantine, QuarantineEntry
from spoolfs.scan.scanner import Scanner, ScanResult
from spoolfs.spool import Spool

CLAIM_WAIT = 10.0
UNSCANNED_REPLY = "451 4.7.1 Message cannot be scanned now, try again later"


class ScanGate:
    def __init__(self, scanner: Scanner, quarantine: Quarantine, config: ScanConfig) -> None:
        self.scanner = scanner
        self.quarantine = quarantine
        self.config = config

    def applies(self, trusted: bool) -> bool:
        return trusted or self.config.scan_incoming

    @property
    def accept_unscanned(self) -> bool:
        return self.config.on_failure == "accept"

    async def scan(self, raw: bytes) -> ScanResult:
        return await self.scanner.scan(raw)

    def keep(
        self,
        result: ScanResult,
        raw: bytes,
        sender: str,
        recipients: list[str],
        *,
        message_id: str,
        client_ip: str,
        helo: str,
        session_id: str,
    ) -> QuarantineEntry:
        assert result.kind in ("spam", "virus")
        return self.quarantine.add(
            raw,
            sender,
            recipients,
            "virus" if result.kind == "virus" else "spam",
            result.verdict,
            message_id=message_id,
            source="smtp",
            client_ip=client_ip,
            helo=helo,
            session_id=session_id,
            actor="smtp",
        )

    def refuse(self, result: ScanResult, *, client_ip: str, session_id: str) -> None:
        self.quarantine.log.append(
            ev.ScannerUnavailable(
                scanners=result.failed,
                reason=result.reason,
                action="tempfail",
                client_ip=client_ip,
                session_id=session_id,
            ),
            "smtp",
        )

    def mark_unscanned(
        self, spool: Spool, message_id: str, result: ScanResult, *, client_ip: str, session_id: str
    ) -> None:
        event = ev.ScannerUnavailable(
            scanners=result.failed,
            reason=result.reason,
            action="accept",
            id=message_id,
            client_ip=client_ip,
            session_id=session_id,
        )
        try:
            changed = spool.change([message_id], lambda _s: event, wait=CLAIM_WAIT)
        except (MessageNotFound, MessageBusy):
            changed = []
        if not changed:  # delivered already, or held by delivery: the log still says so
            spool.log.append(event, "smtp")
