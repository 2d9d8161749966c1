//! The vault's storage API. The server checks that what it stores has the
//! shape of vault data (envelope header, sizes, a valid public key, KDF
//! parameters at or above the floor); it never holds a key that opens it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_store::{now_ms, StoreError, VaultKeys};
use polydev_vault::{KdfParams, Kind, SealingPublicKey, FORMAT_VERSION, MAGIC};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::AppState;

/// Largest item envelope accepted (decoded), bytes.
pub(crate) const MAX_ITEM_BYTES: usize = 256 * 1024;
/// A wrapped 32-byte key: 3-byte header, 12-byte nonce, 32 bytes, 16-byte tag.
const WRAPPED_KEY_LEN: usize = 3 + 12 + 32 + 16;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "algorithm", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum KdfView {
    #[serde(rename = "pbkdf2-sha256")]
    Pbkdf2Sha256 { iterations: u32 },
    #[serde(rename = "argon2id", rename_all = "camelCase")]
    Argon2id {
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    },
}

impl From<KdfParams> for KdfView {
    fn from(p: KdfParams) -> Self {
        match p {
            KdfParams::Pbkdf2Sha256 { iterations } => KdfView::Pbkdf2Sha256 { iterations },
            KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => KdfView::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            },
        }
    }
}

impl KdfView {
    fn params(&self) -> KdfParams {
        match *self {
            KdfView::Pbkdf2Sha256 { iterations } => KdfParams::Pbkdf2Sha256 { iterations },
            KdfView::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            } => KdfParams::Argon2id {
                memory_kib,
                iterations,
                parallelism,
            },
        }
    }

    /// From the stored text form (see `KdfParams::to_text`).
    pub(crate) fn decode(stored: &str) -> Option<Self> {
        KdfParams::from_text(stored).map(Self::from)
    }
}

/// A user's vault key material; binary fields are standard base64.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VaultKeysView {
    pub(crate) kdf: KdfView,
    /// 16 bytes.
    pub(crate) salt: String,
    /// The vault key wrapped by the key-wrapping key (envelope kind 2).
    wrapped_vault_key: String,
    /// The sealing public key, 65-byte uncompressed P-256.
    public_key: String,
    /// The sealing private key wrapped by the vault key (envelope kind 3).
    wrapped_private_key: String,
}

fn decode_b64(field: &'static str, value: &str) -> ApiResult<Vec<u8>> {
    B64.decode(value.trim()).map_err(|_| {
        ApiError::bad_request("invalid_body", format!("{field} must be standard base64"))
    })
}

/// Checks magic, version and kind of an envelope without opening it.
fn check_envelope(
    field: &'static str,
    bytes: &[u8],
    kind: Kind,
    exact_len: Option<usize>,
) -> ApiResult<()> {
    let kind_byte = match kind {
        Kind::Item => 1,
        Kind::VaultKey => 2,
        Kind::SealingKey => 3,
        Kind::Sealed => 4,
    };
    let shape_ok = bytes.len() >= 3 + 12 + 16
        && bytes[0] == MAGIC
        && bytes[1] == FORMAT_VERSION
        && bytes[2] == kind_byte
        && exact_len.is_none_or(|n| bytes.len() == n);
    if shape_ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_envelope",
            format!("{field} is not a version-{FORMAT_VERSION} vault envelope of the expected kind and size (see docs/VAULT.md)"),
        ))
    }
}

