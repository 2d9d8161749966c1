//! The vault's storage API. The server checks that what it stores has the
//! shape of vault data (envelope header, sizes, a valid public key, KDF
//! parameters at or above the floor); it never holds a key that opens it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_store::{now_ms, StoreError};
use polydev_vault::Kind;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::keys::{check_envelope, decode_b64, validate_keys, KdfView, VaultKeysView};
use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::state::AppState;

/// Largest item envelope accepted (decoded), bytes.
pub(crate) const MAX_ITEM_BYTES: usize = 256 * 1024;
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
    #[schema(minimum = 0)]
    version: i64,
    #[schema(schema_with = item_envelope)]
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

fn item_envelope() -> utoipa::openapi::schema::Schema {
    crate::schema::item_envelope(MAX_ITEM_BYTES)
}
