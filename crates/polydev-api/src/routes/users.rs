use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use polydev_domain::{Email, Role, UserId};
use polydev_store::{now_ms, NewUser, StoreError};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::keys::{login_credential, validate_keys, VaultKeysView};
use crate::auth::{ensure_self_or_admin, CurrentUser};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::state::AppState;

/// Sign-up request. The password never reaches the server: the client
/// derives the login credential and the wrapped keys from it
/// (docs/VAULT.md).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SignUp {
    #[schema(schema_with = crate::schema::email)]
    email: String,
    /// The new account's id (a UUID the client generates: its wrapped keys
    /// are bound to it).
    #[schema(schema_with = crate::schema::uuid)]
    user_id: String,
    #[schema(schema_with = crate::schema::login_credential)]
    login_credential: SecretString,
    /// The new vault's key material.
    vault: VaultKeysView,
}

/// Create an account (role `user`).
#[utoipa::path(post, operation_id = "create_user", path = "/api/users", tag = "users", request_body = SignUp,
    responses(
        (status = 201, description = "Created", body = UserView),
        (status = 400, description = "Invalid email, login credential or key material", body = ErrorBody),
        (status = 403, description = "Sign-up is disabled", body = ErrorBody),
        (status = 409, description = "Email already registered", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 429, description = "Too many sign-ups from this address; see Retry-After", body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    parts: axum::http::request::Parts,
    ApiJson(body): ApiJson<SignUp>,
) -> ApiResult<impl IntoResponse> {
    if !state.config.allow_signup {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "signup_disabled",
            "sign-up is disabled on this server; ask an operator for an account",
        ));
    }
    state.auth.signups.check(crate::auth::client_ip(
        &parts,
        &state.config.trusted_proxies,
    ))?;
    let email = Email::parse(&body.email)?;
    let id = UserId::parse("userId", &body.user_id)?;
    let credential = login_credential(&body.login_credential)?;
    let keys = validate_keys(&body.vault)?;
    let hash = state.auth.hasher.hash(credential).await?;
    let new = NewUser {
        id,
        email,
        password_hash: Some(hash),
        role: Role::User,
        created_at_ms: now_ms(),
    };
    let user = state
        .store
        .create_user_with_vault(&new, &keys)
        .await
        .map_err(|e| match e {
            StoreError::Conflict("user id") => ApiError::new(
                StatusCode::CONFLICT,
                "user_id_taken",
                "that user id is taken; generate another",
            ),
            StoreError::Conflict(_) => ApiError::new(
                StatusCode::CONFLICT,
                "email_taken",
                "an account with this email already exists",
            ),
            other => other.into(),
        })?;
    tracing::info!(user_id = %user.id, "user signed up");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/users/{}", user.id))],
        Json(UserView::from(&user)),
    ))
}

/// Look up a user: yourself, or anyone when you are an admin.
#[utoipa::path(get, operation_id = "get_user", path = "/api/users/{id}", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Someone else's account", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<UserView>> {
    let id = UserId::parse("id", &id)?;
    ensure_self_or_admin(&principal, id)?;
    let user = state.store.user_by_id(id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::user_not_found(),
        other => other.into(),
    })?;
    Ok(Json(UserView::from(&user)))
}

/// The signed-in user.
#[utoipa::path(get, path = "/api/me", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "You", body = UserView),
        (status = 401, description = "Not signed in", body = ErrorBody)))]
pub(crate) async fn me(CurrentUser(principal): CurrentUser) -> Json<UserView> {
    Json(UserView::from(&principal.user))
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserView {
    #[schema(value_type = String, format = Uuid)]
    pub id: String,
    #[schema(example = "ada@example.com")]
    pub email: String,
    /// `user` or `admin`.
    #[schema(example = "user")]
    pub role: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl From<&polydev_store::User> for UserView {
    fn from(user: &polydev_store::User) -> Self {
        Self {
            id: user.id.to_string(),
            email: user.email.to_string(),
            role: user.role.to_string(),
            created_at: user.created_at_ms,
        }
    }
}
