-- sender_shape: qshape -s: messages in the spool by sender domain ('' for
-- the null sender) and age at the report time, with the buckets of
-- spool_shape. One count a message.
CREATE OR REPLACE VIEW sender_shape AS
WITH aged AS (
    SELECT
        lower(regexp_extract(sender, '@([^@]*)$', 1)) AS sender_domain,
        (epoch_us(getvariable('report_time')::TIMESTAMPTZ) - epoch_us(received_at)) / 60e6 AS minutes
    FROM spool
)
SELECT
    sender_domain,
    count(*) AS total,
    count(*) FILTER (WHERE minutes < 5) AS m5,
    count(*) FILTER (WHERE minutes >= 5 AND minutes < 10) AS m10,
    count(*) FILTER (WHERE minutes >= 10 AND minutes < 20) AS m20,
    count(*) FILTER (WHERE minutes >= 20 AND minutes < 40) AS m40,
    count(*) FILTER (WHERE minutes >= 40 AND minutes < 80) AS m80,
    count(*) FILTER (WHERE minutes >= 80 AND minutes < 160) AS m160,
    count(*) FILTER (WHERE minutes >= 160 AND minutes < 320) AS m320,
    count(*) FILTER (WHERE minutes >= 320 AND minutes < 640) AS m640,
    count(*) FILTER (WHERE minutes >= 640 AND minutes < 1280) AS m1280,
    count(*) FILTER (WHERE minutes >= 1280) AS over_1280
FROM aged
GROUP BY sender_domain;
