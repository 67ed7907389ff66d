"""Folding a small catch-up record by record: the same rows as `projections.reduce`, sooner.

The set-based SQL of `reduce` costs DuckDB about 20 ms to plan, whatever the
size of the batch: most of a catch-up of a thousand records. Here the message
records of `batch` are read out in one query, the rows of the messages they
touch are taken out of `message_state` in one DELETE ... RETURNING, each
record is applied in seq order as `spoolfs.state.apply` applies it (the
rules in `projections.reduce`'s docstring), and the rows are written back
in one statement, read from a JSON Lines file in the catch-up's scratch
directory. Delivery attempts go to `attempt_log` with reduce's own SQL.

A rebuild always uses `reduce` (see `Projections.rebuild`): the tests that
compare catch-ups step by step with a rebuild compare the two folds.

Failure rules: `prepare` returns None when a message_enqueued payload does
not decode as expected, and the caller then uses `reduce` (which reads such
payloads leniently); otherwise none of its own: a duckdb.Error propagates to
the caller, whose transaction then rolls back.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import msgspec

from projections import reduce
from projections.load import field
from projections.schema import RECIPIENTS

RECORDS = f"""
SELECT log_id, seq, ts::VARCHAR, node, type, id, priority, next_at, recipient, result, code, response, host, enqueued
FROM (
    SELECT log_id, seq, ts, node, {field("type")} AS type, {field("id")} AS id, {field("priority")} AS priority,
        {field("next_attempt_at")} AS next_at, {field("action")} AS action,
        coalesce({field("recipient")}, '') AS recipient, coalesce({field("result")}, '') AS result,
        coalesce(TRY_CAST({field("code")} AS INTEGER), 0) AS code, coalesce({field("response")}, '') AS response,
        coalesce({field("host")}, '') AS host,
        CASE WHEN {field("type")} = 'message_enqueued' THEN payload::VARCHAR END AS enqueued
    FROM batch
)
WHERE id IS NOT NULL
  AND (type IN {reduce.CHANGE} OR type IN {reduce.LIFE})
  AND (type <> 'spool_repaired' OR action = 'forgotten')
ORDER BY log_id, seq
"""

TAKE = """
WITH taken AS (
    DELETE FROM message_state AS m
    USING (SELECT unnest($log_ids) AS log_id, unnest($ids) AS id) AS t
    WHERE m.log_id = t.log_id AND m.id = t.id
    RETURNING m.*
)
SELECT to_json(taken)::VARCHAR FROM taken
"""

TYPES = {
    "log_id": "INTEGER",
    "id": "VARCHAR",
    "node": "VARCHAR",
    "subspool": "VARCHAR",
    "sender": "VARCHAR",
    "recipients": RECIPIENTS,
    "recipients_total": "INTEGER",
    "recipients_delivered": "INTEGER",
    "size": "BIGINT",
    "received_at": "TIMESTAMPTZ",
    "priority": "VARCHAR",
    "status": "VARCHAR",
    "attempts": "INTEGER",
    "next_attempt_at": "TIMESTAMPTZ",
    "forced": "BOOLEAN",
    "source": "VARCHAR",
    "client_ip": "VARCHAR",
    "helo": "VARCHAR",
    "session_id": "VARCHAR",
    "bounce_of": "VARCHAR",
    "warned": "BOOLEAN",
    "unscanned": "BOOLEAN",
    "seq": "BIGINT",
}
PUT = (
    f"INSERT INTO message_state ({', '.join(TYPES)}) SELECT * FROM read_json($path, "
    "format = 'newline_delimited', maximum_object_size = $longest, columns = {"
    + ", ".join(f"'{name}': '{kind}'" for name, kind in TYPES.items())
    + "})"
)
LONGEST = 16 << 20  # DuckDB's default longest line; a message with very many recipients may need more

REMOVED = frozenset({"message_deleted", "moved_to_corrupt", "message_finished", "spool_repaired"})


class Recipient(msgspec.Struct):
    address: str | None
    state: str
    attempts: int
    code: int
    response: str
    host: str
    updated_at: str | None  # times stay text: DuckDB reads back what it wrote


class State(msgspec.Struct):
    """A row of message_state, its fields in the table's column order."""

    log_id: int
    id: str
    node: str
    subspool: str
    sender: str
    recipients: list[Recipient]
    recipients_total: int
    recipients_delivered: int
    size: int
    received_at: str
    priority: str
    status: str
    attempts: int
    next_attempt_at: str
    forced: bool
    source: str
    client_ip: str
    helo: str
    session_id: str
    bounce_of: str
    warned: bool
    unscanned: bool
    seq: int


