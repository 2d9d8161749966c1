-- The zero-knowledge vault: per-user key material (all of it wrapped or
-- public) and encrypted items. The server never holds a key that opens them.
CREATE TABLE vault_keys (
    user_id              TEXT    PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kdf                  TEXT    NOT NULL,
    kdf_salt             BLOB    NOT NULL,
    wrapped_vault_key    BLOB    NOT NULL,
    public_key           BLOB    NOT NULL,
    wrapped_private_key  BLOB    NOT NULL,
    updated_at           BIGINT  NOT NULL
);

CREATE TABLE vault_items (
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    item_id     TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    envelope    BLOB    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (user_id, item_id)
);
