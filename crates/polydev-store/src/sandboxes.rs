use polydev_domain::{SandboxStatus, UserId};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// Statuses that hold a live sandbox (the others are final).
pub const LIVE_STATUSES: [&str; 3] = ["creating", "pooled", "ready"];

/// A sandbox record. `stages`, `spec` and `error` are JSON kept opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub user_id: Option<UserId>,
    pub template: String,
    pub image: String,
    pub driver: String,
    pub status: SandboxStatus,
    pub stages: String,
    pub spec: String,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub ended_at_ms: Option<i64>,
}

const COLUMNS: &str = "id, user_id, template, image, driver, status, stages, spec, error, created_at, expires_at, ended_at";

fn record(row: &AnyRow) -> Result<SandboxRecord, StoreError> {
    let get = |c: &str| row.try_get::<String, _>(c).map_err(StoreError::internal);
    let user: Option<String> = row.try_get("user_id").map_err(StoreError::internal)?;
    Ok(SandboxRecord {
        id: get("id")?,
        user_id: user
            .map(|u| UserId::parse("user_id", &u).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()?,
        template: get("template")?,
        image: get("image")?,
        driver: get("driver")?,
        status: get("status")?
            .parse()
            .map_err(|e: polydev_domain::UnknownState| StoreError::Corrupt(e.to_string()))?,
        stages: get("stages")?,
        spec: get("spec")?,
        error: row.try_get("error").map_err(StoreError::internal)?,
        created_at_ms: row.try_get("created_at").map_err(StoreError::internal)?,
        expires_at_ms: row.try_get("expires_at").map_err(StoreError::internal)?,
        ended_at_ms: row.try_get("ended_at").map_err(StoreError::internal)?,
    })
}

impl Store {
    pub async fn insert_sandbox(&self, r: &SandboxRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO sandboxes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(r.id.clone())
        .bind(r.user_id.map(|u| u.to_string()))
        .bind(r.template.clone())
        .bind(r.image.clone())
        .bind(r.driver.clone())
        .bind(r.status.as_str().to_owned())
        .bind(r.stages.clone())
        .bind(r.spec.clone())
        .bind(r.error.clone())
        .bind(r.created_at_ms)
        .bind(r.expires_at_ms)
        .bind(r.ended_at_ms)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "sandbox"))?;
        Ok(())
    }

    pub async fn sandbox(&self, id: &str) -> Result<SandboxRecord, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = $1"))
            .bind(id.to_owned())
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::internal)?
            .ok_or(StoreError::NotFound)?;
        record(&row)
    }

    /// Live sandboxes (all users and pools), oldest first.
    pub async fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE status IN ('creating', 'pooled', 'ready') ORDER BY created_at"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        rows.iter().map(record).collect()
    }

    /// A user's sandboxes (or everyone's), newest first, at most `limit`.
    pub async fn list_sandboxes(
        &self,
        user: Option<UserId>,
        limit: i64,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let (sql, user) = match user {
            Some(u) => (
                format!("SELECT {COLUMNS} FROM sandboxes WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2"),
                Some(u.to_string()),
            ),
            None => (
                format!("SELECT {COLUMNS} FROM sandboxes WHERE status <> 'pooled' ORDER BY created_at DESC LIMIT $1"),
                None,
            ),
        };
        let mut q = sqlx::query(&sql);
        if let Some(u) = user {
            q = q.bind(u);
        }
        let rows = q
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::internal)?;
        rows.iter().map(record).collect()
    }

    pub async fn count_live_sandboxes(&self, user: UserId) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE user_id = $1 AND status IN ('creating', 'ready')",
        )
        .bind(user.to_string())
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::internal)?;
        row.try_get("n").map_err(StoreError::internal)
    }

    /// Moves a sandbox to `status`, optionally recording stages, an error
    /// and the end time. Final statuses are never left again: a record
    /// already `failed`, `ended` or `lost` is not changed (returns false).
    pub async fn set_sandbox_status(
        &self,
        id: &str,
        status: SandboxStatus,
        stages: Option<&str>,
        error: Option<&str>,
        ended_at_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET status = $1, stages = COALESCE($2, stages), error = COALESCE($3, error), ended_at = COALESCE($4, ended_at) WHERE id = $5 AND status IN ('creating', 'pooled', 'ready')",
        )
        .bind(status.as_str().to_owned())
        .bind(stages.map(str::to_owned))
        .bind(error.map(str::to_owned))
        .bind(ended_at_ms)
        .bind(id.to_owned())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "sandbox"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Hands a pooled sandbox to a user (false if it was no longer pooled).
    pub async fn assign_sandbox(
        &self,
        id: &str,
        user: UserId,
        spec: &str,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET user_id = $1, status = 'ready', spec = $2, expires_at = $3 WHERE id = $4 AND status = 'pooled'",
        )
        .bind(user.to_string())
        .bind(spec.to_owned())
        .bind(expires_at_ms)
        .bind(id.to_owned())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "sandbox"))?;
        Ok(done.rows_affected() == 1)
    }
}
