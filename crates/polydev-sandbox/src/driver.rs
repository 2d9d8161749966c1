//! The interface every sandbox backend implements (the local namespace
//! driver today; microVM and Nomad drivers later). Exec, files and signals
//! are the agent's job in every backend, so a driver's part is to make the
//! sandbox, hand out a connection to its agent, report what it costs, and
//! destroy it; `list` reports what really exists, for reconciliation.

use std::collections::BTreeMap;
use std::time::Duration;

use polydev_agent::{AgentClient, ClientError};
use serde::Serialize;

use crate::image::Image;
use crate::spec::{SandboxId, SandboxSpec};

/// A boot stage reached, in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Stage {
    pub name: String,
    pub at_ms: i64,
}

/// The wall clock in Unix milliseconds (stages, records, timings).
pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Stage {
    pub fn now(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            at_ms: now_ms(),
        }
    }
}

#[derive(Debug)]
pub struct Booted {
    /// `created`, `started`, `agent_ready`.
    pub stages: Vec<Stage>,
    /// The agent's ephemeral sealing key.
    pub public_key: Vec<u8>,
}

/// A sandbox the backend really has, whatever the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Whether any of its processes still runs.
    pub alive: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_usec: u64,
    pub oom_kills: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The sandbox did not come up; it has been destroyed (unless kept for
    /// debugging). `log_tail` is the end of its console/agent log.
    #[error("sandbox failed to boot: stuck after stage `{stage}`: {message}")]
    Boot {
        stage: String,
        message: String,
        stages: Vec<Stage>,
        log_tail: Vec<String>,
    },
    #[error("no sandbox {0}")]
    NotFound(String),
    /// The backend cannot make sandboxes (missing tool, no cgroups, …).
    #[error("sandbox driver unavailable: {0}")]
    Unavailable(String),
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    #[error("{0}")]
    Io(String),
}

#[async_trait::async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// `local`, `microvm`, `nomad`.
    fn name(&self) -> &'static str;

    /// Makes the sandbox and waits, at most `deadline`, until its agent
    /// answers. On failure nothing is left behind (unless the driver was
    /// told to keep failed sandboxes for inspection).
    async fn create(
        &self,
        id: &SandboxId,
        spec: &SandboxSpec,
        image: &Image,
        deadline: Duration,
    ) -> Result<Booted, DriverError>;

    /// A fresh, greeted connection to the sandbox's agent.
    async fn agent(&self, id: &SandboxId, deadline: Duration) -> Result<AgentClient, DriverError>;

    /// Stops every process and removes every trace. Idempotent.
    async fn destroy(&self, id: &SandboxId) -> Result<(), DriverError>;

    /// Every sandbox of ours the backend has, live or not.
    async fn list(&self) -> Result<Vec<Existing>, DriverError>;

    async fn stats(&self, id: &SandboxId) -> Result<Stats, DriverError>;

    /// The last `lines` lines of the sandbox's console/agent log.
    async fn log_tail(&self, id: &SandboxId, lines: usize) -> Vec<String>;

    /// Points a sandbox's egress relay (made without a route, for a pool)
    /// at the proxy `target`, adding `auth` as `Proxy-Authorization`.
    async fn set_egress(
        &self,
        id: &SandboxId,
        target: std::net::SocketAddr,
        auth: String,
    ) -> Result<(), DriverError> {
        let _ = (id, target, auth);
        Err(DriverError::Unavailable(format!(
            "the {} driver cannot route a pooled sandbox's egress",
            self.name()
        )))
    }

    /// Whether sandboxes a previous controller process made can be served
    /// by this one (the local driver's die with their controller: no).
    fn adopts(&self) -> bool {
        false
    }

    /// Memory all of this driver's sandboxes use now, and the budget they
    /// share (`None`: the driver cannot tell).
    fn memory_in_use(&self) -> Option<(u64, u64)> {
        None
    }

    /// After the last sandbox: remove what the driver made for itself (e.g.
    /// the local driver's parent cgroups, if empty). Default: nothing.
    async fn shutdown(&self) {}

    /// A byte stream to a service inside the sandbox that listens on the
    /// Unix socket `/run/polydev/<name>` (e.g. the login desktop's VNC
    /// server, `vnc.sock`). `name` is a plain file name.
    async fn connect_service(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<tokio::net::UnixStream, DriverError>;
}

/// Whether `name` may name a service socket (no path, no surprises).
pub use polydev_agent::protocol::valid_service_name;
