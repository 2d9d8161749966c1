//! polydev's persistence: SQLite (embedded, the default) and PostgreSQL
//! behind one [`Store`].
//!
//! One set of queries runs on both backends through sqlx's `Any` driver; the
//! schema lives in one migration directory per backend (`migrations/sqlite`,
//! `migrations/postgres`) with the same versions, because column types differ
//! between the two as the schema grows. Migrations are applied in order, each
//! in its own transaction, and recorded by version in `_sqlx_migrations`.
//!
//! Invariants:
//! - No raw database error text leaves this crate in a [`StoreError`]'s
//!   `Display`; callers branch on the variant.
//! - Ids are stored as UUID text and times as unix milliseconds on both
//!   backends, so rows read back identically.

mod egress;
mod error;
mod logins;
mod runs;
mod sandboxes;
#[cfg(feature = "test-support")]
pub mod testing;
mod tokens;
mod users;
mod vault;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

pub use egress::{EgressCredential, Usage, UsageDelta};
pub use error::StoreError;
pub use logins::LoginRecord;
pub use runs::RunRecord;
pub use sandboxes::{SandboxRecord, LIVE_STATUSES};
pub use tokens::{NewToken, TokenKind, TokenOwner};
pub use users::{NewUser, User};
pub use vault::{VaultItem, VaultItemMeta, VaultKeys};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn migrator(&self) -> &'static Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// How to reach the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Deadline for getting a connection (and for the first connect).
    pub acquire_timeout: Duration,
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// The persistence handle shared by the whole controller. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// One applied migration, as `polydev migrate` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
}

impl Store {
    /// The SQLite URL for the database file inside `data_dir`.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("polydev.db").display()
        )
    }

    /// Connects to `url` (`sqlite://…` or `postgres://…`). Does not migrate.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(
                "database URL must start with sqlite:// or postgres://".into(),
            ));
        };
        let connect_options = AnyConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("database URL is not valid: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                // SQLite has one writer; a few readers beside it is plenty.
                Backend::Sqlite => options.max_connections.min(8),
                Backend::Postgres => options.max_connections,
            })
            .acquire_timeout(options.acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect_options)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(Self { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies every pending migration; returns the ones applied now.
    pub async fn migrate(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        let before = self.applied_versions().await?;
        self.backend
            .migrator()
            .run(&self.pool)
            .await
            .map_err(StoreError::Migration)?;
        let applied = self
            .backend
            .migrator()
            .iter()
            .filter(|m| !before.contains(&m.version))
            .map(|m| MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
            })
            .collect();
        Ok(applied)
    }

    /// Applies the migrations in `dir` (one backend's directory, e.g. a
    /// release bundle's). Each runs in its own transaction, so a failing one
    /// leaves the schema at the version before it.
    pub async fn migrate_dir(
        &self,
        dir: &std::path::Path,
    ) -> Result<Vec<MigrationInfo>, StoreError> {
        let before = self.applied_versions().await?;
        let migrator = sqlx::migrate::Migrator::new(dir.to_owned())
            .await
            .map_err(StoreError::Migration)?;
        migrator
            .run(&self.pool)
            .await
            .map_err(StoreError::Migration)?;
        Ok(migrator
            .iter()
            .filter(|m| !before.contains(&m.version))
            .map(|m| MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
            })
            .collect())
    }

    /// Versions recorded as applied (empty on a fresh database).
    pub async fn applied_versions(&self) -> Result<Vec<i64>, StoreError> {
        let exists: Option<i64> = match self.backend {
            Backend::Sqlite => sqlx::query_scalar(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            ),
            Backend::Postgres => sqlx::query_scalar(
                "SELECT 1::BIGINT FROM information_schema.tables WHERE table_name = '_sqlx_migrations' AND table_schema = current_schema()",
            ),
        }
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::internal)?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::internal)
    }

    /// The latest migration version this build knows.
    pub fn latest_known_version(&self) -> i64 {
        self.backend
            .migrator()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0)
    }

    /// Readiness: the store answers a trivial query within its deadline.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::unavailable)
    }

    /// Closes every connection; waits for checked-out ones to return.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Milliseconds since the Unix epoch, the store's time unit.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_know_the_same_migration_versions() {
        let versions = |m: &Migrator| m.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(
            versions(&SQLITE_MIGRATIONS),
            versions(&POSTGRES_MIGRATIONS),
            "every migration needs a SQLite and a PostgreSQL version"
        );
    }
}
