//! The local driver: every sandbox is a bubblewrap container (user, pid,
//! mount, net, uts, ipc and cgroup namespaces; all capabilities dropped;
//! our seccomp filter) over an overlay of a golden image with a
//! size-limited tmpfs as its writable layer, in its own cgroups, running
//! as a host uid of its own. `polydev-agent launch` does the few
//! privileged steps and execs bwrap; bwrap starts the agent as the
//! sandbox's first process.
//!
//! Host state per sandbox is one directory, `<state>/<id>/` (the
//! controller's; mode 0711: bubblewrap, already running as the sandbox's
//! uid, must traverse it to the sandbox's root, and may write nothing): `labels.json` and `uid` (for reconciliation after a
//! restart), `launch.json`, `ctl/agent.sock` (the agent's listening
//! socket, bound there by the launcher and passed to the agent as a
//! descriptor), `host/egress.sock` (network mode `egress`: the controller's
//! end of the egress relay, bound read-only into the sandbox) and `fs/`
//! (the private tmpfs's mount point; nothing is mounted there in the host's
//! namespace). The sandbox can write none of it: its `/run/polydev` lives in
//! its own writable layer, inside its disk quota, and its console output
//! reaches the controller through a pipe into a bounded ring. No path the
//! sandbox can write is ever resolved here: services inside are reached
//! through the agent (`Op::Connect`), and every agent connection is checked
//! against the sandbox's uid and cgroup (`SO_PEERCRED`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polydev_agent::launch::LaunchSpec;
use polydev_agent::AgentClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::cgroup::{Budget, Cgroups};
use crate::driver::{Booted, Driver, DriverError, Existing, Stage, Stats};
use crate::image::{Image, AGENT_PATH};
use crate::spec::{Network, SandboxId, SandboxSpec};
use polydev_egress::relay_head::Head;

const READY_LINE: &str = "polydev-agent ready";
/// The most console output kept per sandbox (the end of it).
const CONSOLE_BYTES: usize = 32 * 1024;
/// Connections one sandbox may have open through its egress relay.
pub const MAX_RELAY_CONNECTIONS: usize = 64;
/// How long a sandbox has to send a request head through its relay.
const RELAY_HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Longest request head the relay reads.
const RELAY_MAX_HEAD: usize = 16 * 1024;
/// Host uids a driver allocates sandboxes from.
pub const UID_RANGE: u32 = 65_536;

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Per-sandbox host directories.
    pub state_dir: PathBuf,
    /// The host's `polydev-agent` (run as the launcher).
    pub launcher: PathBuf,
    pub bwrap: PathBuf,
    pub cgroup_root: PathBuf,
    /// Names this controller's cgroup parent, so two controllers on one
    /// host (or parallel tests) never touch each other's sandboxes.
    pub instance: String,
    /// Sandboxes run as host uids `uid_base .. uid_base + UID_RANGE`, each
    /// live sandbox its own.
    pub uid_base: u32,
    pub seccomp: bool,
    /// Debug switch: keep a failed sandbox's directory (never the default).
    pub keep_failed: bool,
    /// What all of this instance's sandboxes together may use (the parent
    /// cgroup's limits), so their sum never takes the host. `None`: no
    /// aggregate limit.
    pub budget: Budget,
}

/// The first directory from the root down to `path` (which need not exist
/// yet) that others (the sandboxes' uids) cannot traverse.
fn untraversable_ancestor(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let abs = std::path::absolute(path).ok()?;
    let mut at = PathBuf::new();
    for part in abs.components() {
        at.push(part);
        match std::fs::metadata(&at) {
            Ok(m) if m.is_dir() && m.permissions().mode() & 0o001 == 0 => return Some(at),
            Ok(_) => {}
            Err(_) => return None, // from here on we create it (0711)
        }
    }
    None
}

/// Where sandbox state goes when the data dir lies under a directory the
/// sandboxes' uids cannot traverse (a checkout in a private home): a
/// directory of the controller's under /run.
pub const RUN_STATE_DIR: &str = "/run/polydev";

