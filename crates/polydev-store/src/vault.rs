use polydev_domain::UserId;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// A user's vault key material as stored: wrapped keys, a public key, and
/// the KDF parameters the client needs to re-derive. Nothing here decrypts
/// anything without the user's password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultKeys {
    /// e.g. `pbkdf2-sha256:600000` or `argon2id:19456:2:1`.
    pub kdf: String,
    pub kdf_salt: Vec<u8>,
    pub wrapped_vault_key: Vec<u8>,
    pub public_key: Vec<u8>,
    pub wrapped_private_key: Vec<u8>,
    pub updated_at_ms: i64,
}

/// One encrypted item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultItem {
    pub item_id: String,
    pub version: i64,
    pub envelope: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An item's metadata (what listing shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultItemMeta {
    pub item_id: String,
    pub version: i64,
    pub size: i64,
    pub updated_at_ms: i64,
}

/// The one INSERT of key material, on the pool or inside a transaction.
async fn insert_vault_keys<'e, E>(
    executor: E,
    user: UserId,
    keys: &VaultKeys,
) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO vault_keys (user_id, kdf, kdf_salt, wrapped_vault_key, public_key, wrapped_private_key, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(user.to_string())
    .bind(keys.kdf.clone())
    .bind(keys.kdf_salt.clone())
    .bind(keys.wrapped_vault_key.clone())
    .bind(keys.public_key.clone())
    .bind(keys.wrapped_private_key.clone())
    .bind(keys.updated_at_ms)
    .execute(executor)
    .await
    .map_err(|e| StoreError::on_write(e, "vault keys"))?;
    Ok(())
}

fn keys_from_row(r: &AnyRow) -> Result<VaultKeys, StoreError> {
    let b = |c: &str| r.try_get::<Vec<u8>, _>(c).map_err(StoreError::internal);
    Ok(VaultKeys {
        kdf: r.try_get("kdf").map_err(StoreError::internal)?,
        kdf_salt: b("kdf_salt")?,
        wrapped_vault_key: b("wrapped_vault_key")?,
        public_key: b("public_key")?,
        wrapped_private_key: b("wrapped_private_key")?,
        updated_at_ms: r.try_get("updated_at").map_err(StoreError::internal)?,
    })
}

impl Store {
    /// Sets up a vault for a user who has none (`Conflict` otherwise; a
    /// password change replaces keys through `change_password`).
    pub async fn put_vault_keys(&self, user: UserId, keys: &VaultKeys) -> Result<(), StoreError> {
        insert_vault_keys(self.pool(), user, keys).await
    }

    /// `NotFound` when the user has not set up a vault.
    pub async fn vault_keys(&self, user: UserId) -> Result<VaultKeys, StoreError> {
        let row = sqlx::query(
            "SELECT kdf, kdf_salt, wrapped_vault_key, public_key, wrapped_private_key, updated_at FROM vault_keys WHERE user_id = $1",
        )
        .bind(user.to_string())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        keys_from_row(&row)
    }

