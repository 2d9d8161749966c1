//! What every handler shares: the API's settings and the state a router
//! is built from.

use std::sync::Arc;
use std::time::Duration;

use polydev_egress::Egress;
use polydev_store::Store;
use polydev_telemetry::alerts::AlertEngine;
use polydev_telemetry::host::HostMonitor;
use polydev_telemetry::metrics::MetricsRegistry;

use crate::auth::{self, PasswordHasherPool};
use crate::metrics::HttpMetrics;

/// Settings the API needs; the binary fills them from its config.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted (413 past it).
    pub body_limit: usize,
    /// Deadline for producing a response's head.
    pub request_timeout: Duration,
    /// Lifetime of a web-login session token.
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` (serve over HTTPS, or behind a TLS proxy).
    pub cookie_secure: bool,
    /// Whether `POST /api/users` accepts sign-ups.
    pub allow_signup: bool,
    pub login_per_ip_per_minute: u32,
    pub login_per_account_per_minute: u32,
    /// Sign-ups accepted per hour from one client address (each costs an
    /// Argon2 hash on the bounded pool logins share).
    pub signups_per_ip_per_hour: u32,
    /// Deadline for the readiness check's store query.
    pub ready_timeout: Duration,
    /// URLs the network-health check probes (GET, 2 s deadline each).
    pub health_upstreams: Vec<String>,
    /// The web UI locks the vault (wipes keys) after this much idle time.
    pub vault_autolock: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for the
    /// per-address login limit). Empty: the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Origins allowed to open the viewer WebSocket besides this server's.
    pub allowed_origins: Vec<String>,
    /// What `/api/auth/health` reports about this build.
    pub build: BuildInfo,
    /// Whose subscription sign-ins this installation offers (shown by
    /// `/api/providers`; the sessions enforce it).
    pub sign_in: polydev_sessions::providers::SignInPolicy,
}

/// Version, git sha and the deployment id this process runs from.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    pub version: String,
    pub git_sha: String,
    pub release: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            cookie_secure: false,
            allow_signup: true,
            login_per_ip_per_minute: 30,
            login_per_account_per_minute: 10,
            signups_per_ip_per_hour: 20,
            ready_timeout: Duration::from_secs(2),
            health_upstreams: Vec::new(),
            vault_autolock: Duration::from_secs(15 * 60),
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            build: BuildInfo::default(),
            sign_in: Default::default(),
        }
    }
}

/// Metrics, host health and alerts, assembled by the binary.
#[derive(Debug, Clone)]
pub struct Observability {
    /// Everything `/metrics` exposes.
    pub registry: Arc<MetricsRegistry>,
    /// `None` turns the per-request metrics off (for measuring their cost).
    pub http: Option<HttpMetrics>,
    pub host: Arc<HostMonitor>,
    pub alerts: Arc<AlertEngine>,
}

/// Everything a handler may use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ApiConfig>,
    pub auth: auth::AuthServices,
    pub observability: Observability,
    /// The in-process egress proxy, when enabled.
    pub egress: Option<Egress>,
    /// The sandbox manager, or why this controller has none.
    pub sandboxes: Result<Arc<polydev_sandbox::Manager>, Arc<str>>,
    /// Runs (needs sandboxes and the egress proxy).
    pub runs: Option<Arc<polydev_sessions::runs::Runs>>,
    /// Login sessions (need sandboxes and the egress proxy).
    pub logins: Option<Arc<polydev_sessions::login::Logins>>,
    /// Bounds the JSON exec answers held at once.
    pub exec_gate: Arc<crate::exec_gate::ExecGate>,
    /// The streams' pump tasks (SSE and exec streams), ended and joined on
    /// shutdown.
    pub tasks: Arc<polydev_sessions::tasks::Tasks>,
}

impl AppState {
    /// The sandbox manager, or a 503 saying why this controller has none.
    pub(crate) fn manager(&self) -> crate::error::ApiResult<&Arc<polydev_sandbox::Manager>> {
        self.sandboxes.as_ref().map_err(|why| {
            crate::error::ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "sandboxes_unavailable",
                why.to_string(),
            )
        })
    }

    pub fn new(
        store: Store,
        config: ApiConfig,
        observability: Observability,
        egress: Option<Egress>,
    ) -> Self {
        let auth = auth::AuthServices {
            hasher: Arc::new(PasswordHasherPool::new(4, Duration::from_secs(5))),
            limiter: Arc::new(auth::LoginLimiter::new(
                config.login_per_ip_per_minute,
                config.login_per_account_per_minute,
            )),
            signups: Arc::new(auth::SignupLimiter::new(config.signups_per_ip_per_hour)),
        };
        Self {
            store,
            config: Arc::new(config),
            auth,
            observability,
            egress,
            sandboxes: Err("sandboxes are not enabled on this controller".into()),
            runs: None,
            logins: None,
            exec_gate: Arc::default(),
            tasks: Arc::default(),
        }
    }

    pub fn with_logins(mut self, logins: Option<Arc<polydev_sessions::login::Logins>>) -> Self {
        self.logins = logins;
        self
    }

    pub fn with_runs(mut self, runs: Option<Arc<polydev_sessions::runs::Runs>>) -> Self {
        self.runs = runs;
        self
    }

    pub fn with_sandboxes(
        mut self,
        sandboxes: Result<Arc<polydev_sandbox::Manager>, String>,
    ) -> Self {
        self.sandboxes = sandboxes.map_err(Arc::from);
        self
    }

    /// Periodic upkeep: forget recovered rate-limit keys, delete expired
    /// session tokens. The binary calls this from its supervised ticker.
    pub async fn housekeeping(&self) {
        self.auth.limiter.sweep();
        self.auth.signups.sweep();
        match self
            .store
            .delete_expired_tokens(polydev_store::now_ms())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(count = n, "deleted expired session tokens"),
            Err(e) => tracing::warn!(error = %e, "could not delete expired session tokens"),
        }
    }
}

/// The extractors in `auth` take the store from whatever state a router has.
impl axum::extract::FromRef<AppState> for Store {
    fn from_ref(state: &AppState) -> Store {
        state.store.clone()
    }
}
