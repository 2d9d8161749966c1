//! Above the driver: the store is the source of truth. The manager
//! records every sandbox before it exists, enforces quotas, keeps warm
//! pools, and runs the reaper (TTL) and the reconciler (driver vs store).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polydev_domain::{SandboxStatus, UserId};
use polydev_store::{SandboxRecord, Store, StoreError};
use polydev_telemetry::metrics::{
    SandboxMetrics, TemplateDriverLabels, TemplateLabels, TemplateStageLabels,
};
use serde::{Deserialize, Serialize};

use crate::driver::{now_ms, Driver, DriverError, Stage, Stats};
use crate::image::{ImageError, ImageStore};
use crate::spec::{Limits, Network, SandboxId, SandboxSpec};

/// What a sandbox in network mode `egress` gets from the egress proxy.
#[derive(Clone)]
pub struct EgressGrant {
    /// The proxy's address on the host (the relay's target).
    pub target: std::net::SocketAddr,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for EgressGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressGrant")
            .field("target", &self.target)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The egress proxy as the manager sees it: a credential per sandbox,
/// revoked when the sandbox ends.
#[async_trait::async_trait]
pub trait EgressGate: Send + Sync + std::fmt::Debug {
    async fn open(
        &self,
        user: UserId,
        sandbox: &str,
        template: &str,
    ) -> Result<EgressGrant, String>;
    async fn close(&self, sandbox: &str);
    /// The last destination `sandbox` could not reach: (host, why), the
    /// reason finishing "it …".
    fn last_refusal(&self, sandbox: &str) -> Option<(String, String)> {
        let _ = sandbox;
        None
    }
}

/// The spec as stored: environment values are left out (they may be
/// secrets); their names are kept.
fn stored_spec(spec: &SandboxSpec) -> Result<String, ManagerError> {
    let mut s = spec.clone();
    for (_, v) in &mut s.env {
        v.clear();
    }
    serde_json::to_string(&s).map_err(|e| ManagerError::Invalid(e.to_string()))
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub boot_deadline: Duration,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub default_limits: Limits,
    /// Limits of a template's sandboxes when a request names none (and of
    /// its pool); else `default_limits`.
    pub template_limits: BTreeMap<String, Limits>,
    /// The most any sandbox may ask for (admins only: a plain user may ask
    /// for at most the template's defaults).
    pub max_limits: Limits,
    /// Per-template maxima (else `max_limits`).
    pub template_max: BTreeMap<String, Limits>,
    /// A command run in each new pool member of a template (short: it
    /// starts what should already run at hand-out, e.g. the login desktop).
    pub pool_warmup: BTreeMap<String, Vec<String>>,
    /// Live sandboxes one user may hold (429 beyond).
    pub per_user_max: u32,
    /// The most memory (the sum of memory limits) one user's live
    /// sandboxes may have (429 beyond); `None`: no such limit.
    pub per_user_memory: Option<u64>,
    /// The most memory all live sandboxes together may have as limits,
    /// pools included (503 beyond): the host's sandbox budget times an
    /// overcommit factor; `None`: no such limit.
    pub memory_commit_max: Option<u64>,
    /// No new sandbox while the sandboxes together use more than this
    /// share of their memory budget (503 beyond; what they use, not their
    /// limits, which they mostly leave unused); `None`: no such check.
    pub admit_memory_below: Option<f64>,
    /// Live sandboxes on this host, pools included (503 beyond).
    pub host_max: u32,
    /// Warm sandboxes kept per template.
    pub pools: BTreeMap<String, usize>,
    /// Pool sandboxes older than this are replaced.
    pub pool_refresh: Duration,
    pub reap_interval: Duration,
    pub reconcile_interval: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            boot_deadline: Duration::from_secs(10),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            default_limits: Limits::default(),
            template_limits: BTreeMap::new(),
            max_limits: Limits::host_maxima(),
            template_max: BTreeMap::new(),
            pool_warmup: BTreeMap::new(),
            per_user_max: 10,
            per_user_memory: Some(12 << 30),
            memory_commit_max: None,
            admit_memory_below: Some(0.9),
            host_max: 2000,
            pools: BTreeMap::new(),
            pool_refresh: Duration::from_secs(1800),
            reap_interval: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(30),
        }
    }
}

/// What a caller asks for; unset fields take the configured defaults.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub template: String,
    pub limits: Option<Limits>,
    pub network: Network,
    pub env: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    pub ttl: Option<Duration>,
    /// An admin's request: limits up to the template's maxima (a plain
    /// user's stop at the template's defaults).
    pub privileged: bool,
    /// `run` or `login`: a sandbox the controller runs for a session, which
    /// holds the user's credential; nobody may exec in it or read its
    /// files through the API (label `SYSTEM_LABEL`).
    pub system: Option<&'static str>,
}

/// The label that marks a system sandbox (see `CreateRequest::system`).
pub const SYSTEM_LABEL: &str = "system";
/// Label keys only the controller sets.
pub const RESERVED_LABELS: [&str; 6] =
    [SYSTEM_LABEL, "run", "login", "pool", "provider", "purpose"];

/// One of a sandbox's limits, for errors that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Memory,
    Pids,
    Cpu,
    Disk,
}

