//! Runs ("perspectives"): one prompt, one sandbox per provider CLI, output
//! normalised into one event stream. The controller never holds a
//! plaintext credential: the client seals each provider's API key to that
//! sandbox's agent key; the agent opens it into a file only the CLI's
//! wrapper reads (and deletes) inside the sandbox.
//!
//! Events (per provider): `started`, `delta{text}`, `done{exitCode, usage}`,
//! `error{stage, message}`. A provider failing, timing out or being
//! cancelled ends only its own stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use polydev_agent::protocol::Event as AgentEvent;
use polydev_domain::{Provider, ProviderState, RunState, SandboxStatus, UserId};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use polydev_sandbox::{CreateRequest, Limits, Manager, ManagerError, Network, SandboxId};
use polydev_store::{now_ms, Store};

use crate::tasks::Tasks;
use crate::workspace::{self, Mode, Workspace};

use crate::providers::{
    credential_file, last_meaningful_line, normalise, run_command, Line, RunSetup, Usage,
    CREDENTIAL_FILE,
};

/// HPKE `info` for run credentials; the AAD is `<run id>/<provider>`.
pub const CREDENTIAL_PURPOSE: &str = "polydev/run-credential/v1";
/// HPKE `info` for answers stored sealed to the user's vault public key;
/// the AAD is `<run id>/<provider>` too.
pub const ANSWER_PURPOSE: &str = "polydev/run-answer/v1";
/// HPKE `info` for a run's prompt stored sealed to the user's vault
/// public key; the AAD is the run id.
pub const PROMPT_PURPOSE: &str = "polydev/run-prompt/v1";

/// Longest line of CLI output kept (longer ones are dropped whole).
pub const MAX_LINE: usize = 1 << 20;
/// A prompt's most bytes: it becomes one process argument, and the
/// kernel takes at most 128 KiB there.
pub const MAX_PROMPT_BYTES: usize = 100_000;
/// The most answer text one provider may stream into a run.
pub const MAX_ANSWER: usize = 4 << 20;
/// The most events one run records (its history, replayed to viewers).
pub const MAX_EVENTS: usize = 20_000;
/// The most bytes of event data one run records.
pub const MAX_HISTORY_BYTES: usize = 16 << 20;
/// Viewers one run's event stream may have at once.
pub const MAX_VIEWERS: usize = 16;
/// How long one provider's workspace may take to arrive and unpack.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(600);
/// Finished runs kept in memory at most, whatever their age.
const MAX_FINISHED: usize = 256;

pub use crate::providers::CredentialKind;

#[derive(Debug, Clone)]
pub struct RunsConfig {
    /// Template of the sandboxes (`runtime` in production).
    pub template: String,
    /// Per-provider deadline.
    pub deadline: Duration,
    /// How long a run waits for its credentials before giving up.
    pub credential_wait: Duration,
    /// Provider API base URLs (unset: each CLI's default).
    pub anthropic_base_url: Option<String>,
    pub openai_base_url: Option<String>,
    pub gemini_base_url: Option<String>,
    /// GitHub Copilot's API (and the GitHub API it asks about the user).
    pub copilot_base_url: Option<String>,
    /// Codex on a ChatGPT sign-in: where its requests go, and where it
    /// refreshes its tokens (unset: OpenAI's own).
    pub chatgpt_base_url: Option<String>,
    pub openai_token_url: Option<String>,
    /// Claude Code on Amazon Bedrock (a `cloud_key`): the region, and
    /// Bedrock's endpoint when not AWS's own.
    pub bedrock_region: String,
    pub bedrock_base_url: Option<String>,
    /// Gemini CLI on Vertex AI (a `cloud_key`): Vertex's endpoint when not
    /// Google's own.
    pub vertex_base_url: Option<String>,
    pub limits: Limits,
    /// How long a finished run stays followable live (its history stays).
    pub linger: Duration,
    /// How long a provider may wait its turn behind another run of the
    /// same user on the same credential.
    pub queue_wait: Duration,
    /// The most CLIs (providers of live runs) this host runs at once; a
    /// run beyond it is refused (503, Retry-After).
    pub max_providers_in_flight: usize,
    /// Whose subscription sign-ins (CLI login files) runs may use.
    pub sign_in: crate::providers::SignInPolicy,
    /// The largest workspace archive a run takes (bytes).
    pub max_workspace_bytes: u64,
    /// Runs one user may start per UTC day (`None`: no limit).
    pub max_runs_per_user_per_day: Option<u32>,
}

impl RunsConfig {
    /// The API bases the CLIs are pointed at (None: the vendor's own).
    pub fn bases(&self) -> crate::providers::ApiBases<'_> {
        crate::providers::ApiBases {
            anthropic: self.anthropic_base_url.as_deref(),
            openai: self.openai_base_url.as_deref(),
            gemini: self.gemini_base_url.as_deref(),
            copilot: self.copilot_base_url.as_deref(),
            bedrock: self.bedrock_base_url.as_deref(),
            bedrock_region: &self.bedrock_region,
            vertex: self.vertex_base_url.as_deref(),
            chatgpt: self.chatgpt_base_url.as_deref(),
            openai_token: self.openai_token_url.as_deref(),
        }
    }
}

/// Eight CLIs per core (a CLI mostly waits on its model).
pub fn default_providers_in_flight() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 8
}

impl Default for RunsConfig {
    fn default() -> Self {
        Self {
            template: "runtime".into(),
            deadline: Duration::from_secs(300),
            credential_wait: Duration::from_secs(120),
            anthropic_base_url: None,
            openai_base_url: None,
            gemini_base_url: None,
            copilot_base_url: None,
            chatgpt_base_url: None,
            openai_token_url: None,
            bedrock_region: "us-east-1".into(),
            bedrock_base_url: None,
            vertex_base_url: None,
            limits: Limits {
                cpu_millis: 2000,
                memory_bytes: 2048 << 20,
                pids: 1024,
                disk_bytes: 1024 << 20,
            },
            linger: Duration::from_secs(60),
            queue_wait: Duration::from_secs(600),
            max_providers_in_flight: default_providers_in_flight(),
            sign_in: Default::default(),
            max_workspace_bytes: 200 << 20,
            max_runs_per_user_per_day: None,
        }
    }
}

/// Why a provider ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorStage {
    /// No credential arrived in time, or it could not be opened.
    Credentials,
    /// The CLI ended without an answer (its reason in the message).
    Cli,
    /// The run's deadline passed.
    Timeout,
    /// The CLI's output passed a bound.
    Output,
    /// The sandbox stopped answering.
    Sandbox,
    /// The run was cancelled (or the controller shut down).
    Cancelled,
    /// It waited its turn behind another run on the same credential for
    /// longer than the queue allows.
    Queue,
    /// Its provider refused for a rate or usage limit (HTTP 429), and the
    /// CLI gave up or was still waiting when the deadline passed.
    RateLimited,
}

/// One event of a run's stream (`docs/RUNS.md`): per provider, then `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// Another run of this user holds the provider's credential: this one
    /// waits, `position` runs ahead of it (1: next).
    Queued {
        provider: Provider,
        position: usize,
    },
    /// Its turn: send the provider's credential now (sealed to the key in
    /// the run's view). A client seals a CLI login file only then, so the
    /// run gets the file the run before it refreshed.
    AwaitingCredentials {
        provider: Provider,
    },
    Started {
        provider: Provider,
        sandbox_id: String,
    },
    Delta {
        provider: Provider,
        text: String,
    },
    Retrying {
        provider: Provider,
        message: String,
        attempt: u32,
    },
    /// What the CLI changed in the workspace (`edit` runs), sealed to the
    /// user's vault key and stored with the run: its size in bytes (0: no
    /// change), or why there is none.
    Diff {
        provider: Provider,
        bytes: u64,
        error: Option<String>,
    },
    Done {
        provider: Provider,
        usage: Usage,
        /// Where the user's subscription stands, when the CLI said.
        limits: Option<crate::providers::Limits>,
    },
    Error {
        provider: Provider,
        stage: ErrorStage,
        message: String,
        exit_code: Option<i32>,
        /// For `rate_limited`: when the limit resets (Unix seconds), when
        /// the vendor said.
        resets_at: Option<u64>,
    },
    /// Every provider has ended: the stream's last event.
    End {
        state: RunState,
    },
}

