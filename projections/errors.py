"""The errors of the projections, and the one place duckdb.Error is translated.

Failure rules: every error raised from `projections` is a SpoolError with a
one-line message; a foreign error (duckdb.Error, OSError) is translated
where it enters our code, with the cause chained. A problem in the log
itself (a gap, a broken chain, a record that does not parse) is
LogBroken and always says to run `spool events verify`.
"""

from __future__ import annotations

import errno

import duckdb

from events.errors import LogError, SpoolError, StorageFull

VERIFY_HINT = "run `spool events verify`"


class ProjectionError(SpoolError):
    """The projections cannot be opened, updated or queried."""


class ProjectionBusy(ProjectionError):
    """Another process holds the projections (writer lock or DuckDB file lock)."""


class QueryRefused(ProjectionError):
    """A statement given to `query` would write, or is not a single query."""


class LogBroken(LogError):
    """Catch-up found a gap, a broken chain or an unreadable record in a log."""

    def __init__(self, message: str, *, log: str, seq: int = 0) -> None:
        super().__init__(f"{message}; {VERIFY_HINT}")
        self.log = log
        self.seq = seq


def one_line(text: str) -> str:
    """The first line of `text`, without DuckDB's decorations."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first.strip()


def from_duckdb(exc: duckdb.Error, what: str) -> ProjectionError:
    return ProjectionError(f"{what}: {one_line(str(exc))}")


def from_os(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: disk full ({exc.strerror})")
    return ProjectionError(f"{what}: {exc.strerror or exc}")


def is_lock_conflict(exc: duckdb.Error) -> bool:
    """True when DuckDB could not open the file because another process holds it."""
    text = str(exc)
    return "Could not set lock" in text or "Conflicting lock" in text
