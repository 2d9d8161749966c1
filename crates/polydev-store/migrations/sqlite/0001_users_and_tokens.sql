-- Users and their credentials (API tokens and web-login sessions).
-- Ids are UUID text; times are unix milliseconds.
CREATE TABLE users (
    id            TEXT    PRIMARY KEY NOT NULL,
    email         TEXT    NOT NULL,
    password_hash TEXT,
    role          TEXT    NOT NULL CHECK (role IN ('user', 'admin')),
    created_at    BIGINT  NOT NULL,
    CONSTRAINT users_email_key UNIQUE (email)
);

CREATE TABLE api_tokens (
    id          TEXT    PRIMARY KEY NOT NULL,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL CHECK (kind IN ('api', 'session')),
    token_hash  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT,
    CONSTRAINT api_tokens_hash_key UNIQUE (token_hash)
);

CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);
