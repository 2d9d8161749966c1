//! A driver for tests that need sandboxes but not isolation: each "sandbox"
//! is the real agent served in this process on a socket in a temporary
//! directory (so exec, files and unseal are the real protocol), without
//! namespaces, cgroups or an image. Knobs make boots fail and sandboxes
//! vanish, and report memory use, so the manager's quotas, pools,
//! reconciliation and reaper can be tested in-process. Only with the
//! `test-support` feature (and in this crate's own tests).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polydev_agent::AgentClient;

use crate::driver::{Booted, Driver, DriverError, Existing, Stage, Stats};
use crate::image::Image;
use crate::spec::{SandboxId, SandboxSpec};

#[derive(Debug)]
struct Fake {
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
    labels: BTreeMap<String, String>,
    alive: bool,
}

impl Fake {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("agent.sock")
    }
}

#[derive(Debug, Default)]
pub struct FakeDriver {
    sandboxes: Mutex<HashMap<String, Fake>>,
    /// The next this many boots fail (stage `started`).
    pub fail_boots: AtomicUsize,
    /// What `memory_in_use` reports: (in use, budget).
    pub memory: Mutex<Option<(u64, u64)>>,
    booted: AtomicUsize,
}

impl FakeDriver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sandboxes booted so far (pool members included).
    pub fn booted(&self) -> usize {
        self.booted.load(Ordering::SeqCst)
    }

    /// The ids the driver holds now.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .sandboxes
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The sandbox dies without the manager knowing (its agent stops).
    pub fn vanish(&self, id: &str) {
        if let Ok(mut s) = self.sandboxes.lock() {
            if let Some(f) = s.get_mut(id) {
                f.task.abort();
                f.alive = false;
            }
        }
    }

    /// A sandbox the driver has and the store never heard of.
    pub async fn plant(&self, id: &SandboxId) -> Result<(), DriverError> {
        self.start(id, BTreeMap::new(), Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    async fn start(
        &self,
        id: &SandboxId,
        labels: BTreeMap<String, String>,
        deadline: Duration,
    ) -> Result<Vec<u8>, DriverError> {
        let dir = tempfile::Builder::new()
            .prefix("polydev-fake-")
            .tempdir()
            .map_err(|e| DriverError::Io(e.to_string()))?;
        let socket = dir.path().join("agent.sock");
        let listener =
            tokio::net::UnixListener::bind(&socket).map_err(|e| DriverError::Io(e.to_string()))?;
        let agent = Arc::new(polydev_agent::server::Agent::default());
        let task = tokio::spawn(async move {
            let _ = agent.serve_listener(listener).await;
        });
        let client = AgentClient::connect(&socket, deadline).await?;
        let key = client.public_key.clone();
        if let Ok(mut s) = self.sandboxes.lock() {
            s.insert(
                id.to_string(),
                Fake {
                    dir,
                    task,
                    labels,
                    alive: true,
                },
            );
        }
        Ok(key)
    }

    fn socket(&self, id: &SandboxId) -> Result<std::path::PathBuf, DriverError> {
        self.sandboxes
            .lock()
            .ok()
            .and_then(|s| s.get(id.as_str()).filter(|f| f.alive).map(Fake::socket))
            .ok_or_else(|| DriverError::NotFound(id.to_string()))
    }
}

#[async_trait::async_trait]
impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn create(
        &self,
        id: &SandboxId,
        spec: &SandboxSpec,
        _image: &Image,
        deadline: Duration,
    ) -> Result<Booted, DriverError> {
        let created = Stage::now("created");
        let failing = self
            .fail_boots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(DriverError::Boot {
                stage: "created".into(),
                message: "the fake driver was told to fail this boot".into(),
                stages: vec![created],
                log_tail: vec!["fake: boot failed".into()],
            });
        }
        let public_key = self.start(id, spec.labels.clone(), deadline).await?;
        self.booted.fetch_add(1, Ordering::SeqCst);
        Ok(Booted {
            stages: vec![created, Stage::now("started"), Stage::now("agent_ready")],
            public_key,
        })
    }

    async fn agent(&self, id: &SandboxId, deadline: Duration) -> Result<AgentClient, DriverError> {
        let socket = self.socket(id)?;
        Ok(AgentClient::connect(&socket, deadline).await?)
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), DriverError> {
        let gone = self
            .sandboxes
            .lock()
            .ok()
            .and_then(|mut s| s.remove(id.as_str()));
        if let Some(f) = gone {
            f.task.abort();
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Existing>, DriverError> {
        Ok(self
            .sandboxes
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(id, f)| Existing {
                        id: id.clone(),
                        labels: f.labels.clone(),
                        alive: f.alive,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn stats(&self, id: &SandboxId) -> Result<Stats, DriverError> {
        self.socket(id).map(|_| Stats::default())
    }

    async fn log_tail(&self, _id: &SandboxId, _lines: usize) -> Vec<String> {
        Vec::new()
    }

    async fn set_egress(
        &self,
        _id: &SandboxId,
        _target: std::net::SocketAddr,
        _auth: String,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    fn memory_in_use(&self) -> Option<(u64, u64)> {
        self.memory.lock().ok().and_then(|m| *m)
    }

    async fn connect_service(
        &self,
        _id: &SandboxId,
        _name: &str,
    ) -> Result<tokio::net::UnixStream, DriverError> {
        Err(DriverError::Unavailable(
            "the fake driver has no service sockets".into(),
        ))
    }
}
