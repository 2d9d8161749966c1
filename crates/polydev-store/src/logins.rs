use polydev_domain::{LoginState, UserId};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// A login session as stored: states and stage times (`stages` is JSON kept
/// opaque here), never credential material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    pub id: String,
    pub user_id: UserId,
    pub provider: String,
    pub mode: String,
    pub state: LoginState,
    pub stages: String,
    pub error: Option<String>,
    pub sandbox_id: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const COLUMNS: &str =
    "id, user_id, provider, mode, state, stages, error, sandbox_id, created_at, updated_at";

fn record(row: &AnyRow) -> Result<LoginRecord, StoreError> {
    let user: String = row.try_get("user_id").map_err(StoreError::internal)?;
    Ok(LoginRecord {
        id: row.try_get("id").map_err(StoreError::internal)?,
        user_id: UserId::parse("user_id", &user).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        provider: row.try_get("provider").map_err(StoreError::internal)?,
        mode: row.try_get("mode").map_err(StoreError::internal)?,
        state: row
            .try_get::<String, _>("state")
            .map_err(StoreError::internal)?
            .parse()
            .map_err(|e: polydev_domain::UnknownState| StoreError::Corrupt(e.to_string()))?,
        stages: row.try_get("stages").map_err(StoreError::internal)?,
        error: row.try_get("error").map_err(StoreError::internal)?,
        sandbox_id: row.try_get("sandbox_id").map_err(StoreError::internal)?,
        created_at_ms: row.try_get("created_at").map_err(StoreError::internal)?,
        updated_at_ms: row.try_get("updated_at").map_err(StoreError::internal)?,
    })
}

impl Store {
    /// Writes a login session (insert, or update of everything that moves).
    pub async fn save_login_session(&self, r: &LoginRecord) -> Result<(), StoreError> {
        let updated = sqlx::query(
            "UPDATE login_sessions SET state = $1, stages = $2, error = $3, sandbox_id = $4, updated_at = $5 WHERE id = $6",
        )
        .bind(r.state.as_str().to_owned())
        .bind(r.stages.clone())
        .bind(r.error.clone())
        .bind(r.sandbox_id.clone())
        .bind(r.updated_at_ms)
        .bind(r.id.clone())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "login session"))?;
        if updated.rows_affected() > 0 {
            return Ok(());
        }
        sqlx::query(&format!(
            "INSERT INTO login_sessions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(r.id.clone())
        .bind(r.user_id.to_string())
        .bind(r.provider.clone())
        .bind(r.mode.clone())
        .bind(r.state.as_str().to_owned())
        .bind(r.stages.clone())
        .bind(r.error.clone())
        .bind(r.sandbox_id.clone())
        .bind(r.created_at_ms)
        .bind(r.updated_at_ms)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "login session"))?;
        Ok(())
    }

    pub async fn login_session(&self, id: &str) -> Result<LoginRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM login_sessions WHERE id = $1"
        ))
        .bind(id.to_owned())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        record(&row)
    }

    /// Sessions a previous controller left live become `expired`; returns
    /// the sandbox ids they had (for the caller to destroy).
    pub async fn expire_live_login_sessions(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT sandbox_id FROM login_sessions WHERE state IN ('booting', 'ready', 'awaiting_login', 'awaiting_code') AND sandbox_id IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        let sandboxes = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>("sandbox_id").ok())
            .collect();
        sqlx::query(
            "UPDATE login_sessions SET state = 'expired', error = COALESCE(error, 'the controller restarted'), updated_at = $1 WHERE state IN ('booting', 'ready', 'awaiting_login', 'awaiting_code')",
        )
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(StoreError::internal)?;
        Ok(sandboxes)
    }
}