class Enqueued(msgspec.Struct):
    """The fields of message_enqueued the state takes (missing or null: the defaults of `reduce`)."""

    sender: str | None = None
    recipients: list[str | None] | None = None
    size: int | None = None
    subspool: str | None = None
    priority: str | None = None
    source: str | None = None
    client_ip: str | None = None
    helo: str | None = None
    session_id: str | None = None
    bounce_of: str | None = None


_state = msgspec.json.Decoder(State)
_enqueued = msgspec.json.Decoder(Enqueued, strict=False)
_encode = msgspec.json.Encoder().encode

Row = tuple[int, int, str, str, str, str, str | None, str | None, str, str, int, str, str, str | None]


def prepare(con: duckdb.DuckDBPyConnection) -> tuple[list[Row], dict[int, Enqueued]] | None:
    """The message records of `batch` in order, and the enqueues decoded (None: use `reduce`)."""
    rows: list[Row] = con.execute(RECORDS).fetchall()
    born: dict[int, Enqueued] = {}
    try:
        for i, r in enumerate(rows):
            if r[13] is not None:
                born[i] = _enqueued.decode(r[13])
    except msgspec.DecodeError:
        return None
    return rows, born


def fold(con: duckdb.DuckDBPyConnection, rows: list[Row], born: dict[int, Enqueued], scratch: Path) -> None:
    """Apply the records `prepare` read (inside the caller's transaction)."""
    con.execute(reduce.ATTEMPTS)
    touched = list(dict.fromkeys((r[0], r[5]) for r in rows))
    states: dict[tuple[int, str], State | None] = dict.fromkeys(touched)
    if touched:
        taken = con.execute(TAKE, {"log_ids": [k[0] for k in touched], "ids": [k[1] for k in touched]})
        for (text,) in taken.fetchall():
            row = _state.decode(text)
            states[(row.log_id, row.id)] = row
    for i, r in enumerate(rows):
        log_id, seq, ts, node, kind, mid, priority, next_at, rcpt, result, code, resp, host, _ = r
        key = (log_id, mid)
        if kind == "message_enqueued":
            states[key] = _born(log_id, mid, node, seq, ts, born[i])
            continue
        s = states[key]
        if s is None:
            continue  # a message the projections do not hold (gone, or never seen)
        if kind in REMOVED:
            states[key] = None
            continue
        if kind == "priority_set":
            if priority is not None:
                s.priority = priority
        elif kind == "message_held":
            s.status = "held"
        elif kind == "message_released":
            s.status = "deferred" if s.attempts else "waiting"
        elif kind == "message_forced":
            s.next_attempt_at = ts
            s.forced = True
        elif kind == "retries_reset":
            s.attempts = 0
            s.next_attempt_at = ts
            if s.status == "deferred":
                s.status = "waiting"
        elif kind == "delivery_attempted":
            for to in s.recipients:
                if to.address == rcpt:
                    to.state, to.code, to.response, to.host, to.updated_at = result, code, resp, host, ts
                    to.attempts += 1
            s.recipients_delivered = sum(1 for to in s.recipients if to.state == "delivered")
        elif kind == "message_deferred":
            s.attempts += 1
            if next_at is not None:
                s.next_attempt_at = next_at
            s.forced = False
            if s.status != "held":
                s.status = "deferred"
        elif kind == "delay_warned":
            s.warned = True
        elif kind == "scanner_unavailable":
            s.unscanned = True
        s.seq = seq
    lines = [_encode(s) for s in states.values() if s is not None]
    if lines:
        path = scratch / "message_state.jsonl"
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        longest = max(LONGEST, max(len(line) for line in lines) + 1)
        con.execute(PUT, {"path": str(path), "longest": longest})
    con.execute("DROP TABLE IF EXISTS batch")


def _born(log_id: int, mid: str, node: str, seq: int, ts: str, e: Enqueued) -> State:
    addresses = e.recipients if e.recipients is not None else []
    return State(
        log_id=log_id,
        id=mid,
        node=node,
        subspool=_or(e.subspool, ""),
        sender=_or(e.sender, ""),
        recipients=[Recipient(a, "pending", 0, 0, "", "", None) for a in addresses],
        recipients_total=len(addresses),
        recipients_delivered=0,
        size=e.size if e.size is not None else 0,
        received_at=ts,
        priority=_or(e.priority, "normal"),
        status="waiting",
        attempts=0,
        next_attempt_at=ts,
        forced=False,
        source=_or(e.source, "cli"),
        client_ip=_or(e.client_ip, ""),
        helo=_or(e.helo, ""),
        session_id=_or(e.session_id, ""),
        bounce_of=_or(e.bounce_of, ""),
        warned=False,
        unscanned=False,
        seq=seq,
    )


def _or(value: str | None, default: str) -> str:
    """SQL's coalesce: only a missing value (not an empty one) takes the default."""
    return value if value is not None else default
