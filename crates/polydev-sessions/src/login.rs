//! Login sessions: a provider CLI's sign-in, done by the user, inside a
//! sandbox. Mode `browser`: the sandbox runs a desktop (TigerVNC's `Xvnc`,
//! an X server and VNC server in one process, listening on a Unix socket
//! the controller bridges to the user's tab, and Chromium with a fresh
//! profile); the CLI's login command opens its sign-in page in that
//! Chromium and receives the redirect on its localhost callback inside the
//! sandbox. Mode `code` (code relay): no browser in the sandbox; the CLI
//! prints a URL, the user signs in in their own browser and pastes the code
//! (or, for device-code flows, types the shown code at the provider).
//!
//! Either way the CLI writes its credential file; the agent seals that file
//! to the user's vault public key inside the sandbox and only the sealed
//! box leaves, stored as the vault item `credential.<provider>`. Then the
//! sandbox is destroyed. The controller never holds the plaintext.
//!
//! States: `booting → ready → awaiting_login | awaiting_code → completed |
//! failed | expired | cancelled`. Boot has a deadline; idle time (no viewer
//! traffic, no API use) and total lifetime are bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polydev_agent::protocol::Event as AgentEvent;
use polydev_domain::{LoginState, Provider, SandboxStatus, UserId};
use polydev_store::{LoginRecord, StoreError};
use polydev_telemetry::metrics::LoginMetrics;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use polydev_sandbox::desktop::{
    desktop_command, greets_as_vnc, DESKTOP_FAILED, DESKTOP_LOG, OPENER, OPENER_DIR, VNC_SERVICE,
};
use polydev_sandbox::{CreateRequest, Limits, Manager, ManagerError, Network, SandboxId};
use polydev_store::{now_ms, Store};

pub use crate::providers::{login_commands, LoginCommand};
use crate::tasks::Tasks;
use crate::vault::seal_credential_to_vault;
pub use crate::vault::{credential_item_id, LOGIN_CREDENTIAL_PURPOSE};

/// The login desktop's last log lines if it died (its failure marker exists).
async fn desktop_failed(agent: &mut polydev_agent::AgentClient) -> Option<Vec<String>> {
    agent.get_file(DESKTOP_FAILED).await.ok()?;
    Some(desktop_log(agent).await)
}

/// The last lines of the login desktop's log (empty before it started).
async fn desktop_log(agent: &mut polydev_agent::AgentClient) -> Vec<String> {
    let log = agent.get_file(DESKTOP_LOG).await.unwrap_or_default();
    let mut tail = Tail::new(20);
    tail.push(&String::from_utf8_lossy(&log));
    tail.lines()
}

/// `size mtime` of a file in the sandbox, None when absent or empty;
/// Err when the agent connection failed.
async fn stat(agent: &mut polydev_agent::AgentClient, path: &str) -> Result<Option<String>, ()> {
    let out = agent
        .exec(
            &["stat", "-c", "%s %Y", path],
            None,
            Duration::from_secs(5),
            |_| {},
        )
        .await
        .map_err(|_| ())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((out.code == Some(0) && !text.starts_with("0 ")).then_some(text))
}

#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Template of the sandboxes (`browser` in production).
    pub template: String,
    pub boot_deadline: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// Lifetime of a viewer ticket (single use).
    pub ticket_ttl: Duration,
    /// How long an ended session stays in memory (the store keeps it after).
    pub retain: Duration,
    pub width: u32,
    pub height: u32,
    pub limits: Limits,
    pub commands: BTreeMap<Provider, LoginCommand>,
    /// Whose subscription sign-ins this installation offers, per provider.
    pub sign_in: crate::providers::SignInPolicy,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            template: "browser".into(),
            boot_deadline: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(30 * 60),
            ticket_ttl: Duration::from_secs(30),
            retain: Duration::from_secs(3600),
            width: 1280,
            height: 800,
            limits: Limits {
                cpu_millis: 2000,
                memory_bytes: 2048 << 20,
                pids: 1024,
                disk_bytes: 512 << 20,
            },
            commands: login_commands(),
            sign_in: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Browser,
    Code,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Browser => "browser",
            Mode::Code => "code",
        }
    }
}

/// A stage reached, with when (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageAt {
    pub state: LoginState,
    pub at_ms: i64,
}

