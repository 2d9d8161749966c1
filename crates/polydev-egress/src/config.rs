//! The `[egress]` config section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// How the egress proxy runs. Every field has a default; zero config works.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Run the proxy inside `polydev serve`.
    pub enabled: bool,
    /// The shared port: accepts any live credential.
    pub listen: SocketAddr,
    /// Host name or IP sandboxes use to reach the proxy (default: the
    /// listen address's IP).
    pub public_host: Option<String>,
    /// v1-compatible per-user ports: each accepts only its user's
    /// credentials; assigned lowest-free from `user_ports`, recorded in
    /// the store.
    pub per_user_ports: bool,
    pub user_ports: PortRange,
    /// CIDRs exempt from the built-in deny of loopback/private/link-local
    /// ranges. Empty by default; tests use it for their loopback stubs.
    pub allow_private: Vec<String>,
    /// Names the proxy resolves itself, before DNS: `name = "IP"`. For
    /// hosts only the proxy should know (tests give their stub provider
    /// servers such names, so a client that bypasses the proxy cannot reach
    /// them). The deny ranges still apply to the address.
    pub hosts: BTreeMap<String, std::net::IpAddr>,
    /// Per sandbox template: which destination hosts are allowed. A
    /// template without a policy may reach any public host.
    pub policies: BTreeMap<String, PolicyConfig>,
    pub max_tunnels_per_user: u32,
    /// New tunnels plus forwarded requests per second, per user.
    pub requests_per_sec_per_user: u32,
    /// Bytes per second per user, both directions together; 0 = unlimited.
    pub bandwidth_bytes_per_sec_per_user: u64,
    /// Deadline for a client to send a request head (slowloris guard).
    pub header_timeout_secs: u64,
    /// A tunnel or connection with no bytes either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// Deadline for resolving and connecting to a destination.
    pub connect_timeout_secs: u64,
    /// How often usage is written to the store.
    pub flush_interval_secs: u64,
    /// How long a credential lookup is cached (bounds revocation delay for
    /// a standalone proxy; in process, revocation is immediate).
    pub credential_cache_secs: u64,
    /// Forward everything through another proxy.
    pub upstream: Option<UpstreamConfig>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 4080)),
            public_host: None,
            per_user_ports: true,
            user_ports: PortRange {
                first: 10001,
                last: 10999,
            },
            allow_private: Vec::new(),
            hosts: BTreeMap::new(),
            policies: BTreeMap::new(),
            max_tunnels_per_user: 256,
            requests_per_sec_per_user: 200,
            bandwidth_bytes_per_sec_per_user: 0,
            header_timeout_secs: 10,
            idle_timeout_secs: 300,
            connect_timeout_secs: 10,
            flush_interval_secs: 5,
            credential_cache_secs: 2,
            upstream: None,
        }
    }
}

impl EgressConfig {
    /// The per-user port range, when per-user ports are on.
    pub fn user_port_range(&self) -> Option<PortRange> {
        self.per_user_ports.then_some(self.user_ports)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs.max(1))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `api.example.com` (exactly), `*.example.com` (subdomains), `*` (any).
    pub allow_hosts: Vec<String>,
}

/// Chaining to an upstream proxy (e.g. a residential proxy provider).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://user:password@host:port`.
    pub url: String,
    /// How the upstream username is built: `{username}` is the one in
    /// `url`, `{session}` the user's session from `per_user`.
    #[serde(default = "default_username_format")]
    pub username_format: String,
    /// Per polydev user id: the upstream port and/or session to use.
    #[serde(default)]
    pub per_user: BTreeMap<String, UpstreamUser>,
}

fn default_username_format() -> String {
    "{username}".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamUser {
    pub port: Option<u16>,
    pub session: Option<String>,
}
