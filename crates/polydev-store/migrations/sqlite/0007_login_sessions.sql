-- Login sessions (a browser sandbox for one provider's CLI login, or a
-- code-relay login without one): state, the stage timestamps as JSON, and
-- why it failed. Never a credential: the captured one goes to the vault,
-- sealed to the user. Kept after the session ends so a client asking for
-- an old id learns it is gone. Times are Unix milliseconds.
CREATE TABLE login_sessions (
    id           TEXT    PRIMARY KEY NOT NULL,
    user_id      TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    provider     TEXT    NOT NULL,
    mode         TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    stages       TEXT    NOT NULL,
    error        TEXT,
    sandbox_id   TEXT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);
CREATE INDEX login_sessions_user_idx ON login_sessions (user_id, created_at);
