//! Fresh databases for tests: a SQLite file in a temporary directory, or a
//! new PostgreSQL database on the server named by `POLYDEV_TEST_PG_URL`
//! (`scripts/test.sh` installs, starts and exports one). Each is removed
//! when the [`TestDatabase`] is dropped.

use std::path::{Path, PathBuf};

use sqlx::{Connection, Executor};

use crate::{Backend, Store, StoreOptions};

/// The environment variable naming a PostgreSQL server for tests: a URL of
/// a role that may create databases, e.g.
/// `postgres://polydev_test:polydev_test@127.0.0.1:5432/postgres`.
pub const PG_URL_VAR: &str = "POLYDEV_TEST_PG_URL";

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    backend: Backend,
    /// Removed when dropped.
    _tmp: tempfile::TempDir,
    /// The data dir within it (itself unless nested).
    data: PathBuf,
    pg_admin: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::sqlite(),
            Backend::Postgres => Self::postgres().await,
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("create a temp dir for the test database");
        Self {
            url: Store::sqlite_url(dir.path()),
            backend: Backend::Sqlite,
            data: dir.path().to_owned(),
            _tmp: dir,
            pg_admin: None,
        }
    }

    /// SQLite in a data dir `home/.polydev` under a directory of mode 0700
    /// (a checkout in a private home, as root's usually is).
    pub fn sqlite_under_private_parent() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("create a temp dir for the test database");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("create the private parent");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
            .expect("make the parent private");
        let data = home.join(".polydev");
        Self {
            url: Store::sqlite_url(&data),
            backend: Backend::Sqlite,
            data,
            _tmp: dir,
            pg_admin: None,
        }
    }

    /// A new, empty PostgreSQL database. Panics with instructions when no
    /// server is configured: a PostgreSQL test must never pass silently.
    pub async fn postgres() -> Self {
        let admin = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_URL_VAR} is not set: run the tests through scripts/test.sh, which starts PostgreSQL and sets it"
            )
        });
        let name = format!("polydev_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {PG_URL_VAR}: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        let (base, query) = admin.split_once('?').unwrap_or((admin.as_str(), ""));
        let (server, _db) = base
            .rsplit_once('/')
            .filter(|(server, _)| !server.ends_with('/'))
            .unwrap_or_else(|| panic!("{PG_URL_VAR} must end in /<database>"));
        let url = if query.is_empty() {
            format!("{server}/{name}")
        } else {
            format!("{server}/{name}?{query}")
        };
        let dir = tempfile::tempdir().expect("create a temp dir");
        Self {
            url,
            backend: Backend::Postgres,
            data: dir.path().to_owned(),
            _tmp: dir,
            pg_admin: Some((admin, name)),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A scratch directory that lives as long as the database (the data
    /// dir: the SQLite file is inside it on that backend).
    pub fn dir(&self) -> &Path {
        &self.data
    }

    /// The SQLite file, on that backend.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        (self.backend == Backend::Sqlite).then(|| self.data.join("polydev.db"))
    }

    /// A connected store with migrations applied.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url, &StoreOptions::default())
            .await
            .expect("connect to the test database");
        store.migrate().await.expect("migrate the test database");
        store
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg_admin.take() else {
            return;
        };
        // Drop runs outside any async context we can rely on: use a thread
        // with its own small runtime, bounded by a deadline.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            rt.block_on(async move {
                let drop = async {
                    let mut conn = sqlx::PgConnection::connect(&admin).await?;
                    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await?;
                    conn.close().await
                };
                match tokio::time::timeout(std::time::Duration::from_secs(10), drop).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("could not drop test database {name}: {e}"),
                    Err(_) => eprintln!("dropping test database {name} timed out"),
                }
            });
        });
        let _ = handle.join();
    }
}
