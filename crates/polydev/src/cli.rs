//! The command line: `polydev serve | user add | migrate`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "polydev",
    version,
    about = "Run AI coding CLIs in throw-away sandboxes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller: HTTP API and web UI.
    Serve(Box<ServeArgs>),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Apply pending database migrations and exit.
    Migrate(MigrateArgs),
    /// Log in to a polydev server: reads the password from stdin, derives
    /// the login credential here, prints `{"token","user"}`.
    Login {
        #[arg(long, env = "POLYDEV_SERVER", default_value = "http://127.0.0.1:4000")]
        server: String,
        #[arg(long)]
        email: String,
    },
    /// Use your zero-knowledge vault on a polydev server (crypto runs here).
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Run only the egress proxy (on its own host), against the shared store.
    Egress(EgressCommandArgs),
    /// Golden images for sandboxes: build, list, activate, roll back.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Ship this build to a host over SSH and switch to it behind a health
    /// gate (automatic rollback on failure).
    Deploy(DeployArgs),
    /// Switch a host back to an earlier release (default: the previous one).
    Rollback {
        #[command(flatten)]
        ssh: SshArgs,
        /// Release directory on the host.
        #[arg(long, default_value = "/opt/polydev")]
        root: PathBuf,
        /// A deployment id or a git sha (prefix).
        to: Option<String>,
        #[arg(long, default_value_t = 30)]
        health_timeout_secs: u64,
    },
    /// A host's deployments and which one is current.
    Deployments {
        #[command(flatten)]
        ssh: SshArgs,
        #[arg(long, default_value = "/opt/polydev")]
        root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run the controller for a release directory, owning its listening
    /// socket so new releases take over without dropping requests.
    Supervise {
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value = "127.0.0.1:4000")]
        listen: String,
        /// Arguments for `polydev serve`.
        #[arg(last = true)]
        serve_args: Vec<String>,
    },
    /// An MCP server on stdio with the tool `get_perspectives`, against a
    /// controller; provider API keys come from this process's environment.
    Mcp {
        #[arg(long, env = "POLYDEV_SERVER", default_value = "http://127.0.0.1:4000")]
        server: String,
        /// API token of the user the runs belong to.
        #[arg(long, env = "POLYDEV_TOKEN", hide_env_values = true)]
        token: String,
        /// Serve MCP over HTTP at http://ADDR/mcp (loopback only) instead of stdio.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Host side of deploys (run over SSH by deploy/rollback/deployments).
    #[command(subcommand)]
    Release(ReleaseCommand),
}