impl LimitKind {
    /// The value in the unit requests use (MiB, count, millicores, MiB).
    pub fn of(self, l: &Limits) -> u64 {
        match self {
            Self::Memory => l.memory_bytes >> 20,
            Self::Pids => u64::from(l.pids),
            Self::Cpu => u64::from(l.cpu_millis),
            Self::Disk => l.disk_bytes >> 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("you already have {0} live sandboxes, the most allowed; delete one first")]
    UserQuota(u32),
    /// A limit above what this caller may ask for: `max` in the request's
    /// unit; `admin_only` when an admin could ask for more.
    #[error("{limit:?} {asked} is above the most allowed ({max})")]
    LimitTooHigh {
        limit: LimitKind,
        asked: u64,
        max: u64,
        admin_only: bool,
    },
    #[error("this host runs its maximum of {0} sandboxes; try again shortly")]
    HostCapacity(u32),
    #[error("your live sandboxes already have {held_mb} MiB of memory and this one asks for {asked_mb} MiB more, above your {max_mb} MiB; delete one first")]
    UserMemory {
        held_mb: u64,
        asked_mb: u64,
        max_mb: u64,
    },
    #[error("this host's memory for sandboxes is committed; try again shortly")]
    HostMemory,
    #[error("this host's sandboxes are using most of their memory; try again shortly")]
    HostMemoryInUse,
    #[error("no sandbox {0}")]
    NotFound(String),
    #[error("sandbox {0} has ended")]
    Gone(String),
    /// The template's image is being built (first start); try again.
    #[error("the {template} environment is being prepared")]
    Preparing {
        template: String,
        state: crate::build::Prepared,
    },
    /// This controller's build of the template's image failed (first
    /// start); `error` is the build's own account, for the operator.
    // The build's account stays out of the message (it is for operators:
    // the API hands it to admins alone, the log has it).
    #[error("preparing the {template} environment failed")]
    PrepareFailed { template: String, error: String },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A sandbox as callers see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    pub id: String,
    pub user_id: Option<String>,
    pub template: String,
    pub image: String,
    pub driver: String,
    pub status: SandboxStatus,
    pub stages: Vec<Stage>,
    /// Why it failed (JSON), when it did.
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub labels: BTreeMap<String, String>,
}

impl SandboxView {
    fn from_record(r: &SandboxRecord) -> Self {
        let spec: Option<SandboxSpec> = serde_json::from_str(&r.spec).ok();
        Self {
            id: r.id.clone(),
            user_id: r.user_id.map(|u| u.to_string()),
            template: r.template.clone(),
            image: r.image.clone(),
            driver: r.driver.clone(),
            status: r.status,
            stages: serde_json::from_str(&r.stages).unwrap_or_default(),
            error: r
                .error
                .as_deref()
                .and_then(|e| serde_json::from_str(e).ok()),
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
            ended_at_ms: r.ended_at_ms,
            labels: spec.map(|s| s.labels).unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
struct Warm {
    id: SandboxId,
    born: Instant,
    /// Made with an egress relay that has no route yet (hand-out routes it).
    egress_ready: bool,
}

#[derive(Debug)]
pub struct Manager {
    driver: Arc<dyn Driver>,
    store: Store,
    images: ImageStore,
    cfg: ManagerConfig,
    metrics: SandboxMetrics,
    pools: Mutex<HashMap<String, VecDeque<Warm>>>,
    /// Sandboxes this process holds (creating, pooled or ready).
    live: AtomicUsize,
    /// Their memory limits, per sandbox and per user.
    commitments: Mutex<Commitments>,
    refill: tokio::sync::Notify,
    egress: std::sync::OnceLock<Arc<dyn EgressGate>>,
    /// One admission at a time per user: the quota is counted and the
    /// sandbox's record written under it, so the count is exact.
    admission: Mutex<HashMap<UserId, Arc<tokio::sync::Mutex<()>>>>,
    /// The images this controller builds at start, and how far along.
    preparation: std::sync::OnceLock<Arc<crate::build::Preparation>>,
}

impl Manager {
    pub fn new(
        driver: Arc<dyn Driver>,
        store: Store,
        images: ImageStore,
        cfg: ManagerConfig,
        metrics: SandboxMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            driver,
            store,
            images,
            cfg,
            metrics,
            pools: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            commitments: Mutex::new(Commitments::default()),
            refill: tokio::sync::Notify::new(),
            egress: std::sync::OnceLock::new(),
            admission: Mutex::new(HashMap::new()),
            preparation: std::sync::OnceLock::new(),
        })
    }

    /// Tells the manager which images are being prepared (once).
    pub fn set_preparation(&self, p: Arc<crate::build::Preparation>) {
        let _ = self.preparation.set(p);
    }

    pub fn preparation(&self) -> Option<&Arc<crate::build::Preparation>> {
        self.preparation.get()
    }

    /// Whether sandboxes of `template` can be made now (its image exists),
    /// or why not (being prepared, with how far along; missing).
    pub fn ready(&self, template: &str) -> Result<(), ManagerError> {
        self.image_for(template).map(|_| ())
    }

    /// The template's current image, or why there is none: being prepared
    /// (with how far along), or simply missing.
    fn image_for(&self, template: &str) -> Result<crate::image::Image, ManagerError> {
        match self.images.current(template) {
            Ok(i) => Ok(i),
            Err(e) => match self.preparation.get().and_then(|p| p.of(template)) {
                Some(
                    state @ (crate::build::Prepared::Queued
                    | crate::build::Prepared::Building { .. }),
                ) => Err(ManagerError::Preparing {
                    template: template.to_owned(),
                    state,
                }),
                Some(crate::build::Prepared::Failed { error, .. }) => {
                    Err(ManagerError::PrepareFailed {
                        template: template.to_owned(),
                        error,
                    })
                }
                _ => Err(e.into()),
            },
        }
    }

    /// Enables network mode `egress` (once; later calls are ignored).
    pub fn set_egress(&self, gate: Arc<dyn EgressGate>) {
        let _ = self.egress.set(gate);
    }

    /// The driver's name (`local`, …), for logs.
    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// A connection to the sandbox's agent (exec, files, unseal): the one
    /// way sessions and routes act inside a sandbox. Ownership is the
    /// caller's to have checked (`get` with the caller's scope).
    pub async fn agent(
        &self,
        id: &SandboxId,
        deadline: Duration,
    ) -> Result<polydev_agent::AgentClient, DriverError> {
        self.driver.agent(id, deadline).await
    }

    /// A byte stream to the service `/run/polydev/<name>` inside the
    /// sandbox (dialled by its agent; no sandbox path is resolved here).
    pub async fn connect_service(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<tokio::net::UnixStream, DriverError> {
        self.driver.connect_service(id, name).await
    }

    /// What the sandbox uses now (memory, pids, CPU).
    pub async fn stats(&self, id: &SandboxId) -> Result<Stats, DriverError> {
        self.driver.stats(id).await
    }

    /// The last `lines` of the sandbox's console.
    pub async fn log_tail(&self, id: &SandboxId, lines: usize) -> Vec<String> {
        self.driver.log_tail(id, lines).await
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn labels(&self, template: &str) -> TemplateLabels {
        TemplateLabels {
            template: template.to_owned(),
        }
    }

    fn gauge_active(&self, template: &str, delta: i64) {
        self.metrics
            .active
            .get_or_create(&TemplateDriverLabels {
                template: template.to_owned(),
                driver: self.driver.name().to_owned(),
            })
            .inc_by(delta);
        self.metrics.containers_active.inc_by(delta);
    }

    fn limits_of(&self, template: &str) -> Limits {
        self.cfg
            .template_limits
            .get(template)
            .copied()
            .unwrap_or(self.cfg.default_limits)
    }

    /// Mints `user`'s egress credential for sandbox `id` into `spec` (route
    /// and relay credential) and the proxy variables into `env`.
    async fn open_egress(
        &self,
        user: UserId,
        id: &SandboxId,
        spec: &mut SandboxSpec,
        env: &mut Vec<(String, String)>,
    ) -> Result<(), ManagerError> {
        let gate = self.egress.get().ok_or_else(|| {
            ManagerError::Invalid(
                "network `egress` needs the egress proxy, which is off on this controller".into(),
            )
        })?;
        let grant = gate
            .open(user, id.as_str(), &egress_policy_name(spec))
            .await
            .map_err(ManagerError::Invalid)?;
        spec.egress = Some(grant.target);
        spec.egress_auth = Some(format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{}:{}", grant.username, grant.password)
            )
        ));
        // No credential in the URL: the relay adds the sandbox's own to
        // every request, so nothing inside ever learns it.
        let url = format!("http://{}", crate::spec::EGRESS_INSIDE);
        for k in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
        ] {
            env.push((k.to_owned(), url.clone()));
        }
        for k in ["NO_PROXY", "no_proxy"] {
            env.push((k.to_owned(), "localhost,127.0.0.1,::1".to_owned()));
        }
        Ok(())
    }

