"""Loading planned chunks: staging them, checking their seqs, appending them to events_raw.

DuckDB parses the lines itself (read_json, newline-delimited, explicit
columns), all the chunks of a catch-up in one statement: no Python loop over
records. Each line is parsed once; the payload fields the folds need are
extracted in the same pass into the list column `f` of the temporary table
`batch` (see `field`), which `projections.reduce` or `projections.small`
then folds into the state tables. All of it happens in the catch-up's
transaction.

Seq checks, per chunk: as many records as first..last holds, the smallest
seq first and the largest last, and no seq twice in a log (a bitstring over
the log's range: set bits count the distinct seqs). Together they make each
chunk exactly first..last, once each, without a sort or a hash of the seqs.

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


# Every chunk of a catch-up in one statement: DuckDB reads the files in parallel,
# and `filename` says which chunk (log, segment) a row came from.
SELECT = f"""
CREATE OR REPLACE TEMP TABLE batch AS
SELECT @log_id AS log_id, r.node, r.seq, r."at" AS ts, r.actor, r.payload, @segment AS segment,
    json_extract_string(r.payload, {PATHS}) AS f
FROM read_json($files, format = 'newline_delimited', columns = {COLUMNS}, filename = true) AS r
"""
LOAD = (
    SELECT.replace("@log_id", "c.log_id").replace("@segment", "c.segment")
    + """
JOIN (SELECT unnest($files) AS file, unnest($log_ids) AS log_id, unnest($segments) AS segment) AS c
    ON r.filename = c.file
"""
)
# ... and the usual case, one chunk (a catch-up within a segment), without the join
LOAD_ONE = SELECT.replace("@log_id", "$log_id::INTEGER").replace("@segment", "$segment::VARCHAR")

# One chunk alone, to name the one that does not parse.
PARSE = f"""
SELECT count(*), sum(len(payload::VARCHAR))
FROM read_json($path, format = 'newline_delimited', columns = {COLUMNS})
"""

COUNTS = """
SELECT log_id, segment, count(*), min(seq), max(seq)
FROM batch
GROUP BY log_id, segment
"""

# No seq twice in one log's rows: with each chunk's count, min and max right,
# that makes each chunk exactly first..last (set bits: distinct seqs in lo..hi).
DISTINCT = "SELECT bit_count(bitstring_agg(seq, {lo}, {hi})) FROM batch WHERE log_id = {log_id}"

# ... both at once for the usual case, one chunk; `hi` is at most the number of
# lines the chunk's bytes can hold, so a bogus last seq cannot ask for a huge bitstring
ONE_CHUNK = """
SELECT count(*), min(seq), max(seq),
    bit_count(bitstring_agg(seq, {lo}, {hi}) FILTER (WHERE seq BETWEEN {lo} AND {hi}))
FROM batch
"""
SHORTEST_RECORD = 64  # bytes: a record line holds at least its 64-digit `prev`

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
    files = [str(chunk.source) for _, chunk in chunks]
    try:
        if len(chunks) == 1:
            con.execute(LOAD_ONE, {"files": files, "log_id": chunks[0][0], "segment": chunks[0][1].segment})
        else:
            con.execute(
                LOAD,
                {
                    "files": files,
                    "log_ids": [log_id for log_id, _ in chunks],
                    "segments": [chunk.segment for _, chunk in chunks],
                },
            )
    except duckdb.InvalidInputException as exc:
        raise _unparsable(con, chunks, exc) from exc
    if progress is not None:
        for _, chunk in chunks:
            progress(chunk.end - chunk.start)
    if len(chunks) == 1:
        return _check_one(con, chunks[0][1])
    found = {(r[0], r[1]): r[2:] for r in con.execute(COUNTS).fetchall()}
    total = 0
    ranges: dict[int, tuple[int, int, int]] = {}  # log_id: (first seq, last seq, records)
    for log_id, chunk in chunks:
        count, first, last = found.get((log_id, chunk.segment), (0, None, None))
        expected = chunk.last_seq - chunk.first_seq + 1
        if (count, first, last) != (expected, chunk.first_seq, chunk.last_seq):
            raise _gap(chunk, f"found {count} records in {first}..{last}")
        lo, hi, n = ranges.get(log_id, (chunk.first_seq, chunk.last_seq, 0))
        ranges[log_id] = (min(lo, chunk.first_seq), max(hi, chunk.last_seq), n + count)
        total += count
    for log_id, (lo, hi, n) in ranges.items():
        # the chunks of a log follow on (see sources.plan), so lo..hi holds exactly n seqs
        row = con.execute(DISTINCT.format(lo=int(lo), hi=int(hi), log_id=int(log_id))).fetchone()
        distinct = int(row[0]) if row and row[0] is not None else 0
        if distinct != n:
            chunk = next(c for i, c in chunks if i == log_id)
            raise _gap(chunk, f"{n - distinct} seqs appear more than once in {lo}..{hi}")
    con.execute(STORE)
    return total


def _check_one(con: duckdb.DuckDBPyConnection, chunk: Chunk) -> int:
    lo = chunk.first_seq
    hi = min(chunk.last_seq, lo + (chunk.end - chunk.start) // SHORTEST_RECORD)
    row = con.execute(ONE_CHUNK.format(lo=int(lo), hi=int(max(lo, hi)))).fetchone()
    count, first, last, distinct = row if row else (0, None, None, 0)
    expected = chunk.last_seq - chunk.first_seq + 1
    if (count, first, last) != (expected, chunk.first_seq, chunk.last_seq):
        raise _gap(chunk, f"found {count} records in {first}..{last}")
    if distinct != count:
        raise _gap(chunk, f"{count - (distinct or 0)} seqs appear more than once in {first}..{last}")
    con.execute(STORE)
    return int(count)


def _gap(chunk: Chunk, found: str) -> LogBroken:
    return LogBroken(
        f"event log {chunk.log}: segment {chunk.segment} from offset {chunk.start}: "
        f"expected seq {chunk.first_seq}..{chunk.last_seq} once each, {found} (gap or repeat)",
        log=chunk.log,
        seq=chunk.first_seq,
    )


def _unparsable(
    con: duckdb.DuckDBPyConnection, chunks: list[tuple[int, Chunk]], exc: duckdb.Error
) -> LogBroken:
    """The LogBroken naming the first chunk that does not parse on its own."""
    culprit = chunks[0][1]
    cursor = con.cursor()  # a connection of its own: the failed statement aborted `con`'s transaction
    try:
        for _, chunk in chunks:
            try:
                cursor.execute(PARSE, {"path": str(chunk.source)}).fetchall()
            except duckdb.InvalidInputException as inner:
                culprit, exc = chunk, inner
                break
    finally:
        cursor.close()
    return LogBroken(
        f"event log {culprit.log}: segment {culprit.segment} from offset {culprit.start}: "
        f"a record does not parse ({one_line(str(exc))})",
        log=culprit.log,
    )
