-- quarantine: one row a message in quarantine now (spam or virus): the keys
-- of `spool quarantine list --json` first, then the verdict flattened.
-- remove_at is capped at 30 days, as the purge does; age_seconds is measured
-- at the report time (variable `report_time`).
CREATE OR REPLACE VIEW quarantine AS
WITH latest AS (
    SELECT * FROM events_raw
    WHERE type IN ('message_quarantined', 'quarantine_deleted', 'quarantine_purged', 'quarantine_resent')
    QUALIFY row_number() OVER (PARTITION BY log_id, id ORDER BY seq DESC) = 1
)
SELECT
    id,
    payload->>'kind' AS kind,
    recorded_at AS quarantined_at,
    payload->>'sender' AS sender,
    CAST(payload->'recipients' AS VARCHAR[]) AS recipients,
    CAST(payload->>'size' AS BIGINT) AS size,
    least(CAST(payload->>'remove_at' AS TIMESTAMPTZ), recorded_at + INTERVAL 30 DAY) AS remove_at,
    payload->'verdict' AS verdict,
    coalesce(payload->'verdict'->>'virus', '') AS virus,
    coalesce(CAST(payload->'verdict'->>'score' AS DOUBLE), 0) AS score,
    coalesce(CAST(payload->'verdict'->>'threshold' AS DOUBLE), 0) AS threshold,
    coalesce(CAST(payload->'verdict'->'rules' AS VARCHAR[]), []) AS rules,
    len(CAST(payload->'recipients' AS VARCHAR[])) AS recipients_total,
    coalesce(payload->>'source', 'smtp') AS source,
    coalesce(payload->>'client_ip', '') AS client_ip,
    node,
    seq,
    (epoch_us(getvariable('report_time')::TIMESTAMPTZ) - epoch_us(recorded_at)) // 1000000 AS age_seconds
FROM latest
WHERE type = 'message_quarantined';
