//! The local driver: every sandbox is a bubblewrap container (user, pid,
//! mount, net, uts, ipc and cgroup namespaces; all capabilities dropped;
//! our seccomp filter) over an overlay of a golden image with a
//! size-limited tmpfs as its writable layer, in its own cgroups, running
//! as a host uid of its own. `polydev-agent launch` does the few
//! privileged steps and execs bwrap; bwrap starts the agent as the
//! sandbox's first process.
//!
//! Host state per sandbox is one directory, `<state>/<id>/`: `spec.json`
//! (labels, for reconciliation), `launch.json`, `console.log` (the
//! launcher's and agent's stderr), `run/` (bound at /run/polydev inside:
//! the agent's socket) and `fs/` (the private tmpfs's mount point; nothing
//! is mounted there in the host's namespace).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polydev_agent::launch::LaunchSpec;
use polydev_agent::AgentClient;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cgroup::Cgroups;
use crate::driver::{Booted, Driver, DriverError, Existing, Stage, Stats};
use crate::image::{Image, AGENT_PATH};
use crate::spec::{Network, SandboxId, SandboxSpec};

const READY_LINE: &str = "polydev-agent ready";
const SOCKET_INSIDE: &str = "/run/polydev/agent.sock";

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
    /// Sandboxes run as host uids `uid_base .. uid_base + 65536`.
    pub uid_base: u32,
    pub seccomp: bool,
    /// Debug switch: keep a failed sandbox's directory (never the default).
    pub keep_failed: bool,
}

