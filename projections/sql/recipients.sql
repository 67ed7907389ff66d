-- recipients: one row a recipient of a message in the spool now, with its
-- delivery state (pending, delivered, deferred, failed) and the last
-- response it got (code, response, host, updated_at; 0/'' before any).
CREATE OR REPLACE VIEW recipients AS
WITH spread AS (
    SELECT
        node,
        id,
        generate_subscripts(recipients, 1) AS position,
        unnest(recipients) AS r,
        sender,
        received_at,
        status
    FROM message_state
)
SELECT
    node,
    id,
    position,
    r.address AS address,
    lower(regexp_extract(r.address, '@([^@]*)$', 1)) AS domain,
    r.state AS state,
    r.attempts AS attempts,
    r.code AS code,
    r.response AS response,
    r.host AS host,
    r.updated_at AS updated_at,
    sender,
    received_at,
    status AS message_status
FROM spread;
