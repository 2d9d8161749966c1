//! One typed config, layered once: defaults < TOML file < `POLYDEV_*` env <
//! flags (clap gives flags precedence over env; the file fills what neither
//! set).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use polydev_api::ApiConfig;
use polydev_egress::EgressConfig;
use polydev_telemetry::alerts::AlertsConfig;
use polydev_telemetry::LogFormat;
use serde::Deserialize;

use crate::cli::{EgressArgs, SandboxArgs, ServeArgs, StoreArgs};

/// The [sandbox] TOML section.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxFile {
    enabled: Option<bool>,
    /// Template → warm sandboxes kept.
    pools: Option<std::collections::BTreeMap<String, usize>>,
    per_user_max: Option<u32>,
    host_max: Option<u32>,
    boot_deadline_ms: Option<u64>,
    keep_failed: Option<bool>,
    default_ttl_secs: Option<u64>,
    memory_mb: Option<u64>,
    pids: Option<u32>,
    cpu_millis: Option<u32>,
    disk_mb: Option<u64>,
    /// The most one sandbox may have (what an admin may ask for; a plain
    /// user gets at most the template's defaults) [default: a third of the
    /// host's memory, all its cores, 4096 processes, 8 GiB of disk].
    max_memory_mb: Option<u64>,
    max_pids: Option<u32>,
    max_cpu_millis: Option<u32>,
    max_disk_mb: Option<u64>,
    /// How often the store and the running sandboxes are compared [default: 30].
    reconcile_interval_secs: Option<u64>,
    /// Templates whose missing images `serve` builds at start [default: runtime, browser].
    prepare: Option<Vec<String>>,
    /// The most memory (as limits) one user's live sandboxes may have [default: 12288].
    per_user_memory_mb: Option<u64>,
    /// How far the sum of all sandboxes' memory limits may exceed the
    /// instance's memory budget [default: no such cap].
    memory_overcommit: Option<f64>,
    /// No new sandbox while the sandboxes use more than this share (in
    /// percent) of their memory budget [default: 90; 0: no such check].
    admit_memory_percent: Option<u64>,
    debian_mirror: Option<String>,
}

/// The [runs] TOML section.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsFile {
    /// Sandbox template for runs [default: runtime].
    template: Option<String>,
    /// Per-provider deadline [default: 300].
    deadline_secs: Option<u64>,
    /// How long a run waits for its sealed credentials [default: 120].
    credential_wait_secs: Option<u64>,
    /// How long a finished run stays followable live [default: 60].
    linger_secs: Option<u64>,
    /// How long a provider waits its turn behind another run of the same
    /// user on the same credential [default: 600].
    queue_wait_secs: Option<u64>,
    /// The most CLIs this host runs at once (the providers of live runs);
    /// a run beyond it answers 503 [default: 8 per core; at least 5].
    max_providers_in_flight: Option<usize>,
    /// The largest workspace archive a run takes, in MiB (it is unpacked
    /// in each sandbox's writable layer, so keep it well under the
    /// sandboxes' disk) [default: 200; 1 to 4096].
    max_workspace_mb: Option<u64>,
    /// Runs one user may start per UTC day (beyond: 429 with the reset
    /// time) [default: no limit; 0: no limit].
    max_runs_per_user_per_day: Option<u32>,
    /// Provider API base URLs (default: each CLI's own).
    anthropic_base_url: Option<String>,
    openai_base_url: Option<String>,
    gemini_base_url: Option<String>,
    /// GitHub Copilot's API (and the GitHub API Copilot CLI asks about
    /// the user) [default: GitHub's].
    copilot_base_url: Option<String>,
    /// Where Codex sends its requests on a ChatGPT sign-in (an
    /// OpenAI-Responses root) [default: ChatGPT's own].
    chatgpt_base_url: Option<String>,
    /// Where Codex refreshes a ChatGPT sign-in (the full token URL)
    /// [default: OpenAI's own].
    openai_token_url: Option<String>,
    /// Claude Code on Amazon Bedrock (a cloud key): the region
    /// [default: us-east-1], and Bedrock's endpoint [default: AWS's].
    bedrock_region: Option<String>,
    bedrock_base_url: Option<String>,
    /// Gemini CLI on Vertex AI (a cloud key): Vertex's endpoint
    /// [default: Google's].
    vertex_base_url: Option<String>,
}

