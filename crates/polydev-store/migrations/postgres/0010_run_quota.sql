-- Runs started per user per UTC day (the day as days since the Unix
-- epoch), for the daily run limit: counted apart from the runs table,
-- which keeps only a user's latest runs.
CREATE TABLE run_quota (
    user_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (user_id, day)
);
