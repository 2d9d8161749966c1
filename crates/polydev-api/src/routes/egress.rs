//! Egress proxy credentials (admins; the sandbox runtime mints through the
//! Rust API directly) and usage (each user their own; admins anyone's).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use polydev_domain::UserId;
use polydev_egress::{Egress, EgressError};
use polydev_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::ensure_self_or_admin;
use crate::auth::{AdminUser, CurrentUser};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::state::AppState;

fn egress(state: &AppState) -> ApiResult<&Egress> {
    state.egress.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "egress_disabled",
            "the egress proxy is not enabled on this controller",
        )
    })
}

fn egress_error(e: EgressError) -> ApiError {
    match e {
        EgressError::Store(StoreError::NotFound) => ApiError::user_not_found(),
        EgressError::PortsExhausted => ApiError::unavailable(
            "every per-user egress port is assigned; widen user_ports",
            60,
        ),
        EgressError::Store(s) => s.into(),
        other => ApiError::internal("egress error", &other),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct MintRequest {
    #[schema(schema_with = crate::schema::uuid)]
    user_id: String,
    /// Sandbox template the credential is for (selects the policy); default `runtime`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", nullable)]
    template: Option<String>,
    /// The sandbox it belongs to (UUID); a new id when absent.
    #[schema(schema_with = crate::schema::optional_uuid)]
    sandbox_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MintedView {
    username: String,
    /// Shown once; stored only as a hash.
    password: String,
    sandbox_id: String,
    template: String,
    /// `http://username:password@host:port`, for `HTTP(S)_PROXY`.
    proxy_url: String,
    /// The same on the user's own port, when per-user ports are on.
    user_proxy_url: Option<String>,
}

/// Mint a proxy credential for a sandbox of a user.
#[utoipa::path(post, path = "/api/admin/egress/credentials", tag = "egress", request_body = MintRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = MintedView),
        (status = 400, description = "Malformed id or template", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown user", body = ErrorBody),
        (status = 503, description = "Egress disabled", body = ErrorBody)))]
pub(crate) async fn mint(
    State(state): State<AppState>,
    _: AdminUser,
    ApiJson(body): ApiJson<MintRequest>,
) -> ApiResult<impl IntoResponse> {
    let egress = egress(&state)?;
    let user = UserId::parse("userId", &body.user_id)?;
    let sandbox = match &body.sandbox_id {
        Some(s) => UserId::parse("sandboxId", s)?.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let template = body.template.unwrap_or_else(|| "runtime".to_owned());
    if template.is_empty()
        || template.len() > 64
        || !template
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::bad_request(
            "invalid_template",
            "template must be 1–64 letters, digits, - or _",
        ));
    }
    let access = egress
        .mint(user, &sandbox, &template)
        .await
        .map_err(egress_error)?;
    tracing::info!(user_id = %user, sandbox_id = %sandbox, username = %access.credential.username, "egress credential minted");
    let view = MintedView {
        username: access.credential.username.clone(),
        password: access.credential.secret.clone(),
        sandbox_id: sandbox,
        template,
        proxy_url: access.proxy_url.clone(),
        user_proxy_url: egress.user_proxy_url(&access),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

/// Revoke a proxy credential at once.
#[utoipa::path(delete, path = "/api/admin/egress/credentials/{username}", tag = "egress",
    params(("username" = String, Path)), security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No live credential", body = ErrorBody)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    _: AdminUser,
    Path(username): Path<String>,
) -> ApiResult<StatusCode> {
    match egress(&state)?.revoke(&username).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(EgressError::Store(StoreError::NotFound)) => Err(ApiError::not_found(
            "no live egress credential with that username",
        )),
        Err(e) => Err(egress_error(e)),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct UsageQuery {
    /// Whose usage (admins only; default: yours).
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UsageRow {
    sandbox_id: String,
    bytes_up: i64,
    bytes_down: i64,
    requests: i64,
    tunnels: i64,
    updated_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageList {
    usage: Vec<UsageRow>,
}

/// Egress bytes, requests and tunnels per sandbox (flushed every few seconds).
#[utoipa::path(get, path = "/api/egress/usage", tag = "egress", params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = UsageList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<UsageList>> {
    let user = match q.user_id {
        Some(id) => UserId::parse("userId", &id)?,
        None => principal.user.id,
    };
    ensure_self_or_admin(&principal, user)?;
    let usage = state
        .store
        .egress_usage(user)
        .await?
        .into_iter()
        .map(|u| UsageRow {
            sandbox_id: u.sandbox_id,
            bytes_up: u.bytes_up,
            bytes_down: u.bytes_down,
            requests: u.requests,
            tunnels: u.tunnels,
            updated_at: u.updated_at_ms,
        })
        .collect();
    Ok(Json(UsageList { usage }))
}
