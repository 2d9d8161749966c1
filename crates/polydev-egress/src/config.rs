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
    /// CIDRs never reachable, whatever else says (e.g. this host's public
    /// address behind a 1:1 NAT, which no interface carries).
    pub deny: Vec<String>,
    /// Names the proxy resolves itself, before DNS: `name = "IP"`. For
    /// hosts only the proxy should know (tests give their stub provider
    /// servers such names, so a client that bypasses the proxy cannot reach
    /// them). The deny ranges still apply to the address.
    pub hosts: BTreeMap<String, std::net::IpAddr>,
    /// Per sandbox template: which destination hosts are allowed; replaces
    /// the built-in policy of `runtime` and `browser` (`builtin_policy`). A
    /// template without either may reach any public host. Names in `hosts`
    /// are allowed for every template.
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
    /// Per provider (CLI): the hosts its run sandboxes may reach, from the
    /// provider registry (set by the controller, not by config). A run's
    /// sandbox goes by `runtime+<provider>`: its own CLI's hosts only.
    #[serde(skip)]
    pub provider_hosts: BTreeMap<String, Vec<String>>,
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
            deny: Vec::new(),
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
            provider_hosts: BTreeMap::new(),
        }
    }
}

/// What a `runtime` sandbox with no provider may reach: the model vendors'
/// API and token endpoints, nothing else. A run's sandbox goes by its own
/// CLI's list instead (`provider_hosts`). A prompt-injected CLI cannot post
/// a key to a host of its choosing.
pub const RUNTIME_HOSTS: &[&str] = &[
    "api.anthropic.com",
    "console.anthropic.com",
    "platform.claude.com",
    "api.openai.com",
    "auth.openai.com",
    "chatgpt.com",
    "generativelanguage.googleapis.com",
    "cloudcode-pa.googleapis.com",
    "oauth2.googleapis.com",
    "aiplatform.googleapis.com",
];

/// What the `browser` template's sandboxes (login sessions) may reach: the
/// providers' sign-in pages, the assets and checks those pages load, and
/// the token endpoints the CLIs call when the sign-in returns.
pub const BROWSER_HOSTS: &[&str] = &[
    "claude.ai",
    "*.claude.ai",
    "claude.com",
    "*.claude.com",
    "anthropic.com",
    "*.anthropic.com",
    "auth.openai.com",
    "api.openai.com",
    "chatgpt.com",
    "*.chatgpt.com",
    "openai.com",
    "*.oaistatic.com",
    "accounts.google.com",
    "oauth2.googleapis.com",
    "www.googleapis.com",
    "cloudcode-pa.googleapis.com",
    "fonts.googleapis.com",
    "*.gstatic.com",
    "www.google.com",
    "challenges.cloudflare.com",
];

/// The template of the CLIs' runs, whose sandboxes go by their own CLI's
/// hosts.
const RUN_TEMPLATE: &str = "runtime";

/// The built-in allow-list of a template (`runtime`, `browser`), if any.
pub fn builtin_policy(template: &str) -> Option<PolicyConfig> {
    let hosts = match template {
        "runtime" => RUNTIME_HOSTS,
        "browser" => BROWSER_HOSTS,
        _ => return None,
    };
    Some(PolicyConfig {
        allow_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
    })
}

