"""One message, both scanners at the same time, one result.

The round trips to clamd and spamd run concurrently (asyncio), each
bounded by the timeout, so scanning costs the slower scanner's time, not
the sum. The result:

    virus        clamd found a signature (whatever spamd said or did)
    spam         spamd's score is at or over the threshold (the configured
                 one, else spamd's own)
    unavailable  a scanner failed and nothing was found by the other
    clean        every configured scanner answered and found nothing

Failure rules: a scanner's failure is never "clean". A definite finding by
one scanner stands even if the other failed (the message is quarantined,
not sent). An unexpected exception in a client counts as that scanner
failing (unknown errors are temporary), with its type in the reason.
Messages over `spam_max_size` are not sent to spamd (as spamc does): the
verdict's `checked` then lacks "spamd".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal

from events.schema import Verdict
from spoolfs.config import ScanConfig
from spoolfs.scan.clamd import ClamdClient
from spoolfs.scan.errors import ScannerError
from spoolfs.scan.spamd import SpamdClient, SpamResult

ResultKind = Literal["clean", "spam", "virus", "unavailable"]


@dataclass(frozen=True)
class ScanResult:
    kind: ResultKind
    verdict: Verdict
    failures: list[ScannerError] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(str(f) for f in self.failures)

    @property
    def failed(self) -> list[str]:
        return [f.scanner for f in self.failures]


class Scanner:
    def __init__(
        self,
        clamd: ClamdClient | None,
        spamd: SpamdClient | None,
        *,
        spam_threshold: float | None = None,
        spam_max_size: int = 512000,
    ) -> None:
        self.clamd = clamd
        self.spamd = spamd
        self.spam_threshold = spam_threshold
        self.spam_max_size = spam_max_size

    @classmethod
    def from_config(cls, scan: ScanConfig) -> Scanner:
        return cls(
            ClamdClient(scan.clamd, timeout=scan.timeout) if scan.clamd else None,
            SpamdClient(scan.spamd, timeout=scan.timeout) if scan.spamd else None,
            spam_threshold=scan.spam_threshold,
            spam_max_size=scan.spam_max_size,
        )

    async def scan(self, raw: bytes) -> ScanResult:
        jobs: dict[str, Awaitable[object]] = {}
        if self.clamd is not None:
            jobs["clamd"] = self.clamd.scan(raw)
        if self.spamd is not None and len(raw) <= self.spam_max_size:
            jobs["spamd"] = self.spamd.check(raw)
        outcomes = await asyncio.gather(*jobs.values(), return_exceptions=True)
        failures: list[ScannerError] = []
        virus, spam = "", None
        checked: list[str] = []
        for name, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, ScannerError):
                failures.append(outcome)
            elif isinstance(outcome, asyncio.CancelledError):
                raise outcome
            elif isinstance(outcome, BaseException):
                failures.append(ScannerError(name, f"{type(outcome).__name__}: {outcome}"))
            else:
                checked.append(name)
                if isinstance(outcome, SpamResult):
                    spam = outcome
                elif isinstance(outcome, str):
                    virus = outcome
        threshold, is_spam = 0.0, False
        if spam is not None and self.spam_threshold is None:
            # spamd's own decision: its displayed score is rounded, its comparison is not
            threshold, is_spam = spam.threshold, spam.is_spam
        elif spam is not None and self.spam_threshold is not None:
            threshold, is_spam = self.spam_threshold, spam.score >= self.spam_threshold
        verdict = Verdict(
            virus=virus,
            score=spam.score if spam else 0.0,
            threshold=threshold,
            rules=spam.rules if spam else [],
            checked=checked,
        )
        if virus:
            return ScanResult("virus", verdict, failures)
        if is_spam:
            return ScanResult("spam", verdict, failures)
        if failures:
            return ScanResult("unavailable", verdict, failures)
        return ScanResult("clean", verdict)