/// A session as clients see it (no credential material ever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginView {
    pub session_id: String,
    pub user_id: String,
    pub provider: String,
    pub mode: String,
    pub state: LoginState,
    pub stages: Vec<StageAt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stage reached when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_stage: Option<LoginState>,
    /// End of the sandbox's log when it failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// The sign-in URL the CLI printed (code mode: open it yourself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_url: Option<String>,
    /// The CLI's last output lines in code mode (e.g. a device code).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instructions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Set once completed: the vault item holding the sealed credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault_item: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl LoginView {
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Invalid(String),
    #[error("no login session {0}")]
    NotFound(String),
    #[error("this login session belongs to another user")]
    Forbidden,
    /// The session ended (expired or cancelled).
    #[error("login session {} has {}", .0.session_id, .0.state)]
    Gone(Box<LoginView>),
    #[error("a {0} login session is already running for this user")]
    Busy(String, String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Unavailable(String),
    /// The installation's policy does not offer this user the provider's
    /// subscription sign-in.
    #[error(transparent)]
    NotOffered(#[from] crate::providers::NotOffered),
    #[error("the viewer ticket is missing, unknown, expired or already used")]
    BadTicket,
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
struct Session {
    id: String,
    user: UserId,
    provider: Provider,
    mode: Mode,
    view: watch::Sender<LoginView>,
    last_activity: Mutex<Instant>,
    started: Instant,
    /// The login command's pid, for pasted codes.
    login_pid: Mutex<Option<u32>>,
    /// Set when a client cancels; the driving task notices.
    /// Set when the session ends (the driving task stops); the value is
    /// the close code viewers get: 1001 for an end, 1011 for a failure.
    cancel: watch::Sender<Option<u16>>,
    metrics: LoginMetrics,
}

impl Session {
    fn snapshot(&self) -> LoginView {
        self.view.borrow().clone()
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_activity
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Moves to `state` if the machine allows it (never out of an end);
    /// false when it did not.
    fn advance(&self, state: LoginState, edit: impl FnOnce(&mut LoginView)) -> bool {
        let mut moved = false;
        let metrics = &self.metrics;
        self.view.send_if_modified(|v| {
            if v.is_terminal() {
                return false;
            }
            if v.state != state {
                if !v.state.can_become(state) {
                    tracing::warn!(from = %v.state, to = %state, "a login session may not move so; it stays");
                    return false;
                }
                metrics.entered(state);
                v.stages.push(StageAt {
                    state,
                    at_ms: now_ms(),
                });
                v.state = state;
            }
            edit(v);
            moved = true;
            true
        });
        moved
    }

    fn edit(&self, edit: impl FnOnce(&mut LoginView)) {
        self.view.send_modify(edit);
    }
}

#[derive(Debug)]
struct Ticket {
    session: String,
    user: UserId,
    expires: Instant,
}

/// What the viewer's bridge needs once a ticket checks out.
#[derive(Debug)]
pub struct Admitted {
    pub sandbox: SandboxId,
    /// Set when the session is ending (before its sandbox goes), to the
    /// close code for viewers: 1001 (ended) or 1011 (failed).
    pub ending: watch::Receiver<Option<u16>>,
}

pub struct Logins {
    manager: Arc<Manager>,
    store: Store,
    tasks: Tasks,
    cfg: LoginConfig,
    metrics: LoginMetrics,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    tickets: Mutex<HashMap<[u8; 32], Ticket>>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("template", &self.cfg.template)
            .finish_non_exhaustive()
    }
}

fn ticket_hash(ticket: &str) -> [u8; 32] {
    Sha256::digest(ticket.as_bytes()).into()
}

impl Logins {
    /// Sessions a previous controller left live are marked expired.
    pub async fn new(
        manager: Arc<Manager>,
        store: Store,
        cfg: LoginConfig,
        metrics: LoginMetrics,
    ) -> Result<Arc<Self>, LoginError> {
        // Sessions a previous controller left live are over (nobody can
        // finish them); their sandboxes go even if something still runs.
        let left = store.expire_live_login_sessions(now_ms()).await?;
        if !left.is_empty() {
            tracing::info!(
                count = left.len(),
                "login sessions of a previous controller marked expired"
            );
        }
        for id in left.iter().filter_map(|id| SandboxId::parse(id)) {
            if let Err(e) = manager.destroy(&id, SandboxStatus::Ended).await {
                tracing::warn!(sandbox = %id, error = %e, "cannot destroy a previous login sandbox");
            }
        }
        Ok(Arc::new(Self {
            manager,
            store,
            tasks: Tasks::new(),
            cfg,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
        }))
    }

    pub fn config(&self) -> &LoginConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &LoginMetrics {
        &self.metrics
    }

    /// Which modes each provider offers here.
    pub fn modes(&self) -> BTreeMap<String, Vec<&'static str>> {
        self.cfg
            .commands
            .iter()
            .map(|(p, c)| {
                let mut modes = Vec::new();
                if c.browser.is_some() {
                    modes.push("browser");
                }
                if c.code.is_some() {
                    modes.push("code");
                }
                (p.as_str().to_owned(), modes)
            })
            .collect()
    }

    fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().ok()?.get(id).cloned()
    }

    /// Starts a session; returns at once (state `booting`), the sandbox
    /// boots in the background.
    pub async fn start(
        self: &Arc<Self>,
        user: UserId,
        admin: bool,
        provider: Provider,
        mode: Mode,
    ) -> Result<LoginView, LoginError> {
        // Every login flow is a subscription sign-in: whether this user may
        // is the installation's policy, said before anything starts.
        self.cfg.sign_in.check(provider, admin)?;
        // Said at once (the session itself starts in the background).
        self.manager.ready(&self.cfg.template)?;
        let command = self.cfg.commands.get(&provider).ok_or_else(|| {
            LoginError::Invalid(format!(
                "no login flow is configured for {}",
                provider.as_str()
            ))
        })?;
        let has_mode = match mode {
            Mode::Browser => command.browser.is_some(),
            Mode::Code => command.code.is_some(),
        };
        if !has_mode {
            return Err(LoginError::Invalid(format!(
                "{} has no {} login; use {}",
                provider.as_str(),
                mode.as_str(),
                if mode == Mode::Code {
                    "mode \"browser\" or an API key"
                } else {
                    "mode \"code\""
                }
            )));
        }
        // The credential is sealed to the user's vault key: without one
        // there would be nothing to seal to.
        let keys = match self.store.vault_keys(user).await {
            Ok(k) => k,
            Err(StoreError::NotFound) => {
                return Err(LoginError::Invalid(
                    "set up your vault first: the captured credential is sealed to your vault's public key".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let recipient = keys.public_key;
        self.sweep();
        let id = format!("login-{:016x}", rand::random::<u64>());
        let now = now_ms();
        let view = LoginView {
            session_id: id.clone(),
            user_id: user.to_string(),
            provider: provider.as_str().to_owned(),
            mode: mode.as_str().to_owned(),
            state: LoginState::Booting,
            stages: vec![StageAt {
                state: LoginState::Booting,
                at_ms: now,
            }],
            error: None,
            failed_stage: None,
            log_tail: Vec::new(),
            auth_url: None,
            instructions: Vec::new(),
            sandbox_id: None,
            vault_item: None,
            created_at_ms: now,
            expires_at_ms: now + self.cfg.max_lifetime.as_millis() as i64,
        };
        let session = Arc::new(Session {
            id: id.clone(),
            user,
            provider,
            mode,
            view: watch::Sender::new(view.clone()),
            last_activity: Mutex::new(Instant::now()),
            started: Instant::now(),
            login_pid: Mutex::new(None),
            cancel: watch::Sender::new(None),
            metrics: self.metrics.clone(),
        });
        self.metrics.entered(LoginState::Booting);
        {
            let mut sessions = self
                .sessions
                .lock()
                .map_err(|_| LoginError::Unavailable("session table poisoned".into()))?;
            if let Some(live) = sessions.values().find(|s| {
                s.user == user && s.provider == provider && !s.view.borrow().is_terminal()
            }) {
                return Err(LoginError::Busy(
                    provider.as_str().to_owned(),
                    live.id.clone(),
                ));
            }
            sessions.insert(id.clone(), session.clone());
        }
        self.persist(&session).await;
        let me = self.clone();
        self.tasks
            .spawn(async move { me.drive(session, recipient).await });
        Ok(view)
    }

    /// A session of `user`: live ones from memory, older ones from the
    /// store. Expired and cancelled ones are `Gone`.
    pub async fn get(&self, id: &str, user: UserId) -> Result<LoginView, LoginError> {
        let view = match self.session(id) {
            Some(s) => {
                if s.user != user {
                    return Err(LoginError::Forbidden);
                }
                s.snapshot()
            }
            None => {
                let r = match self.store.login_session(id).await {
                    Ok(r) => r,
                    Err(StoreError::NotFound) => return Err(LoginError::NotFound(id.to_owned())),
                    Err(e) => return Err(e.into()),
                };
                if r.user_id != user {
                    return Err(LoginError::Forbidden);
                }
                view_from_record(&r)
            }
        };
        if view.state.is_gone() {
            return Err(LoginError::Gone(Box::new(view)));
        }
        Ok(view)
    }

    /// The live feed of a session's view (None once it is only stored).
    pub fn watch(&self, id: &str, user: UserId) -> Option<watch::Receiver<LoginView>> {
        let s = self.session(id)?;
        (s.user == user).then(|| {
            s.touch();
            s.view.subscribe()
        })
    }

    /// Cancels a session; its sandbox is destroyed.
    pub async fn cancel(&self, id: &str, user: UserId) -> Result<LoginView, LoginError> {
        let s = self
            .session(id)
            .ok_or_else(|| LoginError::NotFound(id.to_owned()))?;
        if s.user != user {
            return Err(LoginError::Forbidden);
        }
        self.finish(&s, LoginState::Cancelled, |v| {
            v.error = Some("cancelled by the user".into())
        })
        .await;
        Ok(s.snapshot())
    }

    /// Code relay: hands the code the user pasted to the CLI's stdin.
    pub async fn submit_code(
        &self,
        id: &str,
        user: UserId,
        code: &str,
    ) -> Result<LoginView, LoginError> {
        // The code's shape first: it is wrong whatever the session is.
        let code = code.trim();
        if code.is_empty() || code.len() > 4096 || code.chars().any(char::is_control) {
            return Err(LoginError::Invalid(
                "code must be 1 to 4096 printable characters".into(),
            ));
        }
        let s = self
            .session(id)
            .ok_or_else(|| LoginError::NotFound(id.to_owned()))?;
        if s.user != user {
            return Err(LoginError::Forbidden);
        }
        let view = s.snapshot();
        if view.state.is_gone() {
            return Err(LoginError::Gone(Box::new(view)));
        }
        if !matches!(
            view.state,
            LoginState::AwaitingCode | LoginState::AwaitingLogin
        ) {
            return Err(LoginError::NotReady(format!(
                "the session is {}; a code is accepted once the CLI waits for one",
                view.state
            )));
        }
        let pid =
            s.login_pid.lock().ok().and_then(|p| *p).ok_or_else(|| {
                LoginError::NotReady("the CLI's login has not started yet".into())
            })?;
        let sandbox = self.sandbox_of(&s)?;
        let mut agent = self
            .manager
            .agent(&sandbox, Duration::from_secs(5))
            .await
            .map_err(ManagerError::from)?;
        agent
            .write_stdin(pid, format!("{code}\n").as_bytes(), false)
            .await
            .map_err(|e| LoginError::NotReady(format!("the CLI no longer reads a code: {e}")))?;
        s.touch();
        Ok(s.snapshot())
    }

    fn sandbox_of(&self, s: &Session) -> Result<SandboxId, LoginError> {
        s.view
            .borrow()
            .sandbox_id
            .as_deref()
            .and_then(SandboxId::parse)
            .ok_or_else(|| LoginError::NotReady("the sandbox is not up yet".into()))
    }

    /// A single-use viewer ticket for the session's stream.
    pub fn ticket(&self, id: &str, user: UserId) -> Result<(String, Duration), LoginError> {
        let s = self
            .session(id)
            .ok_or_else(|| LoginError::NotFound(id.to_owned()))?;
        if s.user != user {
            return Err(LoginError::Forbidden);
        }
        let view = s.snapshot();
        if view.is_terminal() {
            return Err(LoginError::Gone(Box::new(view)));
        }
        if s.mode != Mode::Browser {
            return Err(LoginError::Invalid(
                "a code-relay session has no remote browser to view".into(),
            ));
        }
        let mut raw = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut raw);
        let ticket = hex::encode(raw);
        let mut tickets = self
            .tickets
            .lock()
            .map_err(|_| LoginError::Unavailable("ticket table poisoned".into()))?;
        tickets.retain(|_, t| t.expires > Instant::now());
        tickets.insert(
            ticket_hash(&ticket),
            Ticket {
                session: id.to_owned(),
                user,
                expires: Instant::now() + self.cfg.ticket_ttl,
            },
        );
        s.touch();
        Ok((ticket, self.cfg.ticket_ttl))
    }

    /// Takes a ticket (once) for session `id`. `caller` is the signed-in
    /// user the request also carries, if any: another user's → Forbidden.
    pub fn admit(
        &self,
        id: &str,
        ticket: &str,
        caller: Option<UserId>,
    ) -> Result<Admitted, LoginError> {
        let t = self
            .tickets
            .lock()
            .map_err(|_| LoginError::Unavailable("ticket table poisoned".into()))?
            .remove(&ticket_hash(ticket))
            .filter(|t| t.expires > Instant::now())
            .ok_or(LoginError::BadTicket)?;
        if t.session != id || caller.is_some_and(|c| c != t.user) {
            return Err(LoginError::Forbidden);
        }
        let s = self
            .session(id)
            .ok_or_else(|| LoginError::NotFound(id.to_owned()))?;
        let view = s.snapshot();
        if view.is_terminal() {
            return Err(LoginError::Gone(Box::new(view)));
        }
        if view.state == LoginState::Booting {
            return Err(LoginError::NotReady(
                "the remote browser is still starting; connect once the session is ready".into(),
            ));
        }
        s.touch();
        Ok(Admitted {
            sandbox: self.sandbox_of(&s)?,
            ending: s.cancel.subscribe(),
        })
    }

    /// Viewer traffic keeps a session from idling out.
    pub fn touch(&self, id: &str) {
        if let Some(s) = self.session(id) {
            s.touch();
        }
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Drops ended sessions older than `retain` from memory.
    fn sweep(&self) {
        let retain = self.cfg.retain;
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|_, s| {
                let v = s.view.borrow();
                !v.is_terminal()
                    || v.stages
                        .last()
                        .is_some_and(|st| now_ms() - st.at_ms < retain.as_millis() as i64)
            });
        }
    }

    /// Ends every live session (controller shutdown).
    pub async fn shutdown(&self) {
        let live: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        for s in live {
            self.finish(&s, LoginState::Expired, |v| {
                v.error = Some("the controller shut down".into())
            })
            .await;
        }
        self.tasks.shutdown(Duration::from_secs(5)).await;
    }

    async fn persist(&self, s: &Session) {
        let v = s.snapshot();
        let record = LoginRecord {
            id: s.id.clone(),
            user_id: s.user,
            provider: v.provider.clone(),
            mode: v.mode.clone(),
            state: v.state,
            stages: serde_json::to_string(&v.stages).unwrap_or_else(|_| "[]".into()),
            error: v.error.clone(),
            sandbox_id: v.sandbox_id.clone(),
            created_at_ms: v.created_at_ms,
            updated_at_ms: now_ms(),
        };
        if let Err(e) = self.store.save_login_session(&record).await {
            tracing::warn!(session = %s.id, error = %e, "cannot record the login session");
        }
    }

    async fn destroy_sandbox(&self, s: &Session) {
        let sandbox = s
            .view
            .borrow()
            .sandbox_id
            .as_deref()
            .and_then(SandboxId::parse);
        if let Some(id) = sandbox {
            if let Err(e) = self.manager.destroy(&id, SandboxStatus::Ended).await {
                tracing::warn!(session = %s.id, sandbox = %id, error = %e, "cannot destroy the login sandbox");
            }
        }
    }

    /// Ends a live session: its work stops, its sandbox is destroyed, and
    /// only then does it enter `state` (so whoever sees a final state sees
    /// no sandbox). False when it had already ended.
    async fn finish(
        &self,
        s: &Session,
        state: LoginState,
        edit: impl FnOnce(&mut LoginView),
    ) -> bool {
        if s.snapshot().is_terminal() {
            return false;
        }
        let _ = s.cancel.send(Some(if state == LoginState::Failed {
            1011
        } else {
            1001
        }));
        self.destroy_sandbox(s).await;
        if !s.advance(state, edit) {
            return false;
        }
        self.persist(s).await;
        tracing::info!(session = %s.id, provider = s.provider.as_str(), state = state.as_str(), "login session ended");
        true
    }

    async fn fail(&self, s: &Session, message: String, log_tail: Vec<String>) {
        let stage = s.snapshot().state;
        self.finish(s, LoginState::Failed, |v| {
            v.error = Some(message);
            v.failed_stage = Some(stage);
            v.log_tail = log_tail;
        })
        .await;
    }

    /// The end of the login desktop's own log (empty before it started).
    async fn desktop_log(&self, s: &Session) -> Vec<String> {
        let Ok(id) = self.sandbox_of(s) else {
            return Vec::new();
        };
        let Ok(mut agent) = self.manager.agent(&id, Duration::from_secs(2)).await else {
            return Vec::new();
        };
        let log = agent.get_file(DESKTOP_LOG).await.unwrap_or_default();
        let mut tail = Tail::new(20);
        tail.push(&String::from_utf8_lossy(&log));
        tail.lines()
    }

    /// Whether the session's desktop answers on its VNC socket.
    async fn vnc_greets(&self, sandbox: &SandboxId) -> bool {
        match self.manager.connect_service(sandbox, VNC_SERVICE).await {
            Ok(stream) => greets_as_vnc(stream).await,
            Err(_) => false,
        }
    }

    async fn log_tail(&self, s: &Session) -> Vec<String> {
        match self.sandbox_of(s) {
            Ok(id) => self.manager.log_tail(&id, 20).await,
            Err(_) => Vec::new(),
        }
    }

    /// The session's life: boot, desktop, the CLI's login, capture, end.
    async fn drive(self: Arc<Self>, s: Arc<Session>, recipient: Vec<u8>) {
        let command = self.cfg.commands[&s.provider].clone();
        let mut cancelled = s.cancel.subscribe();
        let booted = tokio::time::timeout(self.cfg.boot_deadline, self.boot(&s)).await;
        match booted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let mut tail = e.1;
                if tail.is_empty() {
                    tail = self.log_tail(&s).await;
                }
                self.fail(&s, e.0, tail).await;
                return;
            }
            Err(_) => {
                let mut tail = self.log_tail(&s).await;
                tail.extend(self.desktop_log(&s).await);
                let stage = s.snapshot().state;
                self.fail(
                    &s,
                    format!(
                        "the login sandbox did not come up within {} s (stuck in `{stage}`)",
                        self.cfg.boot_deadline.as_secs()
                    ),
                    tail,
                )
                .await;
                return;
            }
        }
        if s.snapshot().is_terminal() {
            // Cancelled while booting: `cancel` may not have seen the sandbox.
            self.destroy_sandbox(&s).await;
            return;
        }
        self.persist(&s).await;

        // The CLI's login, on its own agent connection.
        let Ok(sandbox) = self.sandbox_of(&s) else {
            return;
        };
        let line = match s.mode {
            Mode::Browser => command.browser.clone(),
            Mode::Code => command.code.clone(),
        }
        .unwrap_or_default();
        let mut env: Vec<(String, String)> = command.env.clone().into_iter().collect();
        if s.mode == Mode::Browser {
            env.extend([
                ("DISPLAY".into(), ":0".into()),
                ("BROWSER".into(), OPENER.into()),
                (
                    "PATH".into(),
                    format!("{OPENER_DIR}:/usr/local/bin:/usr/bin:/bin"),
                ),
            ]);
        } else {
            // No browser to open: every CLI then prints its URL.
            env.push(("NO_BROWSER".into(), "true".into()));
        }
        let output = Arc::new(Mutex::new(Tail::new(40)));
        let (exit_tx, mut exit_rx) = watch::channel::<Option<Option<i32>>>(None);
        {
            let mut agent = match self.manager.agent(&sandbox, Duration::from_secs(5)).await {
                Ok(a) => a,
                Err(e) => {
                    let tail = self.log_tail(&s).await;
                    self.fail(&s, format!("cannot reach the sandbox's agent: {e}"), tail)
                        .await;
                    return;
                }
            };
            let started = agent
                .start_exec_interactive(
                    vec!["/bin/sh".into(), "-c".into(), line],
                    env,
                    command.stdin.as_deref().map(str::as_bytes),
                    self.cfg.max_lifetime,
                )
                .await;
            if let Err(e) = started {
                self.fail(&s, format!("cannot start the CLI's login: {e}"), Vec::new())
                    .await;
                return;
            }
            let (s2, out) = (s.clone(), output.clone());
            self.tasks.spawn(async move {
                let mut code = None;
                loop {
                    match agent.next_event().await {
                        Ok(AgentEvent::Started { pid }) => {
                            if let Ok(mut p) = s2.login_pid.lock() {
                                *p = Some(pid);
                            }
                        }
                        Ok(AgentEvent::Stdout { data } | AgentEvent::Stderr { data }) => {
                            use base64::Engine;
                            let bytes = base64::engine::general_purpose::STANDARD
                                .decode(data)
                                .unwrap_or_default();
                            let text = String::from_utf8_lossy(&bytes).into_owned();
                            let url = out.lock().ok().and_then(|mut t| {
                                t.push(&text);
                                t.first_url()
                            });
                            let lines = out.lock().map(|t| t.lines()).unwrap_or_default();
                            let mode = s2.mode;
                            s2.edit(|v| {
                                if v.auth_url.is_none() {
                                    v.auth_url = url;
                                }
                                if mode == Mode::Code {
                                    v.instructions = lines;
                                }
                            });
                        }
                        Ok(AgentEvent::Exit { code: c, .. }) => {
                            code = c;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                let _ = exit_tx.send(Some(code));
            });
        }
        let waiting = match s.mode {
            Mode::Browser => LoginState::AwaitingLogin,
            Mode::Code => LoginState::AwaitingCode,
        };
        s.advance(waiting, |_| {});
        // Idle time counts from when there is something to do.
        s.touch();
        self.persist(&s).await;

        // Watch for the credential file, the CLI's end, expiry, cancel.
        let mut last_seen: Option<String> = None;
        let mut watcher: Option<polydev_agent::AgentClient> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(400));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancelled.changed() => return,
                _ = exit_rx.changed() => {}
            }
            if s.snapshot().is_terminal() {
                return;
            }
            if s.started.elapsed() >= self.cfg.max_lifetime {
                self.expire(&s, "the session reached its maximum lifetime")
                    .await;
                return;
            }
            if s.idle_for() >= self.cfg.idle_timeout {
                self.expire(&s, "the session was idle too long").await;
                return;
            }
            // One agent connection for the watching, made again if it broke.
            if watcher.is_none() {
                watcher = self
                    .manager
                    .agent(&sandbox, Duration::from_secs(5))
                    .await
                    .ok();
            }
            let Some(agent) = watcher.as_mut() else {
                continue;
            };
            if s.mode == Mode::Browser {
                if let Some(log) = desktop_failed(agent).await {
                    self.fail(&s, "the remote browser's desktop stopped".into(), log)
                        .await;
                    return;
                }
            }
            let stat = match stat(agent, &command.credential_file).await {
                Ok(stat) => stat,
                Err(()) => {
                    watcher = None;
                    continue;
                }
            };
            let exited = *exit_rx.borrow();
            // Written and unchanged since the last look (or the CLI is done).
            let ready = match (&stat, &last_seen) {
                (Some(now), Some(before)) => now == before,
                (Some(_), None) => exited.is_some(),
                _ => false,
            };
            if ready {
                self.capture(&s, &sandbox, &command, &recipient).await;
                return;
            }
            last_seen = stat;
            if let Some(code) = exited {
                if last_seen.is_none() {
                    let tail = output.lock().map(|t| t.lines()).unwrap_or_default();
                    self.fail(
                        &s,
                        format!(
                            "the CLI's login ended (exit {}) without writing {}",
                            code.map(|c| c.to_string())
                                .unwrap_or_else(|| "by signal".into()),
                            command.credential_file
                        ),
                        tail,
                    )
                    .await;
                    return;
                }
            }
        }
    }

    async fn expire(&self, s: &Session, why: &str) {
        self.finish(s, LoginState::Expired, |v| v.error = Some(why.to_owned()))
            .await;
    }

    /// Seals the credential file inside the sandbox to the user and stores
    /// the box in the vault; then the session completes and the sandbox goes.
    async fn capture(
        &self,
        s: &Session,
        sandbox: &SandboxId,
        command: &LoginCommand,
        recipient: &[u8],
    ) {
        match seal_credential_to_vault(
            &self.manager,
            &self.store,
            s.user,
            recipient,
            sandbox,
            s.provider,
            &command.credential_file,
        )
        .await
        {
            Ok(item) => {
                self.finish(s, LoginState::Completed, |v| v.vault_item = Some(item))
                    .await;
            }
            Err(e) => self.fail(s, e, Vec::new()).await,
        }
    }

    /// Makes the sandbox and, in browser mode, its desktop; `ready` once
    /// the VNC server greets. Errors carry a message and a log tail.
    async fn boot(&self, s: &Arc<Session>) -> Result<(), (String, Vec<String>)> {
        let req = CreateRequest {
            template: self.cfg.template.clone(),
            // The template's limits (a warm pool member fits then).
            limits: None,
            network: Network::Egress,
            env: Vec::new(),
            labels: [
                ("login".to_owned(), s.id.clone()),
                ("provider".to_owned(), s.provider.as_str().to_owned()),
            ]
            .into(),
            ttl: Some(self.cfg.max_lifetime + Duration::from_secs(60)),
            privileged: false,
            system: Some("login"),
        };
        // Created on its own task: should the deadline pass meanwhile, the
        // sandbox is still destroyed once it exists.
        let (manager, user, sid) = (self.manager.clone(), s.user, s.clone());
        let (made_tx, made_rx) = tokio::sync::oneshot::channel();
        self.tasks.spawn(async move {
            let made = manager.create(user, req).await;
            if let Ok(v) = &made {
                let id = v.id.clone();
                let ended = sid.snapshot().is_terminal();
                sid.edit(|view| view.sandbox_id = Some(id.clone()));
                if ended {
                    if let Some(id) = SandboxId::parse(&id) {
                        let _ = manager.destroy(&id, SandboxStatus::Ended).await;
                    }
                }
            }
            let _ = made_tx.send(made);
        });
        let created = made_rx
            .await
            .map_err(|_| ("sandbox creation stopped".to_owned(), Vec::new()))?;
        let sandbox = match created {
            Ok(v) => {
                SandboxId::parse(&v.id).ok_or_else(|| ("bad sandbox id".to_owned(), vec![]))?
            }
            Err(ManagerError::Driver(polydev_sandbox::DriverError::Boot {
                stage,
                message,
                log_tail,
                ..
            })) => {
                return Err((
                    format!("the login sandbox failed to boot (stage {stage}): {message}"),
                    log_tail,
                ))
            }
            Err(e) => return Err((format!("cannot make the login sandbox: {e}"), Vec::new())),
        };
        if s.mode == Mode::Code {
            s.advance(LoginState::Ready, |_| {});
            return Ok(());
        }
        let mut agent = self
            .manager
            .agent(&sandbox, Duration::from_secs(5))
            .await
            .map_err(|e| (format!("cannot reach the sandbox's agent: {e}"), Vec::new()))?;
        // Started detached (a pooled sandbox may have it running already).
        let argv = desktop_command(self.cfg.width, self.cfg.height);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        agent
            .exec(&argv, None, Duration::from_secs(10), |_| {})
            .await
            .map_err(|e| (format!("cannot start the desktop: {e}"), Vec::new()))?;
        // Ready when the VNC server greets on its socket.
        let mut round = 0u32;
        loop {
            if s.snapshot().is_terminal() {
                return Ok(());
            }
            if self.vnc_greets(&sandbox).await {
                s.advance(LoginState::Ready, |_| {});
                return Ok(());
            }
            round += 1;
            if round % 10 == 0 {
                if let Some(log) = desktop_failed(&mut agent).await {
                    return Err(("the desktop exited before it served".into(), log));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The last lines of a process's output, and the first URL seen in it.
#[derive(Debug)]
struct Tail {
    lines: VecDeque<String>,
    partial: String,
    max: usize,
    url: Option<String>,
}

impl Tail {
    fn new(max: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            partial: String::new(),
            max,
            url: None,
        }
    }

    fn push(&mut self, text: &str) {
        self.partial.push_str(text);
        while let Some(n) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=n).collect();
            let line = strip_ansi(line.trim_end());
            if self.url.is_none() {
                self.url = find_url(&line);
            }
            if !line.trim().is_empty() {
                self.lines.push_back(line);
            }
            while self.lines.len() > self.max {
                self.lines.pop_front();
            }
        }
        if self.partial.len() > 16 * 1024 {
            self.partial.clear();
        }
    }

    /// From complete lines only (a chunk may end inside a URL).
    fn first_url(&self) -> Option<String> {
        self.url.clone()
    }

    fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.lines.iter().cloned().collect();
        let p = strip_ansi(self.partial.trim());
        if !p.is_empty() {
            out.push(p);
        }
        out
    }
}

/// The first URL in `line` that is not the CLI's own localhost callback.
fn find_url(line: &str) -> Option<String> {
    let mut rest = line;
    while let Some(start) = rest.find("http") {
        let candidate = &rest[start..];
        rest = &candidate[4..];
        let Some(after) = candidate
            .strip_prefix("https://")
            .or_else(|| candidate.strip_prefix("http://"))
        else {
            continue;
        };
        if after.starts_with("localhost") || after.starts_with("127.0.0.1") {
            continue;
        }
        let url: String = candidate
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '<' | '>'))
            .collect();
        if url.len() > 10 {
            return Some(url);
        }
    }
    None
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

