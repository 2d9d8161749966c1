use polydev_domain::{Email, Role, UserId};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// A user as stored. The password hash stays inside the store crate's
/// callers that verify logins; it is never serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub email: Email,
    pub role: Role,
    pub created_at_ms: i64,
}

/// What `create_user` needs.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: UserId,
    pub email: Email,
    /// A PHC-format password hash, or `None` for token-only users.
    pub password_hash: Option<String>,
    pub role: Role,
    pub created_at_ms: i64,
}

pub(crate) fn user_from_row(row: &AnyRow, prefix: &str) -> Result<User, StoreError> {
    let get = |col: &str| -> Result<String, StoreError> {
        row.try_get::<String, _>(format!("{prefix}{col}").as_str())
            .map_err(StoreError::internal)
    };
    let id = get("id")?;
    let id = UserId::parse("users.id", &id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let email = Email::parse(&get("email")?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let role = get("role")?
        .parse::<Role>()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let created_at_ms = row
        .try_get::<i64, _>(format!("{prefix}created_at").as_str())
        .map_err(StoreError::internal)?;
    Ok(User {
        id,
        email,
        role,
        created_at_ms,
    })
}

impl Store {
    /// Creates a user; `Conflict("email")` when the email is taken.
    pub async fn create_user(&self, new: &NewUser) -> Result<User, StoreError> {
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new.id.to_string())
        .bind(new.email.as_str().to_owned())
        .bind(new.password_hash.clone())
        .bind(new.role.as_str())
        .bind(new.created_at_ms)
        .execute(self.pool())
        .await
        .map_err(StoreError::on_user_insert)?;
        Ok(User {
            id: new.id,
            email: new.email.clone(),
            role: new.role,
            created_at_ms: new.created_at_ms,
        })
    }

    pub async fn user_by_id(&self, id: UserId) -> Result<User, StoreError> {
        let row = sqlx::query("SELECT id, email, role, created_at FROM users WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::internal)?
            .ok_or(StoreError::NotFound)?;
        user_from_row(&row, "")
    }

    /// The user with `email` and their password hash (if they have one).
    pub async fn user_with_password(
        &self,
        email: &Email,
    ) -> Result<(User, Option<String>), StoreError> {
        let row = sqlx::query(
            "SELECT id, email, role, created_at, password_hash FROM users WHERE email = $1",
        )
        .bind(email.as_str().to_owned())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        let hash: Option<String> = row.try_get("password_hash").map_err(StoreError::internal)?;
        Ok((user_from_row(&row, "")?, hash))
    }

    /// Every user, oldest first, in pages.
    pub async fn list_users(&self, limit: i64, offset: i64) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, email, role, created_at FROM users ORDER BY created_at, id LIMIT $1 OFFSET $2",
        )
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        rows.iter().map(|r| user_from_row(r, "")).collect()
    }

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::internal)
    }
}