pub fn runs_config(file: Option<&RunsFile>) -> polydev_sessions::runs::RunsConfig {
    let f = file.cloned().unwrap_or_default();
    let mut c = polydev_sessions::runs::RunsConfig::default();
    if let Some(t) = f.template {
        c.template = t;
    }
    if let Some(s) = f.deadline_secs {
        c.deadline = Duration::from_secs(s.max(1));
    }
    if let Some(s) = f.credential_wait_secs {
        c.credential_wait = Duration::from_secs(s.max(1));
    }
    if let Some(s) = f.linger_secs {
        c.linger = Duration::from_secs(s);
    }
    if let Some(s) = f.queue_wait_secs {
        c.queue_wait = Duration::from_secs(s.max(1));
    }
    if let Some(n) = f.max_providers_in_flight {
        c.max_providers_in_flight = n.clamp(5, 100_000);
    }
    if let Some(mb) = f.max_workspace_mb {
        c.max_workspace_bytes = mb.clamp(1, 4096) << 20;
    }
    c.max_runs_per_user_per_day = f.max_runs_per_user_per_day.filter(|n| *n > 0);
    c.anthropic_base_url = f.anthropic_base_url;
    c.openai_base_url = f.openai_base_url;
    c.gemini_base_url = f.gemini_base_url;
    c.copilot_base_url = f.copilot_base_url;
    c.chatgpt_base_url = f.chatgpt_base_url;
    c.openai_token_url = f.openai_token_url;
    if let Some(r) = f.bedrock_region {
        c.bedrock_region = r;
    }
    c.bedrock_base_url = f.bedrock_base_url;
    c.vertex_base_url = f.vertex_base_url;
    c
}

/// A `[providers.<id>]` TOML section: the installation's policy for that
/// provider's CLI.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    /// `off`, `owner` (admins only) or `all`: who may sign the CLI in with
    /// their own subscription account (default: what the vendor's terms
    /// allow a multi-user installation; docs/PROVIDERS.md).
    subscription_login: Option<String>,
}

/// The subscription sign-in policy from the `[providers.*]` sections.
pub fn sign_in_policy(
    file: Option<&std::collections::BTreeMap<String, ProviderFile>>,
) -> anyhow::Result<polydev_sessions::providers::SignInPolicy> {
    let mut policy = polydev_sessions::providers::SignInPolicy::default();
    for (name, section) in file.into_iter().flatten() {
        let provider: polydev_domain::Provider = name
            .parse()
            .map_err(|e| anyhow::anyhow!("[providers.{name}]: {e}"))?;
        if let Some(v) = &section.subscription_login {
            let v = v
                .parse()
                .map_err(|e: String| anyhow::anyhow!("[providers.{name}] {e}"))?;
            policy.overrides.insert(provider, v);
        }
    }
    Ok(policy)
}

/// The [login] TOML section (login sessions).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFile {
    /// Sandbox template [default: browser].
    template: Option<String>,
    /// Boot deadline, sandbox to VNC greeting [default: 30].
    boot_deadline_secs: Option<u64>,
    /// A session without viewer or API activity expires [default: 600].
    idle_timeout_secs: Option<u64>,
    /// Longest a session lives [default: 1800].
    max_lifetime_secs: Option<u64>,
    /// Viewer ticket lifetime [default: 30].
    ticket_ttl_secs: Option<u64>,
    /// Remote screen size [default: 1280x800].
    width: Option<u32>,
    height: Option<u32>,
    memory_mb: Option<u64>,
    /// Per-provider login flows (replace the built-in ones), e.g.
    /// `[login.providers.codex] browser = "exec codex login"`.
    #[serde(default)]
    providers: std::collections::BTreeMap<String, polydev_sessions::login::LoginCommand>,
}

