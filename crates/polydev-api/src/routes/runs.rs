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
use polydev_sessions::runs::{RunError, RunView, Runs};
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
    /// `claude_code`, `codex`, `gemini_cli`, `opencode`, `copilot`
    /// (default: all; with a workspace, the first three, the CLIs that
    /// work on code).
    #[serde(default)]
    #[schema(schema_with = crate::schema::providers)]
    providers: Vec<String>,
    /// The user's code for the CLIs to work on: a tar archive of `bytes`
    /// bytes, sent sealed to each sandbox afterwards (`PUT
    /// /api/runs/{id}/workspace/{provider}`).
    #[serde(default)]
    workspace: Option<WorkspaceBody>,
    /// How long each CLI may take, in seconds (at most the server's
    /// `runs.deadline_secs`; longer is cut to it: the view says which).
    #[serde(default)]
    #[schema(minimum = 1)]
    deadline_secs: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct WorkspaceBody {
    /// `ask` (the CLIs read it) or `edit` (they may change it; each one's
    /// changes come back as a diff).
    mode: polydev_sessions::workspace::Mode,
    /// The archive's size in bytes (at most the server's
    /// `runs.max_workspace_mb`; 413 otherwise).
    #[schema(minimum = 1)]
    bytes: u64,
    /// A P-256 public key of your own (base64, 65 bytes uncompressed):
    /// each diff is also sealed to it, fetched with `?to=recipient` while
    /// the run is live or lingers (for a client without your vault).
    #[serde(default)]
    #[schema(schema_with = crate::schema::public_key)]
    recipient: Option<String>,
}

