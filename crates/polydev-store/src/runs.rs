use polydev_domain::{RunState, UserId};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// A run as stored. `providers` and `answers` are JSON kept opaque here;
/// `answers` holds only boxes sealed to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: String,
    pub user_id: UserId,
    pub state: RunState,
    pub providers: String,
    pub answers: Option<String>,
    /// The prompt, sealed to the user (base64), if they have vault keys.
    pub prompt: Option<String>,
    /// Workspace runs in `edit` mode: JSON, provider to its diff sealed
    /// to the user (base64). Read by `run` only (`list_runs` leaves it
    /// out: up to a few MiB per run).
    pub diffs: Option<String>,
    /// The providers that have a diff, comma-separated.
    pub diff_providers: Option<String>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

fn record(row: &AnyRow) -> Result<RunRecord, StoreError> {
    let user: String = row.try_get("user_id").map_err(StoreError::internal)?;
    Ok(RunRecord {
        id: row.try_get("id").map_err(StoreError::internal)?,
        user_id: UserId::parse("user_id", &user).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        state: row
            .try_get::<String, _>("state")
            .map_err(StoreError::internal)?
            .parse()
            .map_err(|e: polydev_domain::UnknownState| StoreError::Corrupt(e.to_string()))?,
        providers: row.try_get("providers").map_err(StoreError::internal)?,
        answers: row.try_get("answers").map_err(StoreError::internal)?,
        prompt: row.try_get("prompt").map_err(StoreError::internal)?,
        diffs: row.try_get("diffs").map_err(StoreError::internal)?,
        diff_providers: row
            .try_get("diff_providers")
            .map_err(StoreError::internal)?,
        created_at_ms: row.try_get("created_at").map_err(StoreError::internal)?,
        finished_at_ms: row.try_get("finished_at").map_err(StoreError::internal)?,
    })
}

/// Runs kept per user (older ones are deleted as new ones start): a run
/// stores up to a few MiB of sealed answers, and the disk is shared.
pub const RUNS_KEPT_PER_USER: i64 = 200;

impl Store {
    pub async fn insert_run(&self, r: &RunRecord) -> Result<(), StoreError> {
        // The oldest beyond what is kept go first.
        sqlx::query(
            "DELETE FROM runs WHERE user_id = $1 AND id NOT IN (SELECT id FROM runs WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2)",
        )
        .bind(r.user_id.to_string())
        .bind(RUNS_KEPT_PER_USER - 1)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "run"))?;
        sqlx::query(
            "INSERT INTO runs (id, user_id, state, providers, answers, created_at, finished_at, prompt) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(r.id.clone())
        .bind(r.user_id.to_string())
        .bind(r.state.as_str().to_owned())
        .bind(r.providers.clone())
        .bind(r.answers.clone())
        .bind(r.created_at_ms)
        .bind(r.finished_at_ms)
        .bind(r.prompt.clone())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "run"))?;
        Ok(())
    }

    pub async fn update_run(
        &self,
        id: &str,
        state: RunState,
        providers: &str,
        answers: Option<&str>,
        diffs: Option<(&str, &str)>,
        finished_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE runs SET state = $1, providers = $2, answers = COALESCE($3, answers), diffs = COALESCE($4, diffs), diff_providers = COALESCE($5, diff_providers), finished_at = COALESCE($6, finished_at) WHERE id = $7",
        )
        .bind(state.as_str().to_owned())
        .bind(providers.to_owned())
        .bind(answers.map(str::to_owned))
        .bind(diffs.map(|d| d.0.to_owned()))
        .bind(diffs.map(|d| d.1.to_owned()))
        .bind(finished_at_ms)
        .bind(id.to_owned())
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "run"))?;
        Ok(())
    }

    /// Counts one more run for `user` on UTC day `day` if fewer than
    /// `limit` (at least 1) are counted; the count after, or `None` at the
    /// limit (one statement: concurrent starts cannot both take the last
    /// place).
    pub async fn take_run_quota(
        &self,
        user: UserId,
        day: i64,
        limit: i64,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO run_quota (user_id, day, count) VALUES ($1, $2, 1) ON CONFLICT (user_id, day) DO UPDATE SET count = run_quota.count + 1 WHERE run_quota.count < $3 RETURNING count",
        )
        .bind(user.to_string())
        .bind(day)
        .bind(limit)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "run quota"))?;
        match row {
            Some(r) => Ok(Some(r.try_get("count").map_err(StoreError::internal)?)),
            None => Ok(None),
        }
    }

    /// A user's runs, newest first.
    pub async fn list_runs(&self, user: UserId, limit: i64) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, user_id, state, providers, answers, created_at, finished_at, prompt, CAST(NULL AS TEXT) AS diffs, diff_providers FROM runs WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2",
        )
        .bind(user.to_string())
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        rows.iter().map(record).collect()
    }

    /// One run of `user` (`NotFound` for another user's, as if absent).
    pub async fn run(&self, user: UserId, id: &str) -> Result<RunRecord, StoreError> {
        let row = sqlx::query(
            "SELECT id, user_id, state, providers, answers, created_at, finished_at, prompt, diffs, diff_providers FROM runs WHERE id = $1 AND user_id = $2",
        )
        .bind(id.to_owned())
        .bind(user.to_string())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        record(&row)
    }
}
