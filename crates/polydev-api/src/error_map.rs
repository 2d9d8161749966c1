//! How the errors of the parts below the API become API errors: one
//! `From` per part (sandboxes, runs, login sessions), so a route writes `?`.

use axum::http::StatusCode;
use polydev_sandbox::{DriverError, LimitKind, ManagerError};
use polydev_sessions::login::LoginError;
use polydev_sessions::runs::RunError;
use serde_json::json;

use crate::error::ApiError;

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> Self {
        ManagerError::from(e).into()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
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
            ManagerError::PrepareFailed { template, error } => ApiError {
                operator_note: Some(format!("{error} (as an operator: `polydev image status`, then `polydev image build {template}`, or restart polydev, which tries again)")),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "environment_failed",
                    format!("preparing the {template} environment on this server failed; its operator needs to look at it"),
                )
            },
            ManagerError::Preparing { template, state } => {
                let how_far = match &state {
                    polydev_sandbox::build::Prepared::Building {
                        step, of, what, since_ms,
                    } => {
                        let mins = (polydev_store::now_ms() - since_ms).max(0) / 60_000;
                        if *of == 0 {
                            format!(" ({what}; started {mins} min ago)")
                        } else {
                            format!(" (step {step} of {of}: {what}; started {mins} min ago)")
                        }
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
}

/// What an admin can do about an error a user could not: the operator's
/// command, added to the message for admins only.
impl ApiError {
    pub(crate) fn for_caller(self, admin: bool) -> ApiError {
        let mut e = self;
        if let Some(note) = e.operator_note.take().filter(|_| admin) {
            e.message.push_str(&format!(": {note}"));
        }
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
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Invalid(m) => ApiError::bad_request("invalid_run_request", m),
            e @ RunError::Queued(..) => {
                ApiError::new(StatusCode::CONFLICT, "provider_queued", e.to_string())
            }
            RunError::NotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "run_not_found",
                format!("no run {id}"),
            ),
            e @ RunError::Finished(_) => {
                ApiError::new(StatusCode::GONE, "run_finished", e.to_string())
            }
            e @ RunError::TooManyViewers => ApiError::too_many_requests(e.to_string(), 5),
            e @ RunError::Busy { .. } => ApiError {
                retry_after: Some(10),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "runs_at_capacity",
                    e.to_string(),
                )
            },
            RunError::TooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "workspace_too_large", m)
            }
            RunError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "run_conflict", m),
            RunError::Timeout(m) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload_timeout", m),
            e @ RunError::DailyLimit { resets_at, .. } => {
                let wait = resets_at.saturating_sub(polydev_store::now_ms() as u64 / 1000);
                ApiError {
                    retry_after: Some(wait.max(1)),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "daily_run_limit",
                        e.to_string(),
                    )
                }
            }
            RunError::NotOffered(e) => not_offered(&e),
            RunError::Sandbox(e) => ApiError::from(e),
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Invalid(m) => ApiError::bad_request("invalid_login_request", m),
            LoginError::NotFound(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "login_session_not_found",
                format!("no login session {id}"),
            ),
            LoginError::Forbidden => {
                ApiError::forbidden("this login session belongs to another user")
            }
            LoginError::Gone(view) => {
                let mut e = ApiError::new(
                    StatusCode::GONE,
                    "login_session_gone",
                    format!(
                        "login session {} has {}{}; start a new one",
                        view.session_id,
                        view.state,
                        view.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                );
                e.details = serde_json::to_value(&*view).ok();
                e
            }
            LoginError::Busy(provider, id) => {
                let mut e = ApiError::new(
                    StatusCode::CONFLICT,
                    "login_in_progress",
                    format!("a {provider} login session ({id}) is already running for you; finish or cancel it first"),
                );
                e.details = Some(json!({ "sessionId": id }));
                e
            }
            LoginError::NotReady(m) => ApiError::new(StatusCode::CONFLICT, "login_not_ready", m),
            LoginError::Unavailable(m) => ApiError::unavailable(m, 5),
            LoginError::NotOffered(e) => not_offered(&e),
            e @ LoginError::BadTicket => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_ticket", e.to_string())
            }
            LoginError::Manager(e) => ApiError::from(e),
            LoginError::Store(e) => e.into(),
        }
    }
}

/// 403 for a sign-in the installation's policy does not offer: the
/// vendor's reason and where it says so, in the message and the details.
fn not_offered(e: &polydev_sessions::providers::NotOffered) -> ApiError {
    ApiError {
        details: Some(json!({
            "provider": e.provider.as_str(),
            "subscriptionLogin": e.policy.as_str(),
            "reason": e.reason,
            "terms": e.terms,
        })),
        ..ApiError::new(StatusCode::FORBIDDEN, "sign_in_not_offered", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed first-start build tells a user that it failed and an
    /// admin why; the build's account never reaches a user.
    #[test]
    fn a_failed_preparation_tells_only_admins_why() {
        let failed = || {
            ApiError::from(ManagerError::PrepareFailed {
                template: "runtime".into(),
                error: "npm install of the CLIs exited 1: E404 canary-package".into(),
            })
        };
        let user = failed().for_caller(false);
        assert_eq!(
            (user.status, user.code),
            (StatusCode::SERVICE_UNAVAILABLE, "environment_failed")
        );
        assert!(
            user.message.contains("runtime environment"),
            "{}",
            user.message
        );
        assert!(!user.message.contains("canary-package"), "{}", user.message);
        assert!(user.operator_note.is_none() && user.details.is_none());
        let admin = failed().for_caller(true);
        assert!(
            admin.message.contains("E404 canary-package"),
            "{}",
            admin.message
        );
        assert!(
            admin.message.contains("polydev image build runtime"),
            "{}",
            admin.message
        );
    }
}
