//! The `polydev` binary, started for real and driven over HTTP and its CLI.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod api;
mod app;
mod clis;
mod deploy;
mod egress;
mod egress_standalone;
mod first_start;
mod hostile;
mod login;
mod observability;
mod process;
mod sandboxes;
mod vault_api;
mod vault_browser;
mod workspaces;

/// Expands each test into a `sqlite` and a `postgres` variant.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(polydev_store::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(polydev_store::Backend::Postgres).await })*
        }
    };
}
pub(crate) use on_both_backends;