impl LocalConfig {
    /// Defaults for a data directory: the launcher next to the running
    /// binary, bwrap from PATH.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let digest =
            <sha2::Sha256 as sha2::Digest>::digest(canonical.as_os_str().as_encoded_bytes());
        Self {
            state_dir: data_dir.join("sandboxes"),
            launcher: default_launcher(),
            bwrap: which("bwrap").unwrap_or_else(|| PathBuf::from("/usr/bin/bwrap")),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            instance: format!("polydev-{}", hex::encode(&digest[..6])),
            uid_base: 3_000_000,
            seccomp: true,
            keep_failed: false,
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

#[derive(Debug)]
pub struct LocalDriver {
    cfg: LocalConfig,
    cgroups: Cgroups,
    /// Sandboxes started by this process: their launcher's child handle
    /// is reaped by a task; here only to know they are ours.
    started: Mutex<HashMap<SandboxId, u32>>,
    /// Egress relays (network mode `egress`), stopped on destroy; each
    /// with where it forwards to (unset: a pooled sandbox not handed out,
    /// whose relay refuses every connection).
    relays: Mutex<HashMap<SandboxId, Relay>>,
}

impl Drop for LocalDriver {
    fn drop(&mut self) {
        // Our parent cgroups go with us when no sandbox is left in them.
        self.cgroups.remove_parent_if_empty();
    }
}

fn io(context: &str) -> impl Fn(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::Io(format!("{context}: {e}"))
}

impl LocalDriver {
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
        let cgroups = Cgroups::detect(&cfg.cgroup_root, &cfg.instance)
            .map_err(|e| DriverError::Unavailable(format!("cgroups: {e}")))?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(io("state directory"))?;
        let probe = cfg.state_dir.join("sb-0000000000000000/run/agent.sock");
        if probe.as_os_str().len() >= 100 {
            return Err(DriverError::Unavailable(format!(
                "state directory {} is too long for the agent's socket path",
                cfg.state_dir.display()
            )));
        }
        // One descriptor per sandbox's child: lift the soft limit.
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
            started: Mutex::new(HashMap::new()),
            relays: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    fn dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.state_dir.join(id.as_str())
    }

    fn socket(&self, id: &SandboxId) -> PathBuf {
        self.dir(id).join("run/agent.sock")
    }

    fn uid(&self, id: &SandboxId) -> u32 {
        let hex = id.as_str().trim_start_matches("sb-");
        let n = u64::from_str_radix(hex, 16).unwrap_or(0);
        self.cfg.uid_base + (n % 65_536) as u32
    }

    fn bwrap_args(&self, image: &Image, run: &Path) -> Vec<String> {
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
        a.extend([
            "--bind".into(),
            run.display().to_string(),
            "/run/polydev".into(),
        ]);
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
    /// makes on the sandbox's behalf goes on to the egress proxy.
    fn start_relay(
        &self,
        id: &SandboxId,
        path: &Path,
        route: Option<Route>,
        uid: u32,
    ) -> std::io::Result<()> {
        let route = Arc::new(std::sync::RwLock::new(route));
        let current = route.clone();
        let listener = tokio::net::UnixListener::bind(path)?;
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((inside, _)) = listener.accept().await else {
                    break;
                };
                // Not handed out yet: no way out.
                let Some(Route { target, auth }) = current.read().ok().and_then(|r| r.clone())
                else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(proxy) = tokio::net::TcpStream::connect(target).await {
                        let _ = proxy.set_nodelay(true);
                        let _ = relay_one(inside, proxy, auth).await;
                    }
                });
            }
        });
        if let Ok(mut r) = self.relays.lock() {
            r.insert(id.clone(), (task.abort_handle(), route));
        }
        Ok(())
    }

    async fn fail(
        &self,
        id: &SandboxId,
        stage: &str,
        message: String,
        stages: Vec<Stage>,
    ) -> DriverError {
        let log_tail = self.log_tail(id, 50).await;
        if !self.cfg.keep_failed {
            let _ = self.destroy(id).await;
        } else {
            tracing::warn!(sandbox = %id, "keeping failed sandbox for inspection");
        }
        DriverError::Boot {
            stage: stage.to_owned(),
            message,
            stages,
            log_tail,
        }
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
        let run = dir.join("run");
        let uid = self.uid(id);
        std::fs::create_dir_all(&run).map_err(io("sandbox directory"))?;
        std::fs::create_dir_all(dir.join("fs")).map_err(io("sandbox directory"))?;
        nix::unistd::chown(
            &run,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )
        .map_err(|e| DriverError::Io(format!("chown run directory: {e}")))?;
        let spec_json = serde_json::to_vec(spec).map_err(|e| DriverError::Io(e.to_string()))?;
        std::fs::write(dir.join("spec.json"), spec_json).map_err(io("spec"))?;
        let procs = match self.cgroups.create(id, &spec.limits) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.destroy(id).await;
                return Err(DriverError::Io(format!("cgroups: {e}")));
            }
        };
        let mut command = vec![AGENT_PATH.into(), "--socket".into(), SOCKET_INSIDE.into()];
        if spec.network == Network::Egress {
            let route = spec.egress.map(|target| Route {
                target,
                auth: spec.egress_auth.clone().map(Arc::<str>::from),
            });
            match self.start_relay(id, &run.join("egress.sock"), route, uid) {
                Ok(()) => {
                    command.extend(["--egress-relay".into(), crate::spec::EGRESS_INSIDE.into()])
                }
                Err(e) => {
                    let _ = self.destroy(id).await;
                    return Err(DriverError::Io(format!("egress relay: {e}")));
                }
            }
        }
        let mut stages = vec![Stage::now("created")];

        let launch = LaunchSpec {
            cgroup_procs: procs,
            scratch: dir.join("fs"),
            disk_bytes: spec.limits.disk_bytes,
            lower: image.rootfs.clone(),
            uid,
            gid: uid,
            bwrap: self.cfg.bwrap.clone(),
            args: self.bwrap_args(image, &run),
            seccomp: self.cfg.seccomp,
            command,
        };
        let launch_path = dir.join("launch.json");
        let bytes = serde_json::to_vec(&launch).map_err(|e| DriverError::Io(e.to_string()))?;
        std::fs::write(&launch_path, bytes).map_err(io("launch spec"))?;
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .map_err(io("console log"))?;
        // Spawned from this (async) task's thread: bwrap's
        // --die-with-parent ties the sandbox to this process.
        let mut child = match tokio::process::Command::new(&self.cfg.launcher)
            .arg("launch")
            .arg(&launch_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(console)
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
        if let Ok(mut s) = self.started.lock() {
            s.insert(id.clone(), child.id().unwrap_or(0));
        }
        let stdout = child.stdout.take();
        tokio::spawn(async move {
            let _ = child.wait().await;
        });

        let remaining = |at: Instant| deadline.saturating_sub(at.duration_since(started_at));
        let ready = async {
            let Some(stdout) = stdout else {
                return Err("no stdout from the launcher".to_owned());
            };
            let mut lines = BufReader::new(stdout).lines();
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
        let client = match AgentClient::connect(&self.socket(id), remaining(Instant::now())).await {
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
        let socket = self.socket(id);
        if !socket.exists() {
            return Err(DriverError::NotFound(id.to_string()));
        }
        Ok(AgentClient::connect(&socket, deadline).await?)
    }

    async fn set_egress(
        &self,
        id: &SandboxId,
        target: std::net::SocketAddr,
        auth: String,
    ) -> Result<(), DriverError> {
        let relays = self
            .relays
            .lock()
            .map_err(|_| DriverError::Io("relay table poisoned".into()))?;
        let (_, route) = relays
            .get(id)
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
        if !self.dir(id).exists() {
            return Err(DriverError::NotFound(id.to_string()));
        }
        tokio::net::UnixStream::connect(self.dir(id).join("run").join(name))
            .await
            .map_err(|e| DriverError::Io(format!("cannot reach {name} in sandbox {id}: {e}")))
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), DriverError> {
        if let Ok(mut s) = self.started.lock() {
            s.remove(id);
        }
        if let Some((relay, _)) = self.relays.lock().ok().and_then(|mut r| r.remove(id)) {
            relay.abort();
        }
        let cgroups = self.cgroups.clone();
        let dir = self.dir(id);
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            cgroups
                .destroy(&id, Duration::from_secs(10))
                .map_err(|e| DriverError::Io(format!("destroy {id}: {e}")))?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(DriverError::Io(format!("remove {}: {e}", dir.display()))),
            }
        })
        .await
        .map_err(|e| DriverError::Io(e.to_string()))?
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
                    let labels = std::fs::read(state.join(&name).join("spec.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<SandboxSpec>(&b).ok())
                        .map(|s| s.labels)
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
        let path = self.dir(id).join("console.log");
        let text = tokio::fs::read(&path).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.chars().take(500).collect())
            .collect()
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

/// One relayed connection. A request head without `Proxy-Authorization`
/// gets the sandbox's (and, unless it is a CONNECT, `Connection: close`,
/// so every later request arrives on a new connection and gets it too);
/// everything else passes through untouched.
async fn relay_one(
    mut inside: tokio::net::UnixStream,
    mut proxy: tokio::net::TcpStream,
    auth: Option<Arc<str>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(auth) = auth {
        let mut head = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            if head.len() > 64 * 1024 {
                break None;
            }
            let n = inside.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&chunk[..n]);
        };
        match end {
            Some(end) => {
                let text = String::from_utf8_lossy(&head[..end]).into_owned();
                proxy.write_all(&with_proxy_auth(&text, &auth)).await?;
                proxy.write_all(&head[end..]).await?;
            }
            None => proxy.write_all(&head).await?,
        }
    }
    tokio::io::copy_bidirectional(&mut inside, &mut proxy).await?;
    Ok(())
}