pub fn login_config(
    file: Option<&LoginFile>,
) -> anyhow::Result<polydev_sessions::login::LoginConfig> {
    let f = file.cloned().unwrap_or_default();
    let mut c = polydev_sessions::login::LoginConfig::default();
    if let Some(t) = f.template {
        c.template = t;
    }
    let secs = |v: Option<u64>, d: Duration| v.map(|s| Duration::from_secs(s.max(1))).unwrap_or(d);
    c.boot_deadline = secs(f.boot_deadline_secs, c.boot_deadline);
    c.idle_timeout = secs(f.idle_timeout_secs, c.idle_timeout);
    c.max_lifetime = secs(f.max_lifetime_secs, c.max_lifetime);
    c.ticket_ttl = secs(f.ticket_ttl_secs, c.ticket_ttl);
    if let Some(w) = f.width {
        c.width = w.clamp(320, 3840);
    }
    if let Some(h) = f.height {
        c.height = h.clamp(240, 2160);
    }
    if let Some(m) = f.memory_mb {
        c.limits.memory_bytes = m.max(256) << 20;
    }
    for (name, command) in f.providers {
        let provider: polydev_domain::Provider = name
            .parse()
            .map_err(|e| anyhow::anyhow!("[login.providers.{name}]: {e}"))?;
        if !command.credential_file.starts_with('/') {
            bail!("[login.providers.{name}] credential_file must be an absolute path");
        }
        c.commands.insert(provider, command);
    }
    Ok(c)
}

/// The sandbox runtime's settings, layered.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub enabled: bool,
    pub keep_failed: bool,
    pub manager: polydev_sandbox::ManagerConfig,
    /// Templates built at start when missing (in the background).
    pub prepare: Vec<String>,
    /// All sandboxes' memory limits together may reach the instance's
    /// memory budget times this.
    pub memory_overcommit: Option<f64>,
    /// Whether `[sandbox] per_user_memory_mb` was set (else the default is
    /// held to half the host's sandbox budget).
    pub per_user_memory_set: bool,
    pub debian_mirror: String,
}

pub fn sandbox_config(
    args: &SandboxArgs,
    file: Option<&SandboxFile>,
) -> anyhow::Result<SandboxSettings> {
    let f = file.cloned().unwrap_or_default();
    let mut m = polydev_sandbox::ManagerConfig {
        pools: [("runtime".to_owned(), 10), ("browser".to_owned(), 2)].into(),
        ..Default::default()
    };
    if let Some(p) = f.pools {
        m.pools = p;
    }
    if let Some(list) = &args.pools {
        m.pools.clear();
        for item in list.iter().filter(|i| !i.trim().is_empty()) {
            let (t, n) = item
                .split_once('=')
                .and_then(|(t, n)| Some((t.trim(), n.trim().parse::<usize>().ok()?)))
                .with_context(|| format!("sandbox pool {item:?} is not TEMPLATE=N"))?;
            m.pools.insert(t.to_owned(), n);
        }
    }
    if let Some(n) = args.per_user_max.or(f.per_user_max) {
        m.per_user_max = n;
    }
    if let Some(n) = args.host_max.or(f.host_max) {
        m.host_max = n;
    }
    if let Some(ms) = args.boot_deadline_ms.or(f.boot_deadline_ms) {
        m.boot_deadline = Duration::from_millis(ms.max(1));
    }
    if let Some(s) = f.default_ttl_secs {
        m.default_ttl = Duration::from_secs(s.max(1));
    }
    let d = &mut m.default_limits;
    if let Some(v) = f.memory_mb {
        d.memory_bytes = v << 20;
    }
    if let Some(v) = f.pids {
        d.pids = v;
    }
    if let Some(v) = f.cpu_millis {
        d.cpu_millis = v;
    }
    if let Some(v) = f.disk_mb {
        d.disk_bytes = v << 20;
    }
    let max = &mut m.max_limits;
    if let Some(v) = f.max_memory_mb {
        max.memory_bytes = v << 20;
    }
    if let Some(v) = f.max_pids {
        max.pids = v;
    }
    if let Some(v) = f.max_cpu_millis {
        max.cpu_millis = v;
    }
    if let Some(v) = f.max_disk_mb {
        max.disk_bytes = v << 20;
    }
    if let Some(s) = f.reconcile_interval_secs {
        m.reconcile_interval = Duration::from_secs(s.max(1));
    }
    if let Some(mb) = f.per_user_memory_mb {
        m.per_user_memory = (mb > 0).then_some(mb << 20);
    }
    let overcommit = f.memory_overcommit;
    if let Some(o) = overcommit {
        if !(o > 0.0 && o.is_finite()) {
            bail!("[sandbox] memory_overcommit must be above 0");
        }
    }
    match f.admit_memory_percent {
        Some(0) => m.admit_memory_below = None,
        Some(p) if p <= 100 => m.admit_memory_below = Some(p as f64 / 100.0),
        Some(p) => bail!(
            "[sandbox] admit_memory_percent is a percentage (1-100, or 0 for no check), not {p}"
        ),
        None => {}
    }
    let prepare = args
        .prepare
        .clone()
        .or(f.prepare.clone())
        .unwrap_or_else(|| vec!["runtime".into(), "browser".into()])
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty() && t != "none")
        .collect::<Vec<_>>();
    for t in &prepare {
        if !["base", "runtime", "browser"].contains(&t.as_str()) {
            bail!(
                "sandbox prepare: {t:?} is not a template polydev builds (base, runtime, browser)"
            );
        }
    }
    Ok(SandboxSettings {
        memory_overcommit: overcommit,
        per_user_memory_set: f.per_user_memory_mb.is_some(),
        enabled: args.enabled.or(f.enabled).unwrap_or(true),
        keep_failed: args.keep_failed.or(f.keep_failed).unwrap_or(false),
        manager: m,
        prepare,
        debian_mirror: args
            .debian_mirror
            .clone()
            .or(f.debian_mirror.clone())
            .unwrap_or_else(|| "http://deb.debian.org/debian".into()),
    })
}

