"""Reading the projections: guarded queries, the spool listing, qshape, Parquet export.

Every function takes a connection whose `report_time` variable is already
set (see `Projections._reader`) and never reads the clock itself.

Failure rules: `run_query` refuses anything but one SELECT (or EXPLAIN of
one) with QueryRefused, and runs it in a read-only transaction, so even a
SELECT cannot change the file. Bad arguments raise ProjectionError;
duckdb.Error propagates to the caller, which translates it.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import duckdb
import msgspec

from events import clock
from projections.errors import ProjectionError, QueryRefused, from_duckdb

Sort = Literal["id", "age", "next-attempt", "size", "priority"]
ORDER: dict[str, str] = {
    "id": "id",
    "age": "received_at, id",
    "next-attempt": "next_attempt_at, id",
    "size": "size DESC, id",
    "priority": "CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END, received_at, id",
}
# exactly the keys of cli.spool_cmds.list_row
LIST_COLUMNS = (
    "id",
    "subspool",
    "sender",
    "recipients_delivered",
    "recipients_total",
    "size",
    "attempts",
    "received_at",
    "priority",
    "status",
    "next_attempt_at",
)
TIMES = ("received_at", "next_attempt_at")


class ListRow(TypedDict):
    """A `spool list --json` row (the keys of LIST_COLUMNS, in order)."""

    id: str
    subspool: str
    sender: str
    recipients_delivered: int
    recipients_total: int
    size: int
    attempts: int
    received_at: dt.datetime
    priority: str
    status: str
    next_attempt_at: dt.datetime


ROW_JSON = (
    "to_json({"
    + ", ".join(
        f"'{c}': {c}::TIMESTAMP::VARCHAR || 'Z'" if c in TIMES else f"'{c}': {c}" for c in LIST_COLUMNS
    )
    + "})::VARCHAR"
)
# `spool list --json` lines exactly as msgspec writes them (RFC 3339, "Z", no
# fraction when the microseconds are 0)
LINE_JSON = (
    "to_json({"
    + ", ".join(
        (
            f"'{c}': CASE WHEN epoch_us({c}) % 1000000 = 0 "
            f"THEN strftime({c}::TIMESTAMP, '%Y-%m-%dT%H:%M:%SZ') "
            f"ELSE strftime({c}::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.%fZ') END"
        )
        if c in TIMES
        else f"'{c}': {c}"
        for c in LIST_COLUMNS
    )
    + "})::VARCHAR"
)
_list_rows = msgspec.json.Decoder(list[ListRow])
SHAPES = {"domain": ("spool_shape", "domain"), "sender": ("sender_shape", "sender_domain")}
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?", re.IGNORECASE)


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | dict[str, Any] | None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise from_duckdb(exc, "sql") from exc
    if len(statements) != 1:
        raise QueryRefused(f"sql: give exactly one statement, not {len(statements)}")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        try:
            inner = con.extract_statements(_EXPLAIN.sub("", statements[0].query, count=1))
        except duckdb.Error as exc:
            raise from_duckdb(exc, "sql") from exc
        kind = inner[0].type if len(inner) == 1 else kind
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"sql: only queries run here; {kind.name} is a write statement or a command")
    try:
        con.execute("BEGIN TRANSACTION READ ONLY")
        try:
            cursor = con.execute(sql, params) if params is not None else con.execute(sql)
            columns = [d[0] for d in cursor.description or []]
            rows = cursor.fetchall()
        finally:
            con.execute("ROLLBACK")
    except duckdb.Error as exc:
        raise from_duckdb(exc, "sql") from exc
    return columns, rows


def list_spool(
    con: duckdb.DuckDBPyConnection,
    *,
    waiting: bool,
    held: bool,
    sender: str | None,
    domain: str | None,
    older_than: float | None,
    sort: str,
    limit: int,
    now: dt.datetime,
    claimed: Collection[str] = (),
    lines: bool = False,
) -> list[dict[str, object]] | str:
    """The rows (dicts), or with `lines` the JSON Lines text of them.

    `claimed`: IDs being delivered right now (a claim is a live fact, not in
    the log); unless held, their status reads "delivering".
    """
    if sort not in ORDER:
        raise ProjectionError(f"sort must be one of {', '.join(ORDER)}, not {sort!r}")
    if limit < 0:
        raise ProjectionError("limit must be 0 (all) or more")
    where: list[str] = []
    params: list[object] = []
    if held:
        where.append("status = 'held'")
    if waiting:
        where.append("status <> 'held'")
    if sender is not None:
        where.append("sender = ?")
        params.append(sender)
    if domain is not None:
        where.append("id IN (SELECT id FROM recipients WHERE domain = ?)")
        params.append(domain.lower())
    if older_than is not None:
        where.append("received_at <= ?")
        params.append(now - dt.timedelta(seconds=older_than))
    # DuckDB writes the rows as one JSON array and msgspec makes the dicts: far cheaper
    # than a Python object per value (times: naive UTC text + "Z", read back zone-aware)
    inner = (
        "SELECT * REPLACE (CASE WHEN status <> 'held' AND list_contains(?::VARCHAR[], id) "
        "THEN 'delivering' ELSE status END AS status) FROM spool"
    )
    params.insert(0, sorted(claimed))
    if where:
        inner += " WHERE " + " AND ".join(where)
    if limit:
        inner += f" ORDER BY {ORDER[sort]} LIMIT ?"
        params.append(limit)
    if lines:
        # straight from DuckDB: no Python object per row at all
        sql = f"SELECT string_agg({LINE_JSON} || chr(10), '' ORDER BY {ORDER[sort]}) FROM ({inner})"
        row = con.execute(sql, params).fetchone()
        return str(row[0]) if row and row[0] is not None else ""
    sql = f"SELECT '[' || coalesce(string_agg({ROW_JSON}, ',' ORDER BY {ORDER[sort]}), '') || ']' FROM ({inner})"
    row = con.execute(sql, params).fetchone()
    return _list_rows.decode(row[0] if row else "[]")  # type: ignore[return-value]


def shape(con: duckdb.DuckDBPyConnection, by: str) -> list[dict[str, object]]:
    if by not in SHAPES:
        raise ProjectionError(f"summary by must be one of {', '.join(SHAPES)}, not {by!r}")
    view, key = SHAPES[by]
    cursor = con.execute(f"SELECT * FROM {view} ORDER BY total DESC, {key}")
    columns = [d[0] for d in cursor.description or []]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def export_parquet(
    con: duckdb.DuckDBPyConnection, out_dir: Path, since: dt.datetime | None, until: dt.datetime | None
) -> dict[str, int]:
    """Records in whole UTC days (since/until are widened to day bounds), per table.

    A day-and-node partition written replaces the one already in `out_dir`,
    so exporting the same days again gives the same files, not duplicates.
    """
    low = _day_start(since) if since is not None else dt.datetime(1970, 1, 1, tzinfo=clock.UTC)
    high = (
        _day_start(until) + dt.timedelta(days=1)
        if until is not None
        else dt.datetime(9999, 1, 1, tzinfo=clock.UTC)
    )
    counts: dict[str, int] = {}
    for table, column in (("events", "recorded_at"), ("attempts", "attempted_at")):
        target = out_dir / table
        select = (
            f"SELECT *, strftime({column}, '%Y-%m-%d') AS day FROM {table} "
            f"WHERE {column} >= $low AND {column} < $high"
        )
        bounds = {"low": low, "high": high}
        parts = con.execute(f"SELECT day, node, count(*) FROM ({select}) GROUP BY ALL", bounds).fetchall()
        try:
            for day, node, _ in parts:
                shutil.rmtree(target / f"day={day}" / f"node={node}", ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectionError(f"cannot write {target}: {exc.strerror or exc}") from exc
        if parts:
            quoted = str(target).replace("'", "''")
            con.execute(
                f"COPY ({select}) TO '{quoted}' "
                "(FORMAT parquet, PARTITION_BY (day, node), OVERWRITE_OR_IGNORE true, FILENAME_PATTERN 'part_{i}')",
                bounds,
            )
        counts[table] = sum(int(n) for _, _, n in parts)
    return counts


def _day_start(value: dt.datetime) -> dt.datetime:
    utc = clock.utc(value)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)