/// Checks key material's shape (never its content) and converts it for
/// the store.
pub(crate) fn validate_keys(body: &VaultKeysView) -> ApiResult<VaultKeys> {
    body.kdf
        .params()
        .check()
        .map_err(|e| ApiError::bad_request("weak_kdf", e.to_string()))?;
    let salt = decode_b64("salt", &body.salt)?;
    if salt.len() != 16 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "salt must be 16 bytes",
        ));
    }
    let wrapped_vault_key = decode_b64("wrappedVaultKey", &body.wrapped_vault_key)?;
    check_envelope(
        "wrappedVaultKey",
        &wrapped_vault_key,
        Kind::VaultKey,
        Some(WRAPPED_KEY_LEN),
    )?;
    let wrapped_private_key = decode_b64("wrappedPrivateKey", &body.wrapped_private_key)?;
    check_envelope(
        "wrappedPrivateKey",
        &wrapped_private_key,
        Kind::SealingKey,
        Some(WRAPPED_KEY_LEN),
    )?;
    let public_key = decode_b64("publicKey", &body.public_key)?;
    SealingPublicKey::from_bytes(&public_key).map_err(|_| {
        ApiError::bad_request(
            "invalid_public_key",
            "publicKey must be a 65-byte uncompressed P-256 point",
        )
    })?;
    Ok(VaultKeys {
        kdf: body.kdf.params().to_text(),
        kdf_salt: salt,
        wrapped_vault_key,
        public_key,
        wrapped_private_key,
        updated_at_ms: now_ms(),
    })
}

/// Decodes a login credential (base64 of 32 bytes) into its canonical
/// base64 text, which is what the server hashes.
pub(crate) fn login_credential(value: &secrecy::SecretString) -> ApiResult<secrecy::SecretString> {
    use secrecy::ExposeSecret;
    let bytes =
        zeroize::Zeroizing::new(B64.decode(value.expose_secret().trim()).unwrap_or_default());
    if bytes.len() != 32 {
        return Err(ApiError::bad_request(
            "invalid_login_credential",
            "loginCredential must be the base64 of the 32-byte login credential derived on the client (see docs/VAULT.md)",
        ));
    }
    Ok(secrecy::SecretString::from(B64.encode(&*bytes)))
}

/// Set up or replace (password change) your vault key material.
#[utoipa::path(put, path = "/api/vault/keys", tag = "vault", request_body = VaultKeysView, security(("bearer" = [])),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed or weak key material", body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub(crate) async fn put_keys(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    ApiJson(body): ApiJson<VaultKeysView>,
) -> ApiResult<StatusCode> {
    let keys = validate_keys(&body)?;
    state
        .store
        .put_vault_keys(principal.user.id, &keys)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::new(
                StatusCode::CONFLICT,
                "vault_exists",
                "this account's vault is already set up; a password change re-wraps it",
            ),
            other => other.into(),
        })?;
    tracing::info!(user_id = %principal.user.id, "vault keys stored");
    Ok(StatusCode::NO_CONTENT)
}

/// Your vault key material (to unlock on a new device or session).
#[utoipa::path(get, path = "/api/vault/keys", tag = "vault", security(("bearer" = [])),
    responses(
        (status = 200, body = VaultKeysView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No vault set up yet", body = ErrorBody)))]
pub(crate) async fn get_keys(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
) -> ApiResult<Json<VaultKeysView>> {
    let keys = state
        .store
        .vault_keys(principal.user.id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "vault_not_set_up",
                "this account has no vault yet",
            ),
            other => other.into(),
        })?;
    let kdf = KdfView::decode(&keys.kdf).ok_or_else(|| {
        ApiError::internal(
            "stored KDF parameters are unreadable",
            &StoreError::Corrupt(keys.kdf.clone()),
        )
    })?;
    Ok(Json(VaultKeysView {
        kdf,
        salt: B64.encode(&keys.kdf_salt),
        wrapped_vault_key: B64.encode(&keys.wrapped_vault_key),
        public_key: B64.encode(&keys.public_key),
        wrapped_private_key: B64.encode(&keys.wrapped_private_key),
    }))
}

fn check_item_id(id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_item_id",
            "item id must be 1–128 letters, digits, '.', '_' or '-'",
        ))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PutItem {
    /// The version you last saw (0 to create); the stored one becomes version + 1.
    version: i64,
    /// The item envelope (kind 1), standard base64.
    envelope: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ItemView {
    id: String,
    version: i64,
    /// Standard base64; absent in listings.
    #[serde(skip_serializing_if = "Option::is_none")]
    envelope: Option<String>,
    /// Envelope size in bytes.
    size: i64,
    updated_at: i64,
}

fn item_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "item_not_found",
        "no such vault item",
    )
}

