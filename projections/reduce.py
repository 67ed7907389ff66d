"""Folding the staged records (`batch`) into the state tables, in SQL, set-based.

The semantics are `spoolfs.state.apply`, applied per message (log, id) in
seq order; only the records of this catch-up are read (the temporary table
`batch`, see `projections.load`). Per message touched by them:

- the last "life" record decides where to start: message_enqueued starts a
  fresh state (records before it are moot); message_deleted,
  moved_to_corrupt, message_finished and spool_repaired(action=forgotten)
  remove the message, and records after a removal are ignored, as `apply`
  ignores records of a message it does not know; without a life record the
  stored state carries on;
- the records after that update it: priority is the last priority_set;
  "held" is decided by the last of held/released; when not held, the status
  is decided by the last of released (deferred if attempts, else waiting),
  retries_reset (waiting) and message_deferred (deferred); attempts counts
  the message_deferred after the last retries_reset (added to the old count
  when there is none); next_attempt_at is the last of forced/reset (record
  time) and deferred (its next_attempt_at); forced is the last of forced
  (true) and deferred (false); warned (delay_warned) and unscanned
  (scanner_unavailable) are sticky; seq is the last state-changing record's;
- each delivery_attempted updates the recipient(s) with that address: the
  last result, code, response, host and time; attempts += count. Every
  delivery_attempted is also kept in attempt_log.

The row of each touched message is taken out of `message_state` (one
DELETE ... RETURNING pass) and written again whole, recipients included
(a list column), so the table only ever sees deletes and appends (cheap in
DuckDB, also for a rebuild of millions of records) and is scanned once a
catch-up.

Failure rules: none of its own; a duckdb.Error propagates to the caller,
whose transaction then rolls back (nothing is half-applied).
"""

from __future__ import annotations

import duckdb

from projections.load import field

LIFE = "('message_enqueued', 'message_deleted', 'moved_to_corrupt', 'message_finished', 'spool_repaired')"
CHANGE = (
    "('priority_set', 'message_held', 'message_released', 'message_forced', 'retries_reset', "
    "'delivery_attempted', 'message_deferred', 'delay_warned', 'scanner_unavailable')"
)
ENQUEUED = (
    '{"sender": "VARCHAR", "recipients": ["VARCHAR"], "size": "BIGINT", "subspool": "VARCHAR", '
    '"priority": "VARCHAR", "source": "VARCHAR", "client_ip": "VARCHAR", "helo": "VARCHAR", '
    '"session_id": "VARCHAR", "bounce_of": "VARCHAR"}'
)
# a delivery_attempted row of `batch`, typed (the columns of attempt_log)
ATTEMPT = f"""log_id, node, seq, ts AS attempted_at, actor, {field("id")} AS id,
    coalesce({field("recipient")}, '') AS recipient, coalesce({field("result")}, '') AS result,
    coalesce(TRY_CAST({field("code")} AS INTEGER), 0) AS code, coalesce({field("response")}, '') AS response,
    coalesce({field("host")}, '') AS host"""
ON_MESSAGE = "ON {a}.log_id = {b}.log_id AND {a}.id = {b}.id"
STATE_COLUMNS = (
    "log_id, id, node, subspool, sender, recipients, recipients_total, recipients_delivered, size, "
    "received_at, priority, status, attempts, next_attempt_at, forced, source, client_ip, helo, "
    "session_id, bounce_of, warned, unscanned, seq"
)

# the new delivery attempts, typed
ATTEMPTS = f"""
INSERT INTO attempt_log (log_id, node, seq, attempted_at, actor, id, recipient, result, code, response, host)
SELECT {ATTEMPT} FROM batch WHERE {field("type")} = 'delivery_attempted' AND {field("id")} IS NOT NULL
"""

