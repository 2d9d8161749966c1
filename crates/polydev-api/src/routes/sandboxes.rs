//! Sandboxes: create (warm pool first, cold start as the fallback), read,
//! exec with streamed output (SSE, or one JSON answer), files, delete; and
//! v1's `/api/vms` shape. Users see their own; admins everyone's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_domain::{Role, UserId};
use polydev_sandbox::{
    AgentEvent, CreateRequest, DriverError, Limits, Manager, Network, SandboxId, SandboxView,
    RESERVED_LABELS, SYSTEM_LABEL,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::limits::{
    MAX_ARG_BYTES, MAX_ENV_NAME_BYTES, MAX_ENV_VALUE_BYTES, MAX_ENV_VARS, MAX_EXEC_ARGS,
};
use crate::state::AppState;

fn manager(state: &AppState) -> ApiResult<&Arc<Manager>> {
    state.manager()
}

fn parse_id(raw: &str) -> ApiResult<SandboxId> {
    SandboxId::parse(raw).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            format!("no sandbox {raw:?}"),
        )
    })
}

/// Whose sandboxes the caller may touch: `None` for admins (all).
fn scope(user: &CurrentUser) -> Option<UserId> {
    (user.0.user.role != Role::Admin).then_some(user.0.user.id)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CreateBody {
    /// The template (its image must be built on this server).
    #[schema(example = "runtime", value_type = Template)]
    template: String,
    /// Above the template's default only for admins, up to its maximum
    /// (400 `limit_too_high` names the limit and the most allowed).
    #[schema(schema_with = memory_mb)]
    memory_mb: Option<u64>,
    #[schema(schema_with = pids)]
    pids: Option<u32>,
    #[schema(schema_with = cpu_millis)]
    cpu_millis: Option<u32>,
    #[schema(schema_with = disk_mb)]
    disk_mb: Option<u64>,
    /// `none` (loopback only; the default) or `egress` (plus the user's
    /// egress proxy at 127.0.0.1:3128 inside, set in HTTP(S)_PROXY).
    #[schema(value_type = Option<NetworkMode>)]
    network: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::env)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::labels)]
    labels: BTreeMap<String, String>,
    #[schema(schema_with = ttl_secs)]
    ttl_secs: Option<u64>,
}

/// The templates a sandbox can be made from.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: the field stays a string the manager checks
#[schema(rename_all = "lowercase")]
pub(crate) enum Template {
    Minimal,
    Base,
    Runtime,
    Browser,
}

/// A sandbox's network.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
#[schema(rename_all = "lowercase")]
pub(crate) enum NetworkMode {
    None,
    Egress,
}

fn memory_mb() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(16, u64::MAX >> 20, "Memory in MiB (at least 16).")
}
fn pids() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(8, u32::MAX.into(), "Most processes (at least 8).")
}
fn cpu_millis() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(10, u32::MAX.into(), "Thousandths of a core (at least 10).")
}
fn disk_mb() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(1, u64::MAX >> 20, "Writable disk in MiB (at least 1).")
}
fn ttl_secs() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(
        1,
        polydev_sandbox::ManagerConfig::default().max_ttl.as_secs(),
        "Seconds until the reaper destroys it (default: the server's `[sandbox] default_ttl_secs`; at most 24 h).",
    )
}

/// Environment variables as a process can take them: names without `=`
/// or NUL, values without NUL, bounded in number and length.
fn check_env(code: &'static str, env: &BTreeMap<String, String>) -> ApiResult<()> {
    if let Some(k) = env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ApiError::bad_request(
            code,
            format!("env name {k:?} is not valid"),
        ));
    }
    if let Some(k) = env.iter().find(|(_, v)| v.contains('\0')).map(|(k, _)| k) {
        return Err(ApiError::bad_request(
            code,
            format!("env {k}: a value must not contain NUL"),
        ));
    }
    if env.len() > MAX_ENV_VARS
        || env
            .iter()
            .any(|(k, v)| k.len() > MAX_ENV_NAME_BYTES || v.len() > MAX_ENV_VALUE_BYTES)
    {
        return Err(ApiError::bad_request(
            code,
            "env: at most 128 variables, names ≤ 256 and values ≤ 64 KiB",
        ));
    }
    Ok(())
}

