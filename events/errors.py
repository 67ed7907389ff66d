"""The one error root of spoolfs.

Every layer raises a subclass of `SpoolError`; foreign errors (OSError,
msgspec.DecodeError, duckdb.Error, ...) are translated where they enter our
code, with the cause chained. The CLI prints `str(error)` on one line and
exits with `error.exit_code`.
"""

from __future__ import annotations


class SpoolError(Exception):
    """Root of every error spoolfs raises on purpose."""

    exit_code = 1


class ConfigError(SpoolError):
    """The configuration file or an override is wrong."""

    exit_code = 2


class LogError(SpoolError):
    """The event log cannot be opened, read or appended to."""


class ChainBroken(LogError):
    """Verification found a record that breaks the hash chain or the seq order."""

    def __init__(self, message: str, *, seq: int, segment: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.segment = segment


class StorageFull(SpoolError):
    """The disk is full (ENOSPC or EDQUOT); nothing was acknowledged."""