impl RunEvent {
    /// The event's name on the stream.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Queued { .. } => "queued",
            Self::AwaitingCredentials { .. } => "awaiting_credentials",
            Self::Started { .. } => "started",
            Self::Delta { .. } => "delta",
            Self::Retrying { .. } => "retrying",
            Self::Diff { .. } => "diff",
            Self::Done { .. } => "done",
            Self::Error { .. } => "error",
            Self::End { .. } => "end",
        }
    }

    pub fn provider(&self) -> Option<Provider> {
        match self {
            Self::Queued { provider, .. }
            | Self::AwaitingCredentials { provider }
            | Self::Started { provider, .. }
            | Self::Delta { provider, .. }
            | Self::Retrying { provider, .. }
            | Self::Diff { provider, .. }
            | Self::Done { provider, .. }
            | Self::Error { provider, .. } => Some(*provider),
            Self::End { .. } => None,
        }
    }

    pub fn is_end(&self) -> bool {
        matches!(self, Self::End { .. })
    }

    /// The event's data as the stream sends it (with its provider).
    pub fn data(&self) -> Value {
        let mut v = match self {
            Self::Queued { position, .. } => json!({"position": position}),
            Self::AwaitingCredentials { .. } => json!({}),
            Self::Started { sandbox_id, .. } => json!({"sandboxId": sandbox_id}),
            Self::Delta { text, .. } => json!({"text": text}),
            Self::Retrying {
                message, attempt, ..
            } => json!({"message": message, "attempt": attempt}),
            Self::Diff { bytes, error, .. } => match error {
                Some(e) => json!({"bytes": bytes, "error": e}),
                None => json!({"bytes": bytes}),
            },
            Self::Done { usage, limits, .. } => {
                let mut v = json!({"exitCode": 0, "usage": usage});
                if let Some(l) = limits {
                    v["limits"] = json!(l);
                }
                v
            }
            Self::Error {
                stage,
                message,
                exit_code,
                resets_at,
                ..
            } => {
                let mut v = json!({"stage": stage, "message": message, "exitCode": exit_code});
                if let Some(t) = resets_at {
                    v["resetsAt"] = json!(t);
                }
                v
            }
            Self::End { state } => json!({"state": state}),
        };
        if let Some(p) = self.provider() {
            v["provider"] = json!(p.as_str());
        }
        v
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderView {
    pub sandbox_id: String,
    /// The agent's key to seal this provider's credential to (base64).
    pub public_key: String,
    pub state: ProviderState,
    /// While `queued`: how many runs are ahead of this one (1: next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// For a run with a workspace: whether this sandbox has it unpacked
    /// (`awaiting`, `sending`, `ready`); its credential is taken only then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub run_id: String,
    pub state: RunState,
    /// How long each provider's CLI may take (the one asked for, at most
    /// the server's); absent for a run answered from the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
    pub sandboxes: BTreeMap<String, ProviderView>,
}

#[derive(Debug)]
struct ProviderRun {
    provider: Provider,
    sandbox: SandboxId,
    public_key: Vec<u8>,
    state: Mutex<ProviderState>,
    /// While queued: how many runs are ahead (1: next).
    position: Mutex<Option<usize>>,
    kind: Mutex<CredentialKind>,
    /// When its CLI started and when it finished (Unix ms).
    times: Mutex<(Option<i64>, Option<i64>)>,
    /// Where its workspace stands (runs with one).
    upload: Mutex<Upload>,
    /// Its diff, sealed to the user (base64), once made.
    diff: Mutex<Option<String>>,
    /// The same diff sealed to the client's own key, when it gave one
    /// (never stored).
    client_diff: Mutex<Option<String>>,
}

/// Sets a provider's workspace back to awaiting when dropped, unless it
/// is `ready` (then: ready, from now).
struct UploadGuard<'a> {
    upload: &'a Mutex<Upload>,
    ready: bool,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut u) = self.upload.lock() {
            *u = if self.ready {
                Upload::Ready(tokio::time::Instant::now())
            } else {
                Upload::Awaiting
            };
        }
    }
}

/// A message from inside a sandbox, bounded before it reaches an answer
/// or the store (its agent is not trusted to keep it short).
fn clamp(message: &str) -> String {
    const MAX: usize = 300;
    if message.len() <= MAX {
        return message.to_owned();
    }
    let mut cut = MAX;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &message[..cut])
}

/// Where a provider's workspace stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// The run has no workspace.
    None,
    Awaiting,
    /// Chunks are arriving (one upload at a time).
    Sending,
    /// Unpacked (since then: the credential wait starts over).
    Ready(tokio::time::Instant),
}

impl Upload {
    fn as_str(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Awaiting => Some("awaiting"),
            Self::Sending => Some("sending"),
            Self::Ready(_) => Some("ready"),
        }
    }
}

/// A run's events so far (what a new viewer is replayed), and their size.
#[derive(Debug, Default)]
struct History {
    events: Vec<Arc<RunEvent>>,
    bytes: usize,
}

#[derive(Debug)]
struct Run {
    id: String,
    user: UserId,
    providers: Vec<ProviderRun>,
    /// The user's code the CLIs work on, if the run has one.
    workspace: Option<Workspace>,
    /// How long each provider's CLI may take.
    deadline: Duration,
    events: Mutex<History>,
    tx: broadcast::Sender<Arc<RunEvent>>,
    cancelled: AtomicBool,
    created_ms: i64,
    /// The stored answers were written (once, when every provider ended).
    sealed: AtomicBool,
    /// When every provider had ended and the run was stored.
    finished_at: Mutex<Option<std::time::Instant>>,
    /// Told whenever a provider of any run ends (queued ones look again).
    turns: Arc<tokio::sync::Notify>,
    /// Its place in the order runs were admitted (given under the run
    /// table's lock): who goes first on a shared credential.
    seq: std::sync::atomic::AtomicU64,
}

impl Run {
    /// Records and broadcasts an event from a provider's CLI; false when
    /// the run's history is full (the provider must stop).
    fn emit(&self, event: RunEvent) -> bool {
        self.record(event, false)
    }

    /// The controller's own last word for a provider (or the run): always
    /// recorded, once per provider and once for the run's end.
    fn emit_final(&self, event: RunEvent) {
        self.record(event, true);
    }

    fn record(&self, event: RunEvent, last: bool) -> bool {
        let size = event.data().to_string().len();
        let e = Arc::new(event);
        // Recorded and broadcast under one lock, so a subscriber (which
        // takes the same lock) sees each event exactly once.
        let Ok(mut h) = self.events.lock() else {
            return false;
        };
        if !last && (h.events.len() >= MAX_EVENTS || h.bytes + size > MAX_HISTORY_BYTES) {
            return false;
        }
        h.bytes += size;
        h.events.push(e.clone());
        let _ = self.tx.send(e);
        true
    }

    /// Moves a provider to `state` if its machine allows it (a terminal
    /// state is never left); whether it moved.
    fn set_state(&self, provider: Provider, state: ProviderState) -> bool {
        let Some(p) = self.providers.iter().find(|p| p.provider == provider) else {
            return false;
        };
        let Ok(mut s) = p.state.lock() else {
            return false;
        };
        if !s.can_become(state) {
            return false;
        }
        *s = state;
        drop(s);
        if state.is_terminal() {
            self.turns.notify_waiters();
        }
        true
    }

    fn state(&self) -> RunState {
        if self.cancelled.load(Ordering::Relaxed) {
            RunState::Cancelled
        } else if self.finished() {
            RunState::Finished
        } else {
            RunState::Running
        }
    }

    fn finished(&self) -> bool {
        self.providers
            .iter()
            .all(|p| p.state.lock().map(|s| s.is_terminal()).unwrap_or(true))
    }

