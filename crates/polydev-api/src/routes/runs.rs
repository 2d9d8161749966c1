//! Runs: one prompt across the provider CLIs, each in its own sandbox,
//! streamed back as normalised events (SSE). Credentials arrive sealed to
//! each sandbox's agent; the controller relays ciphertext only.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_domain::Provider;
use polydev_sessions::runs::{RunView, Runs};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::state::AppState;

fn runs(state: &AppState) -> ApiResult<&Arc<Runs>> {
    state.runs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "runs_unavailable",
            "runs need sandboxes and the egress proxy, which are not both on here",
        )
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct StartBody {
    #[schema(schema_with = crate::schema::prompt)]
    prompt: String,
    /// `claude_code`, `codex`, `gemini_cli` (default: all three).
    #[serde(default)]
    #[schema(schema_with = crate::schema::providers)]
    providers: Vec<String>,
}

/// Start a run: one sandbox per provider, each with a key to seal that
/// provider's credential to.
#[utoipa::path(post, operation_id = "start_run", path = "/api/runs", tag = "runs", request_body = StartBody, security(("bearer" = [])),
    responses((status = 201, body = RunView, description = "The run: each provider's sandbox and the key to seal its credential to"),
        (status = 400, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(body): ApiJson<StartBody>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let runs = runs(&state)?;
    let providers = if body.providers.is_empty() {
        Provider::ALL.to_vec()
    } else {
        body.providers
            .iter()
            .map(|p| p.parse::<Provider>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let view = runs
        .start(user.0.user.id, body.prompt, providers)
        .await
        .map_err(|e| ApiError::from(e).for_caller(user.0.is_admin()))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CredentialsBody {
    #[schema(schema_with = crate::schema::credential_boxes)]
    credentials: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::credential_kinds)]
    kinds: BTreeMap<String, String>,
}

/// Hand the run its sealed credentials; each provider's CLI starts when its
/// credential is open inside its sandbox.
#[utoipa::path(post, path = "/api/runs/{id}/credentials", tag = "runs", request_body = CredentialsBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202, body = RunView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn credentials(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CredentialsBody>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let runs = runs(&state)?;
    let mut sealed = BTreeMap::new();
    for (p, b) in body.credentials {
        let provider: Provider = p.parse()?;
        let bytes = B64.decode(b).map_err(|_| {
            ApiError::bad_request(
                "invalid_run_request",
                format!("{p}: the sealed credential must be base64"),
            )
        })?;
        let kind = match body.kinds.get(&p) {
            Some(k) => k
                .parse::<polydev_sessions::runs::CredentialKind>()
                .map_err(|m| ApiError::bad_request("invalid_run_request", format!("{p}: {m}")))?,
            None => Default::default(),
        };
        sealed.insert(provider, (bytes, kind));
    }
    let view = runs
        .credentials(&id, user.0.user.id, user.0.is_admin(), sealed)
        .await
        .map_err(ApiError::from)?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub(crate) struct RunHistory {
    #[schema(value_type = Vec<Object>)]
    runs: Vec<serde_json::Value>,
}

/// Your runs, newest first: states and timings per provider, and each
/// answer sealed to your vault public key (open it with your unlocked
/// vault; the server cannot).
#[utoipa::path(get, operation_id = "list_runs", path = "/api/runs", tag = "runs", security(("bearer" = [])),
    responses((status = 200, body = RunHistory), (status = 401, body = ErrorBody)))]
pub(crate) async fn history(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ApiResult<Json<RunHistory>> {
    // From the store: a server where runs cannot start still shows the
    // ones you made (and an empty history to a newcomer), not a 503.
    let runs = polydev_sessions::runs::history(&state.store, user.0.user.id)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(RunHistory { runs }))
}

/// A run's state.
#[utoipa::path(get, operation_id = "get_run", path = "/api/runs/{id}", tag = "runs", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = RunView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    Ok(Json(
        runs(&state)?
            .view(&id, user.0.user.id)
            .await
            .map_err(ApiError::from)?,
    ))
}

/// Cancel a run: every provider still going ends with `error{stage: cancelled}`.
#[utoipa::path(delete, operation_id = "cancel_run", path = "/api/runs/{id}", tag = "runs", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = RunView), (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    Ok(Json(
        runs(&state)?
            .cancel(&id, user.0.user.id)
            .await
            .map_err(ApiError::from)?,
    ))
}

/// Stop one provider of a run: if it is still going it ends with
/// `error{stage: cancelled}`; the others go on.
#[utoipa::path(delete, operation_id = "cancel_run_provider", path = "/api/runs/{id}/providers/{provider}", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path), ("provider" = String, Path, description = "A provider of the run: `claude_code`, `codex`, `gemini_cli`, `opencode` or `copilot`.")),
    responses((status = 200, body = RunView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel_provider(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, provider)): Path<(String, String)>,
) -> ApiResult<Json<RunView>> {
    let provider: Provider = provider.parse()?;
    Ok(Json(
        runs(&state)?
            .cancel_provider(&id, user.0.user.id, provider)
            .await
            .map_err(ApiError::from)?,
    ))
}

/// The run's events as SSE (`event:` started | delta | done | error; `data`
/// carries `provider`): everything so far, then live until every provider
/// has finished.
#[utoipa::path(get, operation_id = "run_events", path = "/api/runs/{id}/events", tag = "runs", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let runs = runs(&state)?.clone();
    let uid = user.0.user.id;
    let (past, rx) = runs.subscribe(&id, uid).await.map_err(ApiError::from)?;
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let to_sse = |e: &polydev_sessions::runs::RunEvent| {
        SseEvent::default()
            .event(e.kind())
            .data(e.data().to_string())
    };
    state.tasks.spawn(async move {
        // `end` is the stream's last event: every provider has ended.
        for e in &past {
            if tx.send(Ok(to_sse(e))).await.is_err() || e.is_end() {
                return;
            }
        }
        let Some(mut rx) = rx else { return };
        loop {
            let next = tokio::select! {
                e = rx.recv() => e,
                _ = tx.closed() => return,
            };
            match next {
                Ok(e) => {
                    if tx.send(Ok(to_sse(&e))).await.is_err() || e.is_end() {
                        return;
                    }
                }
                // Fallen behind the live feed: end here (nothing is skipped
                // silently); a reconnect replays the whole run.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                Err(_) => return,
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