/// The TOML file: the same keys as the long flags, with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    images_dir: Option<PathBuf>,
    database_url: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    body_limit_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    shutdown_timeout_secs: Option<u64>,
    session_ttl_hours: Option<u64>,
    cookie_secure: Option<bool>,
    allow_signup: Option<bool>,
    login_per_ip_per_minute: Option<u32>,
    signups_per_ip_per_hour: Option<u32>,
    login_per_account_per_minute: Option<u32>,
    http_metrics: Option<bool>,
    health_interval_ms: Option<u64>,
    health_override_file: Option<PathBuf>,
    /// URLs the admin network-health check probes.
    health_upstreams: Option<Vec<String>>,
    alerts: Option<AlertsConfig>,
    egress: Option<EgressConfig>,
    sandbox: Option<SandboxFile>,
    runs: Option<RunsFile>,
    login: Option<LoginFile>,
    /// Per provider (`[providers.claude_code]`, …): the installation's policy.
    providers: Option<std::collections::BTreeMap<String, ProviderFile>>,
    /// Origins (e.g. `https://polydev.example.com`) allowed to open the
    /// viewer WebSocket besides the server's own (`Host`).
    allowed_origins: Option<Vec<String>>,
    vault_autolock_secs: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))
    }
}

/// Where the store is and how to log: what every command needs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Golden images (default `<data_dir>/images`).
    pub images_dir: PathBuf,
    /// Set for PostgreSQL; `None` means SQLite in `data_dir`.
    pub database_url: Option<String>,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl StoreConfig {
    pub fn resolve(args: &StoreArgs, file: &FileConfig) -> anyhow::Result<Self> {
        let log_format = args
            .log_format
            .clone()
            .or_else(|| file.log_format.clone())
            .map(|f| f.parse::<LogFormat>().map_err(anyhow::Error::msg))
            .transpose()?
            .unwrap_or_default();
        let database_url = args.database_url.clone().or_else(|| {
            // A data dir given on the command line or in the env beats a
            // database URL from the file.
            if args.data_dir.is_some() {
                None
            } else {
                file.database_url.clone()
            }
        });
        let data_dir = args
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(".polydev"));
        Ok(Self {
            images_dir: args
                .images_dir
                .clone()
                .or_else(|| file.images_dir.clone())
                .unwrap_or_else(|| data_dir.join("images")),
            data_dir,
            database_url,
            log_format,
            log_level: args
                .log_level
                .clone()
                .or_else(|| file.log_level.clone())
                .unwrap_or_else(|| "info".to_owned()),
        })
    }

    /// The URL to connect to; creates the data dir (mode 0700) for SQLite.
    pub fn database_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        create_private_dir(&self.data_dir)?;
        Ok(polydev_store::Store::sqlite_url(&self.data_dir))
    }

    /// Where the store is, for logs: never the password in a URL.
    pub fn describe(&self) -> String {
        match &self.database_url {
            Some(url) => redact_url(url),
            None => format!("sqlite in {}", self.data_dir.display()),
        }
    }
}

