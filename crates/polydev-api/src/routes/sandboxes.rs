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
    AgentEvent, CreateRequest, DriverError, LimitKind, Limits, Manager, ManagerError, Network,
    SandboxId, SandboxView, RESERVED_LABELS, SYSTEM_LABEL,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::CurrentUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiQuery};
use crate::AppState;

fn manager(state: &AppState) -> ApiResult<&Arc<Manager>> {
    state.sandboxes.as_ref().map_err(|why| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sandboxes_unavailable",
            why.to_string(),
        )
    })
}

pub(crate) fn manager_error(e: ManagerError) -> ApiError {
    match e {
        ManagerError::Invalid(m) => ApiError::bad_request("invalid_sandbox_request", m),
        ManagerError::Image(polydev_sandbox::ImageError::NoImage(t))
            if !polydev_sandbox::build::TEMPLATES.contains(&t.as_str()) =>
        {
            ApiError::bad_request(
                "unknown_template",
                format!("there is no template {t:?} on this server"),
            )
        }
        ManagerError::Image(polydev_sandbox::ImageError::NoImage(t)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "environment_missing",
            format!("this server has no {t} environment yet; its operator needs to prepare it"),
        ),
        ManagerError::Image(e) => ApiError::bad_request("unknown_template", e.to_string()),
        ManagerError::Preparing { template, state } => {
            let how_far = match &state {
                polydev_sandbox::build::Prepared::Building {
                    step, of, what, since_ms,
                } => {
                    let mins = (polydev_store::now_ms() - since_ms).max(0) / 60_000;
                    format!(" (step {step} of {of}: {what}; started {mins} min ago)")
                }
                _ => " (waiting for the one before it)".to_owned(),
            };
            ApiError {
                retry_after: Some(10),
                details: serde_json::to_value(&state).ok(),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "environment_preparing",
                    format!("the {template} environment is being prepared on this server{how_far}; this takes a few minutes on a first start, try again shortly"),
                )
            }
        }
        ManagerError::LimitTooHigh {
            limit,
            asked,
            max,
            admin_only,
        } => {
            let field = match limit {
                LimitKind::Memory => "memoryMb",
                LimitKind::Pids => "pids",
                LimitKind::Cpu => "cpuMillis",
                LimitKind::Disk => "diskMb",
            };
            let message = if admin_only {
                format!("{field} {asked} is above {max}, this template's default; only an admin may ask for more")
            } else {
                format!(
                    "{field} {asked} is above {max}, the most a sandbox of this template may have"
                )
            };
            ApiError {
                details: Some(serde_json::json!({"limit": field, "max": max})),
                ..ApiError::bad_request("limit_too_high", message)
            }
        }
        e @ ManagerError::UserQuota(_) => ApiError {
            retry_after: None,
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "sandbox_quota",
                e.to_string(),
            )
        },
        e @ ManagerError::UserMemory { .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "sandbox_memory_quota",
            e.to_string(),
        ),
        e @ (ManagerError::HostMemory | ManagerError::HostMemoryInUse) => ApiError {
            retry_after: Some(10),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "host_at_capacity", e.to_string())
        },
        e @ ManagerError::HostCapacity(_) => ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "host_at_capacity",
                e.to_string(),
            )
        },
        ManagerError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            format!("no sandbox {id}"),
        ),
        ManagerError::Gone(id) => ApiError::new(
            StatusCode::GONE,
            "sandbox_gone",
            format!("sandbox {id} has ended"),
        ),
        ManagerError::Driver(DriverError::Boot {
            stage,
            message,
            stages,
            log_tail,
        }) => ApiError {
            details: Some(
                serde_json::json!({"stage": stage, "stages": stages, "logTail": log_tail}),
            ),
            ..ApiError::new(
                StatusCode::BAD_GATEWAY,
                "sandbox_boot_failed",
                format!("the sandbox failed to boot after stage `{stage}`: {message}"),
            )
        },
        ManagerError::Driver(DriverError::Unavailable(m)) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sandboxes_unavailable", m)
        }
        ManagerError::Driver(DriverError::Agent(polydev_sandbox::ClientError::Timeout(d))) => {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "agent_timeout",
                format!(
                    "the sandbox's agent did not answer within {} s (the sandbox may be stuck; delete it to end it)",
                    d.as_secs()
                ),
            )
        }
        ManagerError::Driver(DriverError::NotFound(id)) => ApiError::new(
            StatusCode::GONE,
            "sandbox_gone",
            format!("sandbox {id} is no longer running"),
        ),
        ManagerError::Store(s) => s.into(),
        other => ApiError::internal("sandbox error", &other),
    }
}