fn create_request(user: &CurrentUser, m: &Manager, body: CreateBody) -> ApiResult<CreateRequest> {
    let network = match body.network.as_deref() {
        None | Some("none") => Network::None,
        Some("egress") => Network::Egress,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_sandbox_request",
                format!("network must be `none` or `egress`, got {other:?}"),
            ))
        }
    };
    let custom = body.memory_mb.is_some()
        || body.pids.is_some()
        || body.cpu_millis.is_some()
        || body.disk_mb.is_some();
    let d: Limits = m.config().default_limits;
    let limits = custom.then(|| Limits {
        cpu_millis: body.cpu_millis.unwrap_or(d.cpu_millis),
        memory_bytes: body
            .memory_mb
            .map_or(d.memory_bytes, |mb| mb.saturating_mul(1 << 20)),
        pids: body.pids.unwrap_or(d.pids),
        disk_bytes: body
            .disk_mb
            .map_or(d.disk_bytes, |mb| mb.saturating_mul(1 << 20)),
    });
    check_env("invalid_sandbox_request", &body.env)?;
    if body.labels.len() > 16
        || body
            .labels
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 256)
    {
        return Err(ApiError::bad_request(
            "invalid_sandbox_request",
            "labels: at most 16, keys ≤ 64 and values ≤ 256 bytes",
        ));
    }
    if let Some(k) = body
        .labels
        .keys()
        .find(|k| RESERVED_LABELS.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(
            "invalid_sandbox_request",
            format!("the label {k:?} is the controller's own; choose another name"),
        ));
    }
    Ok(CreateRequest {
        template: body.template,
        limits,
        network,
        env: body.env.into_iter().collect(),
        labels: body.labels,
        ttl: body.ttl_secs.map(Duration::from_secs),
        privileged: user.0.is_admin(),
        system: None,
    })
}