    fn max_of(&self, template: &str) -> Limits {
        self.cfg
            .template_max
            .get(template)
            .copied()
            .unwrap_or(self.cfg.max_limits)
    }

    /// Refuses limits above what the caller may ask for: a plain user up to
    /// the template's defaults, an admin up to the template's maxima.
    fn check_limits(&self, req: &CreateRequest, limits: &Limits) -> Result<(), ManagerError> {
        let defaults = self.limits_of(&req.template);
        let max = self.max_of(&req.template);
        for kind in [
            LimitKind::Memory,
            LimitKind::Pids,
            LimitKind::Cpu,
            LimitKind::Disk,
        ] {
            let asked = kind.of(limits);
            let ceiling = if req.privileged {
                kind.of(&max)
            } else {
                kind.of(&defaults).min(kind.of(&max))
            };
            if asked > ceiling {
                return Err(ManagerError::LimitTooHigh {
                    limit: kind,
                    asked,
                    max: ceiling,
                    admin_only: !req.privileged && kind.of(&max) > ceiling,
                });
            }
        }
        Ok(())
    }

    fn spec_for(&self, req: &CreateRequest) -> Result<SandboxSpec, ManagerError> {
        let ttl = req.ttl.unwrap_or(self.cfg.default_ttl);
        if ttl.is_zero() || ttl > self.cfg.max_ttl {
            return Err(ManagerError::Invalid(format!(
                "ttlSecs must be between 1 and {}",
                self.cfg.max_ttl.as_secs()
            )));
        }
        let limits = req.limits.unwrap_or_else(|| self.limits_of(&req.template));
        self.check_limits(req, &limits)?;
        if limits.memory_bytes < 16 << 20
            || limits.pids < 8
            || limits.cpu_millis < 10
            || limits.disk_bytes < 1 << 20
        {
            return Err(ManagerError::Invalid(
                "limits too small: memory ≥ 16 MiB, pids ≥ 8, cpu ≥ 10 millicores, disk ≥ 1 MiB"
                    .into(),
            ));
        }
        let mut labels = req.labels.clone();
        if let Some(kind) = req.system {
            labels.insert(SYSTEM_LABEL.to_owned(), kind.to_owned());
        }
        Ok(SandboxSpec {
            template: req.template.clone(),
            limits,
            network: req.network,
            env: req.env.clone(),
            labels,
            ttl,
            egress: None,
            egress_auth: None,
        })
    }

