-- Runs: states and timings per provider (no content), and the answers
-- sealed to the user's vault public key (encrypted history: only the
-- user's unlocked vault opens them). Times are Unix milliseconds.
CREATE TABLE runs (
    id           TEXT    PRIMARY KEY NOT NULL,
    user_id      TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    state        TEXT    NOT NULL,
    providers    TEXT    NOT NULL,
    answers      TEXT,
    created_at   BIGINT  NOT NULL,
    finished_at  BIGINT
);
CREATE INDEX runs_user_created_idx ON runs (user_id, created_at);
