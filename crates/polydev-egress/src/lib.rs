//! polydev's per-user egress proxy. Every sandbox reaches the network only
//! through it, with a credential minted for that sandbox
//! (`Proxy-Authorization: Basic`), tied to a user and a template.
//!
//! - CONNECT tunnels and absolute-form `http://` forwarding (hyper, with
//!   upgrades; CONNECT is handled before anything else).
//! - A built-in deny of loopback/private/link-local/reserved ranges, checked
//!   on resolved addresses and connected to exactly (no DNS rebinding),
//!   with operator exceptions; per-template host allow-lists.
//! - Per-user listening ports (v1's `user_proxy_ports`) that accept only
//!   that user's credentials, besides the shared port.
//! - Limits per user (tunnels, request rate, bandwidth), header, idle and
//!   connect deadlines; optional chaining through an upstream proxy.
//! - Usage per user and sandbox in the store, totals as metrics.
//!
//! Invariant: a credential's secret is never logged, stored or labelled;
//! the store holds its SHA-256, logs name the sandbox.

mod accounting;
pub mod config;
mod credentials;
pub mod guard;
pub mod limits;
mod proxy;
mod raw;
pub mod relay_head;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use polydev_domain::UserId;
use polydev_store::{now_ms, Store, StoreError};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use accounting::EgressMetrics;
pub use config::{EgressConfig, PolicyConfig, PortRange, UpstreamConfig, UpstreamUser};
use credentials::Credentials;
pub use credentials::{Identity, MintedCredential};
use guard::{ConnectError, Guard};
use limits::Limits;

/// Why the proxy could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("every port in the per-user range is taken")]
    PortsExhausted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a sandbox needs to use its egress.
#[derive(Clone)]
pub struct ProxyAccess {
    pub credential: MintedCredential,
    /// `http://user:secret@host:port` on the shared port.
    pub proxy_url: String,
    /// The user's own port, when per-user ports are on.
    pub user_port: Option<u16>,
}

impl std::fmt::Debug for ProxyAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAccess")
            .field("credential", &self.credential)
            .field("user_port", &self.user_port)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Upstream {
    addr_host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    config: UpstreamConfig,
}

pub(crate) struct Inner {
    config: EgressConfig,
    store: Store,
    guard: Guard,
    credentials: Credentials,
    limits: Limits,
    accounting: accounting::Accounting,
    upstream: Option<Upstream>,
    public_host: String,
    main_port: RwLock<Option<u16>>,
    user_ports: RwLock<HashMap<u16, UserId>>,
    new_ports: mpsc::UnboundedSender<(u16, UserId)>,
    new_ports_rx: Mutex<Option<mpsc::UnboundedReceiver<(u16, UserId)>>>,
    tasks: Mutex<JoinSet<()>>,
    /// Effective allow-lists per template (computed once per template).
    policies: RwLock<HashMap<String, Option<Arc<PolicyConfig>>>>,
    /// The last destination each sandbox could not reach, and why (for a
    /// run to say in plain words why its CLI failed). Bounded.
    refusals: Mutex<HashMap<String, Refused>>,
}

/// A destination a sandbox could not reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub host: String,
    /// Finishes "`host` …", e.g. "cannot be resolved from this server".
    pub why: String,
}