/// What an admin can do about an error a user could not: the operator's
/// command, added to the message for admins only.
pub(crate) fn for_caller(mut e: ApiError, admin: bool) -> ApiError {
    if admin && e.code == "environment_missing" {
        let template = e
            .message
            .split_whitespace()
            .nth(4)
            .unwrap_or("runtime")
            .to_owned();
        e.message.push_str(&format!(
            " (as an operator: `polydev image build {template}`, or restart polydev, which prepares the runtime and browser environments)"
        ));
    }
    e
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
    /// `minimal`, `runtime`, `browser`, … (a template with a built image).
    #[schema(example = "runtime")]
    template: String,
    memory_mb: Option<u64>,
    pids: Option<u32>,
    /// Thousandths of a core.
    cpu_millis: Option<u32>,
    disk_mb: Option<u64>,
    /// `none` (loopback only; the default) or `egress` (plus the user's
    /// egress proxy at 127.0.0.1:3128 inside, set in HTTP(S)_PROXY).
    network: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ttl_secs: Option<u64>,
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
    for k in body.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::bad_request(
                "invalid_sandbox_request",
                format!("env name {k:?} is not valid"),
            ));
        }
    }
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
    if body.env.len() > 128
        || body
            .env
            .iter()
            .any(|(k, v)| k.len() > 256 || v.len() > 64 * 1024)
    {
        return Err(ApiError::bad_request(
            "invalid_sandbox_request",
            "env: at most 128 variables, names ≤ 256 and values ≤ 64 KiB",
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
        (status = 201, body = Object, description = "The sandbox: id, status, stages, …"),
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
        .map_err(|e| for_caller(manager_error(e), user.0.is_admin()))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SandboxList {
    #[schema(value_type = Vec<Object>)]
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
        .map_err(manager_error)?;
    Ok(Json(SandboxList { sandboxes }))
}

#[derive(Debug, Serialize)]
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
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxDetail>> {
    let m = manager(&state)?;
    let id = parse_id(&id)?;
    let sandbox = m.get(&id, scope(&user)).await.map_err(manager_error)?;
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
        .map_err(manager_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ExecBody {
    /// Program and arguments.
    #[schema(example = json!(["sh", "-c", "echo hi"]))]
    cmd: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Text written to stdin (then closed).
    stdin: Option<String>,
    /// Killed after this (default 60 000, at most 3 600 000).
    timeout_ms: Option<u64>,
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

/// JSON exec answers held at once: in all, and per user (each is up to
/// `MAX_JSON_OUTPUT` in memory until it is sent).
#[derive(Debug)]
pub struct ExecGate {
    global: tokio::sync::Semaphore,
    per_user: std::sync::Mutex<std::collections::HashMap<UserId, u32>>,
    per_user_max: u32,
}

impl Default for ExecGate {
    fn default() -> Self {
        Self {
            global: tokio::sync::Semaphore::new(64),
            per_user: Default::default(),
            per_user_max: 4,
        }
    }
}

/// A user's place at the gate, given back on drop.
struct UserSlot<'a> {
    gate: &'a ExecGate,
    user: UserId,
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.gate.per_user.lock() {
            if let Some(n) = m.get_mut(&self.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.user);
                }
            }
        }
    }
}

/// Held while a JSON answer is gathered.
struct ExecSlot<'a> {
    _user: UserSlot<'a>,
    _global: tokio::sync::SemaphorePermit<'a>,
}

impl ExecGate {
    async fn enter(&self, user: UserId) -> ApiResult<ExecSlot<'_>> {
        {
            let mut m = self
                .per_user
                .lock()
                .map_err(|_| ApiError::unavailable("exec gate poisoned", 1))?;
            let n = m.entry(user).or_insert(0);
            if *n >= self.per_user_max {
                return Err(ApiError::too_many_requests(
                    format!("you have {} commands waiting for a JSON answer already; wait for one, or stream with Accept: text/event-stream", self.per_user_max),
                    1,
                ));
            }
            *n += 1;
        }
        let slot = UserSlot { gate: self, user };
        match tokio::time::timeout(Duration::from_secs(10), self.global.acquire()).await {
            Ok(Ok(permit)) => Ok(ExecSlot {
                _user: slot,
                _global: permit,
            }),
            _ => Err(ApiError::unavailable(
                "this server answers too many commands at once; try again shortly",
                2,
            )),
        }
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
    let mut agent = live_agent(&state, &user, &id).await?;
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::bad_request(
            "invalid_exec",
            "cmd must name a program",
        ));
    }
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(60_000).clamp(1, 3_600_000));
    agent
        .start_exec(
            body.cmd,
            body.env.into_iter().collect(),
            body.stdin.as_deref().map(str::as_bytes),
            timeout,
        )
        .await
        .map_err(|e| manager_error(DriverError::from(e).into()))?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_sse {
        let _slot = state.exec_gate.enter(user.0.user.id).await?;
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
                Err(e) => return Err(manager_error(DriverError::from(e).into())),
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
    let view = m.live_for(&id, scope(user)).await.map_err(manager_error)?;
    if let Some(kind) = view.labels.get(SYSTEM_LABEL) {
        return Err(ApiError::forbidden(format!(
            "sandbox {id} belongs to a {kind} and holds your credential: nobody may run commands in it or read its files (delete it to end it)"
        )));
    }
    m.agent(&id, Duration::from_secs(5))
        .await
        .map_err(|e| manager_error(e.into()))
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
            other => manager_error(DriverError::from(other).into()),
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
        other => manager_error(DriverError::from(other).into()),
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct VmCreate {
    #[schema(value_type = String, format = Uuid)]
    user_id: String,
    /// `cli` (the runtime template) or `browser`.
    vm_type: String,
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
        .map_err(|e| for_caller(manager_error(e), user.0.is_admin()))?;
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

    #[tokio::test]
    async fn the_exec_gate_holds_a_few_answers_per_user_and_gives_them_back() {
        let gate = ExecGate::default();
        let (ada, bob) = (UserId::new(), UserId::new());
        let mut held = Vec::new();
        for _ in 0..gate.per_user_max {
            held.push(gate.enter(ada).await.unwrap());
        }
        assert_eq!(
            gate.enter(ada).await.err().unwrap().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert!(gate.enter(bob).await.is_ok(), "another user is not held up");
        held.pop();
        assert!(gate.enter(ada).await.is_ok(), "a slot came back");
        drop(held);
        assert!(gate
            .per_user
            .lock()
            .unwrap()
            .get(&ada)
            .is_none_or(|n| *n == 0));
    }

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
