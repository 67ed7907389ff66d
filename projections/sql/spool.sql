-- spool: one row a message in the spool now: every column of
-- `spool list --json` (status is waiting, deferred or held: "delivering"
-- is a live claim, not an event), then the rest of the sidecar.
-- age_seconds is measured at the report time (variable `report_time`).
CREATE OR REPLACE VIEW spool AS
SELECT
    id,
    subspool,
    sender,
    recipients_delivered,
    recipients_total,
    size,
    attempts,
    received_at,
    priority,
    status,
    next_attempt_at,
    node,
    forced,
    source,
    client_ip,
    helo,
    session_id,
    bounce_of,
    warned,
    unscanned,
    seq,
    (epoch_us(getvariable('report_time')::TIMESTAMPTZ) - epoch_us(received_at)) // 1000000 AS age_seconds
FROM message_state;
