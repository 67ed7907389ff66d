"""Scanning mail during DATA: clamd for viruses, spamd for spam, concurrently.

    clamd.ClamdClient   INSTREAM over TCP or a unix socket -> signature name or ""
    spamd.SpamdClient   SYMBOLS (SPAMD protocol) -> score, threshold, rule names
    scanner.Scanner     both at the same time, each bounded by the timeout
                        -> ScanResult: clean, spam, virus or unavailable
    gate.ScanGate       what the SMTP handler does with a result: quarantine,
                        451 4.7.1, or spool unscanned (config `[scan]`)

Failure rules: a scanner that cannot be reached, does not answer in time
or answers something we cannot read raises ScannerError (a SpoolError)
inside its client; the Scanner turns that into an `unavailable` result
naming the scanner and the reason, never into "clean".
"""

from spoolfs.scan.clamd import ClamdClient
from spoolfs.scan.errors import ScannerError
from spoolfs.scan.gate import ScanGate
from spoolfs.scan.scanner import Scanner, ScanResult
from spoolfs.scan.spamd import SpamdClient, SpamResult

__all__ = [
    "ClamdClient",
    "ScanGate",
    "ScanResult",
    "Scanner",
    "ScannerError",
    "SpamResult",
    "SpamdClient",
]
