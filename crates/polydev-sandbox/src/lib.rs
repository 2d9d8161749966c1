//! Sandboxes: the `Driver` interface every backend implements, the local
//! driver (Linux namespaces through bubblewrap, cgroups, overlay over a
//! golden image), the image store, and — above the drivers — the pools
//! and the reaper that keep what runs equal to what the store says, and
//! the login desktop the `browser` template carries. Sessions built on
//! sandboxes live in `polydev-sessions`.

pub mod build;
pub mod cgroup;
pub mod desktop;
pub mod driver;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod image;
pub mod local;
pub mod manager;
pub mod spec;

pub use driver::{Booted, Driver, DriverError, Existing, Stage, Stats};
pub use image::{Image, ImageError, ImageStore};
pub use local::{LocalConfig, LocalDriver};
pub use manager::{
    CreateRequest, EgressGate, EgressGrant, LimitKind, Manager, ManagerConfig, ManagerError,
    SandboxView, RESERVED_LABELS, SYSTEM_LABEL,
};
/// The agent connection the manager hands out, and what it streams.
pub use polydev_agent::{protocol::Event as AgentEvent, AgentClient, ClientError};
pub use spec::{Limits, Network, SandboxId, SandboxSpec};
