//! The agent that runs as the first process of every polydev sandbox, the
//! versioned protocol it speaks (`protocol`), and the controller's client
//! (`client`). The agent holds an ephemeral sealing key made at start, so
//! credentials relayed by the controller as sealed boxes are opened only
//! here, inside the sandbox (docs/VAULT.md).

pub mod client;
pub mod launch;
pub mod protocol;
pub mod seccomp;
pub mod server;

pub use client::{AgentClient, ClientError, ExecOutput};
pub use server::Agent;