    /// Claims one slot of host capacity and the sandbox's memory (for
    /// `user`, or a pool when `None`).
    fn claim(&self, id: &SandboxId, user: Option<UserId>, memory: u64) -> Result<(), ManagerError> {
        let mut c = self
            .commitments
            .lock()
            .map_err(|_| ManagerError::Invalid("commitments poisoned".into()))?;
        if let Some(max) = self.cfg.memory_commit_max {
            if c.total.saturating_add(memory) > max {
                return Err(ManagerError::HostMemory);
            }
        }
        if let (Some(share), Some((used, budget))) =
            (self.cfg.admit_memory_below, self.driver.memory_in_use())
        {
            tracing::debug!(
                used_mib = used >> 20,
                budget_mib = budget >> 20,
                "memory admission"
            );
            if budget > 0 && used as f64 > budget as f64 * share {
                tracing::warn!(
                    used_mib = used >> 20,
                    budget_mib = budget >> 20,
                    "a sandbox was refused: the sandboxes use more than the admission share of their memory budget"
                );
                return Err(ManagerError::HostMemoryInUse);
            }
        }
        let max = self.cfg.host_max as usize;
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| ManagerError::HostCapacity(self.cfg.host_max))?;
        c.add(id.clone(), user, memory);
        Ok(())
    }

