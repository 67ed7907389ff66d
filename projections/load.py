"""Loading planned chunks: staging them, checking their seqs, appending them to events_raw.

DuckDB parses the lines itself (read_json, newline-delimited, explicit
columns): no Python loop over records. Each line is parsed once; the
payload fields the fold needs are extracted in the same pass into the list
column `f` of the temporary table `batch` (see `field`), which
`projections.reduce` then folds into the state tables. All of it happens in
the catch-up's transaction.

Failure rules: a line DuckDB cannot parse, or a chunk whose seqs are not
exactly first..last without repeats, raises LogBroken naming the log and
the segment (run `spool events verify`); other duckdb errors propagate to
the caller, which translates them.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from projections.errors import LogBroken, one_line
from projections.sources import Chunk

COLUMNS = "{'seq': 'BIGINT', 'at': 'TIMESTAMPTZ', 'actor': 'VARCHAR', 'node': 'VARCHAR', 'payload': 'JSON'}"

# The payload fields the fold needs from most records, parsed once while loading
# (a list column `f`); those only message_enqueued has are read from its payload.
FIELDS = (
    "type",
    "id",
    "priority",
    "next_attempt_at",
    "action",
    "recipient",
    "result",
    "code",
    "response",
    "host",
)
PATHS = "[" + ", ".join(f"'$.{name}'" for name in FIELDS) + "]"


def field(name: str, table: str = "") -> str:
    """The SQL for payload field `name` of a `batch` row."""
    return f"{table + '.' if table else ''}f[{FIELDS.index(name) + 1}]"


STAGE = """
CREATE OR REPLACE TEMP TABLE batch (
    log_id INTEGER,
    node VARCHAR,
    seq BIGINT,
    ts TIMESTAMPTZ,
    actor VARCHAR,
    payload JSON,
    segment VARCHAR,
    f VARCHAR[]
)
"""

LOAD = f"""
INSERT INTO batch
SELECT $log_id, node, seq, "at", actor, payload, $segment, json_extract_string(payload, {PATHS})
FROM read_json($path, format = 'newline_delimited', columns = {COLUMNS})
"""

COUNTS = """
SELECT log_id, segment, count(*), count(DISTINCT seq), min(seq), max(seq)
FROM batch
GROUP BY log_id, segment
"""

STORE = f"""
INSERT INTO events_raw (log_id, node, seq, recorded_at, actor, type, id, payload, segment)
SELECT log_id, node, seq, ts, actor, {field("type")}, {field("id")}, payload, segment FROM batch
"""


def load(
    con: duckdb.DuckDBPyConnection,
    chunks: list[tuple[int, Chunk]],
    progress: Callable[[int], None] | None,
) -> int:
    """Stage every chunk (log_id, chunk) in `batch`, check its seqs, append it to events_raw."""
    con.execute(STAGE)
    for log_id, chunk in chunks:
        try:
            con.execute(LOAD, {"log_id": log_id, "segment": chunk.segment, "path": str(chunk.source)})
        except duckdb.InvalidInputException as exc:
            raise LogBroken(
                f"event log {chunk.log}: segment {chunk.segment} from offset {chunk.start}: "
                f"a record does not parse ({one_line(str(exc))})",
                log=chunk.log,
            ) from exc
        if progress is not None:
            progress(chunk.end - chunk.start)
    found = {(r[0], r[1]): r[2:] for r in con.execute(COUNTS).fetchall()}
    total = 0
    for log_id, chunk in chunks:
        count, distinct, first, last = found.get((log_id, chunk.segment), (0, 0, None, None))
        expected = chunk.last_seq - chunk.first_seq + 1
        if (count, distinct, first, last) != (expected, expected, chunk.first_seq, chunk.last_seq):
            raise LogBroken(
                f"event log {chunk.log}: segment {chunk.segment} from offset {chunk.start}: "
                f"expected seq {chunk.first_seq}..{chunk.last_seq} once each, found {count} records "
                f"with {distinct} distinct seqs in {first}..{last} (gap or repeat)",
                log=chunk.log,
                seq=chunk.first_seq,
            )
        total += count
    con.execute(STORE)
    return total
