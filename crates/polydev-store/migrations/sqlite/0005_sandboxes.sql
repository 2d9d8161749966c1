-- Sandboxes: the store is the source of truth the reaper and the
-- reconciler compare the driver against. user_id is NULL while a sandbox
-- waits in a warm pool. Times are Unix milliseconds.
CREATE TABLE sandboxes (
    id          TEXT    PRIMARY KEY NOT NULL,
    user_id     TEXT    REFERENCES users (id) ON DELETE SET NULL,
    template    TEXT    NOT NULL,
    image       TEXT    NOT NULL,
    driver      TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    stages      TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    error       TEXT,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    ended_at    BIGINT
);
CREATE INDEX sandboxes_user_status_idx ON sandboxes (user_id, status);
CREATE INDEX sandboxes_status_idx ON sandboxes (status);