impl LocalConfig {
    /// For image validation next to a live controller on the same data
    /// dir: its own cgroup parent, state directory and uid range, so the
    /// two never touch each other's sandboxes.
    pub fn for_validation(data_dir: &Path) -> Self {
        let mut cfg = Self::for_data_dir(data_dir);
        cfg.instance.push_str("-build");
        cfg.state_dir = data_dir.join("sandboxes-build");
        let slot = (cfg.uid_base - 3_000_000) / UID_RANGE;
        cfg.uid_base = 3_000_000 + ((slot + 128) % 256) * UID_RANGE;
        cfg.budget = Budget::default();
        cfg
    }

    /// Defaults for a data directory: the launcher next to the running
    /// binary, bwrap from PATH.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let digest =
            <sha2::Sha256 as sha2::Digest>::digest(canonical.as_os_str().as_encoded_bytes());
        // Instances on one host get different uid ranges (one of 256).
        let slot = u32::from(digest[6]);
        Self {
            state_dir: data_dir.join("sandboxes"),
            launcher: default_launcher(),
            bwrap: which("bwrap").unwrap_or_else(|| PathBuf::from("/usr/bin/bwrap")),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            instance: format!("polydev-{}", hex::encode(&digest[..6])),
            uid_base: 3_000_000 + slot * UID_RANGE,
            seccomp: true,
            keep_failed: false,
            budget: Budget::for_host(),
        }
    }
}

/// `polydev-agent` beside the running executable (or its parent, for test
/// binaries in `target/<profile>/deps`).
pub fn default_launcher() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    for _ in 0..2 {
        let candidate = dir.join("polydev-agent");
        if candidate.is_file() {
            return candidate;
        }
        if !dir.pop() {
            break;
        }
    }
    which("polydev-agent").unwrap_or_else(|| PathBuf::from("polydev-agent"))
}

/// The first `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Capabilities the driver uses, by bit number: chown (0), dac_override (1),
/// kill (5), setgid (6), setuid (7), sys_admin (21). Root has them all; a
/// service user gets them as ambient capabilities (deploy/systemd).
const NEEDED_CAPS: [(u32, &str); 6] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (21, "CAP_SYS_ADMIN"),
];

/// The needed capabilities this process lacks (from /proc/self/status), or
/// `None` when it has them all.
fn missing_capabilities() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Host uids for sandboxes: each live sandbox has its own (allocated at
/// create, recorded in its state directory, released once its processes
/// are gone), so a peer-uid check names exactly one sandbox.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    size: u32,
    next: u32,
    used: HashSet<u32>,
}

impl UidPool {
    pub fn new(base: u32, size: u32) -> Self {
        Self {
            base,
            size: size.max(1),
            next: 0,
            used: HashSet::new(),
        }
    }

    /// A free uid (next-fit, so a just-released one is not reused at once).
    pub fn allocate(&mut self) -> Option<u32> {
        for _ in 0..self.size {
            let uid = self.base + self.next;
            self.next = (self.next + 1) % self.size;
            if self.used.insert(uid) {
                return Some(uid);
            }
        }
        None
    }

    /// Marks `uid` taken (one a sandbox left by a previous process holds).
    pub fn reserve(&mut self, uid: u32) {
        if (self.base..self.base + self.size).contains(&uid) {
            self.used.insert(uid);
        }
    }

    pub fn release(&mut self, uid: u32) {
        self.used.remove(&uid);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// The end of a sandbox's console output (launcher, bwrap and agent
/// stderr), fed from a pipe; never more than `CONSOLE_BYTES`.
#[derive(Debug, Default)]
struct Console {
    bytes: VecDeque<u8>,
}

impl Console {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(CONSOLE_BYTES)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(CONSOLE_BYTES);
        self.bytes.drain(..over.min(self.bytes.len()));
        self.bytes.extend(data);
    }

    fn tail(&self, lines: usize) -> Vec<String> {
        let (a, b) = self.bytes.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.chars().take(500).collect())
            .collect()
    }
}

