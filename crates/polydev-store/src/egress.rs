use polydev_domain::UserId;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// A proxy credential as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressCredential {
    pub username: String,
    pub secret_hash: String,
    pub user_id: UserId,
    pub sandbox_id: String,
    pub template: String,
    pub created_at_ms: i64,
}

/// Bytes and counts to add to a (user, sandbox) total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub user_id: UserId,
    pub sandbox_id: String,
    pub bytes_up: i64,
    pub bytes_down: i64,
    pub requests: i64,
    pub tunnels: i64,
}

/// A (user, sandbox) total as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub sandbox_id: String,
    pub bytes_up: i64,
    pub bytes_down: i64,
    pub requests: i64,
    pub tunnels: i64,
    pub updated_at_ms: i64,
}

fn user_id(row: &AnyRow) -> Result<UserId, StoreError> {
    let id: String = row.try_get("user_id").map_err(StoreError::internal)?;
    UserId::parse("user_id", &id).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Stores a new credential; `NotFound` when the user does not exist.
    pub async fn create_egress_credential(&self, c: &EgressCredential) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO egress_credentials (username, secret_hash, user_id, sandbox_id, template, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(c.username.clone())
        .bind(c.secret_hash.clone())
        .bind(c.user_id.to_string())
        .bind(c.sandbox_id.clone())
        .bind(c.template.clone())
        .bind(c.created_at_ms)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "egress credential"))?;
        Ok(())
    }

    /// The live (unrevoked) credential with this username.
    pub async fn egress_credential(&self, username: &str) -> Result<EgressCredential, StoreError> {
        let row = sqlx::query(
            "SELECT username, secret_hash, user_id, sandbox_id, template, created_at FROM egress_credentials WHERE username = $1 AND revoked_at IS NULL",
        )
        .bind(username.to_owned())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        let get = |c: &str| row.try_get::<String, _>(c).map_err(StoreError::internal);
        Ok(EgressCredential {
            username: get("username")?,
            secret_hash: get("secret_hash")?,
            user_id: user_id(&row)?,
            sandbox_id: get("sandbox_id")?,
            template: get("template")?,
            created_at_ms: row.try_get("created_at").map_err(StoreError::internal)?,
        })
    }

    /// Usernames of a sandbox's live (unrevoked) credentials.
    pub async fn live_egress_credentials_of_sandbox(
        &self,
        sandbox_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT username FROM egress_credentials WHERE sandbox_id = $1 AND revoked_at IS NULL ORDER BY username",
        )
        .bind(sandbox_id.to_owned())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)
    }

    /// Revokes one credential; `NotFound` when there is no live one.
    pub async fn revoke_egress_credential(
        &self,
        username: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE egress_credentials SET revoked_at = $1 WHERE username = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms)
        .bind(username.to_owned())
        .execute(self.pool())
        .await
        .map_err(StoreError::internal)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Revokes every credential of a sandbox (when it ends); returns the
    /// usernames revoked.
    pub async fn revoke_egress_credentials_of_sandbox(
        &self,
        sandbox_id: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT username FROM egress_credentials WHERE sandbox_id = $1 AND revoked_at IS NULL",
        )
        .bind(sandbox_id.to_owned())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        sqlx::query("UPDATE egress_credentials SET revoked_at = $1 WHERE sandbox_id = $2 AND revoked_at IS NULL")
            .bind(now_ms)
            .bind(sandbox_id.to_owned())
            .execute(self.pool())
            .await
            .map_err(StoreError::internal)?;
        Ok(names)
    }

    /// The user's listening port, assigning the lowest free one in
    /// `first..=last` when they have none. `Conflict("port")` when the
    /// range is full.
    pub async fn assign_proxy_port(
        &self,
        user: UserId,
        first: u16,
        last: u16,
        now_ms: i64,
    ) -> Result<u16, StoreError> {
        for _ in 0..8 {
            if let Some(port) =
                sqlx::query_scalar::<_, i64>("SELECT port FROM user_proxy_ports WHERE user_id = $1")
                    .bind(user.to_string())
                    .fetch_optional(self.pool())
                    .await
                    .map_err(StoreError::internal)?
            {
                return u16::try_from(port)
                    .map_err(|_| StoreError::Corrupt(format!("port {port} out of range")));
            }
            let taken: Vec<i64> = sqlx::query_scalar(
                "SELECT port FROM user_proxy_ports WHERE port >= $1 AND port <= $2 ORDER BY port",
            )
            .bind(i64::from(first))
            .bind(i64::from(last))
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::internal)?;
            let taken: std::collections::HashSet<i64> = taken.into_iter().collect();
            let Some(port) = (first..=last).find(|p| !taken.contains(&i64::from(*p))) else {
                // Full: ports of users with no live credential go back to
                // the range (they get one again when they next need it).
                let freed = self.release_idle_proxy_ports(first, last).await?;
                if freed == 0 {
                    return Err(StoreError::Conflict("port"));
                }
                continue;
            };
            match sqlx::query(
                "INSERT INTO user_proxy_ports (user_id, port, created_at) VALUES ($1, $2, $3)",
            )
            .bind(user.to_string())
            .bind(i64::from(port))
            .bind(now_ms)
            .execute(self.pool())
            .await
            .map_err(|e| StoreError::on_write(e, "port"))
            {
                Ok(_) => return Ok(port),
                // Another writer took this port or assigned this user: look again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict("port"))
    }

    /// Releases the ports in `first..=last` of users who hold no live
    /// egress credential; returns how many.
    pub async fn release_idle_proxy_ports(&self, first: u16, last: u16) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM user_proxy_ports WHERE port >= $1 AND port <= $2 AND user_id NOT IN (SELECT user_id FROM egress_credentials WHERE revoked_at IS NULL)",
        )
        .bind(i64::from(first))
        .bind(i64::from(last))
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "port"))?;
        Ok(done.rows_affected())
    }

    /// Every assigned port.
    pub async fn proxy_ports(&self) -> Result<Vec<(UserId, u16)>, StoreError> {
        let rows = sqlx::query("SELECT user_id, port FROM user_proxy_ports ORDER BY port")
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::internal)?;
        rows.iter()
            .map(|r| {
                let port: i64 = r.try_get("port").map_err(StoreError::internal)?;
                let port = u16::try_from(port)
                    .map_err(|_| StoreError::Corrupt(format!("port {port} out of range")))?;
                Ok((user_id(r)?, port))
            })
            .collect()
    }

    /// Adds usage deltas, all or none.
    pub async fn add_egress_usage(
        &self,
        deltas: &[UsageDelta],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await.map_err(StoreError::internal)?;
        for d in deltas {
            sqlx::query(
                "INSERT INTO egress_usage (user_id, sandbox_id, bytes_up, bytes_down, requests, tunnels, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (user_id, sandbox_id) DO UPDATE SET \
                   bytes_up = egress_usage.bytes_up + excluded.bytes_up, \
                   bytes_down = egress_usage.bytes_down + excluded.bytes_down, \
                   requests = egress_usage.requests + excluded.requests, \
                   tunnels = egress_usage.tunnels + excluded.tunnels, \
                   updated_at = excluded.updated_at",
            )
            .bind(d.user_id.to_string())
            .bind(d.sandbox_id.clone())
            .bind(d.bytes_up)
            .bind(d.bytes_down)
            .bind(d.requests)
            .bind(d.tunnels)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::on_write(e, "usage"))?;
        }
        tx.commit().await.map_err(StoreError::internal)
    }

    /// A user's totals per sandbox, newest first.
    pub async fn egress_usage(&self, user: UserId) -> Result<Vec<Usage>, StoreError> {
        let rows = sqlx::query(
            "SELECT sandbox_id, bytes_up, bytes_down, requests, tunnels, updated_at FROM egress_usage WHERE user_id = $1 ORDER BY updated_at DESC, sandbox_id",
        )
        .bind(user.to_string())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        rows.iter()
            .map(|r| {
                let i = |c: &str| r.try_get::<i64, _>(c).map_err(StoreError::internal);
                Ok(Usage {
                    sandbox_id: r.try_get("sandbox_id").map_err(StoreError::internal)?,
                    bytes_up: i("bytes_up")?,
                    bytes_down: i("bytes_down")?,
                    requests: i("requests")?,
                    tunnels: i("tunnels")?,
                    updated_at_ms: i("updated_at")?,
                })
            })
            .collect()
    }
}