const MAX_REFUSALS: usize = 4096;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn note_refusal(&self, sandbox_id: &str, host: &str, why: &str) {
        if let Ok(mut r) = self.refusals.lock() {
            if r.len() >= MAX_REFUSALS && !r.contains_key(sandbox_id) {
                r.clear();
            }
            r.insert(
                sandbox_id.to_owned(),
                Refused {
                    host: host.chars().take(256).collect(),
                    why: why.to_owned(),
                },
            );
        }
    }

    /// The allow-list of `template` (`None`: any host).
    pub(crate) fn policy(&self, template: &str) -> Option<Arc<PolicyConfig>> {
        if let Some(p) = self
            .policies
            .read()
            .ok()
            .and_then(|p| p.get(template).cloned())
        {
            return p;
        }
        let p = self.config.policy_for(template).map(Arc::new);
        if let Ok(mut all) = self.policies.write() {
            if all.len() < 1024 {
                all.insert(template.to_owned(), p.clone());
            }
        }
        p
    }

    /// Runs `work` as part of the proxy: aborted when it stops.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut t) = self.tasks.lock() {
            t.spawn(work);
        }
    }

    /// A stream to `host:port`, directly or through the upstream proxy,
    /// never to a denied address.
    pub(crate) async fn dial(
        &self,
        host: &str,
        port: u16,
        identity: &Identity,
    ) -> Result<TcpStream, ConnectError> {
        let deadline = self.config.connect_timeout();
        let Some(up) = &self.upstream else {
            let (stream, _) = self.guard.connect(host, port, deadline).await?;
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        };
        let target = self.guard.resolve_allowed(host, port, deadline).await?;
        let per_user = up
            .config
            .per_user
            .get(&identity.user_id.to_string())
            .cloned()
            .unwrap_or_default();
        let proxy_port = per_user.port.unwrap_or(up.port);
        let proxy = tokio::net::lookup_host((up.addr_host.as_str(), proxy_port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ConnectError::Resolve(up.addr_host.clone()))?;
        let auth = up.username.as_ref().map(|user| {
            let user = up
                .config
                .username_format
                .replace("{username}", user)
                .replace("{session}", per_user.session.as_deref().unwrap_or(""));
            let pair = format!("{user}:{}", up.password.as_deref().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        proxy::upstream_connect(proxy, target, auth.as_deref(), deadline).await
    }
}

/// The egress proxy. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Egress {
    inner: Arc<Inner>,
}

fn parse_upstream(config: &UpstreamConfig) -> Result<Upstream, EgressError> {
    let bad = |why: &str| {
        EgressError::Config(format!(
            "upstream url {:?}: {why}",
            redact_userinfo(&config.url)
        ))
    };
    let rest = config
        .url
        .strip_prefix("http://")
        .ok_or_else(|| bad("must start with http://"))?;
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| bad("needs host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    let (username, password) = match userinfo.map(|u| {
        u.split_once(':')
            .map(|(a, b)| (a, Some(b)))
            .unwrap_or((u, None))
    }) {
        Some((u, p)) => (Some(u.to_owned()), p.map(str::to_owned)),
        None => (None, None),
    };
    Ok(Upstream {
        addr_host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        username,
        password,
        config: config.clone(),
    })
}

/// `http://user:secret@host` → `http://user:***@host`.
pub fn redact_userinfo(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, rest)), Some((_, host))) if rest.contains('@') => {
            let user = rest.split([':', '@']).next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

impl Egress {
    /// Builds the proxy and registers its metrics. Does not listen yet.
    pub fn new(
        config: EgressConfig,
        store: Store,
        registry: &mut Registry,
    ) -> Result<Self, EgressError> {
        let guard = Guard::new(&config.allow_private)
            .and_then(|g| g.with_denied(&config.deny))
            .map_err(EgressError::Config)?
            .with_hosts(&config.hosts);
        if let Some(r) = config.user_port_range() {
            if r.first == 0 || r.first > r.last {
                return Err(EgressError::Config(format!(
                    "user_ports {}..{} is not a range",
                    r.first, r.last
                )));
            }
        }
        let upstream = config.upstream.as_ref().map(parse_upstream).transpose()?;
        let metrics = EgressMetrics::register(registry);
        let (tx, rx) = mpsc::unbounded_channel();
        let public_host = config
            .public_host
            .clone()
            .unwrap_or_else(|| match config.listen.ip() {
                IpAddr::V6(ip) => format!("[{ip}]"),
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                ip => ip.to_string(),
            });
        Ok(Self {
            inner: Arc::new(Inner {
                credentials: Credentials::new(
                    store.clone(),
                    Duration::from_secs(config.credential_cache_secs),
                ),
                limits: Limits::new(
                    config.max_tunnels_per_user,
                    config.requests_per_sec_per_user,
                    config.bandwidth_bytes_per_sec_per_user,
                ),
                accounting: accounting::Accounting::new(metrics),
                guard,
                upstream,
                public_host,
                store,
                config,
                main_port: RwLock::new(None),
                user_ports: RwLock::new(HashMap::new()),
                new_ports: tx,
                new_ports_rx: Mutex::new(Some(rx)),
                tasks: Mutex::new(JoinSet::new()),
                policies: RwLock::new(HashMap::new()),
                refusals: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &EgressConfig {
        &self.inner.config
    }

    /// Binds the shared port (a clear error when it is taken).
    pub async fn bind(&self) -> Result<TcpListener, EgressError> {
        let addr = self.inner.config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EgressError::Bind { addr, source })?;
        if let Ok(a) = listener.local_addr() {
            if let Ok(mut p) = self.inner.main_port.write() {
                *p = Some(a.port());
            }
        }
        Ok(listener)
    }

    /// The shared port, once bound.
    pub fn port(&self) -> Option<u16> {
        self.inner.main_port.read().ok().and_then(|p| *p)
    }

    /// Mints a credential for a sandbox of `user` and, with per-user ports
    /// on, makes sure the user's port is assigned and listening.
    pub async fn mint(
        &self,
        user: UserId,
        sandbox_id: &str,
        template: &str,
    ) -> Result<ProxyAccess, EgressError> {
        let credential = self
            .inner
            .credentials
            .mint(user, sandbox_id, template)
            .await?;
        let user_port = match self.inner.config.user_port_range() {
            Some(range) => {
                let port = match self
                    .inner
                    .store
                    .assign_proxy_port(user, range.first, range.last, now_ms())
                    .await
                {
                    Ok(p) => p,
                    Err(StoreError::Conflict(_)) => return Err(EgressError::PortsExhausted),
                    Err(e) => return Err(e.into()),
                };
                let listening_for = self
                    .inner
                    .user_ports
                    .read()
                    .ok()
                    .and_then(|p| p.get(&port).copied());
                if listening_for != Some(user) {
                    let _ = self.inner.new_ports.send((port, user));
                }
                Some(port)
            }
            None => None,
        };
        let port = self.port().unwrap_or(self.inner.config.listen.port());
        let proxy_url = format!(
            "http://{}:{}@{}:{port}",
            credential.username, credential.secret, self.inner.public_host
        );
        Ok(ProxyAccess {
            credential,
            proxy_url,
            user_port,
        })
    }

    /// The URL for a user port (same credential).
    pub fn user_proxy_url(&self, access: &ProxyAccess) -> Option<String> {
        access.user_port.map(|p| {
            format!(
                "http://{}:{}@{}:{p}",
                access.credential.username, access.credential.secret, self.inner.public_host
            )
        })
    }

    /// Revokes one credential, at once for this process.
    pub async fn revoke(&self, username: &str) -> Result<(), EgressError> {
        self.inner.credentials.forget(username);
        self.inner
            .store
            .revoke_egress_credential(username, now_ms())
            .await?;
        Ok(())
    }

    /// The last destination `sandbox_id` could not reach, and why.
    pub fn last_refusal(&self, sandbox_id: &str) -> Option<Refused> {
        self.inner.refusals.lock().ok()?.get(sandbox_id).cloned()
    }

    /// Revokes every credential of a sandbox (when it ends).
    pub async fn revoke_sandbox(&self, sandbox_id: &str) -> Result<usize, EgressError> {
        if let Ok(mut r) = self.inner.refusals.lock() {
            r.remove(sandbox_id);
        }
        let names = self
            .inner
            .store
            .revoke_egress_credentials_of_sandbox(sandbox_id, now_ms())
            .await?;
        for n in &names {
            self.inner.credentials.forget(n);
        }
        Ok(names.len())
    }

    /// Writes pending usage to the store now.
    pub async fn flush_usage(&self) {
        self.inner.accounting.flush(&self.inner.store).await;
    }

    /// Serves until `stop` changes: the shared port, every per-user port
    /// (those in the store at start, those assigned later, and those other
    /// controllers assign, polled), usage flushes, limit sweeps.
    pub async fn run(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let inner = self.inner.clone();
        let mut listeners = JoinSet::new();
        listeners.spawn(accept_loop(inner.clone(), listener, None, stop.clone()));
        let mut rx = inner.new_ports_rx.lock().ok().and_then(|mut r| r.take());
        let mut flush =
            tokio::time::interval(Duration::from_secs(inner.config.flush_interval_secs.max(1)));
        let mut poll = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some((port, user)) = async { match rx.as_mut() { Some(r) => r.recv().await, None => None } } => {
                    self.listen_user_port(&mut listeners, port, user, &stop).await;
                }
                _ = poll.tick() => {
                    if inner.config.per_user_ports {
                        match inner.store.proxy_ports().await {
                            Ok(ports) => for (user, port) in ports {
                                self.listen_user_port(&mut listeners, port, user, &stop).await;
                            },
                            Err(e) => tracing::warn!(error = %e, "egress cannot read per-user ports"),
                        }
                    }
                    inner.limits.sweep();
                    inner.guard.refresh_host_addresses();
                    if let Ok(mut t) = inner.tasks.lock() {
                        while t.try_join_next().is_some() {}
                    }
                }
                _ = flush.tick() => inner.accounting.flush(&inner.store).await,
            }
        }
        listeners.shutdown().await;
        let tasks = inner.tasks.lock().map(|mut t| std::mem::take(&mut *t)).ok();
        if let Some(mut tasks) = tasks {
            tasks.shutdown().await;
        }
        inner.accounting.flush(&inner.store).await;
    }

    async fn listen_user_port(
        &self,
        listeners: &mut JoinSet<()>,
        port: u16,
        user: UserId,
        stop: &watch::Receiver<bool>,
    ) {
        // Already listening: the port may have changed hands (a released
        // port assigned again); its listener checks the owner per connection.
        if let Ok(mut p) = self.inner.user_ports.write() {
            if let Some(owner) = p.get_mut(&port) {
                *owner = user;
                return;
            }
        }
        let addr = SocketAddr::new(self.inner.config.listen.ip(), port);
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                if let Ok(mut p) = self.inner.user_ports.write() {
                    p.insert(port, user);
                }
                tracing::info!(port, user_id = %user, "egress listening on a per-user port");
                listeners.spawn(accept_loop(
                    self.inner.clone(),
                    listener,
                    Some(port),
                    stop.clone(),
                ));
            }
            Err(e) => tracing::warn!(port, error = %e, "egress cannot listen on a per-user port"),
        }
    }
}

/// Accepts on the shared port (`user_port` None: any live credential) or
/// on a user's port (only its current owner's credentials; nobody's while
/// the port is not assigned).
async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    user_port: Option<u16>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let owner = match user_port {
                        None => None,
                        Some(port) => match inner.user_ports.read().ok().and_then(|p| p.get(&port).copied()) {
                            Some(owner) => Some(owner),
                            None => continue, // released: closed at once
                        },
                    };
                    let conn_inner = inner.clone();
                    inner.spawn(raw::serve(conn_inner, stream, peer, owner));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "egress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_parse_and_redact() {
        let up = parse_upstream(&UpstreamConfig {
            url: "http://acct:s3cret@gate.example:7000".into(),
            username_format: "{username}".into(),
            per_user: Default::default(),
        })
        .unwrap();
        assert_eq!(
            (
                up.addr_host.as_str(),
                up.port,
                up.username.as_deref(),
                up.password.as_deref()
            ),
            ("gate.example", 7000, Some("acct"), Some("s3cret"))
        );
        assert_eq!(
            redact_userinfo("http://acct:s3cret@gate.example:7000"),
            "http://acct:***@gate.example:7000"
        );
        assert!(parse_upstream(&UpstreamConfig {
            url: "socks5://x:1".into(),
            username_format: String::new(),
            per_user: Default::default()
        })
        .is_err());
    }
}