fn with_proxy_auth(head: &str, auth: &str) -> Vec<u8> {
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let headers: Vec<&str> = lines.collect();
    let has = |name: &str| {
        headers.iter().any(|h| {
            h.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        })
    };
    if has("proxy-authorization") {
        return head.as_bytes().to_vec();
    }
    let connect = request_line.starts_with("CONNECT ");
    let mut out = String::with_capacity(head.len() + auth.len() + 64);
    out.push_str(request_line);
    out.push_str("\r\n");
    for h in headers {
        let name = h.split_once(':').map(|(k, _)| k.trim()).unwrap_or("");
        let hop = ["connection", "proxy-connection", "keep-alive"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n));
        if !connect && hop {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    if !connect {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("Proxy-Authorization: ");
    out.push_str(auth);
    out.push_str("\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod relay_tests {
    use super::with_proxy_auth;

    #[test]
    fn requests_without_proxy_credentials_get_the_sandbox_s_and_close() {
        let get =
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nProxy-Connection: keep-alive\r\n\r\n";
        assert_eq!(
            String::from_utf8(with_proxy_auth(get, "Basic abc")).unwrap(),
            "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nProxy-Authorization: Basic abc\r\n\r\n"
        );
        let connect = "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n";
        assert_eq!(
            String::from_utf8(with_proxy_auth(connect, "Basic abc")).unwrap(),
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nProxy-Authorization: Basic abc\r\n\r\n"
        );
        let own = "GET http://a.test/ HTTP/1.1\r\nproxy-authorization: Basic own\r\n\r\n";
        assert_eq!(with_proxy_auth(own, "Basic abc"), own.as_bytes());
    }
}