/// The data dir is traversable but not listable by others (0711): the
/// sandboxes' own uids must reach their state directories inside it. The
/// database file is made owner-only (0600) before SQLite opens it, and
/// SQLite gives its WAL and shared-memory files the same mode.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot set the mode of data dir {}", dir.display()))?;
    let db = dir.join("polydev.db");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&db)
        .with_context(|| format!("cannot create {}", db.display()))?;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", db.display()))?;
    Ok(())
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Everything `polydev serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub store: StoreConfig,
    pub listen: SocketAddr,
    pub shutdown_timeout: Duration,
    pub api: ApiConfig,
    pub http_metrics: bool,
    pub health_interval: Duration,
    pub health_override_file: Option<PathBuf>,
    pub alerts: AlertsConfig,
    pub egress: EgressConfig,
    pub sandbox: SandboxSettings,
    pub runs: polydev_sessions::runs::RunsConfig,
    pub login: polydev_sessions::login::LoginConfig,
    /// Serve on the listening socket passed as stdin (from `polydev supervise`).
    pub listen_stdin: bool,
}

/// A provider URL from `[runs]`: it reaches the CLIs' command lines and
/// configuration, so only a plain http(s) URL is taken (no quotes,
/// backslashes, spaces or control characters).
fn check_provider_url(name: &str, url: &str) -> anyhow::Result<()> {
    let plain = url
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'\'' | b'"' | b'\\' | b'`' | b'$'));
    let scheme = url.starts_with("http://") || url.starts_with("https://");
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .unwrap_or("");
    if !plain || !scheme || host.is_empty() || url.len() > 2048 {
        bail!("[runs] {name} {url:?} is not a plain http:// or https:// URL");
    }
    Ok(())
}

/// The egress section with its flags applied.
pub fn egress_config(args: &EgressArgs, file: &FileConfig) -> anyhow::Result<EgressConfig> {
    let mut config = file.egress.clone().unwrap_or_default();
    let region = runs_config(file.runs.as_ref()).bedrock_region;
    // Each CLI's run sandboxes reach its own hosts (the registry's).
    config.provider_hosts = polydev_domain::Provider::ALL
        .iter()
        .map(|p| {
            (
                p.as_str().to_owned(),
                polydev_sessions::providers::egress_hosts(*p, &region),
            )
        })
        .collect();
    if let Some(enabled) = args.enabled {
        config.enabled = enabled;
    }
    if let Some(listen) = &args.listen {
        config.listen = listen.parse().with_context(|| {
            format!("egress listen address {listen:?} is not valid: use IP:PORT")
        })?;
    }
    Ok(config)
}