    /// Writes an item if its stored version is `expected` (0: must not
    /// exist yet); the new version is `expected + 1`. `Conflict("version")`
    /// otherwise, so concurrent writers never overwrite each other.
    pub async fn put_vault_item(
        &self,
        user: UserId,
        item_id: &str,
        expected: i64,
        envelope: &[u8],
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let next = expected + 1;
        let done = if expected == 0 {
            sqlx::query(
                "INSERT INTO vault_items (user_id, item_id, version, envelope, created_at, updated_at) VALUES ($1, $2, 1, $3, $4, $4)",
            )
            .bind(user.to_string())
            .bind(item_id.to_owned())
            .bind(envelope.to_vec())
            .bind(now_ms)
            .execute(self.pool())
            .await
            .map_err(|e| StoreError::on_write(e, "version"))?
        } else {
            sqlx::query(
                "UPDATE vault_items SET version = $1, envelope = $2, updated_at = $3 WHERE user_id = $4 AND item_id = $5 AND version = $6",
            )
            .bind(next)
            .bind(envelope.to_vec())
            .bind(now_ms)
            .bind(user.to_string())
            .bind(item_id.to_owned())
            .bind(expected)
            .execute(self.pool())
            .await
            .map_err(StoreError::internal)?
        };
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict("version"));
        }
        Ok(next)
    }

    /// Stores `envelope` as the item's next version whatever version is
    /// there (for writers that replace, not merge: a credential the server
    /// relays); retries a few times when a concurrent writer got in first.
    pub async fn replace_vault_item(
        &self,
        user: UserId,
        item_id: &str,
        envelope: &[u8],
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let mut last = StoreError::Conflict("version");
        for _ in 0..3 {
            let expected = match self.vault_item(user, item_id).await {
                Ok(i) => i.version,
                Err(StoreError::NotFound) => 0,
                Err(e) => return Err(e),
            };
            match self
                .put_vault_item(user, item_id, expected, envelope, now_ms)
                .await
            {
                Err(e @ StoreError::Conflict(_)) => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    pub async fn vault_item(&self, user: UserId, item_id: &str) -> Result<VaultItem, StoreError> {
        let r = sqlx::query(
            "SELECT item_id, version, envelope, created_at, updated_at FROM vault_items WHERE user_id = $1 AND item_id = $2",
        )
        .bind(user.to_string())
        .bind(item_id.to_owned())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::internal)?
        .ok_or(StoreError::NotFound)?;
        Ok(VaultItem {
            item_id: r.try_get("item_id").map_err(StoreError::internal)?,
            version: r.try_get("version").map_err(StoreError::internal)?,
            envelope: r.try_get("envelope").map_err(StoreError::internal)?,
            created_at_ms: r.try_get("created_at").map_err(StoreError::internal)?,
            updated_at_ms: r.try_get("updated_at").map_err(StoreError::internal)?,
        })
    }

    /// Deletes an item at `expected` version: `NotFound` when absent,
    /// `Conflict("version")` when it changed meanwhile.
    pub async fn delete_vault_item(
        &self,
        user: UserId,
        item_id: &str,
        expected: i64,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "DELETE FROM vault_items WHERE user_id = $1 AND item_id = $2 AND version = $3",
        )
        .bind(user.to_string())
        .bind(item_id.to_owned())
        .bind(expected)
        .execute(self.pool())
        .await
        .map_err(StoreError::internal)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        match self.vault_item(user, item_id).await {
            Ok(_) => Err(StoreError::Conflict("version")),
            Err(e) => Err(e),
        }
    }

    /// Metadata of a user's items, by id.
    pub async fn vault_items(&self, user: UserId) -> Result<Vec<VaultItemMeta>, StoreError> {
        let rows = sqlx::query(
            "SELECT item_id, version, LENGTH(envelope) AS size, updated_at FROM vault_items WHERE user_id = $1 ORDER BY item_id",
        )
        .bind(user.to_string())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::internal)?;
        rows.iter()
            .map(|r| {
                Ok(VaultItemMeta {
                    item_id: r.try_get("item_id").map_err(StoreError::internal)?,
                    version: r.try_get("version").map_err(StoreError::internal)?,
                    size: r
                        .try_get::<i64, _>("size")
                        .or_else(|_| r.try_get::<i32, _>("size").map(i64::from))
                        .map_err(StoreError::internal)?,
                    updated_at_ms: r.try_get("updated_at").map_err(StoreError::internal)?,
                })
            })
            .collect()
    }
}

impl Store {
    /// A setting's value, creating it with `make()` the first time (the
    /// first writer wins when two race).
    pub async fn setting_or_insert(
        &self,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        if let Some(v) =
            sqlx::query_scalar::<_, String>("SELECT value FROM server_settings WHERE name = $1")
                .bind(name.to_owned())
                .fetch_optional(self.pool())
                .await
                .map_err(StoreError::internal)?
        {
            return Ok(v);
        }
        sqlx::query("INSERT INTO server_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name.to_owned())
            .bind(make())
            .execute(self.pool())
            .await
            .map_err(StoreError::internal)?;
        sqlx::query_scalar("SELECT value FROM server_settings WHERE name = $1")
            .bind(name.to_owned())
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::internal)
    }

    /// Creates a user and their vault key material in one transaction.
    pub async fn create_user_with_vault(
        &self,
        new: &crate::NewUser,
        keys: &VaultKeys,
    ) -> Result<crate::User, StoreError> {
        let mut tx = self.pool().begin().await.map_err(StoreError::internal)?;
        sqlx::query("INSERT INTO users (id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(new.id.to_string())
            .bind(new.email.as_str().to_owned())
            .bind(new.password_hash.clone())
            .bind(new.role.as_str())
            .bind(new.created_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::on_user_insert)?;
        insert_vault_keys(&mut *tx, new.id, keys).await?;
        tx.commit().await.map_err(StoreError::internal)?;
        Ok(crate::User {
            id: new.id,
            email: new.email.clone(),
            role: new.role,
            created_at_ms: new.created_at_ms,
        })
    }

    /// Replaces the password hash and the key material together (password change).
    pub async fn change_password(
        &self,
        user: UserId,
        password_hash: &str,
        keys: &VaultKeys,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await.map_err(StoreError::internal)?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash.to_owned())
            .bind(user.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::internal)?;
        sqlx::query(
            "UPDATE vault_keys SET kdf = $1, kdf_salt = $2, wrapped_vault_key = $3, public_key = $4, wrapped_private_key = $5, updated_at = $6 WHERE user_id = $7",
        )
        .bind(keys.kdf.clone())
        .bind(keys.kdf_salt.clone())
        .bind(keys.wrapped_vault_key.clone())
        .bind(keys.public_key.clone())
        .bind(keys.wrapped_private_key.clone())
        .bind(keys.updated_at_ms)
        .bind(user.to_string())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::internal)?;
        tx.commit().await.map_err(StoreError::internal)
    }
}
