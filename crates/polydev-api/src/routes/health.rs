use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Health {
    #[schema(example = "healthy")]
    status: &'static str,
    #[schema(example = "0.1.0")]
    version: String,
    git_sha: String,
    /// The deployment this process was started from (`polydev deploy`), if any.
    #[schema(example = "20261122_093000-ab12cd3")]
    release: Option<String>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/api/auth/health", tag = "health",
    responses((status = 200, description = "The controller is up", body = Health)))]
pub(crate) async fn health(State(state): State<AppState>) -> Json<Health> {
    let b = &state.config.build;
    Json(Health {
        status: "healthy",
        version: b.version.clone(),
        git_sha: b.git_sha.clone(),
        release: b.release.clone(),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ready` or `not_ready`.
    #[schema(example = "ready")]
    status: &'static str,
    checks: ReadinessChecks,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadinessChecks {
    store: Check,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Check {
    /// `ok`, `error` or `timeout`.
    status: &'static str,
    latency_ms: f64,
}

/// Readiness: the store answers within the deadline.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "A dependency is down", body = Readiness)))]
pub(crate) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let started = Instant::now();
    let store = match tokio::time::timeout(state.config.ready_timeout, state.store.ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store check failed");
            "error"
        }
        Err(_) => "timeout",
    };
    let check = Check {
        status: store,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    let ok = store == "ok";
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ok { "ready" } else { "not_ready" },
            checks: ReadinessChecks { store: check },
        }),
    )
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClientConfig {
    /// Idle seconds after which the web UI locks the vault.
    vault_autolock_secs: u64,
}

/// Settings the web UI needs before sign-in (nothing secret).
#[utoipa::path(get, path = "/api/client-config", tag = "health",
    responses((status = 200, body = ClientConfig)))]
pub(crate) async fn client_config(State(state): State<AppState>) -> Json<ClientConfig> {
    Json(ClientConfig {
        vault_autolock_secs: state.config.vault_autolock.as_secs(),
    })
}
