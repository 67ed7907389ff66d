"""Opening projections.duckdb for writing, as derived data.

A file that is missing, does not open, has another schema version, or
whose tables do not fit the views is removed and created afresh (empty:
the next catch-up reads every log from its first record), and the reason
is returned. Only a writer holding the lock calls this.

Failure rules: ProjectionBusy when another process holds the file; any
other duckdb.Error while creating the schema becomes ProjectionError.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import duckdb

from projections import schema
from projections.errors import ProjectionBusy, ProjectionError, from_duckdb
from projections.store import close_quietly, connect, remove

SCRATCH_PREFIX = ".projections-load-"


def open_writable(path: Path, wait: float) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A read-write connection to a file with the current schema, and why it was started afresh."""
    con, reason = _existing(path, wait)
    if con is not None:
        try:
            schema.refresh_views(con)
        except (duckdb.Error, ProjectionError) as exc:  # tables of another layout
            close_quietly(con)
            con = None
            remove(path)
            reason = f"the views do not fit its tables ({exc})"
    try:
        if con is None:
            con = connect(path, read_only=False, wait=wait)
            schema.create(con)
    except duckdb.Error as exc:
        close_quietly(con)
        raise from_duckdb(exc, f"cannot set up {path}") from exc
    return con, reason


def _existing(path: Path, wait: float) -> tuple[duckdb.DuckDBPyConnection | None, str]:
    """The file as it is, if it is readable and of this schema; else removed, and why."""
    if not path.exists():
        return None, "there was no file"
    try:
        con = connect(path, read_only=False, wait=wait)
    except ProjectionBusy:
        raise
    except ProjectionError:
        remove(path)
        return None, "the file was unreadable"
    try:
        version = schema.stored(con, "schema_version")
    except duckdb.Error:
        close_quietly(con)
        remove(path)
        return None, "the file was unreadable"
    if version != schema.SCHEMA_VERSION:
        close_quietly(con)
        remove(path)
        return None, f"schema {version or 'none'} is not {schema.SCHEMA_VERSION}"
    return con, ""


def remove_scratch(data_dir: Path) -> None:
    """Scratch copies a killed catch-up left behind (we hold the writer lock)."""
    with contextlib.suppress(OSError):
        for entry in data_dir.iterdir():
            if entry.name.startswith(SCRATCH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