#[derive(Debug, Clone, Args)]
pub struct SshArgs {
    /// `[user@]host` (key authentication, via the system ssh); repeat for
    /// several hosts, taken in the order given.
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Private key for ssh (`-i`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Extra `ssh -o` options, e.g. UserKnownHostsFile=…
    #[arg(long)]
    pub ssh_option: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub ssh: SshArgs,
    /// Release directory on the host.
    #[arg(long, default_value = "/opt/polydev")]
    pub root: PathBuf,
    /// all, controller, web, agent, migrations (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub target: Vec<String>,
    /// First install: start the supervisor, skip the health gate.
    #[arg(long)]
    pub bootstrap: bool,
    /// `rolling`: ship and switch one host at a time, stopping at the first
    /// that fails (it rolls itself back). `blue-green`: ship to every host
    /// first, then switch them; if one fails, the ones already switched go
    /// back, so all hosts stay on one version.
    #[arg(long, value_enum, default_value = "rolling")]
    pub strategy: Strategy,
    /// Only with --bootstrap: where the controller listens.
    #[arg(long)]
    pub listen: Option<String>,
    /// The new version must pass the health gate within this.
    #[arg(long, default_value_t = 30)]
    pub health_timeout_secs: u64,
    /// Releases kept on the host.
    #[arg(long, default_value_t = 5)]
    pub keep: usize,
    /// Ship this controller binary instead of the running one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Ship this sandbox agent instead of the one beside this binary.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Ship these migrations (a directory with sqlite/ and postgres/) and
    /// apply them instead of the built-in ones.
    #[arg(long)]
    pub migrations_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    Rolling,
    BlueGreen,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ReleaseCommand {
    Activate {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long, value_delimiter = ',', default_value = "all")]
        targets: Vec<String>,
        #[arg(long)]
        bootstrap: bool,
        #[arg(long)]
        listen: Option<String>,
        #[arg(long, default_value_t = 30)]
        health_timeout_secs: u64,
        #[arg(long, default_value_t = 5)]
        keep: usize,
        #[arg(long, default_value = "unknown")]
        who: String,
    },
    Rollback {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 30)]
        health_timeout_secs: u64,
        #[arg(long, default_value = "unknown")]
        who: String,
    },
    List {
        #[arg(long)]
        root: PathBuf,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// Build a template's root filesystem, boot one sandbox from it to
    /// validate it, and activate it (the previous image is kept).
    Build {
        /// `minimal` (host binaries, no network), `base` (Debian minbase),
        /// `runtime` (+ Node.js and the three CLIs) or `browser` (+ Xvfb,
        /// Chromium, a VNC server).
        template: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Debian mirror for debootstrap.
        #[arg(
            long,
            env = "POLYDEV_DEBIAN_MIRROR",
            default_value = "http://deb.debian.org/debian"
        )]
        mirror: String,
    },
    /// Every template's image and what a controller is preparing.
    Status {
        #[command(flatten)]
        store: StoreArgs,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A template's images, the current one marked.
    List {
        template: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make an image current.
    Activate {
        template: String,
        hash: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Go back to the previous image.
    Rollback {
        template: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user and print `{"id","email","role","token"}` (an API token).
    Add(UserAddArgs),
}

/// Where the data lives. Shared by every command that opens the store.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// TOML config file; its keys are the long flag names with `_`.
    #[arg(long, env = "POLYDEV_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded database (SQLite) and local state: sandboxes, images [default: ./.polydev]
    #[arg(long, env = "POLYDEV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Golden images (may be shared by several controllers on one host) [default: DATA_DIR/images]
    #[arg(long, env = "POLYDEV_IMAGES_DIR", value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// `postgres://…` for PostgreSQL; default is SQLite inside the data dir.
    #[arg(long, env = "POLYDEV_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// `human` or `json` [default: human]
    #[arg(long, env = "POLYDEV_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `polydev=debug,info` [default: info]
    #[arg(long, env = "POLYDEV_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Apply the migrations in this directory (a backend's directory, as a
    /// release bundle ships it) instead of the ones built in.
    #[arg(long, value_name = "DIR")]
    pub migrations_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address to listen on [default: 127.0.0.1:4000]
    #[arg(long, env = "POLYDEV_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Largest request body in bytes [default: 1048576]
    #[arg(long, env = "POLYDEV_BODY_LIMIT_BYTES", value_name = "BYTES")]
    pub body_limit_bytes: Option<usize>,
    /// Deadline for a response, seconds [default: 30]
    #[arg(long, env = "POLYDEV_REQUEST_TIMEOUT_SECS", value_name = "SECS")]
    pub request_timeout_secs: Option<u64>,
    /// How long in-flight requests may finish after SIGTERM/SIGINT [default: 10]
    #[arg(long, env = "POLYDEV_SHUTDOWN_TIMEOUT_SECS", value_name = "SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Web-login session lifetime, hours [default: 168]
    #[arg(long, env = "POLYDEV_SESSION_TTL_HOURS", value_name = "HOURS")]
    pub session_ttl_hours: Option<u64>,
    /// Mark the session cookie Secure (when served over HTTPS) [default: false]
    #[arg(long, env = "POLYDEV_COOKIE_SECURE", value_name = "BOOL")]
    pub cookie_secure: Option<bool>,
    /// Accept sign-ups at POST /api/users [default: true]
    #[arg(long, env = "POLYDEV_ALLOW_SIGNUP", value_name = "BOOL")]
    pub allow_signup: Option<bool>,
    /// Login attempts per minute per client address [default: 30]
    #[arg(long, env = "POLYDEV_LOGIN_PER_IP_PER_MINUTE", value_name = "N")]
    pub login_per_ip_per_minute: Option<u32>,
    /// Login attempts per minute per account [default: 10]
    #[arg(long, env = "POLYDEV_LOGIN_PER_ACCOUNT_PER_MINUTE", value_name = "N")]
    pub login_per_account_per_minute: Option<u32>,
    /// Sign-ups per hour per client address [default: 20]
    #[arg(long, env = "POLYDEV_SIGNUPS_PER_IP_PER_HOUR", value_name = "N")]
    pub signups_per_ip_per_hour: Option<u32>,
    /// Record per-request HTTP metrics [default: true]
    #[arg(long, env = "POLYDEV_HTTP_METRICS", value_name = "BOOL")]
    pub http_metrics: Option<bool>,
    /// How often the host-health sampler reads the machine, ms [default: 1000]
    #[arg(long, env = "POLYDEV_HEALTH_INTERVAL_MS", value_name = "MS")]
    pub health_interval_ms: Option<u64>,
    /// For tests and demos: a JSON file of percentages that override the
    /// real readings, e.g. {"cpu": 95, "memory": 80, "disk": 50}
    #[arg(long, env = "POLYDEV_HEALTH_OVERRIDE_FILE", value_name = "FILE")]
    pub health_override_file: Option<PathBuf>,
    /// Slack- or Discord-compatible webhook for alerts (rules: the [alerts] TOML section)
    #[arg(long, env = "POLYDEV_ALERT_WEBHOOK_URL", value_name = "URL")]
    pub alert_webhook_url: Option<String>,
    /// Reverse proxies (CIDRs, comma-separated) whose X-Forwarded-For names the client
    #[arg(
        long,
        env = "POLYDEV_TRUSTED_PROXIES",
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    pub trusted_proxies: Option<Vec<String>>,
    /// Idle seconds after which the web UI locks the vault [default: 900]
    #[arg(long, env = "POLYDEV_VAULT_AUTOLOCK_SECS", value_name = "SECS")]
    pub vault_autolock_secs: Option<u64>,
    #[command(flatten)]
    pub egress: EgressArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Serve on the listening socket given as stdin (used by `polydev supervise`)
    #[arg(long, hide = true)]
    pub listen_stdin: bool,
}

/// The sandbox runtime's flags; the [sandbox] TOML section has the same keys.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Run sandboxes on this controller (local driver) [default: true]
    #[arg(long = "sandboxes", env = "POLYDEV_SANDBOXES", value_name = "BOOL")]
    pub enabled: Option<bool>,
    /// Warm sandboxes per template, TEMPLATE=N, comma-separated [default: runtime=10,browser=10]
    #[arg(
        long = "sandbox-pools",
        env = "POLYDEV_SANDBOX_POOLS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub pools: Option<Vec<String>>,
    /// Live sandboxes one user may hold [default: 10]
    #[arg(
        long = "sandbox-per-user-max",
        env = "POLYDEV_SANDBOX_PER_USER_MAX",
        value_name = "N"
    )]
    pub per_user_max: Option<u32>,
    /// Live sandboxes on this host, pools included [default: 2000]
    #[arg(
        long = "sandbox-host-max",
        env = "POLYDEV_SANDBOX_HOST_MAX",
        value_name = "N"
    )]
    pub host_max: Option<u32>,
    /// Boot deadline, ms [default: 10000]
    #[arg(
        long = "sandbox-boot-deadline-ms",
        env = "POLYDEV_SANDBOX_BOOT_DEADLINE_MS",
        value_name = "MS"
    )]
    pub boot_deadline_ms: Option<u64>,
    /// Debug switch: keep failed sandboxes' state for inspection [default: false]
    #[arg(
        long = "sandbox-keep-failed",
        env = "POLYDEV_SANDBOX_KEEP_FAILED",
        value_name = "BOOL"
    )]
    pub keep_failed: Option<bool>,
    /// Templates whose missing images `serve` builds at start, in the
    /// background; `none` for none [default: runtime,browser]
    #[arg(
        long = "sandbox-prepare",
        env = "POLYDEV_SANDBOX_PREPARE",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub prepare: Option<Vec<String>>,
    /// Debian mirror for building images [default: http://deb.debian.org/debian]
    #[arg(
        long = "debian-mirror",
        env = "POLYDEV_DEBIAN_MIRROR",
        value_name = "URL"
    )]
    pub debian_mirror: Option<String>,
}

