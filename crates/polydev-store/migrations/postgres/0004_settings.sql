-- Server-side settings and secrets that must survive restarts (e.g. the
-- key that makes prelogin answers for unknown emails stable).
CREATE TABLE server_settings (
    name   TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL
);