    fn view(&self) -> RunView {
        let sandboxes = self
            .providers
            .iter()
            .map(|p| {
                (
                    p.provider.as_str().to_owned(),
                    ProviderView {
                        sandbox_id: p.sandbox.to_string(),
                        public_key: base64::engine::general_purpose::STANDARD.encode(&p.public_key),
                        state: p.state.lock().map(|s| *s).unwrap_or(ProviderState::Failed),
                        queue_position: p.position.lock().ok().and_then(|q| *q),
                        workspace: p.upload.lock().ok().and_then(|u| u.as_str()),
                    },
                )
            })
            .collect();
        RunView {
            run_id: self.id.clone(),
            state: self.state(),
            deadline_secs: Some(self.deadline.as_secs()),
            sandboxes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    /// The provider waits its turn behind another run of this user (Codex
    /// and Claude rotate refresh tokens: two at once would break one).
    #[error("{0} waits its turn behind another of your runs; send its credential on its awaiting_credentials event")]
    Queued(String),
    #[error("no run {0}")]
    NotFound(String),
    /// This host already runs as many CLIs as it serves in time, or this
    /// user their share of them.
    #[error("{}", busy_message(*in_flight, *max, *yours))]
    Busy {
        in_flight: usize,
        max: usize,
        yours: bool,
    },
    #[error("this run has {MAX_VIEWERS} viewers already; close one")]
    TooManyViewers,
    /// A workspace (or one of its chunks) larger than this server takes.
    #[error("{0}")]
    TooLarge(String),
    /// Asked out of order (a credential before the workspace arrived, a
    /// second upload while one is arriving).
    #[error("{0}")]
    Conflict(String),
    /// The client did not send in time (a workspace upload).
    #[error("{0}")]
    Timeout(String),
    /// The user has started as many runs today (UTC) as this server
    /// allows one user; the count starts over at `resets_at` (Unix s).
    #[error("you have started your {limit} runs for today (UTC), this server's daily limit per user; the count starts over at {} (in {} min)", crate::providers::utc(*resets_at), resets_at.saturating_sub(now_ms() as u64 / 1000).div_ceil(60))]
    DailyLimit { limit: u32, resets_at: u64 },
    /// Finished and no longer followed live; its states and sealed answers
    /// are in the history.
    #[error("run {0} has finished; its answers are in your run history (GET /api/runs)")]
    Finished(String),
    /// A CLI login file for a provider whose subscription sign-in this
    /// installation does not offer the user.
    #[error(transparent)]
    NotOffered(#[from] crate::providers::NotOffered),
    #[error(transparent)]
    Sandbox(#[from] ManagerError),
}

fn busy_message(in_flight: usize, max: usize, yours: bool) -> String {
    if yours {
        format!("your runs have {in_flight} CLIs going, your share of this server ({max}); try again when one ends")
    } else {
        format!(
            "this server is running {in_flight} CLIs, its most at once ({max}); try again shortly"
        )
    }
}

/// [`Runs::ahead`] over a table already locked.
fn ahead_in(runs: &HashMap<String, Arc<Run>>, user: UserId, provider: Provider, seq: u64) -> usize {
    runs.values()
        .filter(|r| r.user == user && r.seq.load(Ordering::Relaxed) < seq)
        .filter(|r| {
            r.providers.iter().any(|p| {
                p.provider == provider && p.state.lock().map(|s| !s.is_terminal()).unwrap_or(false)
            })
        })
        .count()
}

#[derive(Debug)]
pub struct Runs {
    manager: Arc<Manager>,
    store: Store,
    tasks: Tasks,
    cfg: RunsConfig,
    runs: Mutex<HashMap<String, Arc<Run>>>,
    turns: Arc<tokio::sync::Notify>,
    /// Runs admitted so far (each run's `seq`).
    admitted: std::sync::atomic::AtomicU64,
    /// Set when the controller stops: no queued provider takes its turn.
    stopping: AtomicBool,
    /// Providers admitted but not yet in `runs` (their sandboxes are being
    /// made), per user: counted by the admission like live ones.
    reserved: Mutex<HashMap<UserId, usize>>,
}

/// A run's place in the admission count until it is in the table.
struct Reservation<'a> {
    reserved: &'a Mutex<HashMap<UserId, usize>>,
    user: UserId,
    providers: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.reserved.lock() {
            if let Some(n) = r.get_mut(&self.user) {
                *n = n.saturating_sub(self.providers);
                if *n == 0 {
                    r.remove(&self.user);
                }
            }
        }
    }
}

impl Runs {
    pub fn new(manager: Arc<Manager>, store: Store, cfg: RunsConfig) -> Arc<Self> {
        Arc::new(Self {
            manager,
            store,
            tasks: Tasks::new(),
            cfg,
            runs: Mutex::new(HashMap::new()),
            turns: Arc::new(tokio::sync::Notify::new()),
            admitted: std::sync::atomic::AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            reserved: Mutex::new(HashMap::new()),
        })
    }

    fn get(&self, id: &str, user: UserId) -> Result<Arc<Run>, RunError> {
        self.sweep();
        self.runs
            .lock()
            .ok()
            .and_then(|r| r.get(id).cloned())
            .filter(|r| r.user == user)
            .ok_or_else(|| RunError::NotFound(id.to_owned()))
    }

    /// Forgets finished runs after `LINGER` (and the oldest beyond
    /// `MAX_FINISHED`): their answers are in the store, sealed.
    fn sweep(&self) {
        let Ok(mut runs) = self.runs.lock() else {
            return;
        };
        let mut finished: Vec<(std::time::Instant, String)> = runs
            .values()
            .filter_map(|r| {
                r.finished_at
                    .lock()
                    .ok()
                    .and_then(|f| *f)
                    .map(|t| (t, r.id.clone()))
            })
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(MAX_FINISHED);
        for (i, (at, id)) in finished.iter().enumerate() {
            if i < excess || at.elapsed() > self.cfg.linger {
                runs.remove(id);
            }
        }
    }

    /// Runs held in memory (live ones and recently finished ones).
    pub fn in_memory(&self) -> usize {
        self.runs.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// One sandbox per provider (egress network), ready for credentials.
    pub async fn start(
        self: &Arc<Self>,
        user: UserId,
        prompt: String,
        providers: Vec<Provider>,
        workspace: Option<Workspace>,
        deadline: Option<Duration>,
    ) -> Result<RunView, RunError> {
        // The one asked for, within the server's.
        let deadline = deadline
            .map(|d| d.clamp(Duration::from_secs(1), self.cfg.deadline))
            .unwrap_or(self.cfg.deadline);
        if prompt.trim().is_empty() || prompt.len() > MAX_PROMPT_BYTES || prompt.contains('\0') {
            return Err(RunError::Invalid(
                "prompt must be 1 to 100 000 bytes, not only white space, without NUL".into(),
            ));
        }
        let mut providers = providers;
        providers.sort_by_key(|p| p.as_str());
        providers.dedup();
        if providers.is_empty() {
            return Err(RunError::Invalid(format!(
                "providers: name at least one of {}",
                Provider::VALID
            )));
        }
        if let Some(w) = workspace {
            self.check_workspace(user, w, &providers).await?;
        }
        self.sweep();
        // Admission: more CLIs than the host runs in time would make every
        // run late; beyond the cap a run is refused, to be tried again. No
        // user holds more than a share of it (a quarter, five at least).
        let _reservation = self.admit(user, providers.len())?;
        // A user's runs per UTC day, counted in the store (concurrent
        // starts cannot both take the last place).
        if let Some(limit) = self.cfg.max_runs_per_user_per_day {
            let day = now_ms() / 86_400_000;
            let taken = self
                .store
                .take_run_quota(user, day, i64::from(limit.max(1)))
                .await
                .map_err(ManagerError::from)?;
            if taken.is_none() {
                return Err(RunError::DailyLimit {
                    limit,
                    resets_at: ((day + 1) * 86_400) as u64,
                });
            }
        }
        let id = format!("run-{:016x}", rand::random::<u64>());
        let created_ms = now_ms();
        let mut made: Vec<ProviderRun> = Vec::new();
        for provider in &providers {
            let req = CreateRequest {
                template: self.cfg.template.clone(),
                // The template's limits (a warm pool member fits then).
                limits: None,
                network: Network::Egress,
                env: vec![("POLYDEV_PROMPT".into(), prompt.clone())],
                labels: [
                    ("run".to_owned(), id.clone()),
                    ("provider".to_owned(), provider.as_str().to_owned()),
                ]
                .into(),
                ttl: Some(
                    self.cfg.queue_wait
                        + self.cfg.deadline
                        + self.cfg.credential_wait
                        + if workspace.is_some() {
                            UPLOAD_DEADLINE
                        } else {
                            Duration::ZERO
                        }
                        + Duration::from_secs(60),
                ),
                privileged: false,
                system: Some("run"),
            };
            let created = match self.manager.create(user, req).await {
                Ok(v) => v,
                Err(e) => {
                    for p in &made {
                        let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
                    }
                    return Err(e.into());
                }
            };
            let sandbox = SandboxId::parse(&created.id)
                .ok_or_else(|| RunError::Invalid("bad sandbox id".into()))?;
            let agent = self
                .manager
                .agent(&sandbox, Duration::from_secs(5))
                .await
                .map_err(ManagerError::from)?;
            made.push(ProviderRun {
                provider: *provider,
                sandbox,
                public_key: agent.public_key.clone(),
                state: Mutex::new(ProviderState::AwaitingCredentials),
                position: Mutex::new(None),
                kind: Mutex::new(CredentialKind::ApiKey),
                times: Mutex::new((None, None)),
                upload: Mutex::new(if workspace.is_some() {
                    Upload::Awaiting
                } else {
                    Upload::None
                }),
                diff: Mutex::new(None),
                client_diff: Mutex::new(None),
            });
        }
        let (tx, _) = broadcast::channel(1024);
        let run = Arc::new(Run {
            id: id.clone(),
            user,
            providers: made,
            workspace,
            deadline,
            events: Mutex::new(History::default()),
            tx,
            cancelled: AtomicBool::new(false),
            created_ms,
            sealed: AtomicBool::new(false),
            finished_at: Mutex::new(None),
            turns: self.turns.clone(),
            seq: std::sync::atomic::AtomicU64::new(u64::MAX),
        });
        // Never two live runs on one credential of a user: a provider
        // another run of theirs holds waits its turn (`queued`). Its place
        // is given and the decision recorded under one lock, so two starts
        // cannot both go first, whichever made its sandboxes faster.
        let mut queued = std::collections::BTreeSet::new();
        if let Ok(mut r) = self.runs.lock() {
            let seq = self.admitted.fetch_add(1, Ordering::Relaxed);
            run.seq.store(seq, Ordering::Relaxed);
            for p in &run.providers {
                let ahead = ahead_in(&r, user, p.provider, seq);
                if ahead > 0 {
                    if let Ok(mut s) = p.state.lock() {
                        *s = ProviderState::Queued;
                    }
                    if let Ok(mut q) = p.position.lock() {
                        *q = Some(ahead);
                    }
                    queued.insert(p.provider);
                }
            }
            r.insert(id.clone(), run.clone());
        }
        // The prompt is kept for the history only sealed to the user.
        let prompt_sealed = match self.store.vault_keys(user).await {
            Ok(keys) => polydev_vault::SealingPublicKey::from_bytes(&keys.public_key)
                .ok()
                .map(|pk| {
                    base64::engine::general_purpose::STANDARD.encode(pk.seal(
                        PROMPT_PURPOSE,
                        id.as_bytes(),
                        prompt.as_bytes(),
                    ))
                }),
            Err(_) => None,
        };
        let stored = self
            .store
            .insert_run(&polydev_store::RunRecord {
                id: id.clone(),
                user_id: user,
                state: RunState::Running,
                providers: providers_json(&run),
                answers: None,
                prompt: prompt_sealed,
                diffs: None,
                diff_providers: None,
                created_at_ms: run.created_ms,
                finished_at_ms: None,
            })
            .await;
        if let Err(e) = stored {
            // Not a run after all: nothing may queue behind it.
            if let Ok(mut r) = self.runs.lock() {
                r.remove(&id);
            }
            for p in &run.providers {
                let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
            }
            self.turns.notify_waiters();
            return Err(ManagerError::from(e).into());
        }
        for p in &run.providers {
            if queued.contains(&p.provider) {
                if let Some(position) = p.position.lock().ok().and_then(|q| *q) {
                    run.emit(RunEvent::Queued {
                        provider: p.provider,
                        position,
                    });
                }
                let (me, r, provider) = (self.clone(), run.clone(), p.provider);
                self.tasks
                    .spawn(async move { me.wait_turn(r, provider).await });
            } else {
                self.arm_credential_wait(run.clone(), p.provider);
            }
        }
        Ok(run.view())
    }

    /// How many live runs of `user` hold or wait for `provider` ahead of
    /// the run admitted `seq`th (first come, first served).
    fn ahead(&self, user: UserId, provider: Provider, seq: u64) -> usize {
        self.runs
            .lock()
            .map(|runs| ahead_in(&runs, user, provider, seq))
            .unwrap_or(0)
    }

    /// A provider given no credential within `credential_wait` fails (and
    /// frees its sandbox).
    fn arm_credential_wait(self: &Arc<Self>, run: Arc<Run>, provider: Provider) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let Some(p) = run.providers.iter().find(|p| p.provider == provider) else {
                return;
            };
            // A workspace arriving holds the wait (its upload has its own
            // deadline); once unpacked, the credential has the whole wait.
            let mut until = tokio::time::Instant::now() + me.cfg.credential_wait;
            loop {
                tokio::time::sleep_until(until).await;
                let upload = p.upload.lock().map(|u| *u).unwrap_or(Upload::None);
                until = match upload {
                    Upload::Sending => tokio::time::Instant::now() + Duration::from_secs(1),
                    Upload::Ready(at) if at + me.cfg.credential_wait > until => {
                        at + me.cfg.credential_wait
                    }
                    _ => break,
                };
            }
            let waiting = p
                .state
                .lock()
                .map(|s| *s == ProviderState::AwaitingCredentials)
                .unwrap_or(false);
            if waiting && run.set_state(provider, ProviderState::Failed) {
                run.emit_final(RunEvent::Error {
                    provider,
                    stage: ErrorStage::Credentials,
                    message: format!(
                        "no {} credential arrived within {} s, so it did not start",
                        provider.display_name(),
                        me.cfg.credential_wait.as_secs()
                    ),
                    exit_code: None,
                    resets_at: None,
                });
                let _ = me.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
                me.persist(&run).await;
            }
        });
    }

