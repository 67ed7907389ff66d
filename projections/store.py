"""Opening the DuckDB file: the writer lock, read-write and read-only connections.

One writer at a time: a writer holds an exclusive flock on
`DATA/projections.lock` for as long as it is open, and DuckDB's own file
lock while its connection is open. Readers open the file read-only and take
no lock of ours. DuckDB refuses a read-only open while a writer has the
file open (and the reverse), so both sides retry for `wait` seconds, then
raise ProjectionBusy. Nothing here touches the event log's lock: the
projections never hold up an append.

Failure rules: a lock not obtained in time is ProjectionBusy; any other
duckdb.Error or OSError becomes ProjectionError (StorageFull for a full
disk), cause chained. The file is removed only by a writer holding the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import duckdb

from projections.errors import ProjectionBusy, from_duckdb, from_os, is_lock_conflict

DB_NAME = "projections.duckdb"
LOCK_NAME = "projections.lock"
POLL = 0.02


class WriterLock:
    """The exclusive right to change the projections of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, wait: float) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise from_os(exc, f"cannot open {self.path}") from exc
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ProjectionBusy(
                        f"projections in {self.path.parent} are being updated by another process; try again"
                    ) from None
                time.sleep(POLL)
            except OSError as exc:
                os.close(fd)
                raise from_os(exc, f"cannot lock {self.path}") from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def connect(path: Path, *, read_only: bool, wait: float) -> duckdb.DuckDBPyConnection:
    """A connection to `path`, retrying for `wait` seconds while another process holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as exc:
            if not is_lock_conflict(exc):
                raise from_duckdb(exc, f"cannot open {path}") from exc
            if time.monotonic() >= deadline:
                mode = "read" if read_only else "update"
                raise ProjectionBusy(f"cannot {mode} {path}: another process has it open; try again") from exc
            time.sleep(POLL)
    try:
        # no progress bar from DuckDB: it would write to our stdout (`spool list --json`)
        con.execute("SET TimeZone = 'UTC'; SET enable_progress_bar = false")
    except duckdb.Error as exc:
        con.close()
        raise from_duckdb(exc, f"cannot set up {path}") from exc
    return con


def remove(path: Path) -> None:
    """Delete the DuckDB file and its WAL (derived data; only under the writer lock)."""
    for victim in (path, path.with_name(path.name + ".wal")):
        try:
            os.unlink(victim)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise from_os(exc, f"cannot remove {victim}") from exc


def close_quietly(con: duckdb.DuckDBPyConnection | None) -> None:
    if con is not None:
        with contextlib.suppress(duckdb.Error):
            con.close()
