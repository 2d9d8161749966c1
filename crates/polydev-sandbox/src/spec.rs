//! What a sandbox is asked to be.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `sb-` and 16 hex digits: short, because the agent's socket path (under
/// the state directory) must fit a Unix socket address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn generate() -> Self {
        Self(format!("sb-{:016x}", rand::random::<u64>()))
    }

    /// Accepts only ids of the generated shape (they name directories).
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sb-")?;
        (hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Loopback only.
    #[default]
    None,
    /// Loopback plus the user's egress proxy, reachable inside at
    /// 127.0.0.1:3128 (and nothing else).
    Egress,
}

/// Resource limits; every one enforced by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU quota in thousandths of a core (1000 = one core).
    pub cpu_millis: u32,
    /// Memory hard limit (the OOM killer acts inside the sandbox).
    pub memory_bytes: u64,
    /// Most processes and threads at once.
    pub pids: u32,
    /// Size of the writable layer.
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_millis: 1000,
            memory_bytes: 512 << 20,
            pids: 256,
            disk_bytes: 256 << 20,
        }
    }
}

impl Limits {
    /// The most one sandbox may have on this host unless an operator says
    /// otherwise: a third of its memory (8 GiB on a 24 GiB host; 4 GiB at
    /// least, the aggregate budget still guards a small host), all its
    /// cores, 4096 processes, an 8 GiB writable layer (a tmpfs, so memory:
    /// its pages count against the sandbox's memory limit too).
    pub fn host_maxima() -> Self {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(8 << 30, |kb| kb * 1024 / 3)
            // Never below what the controller's own runs ask for.
            .max(4 << 30);
        let cores = (std::thread::available_parallelism().map_or(1, |n| n.get()) as u32).max(2);
        Self {
            cpu_millis: cores.saturating_mul(1000),
            memory_bytes: total,
            pids: 4096,
            disk_bytes: 8 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub template: String,
    pub limits: Limits,
    pub network: Network,
    /// Environment every exec starts from.
    pub env: Vec<(String, String)>,
    /// `user`, `run`, `session`, … (kept by the driver for reconciliation).
    pub labels: BTreeMap<String, String>,
    #[serde(with = "secs")]
    pub ttl: Duration,
    /// Network `egress`: the egress proxy's address on the host, which the
    /// sandbox reaches as 127.0.0.1:3128 through its agent's relay.
    #[serde(default)]
    pub egress: Option<std::net::SocketAddr>,
    /// `Proxy-Authorization` value the relay adds to requests that carry
    /// none (e.g. Chromium's, which cannot take credentials in its proxy
    /// URL). Never stored.
    #[serde(skip)]
    pub egress_auth: Option<String>,
}

/// Where a sandbox in network mode `egress` finds its proxy.
pub const EGRESS_INSIDE: &str = "127.0.0.1:3128";

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}