    /// A queued provider waits for the runs ahead of it to let go of the
    /// credential (each provider that ends wakes it), saying its place as
    /// it moves up; then it awaits its credential like any other. It fails
    /// after `queue_wait`.
    async fn wait_turn(self: Arc<Self>, run: Arc<Run>, provider: Provider) {
        let Some(p) = run.providers.iter().find(|p| p.provider == provider) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + self.cfg.queue_wait;
        loop {
            let turn = self.turns.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            let still_queued = p
                .state
                .lock()
                .map(|s| *s == ProviderState::Queued)
                .unwrap_or(false);
            if !still_queued {
                return; // cancelled, or the controller is stopping
            }
            if self.stopping.load(Ordering::Relaxed) {
                return; // the shutdown ends it as cancelled
            }
            let ahead = self.ahead(run.user, provider, run.seq.load(Ordering::Relaxed));
            if ahead == 0 {
                if run.set_state(provider, ProviderState::AwaitingCredentials) {
                    if let Ok(mut q) = p.position.lock() {
                        *q = None;
                    }
                    run.emit(RunEvent::AwaitingCredentials { provider });
                    self.arm_credential_wait(run.clone(), provider);
                    self.persist(&run).await;
                }
                return;
            }
            let moved = p
                .position
                .lock()
                .map(|mut q| q.replace(ahead) != Some(ahead))
                .unwrap_or(false);
            if moved {
                run.emit(RunEvent::Queued {
                    provider,
                    position: ahead,
                });
            }
            tokio::select! {
                () = &mut turn => {}
                () = tokio::time::sleep_until(deadline) => {
                    if run.set_state(provider, ProviderState::Failed) {
                        run.emit_final(RunEvent::Error {
                            provider,
                            stage: ErrorStage::Queue,
                            message: format!(
                                "waited {} s behind another of your {} runs, which did not finish",
                                self.cfg.queue_wait.as_secs(),
                                provider.display_name()
                            ),
                            exit_code: None,
                            resets_at: None,
                        });
                        let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
                        self.persist(&run).await;
                    }
                    return;
                }
            }
        }
    }