impl EgressConfig {
    /// The allow-list a template's sandboxes go by: the operator's, else
    /// the built-in one, plus every name in `hosts`; `None`: any host.
    ///
    /// `name` is a template, or `template+provider` for a run's sandbox:
    /// the operator's policy for that name or else for the template wins;
    /// else a run's sandbox (template `runtime`) goes by the provider's own
    /// hosts, when the registry gave them (a login's `browser` keeps its
    /// sign-in pages).
    pub fn policy_for(&self, name: &str) -> Option<PolicyConfig> {
        let (template, provider) = match name.split_once('+') {
            Some((t, p)) => (t, Some(p)),
            None => (name, None),
        };
        let own = || {
            let hosts = self.provider_hosts.get(provider?)?;
            (template == RUN_TEMPLATE).then_some(())?;
            Some(PolicyConfig {
                allow_hosts: hosts.clone(),
            })
        };
        let mut policy = self
            .policies
            .get(name)
            .or_else(|| self.policies.get(template))
            .cloned()
            .or_else(own)
            .or_else(|| builtin_policy(template))?;
        policy.allow_hosts.extend(self.hosts.keys().cloned());
        Some(policy)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::host_allowed;

    #[test]
    fn runtime_and_browser_have_allow_lists_the_operator_can_replace_or_widen() {
        let config = EgressConfig::default();
        let runtime = config.policy_for("runtime");
        assert!(host_allowed(runtime.as_ref(), "api.anthropic.com"));
        assert!(host_allowed(
            runtime.as_ref(),
            "generativelanguage.googleapis.com"
        ));
        // A prompt-injected CLI cannot post a key to a host of its choosing.
        for exfil in [
            "evil.example",
            "gist.github.com",
            "storage.googleapis.com",
            "pastebin.com",
        ] {
            assert!(!host_allowed(runtime.as_ref(), exfil), "{exfil} allowed");
        }
        let browser = config.policy_for("browser");
        assert!(host_allowed(browser.as_ref(), "claude.ai"));
        assert!(host_allowed(browser.as_ref(), "accounts.google.com"));
        assert!(!host_allowed(browser.as_ref(), "evil.example"));
        // Other templates: any public host (the guard still applies).
        assert!(config.policy_for("minimal").is_none());
        // The operator's policy replaces the built-in one; named hosts join.
        let mut custom = EgressConfig::default();
        custom.policies.insert(
            "runtime".into(),
            PolicyConfig {
                allow_hosts: vec!["llm.internal.example".into()],
            },
        );
        custom
            .hosts
            .insert("stub.test".into(), "127.0.0.1".parse().unwrap());
        let p = custom.policy_for("runtime");
        assert!(host_allowed(p.as_ref(), "llm.internal.example"));
        assert!(host_allowed(p.as_ref(), "stub.test"));
        assert!(!host_allowed(p.as_ref(), "api.anthropic.com"));
        // ...also for each provider's run sandboxes.
        let p = custom.policy_for("runtime+copilot");
        assert!(host_allowed(p.as_ref(), "llm.internal.example"));
    }

    /// A run's sandbox reaches its own CLI's hosts only: Claude Code's
    /// cannot reach GitHub or OpenAI, Copilot CLI's can reach GitHub; a
    /// provider the registry did not name, and a template without a
    /// built-in list, keep the template's rule.
    #[test]
    fn each_provider_s_run_sandboxes_reach_its_own_hosts_only() {
        let mut config = EgressConfig::default();
        config
            .provider_hosts
            .insert("claude_code".into(), vec!["api.anthropic.com".into()]);
        config.provider_hosts.insert(
            "copilot".into(),
            vec!["api.github.com".into(), "*.githubcopilot.com".into()],
        );
        let claude = config.policy_for("runtime+claude_code");
        assert!(host_allowed(claude.as_ref(), "api.anthropic.com"));
        for other in [
            "api.github.com",
            "api.openai.com",
            "api.individual.githubcopilot.com",
        ] {
            assert!(!host_allowed(claude.as_ref(), other), "{other}");
        }
        let copilot = config.policy_for("runtime+copilot");
        assert!(host_allowed(copilot.as_ref(), "api.github.com"));
        assert!(host_allowed(
            copilot.as_ref(),
            "api.individual.githubcopilot.com"
        ));
        assert!(!host_allowed(copilot.as_ref(), "api.anthropic.com"));
        // No runtime sandbox without a provider reaches GitHub.
        assert!(!host_allowed(
            config.policy_for("runtime").as_ref(),
            "api.github.com"
        ));
        assert_eq!(
            config
                .policy_for("runtime+unheard_of")
                .map(|p| p.allow_hosts),
            config.policy_for("runtime").map(|p| p.allow_hosts)
        );
        assert!(config.policy_for("minimal+claude_code").is_none());
        assert_eq!(
            config
                .policy_for("browser+claude_code")
                .map(|p| p.allow_hosts),
            config.policy_for("browser").map(|p| p.allow_hosts)
        );
    }
}
