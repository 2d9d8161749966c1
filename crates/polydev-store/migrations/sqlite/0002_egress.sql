-- Egress proxy: per-sandbox credentials (secret stored hashed), per-user
-- listening ports (v1's user_proxy_ports), and byte/request accounting.
CREATE TABLE egress_credentials (
    username     TEXT    PRIMARY KEY NOT NULL,
    secret_hash  TEXT    NOT NULL,
    user_id      TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sandbox_id   TEXT    NOT NULL,
    template     TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX egress_credentials_sandbox_idx ON egress_credentials (sandbox_id);
CREATE INDEX egress_credentials_user_idx ON egress_credentials (user_id);

CREATE TABLE user_proxy_ports (
    user_id     TEXT    PRIMARY KEY NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    port        INTEGER NOT NULL,
    created_at  BIGINT  NOT NULL,
    CONSTRAINT user_proxy_ports_port_key UNIQUE (port)
);

CREATE TABLE egress_usage (
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sandbox_id  TEXT    NOT NULL,
    bytes_up    BIGINT  NOT NULL DEFAULT 0,
    bytes_down  BIGINT  NOT NULL DEFAULT 0,
    requests    BIGINT  NOT NULL DEFAULT 0,
    tunnels     BIGINT  NOT NULL DEFAULT 0,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (user_id, sandbox_id)
);
