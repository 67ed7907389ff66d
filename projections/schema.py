"""The tables of projections.duckdb, the report views, and their versions.

Base tables (written only by the catch-up, in one transaction each):
- `meta`: key/value: `schema_version`, `views` (hash of the view files).
- `logs`: one row a log read, with its watermark (see `projections.sources`).
- `events_raw`: every record: log_id, node, seq, recorded_at, actor, type,
  id (the message ID, if the payload has one), payload (JSON), segment.
- `message_state`: the spool now, one row a message as `spoolfs.state.apply`
  would leave its sidecar, its recipients a list column (the `recipients`
  view unnests it); `attempt_log`: every delivery_attempted record.

Reports are views, one `.sql` file each in `projections/sql/`. Views read
the report time from the DuckDB variable `report_time` (set by whoever
queries, from `events.clock.now()` or a `now` argument), never from now().

Failure rules: `SCHEMA_VERSION` names the tables and their meaning; when it
differs from the file's, the file is rebuilt from the log (derived data).
A view change only re-creates the views. A view file that does not bind is a
ProjectionError naming the file.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import duckdb

from projections.errors import ProjectionError, one_line

# Bump when a table, a column or the reducer's meaning changes.
SCHEMA_VERSION = "2"

# In dependency order: a view may read the views before it.
VIEWS = ("events", "attempts", "recipients", "spool", "spool_shape", "sender_shape", "quarantine")

# A message's recipients, in order, as the sidecar holds them.
RECIPIENTS = (
    "STRUCT(address VARCHAR, state VARCHAR, attempts INTEGER, code INTEGER, response VARCHAR, "
    "host VARCHAR, updated_at TIMESTAMPTZ)[]"
)

TABLES = """
CREATE TABLE meta (key VARCHAR NOT NULL, value VARCHAR NOT NULL);
CREATE TABLE logs (
    log_id INTEGER NOT NULL,
    path VARCHAR NOT NULL,
    node VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    segment VARCHAR NOT NULL,
    "offset" BIGINT NOT NULL,
    hash VARCHAR NOT NULL
);
CREATE TABLE events_raw (
    log_id INTEGER NOT NULL,
    node VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    id VARCHAR USING COMPRESSION zstd,
    payload JSON NOT NULL USING COMPRESSION zstd,
    segment VARCHAR NOT NULL
);
CREATE TABLE message_state (
    log_id INTEGER NOT NULL,
    id VARCHAR NOT NULL,
    node VARCHAR NOT NULL,
    subspool VARCHAR NOT NULL,
    sender VARCHAR NOT NULL,
    recipients {RECIPIENTS} NOT NULL,
    recipients_total INTEGER NOT NULL,
    recipients_delivered INTEGER NOT NULL,
    size BIGINT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    priority VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    forced BOOLEAN NOT NULL,
    source VARCHAR NOT NULL,
    client_ip VARCHAR NOT NULL,
    helo VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    bounce_of VARCHAR NOT NULL,
    warned BOOLEAN NOT NULL,
    unscanned BOOLEAN NOT NULL,
    seq BIGINT NOT NULL
);
CREATE TABLE attempt_log (
    log_id INTEGER NOT NULL,
    node VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    attempted_at TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    recipient VARCHAR NOT NULL,
    result VARCHAR NOT NULL,
    code INTEGER NOT NULL,
    response VARCHAR NOT NULL,
    host VARCHAR NOT NULL
);
"""


def view_sql(name: str) -> str:
    return resources.files("projections").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def views_hash() -> str:
    digest = hashlib.sha256()
    for name in VIEWS:
        digest.update(name.encode() + b"\0" + view_sql(name).encode() + b"\0")
    return digest.hexdigest()[:16]


def stored(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """A meta value, or None when the file has no (complete) schema."""
    try:
        row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else str(row[0])


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and view in an empty file, in one transaction."""
    con.execute("BEGIN")
    try:
        con.execute(TABLES.replace("{RECIPIENTS}", RECIPIENTS))
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        _create_views(con)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def refresh_views(con: duckdb.DuckDBPyConnection) -> None:
    """Re-create the views if their files changed since they were stored."""
    if stored(con, "views") == views_hash():
        return
    con.execute("BEGIN")
    try:
        _create_views(con)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _create_views(con: duckdb.DuckDBPyConnection) -> None:
    for name in reversed(VIEWS):
        con.execute(f"DROP VIEW IF EXISTS {name}")
    for name in VIEWS:
        try:
            con.execute(view_sql(name))
        except duckdb.Error as exc:
            raise ProjectionError(f"view {name}.sql does not bind: {one_line(str(exc))}") from exc
    con.execute("DELETE FROM meta WHERE key = 'views'")
    con.execute("INSERT INTO meta VALUES ('views', ?)", [views_hash()])
