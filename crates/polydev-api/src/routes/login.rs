//! Login sessions: start, state (JSON and SSE), cancel, code relay, viewer
//! tickets, and the WebSocket ↔ VNC bridge the noVNC viewer connects to.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use polydev_domain::{Provider, Role, UserId};
use polydev_sandbox::desktop::VNC_SERVICE;
use polydev_sessions::login::{LoginError, LoginView, Logins};
use polydev_store::StoreError;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{ensure_self_or_admin, CurrentUser, Principal};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::state::AppState;

pub(crate) fn logins(state: &AppState) -> ApiResult<&Arc<Logins>> {
    state.logins.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "logins_unavailable",
            "login sessions need sandboxes and the egress proxy, which are not both on here",
        )
    })
}

/// A login session as the API answers it: the view, plus `status` (the
/// state, under the name v1 clients read).
#[derive(serde::Serialize, ToSchema)]
pub(crate) struct SessionBody {
    #[serde(flatten)]
    view: LoginView,
    status: polydev_domain::LoginState,
}

fn view_json(view: &LoginView) -> SessionBody {
    SessionBody {
        view: view.clone(),
        status: view.state,
    }
}

pub(crate) fn accepted(view: &LoginView) -> Response {
    (StatusCode::ACCEPTED, Json(view_json(view))).into_response()
}

/// Get a login session: 200 with its state and stage times; 410 once it
/// expired or was cancelled, so stale clients stop.
#[utoipa::path(get, operation_id = "get_login_session", path = "/api/auth/session/{id}", tag = "auth",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses(
        (status = 200, body = SessionBody, description = "The session (state, stages, error and log tail when failed)"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Another user's session", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 410, description = "Expired or cancelled", body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionBody>> {
    let view = logins(&state)?
        .get(&id, p.user.id)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(view_json(&view)))
}

/// Cancel a login session; its sandbox is destroyed.
#[utoipa::path(delete, operation_id = "cancel_login_session", path = "/api/auth/session/{id}", tag = "auth",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = SessionBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionBody>> {
    let view = logins(&state)?
        .cancel(&id, p.user.id)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(view_json(&view)))
}

/// The session's state as Server-Sent Events (`state`), one per change,
/// ending after a final state.
#[utoipa::path(get, operation_id = "login_session_events", path = "/api/auth/session/{id}/events", tag = "auth",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of `state` events"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let logins = logins(&state)?.clone();
    let first = logins.get(&id, p.user.id).await.map_err(ApiError::from)?;
    let rx = logins.watch(&id, p.user.id);
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let to_sse = |v: &LoginView| {
        SseEvent::default()
            .event("state")
            .data(serde_json::to_string(&view_json(v)).unwrap_or_default())
    };
    state.tasks.spawn(async move {
        if tx.send(Ok(to_sse(&first))).await.is_err() || first.is_terminal() {
            return;
        }
        let Some(mut rx) = rx else { return };
        let mut last = first;
        loop {
            let current = rx.borrow_and_update().clone();
            if current != last {
                if tx.send(Ok(to_sse(&current))).await.is_err() {
                    return;
                }
                if current.is_terminal() {
                    return;
                }
                last = current;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(out);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeBody {
    #[schema(schema_with = crate::schema::login_code)]
    code: String,
}

/// Code relay: hand the code you got after signing in in your own browser
/// to the CLI waiting in the sandbox.
#[utoipa::path(post, path = "/api/auth/session/{id}/code", tag = "auth",
    params(("id" = String, Path)), request_body = CodeBody, security(("bearer" = [])),
    responses((status = 200, body = SessionBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The CLI does not wait for a code (yet)", body = ErrorBody),
        (status = 410, body = ErrorBody)))]
pub(crate) async fn code(
    State(state): State<AppState>,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CodeBody>,
) -> ApiResult<Json<SessionBody>> {
    let view = logins(&state)?
        .submit_code(&id, p.user.id, &body.code)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(view_json(&view)))
}

/// A single-use, short-lived ticket for the viewer's WebSocket (browsers
/// cannot set headers on WebSockets, so it travels in the URL).
#[utoipa::path(post, path = "/api/auth/session/{id}/ticket", tag = "auth",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, description = "{ticket, expiresInMs, path}"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn ticket(
    State(state): State<AppState>,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (ticket, ttl) = logins(&state)?
        .ticket(&id, p.user.id)
        .map_err(ApiError::from)?;
    Ok(Json(json!({
        "ticket": ticket,
        "expiresInMs": ttl.as_millis() as u64,
        "path": format!("/api/auth/session/{id}/novnc/websock?ticket={ticket}"),
    })))
}

/// Which login modes each provider offers on this server.
#[utoipa::path(get, path = "/api/auth/providers", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "{provider: [modes]}"), (status = 401, body = ErrorBody)))]
pub(crate) async fn providers(
    State(state): State<AppState>,
    _user: CurrentUser,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "modes": logins(&state)?.modes() })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TicketQuery {
    ticket: Option<String>,
}

/// The signed-in user a request also carries, if any (never an error).
pub(crate) struct MaybeUser(Option<Principal>);

impl FromRequestParts<AppState> for MaybeUser {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        Ok(MaybeUser(
            CurrentUser::from_request_parts(parts, state)
                .await
                .ok()
                .map(|c| c.0),
        ))
    }
}