fn view_from_record(r: &LoginRecord) -> LoginView {
    LoginView {
        session_id: r.id.clone(),
        user_id: r.user_id.to_string(),
        provider: r.provider.clone(),
        mode: r.mode.clone(),
        state: r.state,
        stages: serde_json::from_str(&r.stages).unwrap_or_default(),
        error: r.error.clone(),
        failed_stage: None,
        log_tail: Vec::new(),
        auth_url: None,
        instructions: Vec::new(),
        sandbox_id: r.sandbox_id.clone(),
        vault_item: (r.state == LoginState::Completed)
            .then(|| format!("credential.{}", r.provider)),
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_finds_the_first_url_across_chunks_and_strips_colours() {
        let mut t = Tail::new(3);
        t.push("Starting local login server on http://localhost:1455.\nIf your browser did not open, navigate to this URL:\n\n\u{1b}[94mhttps://auth.example.test/oauth/authorize?client_id=x&state=");
        t.push("abc\u{1b}[0m\nOn a remote machine? Use --device-auth\n");
        assert_eq!(
            t.first_url().as_deref(),
            Some("https://auth.example.test/oauth/authorize?client_id=x&state=abc")
        );
        assert_eq!(t.lines().len(), 3);
        assert!(t.lines()[1]
            .starts_with("https://auth.example.test/oauth/authorize?client_id=x&state=abc"));
        let mut u = Tail::new(5);
        u.push("Paste code here if prompted > ");
        assert_eq!(u.lines(), vec!["Paste code here if prompted >"]);
        assert_eq!(u.first_url(), None);
    }
}
