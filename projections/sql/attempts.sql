-- attempts: every delivery attempt (one `delivery_attempted` record a row),
-- including those of messages that have since left the spool.
CREATE OR REPLACE VIEW attempts AS
SELECT
    node,
    seq,
    attempted_at,
    actor,
    id,
    recipient,
    lower(regexp_extract(recipient, '@([^@]*)$', 1)) AS domain,
    result,
    code,
    response,
    host
FROM attempt_log;