impl ServeConfig {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = FileConfig::load(args.store.config.as_deref())?;
        let store = StoreConfig::resolve(&args.store, &file)?;
        let listen_text = args
            .listen
            .clone()
            .or_else(|| file.listen.clone())
            .unwrap_or_else(|| "127.0.0.1:4000".to_owned());
        let listen: SocketAddr = listen_text.parse().with_context(|| {
            format!("listen address {listen_text:?} is not valid: use HOST:PORT with an IP, e.g. 127.0.0.1:4000")
        })?;
        let defaults = ApiConfig::default();
        let pick = |flag: Option<u64>, file: Option<u64>| flag.or(file);
        let secs =
            |v: Option<u64>, default: Duration| v.map(Duration::from_secs).unwrap_or(default);
        let sign_in = sign_in_policy(file.providers.as_ref())?;
        let api = ApiConfig {
            sign_in: sign_in.clone(),
            body_limit: args
                .body_limit_bytes
                .or(file.body_limit_bytes)
                .unwrap_or(defaults.body_limit),
            request_timeout: secs(
                pick(args.request_timeout_secs, file.request_timeout_secs),
                defaults.request_timeout,
            ),
            session_ttl: pick(args.session_ttl_hours, file.session_ttl_hours)
                .map(|h| Duration::from_secs(h.saturating_mul(3600)))
                .unwrap_or(defaults.session_ttl),
            cookie_secure: args
                .cookie_secure
                .or(file.cookie_secure)
                .unwrap_or(defaults.cookie_secure),
            allow_signup: args
                .allow_signup
                .or(file.allow_signup)
                .unwrap_or(defaults.allow_signup),
            login_per_ip_per_minute: args
                .login_per_ip_per_minute
                .or(file.login_per_ip_per_minute)
                .unwrap_or(defaults.login_per_ip_per_minute),
            login_per_account_per_minute: args
                .login_per_account_per_minute
                .or(file.login_per_account_per_minute)
                .unwrap_or(defaults.login_per_account_per_minute),
            signups_per_ip_per_hour: args
                .signups_per_ip_per_hour
                .or(file.signups_per_ip_per_hour)
                .unwrap_or(defaults.signups_per_ip_per_hour),
            ready_timeout: defaults.ready_timeout,
            health_upstreams: file.health_upstreams.clone().unwrap_or_default(),
            allowed_origins: file.allowed_origins.clone().unwrap_or_default(),
            trusted_proxies: args
                .trusted_proxies
                .clone()
                .or_else(|| file.trusted_proxies.clone())
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    let c = c.trim();
                    c.parse::<ipnet::IpNet>()
                        .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .with_context(|| format!("trusted proxy {c:?} is not a CIDR or IP address"))
                })
                .collect::<anyhow::Result<_>>()?,
            build: polydev_api::BuildInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                git_sha: env!("POLYDEV_GIT_SHA").to_owned(),
                // Set by `polydev supervise` from the release it starts.
                release: std::env::var("POLYDEV_RELEASE_ID")
                    .ok()
                    .filter(|r| !r.is_empty()),
            },
            vault_autolock: Duration::from_secs(
                args.vault_autolock_secs
                    .or(file.vault_autolock_secs)
                    .unwrap_or(900)
                    .max(1),
            ),
        };
        for url in &api.health_upstreams {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("health_upstreams entry {url:?} must be an http:// or https:// URL");
            }
        }
        let mut alerts = file.alerts.clone().unwrap_or_default();
        if let Some(url) = &args.alert_webhook_url {
            alerts.webhook_url = Some(url.clone());
        }
        let health_interval = Duration::from_millis(
            args.health_interval_ms
                .or(file.health_interval_ms)
                .unwrap_or(1000)
                .max(100),
        );
        if api.body_limit < 1024 {
            bail!("body_limit_bytes must be at least 1024");
        }
        if api.request_timeout.is_zero() || api.session_ttl.is_zero() {
            bail!("request_timeout_secs and session_ttl_hours must be above zero");
        }
        let mut runs = runs_config(file.runs.as_ref());
        for (name, url) in [
            ("anthropic_base_url", &runs.anthropic_base_url),
            ("openai_base_url", &runs.openai_base_url),
            ("gemini_base_url", &runs.gemini_base_url),
            ("copilot_base_url", &runs.copilot_base_url),
            ("chatgpt_base_url", &runs.chatgpt_base_url),
            ("openai_token_url", &runs.openai_token_url),
            ("bedrock_base_url", &runs.bedrock_base_url),
            ("vertex_base_url", &runs.vertex_base_url),
        ] {
            if let Some(u) = url {
                check_provider_url(name, u)?;
            }
        }
        if !polydev_sessions::providers::valid_region(&runs.bedrock_region) {
            bail!(
                "[runs] bedrock_region {:?} is not an AWS region name (like us-east-1)",
                runs.bedrock_region
            );
        }
        let mut login = login_config(file.login.as_ref())?;
        runs.sign_in = sign_in.clone();
        login.sign_in = sign_in;
        let mut sandbox = sandbox_config(&args.sandbox, file.sandbox.as_ref())?;
        // Runs and login sessions ask for their template's limits, so warm
        // pool members (made with those limits) fit them; a browser pool's
        // members start the login desktop ahead of time.
        let m = &mut sandbox.manager;
        m.template_limits.insert(runs.template.clone(), runs.limits);
        m.template_limits
            .entry(login.template.clone())
            .or_insert(login.limits);
        m.pool_warmup.insert(
            login.template.clone(),
            polydev_sandbox::desktop::desktop_command(login.width, login.height),
        );
        // Defaults above the maxima would refuse the controller's own runs.
        let max = m.max_limits;
        let over = |what: &str, l: &polydev_sandbox::Limits| -> anyhow::Result<()> {
            use polydev_sandbox::LimitKind::*;
            for (kind, key) in [
                (Memory, "max_memory_mb"),
                (Pids, "max_pids"),
                (Cpu, "max_cpu_millis"),
                (Disk, "max_disk_mb"),
            ] {
                if kind.of(l) > kind.of(&max) {
                    bail!(
                        "{what} ask for {} where [sandbox] {key} allows {}",
                        kind.of(l),
                        kind.of(&max)
                    );
                }
            }
            Ok(())
        };
        over("[sandbox] defaults", &m.default_limits)?;
        for (template, l) in &m.template_limits {
            over(&format!("the {template} template's limits"), l)?;
        }
        Ok(Self {
            store,
            listen,
            shutdown_timeout: secs(
                pick(args.shutdown_timeout_secs, file.shutdown_timeout_secs),
                Duration::from_secs(10),
            ),
            api,
            http_metrics: args.http_metrics.or(file.http_metrics).unwrap_or(true),
            health_interval,
            health_override_file: args
                .health_override_file
                .clone()
                .or_else(|| file.health_override_file.clone()),
            alerts,
            egress: egress_config(&args.egress, &file)?,
            sandbox,
            runs,
            login,
            listen_stdin: args.listen_stdin,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["polydev", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("args parse").command {
            Command::Serve(a) => *a,
            other => panic!("not serve: {other:?}"),
        }
    }

    /// Every CLI's run sandboxes get its own egress list from the registry.
    #[test]
    fn the_egress_section_carries_each_cli_s_hosts() {
        let file: FileConfig = toml::from_str("").unwrap();
        let args = EgressArgs {
            enabled: None,
            listen: None,
        };
        let c = egress_config(&args, &file).unwrap();
        for p in polydev_domain::Provider::ALL {
            assert!(!c.provider_hosts[p.as_str()].is_empty(), "{p:?}");
        }
        assert!(c.provider_hosts["copilot"]
            .iter()
            .any(|h| h == "api.github.com"));
        assert!(!c.provider_hosts["claude_code"]
            .iter()
            .any(|h| h.contains("github")));
    }

    #[test]
    fn providers_sections_set_the_sign_in_policy() {
        use polydev_domain::Provider;
        use polydev_sessions::providers::SubscriptionLogin;
        let file: FileConfig = toml::from_str(
            "[providers.claude_code]\nsubscription_login = \"owner\"\n[providers.codex]\nsubscription_login = \"off\"\n",
        )
        .unwrap();
        let p = sign_in_policy(file.providers.as_ref()).unwrap();
        assert_eq!(p.of(Provider::ClaudeCode), SubscriptionLogin::Owner);
        assert_eq!(p.of(Provider::Codex), SubscriptionLogin::Off);
        assert_eq!(p.of(Provider::GeminiCli), SubscriptionLogin::Off);
        for bad in [
            "[providers.claude_code]\nsubscription_login = \"on\"\n",
            "[providers.copilot_cli]\nsubscription_login = \"all\"\n",
            "[providers.codex]\nlogin = \"all\"\n",
        ] {
            let err = toml::from_str::<FileConfig>(bad)
                .map_err(anyhow::Error::from)
                .and_then(|f| sign_in_policy(f.providers.as_ref()).map(|_| ()));
            assert!(err.is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_config_has_the_documented_defaults() {
        let c = ServeConfig::resolve(&serve_args(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(c.store.data_dir, PathBuf::from(".polydev"));
        assert!(c.store.database_url.is_none());
        assert_eq!(c.store.log_format, LogFormat::Human);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("polydev.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:5000\"\nlog_format = \"json\"\nallow_signup = false\nrequest_timeout_secs = 7\n",
        )
        .unwrap();
        let config = file.to_str().unwrap();
        let c = ServeConfig::resolve(&serve_args(&["--config", config])).unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.store.log_format, LogFormat::Json);
        assert!(!c.api.allow_signup);
        assert_eq!(c.api.request_timeout, Duration::from_secs(7));
        let c = ServeConfig::resolve(&serve_args(&[
            "--config",
            config,
            "--listen",
            "127.0.0.1:6000",
        ]))
        .unwrap();
        assert_eq!(c.listen.port(), 6000);
    }

    #[test]
    fn alert_rules_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("polydev.toml");
        std::fs::write(
            &file,
            "[alerts]\nwebhook_url = \"http://127.0.0.1:9/hook\"\ncooldown_secs = 30\n[[alerts.rules]]\nname = \"cpu\"\nmetric = \"cpu\"\nabove = 80\nfor_secs = 5\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(&serve_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.alerts.cooldown_secs, 30);
        let rules = c.alerts.rules.unwrap();
        assert_eq!(
            (rules[0].name.as_str(), rules[0].above, rules[0].for_secs),
            ("cpu", 80.0, 5)
        );
        std::fs::write(
            &file,
            "[[alerts.rules]]\nname = \"x\"\nmetric = \"swap\"\nabove = 1\n",
        )
        .unwrap();
        let err =
            ServeConfig::resolve(&serve_args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("unknown variant"), "{err:#}");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let err = ServeConfig::resolve(&serve_args(&["--trusted-proxies", "10.0.0.0/8,nope"]))
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("trusted proxy \"nope\""),
            "{err:#}"
        );
        let err = ServeConfig::resolve(&serve_args(&["--listen", "localhost"])).unwrap_err();
        assert!(format!("{err:#}").contains("listen address"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let err =
            ServeConfig::resolve(&serve_args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        // Provider URLs reach the CLIs' command lines: plain URLs only;
        // a region becomes a host name: region names only.
        for (line, says) in [
            (
                "chatgpt_base_url = \"http://x.test/v1' ; touch /tmp/p '\"",
                "chatgpt_base_url",
            ),
            ("openai_base_url = \"ftp://x.test\"", "openai_base_url"),
            (
                "anthropic_base_url = \"http:///nohost\"",
                "anthropic_base_url",
            ),
            (
                "bedrock_base_url = \"http://x.test/$(id)\"",
                "bedrock_base_url",
            ),
            ("bedrock_region = \"us-east-1.evil.test\"", "bedrock_region"),
        ] {
            std::fs::write(&file, format!("[runs]\n{line}\n")).unwrap();
            let err = ServeConfig::resolve(&serve_args(&["--config", file.to_str().unwrap()]))
                .unwrap_err();
            assert!(format!("{err:#}").contains(says), "{line}: {err:#}");
        }
        std::fs::write(
            &file,
            "[runs]\nchatgpt_base_url = \"http://chatgpt.stub.test:8080/v1\"\nbedrock_region = \"eu-west-3\"\n",
        )
        .unwrap();
        ServeConfig::resolve(&serve_args(&["--config", file.to_str().unwrap()])).unwrap();
    }

    #[test]
    fn database_passwords_are_hidden_in_descriptions() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/polydev"),
            "postgres://app:***@db:5432/polydev"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