STEPS = [
    # the new records of messages, with the few fields the fold needs
    f"""
    CREATE OR REPLACE TEMP TABLE mev AS
    SELECT log_id, id, seq, ts, type, priority, next_at::TIMESTAMPTZ AS next_at
    FROM (
        SELECT log_id, seq, ts, {field("type")} AS type, {field("id")} AS id,
            CASE WHEN {field("type")} = 'priority_set' THEN {field("priority")} END AS priority,
            CASE WHEN {field("type")} = 'message_deferred' THEN {field("next_attempt_at")} END AS next_at,
            {field("action")} AS action
        FROM batch
    )
    WHERE id IS NOT NULL
      AND (type IN {CHANGE} OR type IN {LIFE})
      AND (type <> 'spool_repaired' OR action = 'forgotten')
    """,
    ATTEMPTS,
    # the last life record of each message
    f"""
    CREATE OR REPLACE TEMP TABLE life AS
    SELECT log_id, id, arg_max(type, seq) AS kind, max(seq) AS seq
    FROM mev
    WHERE type IN {LIFE}
    GROUP BY log_id, id
    """,
    # the stored state of every message touched, taken out of the table in the same pass
    """
    CREATE OR REPLACE TEMP TABLE old AS
    WITH taken AS (
        DELETE FROM message_state AS m USING (SELECT DISTINCT log_id, id FROM mev) AS t
        WHERE m.log_id = t.log_id AND m.id = t.id
        RETURNING m.*
    )
    SELECT * FROM taken
    """,
    # ... and written back, with what happened to it since
    f"""
    INSERT INTO message_state ({STATE_COLUMNS})
    WITH born AS (
        SELECT b.log_id, {field("id", "b")} AS id, b.node, b.seq, b.ts, json_transform(b.payload, '{ENQUEUED}') AS e
        FROM batch AS b
        JOIN life AS l ON b.log_id = l.log_id AND b.seq = l.seq
        WHERE {field("type", "b")} = 'message_enqueued' AND l.kind = 'message_enqueued'
    ),
    base AS (
        SELECT o.*, NULL::VARCHAR[] AS addresses
        FROM old AS o ANTI JOIN life AS l {ON_MESSAGE.format(a="o", b="l")}
        UNION ALL BY NAME
        SELECT log_id, id, node, coalesce(e.subspool, '') AS subspool, coalesce(e.sender, '') AS sender,
            coalesce(e.recipients, []) AS addresses, NULL AS recipients,
            coalesce(len(e.recipients), 0) AS recipients_total, 0 AS recipients_delivered,
            coalesce(e.size, 0) AS size, ts AS received_at, coalesce(e.priority, 'normal') AS priority,
            'waiting' AS status, 0 AS attempts, ts AS next_attempt_at, false AS forced,
            coalesce(e.source, 'cli') AS source, coalesce(e.client_ip, '') AS client_ip,
            coalesce(e.helo, '') AS helo, coalesce(e.session_id, '') AS session_id,
            coalesce(e.bounce_of, '') AS bounce_of, false AS warned, false AS unscanned, seq
        FROM born
    ),
    tail AS (
        SELECT e.*
        FROM mev AS e
        LEFT JOIN life AS l {ON_MESSAGE.format(a="e", b="l")}
        WHERE (l.seq IS NULL OR e.seq > l.seq) AND e.type IN {CHANGE}
    ),
    resets AS (
        SELECT log_id, id, max(seq) AS reset_seq FROM tail WHERE type = 'retries_reset' GROUP BY log_id, id
    ),
    delta AS (
        SELECT t.log_id, t.id,
            max(t.seq) AS seq,
            arg_max(t.priority, t.seq) FILTER (WHERE t.type = 'priority_set') AS priority,
            arg_max(t.type = 'message_held', t.seq)
                FILTER (WHERE t.type IN ('message_held', 'message_released')) AS held,
            arg_max(t.type, t.seq)
                FILTER (WHERE t.type IN ('message_released', 'retries_reset', 'message_deferred')) AS last_move,
            any_value(r.reset_seq) AS reset_seq,
            count(*) FILTER (WHERE t.type = 'message_deferred' AND t.seq > coalesce(r.reset_seq, 0)) AS defers,
            arg_max(CASE WHEN t.type = 'message_deferred' THEN t.next_at ELSE t.ts END, t.seq)
                FILTER (WHERE t.type IN ('message_forced', 'retries_reset', 'message_deferred')) AS next_at,
            arg_max(t.type = 'message_forced', t.seq)
                FILTER (WHERE t.type IN ('message_forced', 'message_deferred')) AS forced,
            bool_or(t.type = 'delay_warned') AS warned,
            bool_or(t.type = 'scanner_unavailable') AS unscanned
        FROM tail AS t
        LEFT JOIN resets AS r {ON_MESSAGE.format(a="t", b="r")}
        GROUP BY t.log_id, t.id
    ),
    rdelta AS (
        SELECT a.log_id, a.id, a.recipient, count(*) AS n,
            arg_max(a.result, a.seq) AS result, arg_max(a.code, a.seq) AS code,
            arg_max(a.response, a.seq) AS response, arg_max(a.host, a.seq) AS host,
            arg_max(a.attempted_at, a.seq) AS ts
        FROM (
            SELECT {ATTEMPT} FROM batch WHERE {field("type")} = 'delivery_attempted' AND {field("id")} IS NOT NULL
        ) AS a
        LEFT JOIN life AS l {ON_MESSAGE.format(a="a", b="l")}
        WHERE l.seq IS NULL OR a.seq > l.seq
        GROUP BY a.log_id, a.id, a.recipient
    ),
    -- per message, what its recipients' last attempts said, by address (attempts: how many)
    replies AS (
        SELECT log_id, id, map_from_entries(list({{'key': recipient, 'value': {{
            'address': recipient, 'state': result, 'attempts': n::INTEGER, 'code': code, 'response': response,
            'host': host, 'updated_at': ts}}}})) AS by_address
        FROM rdelta
        GROUP BY log_id, id
    ),
    counted AS (
        SELECT b.* EXCLUDE (recipients, recipients_delivered, addresses),
            CASE
                WHEN b.addresses IS NOT NULL THEN list_transform(b.addresses, lambda a: coalesce(
                    x.by_address[a],
                    {{'address': a, 'state': 'pending', 'attempts': 0::INTEGER, 'code': 0::INTEGER,
                      'response': '', 'host': '', 'updated_at': NULL::TIMESTAMPTZ}}))
                WHEN x.by_address IS NULL THEN b.recipients
                ELSE list_transform(b.recipients, lambda r: CASE
                    WHEN x.by_address[r.address] IS NULL THEN r
                    ELSE struct_update(x.by_address[r.address],
                        attempts := (r.attempts + x.by_address[r.address].attempts)::INTEGER)
                END)
            END AS recipients,
            b.recipients_delivered,
            x.by_address IS NOT NULL AS recount,
            d.priority AS d_priority, d.held AS d_held, d.last_move, d.next_at, d.forced AS d_forced,
            d.warned AS d_warned, d.unscanned AS d_unscanned, d.seq AS d_seq,
            CASE WHEN d.reset_seq IS NULL THEN b.attempts + coalesce(d.defers, 0) ELSE d.defers END
                AS new_attempts
        FROM base AS b
        LEFT JOIN delta AS d {ON_MESSAGE.format(a="b", b="d")}
        LEFT JOIN replies AS x {ON_MESSAGE.format(a="b", b="x")}
    )
    SELECT log_id, id, node, subspool, sender, recipients, recipients_total,
        CASE WHEN recount THEN len(list_filter(recipients, lambda r: r.state = 'delivered'))
            ELSE recipients_delivered END,
        size, received_at,
        coalesce(d_priority, priority),
        CASE
            WHEN coalesce(d_held, status = 'held') THEN 'held'
            WHEN last_move = 'message_deferred' THEN 'deferred'
            WHEN last_move = 'retries_reset' THEN 'waiting'
            WHEN last_move = 'message_released' THEN CASE WHEN new_attempts > 0 THEN 'deferred' ELSE 'waiting' END
            ELSE status
        END,
        new_attempts,
        coalesce(next_at, next_attempt_at),
        coalesce(d_forced, forced),
        source, client_ip, helo, session_id, bounce_of,
        warned OR coalesce(d_warned, false),
        unscanned OR coalesce(d_unscanned, false),
        greatest(seq, coalesce(d_seq, 0))
    FROM counted
    """,
]

TEMPS = ("batch", "mev", "life", "old")


def fold(con: duckdb.DuckDBPyConnection) -> None:
    """Apply the records staged in `batch` (inside the caller's transaction)."""
    for step in STEPS:
        con.execute(step)
    con.execute("; ".join(f"DROP TABLE IF EXISTS {name}" for name in TEMPS))