    /// The run as it is now; for one no longer in memory, as the store
    /// recorded it.
    pub async fn view(&self, id: &str, user: UserId) -> Result<RunView, RunError> {
        match self.get(id, user) {
            Ok(run) => Ok(run.view()),
            Err(RunError::NotFound(_)) => {
                let r = match self.store.run(user, id).await {
                    Ok(r) => r,
                    Err(polydev_store::StoreError::NotFound) => {
                        return Err(RunError::NotFound(id.to_owned()))
                    }
                    Err(e) => return Err(ManagerError::from(e).into()),
                };
                let providers: Vec<Value> = serde_json::from_str(&r.providers).unwrap_or_default();
                let sandboxes = providers
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p["provider"].as_str()?.to_owned(),
                            ProviderView {
                                sandbox_id: p["sandboxId"].as_str().unwrap_or_default().to_owned(),
                                public_key: String::new(),
                                state: p["state"].as_str()?.parse().ok()?,
                                queue_position: None,
                                workspace: None,
                            },
                        ))
                    })
                    .collect();
                Ok(RunView {
                    run_id: r.id,
                    state: r.state,
                    deadline_secs: None,
                    sandboxes,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// `NotFound` for a run the store knows but memory no longer holds
    /// becomes `Finished` (a clear 410 for a late viewer).
    /// The providers of live runs that have not ended (queued ones too:
    /// they are about to run), in all and `user`'s.
    fn providers_in_flight(&self, user: UserId) -> (usize, usize) {
        let Ok(r) = self.runs.lock() else {
            return (0, 0);
        };
        let mut all = 0;
        let mut mine = 0;
        for run in r.values() {
            let n = run
                .providers
                .iter()
                .filter(|p| p.state.lock().map(|s| !s.is_terminal()).unwrap_or(false))
                .count();
            all += n;
            if run.user == user {
                mine += n;
            }
        }
        (all, mine)
    }

    /// Takes `providers` places in the admission count for `user`, or says
    /// why not: the host at its most CLIs, or the user at their share.
    fn admit(&self, user: UserId, providers: usize) -> Result<Reservation<'_>, RunError> {
        let mut reserved = self
            .reserved
            .lock()
            .map_err(|_| RunError::Invalid("admission poisoned".into()))?;
        let (live, live_mine) = self.providers_in_flight(user);
        let all = live + reserved.values().sum::<usize>();
        let mine = live_mine + reserved.get(&user).copied().unwrap_or(0);
        let max = self.cfg.max_providers_in_flight;
        let share = (max / 4).max(5);
        if all > 0 && all + providers > max {
            return Err(RunError::Busy {
                in_flight: all,
                max,
                yours: false,
            });
        }
        if mine > 0 && mine + providers > share {
            return Err(RunError::Busy {
                in_flight: mine,
                max: share,
                yours: true,
            });
        }
        *reserved.entry(user).or_default() += providers;
        Ok(Reservation {
            reserved: &self.reserved,
            user,
            providers,
        })
    }

    async fn finished_or_missing(&self, id: &str, user: UserId) -> RunError {
        match self.store.run(user, id).await {
            Ok(_) => RunError::Finished(id.to_owned()),
            Err(_) => RunError::NotFound(id.to_owned()),
        }
    }

    /// Whether a run with workspace `w` may start: within this server's
    /// size, on CLIs that have a read-only mode, for a user with vault
    /// keys (the diffs come back sealed to them).
    async fn check_workspace(
        &self,
        user: UserId,
        w: Workspace,
        providers: &[Provider],
    ) -> Result<(), RunError> {
        let max = self.cfg.max_workspace_bytes;
        if w.bytes > max {
            return Err(RunError::TooLarge(format!(
                "the workspace is {} bytes; this server takes at most {max} bytes ({} MiB)",
                w.bytes,
                max >> 20
            )));
        }
        if w.bytes == 0 {
            return Err(RunError::Invalid(
                "workspace.bytes: the archive's size must be at least 1 byte".into(),
            ));
        }
        if let Some(p) = providers
            .iter()
            .find(|p| !crate::providers::works_on_code(**p))
        {
            return Err(RunError::Invalid(format!(
                "{} has no read-only mode of its own, so it does not take a workspace yet; workspaces run on Claude Code, Codex and Gemini CLI",
                p.display_name()
            )));
        }
        match self.store.vault_keys(user).await {
            Ok(_) => Ok(()),
            Err(polydev_store::StoreError::NotFound) => Err(RunError::Invalid(
                "a workspace run needs your vault (its diffs come back sealed to it): set it up first".into(),
            )),
            Err(e) => Err(ManagerError::from(e).into()),
        }
    }

    /// Takes one provider's workspace: the sealed chunks (see
    /// [`crate::workspace`]) as they arrive, each opened by that
    /// sandbox's agent and added to the archive, which is then unpacked
    /// and committed as the base. A stream that is cut short, too long,
    /// or whose chunks do not open leaves the provider awaiting its
    /// workspace (to be sent again whole).
    pub async fn upload_workspace<S>(
        &self,
        id: &str,
        user: UserId,
        provider: Provider,
        mut chunks: S,
    ) -> Result<RunView, RunError>
    where
        S: futures_util::Stream<Item = Result<Vec<u8>, RunError>> + Unpin + Send,
    {
        use futures_util::StreamExt;
        let run = self.get(id, user)?;
        let Some(w) = run.workspace else {
            return Err(RunError::Invalid(format!(
                "run {id} has no workspace (start it with one)"
            )));
        };
        let Some(p) = run.providers.iter().find(|p| p.provider == provider) else {
            return Err(RunError::Invalid(format!(
                "{} is not part of this run",
                provider.as_str()
            )));
        };
        {
            let state = p.state.lock().map(|s| *s).unwrap_or(ProviderState::Failed);
            if !matches!(
                state,
                ProviderState::AwaitingCredentials | ProviderState::Queued
            ) {
                return Err(RunError::Conflict(format!(
                    "{} has started (or ended) already; its workspace can no longer change",
                    provider.as_str()
                )));
            }
            let mut u = p
                .upload
                .lock()
                .map_err(|_| RunError::Invalid("run state poisoned".into()))?;
            match *u {
                Upload::Awaiting => *u = Upload::Sending,
                Upload::Sending => {
                    return Err(RunError::Conflict(format!(
                        "{}'s workspace is arriving already",
                        provider.as_str()
                    )))
                }
                Upload::Ready(_) => {
                    return Err(RunError::Conflict(format!(
                        "{}'s workspace is in its sandbox already",
                        provider.as_str()
                    )))
                }
                Upload::None => unreachable!("a run with a workspace"),
            }
        }
        // Back to awaiting however this ends (an error, the deadline, or
        // the request dropped mid-way), unless it is unpacked.
        let mut guard = UploadGuard {
            upload: &p.upload,
            ready: false,
        };
        let upload = async {
            let count = w.chunks();
            let name = provider.as_str();
            let mut agent = self
                .manager
                .agent(&p.sandbox, Duration::from_secs(5))
                .await
                .map_err(ManagerError::from)?;
            let mut total = 0u64;
            for index in 0..count {
                let chunk = match chunks.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(RunError::Invalid(format!(
                            "the workspace ended after {index} of its {count} chunks"
                        )))
                    }
                };
                if chunk.len() as u64 > workspace::CHUNK + workspace::SEAL_SLACK {
                    return Err(RunError::TooLarge(format!(
                        "chunk {index} is {} bytes sealed; a chunk holds at most {} bytes",
                        chunk.len(),
                        workspace::CHUNK
                    )));
                }
                let aad = workspace::chunk_aad(id, name, index, count);
                let opened = agent
                    .unseal_into(
                        workspace::WORKSPACE_PURPOSE,
                        aad.as_bytes(),
                        &chunk,
                        workspace::ARCHIVE,
                        0o600,
                        index > 0,
                    )
                    .await;
                match opened {
                    Ok(n) => total += n,
                    Err(polydev_agent::client::ClientError::Refused { code, message })
                        if code == "unseal" =>
                    {
                        return Err(RunError::Invalid(format!(
                            "chunk {index} of {name}'s workspace did not open in its sandbox (seal each chunk to that sandbox's publicKey with info {:?} and aad \"{aad}\"): {}",
                            workspace::WORKSPACE_PURPOSE,
                            clamp(&message)
                        )))
                    }
                    Err(e) => {
                        return Err(RunError::Sandbox(
                            polydev_sandbox::DriverError::from(e).into(),
                        ))
                    }
                }
            }
            match chunks.next().await {
                None => {}
                Some(Err(e)) => return Err(e),
                Some(Ok(_)) => {
                    return Err(RunError::Invalid(format!(
                        "the workspace has more than the {count} chunks its {} bytes take",
                        w.bytes
                    )))
                }
            }
            if total != w.bytes {
                return Err(RunError::Invalid(format!(
                    "the workspace's chunks hold {total} bytes, not the {} the run was started with",
                    w.bytes
                )));
            }
            let line = workspace::unpack_line();
            let out = agent
                .exec(
                    &["/bin/sh", "-c", &line],
                    None,
                    Duration::from_secs(120),
                    |_| {},
                )
                .await
                .map_err(|e| RunError::Sandbox(polydev_sandbox::DriverError::from(e).into()))?;
            if out.code != Some(0) {
                let why = last_meaningful_line(&String::from_utf8_lossy(&out.stderr))
                    .unwrap_or_else(|| "it gave no reason".into());
                return Err(RunError::Invalid(format!(
                    "the workspace could not be unpacked as a tar archive: {why}"
                )));
            }
            Ok(())
        };
        let result = match tokio::time::timeout(UPLOAD_DEADLINE, upload).await {
            Ok(r) => r,
            Err(_) => Err(RunError::Timeout(format!(
                "the workspace did not arrive and unpack within {} s; send it again",
                UPLOAD_DEADLINE.as_secs()
            ))),
        };
        if result.is_ok() {
            guard.ready = true;
        }
        drop(guard);
        result.map(|()| run.view())
    }

    /// A provider's diff sealed to the key the client gave at the start
    /// (base64), while the run is in memory; handed out once.
    pub fn client_diff(
        &self,
        id: &str,
        user: UserId,
        provider: Provider,
    ) -> Result<Option<String>, RunError> {
        let run = self.get(id, user)?;
        if run.workspace.and_then(|w| w.recipient).is_none() {
            return Err(RunError::Invalid(format!(
                "run {id} was started without a workspace.recipient: its diffs are sealed to your vault only (fetch them without ?to=recipient)"
            )));
        }
        Ok(run
            .providers
            .iter()
            .find(|p| p.provider == provider)
            .and_then(|p| p.client_diff.lock().ok()?.take()))
    }

    /// A provider's diff, sealed to the user (base64): from the live run,
    /// or the store once it has ended. `None`: it has none (yet).
    pub async fn diff(
        &self,
        id: &str,
        user: UserId,
        provider: Provider,
    ) -> Result<Option<String>, RunError> {
        match self.get(id, user) {
            Ok(run) => {
                let live = run
                    .providers
                    .iter()
                    .find(|p| p.provider == provider)
                    .and_then(|p| p.diff.lock().ok()?.clone());
                match live {
                    Some(d) => Ok(Some(d)),
                    // Stored once the run ended (and let go of here).
                    None => stored_diff(&self.store, id, user, provider).await,
                }
            }
            Err(RunError::NotFound(_)) => stored_diff(&self.store, id, user, provider).await,
            Err(e) => Err(e),
        }
    }

    /// Makes what the CLI changed into a diff inside the sandbox and (with
    /// `keep`) keeps it sealed to the user; its size, or why there is none.
    async fn take_diff(&self, run: &Run, p: &ProviderRun, keep: bool) -> Result<u64, String> {
        let mut agent = self
            .manager
            .agent(&p.sandbox, Duration::from_secs(5))
            .await
            .map_err(|e| format!("cannot reach the sandbox: {}", clamp(&e.to_string())))?;
        let line = workspace::diff_line();
        let out = agent
            .exec(
                &["/bin/sh", "-c", &line],
                None,
                Duration::from_secs(60),
                |_| {},
            )
            .await
            .map_err(|e| format!("cannot make the diff: {}", clamp(&e.to_string())))?;
        if out.code != Some(0) {
            let why = last_meaningful_line(&String::from_utf8_lossy(&out.stderr))
                .unwrap_or_else(|| "git gave no reason".into());
            return Err(format!("cannot make the diff: {why}"));
        }
        // The size the sandbox reports only says what it says (nothing
        // changed, too large); what comes back is bounded below.
        let bytes: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "cannot make the diff: no size".to_owned())?;
        if !keep || bytes == 0 {
            return Ok(bytes);
        }
        let keys = self
            .store
            .vault_keys(run.user)
            .await
            .map_err(|e| format!("cannot read your vault key: {e}"))?;
        if bytes > workspace::MAX_DIFF {
            return Err(format!(
                "the changes make a diff of {bytes} bytes, more than the {} MiB a run keeps",
                workspace::MAX_DIFF >> 20
            ));
        }
        let aad = format!("{}/{}", run.id, p.provider.as_str());
        let sealed = agent
            .seal_file(
                workspace::DIFF_FILE,
                &keys.public_key,
                workspace::DIFF_PURPOSE,
                aad.as_bytes(),
            )
            .await
            .map_err(|e| format!("cannot seal the diff: {}", clamp(&e.to_string())))?;
        if sealed.len() as u64 > workspace::MAX_DIFF + workspace::SEAL_SLACK {
            return Err(format!(
                "the changes make a diff of more than the {} MiB a run keeps",
                workspace::MAX_DIFF >> 20
            ));
        }
        // For the client that started the run, when it asked.
        // (Its failure leaves the vault's copy: the client is told there
        // is none for it.)
        let mut for_client = None;
        if let Some(key) = run.workspace.and_then(|w| w.recipient) {
            let sealed = agent
                .seal_file(
                    workspace::DIFF_FILE,
                    &key,
                    workspace::DIFF_PURPOSE,
                    aad.as_bytes(),
                )
                .await;
            match sealed {
                Ok(b) if b.len() as u64 <= workspace::MAX_DIFF + workspace::SEAL_SLACK => {
                    for_client = Some(base64::engine::general_purpose::STANDARD.encode(b));
                }
                Ok(_) => {
                    tracing::warn!(run = %run.id, "the sandbox sealed a larger diff for the client")
                }
                Err(e) => {
                    tracing::warn!(run = %run.id, error = %clamp(&e.to_string()), "cannot seal the diff for the client")
                }
            }
        }
        // Kept only for a provider still running (one cancelled meanwhile
        // is stored without it).
        let running = p
            .state
            .lock()
            .map(|s| *s == ProviderState::Running)
            .unwrap_or(false);
        if running {
            if let Ok(mut d) = p.diff.lock() {
                *d = Some(base64::engine::general_purpose::STANDARD.encode(sealed));
            }
            if let Ok(mut d) = p.client_diff.lock() {
                *d = for_client;
            }
        }
        Ok(bytes)
    }

    /// Hands each provider its sealed credential and starts its CLI.
    pub async fn credentials(
        self: &Arc<Self>,
        id: &str,
        user: UserId,
        admin: bool,
        sealed: BTreeMap<Provider, (Vec<u8>, CredentialKind)>,
    ) -> Result<RunView, RunError> {
        let run = self.get(id, user)?;
        // A CLI login file is a subscription sign-in: only where this
        // installation offers it to this user (checked for all before any
        // is opened).
        for (provider, (_, kind)) in &sealed {
            if *kind == CredentialKind::CloudKey
                && crate::providers::info(*provider).cloud.is_none()
            {
                return Err(RunError::Invalid(format!(
                    "{} takes no cloud key (Claude Code takes an Amazon Bedrock key, Gemini CLI a Vertex AI key)",
                    provider.display_name(),
                )));
            }
            if *kind == CredentialKind::SubscriptionToken
                && crate::providers::info(*provider).token.is_none()
            {
                return Err(RunError::Invalid(format!(
                    "{} takes no subscription token (an API key{} instead)",
                    provider.display_name(),
                    if crate::providers::info(*provider).sign_in {
                        " or its sign-in"
                    } else {
                        ""
                    }
                )));
            }
            if matches!(
                kind,
                CredentialKind::CliLogin | CredentialKind::SubscriptionToken
            ) {
                self.cfg.sign_in.check(*provider, admin)?;
            }
            // A queued provider's credential waits for its turn: said
            // before any other is opened, so nothing starts half-way.
            let queued = run.providers.iter().any(|p| {
                p.provider == *provider
                    && p.state
                        .lock()
                        .map(|s| *s == ProviderState::Queued)
                        .unwrap_or(false)
            });
            if queued {
                return Err(RunError::Queued(provider.as_str().to_owned()));
            }
            // A run on code starts its CLI only on the code.
            let awaiting_code = run.providers.iter().any(|p| {
                p.provider == *provider
                    && p.upload
                        .lock()
                        .map(|u| matches!(*u, Upload::Awaiting | Upload::Sending))
                        .unwrap_or(false)
            });
            if awaiting_code {
                return Err(RunError::Conflict(format!(
                    "{} has not got its workspace yet: send it first (PUT /api/runs/{id}/workspace/{})",
                    provider.display_name(),
                    provider.as_str()
                )));
            }
        }
        for (provider, (box_, kind)) in &sealed {
            let Some(p) = run.providers.iter().find(|p| p.provider == *provider) else {
                return Err(RunError::Invalid(format!(
                    "{} is not part of this run",
                    provider.as_str()
                )));
            };
            // (Queued ones were refused above; none becomes queued again.)
            let state = p.state.lock().map(|s| *s).unwrap_or(ProviderState::Failed);
            if state != ProviderState::AwaitingCredentials {
                return Err(RunError::Invalid(format!(
                    "{} already has its credential",
                    provider.as_str()
                )));
            }
            let aad = format!("{id}/{}", provider.as_str());
            let opened = async {
                let mut agent = self
                    .manager
                    .agent(&p.sandbox, Duration::from_secs(5))
                    .await?;
                agent
                    .unseal(
                        CREDENTIAL_PURPOSE,
                        aad.as_bytes(),
                        box_,
                        CREDENTIAL_FILE,
                        0o600,
                    )
                    .await
                    .map_err(polydev_sandbox::DriverError::from)
            }
            .await;
            match opened {
                Ok(_) => {
                    if let Ok(mut k) = p.kind.lock() {
                        *k = *kind;
                    }
                    run.set_state(*provider, ProviderState::Running);
                    let (me, r, prov) = (self.clone(), run.clone(), *provider);
                    self.tasks.spawn(async move { me.drive(r, prov).await });
                }
                Err(e) => {
                    return Err(RunError::Invalid(format!(
                        "the {} sandbox could not open its credential (seal it to that sandbox's publicKey with info {CREDENTIAL_PURPOSE:?} and aad \"{aad}\"): {e}",
                        provider.as_str()
                    )))
                }
            }
        }
        Ok(run.view())
    }

    /// Seals the CLI's credential file, as the CLI left it, to the user's
    /// vault key inside the sandbox and stores it as the next version of
    /// `credential.<provider>` (rotated refresh tokens survive the run).
    async fn seal_back(
        &self,
        run: &Run,
        provider: Provider,
        sandbox: &SandboxId,
    ) -> Result<(), String> {
        let keys = self
            .store
            .vault_keys(run.user)
            .await
            .map_err(|e| e.to_string())?;
        crate::vault::seal_credential_to_vault(
            &self.manager,
            &self.store,
            run.user,
            &keys.public_key,
            sandbox,
            provider,
            credential_file(provider),
        )
        .await
        .map(|_| ())
    }

    /// Runs one provider's CLI and turns its output into events.
    async fn drive(self: Arc<Self>, run: Arc<Run>, provider: Provider) {
        let Some(p) = run.providers.iter().find(|p| p.provider == provider) else {
            return;
        };
        run.emit(RunEvent::Started {
            provider,
            sandbox_id: p.sandbox.to_string(),
        });
        let kind = p.kind.lock().map(|k| *k).unwrap_or_default();
        let (line, env) = run_command(
            provider,
            &RunSetup {
                kind,
                bases: self.cfg.bases(),
                deadline: run.deadline,
                mode: run.workspace.map(|w| w.mode),
            },
        );
        // On a workspace, the CLI starts in it.
        let line = match run.workspace {
            Some(_) => format!("cd {} || exit 2; {line}", workspace::DIR),
            None => line,
        };
        // The run's deadline ends the provider whatever the CLI (or the
        // sandbox's agent) does; the agent's own kill comes first.
        let until = tokio::time::Instant::now() + run.deadline + Duration::from_secs(5);
        let result = async {
            let mut agent = self
                .manager
                .agent(&p.sandbox, Duration::from_secs(5))
                .await?;
            agent
                .start_exec(
                    vec!["/bin/sh".into(), "-c".into(), line],
                    env,
                    None,
                    run.deadline,
                )
                .await?;
            let mut out = Output::default();
            loop {
                let Ok(next) = tokio::time::timeout_at(until, agent.next_event()).await else {
                    return Ok(Ended::TimedOut(None, out.limited(provider), out.resets_at(), out.failure.clone()));
                };
                match next? {
                    AgentEvent::Stdout { data } => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .unwrap_or_default();
                        for line in out.lines(provider, &bytes) {
                            let emitted = match line {
                                Line::Delta(text) => {
                                    // It got through: an earlier limit is over.
                                    out.rate_limited = false;
                                    out.rejected = false;
                                    run.emit(RunEvent::Delta { provider, text })
                                }
                                Line::Retrying(message) => {
                                    out.retries += 1;
                                    // Whether the latest retry is for a limit.
                                    out.rate_limited = crate::providers::is_rate_limit(&message);
                                    run.emit(RunEvent::Retrying { provider, message, attempt: out.retries })
                                }
                                // Sent once the provider's state says so,
                                // so "done" is always its last word.
                                Line::Done(usage) => {
                                    out.failure = None;
                                    out.failed_last = false;
                                    out.done = Some(match out.done {
                                        Some(earlier) => earlier.plus(usage),
                                        None => usage,
                                    });
                                    true
                                }
                                Line::Usage(usage) => {
                                    out.running = Some(usage);
                                    true
                                }
                                // The latest word on the subscription
                                // counts (a refusal, then room again).
                                Line::Limits(limits) => {
                                    out.rejected = limits.rejected;
                                    out.limits = Some(limits);
                                    true
                                }
                                // The last word decides: a failure after
                                // a finished step (OpenCode's) is a
                                // failure, a step finished after a failure
                                // (it retried) is not.
                                Line::Failure(message) => {
                                    out.failure = Some(message);
                                    out.failed_last = true;
                                    true
                                }
                                // It will not go on (nor, maybe, exit): it
                                // ends here, its sandbox with it.
                                Line::GaveUp(message) => {
                                    out.failure = Some(message);
                                    out.failed_last = true;
                                    out.gave_up = true;
                                    return Ok(Ended::Exited(None, out));
                                }
                            };
                            if !emitted {
                                return Ok(Ended::TooLarge("events"));
                            }
                        }
                        if out.answer > MAX_ANSWER {
                            return Ok(Ended::TooLarge("answer"));
                        }
                    }
                    AgentEvent::Stderr { data } => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .unwrap_or_default();
                        out.stderr.push_str(&String::from_utf8_lossy(&bytes));
                        if out.stderr.len() > 8192 {
                            let mut cut = out.stderr.len() - 8192;
                            while !out.stderr.is_char_boundary(cut) {
                                cut += 1;
                            }
                            out.stderr.drain(..cut);
                        }
                    }
                    AgentEvent::Exit {
                        code, timed_out, ..
                    } => {
                        // Before "done": the next run finds the credential
                        // the CLI may have refreshed.
                        if kind == CredentialKind::CliLogin {
                            if let Err(e) = self.seal_back(&run, provider, &p.sandbox).await {
                                tracing::warn!(run = %run.id, provider = provider.as_str(), error = %e, "cannot seal the CLI's credential back to the user");
                            }
                        }
                        if timed_out {
                            return Ok(Ended::TimedOut(code, out.limited(provider), out.resets_at(), out.failure.clone()));
                        }
                        // What it changed, before its last word; asked
                        // only to read, it must have changed nothing.
                        match run.workspace.map(|w| w.mode) {
                            Some(Mode::Edit) => {
                                let (bytes, error) = match self.take_diff(&run, p, true).await {
                                    Ok(n) => (n, None),
                                    Err(e) => (0, Some(e)),
                                };
                                run.emit(RunEvent::Diff { provider, bytes, error });
                            }
                            Some(Mode::Ask) => {
                                let error = match self.take_diff(&run, p, false).await {
                                    Ok(0) => None,
                                    Ok(n) => Some(format!("{} changed the workspace ({n} bytes of diff) though asked only to read it; the changes were not kept", provider.display_name())),
                                    Err(e) => Some(e),
                                };
                                if let Some(error) = error {
                                    run.emit(RunEvent::Diff { provider, bytes: 0, error: Some(error) });
                                }
                            }
                            None => {}
                        }
                        return Ok::<_, polydev_sandbox::DriverError>(Ended::Exited(code, out));
                    }
                    _ => {}
                }
            }
        }
        .await;
        let cancelled = run.cancelled.load(Ordering::Relaxed);
        let name = provider.display_name();
        // Why its provider could not be reached, if the egress proxy refused
        // or failed a destination of this sandbox (read before it ends).
        let unreachable = self
            .manager
            .egress_refusal(&p.sandbox)
            .map(|(host, why)| format!("{name} could not reach {host}: it {why}"));
        let failed_at =
            |message: String, stage: ErrorStage, exit_code: Option<i32>, resets_at: Option<u64>| {
                if run.set_state(provider, ProviderState::Failed) {
                    run.emit_final(RunEvent::Error {
                        provider,
                        stage,
                        message,
                        exit_code,
                        resets_at,
                    });
                }
            };
        let failed = |message: String, stage: ErrorStage, exit_code: Option<i32>| {
            failed_at(message, stage, exit_code, None)
        };
        // When a limit that refused it resets, as its vendor said.
        let try_again = |resets_at: Option<u64>| match resets_at {
            Some(t) => format!("try again after {}", crate::providers::utc(t)),
            None => "try again once the limit resets".to_owned(),
        };
        match result {
            _ if cancelled => {}
            Ok(Ended::TimedOut(code, true, resets_at, _)) => {
                let mut message = format!(
                    "{name}'s provider refused it for a rate or usage limit (HTTP 429), and it had not got through when the run's deadline ({} s) passed; {}",
                    run.deadline.as_secs(),
                    try_again(resets_at)
                );
                if let Some(u) = &unreachable {
                    message.push_str(&format!("; also, {u}"));
                }
                failed_at(message, ErrorStage::RateLimited, code, resets_at);
            }
            Ok(Ended::TimedOut(code, false, _, said)) => {
                let mut message = format!(
                    "{name} gave no answer within {} s (the run's deadline) and was stopped",
                    run.deadline.as_secs()
                );
                // What its stream said went wrong, if it said.
                if let Some(f) = said {
                    message.push_str(&format!("; it had reported: {f}"));
                }
                if let Some(u) = &unreachable {
                    message.push_str(&format!("; {u}"));
                }
                failed(message, ErrorStage::Timeout, code);
            }
            Ok(Ended::TooLarge(what)) => {
                let message = match what {
                    "answer" => format!(
                        "{name}'s answer passed {} MiB and was stopped there",
                        MAX_ANSWER >> 20
                    ),
                    _ => format!("{name} sent more output than a run keeps and was stopped"),
                };
                failed(message, ErrorStage::Output, None);
            }
            Ok(Ended::Exited(
                Some(0),
                Output {
                    done: Some(usage),
                    running,
                    limits,
                    failed_last: false,
                    ..
                },
            )) => {
                if run.set_state(provider, ProviderState::Done) {
                    run.emit_final(RunEvent::Done {
                        provider,
                        usage: usage.or_running(running),
                        limits,
                    });
                }
            }
            Ok(Ended::Exited(code, out)) => {
                // A rate limit the stream reported explains the end better
                // than anything else it tried and could not reach.
                let limit = out
                    .failure
                    .clone()
                    .filter(|f| crate::providers::is_rate_limit(f));
                // The final cause decides: a failure the stream reported
                // that is not a limit is not one, whatever came before.
                // A subscription its vendor refused (and that got no
                // further since) explains the end.
                let limited = limit.is_some()
                    || out.rejected
                    || (out.failure.is_none() && out.limited(provider));
                let resets_at = out.resets_at();
                let reason = limit
                    .or(unreachable)
                    .or(out.failure)
                    .or_else(|| last_meaningful_line(&out.stderr))
                    .unwrap_or_else(|| "it gave no reason".into());
                let how = match code {
                    _ if out.gave_up => "gave up".to_owned(),
                    Some(0) => "ended without an answer".to_owned(),
                    Some(c) => format!("stopped with exit code {c}"),
                    None => "was stopped by a signal".to_owned(),
                };
                if limited || crate::providers::is_rate_limit(&reason) {
                    failed_at(
                        format!("{name} {how}: its provider refused it for a rate or usage limit ({reason}); {}", try_again(resets_at)),
                        ErrorStage::RateLimited,
                        code,
                        resets_at,
                    );
                } else {
                    failed(format!("{name} {how}: {reason}"), ErrorStage::Cli, code);
                }
            }
            Err(e) => {
                tracing::warn!(run = %run.id, provider = provider.as_str(), error = %e, "run sandbox failed");
                failed(
                    format!("{name}'s sandbox stopped answering before the CLI finished, so there is no answer"),
                    ErrorStage::Sandbox,
                    None,
                );
            }
        }
        let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
        self.persist(&run).await;
    }

    /// Writes the run's states and timings; once every provider has ended,
    /// its answers, each sealed to the user's vault public key (a user
    /// without vault keys gets states only).
    async fn persist(&self, run: &Run) {
        let store = &self.store;
        let finished = run.finished();
        let mut answers = None;
        let mut diffs = None;
        if finished && !run.sealed.swap(true, Ordering::AcqRel) {
            // Sealed inside each sandbox already.
            let made: serde_json::Map<String, Value> = run
                .providers
                .iter()
                .filter_map(|p| {
                    let d = p.diff.lock().ok()?.clone()?;
                    Some((p.provider.as_str().to_owned(), json!(d)))
                })
                .collect();
            if !made.is_empty() {
                let names = made.keys().cloned().collect::<Vec<_>>().join(",");
                diffs = Some((Value::Object(made).to_string(), names));
            }
            if let Ok(keys) = store.vault_keys(run.user).await {
                if let Ok(pk) = polydev_vault::SealingPublicKey::from_bytes(&keys.public_key) {
                    let events = run
                        .events
                        .lock()
                        .map(|h| h.events.clone())
                        .unwrap_or_default();
                    let mut out = serde_json::Map::new();
                    for p in &run.providers {
                        let text: String = events
                            .iter()
                            .filter_map(|e| match &**e {
                                RunEvent::Delta { provider, text } if *provider == p.provider => {
                                    Some(text.as_str())
                                }
                                _ => None,
                            })
                            .collect();
                        let aad = format!("{}/{}", run.id, p.provider.as_str());
                        let sealed = pk.seal(ANSWER_PURPOSE, aad.as_bytes(), text.as_bytes());
                        out.insert(
                            p.provider.as_str().to_owned(),
                            json!(base64::engine::general_purpose::STANDARD.encode(sealed)),
                        );
                    }
                    answers = Some(Value::Object(out).to_string());
                }
            }
        }
        let state = run.state();
        if let Err(e) = store
            .update_run(
                &run.id,
                state,
                &providers_json(run),
                answers.as_deref(),
                diffs.as_ref().map(|(d, n)| (d.as_str(), n.as_str())),
                finished.then(now_ms),
            )
            .await
        {
            tracing::warn!(run = %run.id, error = %e, "cannot record the run");
        } else if diffs.is_some() {
            // Stored: a finished run in memory need not hold them too.
            for p in &run.providers {
                if let Ok(mut d) = p.diff.lock() {
                    *d = None;
                }
            }
        }
        if finished {
            let first = run
                .finished_at
                .lock()
                .map(|mut f| {
                    let first = f.is_none();
                    f.get_or_insert_with(std::time::Instant::now);
                    first
                })
                .unwrap_or(false);
            if first {
                // The stream's last event: every provider has ended.
                run.emit_final(RunEvent::End { state });
            }
            self.sweep();
        }
    }

    /// A user's runs from the store, newest first (answers sealed to them).
    pub async fn history(&self, user: UserId) -> Result<Vec<Value>, RunError> {
        history(&self.store, user).await
    }

    /// Cancels the providers still going; their sandboxes are destroyed.
    pub async fn cancel(&self, id: &str, user: UserId) -> Result<RunView, RunError> {
        let run = self.get(id, user)?;
        self.end_cancelled(&run, "the run was cancelled").await;
        Ok(run.view())
    }

    /// Stops one provider of a run (the others go on): if it is still
    /// going it ends with `error` (stage `cancelled`) and its sandbox goes.
    pub async fn cancel_provider(
        &self,
        id: &str,
        user: UserId,
        provider: Provider,
    ) -> Result<RunView, RunError> {
        let run = self.get(id, user)?;
        let Some(p) = run.providers.iter().find(|p| p.provider == provider) else {
            return Err(RunError::Invalid(format!(
                "{} is not part of this run",
                provider.as_str()
            )));
        };
        if run.set_state(provider, ProviderState::Cancelled) {
            run.emit_final(RunEvent::Error {
                provider,
                stage: ErrorStage::Cancelled,
                message: format!("you stopped {}", provider.display_name()),
                exit_code: None,
                resets_at: None,
            });
        }
        let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
        self.persist(&run).await;
        Ok(run.view())
    }

    /// Ends `run` as cancelled: every provider still going gets `error`
    /// (stage `cancelled`, `message`), its sandboxes go, its state is stored.
    async fn end_cancelled(&self, run: &Run, message: &str) {
        run.cancelled.store(true, Ordering::Relaxed);
        for p in &run.providers {
            if run.set_state(p.provider, ProviderState::Cancelled) {
                run.emit_final(RunEvent::Error {
                    provider: p.provider,
                    stage: ErrorStage::Cancelled,
                    message: message.into(),
                    exit_code: None,
                    resets_at: None,
                });
            }
            let _ = self.manager.destroy(&p.sandbox, SandboxStatus::Ended).await;
        }
        self.persist(run).await;
    }

    /// Ends every live run (as cancelled) and joins the tasks that drove
    /// them.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let live: Vec<Arc<Run>> = self
            .runs
            .lock()
            .map(|r| r.values().filter(|r| !r.finished()).cloned().collect())
            .unwrap_or_default();
        for run in live {
            self.end_cancelled(&run, "the controller shut down").await;
        }
        self.tasks.shutdown(Duration::from_secs(5)).await;
    }

    /// Past events, and a receiver for the rest (None once all finished).
    pub async fn subscribe(
        &self,
        id: &str,
        user: UserId,
    ) -> Result<
        (
            Vec<Arc<RunEvent>>,
            Option<broadcast::Receiver<Arc<RunEvent>>>,
        ),
        RunError,
    > {
        let run = match self.get(id, user) {
            Ok(r) => r,
            Err(RunError::NotFound(_)) => return Err(self.finished_or_missing(id, user).await),
            Err(e) => return Err(e),
        };
        // Under the events lock: the history and the live feed neither
        // overlap nor leave a gap.
        if run.tx.receiver_count() >= MAX_VIEWERS {
            return Err(RunError::TooManyViewers);
        }
        let (past, rx) = match run.events.lock() {
            Ok(h) => (h.events.clone(), run.tx.subscribe()),
            Err(_) => return Err(RunError::Invalid("run events poisoned".into())),
        };
        Ok((past, (!run.finished()).then_some(rx)))
    }

    pub fn is_finished(&self, id: &str, user: UserId) -> bool {
        self.get(id, user).map(|r| r.finished()).unwrap_or(true)
    }
}