/// The viewer's WebSocket, bridged to the sandbox's VNC server (binary
/// frames both ways). GET only; auth is the single-use `ticket` plus an
/// Origin check.
#[utoipa::path(get, path = "/api/auth/session/{id}/novnc/websock", tag = "auth",
    params(("id" = String, Path), TicketQuery),
    responses((status = 101, description = "Switching to the WebSocket (subprotocol `binary` when asked)"),
        (status = 400, description = "Not a WebSocket upgrade", body = ErrorBody),
        (status = 401, description = "Missing, unknown, expired or reused ticket", body = ErrorBody),
        (status = 403, description = "Another user's session or ticket, or a foreign Origin", body = ErrorBody),
        (status = 409, description = "Still booting", body = ErrorBody),
        (status = 410, description = "The session ended", body = ErrorBody)))]
pub(crate) async fn websock(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
    MaybeUser(caller): MaybeUser,
    crate::origin::Peer(peer): crate::origin::Peer,
    headers: HeaderMap,
    upgrade: Result<crate::ws::Upgrade, crate::ws::NotAWebSocket>,
) -> Response {
    let refuse = |e: ApiError, why: &str| {
        tracing::warn!(session = %id, status = e.status.as_u16(), why, "viewer WebSocket refused");
        e.into_response()
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            tracing::warn!(session = %id, why = rejection.0, "viewer WebSocket refused: not an upgrade");
            return rejection.into_response();
        }
    };
    let logins = match logins(&state) {
        Ok(l) => l.clone(),
        Err(e) => return refuse(e, "no login sessions"),
    };
    // Browsers always send Origin on a WebSocket; without one (or with a
    // foreign one) this is not our viewer page.
    if !headers.contains_key("origin")
        || !crate::origin::from_our_page(&headers, peer, &state.config)
    {
        return refuse(
            ApiError::forbidden(
                "this WebSocket may only be opened from this server's pages (its Origin)",
            ),
            "foreign or missing origin",
        );
    }
    let Some(ticket) = q.ticket.filter(|t| !t.is_empty()) else {
        return refuse(ApiError::from(LoginError::BadTicket), "no ticket");
    };
    let admitted = match logins.admit(&id, &ticket, caller.map(|p| p.user.id)) {
        Ok(a) => a,
        Err(e) => return refuse(ApiError::from(e), "ticket or session refused"),
    };
    let vnc = match logins
        .manager()
        .connect_service(&admitted.sandbox, VNC_SERVICE)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "vnc_unreachable",
                    format!("the remote browser's VNC server cannot be reached: {e}"),
                ),
                "vnc unreachable",
            )
        }
    };
    let metrics = logins.metrics().clone();
    upgrade.on_upgrade(&state.tasks, move |ws| async move {
        metrics.viewers.inc();
        let touch = {
            let (logins, id) = (logins.clone(), id.clone());
            move || logins.touch(&id)
        };
        let end = crate::ws::bridge(
            ws,
            crate::ws::Stream::Unix(vnc),
            admitted.ending,
            touch,
            metrics.clone(),
        )
        .await;
        metrics.viewers.dec();
        tracing::info!(session = %id, end, "viewer disconnected");
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct StartLogin {
    /// The user whose CLI gets logged in.
    #[schema(schema_with = crate::schema::uuid)]
    user_id: String,
    #[schema(schema_with = crate::schema::provider)]
    provider: String,
    #[serde(default)]
    #[schema(schema_with = crate::schema::login_mode)]
    mode: Option<String>,
}

/// Start a provider login session: answers 202 at once with the session
/// id; the sandbox boots in the background (watch `GET
/// /api/auth/session/{id}` or its `/events`). Mode `browser` (default)
/// streams a remote browser; `code` relays a code instead (see
/// `/api/auth/providers` for what each provider offers).
#[utoipa::path(post, operation_id = "start_login_session", path = "/api/auth/start", tag = "auth", request_body = StartLogin,
    security(("bearer" = [])),
    responses(
        (status = 202, body = SessionBody, description = "Started: the session, booting"),
        (status = 400, description = "Malformed userId, unknown provider or mode, no vault", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Another user's id", body = ErrorBody),
        (status = 404, description = "Unknown user", body = ErrorBody),
        (status = 409, description = "A login for this provider is already running", body = ErrorBody),
        (status = 429, description = "Sandbox quota reached", body = ErrorBody),
        (status = 503, description = "Login sessions are not available here, or their environment is being prepared (Retry-After)", body = ErrorBody)))]
pub(crate) async fn start(
    State(state): State<AppState>,
    CurrentUser(principal): CurrentUser,
    ApiJson(body): ApiJson<StartLogin>,
) -> ApiResult<axum::response::Response> {
    let user_id = UserId::parse("userId", &body.user_id)?;
    let provider: Provider = body.provider.parse()?;
    let mode = match body.mode.as_deref().unwrap_or("browser") {
        "browser" => polydev_sessions::login::Mode::Browser,
        "code" => polydev_sessions::login::Mode::Code,
        other => {
            return Err(ApiError::bad_request(
                "invalid_mode",
                format!("mode must be \"browser\" or \"code\", not {other:?}"),
            ))
        }
    };
    ensure_self_or_admin(&principal, user_id)?;
    // The policy asks about the user who is signed in, not the caller.
    let target = state.store.user_by_id(user_id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::user_not_found(),
        other => other.into(),
    })?;
    let logins = logins(&state)?;
    let view = logins
        .start(user_id, target.role == Role::Admin, provider, mode)
        .await
        .map_err(|e| ApiError::from(e).for_caller(principal.is_admin()))?;
    Ok(accepted(&view))
}
