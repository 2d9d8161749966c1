use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use polydev_domain::Email;
use polydev_store::{now_ms, NewToken, StoreError, TokenKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use utoipa::{IntoParams, ToSchema};

use super::keys::{login_credential, validate_keys, KdfView, VaultKeysView};
use super::users::UserView;
use crate::auth::{client_ip, CurrentUser, SESSION_COOKIE};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Login {
    #[schema(schema_with = crate::schema::email)]
    email: String,
    #[schema(schema_with = crate::schema::login_credential)]
    login_credential: SecretString,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LoginResponse {
    /// A bearer token for `Authorization: Bearer …`; also set as the
    /// `polydev_session` cookie (HttpOnly, SameSite=Strict).
    token: String,
    user: UserView,
}

fn session_cookie(state: &AppState, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if state.config.cookie_secure {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Sign in with email and password; returns a session token.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Login,
    responses(
        (status = 200, description = "Signed in; the token is also set as a cookie", body = LoginResponse),
        (status = 400, description = "Malformed email or body", body = ErrorBody),
        (status = 401, description = "Wrong email or password", body = ErrorBody),
        (status = 429, description = "Too many attempts (per IP or per account); see Retry-After", body = ErrorBody)))]
pub(crate) async fn login(
    State(state): State<AppState>,
    parts: axum::http::request::Parts,
    ApiJson(body): ApiJson<Login>,
) -> ApiResult<impl IntoResponse> {
    let email = Email::parse(&body.email)?;
    state.auth.limiter.check(
        client_ip(&parts, &state.config.trusted_proxies),
        email.as_str(),
    )?;
    let (user, hash) = match state.store.user_with_password(&email).await {
        Ok((user, hash)) => (Some(user), hash),
        Err(StoreError::NotFound) => (None, None),
        Err(e) => return Err(e.into()),
    };
    let credential = login_credential(&body.login_credential)?;
    let ok = state.auth.hasher.verify(credential, hash).await?;
    let Some(user) = user.filter(|_| ok) else {
        tracing::info!("login failed");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "email or password is wrong",
        ));
    };
    let minted = crate::auth::mint_token();
    let ttl = state.config.session_ttl;
    let now = now_ms();
    state
        .store
        .create_token(&NewToken {
            user_id: user.id,
            kind: TokenKind::Session,
            token_hash: minted.hash.clone(),
            created_at_ms: now,
            expires_at_ms: Some(
                now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            ),
        })
        .await?;
    tracing::info!(user_id = %user.id, "user signed in");
    let token = minted.token.expose_secret().to_owned();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::SET_COOKIE,
        session_cookie(&state, &token, ttl.as_secs()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((
        headers,
        Json(LoginResponse {
            token,
            user: UserView::from(&user),
        }),
    ))
}

/// Sign out: revokes the session token presented (API tokens stay valid)
/// and clears the cookie.
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "Not signed in", body = ErrorBody)))]
pub(crate) async fn logout(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
) -> ApiResult<impl IntoResponse> {
    if principal.token_kind == TokenKind::Session {
        match state.store.delete_token(&principal.token_hash).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, session_cookie(&state, "", 0))],
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PreloginQuery {
    email: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Prelogin {
    kdf: KdfView,
    /// 16 bytes, standard base64.
    salt: String,
}

/// The KDF parameters and salt to derive the login credential with. For
/// an email without an account the answer is made up, but stable, so it
/// does not reveal which accounts exist.
#[utoipa::path(get, path = "/api/auth/prelogin", tag = "auth", params(PreloginQuery),
    responses((status = 200, body = Prelogin), (status = 400, body = ErrorBody)))]
pub(crate) async fn prelogin(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PreloginQuery>,
) -> ApiResult<Json<Prelogin>> {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    let email = Email::parse(&q.email)?;
    if let Ok((user, _)) = state.store.user_with_password(&email).await {
        if let Ok(keys) = state.store.vault_keys(user.id).await {
            if let Some(kdf) = KdfView::decode(&keys.kdf) {
                return Ok(Json(Prelogin {
                    kdf,
                    salt: B64.encode(&keys.kdf_salt),
                }));
            }
        }
    }
    let secret = state
        .store
        .setting_or_insert("prelogin_key", || {
            let mut k = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
            B64.encode(k)
        })
        .await?;
    let digest =
        sha2::Sha256::digest(format!("polydev prelogin\0{secret}\0{}", email.as_str()).as_bytes());
    Ok(Json(Prelogin {
        kdf: KdfView::from(polydev_vault::KdfParams::default()),
        salt: B64.encode(&digest[..16]),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ChangePassword {
    #[schema(schema_with = crate::schema::login_credential)]
    current_login_credential: SecretString,
    #[schema(schema_with = crate::schema::login_credential)]
    new_login_credential: SecretString,
    /// The vault key re-wrapped under the new password (items are not re-encrypted).
    vault: VaultKeysView,
}

/// Change your password: proves the current one, stores the new login
/// credential's hash and the re-wrapped keys together, and signs out every
/// other session.
#[utoipa::path(post, path = "/api/auth/password", tag = "auth", request_body = ChangePassword,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, body = ErrorBody),
        (status = 401, description = "Not signed in, or the current password is wrong", body = ErrorBody)))]
pub(crate) async fn change_password(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    ApiJson(body): ApiJson<ChangePassword>,
) -> ApiResult<StatusCode> {
    let current = login_credential(&body.current_login_credential)?;
    let new = login_credential(&body.new_login_credential)?;
    let keys = validate_keys(&body.vault)?;
    state
        .auth
        .limiter
        .check_account(principal.user.email.as_str())?;
    let (_, hash) = state
        .store
        .user_with_password(&principal.user.email)
        .await?;
    if !state.auth.hasher.verify(current, hash).await? {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "the current password is wrong",
        ));
    }
    let new_hash = state.auth.hasher.hash(new).await?;
    state
        .store
        .change_password(principal.user.id, &new_hash, &keys)
        .await?;
    let _ = state
        .store
        .delete_other_sessions(principal.user.id, &principal.token_hash)
        .await;
    tracing::info!(user_id = %principal.user.id, "password changed");
    Ok(StatusCode::NO_CONTENT)
}