/// The egress proxy's flags; everything else is the [egress] TOML section.
#[derive(Debug, Clone, Args)]
pub struct EgressArgs {
    /// Run the egress proxy in this process [default: true]
    #[arg(
        id = "egress_enabled",
        long = "egress",
        env = "POLYDEV_EGRESS",
        value_name = "BOOL"
    )]
    pub enabled: Option<bool>,
    /// The egress proxy's shared port [default: 127.0.0.1:4080]
    #[arg(
        id = "egress_listen",
        long = "egress-listen",
        env = "POLYDEV_EGRESS_LISTEN",
        value_name = "ADDR"
    )]
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct EgressCommandArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
    /// Serve /metrics and /healthz for this proxy on ADDR
    #[arg(long, env = "POLYDEV_EGRESS_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Where the server is and who you are.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The polydev server.
    #[arg(long, env = "POLYDEV_SERVER", default_value = "http://127.0.0.1:4000")]
    pub server: String,
    /// An API or session token (from `polydev user add` or a login).
    #[arg(long, env = "POLYDEV_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Create your vault: reads the password from stdin, derives the keys
    /// here and uploads only wrapped keys. Losing the password loses the vault.
    Init(ServerArgs),
    /// Read the password from stdin and print a session key; export it as
    /// POLYDEV_VAULT_SESSION for put/get. The session key is a secret.
    Unlock(ServerArgs),
    /// Encrypt standard input here and store it as item ID.
    Put {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, env = "POLYDEV_VAULT_SESSION", hide_env_values = true)]
        session: String,
        id: String,
    },
    /// Fetch item ID and write its plaintext to standard output.
    Get {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, env = "POLYDEV_VAULT_SESSION", hide_env_values = true)]
        session: String,
        id: String,
    },
    /// List your items (ids, versions, sizes) as JSON.
    List(ServerArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UserAddArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The new user's email.
    #[arg(long)]
    pub email: String,
    /// Make the user an admin.
    #[arg(long)]
    pub admin: bool,
    /// Read a password for web sign-in from standard input (first line);
    /// the vault is set up with it (the server keeps only wrapped keys).
    #[arg(long)]
    pub password_stdin: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