/// What the driver holds for a sandbox it started.
#[derive(Debug)]
struct Live {
    uid: u32,
    console: Arc<Mutex<Console>>,
    /// Set once the console pipe has closed (every sandbox process gone).
    console_done: tokio::sync::watch::Receiver<bool>,
    /// Reads the console and reaps the launcher.
    task: Option<tokio::task::AbortHandle>,
    relay: Option<Relay>,
}

#[derive(Debug)]
pub struct LocalDriver {
    cfg: LocalConfig,
    cgroups: Cgroups,
    live: Mutex<HashMap<SandboxId, Live>>,
    uids: Mutex<UidPool>,
}

fn io(context: &str) -> impl Fn(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::Io(format!("{context}: {e}"))
}

/// A directory of the controller's with exactly `mode`.
fn private_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes `bytes` to a new file readable by the controller only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Makes the data dir traversable by the sandboxes' uids (not listable:
/// mode 0711; the database file in it is 0600).
fn traversable(data_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    let mode = std::fs::metadata(data_dir)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            data_dir,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o711),
        )
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    }
    Ok(())
}

impl LocalDriver {
    /// The driver of the controller whose data dir is `data_dir` (made
    /// traversable, not listable, by the sandboxes' uids).
    pub fn for_data_dir(data_dir: &Path, keep_failed: bool) -> Result<Self, String> {
        traversable(data_dir)?;
        let mut cfg = LocalConfig::for_data_dir(data_dir);
        cfg.keep_failed = keep_failed;
        Self::new(cfg).map_err(|e| e.to_string())
    }

    /// The driver image builds validate on: an instance of its own, so a
    /// build beside a live controller never touches its sandboxes.
    pub fn for_validation(data_dir: &Path) -> Result<Self, String> {
        traversable(data_dir)?;
        Self::new(LocalConfig::for_validation(data_dir)).map_err(|e| e.to_string())
    }