/// How a provider's CLI ended.
enum Ended {
    /// Exit code and what its output said.
    Exited(Option<i32>, Output),
    /// The run's deadline passed (the exit code, when the agent reported
    /// one; whether its provider had refused it for a rate limit, and when
    /// that resets if the vendor said; the last failure its stream
    /// reported).
    TimedOut(Option<i32>, bool, Option<u64>, Option<String>),
    /// Its output passed a bound (`answer` or `events`).
    TooLarge(&'static str),
}

/// A CLI's output as it arrives: complete lines normalised, partial lines
/// kept up to `MAX_LINE` (a longer one is dropped whole), the answer's size.
#[derive(Debug, Default)]
struct Output {
    partial: Vec<u8>,
    /// Dropping an over-long line until its end.
    skipping: bool,
    answer: usize,
    /// The usage its stream's last word announced.
    done: Option<Usage>,
    /// The CLI's running total of usage, where it reports one apart from its end.
    running: Option<Usage>,
    /// Where the user's subscription stood, as the CLI last said.
    limits: Option<crate::providers::Limits>,
    /// The vendor refused it for a subscription limit (and nothing got
    /// through since).
    rejected: bool,
    /// Its stream's last word was a failure (a finished step before it
    /// does not make it done; its usage still counts).
    failed_last: bool,
    /// Its stream said it would not go on, and it was ended there.
    gave_up: bool,
    /// What its stream said went wrong (the last such line).
    failure: Option<String>,
    retries: u32,
    /// Its latest retry was for a rate limit (cleared once it got through).
    rate_limited: bool,
    stderr: String,
}

impl Output {
    /// Whether its provider refused it for a rate limit: a retry notice or
    /// its stderr said so.
    /// When the limit that refused it resets, if its vendor said.
    fn resets_at(&self) -> Option<u64> {
        self.limits
            .as_ref()
            .filter(|_| self.rejected)
            .and_then(|l| l.resets_at)
    }

