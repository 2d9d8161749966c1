//! Sessions built on sandboxes: runs (one prompt across the provider CLIs,
//! each in its own sandbox) and login sessions (a CLI's sign-in done by the
//! user inside a sandbox). They reach a sandbox only through the
//! `polydev_sandbox::Manager` (create, the agent connection, a service
//! connection, destroy) and keep their own records in the store.
//! `providers` holds everything CLI-specific; `vault` seals a CLI's
//! credential file to the user's vault inside its sandbox; `workspace`
//! is what a run's workspace is (its sealed stream, how it is unpacked
//! and how its diff is made).

pub mod login;
pub mod providers;
pub mod runs;
pub mod tasks;
pub mod vault;
pub mod workspace;