/// A 409 naming the item's current version, so the client can refetch.
async fn version_conflict(state: &AppState, user: polydev_domain::UserId, id: &str) -> ApiError {
    let current = state
        .store
        .vault_item(user, id)
        .await
        .ok()
        .map(|i| i.version);
    let message = match current {
        Some(v) => format!("the item changed meanwhile: it is at version {v}; fetch it and retry"),
        None => "the item does not exist at that version".to_owned(),
    };
    ApiError::new(StatusCode::CONFLICT, "version_conflict", message)
}

/// Create or update an item (optimistic concurrency on `version`).
#[utoipa::path(put, path = "/api/vault/items/{id}", tag = "vault", request_body = PutItem,
    params(("id" = String, Path)), security(("bearer" = [])),
    responses(
        (status = 200, body = ItemView),
        (status = 400, description = "Bad id, version or envelope", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "Stale version", body = ErrorBody),
        (status = 413, description = "Envelope too large", body = ErrorBody)))]
pub(crate) async fn put_item(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PutItem>,
) -> ApiResult<Json<ItemView>> {
    check_item_id(&id)?;
    if body.version < 0 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "version must be 0 or more",
        ));
    }
    let envelope = decode_b64("envelope", &body.envelope)?;
    if envelope.len() > MAX_ITEM_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "item_too_large",
            format!("a vault item may be at most {} KiB", MAX_ITEM_BYTES / 1024),
        ));
    }
    check_envelope("envelope", &envelope, Kind::Item, None)?;
    let user = principal.user.id;
    let now = now_ms();
    match state
        .store
        .put_vault_item(user, &id, body.version, &envelope, now)
        .await
    {
        Ok(version) => Ok(Json(ItemView {
            id,
            version,
            envelope: None,
            size: envelope.len() as i64,
            updated_at: now,
        })),
        Err(StoreError::Conflict(_)) => Err(version_conflict(&state, user, &id).await),
        Err(e) => Err(e.into()),
    }
}

/// One of your items. Another user's id answers 404, as if it did not exist.
#[utoipa::path(get, path = "/api/vault/items/{id}", tag = "vault", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = ItemView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_item(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<ItemView>> {
    check_item_id(&id)?;
    let item = state
        .store
        .vault_item(principal.user.id, &id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => item_not_found(),
            other => other.into(),
        })?;
    Ok(Json(ItemView {
        id: item.item_id,
        version: item.version,
        size: item.envelope.len() as i64,
        envelope: Some(B64.encode(&item.envelope)),
        updated_at: item.updated_at_ms,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteQuery {
    /// The version you last saw.
    version: i64,
}

/// Delete one of your items at the version you last saw.
#[utoipa::path(delete, path = "/api/vault/items/{id}", tag = "vault", params(("id" = String, Path), DeleteQuery),
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn delete_item(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    check_item_id(&id)?;
    let user = principal.user.id;
    match state.store.delete_vault_item(user, &id, q.version).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::NotFound) => Err(item_not_found()),
        Err(StoreError::Conflict(_)) => Err(version_conflict(&state, user, &id).await),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ItemList {
    items: Vec<ItemView>,
}

/// Your items' ids, versions and sizes (no contents).
#[utoipa::path(get, path = "/api/vault/items", tag = "vault", security(("bearer" = [])),
    responses((status = 200, body = ItemList), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_items(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
) -> ApiResult<Json<ItemList>> {
    let items = state
        .store
        .vault_items(principal.user.id)
        .await?
        .into_iter()
        .map(|m| ItemView {
            id: m.item_id,
            version: m.version,
            envelope: None,
            size: m.size,
            updated_at: m.updated_at_ms,
        })
        .collect();
    Ok(Json(ItemList { items }))
}