    fn limited(&self, provider: Provider) -> bool {
        self.rate_limited
            || self.rejected
            || crate::providers::stderr_says_rate_limited(provider, &self.stderr)
    }
}

impl Output {
    fn lines(&mut self, provider: Provider, bytes: &[u8]) -> Vec<Line> {
        let mut events = Vec::new();
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let complete = chunk.ends_with(b"\n");
            if !self.skipping {
                self.partial.extend_from_slice(chunk);
            }
            if self.partial.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            }
            if complete {
                if !self.skipping {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    if let Some(l) = normalise(provider, line.trim()) {
                        if let Line::Delta(text) = &l {
                            self.answer += text.len();
                        }
                        events.push(l);
                    }
                }
                self.partial.clear();
                self.skipping = false;
            }
        }
        events
    }
}

/// A user's runs from the store, newest first (answers sealed to them):
/// what `GET /api/runs` answers, also where runs cannot start here.
pub async fn history(store: &Store, user: UserId) -> Result<Vec<Value>, RunError> {
    let records = store
        .list_runs(user, 100)
        .await
        .map_err(ManagerError::from)?;
    Ok(records
        .into_iter()
        .map(|r| {
            json!({
                "runId": r.id,
                "state": r.state,
                "providers": serde_json::from_str::<Value>(&r.providers).unwrap_or_default(),
                "answers": r.answers.as_deref().and_then(|a| serde_json::from_str::<Value>(a).ok()),
                "answerPurpose": ANSWER_PURPOSE,
                "prompt": r.prompt,
                "promptPurpose": PROMPT_PURPOSE,
                // Which providers brought a diff back (each is fetched on
                // its own: GET /api/runs/{id}/diff/{provider}).
                "diffs": r.diff_providers.as_deref()
                    .map(|d| d.split(',').filter(|p| !p.is_empty()).collect::<Vec<_>>())
                    .unwrap_or_default(),
                "createdAtMs": r.created_at_ms,
                "finishedAtMs": r.finished_at_ms,
            })
        })
        .collect())
}