/// Start a run: one sandbox per provider, each with a key to seal that
/// provider's credential to.
#[utoipa::path(post, operation_id = "start_run", path = "/api/runs", tag = "runs", request_body = StartBody, security(("bearer" = [])),
    responses((status = 201, body = RunView, description = "The run: each provider's sandbox and the key to seal its credential to"),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(body): ApiJson<StartBody>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let runs = runs(&state)?;
    let providers = if body.providers.is_empty() {
        // On code, the CLIs that work on code.
        Provider::ALL
            .iter()
            .copied()
            .filter(|p| body.workspace.is_none() || polydev_sessions::providers::works_on_code(*p))
            .collect()
    } else {
        body.providers
            .iter()
            .map(|p| p.parse::<Provider>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let workspace = match body.workspace {
        None => None,
        Some(w) => {
            let recipient = match w.recipient {
                None => None,
                Some(k) => {
                    let bad = || {
                        ApiError::bad_request(
                            "invalid_public_key",
                            "workspace.recipient must be a P-256 public key: 65 bytes (uncompressed), base64",
                        )
                    };
                    let bytes = B64.decode(k).map_err(|_| bad())?;
                    polydev_vault::SealingPublicKey::from_bytes(&bytes).map_err(|_| bad())?;
                    Some(<[u8; 65]>::try_from(bytes.as_slice()).map_err(|_| bad())?)
                }
            };
            Some(polydev_sessions::workspace::Workspace {
                mode: w.mode,
                bytes: w.bytes,
                recipient,
            })
        }
    };
    let view = runs
        .start(
            user.0.user.id,
            body.prompt,
            providers,
            workspace,
            body.deadline_secs.map(Duration::from_secs),
        )
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

/// A workspace upload's body (for the API document): bytes, not JSON.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(crate) struct SealedChunks(Vec<u8>);

/// How long the next bytes of a workspace upload may take to arrive.
const UPLOAD_READ_DEADLINE: Duration = Duration::from_secs(30);

/// A workspace upload's body, one sealed chunk at a time: each is a
/// 4-byte big-endian length, then that many bytes. No chunk longer than a
/// sealed `CHUNK` is buffered, and every read has a deadline.
struct Chunks {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl Chunks {
    async fn next_chunk(&mut self) -> Option<Result<Vec<u8>, RunError>> {
        use futures_util::StreamExt;
        use polydev_sessions::workspace::{CHUNK, SEAL_SLACK};
        loop {
            if self.buf.len() >= 4 {
                let len =
                    u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as u64;
                if len > CHUNK + SEAL_SLACK {
                    return Some(Err(RunError::TooLarge(format!(
                        "a sealed chunk of {len} bytes; a chunk holds at most {CHUNK} bytes before sealing"
                    ))));
                }
                let end = 4 + len as usize;
                if self.buf.len() >= end {
                    let chunk = self.buf[4..end].to_vec();
                    self.buf.drain(..end);
                    return Some(Ok(chunk));
                }
            }
            match tokio::time::timeout(UPLOAD_READ_DEADLINE, self.body.next()).await {
                Err(_) => {
                    return Some(Err(RunError::Timeout(format!(
                        "the workspace upload sent nothing for {} s",
                        UPLOAD_READ_DEADLINE.as_secs()
                    ))))
                }
                Ok(None) if self.buf.is_empty() => return None,
                Ok(None) => {
                    return Some(Err(RunError::Invalid(
                        "the workspace upload ended inside a chunk".into(),
                    )))
                }
                Ok(Some(Err(e))) => {
                    return Some(Err(RunError::Invalid(format!(
                        "the workspace upload broke off: {e}"
                    ))))
                }
                Ok(Some(Ok(bytes))) => self.buf.extend_from_slice(&bytes),
            }
        }
    }
}

/// Send one provider its workspace: the tar archive announced when the
/// run started, cut into chunks of at most 1 MiB, each sealed to that
/// provider's sandbox `publicKey` (HPKE, info `polydev/run-workspace/v1`,
/// aad `<run id>/<provider>/workspace/<index>/<count>`), each chunk as a
/// 4-byte big-endian length and the sealed bytes. The controller relays
/// ciphertext only; the sandbox unpacks it into a git repository. Send it
/// before the provider's credential.
#[utoipa::path(put, operation_id = "put_run_workspace", path = "/api/runs/{id}/workspace/{provider}", tag = "runs",
    request_body(content = SealedChunks, content_type = "application/octet-stream", description = "The sealed chunks, each length-prefixed"),
    security(("bearer" = [])),
    params(("id" = String, Path), ("provider" = String, Path, description = "A provider of the run.")),
    responses((status = 200, body = RunView, description = "Unpacked in the provider's sandbox"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(crate) async fn workspace(
    State(state): State<AppState>,
    Path((id, provider)): Path<(String, String)>,
    req: axum::extract::Request,
) -> ApiResult<Json<RunView>> {
    use axum::extract::FromRequestParts;
    // This route runs without the request deadline (its body streams):
    // who is asking is settled within one of its own.
    let (mut parts, body) = req.into_parts();
    let user = tokio::time::timeout(
        UPLOAD_READ_DEADLINE,
        CurrentUser::from_request_parts(&mut parts, &state),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the server could not check who you are in time; try again",
        )
    })??;
    let provider: Provider = provider.parse()?;
    let chunks = Chunks {
        body: body.into_data_stream(),
        buf: Vec::new(),
    };
    let stream = Box::pin(futures_util::stream::unfold(chunks, |mut c| async move {
        c.next_chunk().await.map(|r| (r, c))
    }));
    Ok(Json(
        runs(&state)?
            .upload_workspace(&id, user.0.user.id, provider, stream)
            .await
            .map_err(ApiError::from)?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DiffQuery {
    /// `vault` (default: sealed to your vault key, stored with the run) or
    /// `recipient` (sealed to the key the run was started with; only
    /// while the run is in memory).
    to: Option<String>,
}

#[derive(Debug, serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SealedDiff {
    provider: String,
    /// `git apply`-able unified diff against the workspace's base, sealed
    /// to your vault public key (base64; open it with your unlocked vault).
    sealed: String,
    purpose: &'static str,
    aad: String,
}

/// What one provider's CLI changed in an `edit` run's workspace, sealed to
/// you.
#[utoipa::path(get, operation_id = "get_run_diff", path = "/api/runs/{id}/diff/{provider}", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path), ("provider" = String, Path, description = "A provider of the run."), DiffQuery),
    responses((status = 200, body = SealedDiff), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn diff(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, provider)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<DiffQuery>,
) -> ApiResult<Json<SealedDiff>> {
    let provider: Provider = provider.parse()?;
    let sealed = match q.to.as_deref() {
        None | Some("vault") => polydev_sessions::runs::stored_or_live_diff(
            state.runs.as_deref(),
            &state.store,
            &id,
            user.0.user.id,
            provider,
        )
        .await
        .map_err(ApiError::from)?,
        Some("recipient") => runs(&state)?
            .client_diff(&id, user.0.user.id, provider)
            .map_err(ApiError::from)?,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_run_request",
                format!("to: {other:?} is neither \"vault\" nor \"recipient\""),
            ))
        }
    }
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "diff_not_found",
            format!(
                "{} brought no diff back in run {id} (not an edit run, not finished, or it failed)",
                provider.as_str()
            ),
        )
    })?;
    Ok(Json(SealedDiff {
        provider: provider.as_str().to_owned(),
        sealed,
        purpose: polydev_sessions::workspace::DIFF_PURPOSE,
        aad: format!("{id}/{}", provider.as_str()),
    }))
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
