use sqlx::migrate::MigrateError;

/// What can go wrong talking to the store, as callers need to branch on it.
///
/// `Display` never includes the database's own error text (it can quote
/// values and schema); the source is kept for logs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was broken; names the rule, e.g. `email`.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("{0}")]
    BadUrl(String),
    #[error("store unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed")]
    Migration(#[source] MigrateError),
    /// A stored value that this build cannot read (e.g. an unknown role).
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    #[error("store error")]
    Internal(#[source] sqlx::Error),
}

impl StoreError {
    pub(crate) fn unavailable(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(err),
            sqlx::Error::Database(_) => StoreError::Unavailable(err),
            other => StoreError::Internal(other),
        }
    }

    pub(crate) fn internal(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(err)
            }
            sqlx::Error::RowNotFound => StoreError::NotFound,
            other => StoreError::Internal(other),
        }
    }

    /// Maps a write error, turning a unique violation into `Conflict(what)`.
    pub(crate) fn on_write(err: sqlx::Error, what: &'static str) -> Self {
        if let sqlx::Error::Database(db) = &err {
            if db.is_unique_violation() {
                return StoreError::Conflict(what);
            }
            if db.is_foreign_key_violation() {
                return StoreError::NotFound;
            }
        }
        Self::internal(err)
    }

    /// Maps an insert into `users`: which uniqueness rule broke.
    pub(crate) fn on_user_insert(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            if db.is_unique_violation() {
                let email = db.constraint() == Some("users_email_key")
                    || db.message().contains("users.email");
                return StoreError::Conflict(if email { "email" } else { "user id" });
            }
        }
        Self::on_write(err, "email")
    }

    /// True when retrying later may succeed (the store was unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}
