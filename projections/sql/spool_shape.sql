-- spool_shape: like Postfix's qshape: recipients still to be delivered
-- (pending or deferred) by recipient domain and by the age of their
-- message at the report time, in minutes: m5 is under 5, m10 is 5 to under
-- 10, ... m1280 is 640 to under 1280, over_1280 the rest. Like qshape it
-- counts recipients: a message with two such recipients at one domain
-- counts twice there.
CREATE OR REPLACE VIEW spool_shape AS
WITH aged AS (
    SELECT
        domain,
        (epoch_us(getvariable('report_time')::TIMESTAMPTZ) - epoch_us(received_at)) / 60e6 AS minutes
    FROM recipients
    WHERE state IN ('pending', 'deferred')
)
SELECT
    domain,
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
GROUP BY domain;