    /// Gives back what `claim` took (idempotent per sandbox).
    fn release(&self, id: &SandboxId) {
        let held = self
            .commitments
            .lock()
            .map(|mut c| c.remove(id))
            .unwrap_or(false);
        if held {
            let _ = self
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }

    /// The admission lock of `user`.
    fn admission(&self, user: UserId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget the locks nobody holds (bounds the map).
        if map.len() > 1024 {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(user).or_default().clone()
    }

    /// Checks `user`'s quotas (count and memory, for a sandbox of
    /// `memory`) under their admission lock; the caller writes the
    /// sandbox's record before dropping the guard.
    async fn admit(
        &self,
        user: UserId,
        memory: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ManagerError> {
        let guard = self.admission(user).lock_owned().await;
        let held = self.store.count_live_sandboxes(user).await?;
        if held >= i64::from(self.cfg.per_user_max) {
            return Err(ManagerError::UserQuota(self.cfg.per_user_max));
        }
        if let Some(max) = self.cfg.per_user_memory {
            let held = self.commitments.lock().map(|c| c.of(user)).unwrap_or(0);
            if held.saturating_add(memory) > max {
                return Err(ManagerError::UserMemory {
                    held_mb: held >> 20,
                    asked_mb: memory >> 20,
                    max_mb: max >> 20,
                });
            }
        }
        Ok(guard)
    }

    /// A sandbox for `user`: from the warm pool when one fits, else cold.
    pub async fn create(
        &self,
        user: UserId,
        req: CreateRequest,
    ) -> Result<SandboxView, ManagerError> {
        let spec = self.spec_for(&req)?;
        let image = self.image_for(&req.template)?;
        let poolable = req.limits.is_none();
        if self.cfg.pools.get(&req.template).copied().unwrap_or(0) > 0 {
            if poolable {
                if let Some(view) = self.hand_out(user, &spec).await? {
                    self.metrics
                        .pool_hits
                        .get_or_create(&self.labels(&req.template))
                        .inc();
                    return Ok(view);
                }
            }
            self.metrics
                .pool_misses
                .get_or_create(&self.labels(&req.template))
                .inc();
        }
        let mut spec = spec;
        let id = SandboxId::generate();
        let admitted = self.admit(user, spec.limits.memory_bytes).await?;
        self.claim(&id, Some(user), spec.limits.memory_bytes)?;
        if let Err(e) = self.record(&id, Some(user), &spec, &image).await {
            self.release(&id);
            return Err(e);
        }
        drop(admitted);
        let mut env = spec.env.clone();
        if spec.network == Network::Egress {
            if let Err(e) = self.open_egress(user, &id, &mut spec, &mut env).await {
                self.release(&id);
                let _ = self
                    .store
                    .set_sandbox_status(
                        id.as_str(),
                        SandboxStatus::Failed,
                        None,
                        None,
                        Some(now_ms()),
                    )
                    .await;
                return Err(e);
            }
        }
        let result = self
            .boot_recorded(&id, &spec, &image, SandboxStatus::Ready)
            .await;
        if result.is_err() {
            self.release(&id);
            self.close_egress(&id).await;
        }
        result?;
        if !env.is_empty() {
            let configured = async {
                let mut agent = self.driver.agent(&id, Duration::from_secs(5)).await?;
                agent.configure(env).await.map_err(DriverError::from)
            }
            .await;
            if let Err(e) = configured {
                let _ = self.destroy(&id, SandboxStatus::Failed).await;
                return Err(e.into());
            }
        }
        self.get(&id, None).await
    }

    /// Why `id`'s last egress attempt failed, if it did: (host, why).
    pub fn egress_refusal(&self, id: &SandboxId) -> Option<(String, String)> {
        self.egress.get()?.last_refusal(id.as_str())
    }

    /// Revokes whatever egress credential sandbox `id` has (idempotent:
    /// every path that ends a sandbox calls it).
    async fn close_egress(&self, id: &SandboxId) {
        if let Some(gate) = self.egress.get() {
            gate.close(id.as_str()).await;
        }
    }

    /// Records, boots and marks the sandbox (`status` once ready).
    async fn boot(
        &self,
        id: &SandboxId,
        user: Option<UserId>,
        spec: &SandboxSpec,
        image: &crate::image::Image,
        status: SandboxStatus,
    ) -> Result<(), ManagerError> {
        self.record(id, user, spec, image).await?;
        self.boot_recorded(id, spec, image, status).await
    }

    /// The sandbox's record, `creating`, before anything of it exists.
    async fn record(
        &self,
        id: &SandboxId,
        user: Option<UserId>,
        spec: &SandboxSpec,
        image: &crate::image::Image,
    ) -> Result<(), ManagerError> {
        let created = now_ms();
        let spec_json = stored_spec(spec)?;
        self.store
            .insert_sandbox(&SandboxRecord {
                id: id.to_string(),
                user_id: user,
                template: spec.template.clone(),
                image: image.manifest.hash.clone(),
                driver: self.driver.name().to_owned(),
                status: SandboxStatus::Creating,
                stages: "[]".into(),
                spec: spec_json,
                error: None,
                created_at_ms: created,
                expires_at_ms: created + spec.ttl.as_millis() as i64,
                ended_at_ms: None,
            })
            .await?;
        Ok(())
    }

    /// Boots a recorded sandbox and marks it (`status` once ready).
    async fn boot_recorded(
        &self,
        id: &SandboxId,
        spec: &SandboxSpec,
        image: &crate::image::Image,
        status: SandboxStatus,
    ) -> Result<(), ManagerError> {
        let started = Instant::now();
        match self
            .driver
            .create(id, spec, image, self.cfg.boot_deadline)
            .await
        {
            Ok(booted) => {
                let stages = serde_json::to_string(&booted.stages).unwrap_or_else(|_| "[]".into());
                for s in booted.stages.iter().skip(1) {
                    let since = (s.at_ms - booted.stages[0].at_ms).max(0) as f64 / 1000.0;
                    self.metrics
                        .boot_duration
                        .get_or_create(&TemplateStageLabels {
                            template: spec.template.clone(),
                            stage: s.name.clone(),
                        })
                        .observe(since);
                }
                if !self
                    .store
                    .set_sandbox_status(id.as_str(), status, Some(&stages), None, None)
                    .await?
                {
                    // Deleted while booting.
                    self.close_egress(id).await;
                    let _ = self.driver.destroy(id).await;
                    return Err(ManagerError::Gone(id.to_string()));
                }
                self.gauge_active(&spec.template, 1);
                tracing::debug!(sandbox = %id, template = %spec.template, ms = started.elapsed().as_millis() as u64, "sandbox ready");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .boot_failures
                    .get_or_create(&self.labels(&spec.template))
                    .inc();
                let (stages, error) = match &e {
                    DriverError::Boot {
                        stage,
                        message,
                        stages,
                        log_tail,
                    } => (
                        serde_json::to_string(stages).ok(),
                        serde_json::json!({"stage": stage, "message": message, "logTail": log_tail}),
                    ),
                    other => (
                        None,
                        serde_json::json!({"stage": "created", "message": other.to_string()}),
                    ),
                };
                tracing::warn!(sandbox = %id, template = %spec.template, error = %e, "sandbox failed to boot");
                let _ = self
                    .store
                    .set_sandbox_status(
                        id.as_str(),
                        SandboxStatus::Failed,
                        stages.as_deref(),
                        Some(&error.to_string()),
                        Some(now_ms()),
                    )
                    .await;
                Err(e.into())
            }
        }
    }

    async fn hand_out(
        &self,
        user: UserId,
        spec: &SandboxSpec,
    ) -> Result<Option<SandboxView>, ManagerError> {
        let spec_json = stored_spec(spec)?;
        loop {
            let warm = {
                let mut pools = self
                    .pools
                    .lock()
                    .map_err(|_| ManagerError::Invalid("pool lock poisoned".into()))?;
                pools.get_mut(&spec.template).and_then(VecDeque::pop_front)
            };
            self.refill.notify_one();
            let Some(warm) = warm else { return Ok(None) };
            self.metrics
                .pool_size
                .get_or_create(&self.labels(&spec.template))
                .dec();
            let egress = spec.network == Network::Egress;
            if egress && !warm.egress_ready {
                // Made before the egress proxy was there: no relay to route.
                let _ = self.destroy(&warm.id, SandboxStatus::Ended).await;
                continue;
            }
            // Counted and assigned under the user's admission lock.
            let admitted = match self.admit(user, spec.limits.memory_bytes).await {
                Ok(g) => g,
                Err(e) => {
                    if let Ok(mut p) = self.pools.lock() {
                        p.entry(spec.template.clone()).or_default().push_front(warm);
                    }
                    self.metrics
                        .pool_size
                        .get_or_create(&self.labels(&spec.template))
                        .inc();
                    return Err(e);
                }
            };
            let expires = now_ms() + spec.ttl.as_millis() as i64;
            if !self
                .store
                .assign_sandbox(warm.id.as_str(), user, &spec_json, expires)
                .await?
            {
                continue; // reaped meanwhile
            }
            if let Ok(mut c) = self.commitments.lock() {
                c.assign(&warm.id, user);
            }
            drop(admitted);
            let mut spec = spec.clone();
            let mut env = spec.env.clone();
            if egress {
                let routed = match self.open_egress(user, &warm.id, &mut spec, &mut env).await {
                    Ok(()) => match (spec.egress, spec.egress_auth.clone()) {
                        (Some(target), Some(auth)) => self
                            .driver
                            .set_egress(&warm.id, target, auth)
                            .await
                            .map_err(ManagerError::from),
                        _ => Err(ManagerError::Invalid("no egress route".into())),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = routed {
                    let _ = self.destroy(&warm.id, SandboxStatus::Lost).await;
                    tracing::warn!(error = %e, "cannot route a pooled sandbox's egress");
                    if matches!(e, ManagerError::Invalid(_)) {
                        return Err(e);
                    }
                    continue;
                }
            }
            if !env.is_empty() {
                let configured = match self.driver.agent(&warm.id, Duration::from_secs(2)).await {
                    Ok(mut agent) => agent.configure(env).await.is_ok(),
                    Err(_) => false,
                };
                if !configured {
                    let _ = self.destroy(&warm.id, SandboxStatus::Lost).await;
                    continue;
                }
            }
            return self.get(&warm.id, None).await.map(Some);
        }
    }

    /// The record, if `user` may see it (`None` = any, for admins).
    pub async fn get(
        &self,
        id: &SandboxId,
        user: Option<UserId>,
    ) -> Result<SandboxView, ManagerError> {
        let r = match self.store.sandbox(id.as_str()).await {
            Err(StoreError::NotFound) => return Err(ManagerError::NotFound(id.to_string())),
            other => other?,
        };
        if user.is_some() && r.user_id != user {
            return Err(ManagerError::NotFound(id.to_string()));
        }
        Ok(SandboxView::from_record(&r))
    }

    /// Like `get`, but only for a live sandbox (410 otherwise).
    pub async fn live_for(
        &self,
        id: &SandboxId,
        user: Option<UserId>,
    ) -> Result<SandboxView, ManagerError> {
        let v = self.get(id, user).await?;
        if v.status != SandboxStatus::Ready {
            return Err(ManagerError::Gone(id.to_string()));
        }
        Ok(v)
    }

    pub async fn list(&self, user: Option<UserId>) -> Result<Vec<SandboxView>, ManagerError> {
        Ok(self
            .store
            .list_sandboxes(user, 500)
            .await?
            .iter()
            .map(SandboxView::from_record)
            .collect())
    }

    /// Destroys and records the end (`ended`, or `lost`/`failed`).
    pub async fn destroy(&self, id: &SandboxId, status: SandboxStatus) -> Result<(), ManagerError> {
        let record = self.store.sandbox(id.as_str()).await.ok();
        // Revoked first: a sandbox on its way out has no way out.
        self.close_egress(id).await;
        self.driver.destroy(id).await?;
        if self
            .store
            .set_sandbox_status(id.as_str(), status, None, None, Some(now_ms()))
            .await?
        {
            self.release(id);
            if let Some(r) = record {
                if matches!(r.status, SandboxStatus::Ready | SandboxStatus::Pooled) {
                    self.gauge_active(&r.template, -1);
                }
            }
        }
        Ok(())
    }

    /// Ends a user's sandbox (`None` = admin).
    pub async fn delete(&self, id: &SandboxId, user: Option<UserId>) -> Result<(), ManagerError> {
        let v = self.get(id, user).await?;
        if !v.status.is_live() {
            return Err(ManagerError::Gone(id.to_string()));
        }
        self.destroy(id, SandboxStatus::Ended).await
    }

    /// Destroys every live sandbox whose TTL has passed.
    pub async fn reap(&self) -> Result<usize, ManagerError> {
        let now = now_ms();
        let mut n = 0;
        for r in self.store.live_sandboxes().await? {
            if r.expires_at_ms <= now && r.status != SandboxStatus::Creating {
                if let Some(id) = SandboxId::parse(&r.id) {
                    tracing::info!(sandbox = %r.id, "TTL passed; destroying");
                    if self.destroy(&id, SandboxStatus::Ended).await.is_ok() {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Makes the driver and the store agree. Sandboxes the store does not
    /// hold as live are destroyed; live records whose sandbox is gone are
    /// marked `lost`. With `startup`, nothing of a previous process is
    /// trusted: creating and pooled records (the pool lived in its memory)
    /// end too.
    pub async fn reconcile(&self, startup: bool) -> Result<ReconcileReport, ManagerError> {
        let existing = self.driver.list().await?;
        let live = self.store.live_sandboxes().await?;
        let mut report = ReconcileReport::default();
        let known: HashMap<&str, &SandboxRecord> =
            live.iter().map(|r| (r.id.as_str(), r)).collect();
        let in_pool: std::collections::HashSet<String> = self
            .pools
            .lock()
            .map(|p| p.values().flatten().map(|w| w.id.to_string()).collect())
            .unwrap_or_default();
        for e in &existing {
            let keep = match known.get(e.id.as_str()) {
                None => false,
                // A driver that cannot take over a previous process's
                // sandboxes (the local one: they die with it) keeps none.
                Some(r) if startup => {
                    self.driver.adopts() && r.status == SandboxStatus::Ready && e.alive
                }
                Some(r) => r.status != SandboxStatus::Pooled || in_pool.contains(&r.id) || !e.alive,
            };
            if !keep {
                if let Some(id) = SandboxId::parse(&e.id) {
                    let status = if known.contains_key(e.id.as_str()) {
                        SandboxStatus::Lost
                    } else {
                        SandboxStatus::Ended
                    };
                    self.close_egress(&id).await;
                    let _ = self.driver.destroy(&id).await;
                    if known.contains_key(e.id.as_str()) {
                        let _ = self
                            .store
                            .set_sandbox_status(&e.id, status, None, None, Some(now_ms()))
                            .await;
                        report.lost += 1;
                    } else {
                        report.orphans_destroyed += 1;
                    }
                }
            }
        }
        let alive: HashMap<&str, bool> =
            existing.iter().map(|e| (e.id.as_str(), e.alive)).collect();
        for r in &live {
            let gone = !alive.get(r.id.as_str()).copied().unwrap_or(false);
            // A sandbox still being created by this process is not lost.
            if gone && (startup || r.status != SandboxStatus::Creating) {
                if let Some(id) = SandboxId::parse(&r.id) {
                    self.close_egress(&id).await;
                    let _ = self.driver.destroy(&id).await;
                }
                if self
                    .store
                    .set_sandbox_status(&r.id, SandboxStatus::Lost, None, None, Some(now_ms()))
                    .await?
                {
                    report.lost += 1;
                    if let Some(id) = SandboxId::parse(&r.id) {
                        self.release(&id);
                    }
                }
            }
        }
        if startup {
            let adopted = self.store.live_sandboxes().await?.len();
            self.live.store(adopted, Ordering::Relaxed);
            report.adopted = adopted;
        }
        Ok(report)
    }

    /// Tops the pools up to their sizes and replaces stale members.
    pub async fn refill_pools(&self) -> Result<usize, ManagerError> {
        let mut made = 0;
        for (template, &size) in &self.cfg.pools {
            if size == 0 {
                continue;
            }
            let Ok(image) = self.images.current(template) else {
                continue;
            };
            // Stale members out.
            let stale: Vec<SandboxId> = {
                let mut pools = self
                    .pools
                    .lock()
                    .map_err(|_| ManagerError::Invalid("pool lock poisoned".into()))?;
                let q = pools.entry(template.clone()).or_default();
                let mut out = Vec::new();
                while q
                    .front()
                    .is_some_and(|w| w.born.elapsed() > self.cfg.pool_refresh)
                {
                    if let Some(w) = q.pop_front() {
                        out.push(w.id);
                    }
                }
                out
            };
            for id in stale {
                self.metrics
                    .pool_size
                    .get_or_create(&self.labels(template))
                    .dec();
                let _ = self.destroy(&id, SandboxStatus::Ended).await;
            }
            loop {
                let have = self
                    .pools
                    .lock()
                    .map(|p| p.get(template).map_or(0, VecDeque::len))
                    .unwrap_or(size);
                let id = SandboxId::generate();
                let memory = self.limits_of(template).memory_bytes;
                if have >= size || self.claim(&id, None, memory).is_err() {
                    break;
                }
                // With the egress proxy on, pool members get an egress relay
                // without a route: a hand-out for network `egress` routes it
                // to the user's credential; for `none` it stays closed.
                let egress_ready = self.egress.get().is_some();
                let spec = SandboxSpec {
                    template: template.clone(),
                    limits: self.limits_of(template),
                    network: if egress_ready {
                        Network::Egress
                    } else {
                        Network::None
                    },
                    env: Vec::new(),
                    labels: [("pool".to_owned(), template.clone())].into(),
                    ttl: self.cfg.pool_refresh + Duration::from_secs(60),
                    egress: None,
                    egress_auth: None,
                };
                let booted = match self
                    .boot(&id, None, &spec, &image, SandboxStatus::Pooled)
                    .await
                {
                    Ok(()) => self.warm_up(&id, template).await,
                    Err(e) => Err(e),
                };
                match booted {
                    Ok(()) => {
                        made += 1;
                        self.metrics
                            .pool_size
                            .get_or_create(&self.labels(template))
                            .inc();
                        if let Ok(mut p) = self.pools.lock() {
                            p.entry(template.clone()).or_default().push_back(Warm {
                                id,
                                born: Instant::now(),
                                egress_ready,
                            });
                        }
                    }
                    Err(e) => {
                        self.release(&id);
                        tracing::warn!(template = %template, error = %e, "pool refill failed; retrying later");
                        break;
                    }
                }
            }
        }
        Ok(made)
    }

    /// Runs the template's warm-up command in a new pool member; on failure
    /// the member is destroyed.
    async fn warm_up(&self, id: &SandboxId, template: &str) -> Result<(), ManagerError> {
        let Some(argv) = self.cfg.pool_warmup.get(template) else {
            return Ok(());
        };
        let run = async {
            let mut agent = self.driver.agent(id, Duration::from_secs(5)).await?;
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = agent
                .exec(&argv, None, Duration::from_secs(30), |_| {})
                .await
                .map_err(DriverError::from)?;
            if out.code == Some(0) {
                Ok(())
            } else {
                Err(DriverError::Io(format!(
                    "pool warm-up exited with {:?}: {}",
                    out.code,
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        }
        .await;
        if let Err(e) = run {
            let _ = self.destroy(id, SandboxStatus::Failed).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Warm sandboxes ready for a template now.
    pub fn pool_len(&self, template: &str) -> usize {
        self.pools
            .lock()
            .map(|p| p.get(template).map_or(0, VecDeque::len))
            .unwrap_or(0)
    }

    /// Reconciles once at start, then runs reaper, refill and periodic
    /// reconciliation until `shutdown` fires; then destroys what it holds.
    pub async fn run(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        match self.reconcile(true).await {
            Ok(r) => tracing::info!(
                lost = r.lost,
                orphans = r.orphans_destroyed,
                adopted = r.adopted,
                "sandboxes reconciled at start"
            ),
            Err(e) => tracing::error!(error = %e, "reconciliation at start failed"),
        }
        let mut shutdown = shutdown;
        let mut reap = tokio::time::interval(self.cfg.reap_interval);
        let mut reconcile = tokio::time::interval(self.cfg.reconcile_interval);
        reconcile.tick().await;
        loop {
            tokio::select! {
                _ = reap.tick() => {
                    if let Err(e) = self.reap().await {
                        tracing::warn!(error = %e, "reaper pass failed");
                    }
                    if let Err(e) = self.refill_pools().await {
                        tracing::warn!(error = %e, "pool refill failed");
                    }
                }
                _ = self.refill.notified() => {
                    let _ = self.refill_pools().await;
                }
                _ = reconcile.tick() => {
                    if let Err(e) = self.reconcile(false).await {
                        tracing::warn!(error = %e, "reconciliation failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        self.shutdown().await;
    }

    /// Destroys every live sandbox (a clean stop leaves nothing running),
    /// then lets the driver remove what it made for itself.
    pub async fn shutdown(&self) {
        self.destroy_all().await;
        self.driver.shutdown().await;
    }

    async fn destroy_all(&self) {
        if let Ok(mut p) = self.pools.lock() {
            p.clear();
        }
        if let Ok(live) = self.store.live_sandboxes().await {
            for r in live {
                if let Some(id) = SandboxId::parse(&r.id) {
                    let _ = self.destroy(&id, SandboxStatus::Ended).await;
                }
            }
        }
    }
}

/// The memory limits of the live sandboxes this process holds: in all,
/// and per user (pool members belong to nobody until handed out).
#[derive(Debug, Default)]
struct Commitments {
    by_id: HashMap<SandboxId, (Option<UserId>, u64)>,
    by_user: HashMap<UserId, u64>,
    total: u64,
}

impl Commitments {
    fn add(&mut self, id: SandboxId, user: Option<UserId>, memory: u64) {
        if self.by_id.insert(id, (user, memory)).is_none() {
            self.total += memory;
            if let Some(u) = user {
                *self.by_user.entry(u).or_default() += memory;
            }
        }
    }

    fn assign(&mut self, id: &SandboxId, user: UserId) {
        if let Some((owner, memory)) = self.by_id.get_mut(id) {
            if owner.is_none() {
                *owner = Some(user);
                *self.by_user.entry(user).or_default() += *memory;
            }
        }
    }

    /// True when `id` was held.
    fn remove(&mut self, id: &SandboxId) -> bool {
        let Some((user, memory)) = self.by_id.remove(id) else {
            return false;
        };
        self.total = self.total.saturating_sub(memory);
        if let Some(u) = user {
            if let Some(m) = self.by_user.get_mut(&u) {
                *m = m.saturating_sub(memory);
                if *m == 0 {
                    self.by_user.remove(&u);
                }
            }
        }
        true
    }

    fn of(&self, user: UserId) -> u64 {
        self.by_user.get(&user).copied().unwrap_or(0)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub lost: usize,
    pub orphans_destroyed: usize,
    pub adopted: usize,
}

/// The egress policy a sandbox goes by: its template, or for a run's or
/// login's sandbox (the reserved `provider` label, set only by polydev)
/// `template+provider`, so each CLI reaches its own hosts only.
pub fn egress_policy_name(spec: &SandboxSpec) -> String {
    match spec.labels.get("provider") {
        Some(p) => format!("{}+{p}", spec.template),
        None => spec.template.clone(),
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