/// A provider's diff as the store has it (sealed to the user, base64).
pub async fn stored_diff(
    store: &Store,
    id: &str,
    user: UserId,
    provider: Provider,
) -> Result<Option<String>, RunError> {
    match store.run(user, id).await {
        Ok(r) => Ok(r
            .diffs
            .and_then(|d| serde_json::from_str::<Value>(&d).ok())
            .and_then(|d| d[provider.as_str()].as_str().map(str::to_owned))),
        Err(polydev_store::StoreError::NotFound) => Err(RunError::NotFound(id.to_owned())),
        Err(e) => Err(ManagerError::from(e).into()),
    }
}

/// A provider's diff: the live run's when `runs` holds it, else the
/// store's (a server where runs are off still shows the ones made).
pub async fn stored_or_live_diff(
    runs: Option<&Runs>,
    store: &Store,
    id: &str,
    user: UserId,
    provider: Provider,
) -> Result<Option<String>, RunError> {
    match runs {
        Some(r) => r.diff(id, user, provider).await,
        None => stored_diff(store, id, user, provider).await,
    }
}

/// States and timings per provider, for the store (no content).
fn providers_json(run: &Run) -> String {
    let list: Vec<Value> = run
        .providers
        .iter()
        .map(|p| {
            let (started, finished) = p.times.lock().map(|t| *t).unwrap_or_default();
            json!({
                "provider": p.provider.as_str(),
                "sandboxId": p.sandbox.to_string(),
                "state": p.state.lock().map(|s| s.as_str()).unwrap_or("failed"),
                "startedAtMs": started,
                "finishedAtMs": finished,
            })
        })
        .collect();
    Value::Array(list).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_wire_names_and_fields() {
        let p = Provider::Codex;
        let cases = [
            (
                RunEvent::Queued {
                    provider: p,
                    position: 2,
                },
                "queued",
                json!({"position": 2, "provider": "codex"}),
            ),
            (
                RunEvent::AwaitingCredentials { provider: p },
                "awaiting_credentials",
                json!({"provider": "codex"}),
            ),
            (
                RunEvent::Started {
                    provider: p,
                    sandbox_id: "sb-1".into(),
                },
                "started",
                json!({"sandboxId": "sb-1", "provider": "codex"}),
            ),
            (
                RunEvent::Delta {
                    provider: p,
                    text: "hi".into(),
                },
                "delta",
                json!({"text": "hi", "provider": "codex"}),
            ),
            (
                RunEvent::Retrying {
                    provider: p,
                    message: "again".into(),
                    attempt: 2,
                },
                "retrying",
                json!({"message": "again", "attempt": 2, "provider": "codex"}),
            ),
            (
                RunEvent::Done {
                    provider: p,
                    usage: Usage {
                        input_tokens: Some(3),
                        output_tokens: None,
                        cost_usd: Some(0.25),
                    },
                    limits: None,
                },
                "done",
                json!({"exitCode": 0, "usage": {"inputTokens": 3, "outputTokens": null, "costUsd": 0.25}, "provider": "codex"}),
            ),
            (
                RunEvent::Done {
                    provider: p,
                    usage: Usage::default(),
                    limits: Some(crate::providers::Limits {
                        windows: vec![crate::providers::LimitWindow {
                            name: "five_hour".into(),
                            used_percent: Some(82.0),
                            resets_at: Some(100),
                            status: None,
                        }],
                        rejected: false,
                        resets_at: None,
                    }),
                },
                "done",
                json!({"exitCode": 0, "usage": {"inputTokens": null, "outputTokens": null}, "limits": {"windows": [{"name": "five_hour", "usedPercent": 82.0, "resetsAt": 100}], "rejected": false}, "provider": "codex"}),
            ),
            (
                RunEvent::Error {
                    provider: p,
                    stage: ErrorStage::Timeout,
                    message: "late".into(),
                    exit_code: None,
                    resets_at: None,
                },
                "error",
                json!({"stage": "timeout", "message": "late", "exitCode": null, "provider": "codex"}),
            ),
            (
                RunEvent::Error {
                    provider: p,
                    stage: ErrorStage::RateLimited,
                    message: "limit".into(),
                    exit_code: Some(1),
                    resets_at: Some(1_796_149_120),
                },
                "error",
                json!({"stage": "rate_limited", "message": "limit", "exitCode": 1, "resetsAt": 1_796_149_120u64, "provider": "codex"}),
            ),
            (
                RunEvent::End {
                    state: RunState::Finished,
                },
                "end",
                json!({"state": "finished"}),
            ),
        ];
        for (event, kind, data) in cases {
            assert_eq!(event.kind(), kind);
            assert_eq!(event.data(), data, "{kind}");
            assert_eq!(event.is_end(), kind == "end");
        }
    }

    #[test]
    fn cli_output_is_split_into_bounded_lines() {
        let mut out = Output::default();
        let line = |t: &str| {
            format!("{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"{t}\"}}\n")
        };
        // A line across chunks.
        let l = line("hello");
        let (a, b) = l.as_bytes().split_at(10);
        assert!(out.lines(Provider::GeminiCli, a).is_empty());
        let ev = out.lines(Provider::GeminiCli, b);
        assert_eq!(ev, vec![Line::Delta("hello".into())]);
        assert_eq!(out.answer, 5);
        // A line longer than MAX_LINE is dropped whole; the next one counts.
        let huge = vec![b'x'; MAX_LINE + 10];
        assert!(out.lines(Provider::GeminiCli, &huge).is_empty());
        assert!(out.partial.is_empty(), "nothing of it is kept");
        assert!(out.lines(Provider::GeminiCli, &huge).is_empty());
        let tail = format!("tail of the long line\n{}", line("after"));
        let ev = out.lines(Provider::GeminiCli, tail.as_bytes());
        assert_eq!(ev, vec![Line::Delta("after".into())]);
        assert!(out.partial.len() <= MAX_LINE);
    }
}