    /// Checks the tools and the cgroup hierarchy; a clear error if the
    /// host cannot run sandboxes.
    pub fn new(cfg: LocalConfig) -> Result<Self, DriverError> {
        if !cfg.bwrap.is_file() {
            return Err(DriverError::Unavailable(format!(
                "bubblewrap not found at {} (install the `bubblewrap` package)",
                cfg.bwrap.display()
            )));
        }
        if !cfg.launcher.is_file() {
            return Err(DriverError::Unavailable(format!(
                "polydev-agent not found at {} (build the workspace)",
                cfg.launcher.display()
            )));
        }
        if let Some(missing) = missing_capabilities() {
            return Err(DriverError::Unavailable(format!(
                "the local driver needs root or these capabilities for cgroups, mounts and sandbox uids: {missing} (sandboxes themselves run unprivileged)"
            )));
        }
        let mut cgroups = Cgroups::detect(&cfg.cgroup_root, &cfg.instance)
            .map_err(|e| DriverError::Unavailable(format!("cgroups: {e}")))?;
        if let Err(e) = cgroups.set_budget(cfg.budget) {
            tracing::warn!(error = %e, "cannot set the sandboxes' aggregate memory and pids budget");
        }
        let mut cfg = cfg;
        // bubblewrap, already running as the sandbox's uid, must traverse
        // the state directory; a data dir in a private home cannot serve.
        if let Some(closed) = untraversable_ancestor(&cfg.state_dir) {
            let moved = Path::new(RUN_STATE_DIR).join(&cfg.instance);
            tracing::info!(
                closed = %closed.display(),
                state = %moved.display(),
                "the sandboxes' uids cannot traverse the data dir's parents; their state lives under /run instead"
            );
            private_dir(Path::new(RUN_STATE_DIR), 0o711)
                .and_then(|()| private_dir(&moved, 0o711))
                .map_err(|e| {
                    DriverError::Unavailable(format!(
                        "sandboxes cannot use {}: {} is not traversable by other users (mode 0700?), and {} cannot be made: {e}; make the directory traversable (chmod o+x) or choose --data-dir outside it",
                        cfg.state_dir.display(),
                        closed.display(),
                        moved.display()
                    ))
                })?;
            cfg.state_dir = moved;
        }
        private_dir(&cfg.state_dir, 0o711).map_err(io("state directory"))?;
        let probe = cfg.state_dir.join("sb-0000000000000000/ctl/agent.sock");
        if probe.as_os_str().len() >= 100 {
            return Err(DriverError::Unavailable(format!(
                "state directory {} is too long for the agent's socket path",
                cfg.state_dir.display()
            )));
        }
        // Sandboxes a previous process left keep their uids until destroyed.
        let mut uids = UidPool::new(cfg.uid_base, UID_RANGE);
        if let Ok(rd) = std::fs::read_dir(&cfg.state_dir) {
            for e in rd.flatten() {
                if let Some(uid) = std::fs::read_to_string(e.path().join("uid"))
                    .ok()
                    .and_then(|u| u.trim().parse().ok())
                {
                    uids.reserve(uid);
                }
            }
        }
        // One descriptor per sandbox's child: lift the soft limit (the
        // launcher lowers it again for the sandbox itself).
        if let Ok((_, hard)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            let _ = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                hard,
                hard,
            );
        }
        Ok(Self {
            cfg,
            cgroups,
            live: Mutex::new(HashMap::new()),
            uids: Mutex::new(uids),
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// Host uids held by live sandboxes of this driver.
    pub fn uids_in_use(&self) -> usize {
        self.uids.lock().map(|u| u.in_use()).unwrap_or(0)
    }

    fn dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.state_dir.join(id.as_str())
    }

    fn socket(&self, id: &SandboxId) -> PathBuf {
        self.dir(id).join("ctl/agent.sock")
    }

    fn live_uid(&self, id: &SandboxId) -> Option<u32> {
        self.live.lock().ok()?.get(id).map(|l| l.uid)
    }

    fn bwrap_args(&self, image: &Image) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for b in &image.manifest.host_binds {
            a.extend(["--ro-bind".into(), b.clone(), b.clone()]);
        }
        a.extend(
            [
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/local/bin:/usr/bin:/bin",
                "--setenv",
                "HOME",
                "/home/sandbox",
                "--chdir",
                "/home/sandbox",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        a
    }

    /// The controller's end of the egress relay: each connection the agent
    /// makes on the sandbox's behalf goes on to the egress proxy, with the
    /// sandbox's own credential (whatever the sandbox sent is replaced), at
    /// most `MAX_RELAY_CONNECTIONS` at once, its head read within a deadline
    /// before the proxy is dialled.
    fn start_relay(&self, path: &Path, route: Option<Route>, uid: u32) -> std::io::Result<Relay> {
        use std::os::unix::fs::PermissionsExt;
        let route = Arc::new(std::sync::RwLock::new(route));
        let current = route.clone();
        let listener = tokio::net::UnixListener::bind(path)?;
        // Only the sandbox's uid may connect (any other host account could
        // otherwise ride on the sandbox's credential). In a directory only
        // the controller can write: no race on the path.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )?;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RELAY_CONNECTIONS));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((inside, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue; // over the cap: closed at once
                };
                // Not handed out yet: no way out.
                let Some(route) = current.read().ok().and_then(|r| r.clone()) else {
                    continue;
                };
                conns.spawn(async move {
                    let _slot = slot;
                    let _ = relay_one(inside, route).await;
                });
            }
        });
        Ok((task.abort_handle(), route))
    }

    async fn fail(
        &self,
        id: &SandboxId,
        stage: &str,
        message: String,
        stages: Vec<Stage>,
    ) -> DriverError {
        // What the sandbox printed as it died may still be in the pipe.
        let done = self
            .live
            .lock()
            .ok()
            .and_then(|l| l.get(id).map(|l| l.console_done.clone()));
        if let Some(mut done) = done {
            let _ = tokio::time::timeout(Duration::from_millis(300), done.wait_for(|d| *d)).await;
        }
        let log_tail = self.log_tail(id, 50).await;
        if !self.cfg.keep_failed {
            let _ = self.destroy(id).await;
        } else {
            tracing::warn!(sandbox = %id, "keeping failed sandbox for inspection");
            let _ = write_private(
                &self.dir(id).join("console.log"),
                log_tail.join("\n").as_bytes(),
            );
        }
        DriverError::Boot {
            stage: stage.to_owned(),
            message,
            stages,
            log_tail,
        }
    }

    /// A connection to the agent's socket whose peer is this sandbox's
    /// agent: the sandbox's own uid, a process in the sandbox's cgroup.
    async fn checked_stream(
        &self,
        id: &SandboxId,
        uid: u32,
        deadline: Duration,
    ) -> Result<tokio::net::UnixStream, DriverError> {
        let stream =
            tokio::time::timeout(deadline, tokio::net::UnixStream::connect(self.socket(id)))
                .await
                .map_err(|_| DriverError::Agent(polydev_agent::ClientError::Timeout(deadline)))?
                .map_err(|e| DriverError::Agent(polydev_agent::ClientError::Connect(e)))?;
        let cred = stream
            .peer_cred()
            .map_err(|e| DriverError::Io(format!("agent socket of {id}: {e}")))?;
        let in_cgroup = cred.pid().is_some_and(|pid| self.cgroups.holds(id, pid));
        if cred.uid() != uid || !in_cgroup {
            tracing::error!(sandbox = %id, peer_uid = cred.uid(), expected_uid = uid, in_cgroup, "agent socket served by something else");
            return Err(DriverError::Io(format!(
                "the agent socket of sandbox {id} is not served by that sandbox"
            )));
        }
        Ok(stream)
    }
}

