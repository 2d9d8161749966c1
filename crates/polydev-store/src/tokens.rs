use polydev_domain::UserId;
use sqlx::Row;
use uuid::Uuid;

use crate::users::user_from_row;
use crate::{Store, StoreError, User};

/// Why a bearer credential exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Long-lived, made by `polydev user add` or the API.
    Api,
    /// Made by a password login; expires.
    Session,
}

impl TokenKind {
    fn as_str(&self) -> &'static str {
        match self {
            TokenKind::Api => "api",
            TokenKind::Session => "session",
        }
    }

    fn parse(value: &str) -> Result<Self, StoreError> {
        match value {
            "api" => Ok(TokenKind::Api),
            "session" => Ok(TokenKind::Session),
            other => Err(StoreError::Corrupt(format!("unknown token kind {other:?}"))),
        }
    }
}

/// A token to store. Only its hash is kept: the plaintext is shown once.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub user_id: UserId,
    pub kind: TokenKind,
    /// Hex SHA-256 of the token (tokens are 256-bit random, so a fast hash
    /// is enough: there is nothing to brute-force).
    pub token_hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

/// Who a presented token belongs to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub token_id: Uuid,
    pub kind: TokenKind,
    pub user: User,
}

impl Store {
    /// Stores a token; `NotFound` when the user does not exist.
    pub async fn create_token(&self, new: &NewToken) -> Result<Uuid, StoreError> {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO api_tokens (id, user_id, kind, token_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.to_string())
        .bind(new.user_id.to_string())
        .bind(new.kind.as_str())
        .bind(new.token_hash.clone())
        .bind(new.created_at_ms)
        .bind(new.expires_at_ms)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::on_write(e, "token"))?;
        Ok(id)
    }

    /// The owner of an unexpired token with this hash.
    pub async fn token_owner(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<TokenOwner, StoreError> {
        let row = sqlx::query(
            "SELECT t.id AS token_id, t.kind AS token_kind, \
                    u.id AS u_id, u.email AS u_email, u.role AS u_role, u.created_at AS u_created_at \
             FROM api_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.token_hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
        )
        .bind(token_hash.to_owned())
        .bind(now_ms)
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        let token_id: String = row.try_get("token_id").map_err(StoreError::internal)?;
        let token_id = Uuid::parse_str(&token_id)
            .map_err(|_| StoreError::Corrupt("token id is not a UUID".into()))?;
        let kind: String = row.try_get("token_kind").map_err(StoreError::internal)?;
        Ok(TokenOwner {
            token_id,
            kind: TokenKind::parse(&kind)?,
            user: user_from_row(&row, "u_")?,
        })
    }

    /// Revokes the token with this hash; `NotFound` when there is none.
    pub async fn delete_token(&self, token_hash: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE token_hash = $1")
            .bind(token_hash.to_owned())
            .execute(self.pool())
            .await
            .map_err(StoreError::internal)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Signs a user out everywhere but `keep_hash` (after a password change).
    pub async fn delete_other_sessions(
        &self,
        user: UserId,
        keep_hash: &str,
    ) -> Result<u64, StoreError> {
        sqlx::query(
            "DELETE FROM api_tokens WHERE user_id = $1 AND kind = 'session' AND token_hash <> $2",
        )
        .bind(user.to_string())
        .bind(keep_hash.to_owned())
        .execute(self.pool())
        .await
        .map(|r| r.rows_affected())
        .map_err(StoreError::internal)
    }

    /// Removes expired tokens; returns how many.
    pub async fn delete_expired_tokens(&self, now_ms: i64) -> Result<u64, StoreError> {
        sqlx::query("DELETE FROM api_tokens WHERE expires_at IS NOT NULL AND expires_at <= $1")
            .bind(now_ms)
            .execute(self.pool())
            .await
            .map(|r| r.rows_affected())
            .map_err(StoreError::internal)
    }
}