/// Create a sandbox; answers once its agent is ready (or its boot failed).
#[utoipa::path(post, operation_id = "create_sandbox", path = "/api/sandboxes", tag = "sandboxes", request_body = CreateBody,
    security(("bearer" = [])),
    responses(
        (status = 201, body = SandboxView, description = "The sandbox: id, status, stages, …"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, description = "Per-user quota reached", body = ErrorBody),
        (status = 502, description = "Boot failed: stage reached and log tail in details", body = ErrorBody),
        (status = 503, description = "Host at capacity (Retry-After) or no driver", body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<SandboxView>)> {
    let m = manager(&state)?;
    let req = create_request(&user, m, body)?;
    let view = m
        .create(user.0.user.id, req)
        .await
        .map_err(|e| ApiError::from(e).for_caller(user.0.is_admin()))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SandboxList {
    sandboxes: Vec<SandboxView>,
}

/// Your sandboxes, newest first (admins: everyone's).
#[utoipa::path(get, path = "/api/sandboxes", tag = "sandboxes", security(("bearer" = [])),
    responses((status = 200, body = SandboxList), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ApiResult<Json<SandboxList>> {
    let sandboxes = manager(&state)?
        .list(scope(&user))
        .await
        .map_err(ApiError::from)?;
    Ok(Json(SandboxList { sandboxes }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxDetail {
    #[serde(flatten)]
    sandbox: SandboxView,
    /// Live usage from the kernel (running sandboxes only).
    stats: Option<polydev_sandbox::Stats>,
}

/// One sandbox, with live usage while it runs.
#[utoipa::path(get, operation_id = "get_sandbox", path = "/api/sandboxes/{id}", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxDetail), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxDetail>> {
    let m = manager(&state)?;
    let id = parse_id(&id)?;
    let sandbox = m.get(&id, scope(&user)).await.map_err(ApiError::from)?;
    let stats = if sandbox.status == polydev_domain::SandboxStatus::Ready {
        m.stats(&id).await.ok()
    } else {
        None
    };
    Ok(Json(SandboxDetail { sandbox, stats }))
}

/// Destroy a sandbox now.
#[utoipa::path(delete, path = "/api/sandboxes/{id}", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let m = manager(&state)?;
    m.delete(&parse_id(&id)?, scope(&user))
        .await
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ExecBody {
    #[schema(schema_with = crate::schema::command)]
    cmd: Vec<String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::env)]
    env: BTreeMap<String, String>,
    /// Text written to stdin (then closed).
    stdin: Option<String>,
    #[schema(schema_with = exec_timeout_ms)]
    timeout_ms: Option<u64>,
}

fn exec_timeout_ms() -> utoipa::openapi::schema::Schema {
    crate::schema::bounded(
        1,
        3_600_000,
        "Killed after this many milliseconds (default 60 000, at most 3 600 000).",
    )
}

/// One streamed exec event (SSE `event:` names: started, stdout, stderr, exit, error).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExecAnswer {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    /// The output passed `MAX_JSON_OUTPUT` bytes: what is here is its
    /// start, and the command was stopped (stream with SSE for more).
    truncated: bool,
}

/// The most output (stdout and stderr together) a JSON exec answer holds.
pub(crate) const MAX_JSON_OUTPUT: usize = 16 << 20;

/// What `c` costs in a JSON string (control characters are escaped as
/// `\u00XX`, quotes and backslashes doubled).
fn json_cost(c: char) -> usize {
    match c {
        '"' | '\\' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Appends `add` to `out` while the encoded answer stays within
/// `MAX_JSON_OUTPUT` (`used` counts it); past it, sets `truncated`.
fn push_capped(out: &mut String, add: &str, used: &mut usize, truncated: &mut bool) {
    for c in add.chars() {
        let cost = json_cost(c);
        if *used + cost > MAX_JSON_OUTPUT {
            *truncated = true;
            return;
        }
        *used += cost;
        out.push(c);
    }
}

fn text(data: &str) -> String {
    B64.decode(data)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Run a command in a sandbox. With `Accept: text/event-stream` the output
/// streams as events (`started`, `stdout`, `stderr`, `exit`, `error`);
/// otherwise one JSON answer when it ends.
#[utoipa::path(post, path = "/api/sandboxes/{id}/exec", tag = "sandboxes", request_body = ExecBody,
    security(("bearer" = [])), params(("id" = String, Path)),
    responses(
        (status = 200, body = ExecAnswer, description = "JSON, or an SSE stream when asked"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn exec(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Response> {
    // The request deadline does not cover an exec (its `timeoutMs` does):
    // reaching the agent and starting the command get one of their own.
    let start_deadline = state.config.request_timeout;
    let agent_late = || {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "agent_timeout",
            "the sandbox's agent did not take the command in time",
        )
    };
    let mut agent = tokio::time::timeout(start_deadline, live_agent(&state, &user, &id))
        .await
        .map_err(|_| agent_late())??;
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::bad_request(
            "invalid_exec",
            "cmd must name a program",
        ));
    }
    if body.cmd.len() > MAX_EXEC_ARGS
        || body
            .cmd
            .iter()
            .any(|a| a.contains('\0') || a.len() > MAX_ARG_BYTES)
    {
        return Err(ApiError::bad_request(
            "invalid_exec",
            "cmd: at most 4096 arguments, none containing NUL, each at most 131 071 bytes",
        ));
    }
    check_env("invalid_exec", &body.env)?;
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(60_000).clamp(1, 3_600_000));
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // A JSON answer is held in memory: its slot is taken before the
    // command starts, so a refusal leaves nothing running.
    let slot = if wants_sse {
        None
    } else {
        Some(state.exec_gate.enter(user.0.user.id).await?)
    };
    tokio::time::timeout(
        start_deadline,
        agent.start_exec(
            body.cmd,
            body.env.into_iter().collect(),
            body.stdin.as_deref().map(str::as_bytes),
            timeout,
        ),
    )
    .await
    .map_err(|_| agent_late())?
    .map_err(|e| ApiError::from(DriverError::from(e)))?;
    if !wants_sse {
        let _slot = slot;
        let mut encoded = 0usize;
        let mut answer = ExecAnswer {
            exit_code: None,
            signal: None,
            timed_out: false,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
        };
        let until = tokio::time::Instant::now() + timeout + Duration::from_secs(10);
        loop {
            let next = tokio::time::timeout_at(until, agent.next_event())
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "agent_timeout",
                        "the sandbox's agent did not report the command's end in time",
                    )
                })?;
            match next {
                Ok(AgentEvent::Stdout { data }) => push_capped(
                    &mut answer.stdout,
                    &text(&data),
                    &mut encoded,
                    &mut answer.truncated,
                ),
                Ok(AgentEvent::Stderr { data }) => push_capped(
                    &mut answer.stderr,
                    &text(&data),
                    &mut encoded,
                    &mut answer.truncated,
                ),
                Ok(AgentEvent::Exit {
                    code,
                    signal,
                    timed_out,
                }) => {
                    answer.exit_code = code;
                    answer.signal = signal;
                    answer.timed_out = timed_out;
                    return Ok(Json(answer).into_response());
                }
                Ok(AgentEvent::Error { code, message }) => {
                    return Err(ApiError::bad_request(
                        "exec_failed",
                        format!("{code}: {message}"),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(ApiError::from(DriverError::from(e))),
            }
            if answer.truncated {
                // Dropping the connection makes the agent kill the command.
                drop(agent);
                return Ok(Json(answer).into_response());
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let until = tokio::time::Instant::now() + timeout + Duration::from_secs(10);
    state.tasks.spawn(async move {
        loop {
            let Ok(next) = tokio::time::timeout_at(until, agent.next_event()).await else {
                let payload = serde_json::json!({"code": "agent_timeout", "message": "the sandbox's agent did not report the command's end in time"});
                let _ = tx
                    .send(Ok(SseEvent::default()
                        .event("error")
                        .data(payload.to_string())))
                    .await;
                break;
            };
            let (name, payload, last) = match next {
                Ok(AgentEvent::Started { pid }) => {
                    ("started", serde_json::json!({"pid": pid}), false)
                }
                Ok(AgentEvent::Stdout { data }) => {
                    ("stdout", serde_json::json!({"data": text(&data)}), false)
                }
                Ok(AgentEvent::Stderr { data }) => {
                    ("stderr", serde_json::json!({"data": text(&data)}), false)
                }
                Ok(AgentEvent::Exit {
                    code,
                    signal,
                    timed_out,
                }) => (
                    "exit",
                    serde_json::json!({"exitCode": code, "signal": signal, "timedOut": timed_out}),
                    true,
                ),
                Ok(AgentEvent::Error { code, message }) => (
                    "error",
                    serde_json::json!({"code": code, "message": message}),
                    true,
                ),
                Ok(_) => continue,
                Err(e) => (
                    "error",
                    serde_json::json!({"code": "agent", "message": e.to_string()}),
                    true,
                ),
            };
            let event = SseEvent::default().event(name).data(payload.to_string());
            // A client that went away drops the agent connection, and the
            // agent kills the process.
            if tx.send(Ok(event)).await.is_err() || last {
                break;
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    /// Absolute path inside the sandbox.
    path: String,
}

fn check_path(p: &str) -> ApiResult<()> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "path must be absolute",
        ));
    }
    Ok(())
}

/// A connection to the agent of a live sandbox the caller may use (404 for
/// others' or unknown ids, 410 once it has ended).
async fn live_agent(
    state: &AppState,
    user: &CurrentUser,
    raw_id: &str,
) -> ApiResult<polydev_sandbox::AgentClient> {
    let m = manager(state)?;
    let id = parse_id(raw_id)?;
    let view = m.live_for(&id, scope(user)).await.map_err(ApiError::from)?;
    if let Some(kind) = view.labels.get(SYSTEM_LABEL) {
        return Err(ApiError::forbidden(format!(
            "sandbox {id} belongs to a {kind} and holds your credential: nobody may run commands in it or read its files (delete it to end it)"
        )));
    }
    m.agent(&id, Duration::from_secs(5))
        .await
        .map_err(ApiError::from)
}

/// Write a file into a sandbox (the body is the content).
#[utoipa::path(put, path = "/api/sandboxes/{id}/files", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path), FileQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn put_file(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    check_path(&q.path)?;
    let mut agent = live_agent(&state, &user, &id).await?;
    agent
        .put_file(&q.path, 0o644, &body)
        .await
        .map_err(|e| match e {
            polydev_sandbox::ClientError::Refused { message, .. } => {
                ApiError::bad_request("file_error", message)
            }
            other => ApiError::from(DriverError::from(other)),
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a file from a sandbox.
#[utoipa::path(get, path = "/api/sandboxes/{id}/files", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path), FileQuery),
    responses((status = 200, description = "The bytes"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_file(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> ApiResult<Response> {
    check_path(&q.path)?;
    let mut agent = live_agent(&state, &user, &id).await?;
    let bytes = agent.get_file(&q.path).await.map_err(|e| match e {
        polydev_sandbox::ClientError::Refused { message, .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "file_not_found", message)
        }
        other => ApiError::from(DriverError::from(other)),
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VmCreate {
    #[schema(schema_with = crate::schema::uuid)]
    user_id: String,
    /// `cli` (the runtime template) or `browser`.
    #[schema(value_type = VmType)]
    vm_type: String,
}

/// v1's VM kinds.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
#[schema(rename_all = "lowercase")]
pub(crate) enum VmType {
    Cli,
    Browser,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VmView {
    vm_id: String,
    /// Sandboxes have no address of their own (loopback only); kept for v1 clients.
    ip_address: Option<String>,
    status: String,
}

/// v1: create a VM (a sandbox of the `runtime` or `browser` template).
#[utoipa::path(post, path = "/api/vms/create", tag = "sandboxes", request_body = VmCreate,
    security(("bearer" = [])),
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn vm_create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(body): ApiJson<VmCreate>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    let m = manager(&state)?;
    let owner = UserId::parse("userId", &body.user_id)?;
    if owner != user.0.user.id && user.0.user.role != Role::Admin {
        return Err(ApiError::forbidden("you can create VMs only for yourself"));
    }
    let template = match body.vm_type.as_str() {
        "cli" => "runtime",
        "browser" => "browser",
        other => {
            return Err(ApiError::bad_request(
                "invalid_vm_type",
                format!("vmType must be `cli` or `browser`, got {other:?}"),
            ))
        }
    };
    let req = CreateRequest {
        template: template.into(),
        privileged: user.0.is_admin(),
        ..Default::default()
    };
    let v = m
        .create(owner, req)
        .await
        .map_err(|e| ApiError::from(e).for_caller(user.0.is_admin()))?;
    Ok((
        StatusCode::CREATED,
        Json(VmView {
            vm_id: v.id,
            ip_address: None,
            status: v.status.as_str().to_owned(),
        }),
    ))
}

/// v1: destroy a VM.
#[utoipa::path(delete, path = "/api/vms/{id}", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(crate) async fn vm_delete(
    state: State<AppState>,
    user: CurrentUser,
    id: Path<String>,
) -> ApiResult<StatusCode> {
    delete(state, user, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answers_are_capped_by_their_encoded_size() {
        let (mut out, mut used, mut truncated) = (String::new(), 0, false);
        push_capped(
            &mut out,
            &"\u{1}".repeat(MAX_JSON_OUTPUT),
            &mut used,
            &mut truncated,
        );
        assert!(truncated);
        assert_eq!(out.len(), MAX_JSON_OUTPUT / 6);
        assert!(serde_json::to_string(&out).unwrap().len() <= MAX_JSON_OUTPUT + 2);
    }
}
