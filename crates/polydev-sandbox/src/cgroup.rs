//! Per-sandbox cgroups on either hierarchy: v1 (one directory per
//! controller: memory, pids, cpu) or v2 (one unified directory). Every
//! sandbox gets `<root>/<ctrl>/<parent>/<id>`; `parent` names this
//! controller instance, so a listing shows exactly our sandboxes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::spec::{Limits, SandboxId};

/// Aggregate limits on the instance's parent cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

impl Budget {
    /// This host less a reserve for the controller, the store and the
    /// system: memory less max(2 GiB, 1/8), pids less max(2048, 1/4).
    pub fn for_host() -> Self {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024);
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        Self {
            memory_bytes: total.map(|t| t.saturating_sub((2u64 << 30).max(t / 8))),
            pids: pid_max.map(|p| p.saturating_sub(2048u64.max(p / 4))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    parent: String,
    version: Version,
    /// v1 controllers we make groups in (cpuacct too when it is mounted
    /// apart from cpu).
    v1: Vec<&'static str>,
    /// The instance's aggregate limits, applied whenever the parents are
    /// (re)made.
    budget: Budget,
}

/// What the kernel counts for one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_usec: u64,
    pub oom_kills: u64,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.events, cpu.stat, memory.oom_control).
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl Cgroups {
    /// Detects the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path, parent: &str) -> std::io::Result<Self> {
        let version = if root.join("cgroup.controllers").exists() {
            Version::V2
        } else if V1_CONTROLLERS.iter().all(|c| root.join(c).is_dir()) {
            Version::V1
        } else {
            return Err(std::io::Error::other(format!(
                "no usable cgroup hierarchy under {} (need v2, or v1 with memory, pids and cpu)",
                root.display()
            )));
        };
        let mut v1 = V1_CONTROLLERS.to_vec();
        let canon = |c: &str| std::fs::canonicalize(root.join(c)).ok();
        if version == Version::V1
            && root.join("cpuacct").is_dir()
            && canon("cpuacct") != canon("cpu")
        {
            v1.push("cpuacct");
        }
        let me = Self {
            root: root.to_owned(),
            parent: parent.to_owned(),
            version,
            v1,
            budget: Budget::default(),
        };
        me.prepare_parent()?;
        Ok(me)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    fn prepare_parent(&self) -> std::io::Result<()> {
        let mut made = false;
        for parent in self.parents() {
            made |= !parent.is_dir();
            std::fs::create_dir_all(&parent)?;
            if self.version == Version::V2 {
                // Delegate the controllers down to the sandboxes' groups.
                for dir in [&self.root, &parent] {
                    for c in ["+memory", "+pids", "+cpu"] {
                        let _ = write(&dir.join("cgroup.subtree_control"), c);
                    }
                }
            }
        }
        if made && self.budget != Budget::default() {
            if let Err(e) = self.apply_budget() {
                tracing::warn!(error = %e, "cannot set the sandboxes' aggregate budget on the remade parent");
            }
        }
        Ok(())
    }

    /// This instance's parent group (one per v1 controller).
    fn parents(&self) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => self
                .v1
                .iter()
                .map(|c| self.root.join(c).join(&self.parent))
                .collect(),
            Version::V2 => vec![self.root.join(&self.parent)],
        }
    }

    fn dir(&self, controller: &str, id: &str) -> PathBuf {
        match self.version {
            Version::V1 => self.root.join(controller).join(&self.parent).join(id),
            Version::V2 => self.root.join(&self.parent).join(id),
        }
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => self.v1.iter().map(|c| self.dir(c, id)).collect(),
            Version::V2 => vec![self.dir("", id)],
        }
    }

    /// Limits what all of this instance's sandboxes together may use (on
    /// the parent groups; children cannot exceed them), now and whenever
    /// the parents are made again.
    pub fn set_budget(&mut self, budget: Budget) -> std::io::Result<()> {
        self.budget = budget;
        self.apply_budget()
    }

    fn apply_budget(&self) -> std::io::Result<()> {
        let budget = self.budget;
        match self.version {
            Version::V1 => {
                if let Some(bytes) = budget.memory_bytes {
                    let mem = self.root.join("memory").join(&self.parent);
                    write(&mem.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    let memsw = mem.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &bytes.to_string())?;
                    }
                }
                if let Some(pids) = budget.pids {
                    let dir = self.root.join("pids").join(&self.parent);
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
            }
            Version::V2 => {
                let dir = self.root.join(&self.parent);
                if let Some(bytes) = budget.memory_bytes {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                }
                if let Some(pids) = budget.pids {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The parent groups' limits as the kernel has them (memory, pids).
    pub fn budget(&self) -> (Option<u64>, Option<u64>) {
        match self.version {
            Version::V1 => (
                read_u64(
                    &self
                        .root
                        .join("memory")
                        .join(&self.parent)
                        .join("memory.limit_in_bytes"),
                ),
                read_u64(&self.root.join("pids").join(&self.parent).join("pids.max")),
            ),
            Version::V2 => (
                read_u64(&self.root.join(&self.parent).join("memory.max")),
                read_u64(&self.root.join(&self.parent).join("pids.max")),
            ),
        }
    }

    /// Memory all of this instance's sandboxes hold now and cannot give
    /// back without killing something: anonymous memory and tmpfs pages
    /// (and, on v2, unreclaimable kernel memory), not the page cache, which
    /// a tenant could inflate at will and the kernel reclaims on demand.
    pub fn parent_memory_bytes(&self) -> u64 {
        let sum = |file: PathBuf, keys: &[&str]| -> u64 {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(k, _)| keys.contains(k))
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum()
        };
        match self.version {
            Version::V1 => sum(
                self.root
                    .join("memory")
                    .join(&self.parent)
                    .join("memory.stat"),
                &["total_rss", "total_shmem"],
            ),
            Version::V2 => sum(
                self.root.join(&self.parent).join("memory.stat"),
                &[
                    "anon",
                    "shmem",
                    "kernel_stack",
                    "pagetables",
                    "slab_unreclaimable",
                ],
            ),
        }
    }

    /// Whether process `pid` is in sandbox `id`'s groups (read from
    /// /proc, which no sandbox can change).
    pub fn holds(&self, id: &SandboxId, pid: i32) -> bool {
        let suffix = format!("/{}/{}", self.parent, id.as_str());
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|text| {
                text.lines().any(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
                    let relevant = match self.version {
                        Version::V1 => ctrls.is_some_and(|c| c.split(',').any(|c| c == "pids")),
                        Version::V2 => ctrls == Some(""),
                    };
                    relevant && path.is_some_and(|p| p.ends_with(&suffix))
                })
            })
            .unwrap_or(false)
    }

    /// Makes the groups and writes the limits; returns the `cgroup.procs`
    /// files the launcher joins.
    pub fn create(&self, id: &SandboxId, limits: &Limits) -> std::io::Result<Vec<PathBuf>> {
        // The parents again, should something have removed them meanwhile
        // (an empty parent may be removed by another instance's cleanup).
        self.prepare_parent()?;
        let id = id.as_str();
        let dirs = self.dirs(id);
        for d in &dirs {
            std::fs::create_dir(d)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
        }
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        match self.version {
            Version::V1 => {
                let mem = self.dir("memory", id);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                // With swap accounting on, swap counts against the limit too.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                let _ = write(&mem.join("memory.swappiness"), "0");
                write(
                    &self.dir("pids", id).join("pids.max"),
                    &limits.pids.to_string(),
                )?;
                let cpu = self.dir("cpu", id);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            Version::V2 => {
                let d = self.dir("", id);
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = write(&d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
        }
        Ok(dirs.iter().map(|d| d.join("cgroup.procs")).collect())
    }

    fn procs(&self, id: &str) -> Vec<i32> {
        let file = self.dir("pids", id).join("cgroup.procs");
        std::fs::read_to_string(file)
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The processes in the sandbox's groups (host pids).
    pub fn processes(&self, id: &SandboxId) -> Vec<i32> {
        self.procs(id.as_str())
    }

    /// Whether any process is still in the sandbox's groups.
    pub fn is_populated(&self, id: &SandboxId) -> bool {
        !self.procs(id.as_str()).is_empty()
    }

    /// SIGKILLs everything in the groups until they are empty, then removes
    /// them. Idempotent; a group that never existed is fine.
    pub fn destroy(&self, id: &SandboxId, deadline: Duration) -> std::io::Result<()> {
        let id = id.as_str();
        let until = Instant::now() + deadline;
        let kill_file = self.dir("", id).join("cgroup.kill");
        loop {
            let procs = self.procs(id);
            if procs.is_empty() {
                break;
            }
            if self.version == Version::V2 && kill_file.exists() {
                let _ = write(&kill_file, "1");
            } else {
                for pid in procs {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if Instant::now() > until {
                return Err(std::io::Error::other(format!(
                    "processes of {id} still alive after {deadline:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for d in self.dirs(id) {
            // An exiting process can keep the group busy for a moment.
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > until => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("{}: {e}", d.display()),
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
        Ok(())
    }

    /// Names of the groups under our parent (on v1, any controller's).
    pub fn list(&self) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for p in self.parents() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        names.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// Removes the parent groups if no sandbox group is left in them (when
    /// a driver goes away); busy parents stay.
    pub fn remove_parent_if_empty(&self) {
        for p in self.parents() {
            let _ = std::fs::remove_dir(p);
        }
    }

    /// Destroys every sandbox group of this instance and the parent groups
    /// themselves (for tests and uninstall; the controller keeps its parent).
    pub fn remove_all(&self, deadline: Duration) -> std::io::Result<()> {
        for name in self.list() {
            if let Some(id) = SandboxId::parse(&name) {
                self.destroy(&id, deadline)?;
            }
        }
        for p in self.parents() {
            match std::fs::remove_dir(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn usage(&self, id: &SandboxId) -> Usage {
        let id = id.as_str();
        match self.version {
            Version::V1 => {
                let mem = self.dir("memory", id);
                let cpu = self.dir("cpu", id);
                let cpuacct = self.root.join("cpuacct").join(&self.parent).join(id);
                Usage {
                    memory_bytes: read_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0),
                    pids: read_u64(&self.dir("pids", id).join("pids.current")).unwrap_or(0),
                    cpu_usec: read_u64(&cpu.join("cpuacct.usage"))
                        .or_else(|| read_u64(&cpuacct.join("cpuacct.usage")))
                        .unwrap_or(0)
                        / 1000,
                    oom_kills: read_keyed(&mem.join("memory.oom_control"), "oom_kill").unwrap_or(0),
                }
            }
            Version::V2 => {
                let d = self.dir("", id);
                Usage {
                    memory_bytes: read_u64(&d.join("memory.current")).unwrap_or(0),
                    pids: read_u64(&d.join("pids.current")).unwrap_or(0),
                    cpu_usec: read_keyed(&d.join("cpu.stat"), "usage_usec").unwrap_or(0),
                    oom_kills: read_keyed(&d.join("memory.events"), "oom_kill").unwrap_or(0),
                }
            }
        }
    }
}