#[async_trait::async_trait]
impl Driver for LocalDriver {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(
        &self,
        id: &SandboxId,
        spec: &SandboxSpec,
        image: &Image,
        deadline: Duration,
    ) -> Result<Booted, DriverError> {
        let started_at = Instant::now();
        let dir = self.dir(id);
        let uid = self
            .uids
            .lock()
            .map_err(|_| DriverError::Io("uid pool poisoned".into()))?
            .allocate()
            .ok_or_else(|| {
                DriverError::Unavailable("every sandbox uid of this host is in use".into())
            })?;
        // Held in the table from now on: a destroy that comes meanwhile
        // finds the uid there (and releases it once, from there).
        let (console_done_tx, console_done) = tokio::sync::watch::channel(false);
        let console = Arc::new(Mutex::new(Console::default()));
        {
            let mut l = self
                .live
                .lock()
                .map_err(|_| DriverError::Io("sandbox table poisoned".into()))?;
            if l.contains_key(id) {
                if let Ok(mut u) = self.uids.lock() {
                    u.release(uid);
                }
                return Err(DriverError::Io(format!("sandbox {id} exists already")));
            }
            l.insert(
                id.clone(),
                Live {
                    uid,
                    console: console.clone(),
                    console_done,
                    task: None,
                    relay: None,
                },
            );
        }
        let made = (|| -> std::io::Result<()> {
            // Made again with its mode if another process of this instance
            // removed it empty at its shutdown (also in between).
            private_dir(&self.cfg.state_dir, 0o711)?;
            private_dir(&dir, 0o711)?;
            private_dir(&self.cfg.state_dir, 0o711)?;
            private_dir(&dir.join("ctl"), 0o700)?;
            private_dir(&dir.join("fs"), 0o711)?;
            write_private(&dir.join("uid"), uid.to_string().as_bytes())?;
            // Labels only: never environment values, never the spec.
            let labels = serde_json::to_vec(&spec.labels).map_err(std::io::Error::other)?;
            write_private(&dir.join("labels.json"), &labels)
        })();
        if let Err(e) = made {
            let _ = self.destroy(id).await;
            return Err(DriverError::Io(format!("sandbox directory: {e}")));
        }
        let procs = match self.cgroups.create(id, &spec.limits) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.destroy(id).await;
                return Err(DriverError::Io(format!("cgroups: {e}")));
            }
        };
        let mut command = vec![AGENT_PATH.to_owned()];
        let mut egress_dir = None;
        if spec.network == Network::Egress {
            let host = dir.join("host");
            let route = spec.egress.map(|target| Route {
                target,
                auth: spec.egress_auth.clone().map(Arc::<str>::from),
            });
            let relay = private_dir(&host, 0o711)
                .and_then(|()| self.start_relay(&host.join("egress.sock"), route, uid));
            let kept = match relay {
                Ok(r) => self
                    .live
                    .lock()
                    .ok()
                    .and_then(|mut l| l.get_mut(id).map(|live| live.relay = Some(r)))
                    .is_some(),
                Err(e) => {
                    let _ = self.destroy(id).await;
                    return Err(DriverError::Io(format!("egress relay: {e}")));
                }
            };
            if !kept {
                // Destroyed while being made.
                let _ = self.destroy(id).await;
                return Err(DriverError::NotFound(id.to_string()));
            }
            egress_dir = Some(host);
            command.extend([
                "--egress-relay".to_owned(),
                crate::spec::EGRESS_INSIDE.to_owned(),
                "--egress-socket".to_owned(),
                format!("{}/egress.sock", polydev_agent::launch::EGRESS_DIR_INSIDE),
            ]);
        }
        let mut stages = vec![Stage::now("created")];

        let launch = LaunchSpec {
            cgroup_procs: procs,
            scratch: dir.join("fs"),
            disk_bytes: spec.limits.disk_bytes,
            lower: image.rootfs.clone(),
            uid,
            gid: uid,
            agent_socket: self.socket(id),
            egress_dir,
            bwrap: self.cfg.bwrap.clone(),
            args: self.bwrap_args(image),
            seccomp: self.cfg.seccomp,
            command,
        };
        let launch_path = dir.join("launch.json");
        let bytes = serde_json::to_vec(&launch).map_err(|e| DriverError::Io(e.to_string()))?;
        if let Err(e) = write_private(&launch_path, &bytes) {
            let msg = format!("launch spec: {e}");
            return Err(self.fail(id, "created", msg, stages).await);
        }
        // Spawned from this (async) task's thread: bwrap's
        // --die-with-parent ties the sandbox to this process.
        let mut child = match tokio::process::Command::new(&self.cfg.launcher)
            .arg("launch")
            .arg(&launch_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("cannot start {}: {e}", self.cfg.launcher.display());
                return Err(self.fail(id, "created", msg, stages).await);
            }
        };
        stages.push(Stage::now("started"));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let task = tokio::spawn(async move {
            if let Some(mut stderr) = stderr {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut c) = console.lock() {
                        c.push(&buf[..n]);
                    }
                }
            }
            let _ = console_done_tx.send(true);
            let _ = child.wait().await;
        });
        let tracked = self
            .live
            .lock()
            .ok()
            .and_then(|mut l| {
                l.get_mut(id)
                    .map(|live| live.task = Some(task.abort_handle()))
            })
            .is_some();
        if !tracked {
            // Destroyed while being made: take what just started with it.
            task.abort();
            let _ = self.destroy(id).await;
            return Err(DriverError::NotFound(id.to_string()));
        }

        let remaining = |at: Instant| deadline.saturating_sub(at.duration_since(started_at));
        let ready = async {
            let Some(stdout) = stdout else {
                return Err("no stdout from the launcher".to_owned());
            };
            // One short line is all the agent says there; bound it anyway.
            let mut lines = BufReader::new(stdout.take(256)).lines();
            match lines.next_line().await {
                Ok(Some(l)) if l == READY_LINE => Ok(()),
                Ok(Some(l)) => Err(format!("unexpected first line from the agent: {l:?}")),
                Ok(None) => Err("the sandbox exited before its agent was ready".to_owned()),
                Err(e) => Err(format!("reading the agent's ready line: {e}")),
            }
        };
        match tokio::time::timeout(remaining(Instant::now()), ready).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(self.fail(id, "started", msg, stages).await),
            Err(_) => {
                let msg = format!(
                    "agent not ready within the {} ms boot deadline",
                    deadline.as_millis()
                );
                return Err(self.fail(id, "started", msg, stages).await);
            }
        }
        let client = match self.agent(id, remaining(Instant::now())).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("agent did not answer hello: {e}");
                return Err(self.fail(id, "started", msg, stages).await);
            }
        };
        stages.push(Stage::now("agent_ready"));
        Ok(Booted {
            stages,
            public_key: client.public_key.clone(),
        })
    }

    async fn agent(&self, id: &SandboxId, deadline: Duration) -> Result<AgentClient, DriverError> {
        let uid = self
            .live_uid(id)
            .ok_or_else(|| DriverError::NotFound(id.to_string()))?;
        let started = Instant::now();
        let stream = self.checked_stream(id, uid, deadline).await?;
        Ok(AgentClient::greet(stream, deadline.saturating_sub(started.elapsed())).await?)
    }

    async fn set_egress(
        &self,
        id: &SandboxId,
        target: std::net::SocketAddr,
        auth: String,
    ) -> Result<(), DriverError> {
        let live = self
            .live
            .lock()
            .map_err(|_| DriverError::Io("sandbox table poisoned".into()))?;
        let (_, route) = live
            .get(id)
            .and_then(|l| l.relay.as_ref())
            .ok_or_else(|| DriverError::Io(format!("sandbox {id} has no egress relay")))?;
        *route
            .write()
            .map_err(|_| DriverError::Io("relay route poisoned".into()))? = Some(Route {
            target,
            auth: Some(auth.into()),
        });
        Ok(())
    }

    async fn connect_service(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<tokio::net::UnixStream, DriverError> {
        if !crate::driver::valid_service_name(name) {
            return Err(DriverError::Io(format!("{name:?} is not a service name")));
        }
        let agent = self.agent(id, Duration::from_secs(5)).await?;
        agent
            .connect_service(name)
            .await
            .map_err(|e| DriverError::Io(format!("cannot reach {name} in sandbox {id}: {e}")))
    }

    fn memory_in_use(&self) -> Option<(u64, u64)> {
        let budget = self.cfg.budget.memory_bytes?;
        Some((self.cgroups.parent_memory_bytes(), budget))
    }

    async fn shutdown(&self) {
        // Only empty parents and state directories go: another process on
        // the same instance (an image build's validation has an instance
        // of its own) keeps its.
        self.cgroups.remove_parent_if_empty();
        let _ = std::fs::remove_dir(&self.cfg.state_dir);
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), DriverError> {
        let live = self.live.lock().ok().and_then(|mut l| l.remove(id));
        if let Some(l) = &live {
            if let Some((relay, _)) = &l.relay {
                relay.abort();
            }
        }
        let cgroups = self.cgroups.clone();
        let dir = self.dir(id);
        let owned = id.clone();
        let result = tokio::task::spawn_blocking(move || {
            let uid = std::fs::read_to_string(dir.join("uid"))
                .ok()
                .and_then(|u| u.trim().parse::<u32>().ok());
            cgroups
                .destroy(&owned, Duration::from_secs(10))
                .map_err(|e| DriverError::Io(format!("destroy {owned}: {e}")))?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(uid),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(uid),
                Err(e) => Err(DriverError::Io(format!("remove {}: {e}", dir.display()))),
            }
        })
        .await
        .map_err(|e| DriverError::Io(e.to_string()))?;
        if let Some(task) = live.as_ref().and_then(|l| l.task.as_ref()) {
            task.abort();
        }
        // The uid is free once no process of the sandbox is left: the
        // table's entry says which; without one (a previous process's
        // leftover), the file does, unless a live sandbox holds that uid.
        let uid = match &result {
            Ok(from_file) => live.as_ref().map(|l| l.uid).or_else(|| {
                from_file.filter(|u| {
                    self.live
                        .lock()
                        .map(|l| !l.values().any(|x| x.uid == *u))
                        .unwrap_or(false)
                })
            }),
            Err(_) => None,
        };
        if let (Some(uid), Ok(mut pool)) = (uid, self.uids.lock()) {
            pool.release(uid);
        }
        result.map(|_| ())
    }

    async fn list(&self) -> Result<Vec<Existing>, DriverError> {
        let cgroups = self.cgroups.clone();
        let state = self.cfg.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut ids: std::collections::BTreeSet<String> = cgroups.list().into_iter().collect();
            if let Ok(rd) = std::fs::read_dir(&state) {
                ids.extend(
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
            ids.into_iter()
                .map(|name| {
                    let labels = std::fs::read(state.join(&name).join("labels.json"))
                        .ok()
                        .filter(|b| b.len() <= 64 * 1024)
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let alive = SandboxId::parse(&name)
                        .map(|id| cgroups.is_populated(&id))
                        .unwrap_or(false);
                    Existing {
                        id: name,
                        labels,
                        alive,
                    }
                })
                .collect()
        })
        .await
        .map_err(|e| DriverError::Io(e.to_string()))
    }

    async fn stats(&self, id: &SandboxId) -> Result<Stats, DriverError> {
        if !self.dir(id).exists() {
            return Err(DriverError::NotFound(id.to_string()));
        }
        let u = self.cgroups.usage(id);
        Ok(Stats {
            memory_bytes: u.memory_bytes,
            pids: u.pids,
            cpu_usec: u.cpu_usec,
            oom_kills: u.oom_kills,
        })
    }

    async fn log_tail(&self, id: &SandboxId, lines: usize) -> Vec<String> {
        let console = self
            .live
            .lock()
            .ok()
            .and_then(|l| l.get(id).map(|l| l.console.clone()));
        match console {
            Some(c) => c.lock().map(|c| c.tail(lines)).unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

/// A running egress relay and its route (shared with its accept loop).
type Relay = (
    tokio::task::AbortHandle,
    Arc<std::sync::RwLock<Option<Route>>>,
);

/// Where an egress relay forwards, and the credential it adds.
#[derive(Debug, Clone)]
struct Route {
    target: std::net::SocketAddr,
    auth: Option<Arc<str>>,
}

/// One relayed connection: the request head is read (within a deadline,
/// bounded), rewritten with the sandbox's own credential, and only then is
/// the proxy dialled; after that bytes pass through untouched.
async fn relay_one(mut inside: tokio::net::UnixStream, route: Route) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let read_head = async {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = inside.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            head.extend_from_slice(&chunk[..n]);
            match polydev_egress::relay_head::rewrite_head(&head, route.auth.as_deref()) {
                Head::Complete(bytes) => return Ok(Some(bytes)),
                Head::Partial if head.len() <= RELAY_MAX_HEAD => continue,
                Head::Partial | Head::Invalid => {
                    let _ = inside
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return Ok(None);
                }
            }
        }
    };
    let Some(head) = tokio::time::timeout(RELAY_HEAD_DEADLINE, read_head)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??
    else {
        return Ok(());
    };
    let mut proxy = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(route.target),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = proxy.set_nodelay(true);
    proxy.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut inside, &mut proxy).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_thousand_live_sandboxes_get_distinct_uids_and_released_ones_return() {
        let mut pool = UidPool::new(3_000_000, UID_RANGE);
        let uids: Vec<u32> = (0..2000).map(|_| pool.allocate().unwrap()).collect();
        let distinct: HashSet<u32> = uids.iter().copied().collect();
        assert_eq!(distinct.len(), 2000);
        assert!(uids
            .iter()
            .all(|u| (3_000_000..3_000_000 + UID_RANGE).contains(u)));
        pool.release(uids[7]);
        assert_eq!(pool.in_use(), 1999);
        // A full pool says so instead of handing out a live uid twice.
        let mut tiny = UidPool::new(10, 2);
        assert_eq!(
            (tiny.allocate(), tiny.allocate(), tiny.allocate()),
            (Some(10), Some(11), None)
        );
        tiny.release(10);
        assert_eq!(tiny.allocate(), Some(10));
        // Uids a previous process's sandboxes hold stay taken.
        let mut pool = UidPool::new(100, 3);
        pool.reserve(100);
        assert_eq!(pool.allocate(), Some(101));
    }

    #[test]
    fn the_console_keeps_only_its_last_bytes() {
        let mut c = Console::default();
        for i in 0..10_000 {
            c.push(format!("line {i}\n").as_bytes());
        }
        assert!(c.bytes.len() <= CONSOLE_BYTES);
        assert_eq!(c.tail(2), vec!["line 9998", "line 9999"]);
        c.push(&vec![b'x'; 3 * CONSOLE_BYTES]);
        assert_eq!(c.bytes.len(), CONSOLE_BYTES);
    }
}
