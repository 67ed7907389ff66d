-- events: every record of every log read, one row a record.
-- The common columns are typed; `payload` is the event itself as JSON
-- (its `type` field repeated), so any field is one `payload->>'name'` away.
-- `id` is the message ID when the payload has one (message and delivery
-- events), else NULL. `recorded_at` is the record's `at`.
CREATE OR REPLACE VIEW events AS
SELECT
    node,
    seq,
    recorded_at,
    actor,
    type,
    id,
    payload,
    segment
FROM events_raw;
